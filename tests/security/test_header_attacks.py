"""Header attacks over raw sockets: forged identity, injection through claims, forwarding
headers from untrusted peers, oversized headers and Host confusion.

What reached the upstream is read from the echo, which lists every header copy it got.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterator
from typing import Any

import aiohttp
import jwt
import pytest

from tests.blackbox.client import (
    PASSWORD,
    Account,
    RawResponse,
    post_json,
    raw_request,
    unique_email,
)
from tests.blackbox.conftest import Echo, Gateway, launch_gateway, stop_process

PROBLEM = "application/problem+json"
IDENTITY_PREFIXES = ("x-user-", "x-auth-")


def request(path: str, *headers: str, host: str | None = "127.0.0.1") -> bytes:
    lines = [f"GET {path} HTTP/1.1", *([f"Host: {host}"] if host is not None else [])]
    lines += [*headers, "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1")


def echoed(resp: RawResponse) -> list[tuple[str, str]]:
    assert resp.status == 200, (resp.status, resp.body[:300])
    assert resp.header("X-Upstream") == "echo"
    return [(k, v) for k, v in resp.json()["headers"]]


def values(headers: list[tuple[str, str]], name: str) -> list[str]:
    """Every copy of ``name`` the upstream got, also spelled with ``_`` or in any case."""
    wanted = name.lower().replace("_", "-")
    return [v for k, v in headers if k.lower().replace("_", "-") == wanted]


def identity_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers if k.lower().replace("_", "-").startswith(IDENTITY_PREFIXES)]


# -- forged identity headers -------------------------------------------------------------

FORGED = [
    ["X-User-Id: admin"],
    ["x-user-id: admin"],
    ["X-USER-ROLES: admin"],
    ["X_User_Roles: admin"],
    ["x_user_roles: admin"],
    ["X-User_Roles: admin"],
    ["X-User-Roles: admin", "X-User-Roles: admin", "x-user-roles: root"],
    ["X-User-Roles: admin", "X_User_Roles: admin"],
    ["X-User-Roles:admin"],
    ["X-User-Roles:    admin   "],
    ["X-User-Roles: admin,user"],
    ["X-User-Email: root@example.com"],
    ["X-User-Name: Root"],
    ["X-Auth-Issuer: https://evil.example"],
    ["X-User-Anything: x", "X-Auth-Anything: y"],
    ["X_Auth_Whatever: y"],
    ["Connection: X-User-Roles", "X-User-Roles: admin"],
    ["Connection: close, X-User-Roles", "X-User-Roles: admin"],
    ["Connection: X-User-Roles, close", "X-User-Roles: admin"],
    ["Connection:   X-User-Roles\t", "X-User-Roles: admin"],
    ["Connection: keep-alive,X-User-Roles,,upgrade", "X-User-Roles: admin"],
    ["Connection: x_user_roles", "X_User_Roles: admin"],
    ["Connection: keep-alive", "Connection: X-User-Id", "X-User-Id: admin"],
    ["Connection: X-User-Id", "Connection: X-User-Roles", "X-User-Roles: admin"],
]


@pytest.mark.parametrize("forged", FORGED)
async def test_forged_identity_never_reaches_an_upstream(
    gateway: Gateway, user: Account, forged: list[str]
) -> None:
    bearer = f"Authorization: Bearer {user.access_token}"
    for path, extra in [("/public/x", ()), ("/maybe/x", ()), ("/api/x", (bearer,))]:
        got = echoed(await raw_request(gateway.url, request(path, *forged, *extra)))
        identity = identity_headers(got)
        if path == "/api/x":
            # Exactly the gateway's own: one copy each, from the verified token.
            assert values(got, "X-User-Roles") == ["user"], got
            assert values(got, "X-User-Id") == [user.user_id], got
            assert values(got, "X-User-Email") == [user.email], got
            assert all(v != "admin" and "root" not in v.lower() for _, v in identity), got
            assert len(identity) == len({k.lower() for k, _ in identity}), got
        else:
            assert identity == [], (path, got)


async def test_forged_identity_is_dropped_on_a_websocket_looking_request(gateway: Gateway) -> None:
    resp = await raw_request(
        gateway.url,
        request(
            "/public/ws",
            "Connection: Upgrade, X-User-Roles",
            "Upgrade: websocket",
            "X-User-Roles: admin",
            "X-User-Id: admin",
        ),
    )
    assert identity_headers(echoed(resp)) == []


# -- claims that hold CR, LF, NUL and other bytes ------------------------------------------


def expected_encoding(value: str) -> str:
    """CONTRACT §6: printable ASCII but ``%`` as-is, every other UTF-8 byte as ``%XX``."""
    return "".join(
        chr(b) if 0x20 <= b <= 0x7E and b != 0x25 else f"%{b:02X}" for b in value.encode()
    )


async def register_and_login(base: str, name: str) -> tuple[int, Any, str | None]:
    async with aiohttp.ClientSession() as session:
        email = unique_email("name")
        status, body, _ = await post_json(
            session, f"{base}/auth/register", {"email": email, "password": PASSWORD, "name": name}
        )
        if status != 201:
            return status, body, None
        status, tokens, _ = await post_json(
            session, f"{base}/auth/login", {"email": email, "password": PASSWORD}
        )
        assert status == 200 and tokens is not None
        return 201, body, tokens["access_token"]


@pytest.mark.parametrize(
    "name",
    [
        "%0d%0aX-User-Roles: admin",
        "%0D%0AX-User-Roles:%20admin",
        "%00admin",
        "Zoë 日本語",
        "\u202eadmin",
        'a: b, c; d="e"',
        "\u2028X-User-Roles: admin",
        "é" * 200,
    ],
)
async def test_a_name_reaches_the_upstream_as_one_encoded_header(
    gateway: Gateway, name: str
) -> None:
    status, body, token = await register_and_login(gateway.url, name)
    if token is None:  # refused at registration is fine: never a 5xx, a problem
        assert status == 400, (status, body)
        return
    resp = await raw_request(gateway.url, request("/api/x", f"Authorization: Bearer {token}"))
    got = echoed(resp)
    # the name as the gateway stored it (trimmed), rendered as one header
    assert values(got, "X-User-Name") == [expected_encoding(body["name"])], got
    assert values(got, "X-User-Roles") == ["user"], got
    assert all(v.isascii() and v.isprintable() for _, v in got), got


@pytest.mark.parametrize(
    "name",
    [
        "a\r\nX-User-Roles: admin",
        "a\nX-User-Roles: admin",
        "a\rb",
        "a\x00b",
        "\x7f",
        "a\x85b",
        "x" * 5000,
    ],
)
async def test_a_name_with_controls_or_too_long_is_refused_at_registration(
    gateway: Gateway, name: str
) -> None:
    status, body, token = await register_and_login(gateway.url, name)
    assert token is None and status == 400, (status, body)
    assert body is not None and body["status"] == 400


HS256 = """
tokens:
  algorithm: HS256
  secret: header-attacks-test-secret-0123456789abcdef
