"""Routing: one canonical path per request, and the route table that matches it.

Guarantee: the path a policy is evaluated on is exactly the path sent upstream. The
canonical path is computed once from the raw (still percent-encoded) request target and is
never decoded again: routing and forwarding both use it. The canonical form itself is
defined in ``gateway.paths``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import yarl

from gateway.config import RouteSettings
from gateway.errors import InvalidPath, MethodNotAllowed, NotFound
from gateway.paths import canonical_path

__all__ = ["canonical_path", "RouteMatch", "RouteTable", "upstream_url", "normalize_host"]


@dataclass(frozen=True)
class RouteMatch:
    route: RouteSettings
    # The canonical path with the prefix removed when ``strip_prefix`` ("/" for the bare
    # prefix); still percent-encoded; does not include the upstream URL's own path.
    upstream_path: str


def normalize_host(host: str | None) -> str | None:
    """Host as routes compare it: lower-case, without port and one trailing dot."""
    if not host:
        return None
    host = host.strip().lower()
    if host.startswith("["):  # IPv6 literal, maybe with a port after "]"
        end = host.find("]")
        host = host[: end + 1] if end != -1 else host
    else:
        host = host.rsplit(":", 1)[0] if ":" in host else host
    if host.endswith("."):
        host = host[:-1]
    return host or None


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
        self.depths = sorted({len(k) for k in self.by_prefix}, reverse=True)

    def longest(self, segments: list[str], names: list[str]) -> list[_Entry] | None:
        """Routes of the longest prefix matching ``segments``.

        A segment matches a route segment exactly or by its name before ``;`` parameters,
        so ``/admin;x`` falls under ``/admin``'s policy: Tomcat and Jetty drop parameters.
        """
        for depth in self.depths:
            if depth > len(names) or (depth and not names[depth - 1]):
                continue  # the trailing "" of "/api/" is not a segment to match
            entries = self.by_prefix.get(tuple(segments[:depth]))
            if entries is None and names[:depth] != segments[:depth]:
                entries = self.by_prefix.get(tuple(names[:depth]))
            if entries is not None:
                return entries
        return None


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
        names = [s.split(";", 1)[0] for s in segments]
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
