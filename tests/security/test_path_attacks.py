"""Path attacks over raw sockets: no encoding of a path reaches an upstream under a policy
other than its own.

Every request gets one of two outcomes, and ``assert_held`` checks which:

- the gateway answers itself: a 4xx ``application/problem+json`` (400 for what it refuses,
  401/403 for the policy of the route the path really is under, 404/405), never a 5xx;
- the request reached the echo upstream: then the path the echo received is under a route
  whose policy the caller passes, segment by segment, and no way an upstream might read it
  again (decoding once or twice more, ``\\`` as ``/``, ``;params`` dropped, trailing dots
  and spaces trimmed, NFKC, dot segments removed) puts it under ``/admin``.

The caller is anonymous or a signed-in user without the ``admin`` role, so anything that
resolves under ``/admin`` must be 400, 401 or 403 — never a 200 from the echo.
"""

from __future__ import annotations

import asyncio
import posixpath
import unicodedata
import urllib.parse
from collections.abc import Iterator

import pytest

from tests.blackbox.client import Account, RawResponse, get, raw_request
from tests.blackbox.conftest import Gateway

PROBLEM = "application/problem+json"
# First segments of the paths the echo may receive, by caller, on the session gateway's
# routes (tests/blackbox/conftest.py); "/base" is what /strip (auth required) forwards under.
USER_PREFIXES = ("api", "public", "maybe", "ro", "base")
ANONYMOUS_PREFIXES = ("public", "maybe")


# -- the oracle --------------------------------------------------------------------------


def _readings(path: str) -> Iterator[str]:
    """Ways some upstream may read ``path``: as sent, and decoded once or twice more."""
    seen = path
    for _ in range(3):
        yield seen
        seen = urllib.parse.unquote(seen, errors="replace")


def _segments(reading: str) -> list[str]:
    """One reading's segments after what lenient servers do to them."""
    text = unicodedata.normalize("NFKC", reading.replace("\\", "/"))
    text = text.split("?", 1)[0].split("#", 1)[0]
    names = [s.split(";", 1)[0].rstrip(". ") or s for s in text.split("/")]
    resolved = posixpath.normpath("/" + "/".join(names))
    return [s for s in resolved.split("/") if s]


def under(path: str, prefix: str) -> bool:
    """True if any reading of ``path`` starts with segment ``prefix``."""
    return any(_segments(r)[:1] == [prefix] for r in _readings(path))


def assert_held(resp: RawResponse, sent: str, allowed: tuple[str, ...]) -> None:
    """The gateway refused, or the echo got a path under a route ``allowed`` names."""
    assert resp.status < 500, (sent, resp.status, resp.body[:200])
    if resp.header("X-Upstream") == "echo":
        echoed = resp.json()["path"]
        assert not under(echoed, "admin"), (sent, echoed)
        first = echoed.split("/")[1].split(";", 1)[0].rstrip(".")
        assert first in allowed, (sent, echoed)
        return
    assert resp.status in (400, 401, 403, 404, 405), (sent, resp.status, resp.body[:200])
    assert resp.header("Content-Type") == PROBLEM, (sent, resp.status, resp.body[:200])


async def send_all(base: str, paths: list[str], *headers: str) -> list[RawResponse]:
    return list(await asyncio.gather(*(raw_request(base, get(p, *headers)) for p in paths)))


# -- traversal out of a weaker route into /admin -----------------------------------------

DOTS = [
    "..",
    "%2e%2e",
    "%2E%2E",
    ".%2e",
    "%2e.",
    "%2E.",
    "%252e%252e",
    "%252E%252E",
    "%25%32%65%25%32%65",
    "%u002e%u002e",
    "..;",
    "..;x",
    "%2e%2e;x=1",
    "..%3b",
    "...",
    "..%20",
    "..%09",
    "..%00",
    "..%2500",
    "%c0%ae%c0%ae",
    "%e0%80%ae%e0%80%ae",
    "%ef%bc%8e%ef%bc%8e",
    "%e2%80%a4%e2%80%a4",
    "%2e%2e%2e",
    ". .",
]
SEPARATORS = [
    "/",
    "%2f",
    "%2F",
    "\\",
    "%5c",
    "%5C",
    "%252f",
    "%255c",
    "//",
    "/./",
    "/%2e/",
    "%c0%af",
]
WEAKER = ["/public", "/api", "/maybe", "/strip", "/ro"]


