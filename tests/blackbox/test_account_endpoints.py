"""CONTRACT §4 against the running gateway: one test (at least) per endpoint row."""

from __future__ import annotations

import aiohttp
import pytest

from tests.blackbox.client import PASSWORD, post_json, signed_in, unique_email
from tests.blackbox.conftest import Gateway

PROBLEM = "application/problem+json"


async def test_register_returns_the_account(gateway: Gateway) -> None:
    email = unique_email()
    async with aiohttp.ClientSession() as s:
        status, body, resp = await post_json(
            s,
            f"{gateway.url}/auth/register",
            {"email": f"  {email.upper()} ", "password": PASSWORD, "name": "Ada"},
        )
    assert status == 201
    assert set(body) == {"id", "email", "name", "roles", "created_at"}
    assert body["email"] == email.upper() and body["name"] == "Ada"
    assert body["roles"] == ["user"]
    assert "password" not in str(body)


@pytest.mark.parametrize(
    "payload",
    [
        {"email": "not-an-email", "password": PASSWORD},
        {"email": "a@b", "password": PASSWORD},
        {"email": "a b@example.com", "password": PASSWORD},
        {"email": "x@example.com", "password": "short"},
        {"email": "x@example.com", "password": "é" * 37},  # 74 bytes: over bcrypt's 72
        {"email": 5, "password": PASSWORD},
        {"password": PASSWORD},
        {"email": "x@example.com"},
    ],
)
async def test_register_refuses_invalid_input(gateway: Gateway, payload: dict) -> None:
    async with aiohttp.ClientSession() as s:
        status, body, resp = await post_json(s, f"{gateway.url}/auth/register", payload)
    assert status == 400
    assert resp.content_type == PROBLEM
    assert body["status"] == 400 and body["title"] and body["detail"]


async def test_register_same_email_in_another_case_is_409(gateway: Gateway) -> None:
    email = unique_email()
    async with aiohttp.ClientSession() as s:
        first, _, _ = await post_json(
            s, f"{gateway.url}/auth/register", {"email": email, "password": PASSWORD}
        )
        second, body, resp = await post_json(
            s, f"{gateway.url}/auth/register", {"email": email.upper(), "password": PASSWORD}
        )
    assert (first, second) == (201, 409)
    assert resp.content_type == PROBLEM


async def test_json_endpoints_need_json(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"{gateway.url}/auth/login",
            data="email=a&password=b",
            headers={"Content-Type": "text/plain"},
        ) as resp:
            assert resp.status == 415
            assert resp.content_type == PROBLEM
        async with s.post(
            f"{gateway.url}/auth/login",
            data=b"{not json",
            headers={"Content-Type": "application/json"},
        ) as resp:
            assert resp.status == 400


