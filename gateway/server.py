"""The HTTP/1.1 edge: how bytes on a socket become requests, and when the gateway hangs up.

Guarantees:

- every request the parser refuses (malformed framing, smuggling attempts, bare LF, obs-fold,
  NUL/CR in a value, a space before the colon...) is answered ``400`` — ``431`` when the head
  is larger than the limits — as ``application/problem+json``, and the connection is closed, so
  nothing after the refused bytes is ever read as a request; the refusal echoes none of them;
- a request is framed one way only: a ``Transfer-Encoding`` other than exactly ``chunked``
  (any case), or any ``Transfer-Encoding`` on an HTTP/1.0 request (RFC 9112 §6.1), is ``400``
  and closes the connection; versions other than HTTP/1.0 and 1.1 are ``400``;
- a request head must arrive whole within ``header_timeout`` of its first byte (of the
  connection opening, for the first request): slowloris gets ``408`` and is cut;
- a request body the gateway is reading must keep moving: a silence over ``body_idle_timeout``,
  or an average under ``body_min_rate`` once ``body_grace`` has passed, gets ``408`` (if no
  response has started) and the connection is cut — time the gateway itself holds the client
  back (flow control toward a slow upstream) is never counted against it;
- an idle keep-alive connection is closed after ``keepalive_timeout``;
- at most ``max_connections`` connections are open per process; one more is answered ``503``
  and closed at once, so the open ones keep being served;
- all of it costs the hot path one clock read per ``data_received`` and no task or timer per
  request: one timer per connection, rescheduled lazily, watches every deadline.

The limits are module constants gathered in :class:`Limits`; tests inject short ones.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.http import HttpVersion10, HttpVersion11
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from gateway import headers as hdr
from gateway.errors import (
    BadRequest,
    GatewayError,
    GatewayTimeout,
    Overloaded,
    RequestHeaderFieldsTooLarge,
    RequestTimeout,
)
from gateway.middleware import problem_response

__all__ = [
    "GatewayRunner",
    "GatewayServer",
    "Limits",
]

log = logging.getLogger("gateway")

HEADER_TIMEOUT = 10.0  # s from a head's first byte to its end (nginx client_header_timeout: 60)
BODY_IDLE_TIMEOUT = 20.0  # s a body being read may stay silent
BODY_GRACE = 20.0  # s before the minimum rate applies (mod_reqtimeout body=20,MinRate=...)
BODY_MIN_RATE = 1024.0  # bytes/s a body must average after the grace
KEEPALIVE_TIMEOUT = 30.0  # s an idle keep-alive connection stays open
LINGERING_TIME = 2.0  # s spent draining an unread body after a response, so the client sees it
MAX_CONNECTIONS = 10_000  # per process; beyond it new connections get 503 and are closed
MAX_LINE_SIZE = 16 * 1024  # bytes of request line
MAX_FIELD_SIZE = 16 * 1024  # bytes of one header field (name + value)
MAX_HEADERS = 100  # header fields per request


@dataclass(frozen=True)
class Limits:
    """How long and how much a client may take; the defaults are the module constants."""

    header_timeout: float = HEADER_TIMEOUT
    body_idle_timeout: float = BODY_IDLE_TIMEOUT
    body_grace: float = BODY_GRACE
    body_min_rate: float = BODY_MIN_RATE
    keepalive_timeout: float = KEEPALIVE_TIMEOUT
    lingering_time: float = LINGERING_TIME
    max_connections: int = MAX_CONNECTIONS
    max_line_size: int = MAX_LINE_SIZE
    max_field_size: int = MAX_FIELD_SIZE
    max_headers: int = MAX_HEADERS

    def __post_init__(self) -> None:
        for name in ("header_timeout", "body_idle_timeout", "keepalive_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")

    def handler_args(self) -> dict[str, Any]:
        """The part aiohttp's own ``RequestHandler`` enforces (``Application(handler_args=)``)."""
        return {
            "keepalive_timeout": self.keepalive_timeout,
            "lingering_time": self.lingering_time,
            "max_line_size": self.max_line_size,
            "max_field_size": self.max_field_size,
            "max_headers": self.max_headers,
        }


DEFAULT_LIMITS = Limits()

MALFORMED = "The request is not well-formed HTTP/1.1."
HEAD_TOO_LARGE = "The request line or header fields are larger than the gateway accepts."


def _closing(err: GatewayError) -> web.Response:
    response = problem_response(err)
    response.headers["X-Request-Id"] = hdr.request_id(None)
    response.force_close()
    return response


