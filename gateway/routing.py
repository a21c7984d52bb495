"""Routing: one canonical path per request, and the route table that matches it.

Guarantee: the path a policy is evaluated on is exactly the path sent upstream. The
canonical path is computed once from the raw (still percent-encoded) request target and is
never decoded again: routing and forwarding both use it. The canonical form itself is
defined in ``gateway.paths``.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import yarl

from gateway.config import RouteSettings
from gateway.errors import BadRequest, InvalidPath, MethodNotAllowed, NotFound
from gateway.memo import Memo
from gateway.paths import canonical_path

__all__ = [
    "canonical_path",
    "RouteMatch",
    "RouteTable",
    "RequestTarget",
    "request_target",
    "valid_host",
    "segment_name",
    "upstream_url",
    "normalize_host",
]


@dataclass(frozen=True)
class RouteMatch:
    route: RouteSettings
    # The canonical path with the prefix removed when ``strip_prefix`` ("/" for the bare
    # prefix); still percent-encoded; does not include the upstream URL's own path.
    upstream_path: str


def normalize_host(host: str | None) -> str | None:
    """Host as routes compare it: lower-case, without port and one trailing dot."""
    return _normalized[host] if host else None


def _normalize_host(host: str) -> str | None:
    host = host.strip().lower()
    if host.startswith("["):  # IPv6 literal, maybe with a port after "]"
        end = host.find("]")
        host = host[: end + 1] if end != -1 else host
    else:
        host = host.rsplit(":", 1)[0] if ":" in host else host
    if host.endswith("."):
        host = host[:-1]
    return host or None


# RFC 9110 §7.2 / RFC 3986 §3.2.2, narrowed: a DNS-style name (letters, digits, "-", "_",
# dot-separated labels, one trailing dot) or an IPv4 address, or an IPv6 literal in brackets;
# then an optional port. No userinfo, percent-escape, other sub-delim, space or non-ASCII:
# a Host the gateway would not match to a route but an upstream might is refused instead.
_HOST = re.compile(
    r"(?P<name>[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?|\[(?P<ipv6>[0-9A-Fa-f:.]+)\])"
    r"(?::(?P<port>[0-9]{0,5}))?"
)
_DEFAULT_PORTS = {"http": 80, "https": 443}
_QUERY_OR_FRAGMENT = re.compile(r"[?#]")


def valid_host(value: str | None) -> str | None:
    """A ``Host`` value (or an absolute target's authority) checked; ``None`` when empty.

    Raises ``BadRequest`` for anything but ``name[:port]``, ``IPv4[:port]`` and
    ``[IPv6][:port]`` (RFC 9112 §3.2: a Host with an invalid value is a 400): ``a@b``,
    ``a b``, ``a,b``, ``a..b``, ``x%2eexample``, ``h:99999``, ``h:1:2``, non-ASCII.
    """
    return None if value is None else _valid_hosts[value]


def _check_host(value: str) -> str | None:
    if not value.strip():
        return None
    value = value.strip()
    found = _HOST.fullmatch(value)
    if found is None or (found["port"] and int(found["port"]) > 65535):
        raise BadRequest("The Host header is not valid.")
    if found["ipv6"] is not None:
        try:
            ipaddress.IPv6Address(found["ipv6"])
        except ValueError:
            raise BadRequest("The Host header is not valid.") from None
    return value


# A gateway sees a handful of Host values, again and again: each is checked once (a refused
# one raises, so it is never kept), and a client sending new ones cannot grow a memo past
# its bound.
_valid_hosts: Memo[str, str | None] = Memo(_check_host, 1024)
_normalized: Memo[str, str | None] = Memo(_normalize_host, 1024)


@dataclass(frozen=True)
class RequestTarget:
    """What a request asks for: the raw path (still encoded, no query) and the host.

    ``host`` is the ``Host`` header, checked by ``valid_host``, or ``None`` without one; it
    is the host routes are matched on and the one to report as ``X-Forwarded-Host``.
    """

    path: str
    host: str | None


def request_target(raw_target: str, host_header: str | None) -> RequestTarget:
    """Split a request target (RFC 9112 §3.2) into the path and the host to route on.

    Origin-form (``/p?q``) takes its host from ``Host``. Absolute-form
    (``http://h/p``) is accepted only when its authority names the same host and port as
    ``Host`` (a missing port is the scheme's default), as HAProxy (since 2.1), Jetty 12 and
    Kestrel do: RFC 9112 §3.2.2 has a server route on the authority and ignore ``Host``, but
    the upstream, its caches and ``preserve_host`` see ``Host``, so two hosts in one request
    would let one be checked and the other served. Without a ``Host`` (HTTP/1.0) the
    authority is the host. Userinfo in the authority is refused (RFC 9110 §4.2.4). Every
    other form (``*``, ``host:443``, other schemes) raises ``InvalidPath``; an invalid
    ``Host`` raises ``BadRequest``.
    """
    host = valid_host(host_header)
    if raw_target.startswith("/"):
        return RequestTarget(raw_target.partition("?")[0], host)
    scheme, sep, rest = raw_target.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in _DEFAULT_PORTS:
        raise InvalidPath("The request target is not a path.")
    end = min((i for i in (rest.find(c) for c in "/?#") if i != -1), default=len(rest))
    authority, remainder = rest[:end], rest[end:]
    if "@" in authority:
        raise BadRequest("The request target holds userinfo.")
    try:
        authority_host = valid_host(authority)
    except BadRequest:
        raise BadRequest("The request target's authority is not valid.") from None
    if authority_host is None:
        raise InvalidPath("The request target has no authority.")
    if host is not None and _host_and_port(host, scheme) != _host_and_port(authority, scheme):
        raise BadRequest("The request target's authority differs from the Host header.")
    path = remainder.partition("?")[0] if remainder.startswith("/") else "/"
    return RequestTarget(path, host if host is not None else authority_host)


def _host_and_port(value: str, scheme: str) -> tuple[str | None, int]:
    found = _HOST.fullmatch(value)
    port = found["port"] if found is not None else None
    return normalize_host(value), int(port) if port else _DEFAULT_PORTS[scheme]


def _route_segments(route: RouteSettings) -> tuple[str, ...]:
    """The route's prefix as a tuple of canonical segments (``()`` for ``/``)."""
    try:
        path = canonical_path(route.path)
    except InvalidPath:
        raise ValueError(f"route {route.name!r}: path {route.path!r} is not valid") from None
    return tuple(s for s in path.split("/") if s)


@dataclass(frozen=True)
class _Entry:
    route: RouteSettings
    segments: tuple[str, ...]
    methods: frozenset[str] | None
    order: int


class _Tier:
    """The routes of one host (or of no host), indexed by prefix segments."""

    def __init__(self, entries: list[_Entry]) -> None:
        self.by_prefix: dict[tuple[str, ...], list[_Entry]] = {}
        for entry in sorted(entries, key=lambda e: e.order):
            self.by_prefix.setdefault(entry.segments, []).append(entry)
        # The same routes keyed by their segments' names (see ``segment_name``); on a clash
        # the prefix declared first keeps the name.
        self.by_name: dict[tuple[str, ...], list[_Entry]] = {}
        for prefix, group in self.by_prefix.items():
            self.by_name.setdefault(tuple(segment_name(s) for s in prefix), group)
        self.depths = sorted({len(k) for k in self.by_prefix}, reverse=True)

    def longest(self, segments: list[str], names: list[str]) -> list[_Entry] | None:
        """Routes of the longest prefix matching ``segments``.

        A segment matches a route segment exactly or by its name (``segment_name``), so
        ``/admin;x``, ``/admin.``, ``/admin%20`` and ``/ａｄｍｉｎ`` fall under ``/admin``'s
        policy: some upstream reads each of them as ``/admin``.
        """
        for depth in self.depths:
            if depth > len(names) or (depth and not segments[depth - 1]):
                continue  # the trailing "" of "/api/" is not a segment to match
            entries = self.by_prefix.get(tuple(segments[:depth]))
            if entries is None:
                entries = self.by_name.get(tuple(names[:depth]))
            if entries is not None:
                return entries
        return None


def segment_name(segment: str) -> str:
    """What some upstream may take a canonical segment for: the name it routes on.

    Parameters dropped (Tomcat and Jetty ignore ``;x``), trailing dots and spaces trimmed
    (Windows and IIS do), compatibility characters folded (NFKC: ``ａｄｍｉｎ`` is ``admin``
    to an upstream that normalizes), anything after an encoded ``?`` or ``#`` dropped (an
    upstream that decodes and parses again). Case is kept: routes are case-sensitive, like nginx's
    prefix locations; a case-insensitive upstream needs a catch-all route with the policy of
    its strictest prefix, or distinct prefixes in every case it accepts.
    """
    name = segment.split(";", 1)[0]
    if "%" in name:
        name = unicodedata.normalize("NFKC", urllib.parse.unquote(name, errors="replace"))
        # An upstream that parses the decoded path again ends it at "?" or "#".
        name = _QUERY_OR_FRAGMENT.split(name, 1)[0]
    return name.rstrip(". ")


class RouteTable:
    """Routes in match order: host-specific before host-less, then longest prefix.

    Within the chosen host tier, the longest matching prefix decides; if none of its routes
    accepts the method the answer is 405 with their methods, never a shorter prefix (a
    shorter prefix may have a weaker policy for the same upstream).
    """

    def __init__(self, routes: Sequence[RouteSettings]) -> None:
        entries: dict[str | None, list[_Entry]] = {}
        ordered: list[tuple[bool, int, int, RouteSettings]] = []
        for index, route in enumerate(routes):
            segments = _route_segments(route)
            methods = None if route.methods is None else frozenset(m.upper() for m in route.methods)
            host = normalize_host(route.host)
            entries.setdefault(host, []).append(_Entry(route, segments, methods, index))
            ordered.append((host is None, -len(segments), index, route))
        self._hosts = {host: _Tier(group) for host, group in entries.items() if host}
        self._hostless = _Tier(entries.get(None, []))
        self._ordered = tuple(item[3] for item in sorted(ordered, key=lambda t: t[:3]))

    def __iter__(self) -> Iterator[RouteSettings]:
        return iter(self._ordered)

    def __len__(self) -> int:
        return len(self._ordered)

    def match(self, method: str, host: str | None, path: str) -> RouteMatch:
        """``path`` is canonical. Raises ``NotFound`` or ``MethodNotAllowed(allowed)``."""
        segments = path.split("/")[1:]
        names = [segment_name(s) for s in segments]
        tier = self._hosts.get(normalize_host(host) or "")
        found = tier.longest(segments, names) if tier is not None else None
        if found is None:
            found = self._hostless.longest(segments, names)
        if found is None:
            raise NotFound("No route matches this request.")
        method = method.upper()
        for entry in found:
            if entry.methods is None or method in entry.methods:
                return RouteMatch(entry.route, _upstream_path(entry, segments, path))
        allowed = tuple(sorted({m for entry in found for m in entry.methods or ()}))
        raise MethodNotAllowed(allowed)


def _upstream_path(entry: _Entry, segments: list[str], path: str) -> str:
    if not entry.route.strip_prefix:
        return path
    return "/" + "/".join(segments[len(entry.segments) :])


def upstream_url(base: str, upstream_path: str, query_string: str) -> yarl.URL:
    """The URL sent upstream: ``base``'s own path joined with ``upstream_path``, query as-is.

    Built with ``encoded=True`` so that nothing re-normalizes or re-encodes the path.
    ``query_string`` is the raw query (``request.rel_url.raw_query_string``), not the
    decoded one; ``base`` has no query or fragment (configuration guarantees it).
    """
    parsed = yarl.URL(base, encoded=True)  # the operator's path as written, not re-quoted
    base_path = parsed.raw_path.rstrip("/")
    url = f"{parsed.scheme}://{parsed.raw_authority}{base_path}{upstream_path}"
    if query_string:
        url += "?" + query_string
    return yarl.URL(url, encoded=True)
