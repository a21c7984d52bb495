"""Header hygiene as data: what a client may not send upstream, and what the gateway adds.

Guarantees (CONTRACT §6):

- identity headers reach an upstream only from ``identity_header_values``, i.e. from verified
  claims: every client copy of a configured identity header or of a ``headers.strip`` glob is
  removed, whatever its case, with ``_`` written for ``-`` (CGI/WSGI stacks map both to the
  same ``HTTP_X_USER_ID``), duplicated or named in ``Connection``;
- hop-by-hop headers (RFC 9110 §7.6.1) and every header named in ``Connection`` never pass;
- from a peer outside ``trusted_proxies`` the client's ``X-Forwarded-*``, ``Forwarded``,
  ``X-Real-IP``, ``X-Original-URI``/``-URL``, ``X-Rewrite-URL`` and the other headers of
  ``UNTRUSTED_ONLY`` (client-address and original-host/method claims) are dropped, so the
  values the gateway adds replace them;
- method overrides (``X-HTTP-Method-Override`` and kin) never pass: the policy is evaluated
  on the request's own method;
- the gateway's own cookies never leave the gateway;
- injected values are printable ASCII: nothing a claim holds can split or forge a header.

Every name is compared in one normal form, ``lower()`` with ``_`` replaced by ``-``.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import random
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from multidict import CIMultiDict, MultiMapping

from gateway.config import HeaderSettings
from gateway.memo import Memo

__all__ = [
    "HOP_BY_HOP",
    "UNTRUSTED_ONLY",
    "METHOD_OVERRIDE",
    "FORWARDED",
    "GATEWAY_COOKIES",
    "HeaderPolicy",
    "clean_request_headers",
    "text_fields",
    "header_lines",
    "header_block",
    "lines_as_text",
    "upstream_request_fields",
    "clean_response_headers",
    "client_ip",
    "peer_is_trusted",
    "forwarded_proto",
    "forwarded_headers",
    "identity_header_values",
    "encode_value",
    "request_id",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# RFC 9110 §7.6.1 plus the de-facto proxy headers; any other ``Proxy-*`` goes too (prefix).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
        "proxy-connection",
    }
)
HOP_BY_HOP_PREFIX = "proxy-"

# Believed by some backends as the client's address, or as the original URL, host or method
# (nginx, IIS URL Rewrite, Symfony, CDNs, Envoy); only a trusted proxy may state them.
UNTRUSTED_ONLY = frozenset(
    {
        "x-real-ip",
        "x-original-uri",
        "x-original-url",
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
        "x-envoy-external-address",
        "x-envoy-original-path",
    }
)

# Frameworks (Express method-override, Symfony, ASP.NET, Spring) run the method these name
# instead of the request's: a route limited to GET would serve a DELETE the policy never saw.
# The gateway evaluates the request's own method, so nobody's override reaches an upstream.
METHOD_OVERRIDE = frozenset({"x-http-method-override", "x-http-method", "x-method-override"})

# Client-supplied forwarding information; replaced (not appended to) for untrusted peers.
FORWARDED = frozenset(
    {
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-forwarded-port",
        "x-forwarded-prefix",
        "x-forwarded-server",
        "x-forwarded-ssl",
        "forwarded",
    }
)
FORWARDED_PREFIX = "x-forwarded-"

# The headers the gateway sets on every upstream request (``forwarded_headers``' three and the
# request id): always removed from the client's copy so the gateway's values are the only ones
# (for a trusted peer the chain is carried over by value).
SET_BY_GATEWAY = frozenset(
    {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-request-id"}
)

# Framing belongs to each hop (RFC 9112 §6): the Forwarder re-derives Content-Length from the
# request as aiohttp parsed it, and answers ``Expect: 100-continue`` itself.
# ``Host`` is set by the Forwarder (the upstream's, or the client's with ``preserve_host``).
OWNED_BY_FORWARDER = frozenset({"host", "content-length", "expect"})

GATEWAY_COOKIES = frozenset({"gateway_session", "gateway_refresh"})

_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


def _norm(name: str) -> str:
    return name.lower().replace("_", "-")


class HeaderPolicy:
    """The request-header rules of one configuration, precomputed once at startup."""

    __slots__ = ("identity", "_strip", "trusted_proxies", "settings", "_verdicts")

    def __init__(self, settings: HeaderSettings, trusted_proxies: Sequence[Network] = ()) -> None:
        self.settings = settings
        self.trusted_proxies: tuple[Network, ...] = tuple(trusted_proxies)
        self.identity: frozenset[str] = frozenset(_norm(n) for n in settings.identity_headers())
        patterns = [fnmatch.translate(_norm(glob)) for glob in settings.strip]
        # One alternation: a single regex call per header, whatever the number of globs.
        self._strip = re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None
        # Per (peer trusted, Authorization kept, websocket): names repeat from request to
        # request, the rules do not change.
        self._verdicts: dict[tuple[bool, bool, bool], Memo[bytes, int]] = {}

    def verdicts(
        self, *, peer_trusted: bool, forward_authorization: bool, websocket: bool
    ) -> Memo[bytes, int]:
        """What becomes of each client header name (as sent) on one kind of request."""
        key = (peer_trusted, forward_authorization, websocket)
        table = self._verdicts.get(key)
        if table is None:
            table = self._verdicts[key] = Memo(_request_verdict(self, *key))
        return table

    def is_identity(self, name: str) -> bool:
        """True for a configured identity header or a ``strip`` match (any case, ``_``)."""
        return self._owned(_norm(name))

    def trusts(self, peer: str | None) -> bool:
        """True when the TCP peer is one of ``server.trusted_proxies``."""
        return peer_is_trusted(peer, self.trusted_proxies)

    def _owned(self, norm: str) -> bool:
        return norm in self.identity or (
            self._strip is not None and self._strip.match(norm) is not None
        )

    def __repr__(self) -> str:
        return f"HeaderPolicy(identity={sorted(self.identity)!r}, strip={self.settings.strip!r})"


# What becomes of a client's header field on the way upstream.
KEEP, DROP, COOKIE, CONNECTION = 0, 1, 2, 3


def _request_verdict(
    policy: HeaderPolicy, peer_trusted: bool, forward_authorization: bool, websocket: bool
) -> Callable[[bytes], int]:
    def verdict(name: bytes) -> int:
        norm = _norm(_text(name))
        if norm == "connection":
            return CONNECTION
        if _dropped(policy, norm, peer_trusted, forward_authorization) or (
            websocket and norm.startswith("sec-websocket-")
        ):
            return DROP
        return COOKIE if norm == "cookie" else KEEP

    return verdict


def _dropped(
    policy: HeaderPolicy, norm: str, peer_trusted: bool, forward_authorization: bool
) -> bool:
    """The rules for one name; headers named in ``Connection`` are the caller's to drop."""
    if norm in HOP_BY_HOP or norm.startswith(HOP_BY_HOP_PREFIX):
        return True
    if policy._owned(norm):
        return True
    if norm in OWNED_BY_FORWARDER or norm in SET_BY_GATEWAY or norm in METHOD_OVERRIDE:
        return True
    if not peer_trusted and (
        norm in UNTRUSTED_ONLY or norm in FORWARDED or norm.startswith(FORWARDED_PREFIX)
    ):
        return True
    return norm == "authorization" and not forward_authorization


