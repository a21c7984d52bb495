"""Forwarding: one request to one upstream, streamed both ways, bounded in size and time.

Guarantees (CONTRACT §6):

- the path goes upstream exactly as given (``upstream_url`` builds it with ``encoded=True``)
  and the query byte for byte as the client sent it;
- bodies are streamed chunk by chunk in both directions, never buffered whole; a request body
  over ``max_body_size`` is 413, before connecting when ``Content-Length`` says so, mid-stream
  otherwise (chunked bodies included);
- an upstream that refuses, resets or does not answer HTTP is 502; one that stays silent for
  ``route.timeout`` (to its response headers, or between two reads of its body) is 504; one
  request waiting never blocks another;
- an upstream that dies after the response headers went out cuts the client's connection, so
  the client sees a truncated body rather than a complete-looking one;
- every upstream connection is released or closed, whatever happens;
- redirects are relayed, never followed; the client's cookies never enter a cookie jar; the
  client library adds no ``User-Agent``, ``Accept``, ``Accept-Encoding`` or ``Content-Type``
  the client did not send, and bodies are relayed still encoded.

The caller has matched the route, computed the canonical ``upstream_path`` and built the final
request headers (``gateway.headers``); the Forwarder adds only ``Host`` and body framing.

Plain HTTP goes through ``gateway.upstream``'s keep-alive pool (about half the CPU of aiohttp's
``ClientSession`` per request); websockets go through a ``ClientSession`` kept for them only.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass

import aiohttp
import yarl
from aiohttp import WSMsgType, web
from multidict import CIMultiDict

from gateway.config import RouteSettings
from gateway.errors import BadGateway, BadRequest, GatewayTimeout, PayloadTooLarge
from gateway.headers import clean_response_headers
from gateway.routing import upstream_url
from gateway.server import Exchange
from gateway.upstream import (
    BodyReader,
    HeadItem,
    Origin,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
)

__all__ = ["Forwarder", "is_websocket_upgrade"]

log = logging.getLogger(__name__)

# Headers aiohttp's client would invent; the upstream should see only what the client sent.
_SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")

# Close codes that must never be sent in a close frame (RFC 6455 §7.4.1).
_UNSENDABLE_CLOSE_CODES = frozenset({1004, 1005, 1006, 1015})

_WS_CLOSE_TIMEOUT = 5.0

# What a failed upstream exchange raises (websockets: aiohttp's errors; HTTP: the pool's).
_UPSTREAM_FAILURES = (aiohttp.ClientError, UpstreamError, OSError, TimeoutError)


@dataclass
class _Upload:
    """What happened to the request body while the pool's writer task streamed it."""

    too_large: bool = False
    client_failed: bool = False
    answered: bool = False  # the response head arrived: the deadline is no longer ours to move


def is_websocket_upgrade(request: web.BaseRequest | Exchange) -> bool:
    """True for a websocket opening handshake (RFC 6455 §4.1)."""
    connection = {
        t.strip().lower() for v in request.headers.getall("Connection", ()) for t in v.split(",")
    }
    return (
        request.method == "GET"
        and "upgrade" in connection
        and request.headers.get("Upgrade", "").lower() == "websocket"
    )


def _raw_query(target: str) -> str:
    # ``request.query_string`` is percent-decoded; the upstream must get the client's bytes.
    query = target.partition("?")[2]
    return query.partition("#")[0]


def _sendable_close_code(code: int | None) -> int:
    if code is None or code == 1005:
        return 1000  # a close without a status is a normal close
    if code in _UNSENDABLE_CLOSE_CODES or not (1000 <= code <= 4999):
        return 1011
    return code


def _close_reason(reason: str) -> bytes:
    # A close frame's reason is at most 123 bytes of valid UTF-8 (RFC 6455 §5.5.1).
    return reason.encode()[:123].decode("utf-8", "ignore").encode()


def _target(base_path: str, upstream_path: str, query: str) -> str:
    """The request target ``routing.upstream_url`` would give, without building a URL."""
    path = base_path + upstream_path or "/"
    return f"{path}?{query}" if query else path