def raw_problem(err: GatewayError) -> bytes:
    """``err`` as a complete HTTP/1.1 response that closes the connection, for the moments
    there is no request object to answer through (a timeout, a refused connection)."""
    response = problem_response(err)
    body = response.body
    if not isinstance(body, bytes):
        raise TypeError("problem_response renders a bytes body")
    lines = [f"HTTP/1.1 {err.status} {HTTPStatus(err.status).phrase}"]
    lines += [f"{name}: {value}" for name, value in response.headers.items()]
    lines += [
        f"Content-Length: {len(body)}",
        f"X-Request-Id: {hdr.request_id(None)}",
        "Connection: close",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def parser_error(status: int, exc: BaseException | None) -> GatewayError:
    """What to tell a client whose request the parser (or aiohttp around it) refused.

    The detail is fixed: aiohttp's message quotes the offending bytes, which are the client's
    own and may hold anything."""
    if status == 400:
        if isinstance(exc, LineTooLong) or "Too many headers" in str(exc):
            return RequestHeaderFieldsTooLarge(HEAD_TOO_LARGE)
        return BadRequest(MALFORMED)
    if status == 504:
        return GatewayTimeout("The request took too long to handle.")
    return GatewayError("The gateway failed to handle the request.")


def framing_problem(request: BaseRequest) -> str | None:
    """Why ``request``'s framing is refused even though llhttp parsed it, or None.

    One reading of the body for every hop: only ``chunked`` is understood (RFC 9112 §6.1), and
    an HTTP/1.0 message with ``Transfer-Encoding`` has faulty framing by definition."""
    version = request.version
    if version != HttpVersion11 and version != HttpVersion10:
        return "Only HTTP/1.0 and HTTP/1.1 are served."
    codings = request.headers.getall("Transfer-Encoding", ())
    if not codings:
        return None
    if version == HttpVersion10:
        return "Transfer-Encoding is not allowed in an HTTP/1.0 request."
    if [c.strip(" \t").lower() for c in ",".join(codings).split(",")] != ["chunked"]:
        return "The only transfer coding accepted is chunked."
    return None


class GatewayProtocol(RequestHandler):
    """aiohttp's HTTP/1.1 connection, with deadlines on heads and bodies and problem+json
    refusals. Deadlines are timestamps checked by one lazily rescheduled timer."""

    __slots__ = (
        "_limits",
        "_gateway",
        "_watch",
        "_head_started",
        "_body",
        "_body_started",
        "_body_bytes",
        "_last_read",
        "_paused_at",
        "_draining",
    )

    def __init__(self, manager: GatewayServer, *, limits: Limits, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._limits = limits
        self._gateway = manager
        self._watch: asyncio.TimerHandle | None = None
        self._head_started: float | None = None
        self._body: Any = None  # the StreamReader of a body being received
        self._body_started = 0.0
        self._body_bytes = 0
        self._last_read = 0.0
        self._paused_at: float | None = None
        self._draining = False

    # -- connection life -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._gateway.admit():
            self._refuse(transport)
            return
        super().connection_made(transport)
        now = self._loop.time()
        self._head_started = now
        self._last_read = now
        self._arm(now + self._limits.header_timeout)

    def _refuse(self, transport: asyncio.BaseTransport) -> None:
        # Never registered with the server: connection_lost must not unregister it.
        self._manager = None
        if isinstance(transport, asyncio.WriteTransport):
            transport.write(raw_problem(TOO_MANY_CONNECTIONS))
        transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        self._body = None
        super().connection_lost(exc)

    # -- reading ---------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._draining:
            return
        now = self._loop.time()
        self._last_read = now
        waiter = self._waiter
        if self._head_started is None and waiter is not None and not waiter.done():
            # Idle between requests (start() waits for a message): these bytes begin a head.
            self._head_started = now
        elif self._body is not None:
            self._body_bytes += len(data)
        queued = len(self._messages)
        super().data_received(data)
        if len(self._messages) > queued or self._payload_parser is not None:
            self._head_started = None
            payload = self._messages[-1][1] if self._messages else None
            if payload is not None and not payload.is_eof():
                self._body, self._body_started, self._body_bytes = payload, now, 0
                self._arm(now + self._limits.body_idle_timeout)
        elif self._head_started is not None:
            self._arm(self._head_started + self._limits.header_timeout)

    def pause_reading(self) -> None:
        # The gateway holds the client back (its body buffer is full): not the client's delay.
        if self._paused_at is None:
            self._paused_at = self._loop.time()
        super().pause_reading()

    def resume_reading(self, resume_parser: bool = True) -> None:
        if self._paused_at is not None:
            now = self._loop.time()
            self._body_started += now - self._paused_at
            self._last_read = now
            self._paused_at = None
        super().resume_reading(resume_parser)

    # -- deadlines -------------------------------------------------------------------

    def _arm(self, when: float) -> None:
        """Make sure the watch fires no later than ``when`` (a handle firing early just
        reschedules itself, so an earlier pending one is kept)."""
        watch = self._watch
        if watch is not None:
            if watch.when() <= when:
                return
            watch.cancel()
        self._watch = self._loop.call_at(when, self._on_watch)

    def _on_watch(self) -> None:
        self._watch = None
        if self.transport is None or self._force_close or self._draining:
            return
        now = self._loop.time()
        due: float | None = None
        if self._head_started is not None:
            deadline = self._head_started + self._limits.header_timeout
            if now >= deadline:
                self._expire("request head")
                return
            due = deadline
        body_due = self._body_deadline(now)
        if body_due is not None:
            if now >= body_due:
                self._expire("request body")
                return
            due = body_due if due is None else min(due, body_due)
        if due is not None:
            self._watch = self._loop.call_at(due, self._on_watch)

    def _body_deadline(self, now: float) -> float | None:
        body = self._body
        if body is None or body.is_eof() or body.exception() is not None:
            self._body = None
            return None
        if self._paused_at is not None or self._buffer_paused:
            return now + self._limits.body_idle_timeout  # held back by us: look again later
        limits = self._limits
        idle = self._last_read + limits.body_idle_timeout
        if limits.body_min_rate <= 0:
            return idle
        slow = self._body_started + limits.body_grace + self._body_bytes / limits.body_min_rate
        return min(idle, slow)

    def _expire(self, what: str) -> None:
        log.info("closing a connection from %s: %s too slow", _peer(self.peername), what)
        transport = self.transport
        request = self._current_request
        self._body = None
        if transport is None:
            return
        if request is None or request.writer.output_size == 0:
            transport.write(raw_problem(RequestTimeout(f"The {what} arrived too slowly.")))
        if request is None and transport.can_write_eof():
            # No handler is running: half-close so the 408 is read before the socket goes
            # (closing on unread input sends a RST that can destroy it), discard what still
            # comes, and close for good shortly after.
            transport.write_eof()
            self._draining = True
            self._loop.call_later(min(self._limits.lingering_time, 1.0), self.force_close)
        else:
            self.force_close()

    # -- refusals --------------------------------------------------------------------

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's parser refusals and last-resort errors, as problem+json; never the
        client's bytes, never a traceback."""
        if request.writer.output_size > 0:
            raise ConnectionError("a response is already under way")
        if isinstance(exc, ConnectionError):
            # The client went away (or was cut for being too slow) mid-request: nobody is
            # left to answer, and it is no error of ours.
            log.info("connection from %s lost mid-request", request.remote)
            return _closing(parser_error(400, exc))
        err = parser_error(status, exc)
        if err.status >= 500:
            log.error("error handling a request from %s", request.remote, exc_info=exc)
        else:
            log.info("refused a malformed request from %s: %s", request.remote, type(exc).__name__)
        return _closing(err)


def _peer(peername: Any) -> str:
    return str(peername[0]) if isinstance(peername, tuple) and peername else "?"


TOO_MANY_CONNECTIONS = Overloaded(1, "The gateway has too many open connections.")


class GatewayServer(web.Server):
    """``web.Server`` speaking through :class:`GatewayProtocol`, with a connection cap and a
    framing check in front of the application's handler."""

    def __init__(self, handler: Any, *, limits: Limits = DEFAULT_LIMITS, **kwargs: Any) -> None:
        super().__init__(self._guard(handler), **kwargs)
        self.limits = limits
        self.open_connections = 0

    @staticmethod
    def _guard(handler: Any) -> Any:
        async def guarded(request: BaseRequest) -> web.StreamResponse:
            # The common request (HTTP/1.1, no Transfer-Encoding) pays two lookups.
            if request.version != HttpVersion11 or "Transfer-Encoding" in request.headers:
                problem = framing_problem(request)
                if problem is not None:
                    log.info("refused a request from %s: %s", request.remote, problem)
                    return _closing(BadRequest(problem))
            response: web.StreamResponse = await handler(request)
            return response

        return guarded

    def admit(self) -> bool:
        return self.open_connections < self.limits.max_connections

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        self.open_connections += 1
        super().connection_made(handler, transport)

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        self.open_connections -= 1
        super().connection_lost(handler, exc)

    def __call__(self) -> GatewayProtocol:
        kwargs = {**self._kwargs, **self.limits.handler_args()}
        return GatewayProtocol(self, loop=self._loop, limits=self.limits, **kwargs)


class GatewayRunner(web.AppRunner):
    """``web.AppRunner`` whose server is a :class:`GatewayServer` (startup, cleanup_ctx and
    graceful shutdown are AppRunner's own)."""

    def __init__(
        self, app: web.Application, *, limits: Limits = DEFAULT_LIMITS, **kwargs: Any
    ) -> None:
        super().__init__(app, **kwargs)
        self.limits = limits

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # runs the app's startup and freezes it
        return GatewayServer(
            plain.request_handler,
            request_factory=plain.request_factory,
            limits=self.limits,
            loop=asyncio.get_running_loop(),
            **plain._kwargs,
        )
