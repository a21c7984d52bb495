"""Header hygiene: what a client may not send upstream, and what the gateway adds (CONTRACT §6)."""

from __future__ import annotations

import ipaddress
import re
import urllib.parse

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.config import HeaderSettings
from gateway.headers import (
    HeaderPolicy,
    clean_request_headers,
    clean_response_headers,
    client_ip,
    encode_value,
    forwarded_headers,
    forwarded_proto,
    identity_header_values,
    peer_is_trusted,
    request_id,
)
from gateway.identity import Identity

TRUSTED = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))
POLICY = HeaderPolicy(HeaderSettings(), TRUSTED)


def incoming(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def clean(*pairs: tuple[str, str], trusted: bool = False, **kwargs: bool) -> CIMultiDict[str]:
    return clean_request_headers(POLICY, incoming(*pairs), peer_trusted=trusted, **kwargs)


# --- what never reaches an upstream -------------------------------------------------------

FORGED_IDENTITY = [
    [("X-User-Id", "admin")],
    [("x-user-id", "admin")],
    [("X-USER-ID", "admin")],
    [("X_User_Id", "admin")],
    [("x_user-id", "admin")],
    [("X-User-Id", "a"), ("X-User-Id", "b"), ("x-user-id", "c")],
    [("Connection", "X-User-Id"), ("X-User-Id", "admin")],
    [("X-User-Email", "root@example.com")],
    [("X-User-Roles", "admin")],
    [("X-User-Name", "Root")],
    [("X-Auth-Issuer", "https://evil")],
    [("X-User-Anything", "x")],  # strip glob X-User-*
    [("x_auth_whatever", "x")],  # strip glob X-Auth-*, underscores
    [("X-Auth-", "x")],
]


@pytest.mark.parametrize("trusted", [False, True])
@pytest.mark.parametrize("pairs", FORGED_IDENTITY)
def test_forged_identity_headers_never_pass(pairs: list[tuple[str, str]], trusted: bool) -> None:
    out = clean(*pairs, ("Accept", "text/plain"), trusted=trusted)
    assert list(out.items()) == [("Accept", "text/plain")]


def test_custom_identity_names_and_globs() -> None:
    settings = HeaderSettings(
        id="Remote-User",
        email=None,
        name=None,
        roles="Remote-Groups",
        issuer=None,
        assertion="X-Identity-Assertion",
        strip=("X-Internal-*", "*_secret"),
    )
    policy = HeaderPolicy(settings)
    headers = incoming(
        ("remote_user", "a"),
        ("REMOTE-GROUPS", "b"),
        ("x-identity_assertion", "c"),
        ("X-Internal-Token", "d"),
        ("My-Secret", "e"),
        ("X-User-Id", "kept: not configured"),
    )
    out = clean_request_headers(policy, headers, peer_trusted=False)
    assert list(out.items()) == [("X-User-Id", "kept: not configured")]
    assert policy.is_identity("Remote_User") and not policy.is_identity("Remote-Usr")


@pytest.mark.parametrize(
    "name",
    [
        "Connection",
        "Keep-Alive",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Proxy-Authorization",
        "Proxy-Authenticate",
        "Proxy-Connection",
        "Proxy-Anything",
        "proxy_authorization",
        "Host",
        "Content-Length",
        "Expect",
    ],
)
def test_hop_by_hop_and_framing_headers_removed(name: str) -> None:
    out = clean((name, "x"), ("Accept", "*/*"), trusted=True)
    assert list(out.items()) == [("Accept", "*/*")]


@pytest.mark.parametrize(
    "connection",
    [
        "X-User-Id",
        "x-user-id",
        "X_USER_ID",
        "close, X-User-Id",
        "X-User-Id, close",
        "  X-User-Id\t",
        "keep-alive,X-User-Id,  upgrade",
        ",,X-User-Id,,",
        "\tclose ,\t X-User-Id ",
    ],
)
def test_identity_header_named_in_connection_is_still_removed(connection: str) -> None:
    """Naming an identity header in Connection removes the client's copy twice over; the
    gateway's own identity headers are added after cleaning, so nothing can remove them."""
    out = clean(("Connection", connection), ("X-User-Id", "admin"), ("Accept", "*/*"))
    assert list(out.items()) == [("Accept", "*/*")]


def test_headers_named_in_every_connection_copy_are_removed() -> None:
    out = clean(
        ("Connection", "keep-alive, X-Secret"),
        ("Connection", " x_other ,,"),
        ("X-Secret", "1"),
        ("X-Other", "2"),
        ("X-Kept", "3"),
    )
    assert list(out.items()) == [("X-Kept", "3")]


@pytest.mark.parametrize(
    ("name", "untrusted_kept", "trusted_kept"),
    [
        ("X-Real-IP", False, True),
        ("X-Original-URI", False, True),
        ("x-original-url", False, True),
        ("X-Rewrite-URL", False, True),
        ("X_Real_IP", False, True),
        ("Forwarded", False, True),
        ("X-Forwarded-Port", False, True),
        ("X-Forwarded-Prefix", False, True),
        ("X-Forwarded-Whatever", False, True),
        ("X-Original-Host", False, True),
        ("X-Original-Method", False, True),
        ("X-Host", False, True),
        ("X-Client-IP", False, True),
        ("X-Cluster-Client-IP", False, True),
        ("True-Client-IP", False, True),
        ("Client-IP", False, True),
        ("CF-Connecting-IP", False, True),
        ("Fastly-Client-IP", False, True),
        ("X-Envoy-External-Address", False, True),
        ("X-Envoy-Original-Path", False, True),
        ("true_client_ip", False, True),
        # the policy ran on the request's own method: an override never passes
        ("X-HTTP-Method-Override", False, False),
        ("X-HTTP-Method", False, False),
        ("X-Method-Override", False, False),
        ("x_http_method_override", False, False),
        # Set by forwarded_headers for everyone: the client copy never passes as such.
        ("X-Forwarded-For", False, False),
        ("X-Forwarded-Proto", False, False),
        ("X-Forwarded-Host", False, False),
        ("x_forwarded_for", False, False),
    ],
)
def test_forwarding_headers_depend_on_trust(
    name: str, untrusted_kept: bool, trusted_kept: bool
) -> None:
    assert (name in clean((name, "1.2.3.4"), trusted=False)) is untrusted_kept
    assert (name in clean((name, "1.2.3.4"), trusted=True)) is trusted_kept


@pytest.mark.parametrize("forward", [True, False])
def test_authorization_only_when_the_route_forwards_it(forward: bool) -> None:
    out = clean(("Authorization", "Bearer t"), forward_authorization=forward)
    assert ("Authorization" in out) is forward


def test_websocket_handshake_headers_left_to_the_ws_client() -> None:
    pairs = (
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", "k"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Protocol", "chat"),
        ("Origin", "http://o"),
    )
    assert list(clean(*pairs, websocket=True).items()) == [("Origin", "http://o")]
    assert "Sec-WebSocket-Key" in clean(*pairs, websocket=False)