def _filter_cookie(value: str) -> str:
    # Names compared case-insensitively: a look-alike of the gateway's cookie has no business
    # upstream either, and dropping it costs nothing.
    kept = [
        part
        for part in (p.strip() for p in value.split(";"))
        if part and part.split("=", 1)[0].strip().lower() not in GATEWAY_COOKIES
    ]
    return "; ".join(kept)


def clean_request_headers(
    policy: HeaderPolicy,
    headers: MultiMapping[str],
    *,
    peer_trusted: bool,
    websocket: bool = False,
    forward_authorization: bool = True,
) -> CIMultiDict[str]:
    """``upstream_request_fields`` for headers already decoded as text (aiohttp's view)."""
    fields = [
        (n.encode("latin-1"), v.encode("utf-8", "surrogateescape")) for n, v in headers.items()
    ]
    kept = upstream_request_fields(
        policy,
        fields,
        peer_trusted=peer_trusted,
        websocket=websocket,
        forward_authorization=forward_authorization,
    )
    return text_fields(kept)


def text_fields(fields: Iterable[tuple[bytes, bytes]]) -> CIMultiDict[str]:
    """Header fields as text, as aiohttp holds them (undecodable bytes kept as surrogates)."""
    return CIMultiDict([(_text(n), _text(v)) for n, v in fields])


def header_lines(fields: Iterable[tuple[bytes, bytes]]) -> list[bytes]:
    """Fields as the lines of a head (``b"Name: value"``), for ``serialize_head``."""
    return [name + b": " + value for name, value in fields]


def header_block(fields: Iterable[tuple[bytes, bytes]]) -> bytes:
    """Fields as one block of head lines (CRLF between them): one object to keep and send."""
    return b"\r\n".join(header_lines(fields))