def traversals(dots: str) -> list[str]:
    paths = []
    for prefix in WEAKER:
        for sep in SEPARATORS:
            paths.append(f"{prefix}{sep}{dots}{sep}admin")
            paths.append(f"{prefix}/x{sep}{dots}{sep}{dots}{sep}admin/users")
    return paths


@pytest.mark.parametrize("dots", DOTS)
async def test_traversal_into_admin_anonymous(gateway: Gateway, dots: str) -> None:
    paths = traversals(dots)
    for sent, resp in zip(paths, await send_all(gateway.url, paths), strict=True):
        assert_held(resp, sent, ANONYMOUS_PREFIXES)


@pytest.mark.parametrize("dots", DOTS)
async def test_traversal_into_admin_as_user(gateway: Gateway, user: Account, dots: str) -> None:
    paths = traversals(dots)
    bearer = f"Authorization: Bearer {user.access_token}"
    for sent, resp in zip(paths, await send_all(gateway.url, paths, bearer), strict=True):
        assert_held(resp, sent, USER_PREFIXES)


# Each of these resolves to /admin for the gateway too: the admin policy holds, exactly.
RESOLVE_TO_ADMIN = [
    "/public/../admin",
    "/public/%2e%2e/admin",
    "/public/%2E%2E/admin",
    "/public/.%2e/admin",
    "/public/%2e./admin",
    "/api/x/../../admin",
    "/public/./../admin/./",
    "//admin",
    "///admin//users",
    "/admin/",
    "/admin/users/..",
    "/x/y/z/../../../admin",
    "/../../../../admin",
    "/%2e%2e/admin",
    "/public/%23/../../admin",
    "/admin;",
    "/admin;jsessionid=1",
    "/admin;x/users",
    "/admin.",
    "/admin..",
    "/admin%2e",
    "/admin%20",
    "/admin.%20",
    "/admin%C2%A0",
    "/%EF%BD%81%EF%BD%84%EF%BD%8D%EF%BD%89%EF%BD%8E",
    "/%61dmin",
    "/%61%64%6d%69%6e/users",
    "/admin%3f/x",
    "/admin%23",
]


@pytest.mark.parametrize("path", RESOLVE_TO_ADMIN)
async def test_admin_policy_holds_for_every_spelling(
    gateway: Gateway, user: Account, path: str
) -> None:
    anonymous = await raw_request(gateway.url, get(path))
    assert (anonymous.status, anonymous.header("Content-Type")) == (401, PROBLEM), path
    bearer = f"Authorization: Bearer {user.access_token}"
    signed = await raw_request(gateway.url, get(path, bearer))
    assert (signed.status, signed.header("Content-Type")) == (403, PROBLEM), path


# Refused outright: ambiguous to some upstream, whatever route they would fall under.
REFUSED = [
    "/admin%2fusers",
    "/public%2f..%2fadmin",
    "/public/..%2fadmin",
    "/public/..%5cadmin",
    "/public\\..\\admin",
    "/public/%252e%252e/admin",
    "/public/%25%32%65%25%32%65/admin",
    "/public/%252e%252e%252fadmin",
    "/public%252fadmin",
    "/public/..;/admin",
    "/public/.;/admin",
    "/public/;/admin",
    "/public/.../admin",
    "/public/..%20/admin",
    "/public/..%00/admin",
    "/public/%00",
    "/public/%2500",
    "/public/x%0d%0aX-User-Roles:%20admin",
    "/public/%c0%ae%c0%ae/admin",
    "/public/%c0%afadmin",
    "/public/%ff",
    "/public/%ef%bc%8e%ef%bc%8e/admin",
    "/public/%ef%bc%8fadmin",
    "/public/%e2%88%95admin",
    "/public/%zz",
    "/public/%",
    "/public/%2",
]


@pytest.mark.parametrize("path", REFUSED)
async def test_ambiguous_paths_are_refused(gateway: Gateway, user: Account, path: str) -> None:
    for headers in ((), (f"Authorization: Bearer {user.access_token}",)):
        resp = await raw_request(gateway.url, get(path, *headers))
        assert (resp.status, resp.header("Content-Type")) == (400, PROBLEM), path
        assert resp.json()["status"] == 400


# -- what does reach the upstream, reaches it canonical, under its own prefix ------------