@pytest.mark.parametrize(
    ("cookies", "expected"),
    [
        (["a=1; gateway_session=tok; b=2"], "a=1; b=2"),
        (["gateway_refresh=r;gateway_session=s"], None),
        (["GATEWAY_SESSION=s; theme=dark"], "theme=dark"),
        ([" gateway_session =s ;x=gateway_session"], "x=gateway_session"),
        (["a=1", "gateway_refresh=r", "b=2"], "a=1; b=2"),
        (["gateway_sessionX=1"], "gateway_sessionX=1"),
        ([";;"], None),
    ],
)
def test_gateway_cookies_removed_others_kept(cookies: list[str], expected: str | None) -> None:
    out = clean(*(("Cookie", c) for c in cookies))
    assert out.getall("Cookie", []) == ([expected] if expected else [])


def test_cookie_header_name_in_any_case() -> None:
    out = clean(("COOKIE", "gateway_session=s; a=1"))
    assert list(out.items()) == [("Cookie", "a=1")]


def test_ordinary_headers_keep_order_case_and_duplicates() -> None:
    pairs = [("Accept", "a"), ("X-Custom", "1"), ("x-custom", "2"), ("User-Agent", "ua")]
    assert list(clean(*pairs).items()) == pairs


# --- response headers ----------------------------------------------------------------------