def lines_as_text(lines: Iterable[bytes]) -> CIMultiDict[str]:
    """Head lines and blocks of lines (``header_block``) back as text fields."""
    split = [line.partition(b": ") for block in lines for line in block.split(b"\r\n")]
    return text_fields((name, value) for name, _, value in split)


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def upstream_request_fields(
    policy: HeaderPolicy,
    fields: Iterable[tuple[bytes, bytes]],
    *,
    peer_trusted: bool,
    websocket: bool = False,
    forward_authorization: bool = True,
) -> list[tuple[bytes, bytes]]:
    """The client's header fields (bytes, as received) minus everything CONTRACT §6 removes,
    in one pass.

    Removed: identity and ``strip`` headers; hop-by-hop headers (``Upgrade`` and
    ``Connection`` too on websocket routes: aiohttp's websocket client writes its own
    handshake) and every header named in any ``Connection``; ``Host``, ``Content-Length`` and
    ``Expect`` (the Forwarder sets framing and Host per hop); ``X-Forwarded-For/-Proto/-Host``
    and ``X-Request-Id`` (the gateway sets them); method overrides (``METHOD_OVERRIDE``); for
    an untrusted peer also every ``X-Forwarded-*``, ``Forwarded`` and ``UNTRUSTED_ONLY``
    header; ``Authorization`` unless forwarded. The gateway's cookies are removed from
    ``Cookie``; the other cookies are merged into a single ``Cookie`` header (RFC 9113
    §8.2.3), dropped when none is left. On websocket routes the ``Sec-WebSocket-*`` handshake
    headers go as well. Values are never decoded on the way: the bytes the client sent are the
    bytes sent on.
    """
    verdicts = policy.verdicts(
        peer_trusted=peer_trusted, forward_authorization=forward_authorization, websocket=websocket
    )
    kept: list[tuple[bytes, bytes]] = []
    cookies: list[bytes] = []
    named: set[str] = set()
    for field in fields:
        verdict = verdicts[field[0]]
        if verdict == KEEP:
            kept.append(field)
        elif verdict == COOKIE:
            filtered = _filter_cookie(_text(field[1]))
            if filtered:
                cookies.append(_bytes(filtered))
        elif verdict == CONNECTION:
            tokens = (_norm(t.strip()) for t in _text(field[1]).split(","))
            named.update(t for t in tokens if t)
    if named:  # rare: the names a Connection header lists go too, wherever they stood
        kept = [field for field in kept if _norm(_text(field[0])) not in named]
        if "cookie" in named:
            cookies = []
    if cookies:
        kept.append((b"Cookie", b"; ".join(cookies)))
    return kept


_HOP_BY_HOP_BYTES = frozenset(name.encode() for name in HOP_BY_HOP)


def _response_verdict(name: bytes) -> int:
    lower = name.lower()
    if lower == b"connection":
        return CONNECTION
    if lower in _HOP_BY_HOP_BYTES or lower.startswith(b"proxy-"):
        return DROP
    return KEEP


_RESPONSE_VERDICTS: Memo[bytes, int] = Memo(_response_verdict)


