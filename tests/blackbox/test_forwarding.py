"""CONTRACT §6 against the running gateway: what the upstream receives, and what it never does.

The echo upstream answers with exactly what reached it, so every assertion here is about
the upstream's view.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
import yarl

from tests.blackbox.client import get, get_echo, raw_request, received, signed_in
from tests.blackbox.conftest import Gateway

FORGED = "forged-admin"


async def test_upstream_sees_the_verified_identity(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as s:
        account = await signed_in(s, gateway.url)
        status, echo = await get_echo(s, f"{gateway.url}/api/items?x=1&y=%20", account.bearer)
    assert status == 200
    assert echo["path"] == "/api/items" and echo["query"] == "x=1&y=%20"
    assert received(echo, "X-User-Id") == [account.user_id]
    assert received(echo, "X-User-Email") == [account.email]
    assert received(echo, "X-User-Roles") == ["user"]
    assert received(echo, "X-Auth-Issuer") == [gateway.url]
    assert received(echo, "X-Forwarded-For") == ["127.0.0.1"]
    assert received(echo, "X-Forwarded-Proto") == ["http"]
    assert len(received(echo, "X-Request-Id")) == 1


@pytest.mark.parametrize("route", ["/api/x", "/maybe/x", "/public/x"])
@pytest.mark.parametrize(
    "forgery",
    [
        ["X-User-Id: " + FORGED],
        ["X-User-Id: " + FORGED, "X-User-Id: " + FORGED + "2"],
        ["x-user-id: " + FORGED],
        ["X-USER-ID: " + FORGED],
        ["X_User_Id: " + FORGED],
        ["X-User-Roles: admin", "X-Auth-Issuer: " + FORGED],
        ["X-User-Anything: " + FORGED],
        ["Connection: X-User-Id", "X-User-Id: " + FORGED],
    ],
)
async def test_forged_identity_headers_never_reach_the_upstream(
    gateway: Gateway, route: str, forgery: list[str]
) -> None:
    async with aiohttp.ClientSession() as s:
        account = await signed_in(s, gateway.url)
    headers = [f"Authorization: Bearer {account.access_token}", *forgery]
    resp = await raw_request(gateway.url, get(route, *headers))
    assert resp.status == 200, resp.body
    echo = resp.json()
    seen = [v for _, v in echo["headers"]]
    assert not any(FORGED in v for v in seen)
    assert "admin" not in received(echo, "X-User-Roles")
    if route == "/public/x":
        assert received(echo, "X-User-Id") == []
    else:
        assert received(echo, "X-User-Id") == [account.user_id]


async def test_optional_route_without_token_has_no_identity(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as s:
        status, echo = await get_echo(s, f"{gateway.url}/maybe/x", {"X-User-Id": FORGED})
        assert status == 200 and received(echo, "X-User-Id") == []
        bad = {"Authorization": "Bearer garbage.garbage.garbage"}
        async with s.get(f"{gateway.url}/maybe/x", headers=bad) as resp:
            assert resp.status == 401


async def test_required_route_refuses_missing_and_bad_tokens(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{gateway.url}/api/x") as resp:
            assert resp.status == 401
            assert resp.content_type == "application/problem+json"
            assert resp.headers["WWW-Authenticate"] == 'Bearer realm="gateway"'
        async with s.get(f"{gateway.url}/api/x", headers={"Authorization": "Bearer a.b.c"}) as resp:
            assert resp.status == 401
            assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]


async def test_missing_role_is_403_insufficient_scope(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as s:
        account = await signed_in(s, gateway.url)
        async with s.get(f"{gateway.url}/admin/x", headers=account.bearer) as resp:
            assert resp.status == 403
            assert 'error="insufficient_scope"' in resp.headers["WWW-Authenticate"]


async def test_hop_by_hop_and_connection_named_headers_are_removed(gateway: Gateway) -> None:
    resp = await raw_request(
        gateway.url,
        get(
            "/public/x",
            "Connection: X-Secret, keep-alive",
            "X-Secret: s",
            "Keep-Alive: 5",
            "Proxy-Authorization: Basic Zm9v",
            "TE: trailers",
            "X-Kept: yes",
        ),
    )
    echo = resp.json()
    names = {k.lower() for k, _ in echo["headers"]}
    assert {"x-secret", "keep-alive", "proxy-authorization", "te"}.isdisjoint(names)
    assert received(echo, "X-Kept") == ["yes"]


async def test_untrusted_forwarding_headers_are_replaced(gateway: Gateway) -> None:
    resp = await raw_request(
        gateway.url,
        get(
            "/public/x",
            "X-Forwarded-For: 6.6.6.6",
            "Forwarded: for=6.6.6.6",
            "X-Forwarded-Proto: https",
            "X-Forwarded-Host: evil.example",
            "X-Real-IP: 6.6.6.6",
            "X-Original-URL: /admin",
            "X-Rewrite-URL: /admin",
        ),
    )
    echo = resp.json()
    assert received(echo, "X-Forwarded-For") == ["127.0.0.1"]
    assert received(echo, "X-Forwarded-Proto") == ["http"]
    assert received(echo, "X-Forwarded-Host") == ["127.0.0.1"]
    for name in ("Forwarded", "X-Real-IP", "X-Original-URL", "X-Rewrite-URL"):
        assert received(echo, name) == [], name


async def test_gateway_cookies_never_reach_the_upstream(gateway: Gateway) -> None:
    resp = await raw_request(
        gateway.url,
        get("/public/x", "Cookie: gateway_session=abc; theme=dark; gateway_refresh=def"),
    )
    cookies = received(resp.json(), "Cookie")
    assert cookies and "gateway_" not in " ".join(cookies) and "theme=dark" in cookies[0]


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("abc-123_x.y", True),
        ("a" * 128, True),
        ("a" * 129, False),
        ("bad id", False),
        ("x<script>", False),
    ],
)
async def test_request_id_kept_when_sane_and_echoed(
    gateway: Gateway, sent: str, kept: bool
) -> None:
    resp = await raw_request(gateway.url, get("/public/x", f"X-Request-Id: {sent}"))
    upstream_ids = received(resp.json(), "X-Request-Id")
    assert len(upstream_ids) == 1
    assert (upstream_ids[0] == sent) is kept
    assert resp.header("X-Request-Id") == upstream_ids[0]


async def test_strip_prefix_and_upstream_base_path(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as s:
        account = await signed_in(s, gateway.url)
        _, bare = await get_echo(s, f"{gateway.url}/strip", account.bearer)
        _, deep = await get_echo(s, f"{gateway.url}/strip/a/b?q=1", account.bearer)
    assert bare["path"] == "/base/"
    assert deep["path"] == "/base/a/b" and deep["query"] == "q=1"


async def test_method_restricted_route_answers_405_with_allow(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as s:
        account = await signed_in(s, gateway.url)
        async with s.delete(f"{gateway.url}/ro/x", headers=account.bearer) as resp:
            assert resp.status == 405
            assert "GET" in resp.headers["Allow"]


async def test_no_route_is_404_problem(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{gateway.url}/nowhere") as resp:
            assert resp.status == 404
            assert resp.content_type == "application/problem+json"


async def test_post_body_reaches_upstream_unchanged(gateway: Gateway) -> None:
    body = bytes(range(256)).decode("latin-1") * 100
    async with aiohttp.ClientSession() as s:
        account = await signed_in(s, gateway.url)
        async with s.post(
            f"{gateway.url}/api/upload", data=body.encode("utf-8"), headers=account.bearer
        ) as resp:
            echo = await resp.json()
    assert echo["method"] == "POST"
    assert echo["body"] == body


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)


async def test_expect_100_continue_is_answered_once_the_token_is_accepted(
    gateway: Gateway,
) -> None:
    """curl's way with bodies over 1 KiB: the body is sent after ``100 Continue`` only."""
    async with aiohttp.ClientSession() as s:
        account = await signed_in(s, gateway.url)
    url = yarl.URL(gateway.url)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(
            b"POST /api/upload HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
            b"Expect: 100-continue\r\nAuthorization: Bearer %b\r\n\r\n"
            % account.access_token.encode()
        )
        assert await read_head(reader) == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"hello")
        head = await read_head(reader)
        assert head.startswith(b"HTTP/1.1 200 ")
        length = int(head.lower().partition(b"content-length: ")[2].partition(b"\r\n")[0])
        assert json.loads(await reader.readexactly(length))["body"] == "hello"
        # Refused: no 100, so the client never sends the body; the connection ends.
        writer.write(
            b"POST /api/upload HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        head = await read_head(reader)
        assert head.startswith(b"HTTP/1.1 401 ") and b"Connection: close" in head
    finally:
        writer.close()
