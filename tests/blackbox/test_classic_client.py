"""The tutorial's client keeps working: prefix "" and CORS for its origin.

Replays exactly what the classic Angular client sends from http://localhost:4200, preflights
included: POST /register, POST /login reading ``auth`` and ``token``, GET /profile with the
bearer token.
"""

from __future__ import annotations

import aiohttp

from tests.blackbox.client import PASSWORD, unique_email
from tests.blackbox.conftest import ROUTES

ORIGIN = "http://localhost:4200"
CLASSIC = f"""
accounts:
  prefix: ""
  bcrypt_rounds: 4
cors:
  allow_origins: ["{ORIGIN}"]
"""


async def preflight(s: aiohttp.ClientSession, url: str, method: str, headers: str) -> None:
    async with s.options(
        url,
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": headers,
        },
    ) as resp:
        assert resp.status == 204, await resp.text()
        assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
        assert method in resp.headers["Access-Control-Allow-Methods"]
        assert headers in resp.headers["Access-Control-Allow-Headers"].lower()


async def test_classic_register_login_profile(fresh_gateway) -> None:
    gw = fresh_gateway(extra=CLASSIC, routes=ROUTES)
    email = unique_email("classic")
    cors = {"Origin": ORIGIN}
    async with aiohttp.ClientSession() as s:
        await preflight(s, f"{gw.url}/register", "POST", "content-type")
        async with s.post(
            f"{gw.url}/register", json={"email": email, "password": PASSWORD}, headers=cors
        ) as resp:
            assert resp.status == 201
            assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
            assert "Origin" in resp.headers.getall("Vary")

        await preflight(s, f"{gw.url}/login", "POST", "content-type")
        async with s.post(
            f"{gw.url}/login", json={"email": email, "password": PASSWORD}, headers=cors
        ) as resp:
            body = await resp.json()
            assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
        assert body["auth"] is True
        token = body["token"]

        await preflight(s, f"{gw.url}/profile", "GET", "authorization")
        async with s.get(
            f"{gw.url}/profile", headers={**cors, "Authorization": f"Bearer {token}"}
        ) as resp:
            assert resp.status == 200
            assert (await resp.json())["email"] == email
            assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN


async def test_other_origins_get_no_cors_grant(fresh_gateway) -> None:
    gw = fresh_gateway(extra=CLASSIC, routes=ROUTES)
    async with aiohttp.ClientSession() as s:
        async with s.options(
            f"{gw.url}/login",
            headers={
                "Origin": "http://evil.example",
                "Access-Control-Request-Method": "POST",
            },
        ) as resp:
            assert "Access-Control-Allow-Origin" not in resp.headers
        async with s.post(
            f"{gw.url}/login",
            json={"email": "a@example.com", "password": "x"},
            headers={"Origin": "http://evil.example"},
        ) as resp:
            assert "Access-Control-Allow-Origin" not in resp.headers
            assert "Origin" in resp.headers.getall("Vary")