def clean_response_headers(fields: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """An upstream response's header fields (as received), fit to send on the client's
    connection.

    Removed: hop-by-hop headers and those named in ``Connection``. ``Transfer-Encoding`` is
    hop-by-hop, so the response is re-framed (``Exchange.send_head``): with the upstream's
    ``Content-Length`` when there is one (the body is relayed byte for byte, the client
    decompresses nothing), chunked otherwise; for HEAD, 204 and 304 with no body.
    Bytes in, bytes out: a value is never decoded only to be encoded again.
    """
    verdicts = _RESPONSE_VERDICTS
    out = []
    named: set[bytes] = set()
    for field in fields:
        verdict = verdicts[field[0]]
        if verdict == KEEP:
            out.append(field)
        elif verdict == CONNECTION:
            named.update(t.strip().lower() for t in field[1].split(b","))
    named -= _HOP_BY_HOP_BYTES  # "Connection: keep-alive", the common case, names nothing kept
    if named:
        out = [field for field in out if field[0].lower() not in named]
    return out


def _parse_address(entry: str) -> Address | None:
    """An IP from one ``X-Forwarded-For`` entry (``1.2.3.4``, ``1.2.3.4:80``, ``[::1]:80``)."""
    entry = entry.strip()
    if entry.startswith("["):
        entry = entry[1:].partition("]")[0]
    elif entry.count(":") == 1:
        entry = entry.partition(":")[0]
    try:
        return ipaddress.ip_address(entry)
    except ValueError:
        return None


def _trusted(address: Address, trusted: Sequence[Network]) -> bool:
    return any(address in network for network in trusted)


def peer_is_trusted(peer: str | None, trusted: Sequence[Network]) -> bool:
    """True when the TCP peer's address lies in one of ``server.trusted_proxies``."""
    if peer is None or not trusted:
        return False
    address = _parse_address(peer)
    return address is not None and _trusted(address, trusted)


def client_ip(peer: str | None, x_forwarded_for: Iterable[str], trusted: Sequence[Network]) -> str:
    """The client's address, as uvicorn's proxy-headers middleware reads it.

    An untrusted peer is the client, whatever it claims. Behind trusted proxies, the chain is
    read right to left (each proxy appends the address it saw) and the first address outside
    ``trusted`` is the client; if all are trusted, the leftmost. An unparsable entry breaks the
    chain: nothing left of it can be believed, so the last trusted hop seen is returned, never
    a client-chosen string. A missing peer (not a TCP socket) is ``"unknown"`` (RFC 7239 §6.3).
    """
    if peer is None:
        return "unknown"
    if not peer_is_trusted(peer, trusted):
        return peer
    current = peer
    entries = [e for value in x_forwarded_for for e in value.split(",") if e.strip()]
    for entry in reversed(entries):
        address = _parse_address(entry)
        if address is None:
            return current
        current = str(address)
        if not _trusted(address, trusted):
            return current
    return current


def forwarded_proto(scheme: str, x_forwarded_proto: Iterable[str], *, peer_trusted: bool) -> str:
    """``http`` or ``https``: the trusted proxy's nearest claim, else the connection's scheme."""
    if peer_trusted:
        claims = [c.strip().lower() for v in x_forwarded_proto for c in v.split(",")]
        if claims and claims[-1] in ("http", "https"):
            return claims[-1]
    return "https" if scheme.lower() in ("https", "wss") else "http"


def forwarded_headers(
    *,
    client_ip: str,
    proto: str,
    host: str | None,
    existing_xff: str | None,
    peer_trusted: bool,
    peer: str | None = None,
) -> list[tuple[str, str]]:
    """``X-Forwarded-For``, ``-Proto`` and ``-Host`` for the upstream request.

    For a trusted peer, the peer's address (``peer``, else ``client_ip``) is appended to the
    chain it sent; for anyone else the chain is replaced by ``client_ip`` alone. ``host`` is
    the Host the client asked for; without one no ``X-Forwarded-Host`` is sent.
    ``existing_xff`` is every client ``X-Forwarded-For`` copy joined with ``", "``
    (``clean_request_headers`` removes the originals, so the chain is carried by value).
    """
    if peer_trusted:
        hop = peer if peer is not None else client_ip
        chain = (existing_xff or "").strip().strip(",").strip()
        xff = f"{chain}, {hop}" if chain else hop
    else:
        xff = client_ip
    out = [("X-Forwarded-For", xff), ("X-Forwarded-Proto", proto)]
    if host:
        out.append(("X-Forwarded-Host", host))
    return out


def encode_value(value: str) -> str:
    """Printable ASCII except ``%`` as-is; every other byte of its UTF-8 as ``%XX``."""
    if value.isascii() and value.isprintable() and "%" not in value:
        return value  # the common case, without a per-byte loop
    return "".join(
        chr(b) if 0x20 <= b <= 0x7E and b != 0x25 else f"%{b:02X}"
        for b in value.encode("utf-8", "surrogatepass")
    )


class _IdentityLike(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def issuer(self) -> str: ...
    @property
    def email(self) -> str | None: ...
    @property
    def name(self) -> str | None: ...
    @property
    def roles(self) -> tuple[str, ...]: ...


def identity_header_values(
    settings: HeaderSettings, identity: _IdentityLike
) -> list[tuple[str, str]]:
    """The identity headers for a verified caller, encoded by ``encode_value``.

    Roles are comma-joined; a header that is not configured, or whose value is empty, is left
    out. ``headers.assertion`` is not rendered here (it needs the token service).
    """
    fields = (
        (settings.id, identity.id),
        (settings.email, identity.email),
        (settings.name, identity.name),
        (settings.roles, ",".join(identity.roles)),
        (settings.issuer, identity.issuer),
    )
    return [(name, encode_value(value)) for name, value in fields if name and value]


def request_id(client_value: str | None) -> str:
    """The client's ``X-Request-Id`` if it is 1..128 of ``[A-Za-z0-9._-]``, else a new one."""
    if client_value is not None and _REQUEST_ID.fullmatch(client_value):
        return client_value
    # 128 random bits, as a UUID4 has. Not a secret, so not os.urandom: a system call per
    # request costs more than the rest of this function; the module's generator is reseeded
    # in every forked worker.
    return f"{random.getrandbits(128):032x}"