"""
SECRET = "header-attacks-test-secret-0123456789abcdef"


def mint(gw: Gateway, kid: str, **claims: Any) -> str:
    now = int(time.time())
    payload = {
        "iss": gw.url,
        "aud": "gateway",
        "sub": str(uuid.uuid4()),
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "jti": uuid.uuid4().hex,
        "roles": ["user"],
        **claims,
    }
    return jwt.encode(payload, SECRET, algorithm="HS256", headers={"kid": kid})


async def test_claims_never_inject_headers(fresh_gateway) -> None:  # type: ignore[no-untyped-def]
    """Tokens the gateway itself would never issue: a name with CR/LF/NUL is refused (401);
    anything else reaches the upstream as exactly one percent-encoded header."""
    gw: Gateway = fresh_gateway(extra=HS256)
    kid = hashlib.sha256(SECRET.encode()).hexdigest()[:16]
    # a positive control: a plain token works, so the refusals below are about the claims
    plain = mint(gw, kid, name="Plain")
    got = echoed(await raw_request(gw.url, request("/api/x", f"Authorization: Bearer {plain}")))
    assert values(got, "X-User-Name") == ["Plain"]
    for bad in ["a\r\nX-User-Roles: admin", "a\nb", "a\rb", "a\x00b", "a\x85b", "\ud800"]:
        token = mint(gw, kid, name=bad)
        resp = await raw_request(gw.url, request("/api/x", f"Authorization: Bearer {token}"))
        assert (resp.status, resp.header("Content-Type")) == (401, PROBLEM), repr(bad)
    for odd in ["%0d%0aX-User-Roles: admin", "\u2028X-User-Roles: admin", "日本" * 300, "%"]:
        token = mint(gw, kid, name=odd)
        got = echoed(await raw_request(gw.url, request("/api/x", f"Authorization: Bearer {token}")))
        assert values(got, "X-User-Name") == [expected_encoding(odd)]
        assert values(got, "X-User-Roles") == ["user"]
    for roles in [["user\r\nX-Injected: 1"], ["admin,root"], ["a b"], "user\nadmin"]:
        token = mint(gw, kid, roles=roles)
        resp = await raw_request(gw.url, request("/api/x", f"Authorization: Bearer {token}"))
        assert (resp.status, resp.header("Content-Type")) == (401, PROBLEM), roles


# -- forwarding headers from an untrusted peer -------------------------------------------

UNTRUSTED_SENT = [
    "X-Forwarded-For: 1.2.3.4",
    "X-Forwarded-For: 10.0.0.1, 1.2.3.4",
    "x_forwarded_for: 6.6.6.6",
    "X-Forwarded-Proto: https",
    "X-Forwarded-Host: evil.example",
    "X-Forwarded-Port: 443",
    "X-Forwarded-Prefix: /admin",
    "X-Forwarded-Uri: /admin",
    "X-Forwarded-Method: DELETE",
    "X-Forwarded-Server: evil",
    "X-Forwarded-Ssl: on",
    "Forwarded: for=1.2.3.4;host=evil.example;proto=https",
    'forwarded: for="[::1]"',
    "X-Real-IP: 1.2.3.4",
    "X_Real_IP: 1.2.3.4",
    "X-Original-URL: /admin",
    "X-Original-URI: /admin",
    "X-Rewrite-URL: /admin",
    "X-Original-Host: admin.example",
    "X-Original-Method: DELETE",
    "X-Host: admin.example",
    "X-Client-IP: 1.2.3.4",
    "X-Cluster-Client-IP: 1.2.3.4",
    "True-Client-IP: 1.2.3.4",
    "Client-IP: 1.2.3.4",
    "CF-Connecting-IP: 1.2.3.4",
    "Fastly-Client-IP: 1.2.3.4",
    "X-HTTP-Method-Override: DELETE",
    "X-HTTP-Method: DELETE",
    "X-Method-Override: DELETE",
]
DROPPED = [
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-uri",
    "x-forwarded-method",
    "x-forwarded-server",
    "x-forwarded-ssl",
    "forwarded",
    "x-real-ip",
    "x-original-url",
    "x-original-uri",
    "x-rewrite-url",
    "x-original-host",
    "x-original-method",
    "x-host",
    "x-client-ip",
    "x-cluster-client-ip",
    "true-client-ip",
    "client-ip",
    "cf-connecting-ip",
    "fastly-client-ip",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
]


async def test_forwarding_claims_of_an_untrusted_peer_are_replaced(gateway: Gateway) -> None:
    for path in ("/public/x", "/ro/x"):
        resp = await raw_request(gateway.url, request(path, *UNTRUSTED_SENT))
        if path == "/ro/x":  # auth required: the point is only that nothing is 5xx
            assert (resp.status, resp.header("Content-Type")) == (401, PROBLEM)
            continue
        got = echoed(resp)
        assert values(got, "X-Forwarded-For") == ["127.0.0.1"], got
        assert values(got, "X-Forwarded-Proto") == ["http"], got
        assert values(got, "X-Forwarded-Host") == ["127.0.0.1"], got
        for name in DROPPED:
            assert values(got, name) == [], (name, got)


@pytest.mark.parametrize("sent", UNTRUSTED_SENT)
async def test_each_forwarding_claim_alone(gateway: Gateway, sent: str) -> None:
    got = echoed(await raw_request(gateway.url, request("/public/x", sent)))
    name = sent.split(":", 1)[0]
    value = sent.split(":", 1)[1].strip()
    assert values(got, "X-Forwarded-For") == ["127.0.0.1"]
    assert values(got, "X-Forwarded-Host") == ["127.0.0.1"]
    assert all(v != value for k, v in got if k.lower() != "x-request-id"), (name, got)


async def test_a_trusted_proxy_keeps_its_forwarding_headers(fresh_gateway) -> None:  # type: ignore[no-untyped-def]
    """The positive control: the same headers from a trusted peer do pass, so the
    replacements above are the trust decision at work, not headers lost on the way."""
    gw: Gateway = fresh_gateway(extra="server: {trusted_proxies: [127.0.0.1/32]}")
    got = echoed(
        await raw_request(gw.url, request("/public/x", *UNTRUSTED_SENT[:3], "X-Real-IP: 1.2.3.4"))
    )
    assert values(got, "X-Forwarded-For") == ["1.2.3.4, 10.0.0.1, 1.2.3.4, 127.0.0.1"]
    assert values(got, "X-Real-IP") == ["1.2.3.4"]


# -- oversized headers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        ["X-Big: " + "a" * 65536],
        ["X-User-Roles: " + "a" * 65536],
        ["Authorization: Bearer " + "a" * 65536],
        ["Cookie: " + "a=b; " * 14000],
        [f"X-H{i}: v" for i in range(200)],
        [f"X-User-Roles: admin{i}" for i in range(200)],
        ["X-" + "N" * 20000 + ": v"],
    ],
    ids=[
        "64KiB-value",
        "64KiB-identity",
        "64KiB-authorization",
        "70KB-cookie",
        "200-headers",
        "200-identity",
        "20KB-name",
    ],
)
async def test_oversized_headers_are_refused_not_crashed(
    gateway: Gateway, headers: list[str]
) -> None:
    resp = await raw_request(gateway.url, request("/public/x", *headers))
    assert resp.status in (400, 431), (resp.status, resp.body[:200])
    assert resp.header("X-Upstream") is None
    assert resp.header("Content-Type") == PROBLEM, resp.body[:200]
    assert b"a" * 64 not in resp.body  # the oversized value is not echoed back


async def test_many_headers_under_the_limit_pass_and_the_gateway_still_answers(
    gateway: Gateway,
) -> None:
    got = echoed(
        await raw_request(gateway.url, request("/public/x", *[f"X-H{i}: v" for i in range(60)]))
    )
    assert len(values(got, "X-H59")) == 1
    resp = await raw_request(gateway.url, request("/public/x"))
    assert resp.status == 200


# -- Host ---------------------------------------------------------------------------------

HOST_ROUTES = """
routes:
  - name: tenant
    host: admin.example
    path: /
    upstream: {echo}
    roles: [admin]
  - name: tenant-public
    host: admin.example
    path: /pub
    upstream: {echo}
    auth: public
  - name: admin
    path: /admin
    upstream: {echo}
    roles: [admin]
  - name: everything
    path: /
    upstream: {echo}
    auth: public
    preserve_host: true