async def test_login_answers_tokens_for_both_client_styles(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as s:
        account = await signed_in(s, gateway.url)
        status, body, resp = await post_json(
            s, f"{gateway.url}/auth/login", {"email": account.email, "password": PASSWORD}
        )
    assert status == 200
    assert body["token_type"] == "Bearer" and body["auth"] is True
    assert body["token"] == body["access_token"]
    assert isinstance(body["expires_in"], int) and body["expires_in"] > 0
    assert body["refresh_token"]
    assert resp.headers["Cache-Control"] == "no-store"


async def test_login_failures_are_indistinguishable(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as s:
        account = await signed_in(s, gateway.url)
        wrong = await post_json(
            s, f"{gateway.url}/auth/login", {"email": account.email, "password": "wrong pass 1"}
        )
        unknown = await post_json(
            s, f"{gateway.url}/auth/login", {"email": unique_email(), "password": "wrong pass 1"}
        )
    assert wrong[0] == unknown[0] == 401
    assert wrong[1] == unknown[1]
    assert wrong[2].headers["WWW-Authenticate"].startswith('Bearer realm="gateway"')


async def test_profile_with_bearer_and_without(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as s:
        account = await signed_in(s, gateway.url)
        async with s.get(f"{gateway.url}/auth/profile", headers=account.bearer) as resp:
            assert resp.status == 200
            profile = await resp.json()
        async with s.get(f"{gateway.url}/auth/profile") as resp:
            assert resp.status == 401
            assert resp.headers["WWW-Authenticate"] == 'Bearer realm="gateway"'
        async with s.get(
            f"{gateway.url}/auth/profile", headers={"Authorization": "Bearer nope.nope.nope"}
        ) as resp:
            assert resp.status == 401
            assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]
            assert "nope" not in await resp.text()
    assert profile["id"] == account.user_id and profile["email"] == account.email


async def test_refresh_rotates_and_reuse_revokes_the_family(gateway: Gateway) -> None:
    url = f"{gateway.url}/auth/refresh"
    async with aiohttp.ClientSession() as s:
        account = await signed_in(s, gateway.url)
        status, first, resp = await post_json(s, url, {"refresh_token": account.refresh_token})
        assert status == 200 and first["refresh_token"] != account.refresh_token
        assert resp.headers["Cache-Control"] == "no-store"
        # The spent token comes back: an attacker or a replay. The whole family dies.
        status, _, _ = await post_json(s, url, {"refresh_token": account.refresh_token})
        assert status == 401
        status, _, _ = await post_json(s, url, {"refresh_token": first["refresh_token"]})
        assert status == 401


async def test_logout_ends_the_session_and_is_idempotent(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as s:
        account = await signed_in(s, gateway.url)
        body = {"refresh_token": account.refresh_token}
        assert (await post_json(s, f"{gateway.url}/auth/logout", body))[0] == 204
        assert (await post_json(s, f"{gateway.url}/auth/logout", body))[0] == 204
        assert (await post_json(s, f"{gateway.url}/auth/logout", {"refresh_token": "unknown"}))[
            0
        ] == 204
        assert (await post_json(s, f"{gateway.url}/auth/refresh", body))[0] == 401


async def test_logout_all_needs_a_bearer_and_ends_every_session(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as s:
        account = await signed_in(s, gateway.url)
        _, second, _ = await post_json(
            s, f"{gateway.url}/auth/login", {"email": account.email, "password": PASSWORD}
        )
        assert (await post_json(s, f"{gateway.url}/auth/logout", {"all": True}))[0] == 401
        status, _, _ = await post_json(
            s, f"{gateway.url}/auth/logout", {"all": True}, headers=account.bearer
        )
        assert status == 204
        for token in (account.refresh_token, second["refresh_token"]):
            assert (await post_json(s, f"{gateway.url}/auth/refresh", {"refresh_token": token}))[
                0
            ] == 401


async def test_password_change(gateway: Gateway) -> None:
    url = f"{gateway.url}/auth/password"
    async with aiohttp.ClientSession() as s:
        account = await signed_in(s, gateway.url)
        new = "another long passphrase"
        wrong = await post_json(
            s, url, {"current_password": "wrong wrong", "new_password": new}, headers=account.bearer
        )
        assert wrong[0] == 400
        assert (await post_json(s, url, {"current_password": PASSWORD, "new_password": new}))[
            0
        ] == 401
        ok = await post_json(
            s, url, {"current_password": PASSWORD, "new_password": new}, headers=account.bearer
        )
        assert ok[0] == 204
        assert (
            await post_json(
                s, f"{gateway.url}/auth/refresh", {"refresh_token": account.refresh_token}
            )
        )[0] == 401
        old = await post_json(
            s, f"{gateway.url}/auth/login", {"email": account.email, "password": PASSWORD}
        )
        assert old[0] == 401
        fresh = await post_json(
            s, f"{gateway.url}/auth/login", {"email": account.email, "password": new}
        )
        assert fresh[0] == 200


async def test_discovery_documents(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{gateway.url}/.well-known/jwks.json") as resp:
            jwks = await resp.json()
        async with s.get(f"{gateway.url}/.well-known/openid-configuration") as resp:
            oidc = await resp.json()
    assert jwks["keys"] and all({"kid", "alg", "use"} <= set(k) for k in jwks["keys"])
    assert all("d" not in k and "p" not in k for k in jwks["keys"])
    assert oidc["issuer"] == gateway.url
    assert oidc["jwks_uri"] == f"{gateway.url}/.well-known/jwks.json"


async def test_health_and_readiness(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as s:
        for path in ("/healthz", "/readyz"):
            async with s.get(gateway.url + path) as resp:
                assert resp.status == 200, path


async def test_metrics_live_on_the_admin_listener_only(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{gateway.url}/api/x") as resp:
            assert resp.status == 401
        async with s.get(f"{gateway.admin_url}/metrics") as resp:
            text = await resp.text()
        async with s.get(f"{gateway.url}/metrics") as resp:
            public = resp.status
    assert 'gateway_requests_total{route="api",status="401"}' in text
    assert "gateway_auth_failures_total" in text
    assert "gateway_upstream_duration_seconds" in text
    assert public == 404  # on the public port /metrics is just a path with no route


async def test_own_endpoint_with_wrong_method_is_405(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(
            f"{gateway.url}/auth/login", headers={"Accept": "application/json"}
        ) as resp:
            assert resp.status == 405
            assert resp.headers["Allow"] == "POST"


async def test_closed_registration_and_rate_limits(fresh_gateway) -> None:
    gw = fresh_gateway(
        extra="""
        accounts:
          bcrypt_rounds: 4
          registration: closed
        """
    )
    async with aiohttp.ClientSession() as s:
        status, body, _ = await post_json(
            s, f"{gw.url}/auth/register", {"email": unique_email(), "password": PASSWORD}
        )
    assert status == 403


async def test_register_rate_limit_gives_retry_after(fresh_gateway) -> None:
    gw = fresh_gateway(
        extra="""
        accounts:
          bcrypt_rounds: 4
          register_rate_limit: 2/min
        """
    )
    async with aiohttp.ClientSession() as s:
        statuses = []
        for _ in range(3):
            status, _, resp = await post_json(
                s, f"{gw.url}/auth/register", {"email": unique_email(), "password": PASSWORD}
            )
            statuses.append(status)
    assert statuses == [201, 201, 429]
    assert 1 <= int(resp.headers["Retry-After"]) <= 60


async def test_failed_logins_lock_the_account_and_the_ip(fresh_gateway) -> None:
    gw = fresh_gateway(
        extra="""
        accounts:
          bcrypt_rounds: 4
          login_rate_limit: 3/min
        """
    )
    async with aiohttp.ClientSession() as s:
        account = await signed_in(s, gw.url)
        statuses = []
        for _ in range(4):
            status, _, resp = await post_json(
                s, f"{gw.url}/auth/login", {"email": account.email, "password": "wrong wrong"}
            )
            statuses.append(status)
        # Even the right password is refused now: brute force cannot go on.
        right = await post_json(
            s, f"{gw.url}/auth/login", {"email": account.email, "password": PASSWORD}
        )
    assert statuses == [401, 401, 401, 429]
    assert right[0] == 429 and int(right[2].headers["Retry-After"]) >= 1
