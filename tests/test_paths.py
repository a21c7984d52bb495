"""gateway.paths: the one canonical form of a request path, and every path it refuses."""

from __future__ import annotations

import pytest

from gateway.errors import InvalidPath
from gateway.paths import canonical_path

# -- canonical_path ----------------------------------------------------------------------

CANONICAL = [
    # (raw, canonical)
    ("/", "/"),
    ("/api", "/api"),
    ("/api/", "/api/"),
    ("/api/x/", "/api/x/"),
    # dot segments are removed (RFC 3986 §5.2.4), in any encoding of the dot
    ("/a/./b/../c", "/a/c"),
    ("/a/b/..", "/a/"),
    ("/a/b/.", "/a/b/"),
    ("/..", "/"),
    ("/.", "/"),
    ("/../x", "/x"),
    ("/../../../etc/passwd", "/etc/passwd"),
    ("/public/%2e%2e/admin", "/admin"),
    ("/public/%2E%2E/admin", "/admin"),
    ("/public/.%2e/admin", "/admin"),
    ("/public/%2e./admin", "/admin"),
    ("/public/%2e/admin", "/public/admin"),
    ("/public/%2E/admin", "/public/admin"),
    # duplicate slashes are merged
    ("//admin", "/admin"),
    ("///admin//x///", "/admin/x/"),
    ("//", "/"),
    ("/a//..", "/"),
    # unreserved characters are decoded, other escapes are kept with upper-case hex
    ("/%41%7e%2D%5f%2e1", "/A~-_.1"),
    ("/a%3bb", "/a%3Bb"),
    ("/a%3Bb;c=d", "/a%3Bb;c=d"),
    ("/a%20b", "/a%20b"),
    ("/a%3fb%23c", "/a%3Fb%23c"),
    ("/a%25b", "/a%25b"),
    # one level of decoding only: %25 stays %25; a literal "%" that a second decoding would
    # not turn into a separator, control or dot segment is data
    ("/100%25", "/100%25"),
    ("/a%25b/%25", "/a%25b/%25"),
    ("/%2541", "/%2541"),
    ("/a%252e", "/a%252e"),
    ("/%252e%252ex", "/%252e%252ex"),
    ("/%25C3%25A9", "/%25C3%25A9"),
    ("/a/%25252e%25252e", "/a/%25252e%25252e"),  # two levels are checked, not three
    # long paths stay cheap and exact
    ("/" * 16000 + "a", "/a"),
    ("/a" * 5000, "/a" * 5000),
    # sub-delims, ":" and "@" are allowed raw and kept raw
    ("/a;b=c,d/e:f@g!$&'()*+", "/a;b=c,d/e:f@g!$&'()*+"),
    ("/api;jsessionid=1/x", "/api;jsessionid=1/x"),
    # non-ASCII and ASCII not allowed raw are percent-encoded as UTF-8
    ("/caf\u00e9", "/caf%C3%A9"),
    ("/caf%c3%a9", "/caf%C3%A9"),
    ('/a"<>[]^`{|}', "/a%22%3C%3E%5B%5D%5E%60%7B%7C%7D"),
    ("/\u65e5\u672c", "/%E6%97%A5%E6%9C%AC"),
    # names that merely contain dots are ordinary segments
    ("/.well-known/jwks.json", "/.well-known/jwks.json"),
    ("/a/..b/c..", "/a/..b/c.."),
    ("/a/.b.", "/a/.b."),
    # aiohttp hands non-UTF-8 bytes as surrogateescape; valid UTF-8 round-trips
    ("/caf\udcc3\udca9", "/caf%C3%A9"),
]


@pytest.mark.parametrize(("raw", "expected"), CANONICAL)
def test_canonical_path(raw: str, expected: str) -> None:
    assert canonical_path(raw) == expected
    assert canonical_path(expected) == expected


REFUSED = [
    # encoded separators
    "/admin%2fx",
    "/admin%2Fx",
    "/a%5cb",
    "/a%5Cb",
    "/public/..%2fadmin",
    "/public/%2e%2e%2fadmin",
    # raw backslash, fragment, query mark, space
    "/a\\b",
    "/public\\..\\admin",
    "/a#b",
    "/a?b",
    "/a b",
    # control characters, raw and encoded, C0, DEL and C1
    "/a%00",
    "/a\x00b",
    "/a%0d%0aSet-Cookie:x",
    "/a\r\nb",
    "/a%09",
    "/a\tb",
    "/a%1f",
    "/a%7f",
    "/a\x7f",
    "/a%c2%85",
    "/a\u0085",
    # dot segments with parameters, in any encoding (Tomcat drops ";x")
    "/..;/admin",
    "/..;x/admin",
    "/public/..;x/admin",
    "/.;x/admin",
    "/%2e%2e;x/admin",
    "/.%2e;x/admin",
    "/..%3bx/admin",
    "/..%3B/admin",
    # a segment of only parameters ("/;x/admin" is "//admin" to Tomcat)
    "/;x/admin",
    "/a/;/b",
    # only dots and spaces: Windows trims trailing dots and spaces to ".."
    "/...",
    "/public/.../admin",
    "/public/..%20/admin",
    "/public/%2e%2e%2e/admin",
    "/public/.. ./admin",
    "/a/%20",
    # invalid escapes
    "/%zz",
    "/%4",
    "/a%",
    "/a%%41",
    "/%g0",
    # not UTF-8: overlong "/" and ".", lone bytes
    "/%c0%af",
    "/%c0%ae%c0%ae/admin",
    "/%e0%80%af",
    "/%ff",
    "/\udcff",
    "/\ud800",
    # look-alikes some upstreams map onto separators or dots
    "/public/\uff0e\uff0e/admin",
    "/public/%ef%bc%8e%ef%bc%8e/admin",
    "/admin\uff0fx",
    "/admin\u2215x",
    "/admin%e2%88%95x",
    "/admin\uff3cx",
    "/public/\u2024\u2024/admin",
    # what a second decoding (IIS, a framework unquoting again) turns into a separator, a
    # control or a dot segment
    "/public/%252e%252e/admin",
    "/public/%252E%252E/admin",
    "/public/%252e./admin",
    "/public/.%252e/admin",
    "/public/%252e/admin",
    "/public/%252e%252e;x/admin",
    "/admin%252fx",
    "/admin%252Fx",
    "/public/..%252fadmin",
    "/a%255cb",
    "/a%2500",
    "/a%250d%250aSet-Cookie:x",
    "/%25c0%25af",
    "/%25ff",
    # not a path
    "",
    "admin",
    "http://example.com/admin",
    "*",
]


@pytest.mark.parametrize("raw", REFUSED)
def test_canonical_path_refuses(raw: str) -> None:
    with pytest.raises(InvalidPath):
        canonical_path(raw)


def test_canonical_path_refuses_non_string() -> None:
    with pytest.raises(InvalidPath):
        canonical_path(b"/admin")  # type: ignore[arg-type]
