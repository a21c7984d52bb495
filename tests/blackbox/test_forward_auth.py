"""``GET {p}/verify`` for nginx ``auth_request``, Traefik ForwardAuth and Caddy ``forward_auth``:
the policy of the route the proxy asks about, and the identity headers on a 200."""

from __future__ import annotations

import json
from dataclasses import dataclass

import aiohttp
import pytest
from multidict import CIMultiDict

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


# -- the two header families must agree ------------------------------------------------------
# nginx (X-Original-*) and Traefik/Caddy (X-Forwarded-*) both pass client headers to /verify, so
# one family may be the client's own: the gateway refuses a disagreement instead of picking one.

# (name, first header, second header): each alone is decided normally (200 with the token), so
# a 400 for the pair can only come from the disagreement.
TARGET_CONFLICTS = [
    ("forwarded names public", ("X-Forwarded-Uri", "/public/x"), ("X-Original-URI", "/api/x")),
    ("original names public", ("X-Original-URI", "/public/x"), ("X-Forwarded-Uri", "/api/x")),
    ("same family twice", ("X-Forwarded-Uri", "/public/x"), ("X-Forwarded-Uri", "/api/x")),
    ("query differs", ("X-Forwarded-Uri", "/api/x?a=1"), ("X-Original-URI", "/api/x?a=2")),
]


@dataclass
class Verdict:
    status: int
    headers: CIMultiDict[str]
    body: bytes

    def detail(self) -> str:
        return str(json.loads(self.body)["detail"])


async def verify_all(gateway: Gateway, headers: list[tuple[str, str]]) -> Verdict:
    """``/verify`` with every header copy as given (repeats and both families)."""
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{gateway.url}/auth/verify", headers=CIMultiDict(headers)) as resp:
            return Verdict(resp.status, CIMultiDict(resp.headers), await resp.read())


@pytest.mark.parametrize(("name", "first", "second"), TARGET_CONFLICTS)
async def test_verify_refuses_uris_that_disagree(gateway: Gateway, name, first, second) -> None:
    async with aiohttp.ClientSession() as s:
        account = await signed_in(s, gateway.url)
    bearer = list(account.bearer.items())
    # Each alone is a normal decision (the token passes both routes)...
    assert (await verify_all(gateway, [first, *bearer])).status == 200
    assert (await verify_all(gateway, [second, *bearer])).status == 200
    # ...the two together are refused, with or without the token, and vouch for nobody.
    for extra in (bearer, []):
        verdict = await verify_all(gateway, [first, second, *extra])
        assert verdict.status == 400, (name, verdict.body)
        assert verdict.headers["Content-Type"] == "application/problem+json"
        assert "target URI" in verdict.detail()
        assert "X-User-Id" not in verdict.headers


@pytest.mark.parametrize(
    ("methods", "status"),
    [
        ((("X-Forwarded-Method", "GET"), ("X-Original-Method", "POST")), 400),
        ((("X-Original-Method", "GET"), ("X-Forwarded-Method", "DELETE")), 400),
        ((("X-Forwarded-Method", "GET"), ("X-Forwarded-Method", "POST")), 400),
        # Agreement (methods compare case-insensitively, as they are routed) is no conflict.
        ((("X-Forwarded-Method", "GET"), ("X-Original-Method", "get")), 200),
    ],
)
async def test_verify_refuses_methods_that_disagree(gateway: Gateway, methods, status) -> None:
    async with aiohttp.ClientSession() as s:
        account = await signed_in(s, gateway.url)
    # /ro allows GET only: believing the other method would be 405, believing GET 200.
    verdict = await verify_all(
        gateway, [("X-Forwarded-Uri", "/ro/x"), *methods, *account.bearer.items()]
    )
    assert verdict.status == status, verdict.body
    if status == 400:
        assert "target method" in verdict.detail()


async def test_verify_accepts_both_families_when_they_agree(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as s:
        account = await signed_in(s, gateway.url)
    both = {**traefik("GET", "/api/x?y=1"), **nginx("GET", "/api/x?y=1")}
    resp = await verify(gateway, {**both, **account.bearer})
    assert resp.status == 200 and resp.headers["X-User-Id"] == account.user_id
    # Agreeing on a protected route still needs the token; on the admin route, the role.
    assert (await verify(gateway, both)).status == 401
    admin = {**traefik("GET", "/admin/x"), **nginx("GET", "/admin/x"), **account.bearer}
    assert (await verify(gateway, admin)).status == 403