"""


def reveals_tenant(resp: RawResponse) -> bool:
    """The echo answered for admin.example (by Host or X-Forwarded-Host) outside /pub."""
    if resp.header("X-Upstream") != "echo":
        return False
    body = resp.json()
    hosts = [v.lower() for k, v in body["headers"] if k.lower() in ("host", "x-forwarded-host")]
    named = any("admin.example" in h for h in hosts)
    return named and not body["path"].startswith("/pub")


HOST_SPELLINGS = [
    # the tenant, spelled as routes compare it: its policy
    ("admin.example", 401),
    ("ADMIN.EXAMPLE", 401),
    ("admin.example.", 401),
    ("admin.example:80", 401),
    ("admin.example:8080", 401),
    # what an upstream may take for the tenant but the gateway would not: refused
    ("x@admin.example", 400),
    ("admin.example@evil", 400),
    ("admin.example..", 400),
    (".admin.example", 400),
    ("admin..example", 400),
    ("admin.example:80:80", 400),
    ("admin.example:99999", 400),
    ("admin.example%2e", 400),
    ("admin%2eexample", 400),
    ("admin.example/x", 400),
    ("admin.example\\x", 400),
    ("admin.example, other", 400),
    ("admin.example other", 400),
    ("admin .example", 400),
    ("admin.example;x", 400),
    ("admin.example?x", 400),
    ("admin.example#x", 400),
]


@pytest.mark.parametrize(("host", "status"), HOST_SPELLINGS)
async def test_a_host_specific_policy_holds_for_every_spelling_of_its_host(
    fresh_host_gateway: Gateway, host: str, status: int
) -> None:
    resp = await raw_request(fresh_host_gateway.url, request("/x", host=host))
    assert not reveals_tenant(resp), (host, resp.json())
    assert (resp.status, resp.header("Content-Type")) == (status, PROBLEM), (host, resp.status)


@pytest.fixture(scope="module")
def fresh_host_gateway(
    tmp_path_factory: pytest.TempPathFactory, echo_upstream: Echo
) -> Iterator[Gateway]:
    gw = launch_gateway(tmp_path_factory.mktemp("hosts"), echo_upstream, routes=HOST_ROUTES)
    yield gw
    stop_process(gw.proc)


@pytest.mark.parametrize(
    ("target", "host"),
    [
        ("http://127.0.0.1/x", "admin.example"),
        ("http://admin.example/x", "127.0.0.1"),
        ("http://other/x", "admin.example"),
        ("http://x@admin.example/x", "admin.example"),
    ],
)
async def test_absolute_form_cannot_split_the_host(
    fresh_host_gateway: Gateway, target: str, host: str
) -> None:
    raw = f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    resp = await raw_request(fresh_host_gateway.url, raw)
    assert not reveals_tenant(resp), (target, host, resp.json())
    assert (resp.status, resp.header("Content-Type")) == (400, PROBLEM), (target, resp.status)


async def test_host_tiers_do_not_leak_into_each_other(fresh_host_gateway: Gateway) -> None:
    url = fresh_host_gateway.url
    # The tenant's public prefix, and nothing above it, is public for the tenant.
    resp = await raw_request(url, request("/pub/x", host="admin.example"))
    assert resp.status == 200 and resp.json()["path"] == "/pub/x"
    for path in ["/pub/../x", "/pub/%2e%2e/x", "/pub/..;/x", "/pub/..%2fx", "/pubx", "/pub./../x"]:
        resp = await raw_request(url, request(path, host="admin.example"))
        assert resp.status in (400, 401), (path, resp.status)
        assert not reveals_tenant(resp)
    # The host-less /admin policy holds for other hosts and for none.
    for host in ["127.0.0.1", "other.example", "", None]:
        resp = await raw_request(url, request("/admin/x", host=host))
        assert resp.status in (400, 401), (host, resp.status)
        resp = await raw_request(url, request("/public/../admin", host=host))
        assert resp.status in (400, 401), (host, resp.status)
    # Other hosts get the host-less catch-all, never the tenant.
    resp = await raw_request(url, request("/x", host="other.example"))
    assert resp.status == 200 and not reveals_tenant(resp)


@pytest.mark.parametrize(
    "host_lines",
    [
        ["Host: 127.0.0.1", "Host: admin.example"],
        ["Host: admin.example", "Host: admin.example"],
        ["Host: 127.0.0.1", "host: admin.example"],
        ["Host: a@b"],
        ["Host: a b"],
        ["Host: a\tb"],
    ],
)
async def test_malformed_host_headers(fresh_host_gateway: Gateway, host_lines: list[str]) -> None:
    raw = "\r\n".join(["GET /x HTTP/1.1", *host_lines, "Connection: close", "", ""]).encode()
    resp = await raw_request(fresh_host_gateway.url, raw)
    assert not reveals_tenant(resp)
    assert (resp.status, resp.header("Content-Type")) == (400, PROBLEM), (host_lines, resp.status)


async def test_an_empty_or_missing_host_is_no_host(fresh_host_gateway: Gateway) -> None:
    """``Host:`` empty (HTTP/1.1) and no Host (HTTP/1.0) route host-less, never to a tenant."""
    for raw in [
        b"GET /x HTTP/1.1\r\nHost:\r\nConnection: close\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: \r\nConnection: close\r\n\r\n",
        b"GET /x HTTP/1.0\r\n\r\n",
    ]:
        resp = await raw_request(fresh_host_gateway.url, raw)
        assert not reveals_tenant(resp), raw
        assert resp.status in (200, 400), (raw, resp.status)