class Forwarder:
    """Streams requests to upstreams over one connection pool for the app's life (and one
    ``ClientSession`` for websockets)."""

    def __init__(
        self,
        *,
        max_body_size: int,
        connect_timeout: float = 5.0,
        pool_limit: int = 0,
        keepalive_timeout: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.max_body_size = max_body_size
        self.connect_timeout = connect_timeout
        self._pool_limit = pool_limit  # 0: unbounded; each route is bounded by its timeout
        self._keepalive_timeout = keepalive_timeout
        self._ssl_context = ssl_context
        self._session: aiohttp.ClientSession | None = None
        self._pool: UpstreamPool | None = None
        self._origins: dict[str, tuple[Origin, str]] = {}
        self._turns: dict[str, int] = {}

    async def start(self) -> None:
        if self._session is not None:
            return
        self._pool = UpstreamPool(
            connect_timeout=self.connect_timeout,
            keepalive_timeout=self._keepalive_timeout,
            ssl_context=self._ssl_context,
        )
        connector = aiohttp.TCPConnector(
            limit=self._pool_limit,
            limit_per_host=0,
            keepalive_timeout=self._keepalive_timeout,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=_SKIP_AUTO_HEADERS,
            timeout=aiohttp.ClientTimeout(total=None),
            trust_env=False,
        )

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("Forwarder.start() was not awaited")
        return self._session

    @property
    def pool(self) -> UpstreamPool:
        if self._pool is None:
            raise RuntimeError("Forwarder.start() was not awaited")
        return self._pool

    def _origin(self, base: str) -> tuple[Origin, str]:
        """The upstream base URL's origin and path, parsed once per base."""
        known = self._origins.get(base)
        if known is None:
            parsed = yarl.URL(base, encoded=True)  # the operator's path as written
            known = (Origin.of(parsed), parsed.raw_path.rstrip("/"))
            self._origins[base] = known
        return known

    def pick_upstream(self, route: RouteSettings) -> str:
        """The route's next upstream base URL, round-robin (per route, per process)."""
        turn = self._turns.get(route.name, 0)
        self._turns[route.name] = turn + 1
        return route.upstreams[turn % len(route.upstreams)]

    @staticmethod
    def _set_host(
        headers: CIMultiDict[str], request: web.BaseRequest, route: RouteSettings
    ) -> None:
        headers.popall("Host", None)
        client_host = request.headers.get("Host")
        if route.preserve_host and client_host:
            headers["Host"] = client_host
        # Otherwise aiohttp writes the upstream URL's host[:port].

    def _body(
        self, exchange: Exchange, upload: _Upload, progress: asyncio.Timeout, window: float
    ) -> BodyReader:
        loop = asyncio.get_running_loop()
        sent = 0

        async def read() -> bytes:
            nonlocal sent
            if sent and not upload.answered:
                # The upstream took the last chunk: the request is moving, push the deadline.
                progress.reschedule(loop.time() + window)
            try:
                chunk = await exchange.body.readany()
            except Exception:
                upload.client_failed = True
                raise
            sent += len(chunk)
            if sent > self.max_body_size:
                upload.too_large = True
                raise PayloadTooLarge()
            return chunk

        return read

    async def forward(
        self,
        exchange: Exchange,
        *,
        route: RouteSettings,
        upstream_path: str,
        headers: list[HeadItem] | CIMultiDict[str],
    ) -> None:
        """Send ``exchange``'s request to the route's next upstream and stream its answer back.

        ``headers`` are the final upstream headers (cleaned, identity, forwarded, request id):
        the gateway's head lines (``serialize_head``), or text.
        Raises ``PayloadTooLarge`` (413), ``BadGateway`` (502) or ``GatewayTimeout`` (504)
        while no response has been started; after that, failures cut the connection.
        """
        length = exchange.content_length
        if length is not None and length > self.max_body_size:
            raise PayloadTooLarge(f"The request body exceeds {self.max_body_size} bytes.")
        origin, base_path = self._origin(self.pick_upstream(route))
        target = _target(base_path, upstream_path, _raw_query(exchange.target))
        host = (exchange.headers.get("Host") or None) if route.preserve_host else None
        if exchange.has_body:
            upload = _Upload()
            try:
                upstream = await self._send_with_body(
                    exchange, route, upload, origin, target, headers, host, length
                )
            except Exception as exc:
                if upload.too_large or upload.client_failed or isinstance(exc, _UPSTREAM_FAILURES):
                    raise self._translate(exc, upload, route) from exc
                raise
            upload.answered = True
        else:
            try:
                # Bounded without a timer of its own: the pool's connect timeout, then its
                # read timeout from the moment the request is sent.
                upstream = await self.pool.request(
                    origin, exchange.method, target, headers, host=host, read_timeout=route.timeout
                )
            except _UPSTREAM_FAILURES as exc:
                raise self._translate(exc, None, route) from exc
        try:
            fields = clean_response_headers(upstream.fields)
            whole = upstream.arrived_whole()
            if whole is not None:
                # The whole answer is already here: head and body go out in one write.
                # Nothing waited for it, so this is still streaming, not buffering.
                exchange.send_head(upstream.status, upstream.reason, fields, whole=whole)
            else:
                exchange.send_head(upstream.status, upstream.reason, fields)
                await self._relay_body(exchange, upstream)
        finally:
            upstream.release()

    async def _send_with_body(
        self,
        exchange: Exchange,
        route: RouteSettings,
        upload: _Upload,
        origin: Origin,
        target: str,
        headers: list[HeadItem] | CIMultiDict[str],
        host: str | None,
        length: int | None,
    ) -> UpstreamResponse:
        # Deadline for the upstream's response headers; the body stream moves it on. The
        # pool's read timeout bounds the wait for them once the body is sent.
        async with asyncio.timeout(route.timeout + self.connect_timeout) as progress:
            return await self.pool.request(
                origin,
                exchange.method,
                target,
                headers,
                host=host or None,
                body=self._body(exchange, upload, progress, route.timeout),
                length=length,
                read_timeout=route.timeout,
            )

    def _translate(
        self, exc: BaseException, upload: _Upload | None, route: RouteSettings
    ) -> Exception:
        if upload is not None and upload.too_large:
            return PayloadTooLarge(f"The request body exceeds {self.max_body_size} bytes.")
        if upload is not None and upload.client_failed:
            return BadRequest("The request body could not be read.")
        if isinstance(exc, TimeoutError):
            log.info("upstream of route %s timed out", route.name)
            return GatewayTimeout("The upstream service did not answer in time.")
        log.info("upstream of route %s failed: %s", route.name, type(exc).__name__)
        return BadGateway("The upstream service is unreachable or answered badly.")

    async def _relay_body(self, exchange: Exchange, upstream: UpstreamResponse) -> None:
        try:
            while True:
                try:
                    chunk = await upstream.read()
                except (UpstreamError, OSError, TimeoutError) as exc:
                    # Headers are out: the status cannot change. Cutting the connection is the
                    # only way to tell the client the body is incomplete.
                    log.info("upstream failed mid-response: %s", type(exc).__name__)
                    upstream.close()
                    exchange.abort()
                    return
                if not chunk:
                    break
                if upstream.at_eof():
                    exchange.send_end(chunk)  # the last piece: one write, not two
                    return
                await exchange.send(chunk)
            exchange.send_end()
        except ConnectionError:
            upstream.close()  # the client went away: the rest of the upstream body is moot
            exchange.abort()

    async def forward_websocket(
        self,
        request: web.BaseRequest,
        *,
        route: RouteSettings,
        upstream_path: str,
        headers: CIMultiDict[str],
    ) -> web.WebSocketResponse:
        """Open the upstream websocket first (502/504 if it fails), then accept the client's and
        relay text, binary and close frames both ways until either side closes."""
        base = upstream_url(self.pick_upstream(route), upstream_path, _raw_query(request.raw_path))
        url = base.with_scheme("wss" if base.scheme == "https" else "ws")
        out = CIMultiDict(headers)
        self._set_host(out, request, route)
        protocols = tuple(
            p.strip()
            for v in request.headers.getall("Sec-WebSocket-Protocol", ())
            for p in v.split(",")
            if p.strip()
        )
        try:
            async with asyncio.timeout(route.timeout + self.connect_timeout):
                upstream = await self.session.ws_connect(
                    url,
                    headers=out,
                    protocols=protocols,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=_WS_CLOSE_TIMEOUT),
                    max_msg_size=self.max_body_size,
                    compress=0,
                    autoclose=False,
                )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise self._translate(exc, _Upload(), route) from exc
        try:
            client = web.WebSocketResponse(
                protocols=(upstream.protocol,) if upstream.protocol else (),
                max_msg_size=self.max_body_size,
                timeout=_WS_CLOSE_TIMEOUT,
                autoclose=False,
            )
            await client.prepare(request)
            await self._pump_both(client, upstream)
            return client
        finally:
            if not upstream.closed:
                await upstream.close()

    async def _pump_both(
        self, client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse
    ) -> None:
        # autoclose is off on both sides: a close is relayed to the other side first, and only
        # then answered, so the closing side never goes away before its code was passed on.
        to_upstream = asyncio.create_task(_pump(client, upstream))
        to_client = asyncio.create_task(_pump(upstream, client))
        try:
            done, pending = await asyncio.wait(
                {to_upstream, to_client}, return_when=asyncio.FIRST_COMPLETED
            )
            first = done.pop()
            code, reason = first.result()
            source: _Socket = client if first is to_upstream else upstream
            other: _Socket = upstream if first is to_upstream else client
            await _close_quietly(other, code, reason)
            await _close_quietly(source, code, "")
            # The other pump sees its socket closing and returns; never wait on it forever.
            await asyncio.wait(pending, timeout=_WS_CLOSE_TIMEOUT)
        finally:
            for task in (to_upstream, to_client):
                task.cancel()
            await asyncio.gather(to_upstream, to_client, return_exceptions=True)


_Socket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


async def _close_quietly(sock: _Socket, code: int | None, reason: str) -> None:
    try:
        await sock.close(code=_sendable_close_code(code), message=_close_reason(reason))
    except (ConnectionError, TimeoutError):
        pass  # the peer is already gone: nothing left to tell it


async def _pump(source: _Socket, sink: _Socket) -> tuple[int | None, str]:
    """Relay messages from ``source`` to ``sink``; return how ``source`` closed."""
    while True:
        msg = await source.receive()
        try:
            if msg.type is WSMsgType.TEXT:
                await sink.send_str(msg.data)
            elif msg.type is WSMsgType.BINARY:
                await sink.send_bytes(msg.data)
            elif msg.type is WSMsgType.CLOSE:
                return msg.data, msg.extra or ""
            elif msg.type is WSMsgType.ERROR:
                return 1011, ""
            elif msg.type in (WSMsgType.CLOSING, WSMsgType.CLOSED):
                return source.close_code, ""
        except ConnectionError:
            return 1001, ""  # the sink is gone
