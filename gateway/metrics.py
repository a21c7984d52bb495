"""Metrics: Prometheus counters and histograms, one registry per app (no global state).

Labels are bounded: route names come from the config, reasons from a fixed set of codes,
statuses from HTTP. Nothing client-controlled becomes a label value.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

# Label for requests handled by the gateway itself rather than a configured route.
OWN_ENDPOINT = "_gateway"
NO_ROUTE = "_none"


FLUSH_INTERVAL = 0.5  # s a per-request observation may wait before it shows in /metrics


class _Tally:
    """Observations of one histogram child, gathered between flushes: the bucket each fell
    in and their sum. prometheus-client takes a lock per increment (three per observation);
    adding a batch into the same buckets costs that once per flush instead of per request."""

    __slots__ = ("child", "bounds", "counts", "total")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.bounds: list[float] = list(child._upper_bounds)
        self.counts = [0] * len(self.bounds)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.total += seconds

    def flush(self) -> None:
        if not any(self.counts):
            return
        buckets = self.child._buckets
        for i, count in enumerate(self.counts):
            if count:
                buckets[i].inc(count)
                self.counts[i] = 0
        self.child._sum.inc(self.total)
        self.total = 0.0


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._request_counts: dict[tuple[str, int], list[Any]] = {}  # [child, pending count]
        self._request_tallies: dict[str, _Tally] = {}
        self._upstream_tallies: dict[str, _Tally] = {}
        self._flush_scheduled = False
        self.requests = Counter(
            "gateway_requests",
            "Requests answered, by route and status.",
            ["route", "status"],
            registry=self.registry,
        )
        self.request_duration = Histogram(
            "gateway_request_duration_seconds",
            "Time to response headers, by route.",
            ["route"],
            registry=self.registry,
        )
        self.auth_failures = Counter(
            "gateway_auth_failures",
            "Refused credentials and policy denials, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.upstream_duration = Histogram(
            "gateway_upstream_duration_seconds",
            "Upstream time to response headers, by route.",
            ["route"],
            registry=self.registry,
        )
        self.upstream_errors = Counter(
            "gateway_upstream_errors",
            "Upstream failures (502/504), by route and kind.",
            ["route", "kind"],
            registry=self.registry,
        )

        self.db_pool = Gauge(
            "gateway_db_pool_connections",
            "Account database connections: open, in_use, and the pool's max (summed over workers).",
            ["state"],
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.jwks_fetches = Counter(
            "gateway_jwks_fetches",
            "External issuers' key-set fetches, by issuer, reason (prefetch, expired,"
            " unknown_kid) and outcome (ok, error).",
            ["issuer", "reason", "outcome"],
            registry=self.registry,
        )
        self.jwks_fetch_duration = Histogram(
            "gateway_jwks_fetch_duration_seconds",
            "Time to fetch an external issuer's key set (discovery included), by issuer.",
            ["issuer"],
            registry=self.registry,
        )
        self.jwks_keys = Gauge(
            "gateway_jwks_keys",
            "Keys cached for each external issuer (0 until the first successful fetch).",
            ["issuer"],
            registry=self.registry,
            multiprocess_mode="max",  # workers each hold a copy; any one of them tells
        )

    def request_done(self, route: str, status: int, seconds: float) -> None:
        """Count one answered request. Kept in the process until the next flush (at most
        ``FLUSH_INTERVAL`` later, and before every render)."""
        key = (route, status)
        count = self._request_counts.get(key)
        if count is None:
            count = self._request_counts[key] = [self.requests.labels(route, str(status)), 0]
        count[1] += 1
        tally = self._request_tallies.get(route)
        if tally is None:
            tally = self._request_tallies[route] = _Tally(self.request_duration.labels(route))
        tally.observe(seconds)
        if not self._flush_scheduled:
            self._schedule_flush()

    def upstream_done(self, route: str, seconds: float) -> None:
        tally = self._upstream_tallies.get(route)
        if tally is None:
            tally = self._upstream_tallies[route] = _Tally(self.upstream_duration.labels(route))
        tally.observe(seconds)
        if not self._flush_scheduled:
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()  # no loop to wait on: now
            return
        self._flush_scheduled = True
        loop.call_later(FLUSH_INTERVAL, self.flush)

    def flush(self) -> None:
        """Add what was gathered since the last flush to the registry's metrics."""
        self._flush_scheduled = False
        for count in self._request_counts.values():
            if count[1]:
                count[0].inc(count[1])
                count[1] = 0
        for tally in (*self._request_tallies.values(), *self._upstream_tallies.values()):
            tally.flush()

    def database_pool(self, usage: Mapping[str, int]) -> None:
        for state in ("open", "in_use", "max"):
            self.db_pool.labels(state).set(usage.get(state, 0))

    def jwks_fetched(
        self, issuer: str, reason: str, outcome: str, seconds: float, keys: int | None
    ) -> None:
        """A ``FetchObserver`` for ``gateway.issuers``; issuer names come from the config."""
        self.jwks_fetches.labels(issuer, reason, outcome).inc()
        self.jwks_fetch_duration.labels(issuer).observe(seconds)
        self.jwks_keys.labels(issuer).set(keys or 0)

    def render(self) -> tuple[bytes, str]:
        """The exposition text (call ``flush`` first, on the event loop, to include what is
        pending: render may run in a thread)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
