"""Metrics: Prometheus counters and histograms, one registry per app (no global state).

Labels are bounded: route names come from the config, reasons from a fixed set of codes,
statuses from HTTP. Nothing client-controlled becomes a label value.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

# Label for requests handled by the gateway itself rather than a configured route.
OWN_ENDPOINT = "_gateway"
NO_ROUTE = "_none"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._request_children: dict[tuple[str, int], tuple[Any, Any]] = {}
        self._upstream_children: dict[str, Any] = {}
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
        """Count one answered request (children looked up once per route and status: label
        resolution costs more than the increment)."""
        key = (route, status)
        children = self._request_children.get(key)
        if children is None:
            children = (
                self.requests.labels(route, str(status)),
                self.request_duration.labels(route),
            )
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def upstream_done(self, route: str, seconds: float) -> None:
        child = self._upstream_children.get(route)
        if child is None:
            child = self._upstream_children[route] = self.upstream_duration.labels(route)
        child.observe(seconds)

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
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