FORWARDED = [
    ("/public/a/./b/../c", "/public/a/c"),
    ("/public//a///b", "/public/a/b"),
    ("/public/%61%62c", "/public/abc"),
    ("/public/%7e%2D%5F", "/public/~-_"),
    ("/public/a;b=c/d", "/public/a;b=c/d"),
    ("/public;x/y", "/public;x/y"),
    ("/public./y", "/public./y"),
    ("/public/%23frag", "/public/%23frag"),
    ("/public/%3f", "/public/%3F"),
    ("/public/100%25", "/public/100%25"),
    ("/public/%2541", "/public/%2541"),
    ("/public/caf%c3%a9", "/public/caf%C3%A9"),
    ("/public/a%20b", "/public/a%20b"),
    ("/public/admin", "/public/admin"),
    ("/public/x/../admin", "/public/admin"),
    ("/strip/x", "/base/x"),
    ("/strip/../strip/x", "/base/x"),
    ("/strip/a/%2e%2e/b", "/base/b"),
    ("/strip", "/base/"),
]


@pytest.mark.parametrize(("sent", "forwarded"), FORWARDED)
async def test_forwarded_path_is_canonical(
    gateway: Gateway, user: Account, sent: str, forwarded: str
) -> None:
    resp = await raw_request(gateway.url, get(sent, f"Authorization: Bearer {user.access_token}"))
    assert resp.status == 200, (sent, resp.status, resp.body[:200])
    assert resp.json()["path"] == forwarded
    assert_held(resp, sent, USER_PREFIXES)


async def test_query_and_fragment_never_move_the_path(gateway: Gateway) -> None:
    resp = await raw_request(gateway.url, get("/public?/../admin"))
    assert resp.status == 200
    assert (resp.json()["path"], resp.json()["query"]) == ("/public", "/../admin")
    resp = await raw_request(gateway.url, get("/public/x?a=%2e%2e%2fadmin#/../admin"))
    assert_held(resp, "query", ANONYMOUS_PREFIXES)
    resp = await raw_request(gateway.url, get("/public#/../admin"))
    assert (resp.status, resp.header("Content-Type")) == (400, PROBLEM)


# -- case, look-alikes and segment boundaries --------------------------------------------


@pytest.mark.parametrize(
    "path", ["/ADMIN", "/Admin", "/aDmIn/users", "/ADMIN/", "/%41DMIN", "/admin%2E%2Ex", "/adminx"]
)
async def test_routes_are_case_sensitive_and_segment_aware(gateway: Gateway, path: str) -> None:
    """Like nginx prefix locations: /ADMIN is not /admin. Without a catch-all route, 404."""
    resp = await raw_request(gateway.url, get(path))
    assert (resp.status, resp.header("Content-Type")) == (404, PROBLEM), path


CATCH_ALL = """
routes:
  - name: admin
    path: /admin
    upstream: {echo}
    roles: [admin]
  - name: everything-else
    path: /
    upstream: {echo}
    auth: public
"""


async def test_a_catch_all_route_never_serves_an_admin_spelling(fresh_gateway) -> None:  # type: ignore[no-untyped-def]
    """With a public catch-all, a spelling of /admin that falls to it is a bypass on an
    upstream that reads it as /admin. Each is either held to /admin's policy or refused;
    only case variants reach the catch-all, and their path keeps its case (documented)."""
    gw = fresh_gateway(routes=CATCH_ALL)
    spellings = RESOLVE_TO_ADMIN + REFUSED
    for sent, resp in zip(spellings, await send_all(gw.url, spellings), strict=True):
        assert resp.header("X-Upstream") is None, (sent, resp.json())
        assert resp.status in (400, 401), (sent, resp.status)
        assert resp.header("Content-Type") == PROBLEM
    for traversal in DOTS:
        paths = traversals(traversal)
        for sent, resp in zip(paths, await send_all(gw.url, paths), strict=True):
            if resp.header("X-Upstream") == "echo":
                assert not under(resp.json()["path"], "admin"), (sent, resp.json()["path"])
            else:
                assert resp.status in (400, 401), (sent, resp.status)
    resp = await raw_request(gw.url, get("/ADMIN/x"))
    assert resp.status == 200 and resp.json()["path"] == "/ADMIN/x"


# -- request-target forms ----------------------------------------------------------------


def request(target: str, *headers: str, method: str = "GET", version: str = "HTTP/1.1") -> bytes:
    lines = [f"{method} {target} {version}", *headers, "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1")


