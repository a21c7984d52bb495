"""``headers.assertion``: the upstream gets a short-lived JWT of the caller's identity and
verifies it with nothing but the gateway's JWKS (issue 4, first slice; the third-party
``jose`` verifier comes with the rest of that issue)."""

from __future__ import annotations

import aiohttp
import jwt
import pytest

from tests.blackbox.client import get_echo, received, signed_in
from tests.blackbox.conftest import Echo, Gateway

HEADER = "X-Identity-Assertion"


@pytest.fixture
def gw(fresh_gateway) -> Gateway:
    return fresh_gateway(extra=f"headers: {{assertion: {HEADER}}}")


async def verify_with_jwks(gw: Gateway, token: str, audience: str) -> dict:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{gw.url}/.well-known/jwks.json") as resp:
            jwks = await resp.json()
    kid = jwt.get_unverified_header(token)["kid"]
    key = jwt.PyJWKSet.from_dict(jwks)[kid]
    return jwt.decode(
        token,
        key.key,
        algorithms=["RS256"],
        audience=audience,
        issuer=gw.url,
        options={"require": ["exp", "iat", "sub", "aud", "iss"]},
    )


async def test_the_upstream_can_verify_who_is_calling(gw: Gateway, echo_upstream: Echo) -> None:
    async with aiohttp.ClientSession() as s:
        account = await signed_in(s, gw.url)
        _, echo = await get_echo(
            s, f"{gw.url}/api/x", {**account.bearer, HEADER: "forged.by.client"}
        )
    [assertion] = received(echo, HEADER)
    claims = await verify_with_jwks(gw, assertion, audience=echo_upstream.url)
    assert claims["sub"] == account.user_id and claims["email"] == account.email
    assert claims["roles"] == ["user"] and claims["orig_iss"] == gw.url
    assert claims["exp"] - claims["iat"] == 60
    assert jwt.get_unverified_header(assertion)["typ"] == "identity+jwt"


async def test_a_tampered_or_misdirected_assertion_fails(gw: Gateway, echo_upstream: Echo) -> None:
    async with aiohttp.ClientSession() as s:
        account = await signed_in(s, gw.url)
        _, echo = await get_echo(s, f"{gw.url}/api/x", account.bearer)
    [assertion] = received(echo, HEADER)
    head, payload, signature = assertion.split(".")
    flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
    with pytest.raises(jwt.InvalidSignatureError):
        await verify_with_jwks(gw, f"{head}.{payload}.{flipped}", audience=echo_upstream.url)
    with pytest.raises(jwt.InvalidAudienceError):
        await verify_with_jwks(gw, assertion, audience="http://127.0.0.1:1")


async def test_an_assertion_is_never_a_credential(gw: Gateway) -> None:
    async with aiohttp.ClientSession() as s:
        account = await signed_in(s, gw.url)
        _, echo = await get_echo(s, f"{gw.url}/api/x", account.bearer)
        [assertion] = received(echo, HEADER)
        async with s.get(
            f"{gw.url}/api/x", headers={"Authorization": f"Bearer {assertion}"}
        ) as resp:
            assert resp.status == 401


async def test_public_routes_get_no_assertion(gw: Gateway) -> None:
    async with aiohttp.ClientSession() as s:
        account = await signed_in(s, gw.url)
        _, echo = await get_echo(s, f"{gw.url}/public/x", account.bearer)
    assert received(echo, HEADER) == []
