"""Path normalization, route choice and upstream URLs (gateway.routing)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import RouteSettings
from gateway.errors import BadRequest, InvalidPath, MethodNotAllowed, NotFound
from gateway.routing import (
    RequestTarget,
    RouteTable,
    canonical_path,
    normalize_host,
    request_target,
    segment_name,
    upstream_url,
    valid_host,
)

# -- RouteTable --------------------------------------------------------------------------


def route(
    name: str,
    path: str,
    *,
    host: str | None = None,
    methods: tuple[str, ...] | None = None,
    strip_prefix: bool = False,
) -> RouteSettings:
    return RouteSettings(
        name=name,
        path=path,
        upstreams=("http://127.0.0.1:9000",),
        host=host,
        methods=methods,
        strip_prefix=strip_prefix,
    )


ROUTES = [
    route("root", "/"),
    route("api", "/api"),
    route("api-admin", "/api/admin"),
    route("admin", "/admin"),
    route("read", "/data", methods=("GET", "HEAD")),
    route("write", "/data", methods=("post", "PUT")),
    route("strip", "/strip", strip_prefix=True),
    route("strip-deep", "/s/deep", strip_prefix=True),
    route("host-root", "/", host="Example.COM"),
    route("host-api", "/api", host="example.com"),
    route("other-host", "/only", host="other.example"),
    route("get-only", "/ro", methods=("GET",)),
]
TABLE = RouteTable(ROUTES)

MATCHES = [
    # (method, host, path, route name, upstream path)
    ("GET", None, "/", "root", "/"),
    ("GET", None, "/anything/else", "root", "/anything/else"),
    ("GET", None, "/api", "api", "/api"),
    ("GET", None, "/api/", "api", "/api/"),
    ("GET", None, "/api/x", "api", "/api/x"),
    ("GET", None, "/apix", "root", "/apix"),
    ("GET", None, "/api.x", "root", "/api.x"),
    ("GET", None, "/api/admin", "api-admin", "/api/admin"),
    ("GET", None, "/api/admin/", "api-admin", "/api/admin/"),
    ("GET", None, "/api/admin/x", "api-admin", "/api/admin/x"),
    ("GET", None, "/api/administrator", "api", "/api/administrator"),
    ("GET", None, "/admin", "admin", "/admin"),
    # parameters do not take a segment out of its route (Tomcat drops them)
    ("GET", None, "/admin;x", "admin", "/admin;x"),
    ("GET", None, "/admin;jsessionid=1/users", "admin", "/admin;jsessionid=1/users"),
    ("GET", None, "/api;v=1/admin;x/y", "api-admin", "/api;v=1/admin;x/y"),
    ("GET", None, "/admin%3Bx", "root", "/admin%3Bx"),
    # nor do trailing dots and spaces (Windows, IIS) or compatibility forms (NFKC)
    ("GET", None, "/admin.", "admin", "/admin."),
    ("GET", None, "/admin..", "admin", "/admin.."),
    ("GET", None, "/admin%20", "admin", "/admin%20"),
    ("GET", None, "/admin.%20.", "admin", "/admin.%20."),
    ("GET", None, "/admin./x", "admin", "/admin./x"),
    ("GET", None, "/admin%C2%A0", "admin", "/admin%C2%A0"),
    (
        "GET",
        None,
        "/%EF%BD%81%EF%BD%84%EF%BD%8D%EF%BD%89%EF%BD%8E",
        "admin",
        "/%EF%BD%81%EF%BD%84%EF%BD%8D%EF%BD%89%EF%BD%8E",
    ),
    ("GET", None, "/api./admin;x./y", "api-admin", "/api./admin;x./y"),
    ("GET", None, "/admin.x", "root", "/admin.x"),
    ("GET", None, "/admin%3F/x", "admin", "/admin%3F/x"),
    ("GET", None, "/admin%23", "admin", "/admin%23"),
    ("GET", None, "/.admin", "root", "/.admin"),
    # case is kept: routes are case-sensitive, like nginx prefix locations
    ("GET", None, "/ADMIN", "root", "/ADMIN"),
    ("GET", None, "/Admin/x", "root", "/Admin/x"),
    # methods, case-insensitively
    ("GET", None, "/data/1", "read", "/data/1"),
    ("head", None, "/data", "read", "/data"),
    ("POST", None, "/data/1", "write", "/data/1"),
    ("put", None, "/data", "write", "/data"),
    # strip_prefix
    ("GET", None, "/strip", "strip", "/"),
    ("GET", None, "/strip/", "strip", "/"),
    ("GET", None, "/strip/x", "strip", "/x"),
    ("GET", None, "/strip/x/", "strip", "/x/"),
    ("GET", None, "/strip;p/x", "strip", "/x"),
    ("GET", None, "/strip./x", "strip", "/x"),
    ("GET", None, "/stripped", "root", "/stripped"),
    ("GET", None, "/s/deep/y", "strip-deep", "/y"),
    ("GET", None, "/s/deeper", "root", "/s/deeper"),
    # host-specific before host-less, whatever the prefix length
    ("GET", "example.com", "/", "host-root", "/"),
    ("GET", "example.com", "/admin", "host-root", "/admin"),
    ("GET", "example.com", "/api/admin", "host-api", "/api/admin"),
    ("GET", "EXAMPLE.com:8080", "/api", "host-api", "/api"),
    ("GET", "example.com.", "/x", "host-root", "/x"),
    ("GET", "example.com.:443", "/x", "host-root", "/x"),
    ("GET", "www.example.com", "/admin", "admin", "/admin"),
    ("GET", "example.com..", "/admin", "admin", "/admin"),
    # a host tier without a matching path falls back to host-less routes
    ("GET", "other.example", "/only/x", "other-host", "/only/x"),
    ("GET", "other.example", "/admin", "admin", "/admin"),
    ("GET", "other.example:80", "/", "root", "/"),
    ("GET", "", "/admin", "admin", "/admin"),
]


@pytest.mark.parametrize(("method", "host", "path", "name", "upstream"), MATCHES)
def test_match(method: str, host: str | None, path: str, name: str, upstream: str) -> None:
    found = TABLE.match(method, host, path)
    assert (found.route.name, found.upstream_path) == (name, upstream)


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("DELETE", "/data", ("GET", "HEAD", "POST", "PUT")),
        ("PATCH", "/data/x/y", ("GET", "HEAD", "POST", "PUT")),
        # the longest prefix decides: never a fall back to "/" and its policy
        ("POST", "/ro", ("GET",)),
        ("HEAD", "/ro/x", ("GET",)),
    ],
)
def test_method_not_allowed(method: str, path: str, allowed: tuple[str, ...]) -> None:
    with pytest.raises(MethodNotAllowed) as caught:
        TABLE.match(method, None, path)
    assert caught.value.allowed == allowed


@pytest.mark.parametrize(
    ("host", "path"),
    [(None, "/x"), ("example.org", "/x"), ("other.example", "/"), (None, "/"), (None, "/apix")],
)
def test_not_found(host: str | None, path: str) -> None:
    table = RouteTable([route("api", "/api"), route("only", "/only", host="other.example")])
    with pytest.raises(NotFound):
        table.match("GET", host, path)


def test_empty_table_finds_nothing() -> None:
    with pytest.raises(NotFound):
        RouteTable([]).match("GET", None, "/")


def test_iteration_is_match_order() -> None:
    names = [r.name for r in TABLE]
    assert names == [
        "host-api",
        "other-host",
        "host-root",
        "api-admin",
        "strip-deep",
        "api",
        "admin",
        "read",
        "write",
        "strip",
        "get-only",
        "root",
    ]
    assert len(TABLE) == len(ROUTES)


def test_route_path_with_trailing_slash_is_a_prefix() -> None:
    table = RouteTable([route("api", "/api/"), route("root", "/")])
    assert table.match("GET", None, "/api").route.name == "api"
    assert table.match("GET", None, "/api/x").route.name == "api"
    assert table.match("GET", None, "/apix").route.name == "root"


def test_first_route_wins_on_an_exact_tie() -> None:
    table = RouteTable([route("first", "/x"), route("second", "/x")])
    assert table.match("GET", None, "/x").route.name == "first"


def test_invalid_route_path_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="'bad'"):
        RouteTable([route("bad", "/a%2fb")])


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        (None, None),
        ("", None),
        ("Example.COM", "example.com"),
        ("example.com:8080", "example.com"),
        ("example.com.", "example.com"),
        ("example.com.:8080", "example.com"),
        ("[::1]:8080", "[::1]"),
        ("[::1]", "[::1]"),
        (".", None),
    ],
)
def test_normalize_host(host: str | None, expected: str | None) -> None:
    assert normalize_host(host) == expected


def test_a_route_matches_by_name_only_when_no_exact_prefix_does() -> None:
    table = RouteTable([route("loose", "/a"), route("exact", "/a.")])
    assert table.match("GET", None, "/a.").route.name == "exact"
    assert table.match("GET", None, "/a..").route.name == "loose"
    assert table.match("GET", None, "/a%20").route.name == "loose"


@pytest.mark.parametrize(
    ("segment", "name"),
    [
        ("admin", "admin"),
        ("admin;x=1", "admin"),
        ("admin.", "admin"),
        ("admin. .", "admin"),
        ("admin%20", "admin"),
        ("admin.%20;x", "admin"),
        ("a.b", "a.b"),
        (".well-known", ".well-known"),
        ("ADMIN", "ADMIN"),
        ("%EF%BD%81dmin", "admin"),
        ("caf%C3%A9", "caf\u00e9"),
        ("admin%3Bx", "admin;x"),
        ("admin%3Fx", "admin"),
        ("admin%23", "admin"),
        ("a%3Fb%23c", "a"),
        ("", ""),
    ],
)
def test_segment_name(segment: str, name: str) -> None:
    assert segment_name(segment) == name


# -- request targets and hosts -----------------------------------------------------------

TARGETS = [
    # (raw target, Host header, path, host)
    ("/a/b?x=1", "example.com", "/a/b", "example.com"),
    ("/", "example.com:8080", "/", "example.com:8080"),
    ("/a", None, "/a", None),
    ("/a", "", "/a", None),
    ("/a", "  example.com ", "/a", "example.com"),
    ("//a?b", "h", "//a", "h"),
    # absolute-form: the authority must name the Host's host and port
    ("http://example.com/admin?x", "example.com", "/admin", "example.com"),
    ("http://EXAMPLE.com/admin", "example.com", "/admin", "example.com"),
    ("http://example.com:80/a", "example.com", "/a", "example.com"),
    ("http://example.com/a", "example.com:80", "/a", "example.com:80"),
    ("https://example.com:443/a", "example.com", "/a", "example.com"),
    ("HTTP://example.com/a", "example.com", "/a", "example.com"),
    ("http://example.com./a", "example.com", "/a", "example.com"),
    ("http://example.com", "example.com", "/", "example.com"),
    ("http://example.com?q=1", "example.com", "/", "example.com"),
    ("http://[::1]:8080/a", "[::1]:8080", "/a", "[::1]:8080"),
    ("http://127.0.0.1/a/%2e%2e/b", "127.0.0.1", "/a/%2e%2e/b", "127.0.0.1"),
    # HTTP/1.0 without Host: the authority is the host
    ("http://example.com/a", None, "/a", "example.com"),
]


@pytest.mark.parametrize(("raw", "host_header", "path", "host"), TARGETS)
def test_request_target(raw: str, host_header: str | None, path: str, host: str | None) -> None:
    assert request_target(raw, host_header) == RequestTarget(path, host)


REFUSED_TARGETS = [
    # (raw target, Host header, error)
    ("http://other-host/admin", "127.0.0.1", BadRequest),
    ("http://admin.example/", "127.0.0.1", BadRequest),
    ("http://127.0.0.1/admin", "admin.example", BadRequest),
    ("http://example.com:81/a", "example.com", BadRequest),
    ("http://example.com/a", "example.com:81", BadRequest),
    ("https://example.com/a", "example.com:80", BadRequest),
    ("http://example.com/a", "example.com:443", BadRequest),
    ("http://user@example.com/a", "example.com", BadRequest),
    ("http://user:pw@example.com/a", "example.com", BadRequest),
    ("http://a@b@example.com/a", "example.com", BadRequest),
    ("http://exa mple.com/a", "example.com", BadRequest),
    ("http://example.com%2F@x/a", "example.com", BadRequest),
    ("http://example.com:99999/a", "example.com", BadRequest),
    ("http:///a", "example.com", InvalidPath),
    ("http://", "example.com", InvalidPath),
    ("*", "example.com", InvalidPath),
    ("example.com:443", "example.com", InvalidPath),
    ("ftp://example.com/a", "example.com", InvalidPath),
    ("http:/a", "example.com", InvalidPath),
    ("a/b", "example.com", InvalidPath),
    ("", "example.com", InvalidPath),
    # the Host itself is checked whatever the form
    ("/a", "a@example.com", BadRequest),
]


@pytest.mark.parametrize(("raw", "host_header", "error"), REFUSED_TARGETS)
def test_request_target_refused(raw: str, host_header: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        request_target(raw, host_header)


@pytest.mark.parametrize(
    "host",
    [
        "example.com",
        "EXAMPLE.com",
        "example.com.",
        "example.com:8080",
        "example.com:",
        "localhost",
        "my_host-1.internal",
        "127.0.0.1",
        "127.0.0.1:80",
        "[::1]",
        "[::1]:8443",
        "[2001:db8::1]",
        "[::ffff:127.0.0.1]",
    ],
)
def test_valid_host(host: str) -> None:
    assert valid_host(host) == host


@pytest.mark.parametrize(
    "host",
    [
        "a@example.com",
        "user:pw@example.com",
        "example.com@evil",
        "a b",
        "example.com ,evil",
        "example.com,evil",
        "example..com",
        ".example.com",
        "example.com..",
        "example.com:99999",
        "example.com:123456",
        "example.com:8o",
        "example.com:1:2",
        "example%2ecom",
        "example.com/admin",
        "example.com\\x",
        "example.com?x",
        "example.com#x",
        "ex\u0430mple.com",  # Cyrillic a
        "\uff45xample.com",  # fullwidth e
        "[::1",
        "[zz::1]",
        "[::1]x",
        "::1",
        "[::1]:80:80",
        "example.com\x00",
        "example.com\tx",
    ],
)
def test_invalid_host(host: str) -> None:
    with pytest.raises(BadRequest):
        valid_host(host)


@pytest.mark.parametrize("host", [None, "", "  "])
def test_no_host(host: str | None) -> None:
    assert valid_host(host) is None


# -- upstream_url ------------------------------------------------------------------------

UPSTREAM_URLS = [
    # (base, upstream path, raw query, str(url), raw_path)
    ("http://127.0.0.1:9000", "/x", "", "http://127.0.0.1:9000/x", "/x"),
    ("http://127.0.0.1:9000/", "/x", "", "http://127.0.0.1:9000/x", "/x"),
    ("http://127.0.0.1:9000", "/", "", "http://127.0.0.1:9000/", "/"),
    ("http://h:9000/prefix", "/x", "", "http://h:9000/prefix/x", "/prefix/x"),
    ("http://h:9000/prefix/", "/x", "", "http://h:9000/prefix/x", "/prefix/x"),
    ("http://h:9000/prefix", "/", "", "http://h:9000/prefix/", "/prefix/"),
    ("http://h:9000/prefix", "/x/", "a=1", "http://h:9000/prefix/x/?a=1", "/prefix/x/"),
    (
        "http://127.0.0.1:9000",
        "/a%3Bb;c=d/%25/%252e%252e/%20",
        "q=%2F%25+x&b",
        "http://127.0.0.1:9000/a%3Bb;c=d/%25/%252e%252e/%20?q=%2F%25+x&b",
        "/a%3Bb;c=d/%25/%252e%252e/%20",
    ),
    ("https://[::1]:8443/p", "/%C3%A9", "", "https://[::1]:8443/p/%C3%A9", "/p/%C3%A9"),
    ("http://h/p%20q%3B", "/x", "", "http://h/p%20q%3B/x", "/p%20q%3B/x"),
]


@pytest.mark.parametrize(("base", "path", "query", "url", "raw_path"), UPSTREAM_URLS)
def test_upstream_url(base: str, path: str, query: str, url: str, raw_path: str) -> None:
    built = upstream_url(base, path, query)
    assert str(built) == url
    assert built.raw_path == raw_path
    assert built.raw_query_string == query
    # what the aiohttp client writes in the request line
    assert built.raw_path_qs == raw_path + (f"?{query}" if query else "")


# -- properties --------------------------------------------------------------------------

RAW_PATHS = st.text(alphabet="/.%25cefapi;x2F5Ce\\AE", max_size=30).map(lambda s: "/" + s)
ROUTED = RouteTable(
    [
        route("root", "/"),
        route("api", "/api"),
        route("admin", "/api/admin", strip_prefix=True),
        route("e", "/e", strip_prefix=True),
        route("pie", "/pi/e"),
    ]
)
_FORBIDDEN = re.compile(r"//|/\./|/\.\./|/\.$|/\.\.$|%2F|%5C|%2E|\\", re.IGNORECASE)


def _canonical_or_none(raw: str) -> str | None:
    try:
        return canonical_path(raw)
    except InvalidPath:
        return None


@settings(max_examples=300, deadline=None)
@given(RAW_PATHS)
def test_canonical_path_is_idempotent_and_clean(raw: str) -> None:
    canonical = _canonical_or_none(raw)
    if canonical is None:
        return
    assert canonical.startswith("/")
    assert canonical_path(canonical) == canonical
    assert not _FORBIDDEN.search(canonical), canonical


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=20).map(lambda s: "/" + s))
def test_canonical_path_only_raises_invalid_path(raw: str) -> None:
    canonical = _canonical_or_none(raw)
    if canonical is not None:
        assert canonical_path(canonical) == canonical
        assert canonical.isascii()


@settings(max_examples=300, deadline=None)
@given(RAW_PATHS)
def test_route_of_policy_is_route_of_forwarded_path(raw: str) -> None:
    canonical = _canonical_or_none(raw)
    if canonical is None:
        return
    found = ROUTED.match("GET", None, canonical)
    upstream = found.upstream_path
    # Whatever the upstream does with the path again, it is already canonical...
    assert canonical_path(upstream) == upstream
    if found.route.strip_prefix:
        # ...and with the prefix put back it is the path the policy was chosen on.
        rebuilt = canonical_path(found.route.path + upstream)
        assert ROUTED.match("GET", None, rebuilt).route == found.route
        assert upstream_url("http://127.0.0.1:9", upstream, "").raw_path == upstream
    else:
        assert upstream == canonical
        assert ROUTED.match("GET", None, canonical_path(upstream)).route == found.route
        built = upstream_url("http://127.0.0.1:9/base", upstream, "")
        assert built.raw_path == "/base" + upstream
        # segment by segment, the forwarded path starts with the prefix whose policy ran
        prefix = [s for s in found.route.path.split("/") if s]
        sent = upstream.split("/")[1:]
        assert [segment_name(s) for s in sent[: len(prefix)]] == prefix
