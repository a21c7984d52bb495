"""``GET {p}/verify`` for nginx ``auth_request``, Traefik ForwardAuth and Caddy ``forward_auth``:
the policy of the route the proxy asks about, and the identity headers on a 200."""

from __future__ import annotations

import aiohttp
import pytest

from tests.blackbox.client import signed_in
from tests.blackbox.conftest import Gateway


def traefik(method: str, uri: str) -> dict[str, str]:
    return {"X-Forwarded-Method": method, "X-Forwarded-Host": "127.0.0.1", "X-Forwarded-Uri": uri}


def nginx(method: str, uri: str) -> dict[str, str]:
    return {"X-Original-Method": method, "X-Original-URI": uri}


async def verify(gateway: Gateway, headers: dict[str, str]) -> aiohttp.ClientResponse:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{gateway.url}/auth/verify", headers=headers) as resp:
            await resp.read()
            return resp


@pytest.mark.parametrize("style", [traefik, nginx])
async def test_verify_answers_identity_for_a_protected_route(gateway: Gateway, style) -> None:
    async with aiohttp.ClientSession() as s:
        account = await signed_in(s, gateway.url)
    resp = await verify(gateway, {**style("GET", "/api/things?x=1"), **account.bearer})
    assert resp.status == 200
    assert resp.headers["X-User-Id"] == account.user_id
    assert resp.headers["X-User-Email"] == account.email
    assert resp.headers["X-User-Roles"] == "user"


@pytest.mark.parametrize("style", [traefik, nginx])
async def test_verify_refuses_without_a_token_and_without_the_role(gateway: Gateway, style) -> None:
    resp = await verify(gateway, style("GET", "/api/things"))
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    async with aiohttp.ClientSession() as s:
        account = await signed_in(s, gateway.url)
    resp = await verify(gateway, {**style("GET", "/admin/panel"), **account.bearer})
    assert resp.status == 403


async def test_verify_public_route_gets_200_without_identity(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as s:
        account = await signed_in(s, gateway.url)
    resp = await verify(gateway, {**traefik("GET", "/public/page"), **account.bearer})
    assert resp.status == 200
    assert "X-User-Id" not in resp.headers


async def test_verify_applies_path_canonicalization(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as s:
        account = await signed_in(s, gateway.url)
    # /public/../admin is /admin: the admin policy, which this user does not pass.
    resp = await verify(gateway, {**traefik("GET", "/public/%2e%2e/admin"), **account.bearer})
    assert resp.status == 403
    resp = await verify(gateway, traefik("GET", "/admin%2fx"))
    assert resp.status == 400


async def test_verify_without_a_target_requires_a_valid_token(gateway: Gateway) -> None:
    assert (await verify(gateway, {})).status == 401
    async with aiohttp.ClientSession() as s:
        account = await signed_in(s, gateway.url)
    resp = await verify(gateway, account.bearer)
    assert resp.status == 200 and resp.headers["X-User-Id"] == account.user_id


async def test_hs256_gateway_from_an_environment_secret(fresh_gateway, monkeypatch) -> None:
    monkeypatch.setenv("GATEWAY_SECRET", "s" * 40)
    gw = fresh_gateway(
        extra="""
        tokens:
          algorithm: HS256
          secret: ${GATEWAY_SECRET}
        """
    )
    async with aiohttp.ClientSession() as s:
        account = await signed_in(s, gw.url)
        async with s.get(f"{gw.url}/api/x", headers=account.bearer) as resp:
            assert resp.status == 200
        async with s.get(f"{gw.url}/.well-known/jwks.json") as resp:
            assert (await resp.json()) == {"keys": []}
