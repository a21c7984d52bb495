"""External OpenID Connect issuers (issue 4, first slice): a provider's tokens reach a
protected upstream with the provider's identity, under the same route policy as ours.

The provider here is an aiohttp server in the test publishing discovery and a JWKS; the
gateway is the real subprocess, fetching the keys over loopback.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.blackbox.client import get_echo, received
from tests.blackbox.conftest import free_port

AUDIENCE = "api://orders"


@dataclass
class Provider:
    issuer: str
    key: rsa.RSAPrivateKey
    kid: str = "idp-key-1"

    def token(self, **overrides: Any) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": AUDIENCE,
            "sub": "00u1abcd|okta",
            "email": "grace@example.com",
            "name": "Grace Hopper",
            "realm_access": {"roles": ["admin", "user"]},
            "iat": now,
            "exp": now + 300,
        }
        claims.update(overrides)
        claims = {k: v for k, v in claims.items() if v is not None}
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": self.kid})


@pytest.fixture
async def provider() -> AsyncIterator[Provider]:
    port = free_port()
    issuer = f"http://127.0.0.1:{port}/oauth2/default"
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    jwk.update(kid="idp-key-1", alg="RS256", use="sig")

    async def discovery(request: web.Request) -> web.Response:
        return web.json_response({"issuer": issuer, "jwks_uri": f"{issuer}/v1/keys"})

    async def keys(request: web.Request) -> web.Response:
        return web.json_response({"keys": [jwk]})

    app = web.Application()
    app.router.add_get("/oauth2/default/.well-known/openid-configuration", discovery)
    app.router.add_get("/oauth2/default/v1/keys", keys)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield Provider(issuer, key)
    await runner.cleanup()


def issuer_config(provider: Provider) -> str:
    return f"""
        issuers:
          - name: okta
            issuer: {provider.issuer}
            audience: {AUDIENCE}
            claims: {{id: sub, email: email, name: name, roles: realm_access.roles}}
        """


async def test_a_provider_token_reaches_a_protected_upstream(fresh_gateway, provider) -> None:
    gw = fresh_gateway(extra=issuer_config(provider))
    bearer = {"Authorization": f"Bearer {provider.token()}"}
    async with aiohttp.ClientSession() as s:
        status, echo = await get_echo(s, f"{gw.url}/admin/orders", bearer)
        async with s.get(f"{gw.url}/auth/profile", headers=bearer) as resp:
            profile = await resp.json()
    assert status == 200, echo
    assert received(echo, "X-User-Id") == ["00u1abcd|okta"]
    assert received(echo, "X-User-Email") == ["grace@example.com"]
    assert received(echo, "X-User-Roles") == ["admin,user"]
    assert received(echo, "X-Auth-Issuer") == [provider.issuer]
    assert profile["id"] == "00u1abcd|okta" and profile["roles"] == ["admin", "user"]


@pytest.mark.parametrize(
    "overrides",
    [
        {"aud": "api://someone-else"},
        {"exp": int(time.time()) - 3600},
        {"sub": None},
        {"realm_access": {"roles": ["ad min"]}},  # a role that is no role
    ],
)
async def test_provider_tokens_are_held_to_the_same_rules(
    fresh_gateway, provider, overrides: dict[str, Any]
) -> None:
    gw = fresh_gateway(extra=issuer_config(provider))
    bearer = {"Authorization": f"Bearer {provider.token(**overrides)}"}
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{gw.url}/api/orders", headers=bearer) as resp:
            assert resp.status == 401
            assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]


async def test_a_provider_key_never_vouches_for_another_issuer(fresh_gateway, provider) -> None:
    gw = fresh_gateway(extra=issuer_config(provider))
    async with aiohttp.ClientSession() as s:
        for iss in (gw.url, "http://127.0.0.1:1/unconfigured"):
            bearer = {"Authorization": f"Bearer {provider.token(iss=iss)}"}
            async with s.get(f"{gw.url}/api/orders", headers=bearer) as resp:
                assert resp.status == 401, iss


async def test_provider_roles_are_policy_like_local_ones(fresh_gateway, provider) -> None:
    gw = fresh_gateway(extra=issuer_config(provider))
    bearer = {"Authorization": f"Bearer {provider.token(realm_access={'roles': ['user']})}"}
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{gw.url}/admin/orders", headers=bearer) as resp:
            assert resp.status == 403
        async with s.get(
            f"{gw.url}/auth/verify",
            headers={
                **bearer,
                "X-Forwarded-Method": "GET",
                "X-Forwarded-Uri": "/api/orders",
            },
        ) as resp:
            assert resp.status == 200 and resp.headers["X-User-Id"] == "00u1abcd|okta"


async def test_key_set_fetches_show_on_the_admin_metrics(fresh_gateway, provider) -> None:
    gw = fresh_gateway(extra=issuer_config(provider))
    bearer = {"Authorization": f"Bearer {provider.token()}"}
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{gw.url}/api/orders", headers=bearer) as resp:
            assert resp.status == 200
        async with s.get(f"{gw.admin_url}/metrics") as resp:
            metrics = await resp.text()
    assert 'gateway_jwks_fetches_total{issuer="okta",outcome="ok",reason="prefetch"} 1.0' in metrics
    assert 'gateway_jwks_keys{issuer="okta"} 1.0' in metrics
    assert 'gateway_jwks_fetch_duration_seconds_count{issuer="okta"} 1.0' in metrics