def test_response_hop_by_hop_removed_end_to_end_kept() -> None:
    headers = incoming(
        ("Connection", "close, X-Hop"),
        ("X-Hop", "1"),
        ("Transfer-Encoding", "chunked"),
        ("Keep-Alive", "timeout=5"),
        ("Content-Length", "12"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("Content-Encoding", "gzip"),
        ("Proxy-Authenticate", "Basic"),
    )
    out = clean_response_headers((n.encode(), v.encode()) for n, v in headers.items())
    assert out == [
        (b"Content-Length", b"12"),
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
        (b"Content-Encoding", b"gzip"),
    ]


# --- client address and X-Forwarded-* ------------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "xff", "expected"),
    [
        ("203.0.113.9", [], "203.0.113.9"),
        ("203.0.113.9", ["1.1.1.1"], "203.0.113.9"),  # untrusted peer: its claim is ignored
        ("10.0.0.1", [], "10.0.0.1"),
        ("10.0.0.1", ["1.1.1.1"], "1.1.1.1"),
        ("10.0.0.1", ["6.6.6.6, 1.1.1.1, 10.0.0.2"], "1.1.1.1"),  # spoofed left part skipped
        ("10.0.0.1", ["6.6.6.6", "1.1.1.1, 10.0.0.2"], "1.1.1.1"),  # several header copies
        ("10.0.0.1", ["10.0.0.3, 10.0.0.2"], "10.0.0.3"),  # all trusted: leftmost
        ("10.0.0.1", ["1.1.1.1, garbage, 10.0.0.2"], "10.0.0.2"),  # broken chain: last trusted hop
        ("10.0.0.1", ["garbage"], "10.0.0.1"),
        ("10.0.0.1", ["1.1.1.1:4711"], "1.1.1.1"),
        ("10.0.0.1", ["[2001:db8::1]:443"], "2001:db8::1"),
        ("10.0.0.1", ["2001:db8::1"], "2001:db8::1"),
        ("::1", ["1.1.1.1"], "1.1.1.1"),
        ("10.0.0.1", [" , ,"], "10.0.0.1"),
        (None, ["1.1.1.1"], "unknown"),
    ],
)
def test_client_ip(peer: str | None, xff: list[str], expected: str) -> None:
    assert client_ip(peer, xff, TRUSTED) == expected


def test_policy_trusts_its_proxies() -> None:
    assert POLICY.trusts("10.9.8.7") and not POLICY.trusts("192.0.2.1") and not POLICY.trusts(None)


@pytest.mark.parametrize(
    ("peer", "trusted", "expected"),
    [
        ("10.1.2.3", TRUSTED, True),
        ("11.0.0.1", TRUSTED, False),
        ("10.1.2.3", (), False),
        (None, TRUSTED, False),
        ("nonsense", TRUSTED, False),
        ("::1", TRUSTED, True),
    ],
)
def test_peer_is_trusted(peer: str | None, trusted: tuple, expected: bool) -> None:
    assert peer_is_trusted(peer, trusted) is expected


@pytest.mark.parametrize(
    ("trusted", "existing", "expected_xff"),
    [
        (False, "6.6.6.6", "203.0.113.9"),  # replaced, not appended to
        (False, None, "203.0.113.9"),
        (True, "1.1.1.1", "1.1.1.1, 10.0.0.1"),
        (True, "1.1.1.1, 10.0.0.2", "1.1.1.1, 10.0.0.2, 10.0.0.1"),
        (True, None, "10.0.0.1"),
    ],
)
def test_forwarded_headers(trusted: bool, existing: str | None, expected_xff: str) -> None:
    peer = "10.0.0.1" if trusted else "203.0.113.9"
    ip = "1.1.1.1" if trusted else peer
    out = forwarded_headers(
        client_ip=ip,
        proto="https",
        host="app.example",
        existing_xff=existing,
        peer_trusted=trusted,
        peer=peer,
    )
    assert out == [
        ("X-Forwarded-For", expected_xff),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "app.example"),
    ]


def test_forwarded_headers_without_host() -> None:
    out = forwarded_headers(
        client_ip="1.2.3.4", proto="http", host=None, existing_xff=None, peer_trusted=False
    )
    assert [name for name, _ in out] == ["X-Forwarded-For", "X-Forwarded-Proto"]