async def test_absolute_form_with_the_same_authority_is_routed_as_origin_form(
    gateway: Gateway,
) -> None:
    port = gateway.url.rsplit(":", 1)[1]
    for target, host in [
        ("http://127.0.0.1/public/x", "127.0.0.1"),
        (f"http://127.0.0.1:{port}/public/x", f"127.0.0.1:{port}"),
        ("http://127.0.0.1:80/public/x", "127.0.0.1"),
        ("HTTP://127.0.0.1/public/x?q=1", "127.0.0.1"),
    ]:
        resp = await raw_request(gateway.url, request(target, f"Host: {host}"))
        assert resp.status == 200, (target, resp.status, resp.body[:200])
        assert resp.json()["path"] == "/public/x"
    resp = await raw_request(
        gateway.url, request("http://127.0.0.1/public/../admin", "Host: 127.0.0.1")
    )
    assert (resp.status, resp.header("Content-Type")) == (401, PROBLEM)


@pytest.mark.parametrize(
    ("target", "host"),
    [
        ("http://other-host/admin", "127.0.0.1"),
        ("http://other-host/public/x", "127.0.0.1"),
        ("http://127.0.0.1/public/x", "other-host"),
        ("http://127.0.0.1:81/public/x", "127.0.0.1"),
        ("http://127.0.0.1/public/x", "127.0.0.1:81"),
        ("https://127.0.0.1/public/x", "127.0.0.1:80"),
        ("http://user@127.0.0.1/public/x", "127.0.0.1"),
        ("http://user:pw@127.0.0.1/public/x", "127.0.0.1"),
        ("http://127.0.0.1@other-host/public/x", "127.0.0.1"),
        ("http://admin.example/x", "127.0.0.1"),
    ],
)
async def test_absolute_form_naming_another_host_is_refused(
    gateway: Gateway, target: str, host: str
) -> None:
    """RFC 9112 §3.2: Host must be identical to the target's authority; HAProxy (since
    2.1), Jetty 12 and Kestrel refuse a mismatch with 400, and so does the gateway: routing
    on one host while the upstream sees the other is a host-policy bypass."""
    resp = await raw_request(gateway.url, request(target, f"Host: {host}"))
    assert (resp.status, resp.header("Content-Type")) == (400, PROBLEM), (target, resp.status)


@pytest.mark.parametrize(
    "raw",
    [
        request("*", "Host: 127.0.0.1", method="OPTIONS"),
        request("127.0.0.1:443", "Host: 127.0.0.1:443", method="CONNECT"),
        request("/public/x", "Host: 127.0.0.1", method="CONNECT"),
        request("127.0.0.1:443", "Host: 127.0.0.1"),
        request("public/x", "Host: 127.0.0.1"),
        request("http:/public/x", "Host: 127.0.0.1"),
        request("http:///public/x", "Host: 127.0.0.1"),
        request("ftp://127.0.0.1/public/x", "Host: 127.0.0.1"),
        request("file:///etc/passwd", "Host: 127.0.0.1"),
    ],
)
async def test_other_target_forms_never_reach_an_upstream(gateway: Gateway, raw: bytes) -> None:
    resp = await raw_request(gateway.url, raw)
    assert resp.header("X-Upstream") is None, (raw, resp.body[:200])
    assert resp.status in (400, 404, 405), (raw, resp.status)
    assert resp.header("Content-Type") == PROBLEM, (raw, resp.status, resp.body[:200])


# -- sizes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/public" + "/a" * 10_000,
        "/public/" + "x" * 16 * 1024,
        "/public" + "/.." * 6000 + "/admin",
        "/public" + "/%2e%2e" * 3000 + "/admin",
        "/" * 17_000 + "admin",
    ],
    ids=["10k-segments", "16KiB", "6k-dot-dot", "3k-encoded-dot-dot", "17k-slashes"],
)
async def test_huge_paths_are_refused_cleanly(gateway: Gateway, path: str) -> None:
    resp = await raw_request(gateway.url, get(path))
    assert resp.status in (400, 414, 431), resp.status
    assert resp.header("Content-Type") == PROBLEM, resp.body[:200]
    assert path[8:72].encode() not in resp.body  # the request target is not echoed back


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/public" + "/a" * 2000, 200),
        ("/public" + "/%2e%2e" * 1000 + "/admin", 401),
        ("/" * 4000 + "admin", 401),
        ("/public" + "/x/.." * 1000 + "/y", 200),
    ],
    ids=["2k-segments", "1k-encoded-dot-dot", "4k-slashes", "1k-x-dot-dot"],
)
async def test_long_paths_within_the_limit_are_routed_right(
    gateway: Gateway, path: str, status: int
) -> None:
    resp = await raw_request(gateway.url, get(path))
    assert resp.status == status, (resp.status, resp.body[:200])
    if status == 200:
        assert_held(resp, path[:40], ANONYMOUS_PREFIXES)
