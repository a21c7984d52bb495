"""aiohttp's test server, listening through the gateway's edge rather than aiohttp's own."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestServer

from gateway.server import GatewayRunner


class EdgeTestServer(TestServer):
    """A ``TestServer`` whose runner is :class:`GatewayRunner`: requests reach the app the way
    they do in production (its ``EDGE_HANDLER``, else its router through the edge)."""

    async def _make_runner(self, **kwargs: Any) -> GatewayRunner:
        kwargs.pop("handler_cancellation", None)
        return GatewayRunner(self.app, **kwargs)