@pytest.mark.parametrize(
    ("scheme", "claims", "trusted", "expected"),
    [
        ("http", ["https"], False, "http"),
        ("http", ["https"], True, "https"),
        ("http", ["http, https"], True, "https"),
        ("https", ["http"], True, "http"),
        ("http", ["javascript"], True, "http"),
        ("https", [], True, "https"),
    ],
)
def test_forwarded_proto(scheme: str, claims: list[str], trusted: bool, expected: str) -> None:
    assert forwarded_proto(scheme, claims, peer_trusted=trusted) == expected


# --- identity header values ----------------------------------------------------------------


def identity(**kwargs: object) -> Identity:
    base: dict[str, object] = {
        "id": "6f1c",
        "issuer": "http://localhost:8080",
        "email": "a@example.com",
        "name": "Ann",
        "roles": ("user", "admin"),
    }
    base.update(kwargs)
    return Identity(**base)  # type: ignore[arg-type]


def test_identity_headers_rendered() -> None:
    assert identity_header_values(HeaderSettings(), identity()) == [
        ("X-User-Id", "6f1c"),
        ("X-User-Email", "a@example.com"),
        ("X-User-Name", "Ann"),
        ("X-User-Roles", "user,admin"),
        ("X-Auth-Issuer", "http://localhost:8080"),
    ]


def test_missing_values_and_unconfigured_headers_left_out() -> None:
    settings = HeaderSettings(email=None)
    out = dict(identity_header_values(settings, identity(name=None, roles=(), email="x@y.z")))
    assert out == {"X-User-Id": "6f1c", "X-Auth-Issuer": "http://localhost:8080"}
    assert dict(identity_header_values(settings, identity(name="")))["X-User-Id"] == "6f1c"
    assert "X-User-Name" not in dict(identity_header_values(settings, identity(name="")))


@pytest.mark.parametrize(
    ("raw", "encoded"),
    [
        ("Ann", "Ann"),
        ("José Müller", "Jos%C3%A9 M%C3%BCller"),
        ("100%", "100%25"),
        ("%0d%0a", "%250d%250a"),
        ("a\r\nX-User-Id: admin", "a%0D%0AX-User-Id: admin"),
        ("a\x00b", "a%00b"),
        ("tab\there", "tab%09here"),
        ("\x7f", "%7F"),
        ("日本", "%E6%97%A5%E6%9C%AC"),
        ("\U0001f600", "%F0%9F%98%80"),
        ("~!\"#$&'()*+,-./:;<=>?@[\\]^_`{|}", "~!\"#$&'()*+,-./:;<=>?@[\\]^_`{|}"),
    ],
)
def test_value_encoding(raw: str, encoded: str) -> None:
    assert encode_value(raw) == encoded
    assert urllib.parse.unquote(encoded) == raw  # a backend gets the exact value back


@pytest.mark.parametrize(
    "evil",
    [
        "x\r\nX-User-Roles: admin",
        "x\nInjected: 1",
        "x\rY",
        "x\x00",
        "\u2028x\u0085",
        "%0d%0aX-User-Roles: admin",
        "\ud800 lone surrogate",
        "\x7f\x1b[31m",
        "\r\n" * 5000,
    ],
)
def test_no_header_injection_through_claims(evil: str) -> None:
    values = identity_header_values(HeaderSettings(), identity(name=evil, email=evil, id=evil))
    for _, value in values:
        assert re.fullmatch(r"[\x20-\x7e]*", value), value
    assert len(values) == 5


# --- request id ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("abc-123_x.Y", True),
        ("a" * 128, True),
        ("a" * 129, False),
        ("", False),
        (None, False),
        ("has space", False),
        ("semi;colon", False),
        ("new\nline", False),
        ("ünïcode", False),
    ],
)
def test_request_id(given: str | None, kept: bool) -> None:
    result = request_id(given)
    if kept:
        assert result == given
    else:
        assert result != given and re.fullmatch(r"[0-9a-f]{32}", result)


def test_generated_request_ids_differ() -> None:
    assert request_id(None) != request_id(None)
