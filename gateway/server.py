"""The HTTP/1.1 edge: how bytes on a socket become requests, and when the gateway hangs up.

Requests are parsed by httptools (llhttp, strict) on a plain asyncio protocol; each becomes an
:class:`Exchange`, which the handler answers either by writing the response itself (the
proxy's path: no request or response objects beyond the exchange) or through aiohttp's
``Request``/``Response`` built over the same connection (the gateway's own endpoints,
websockets, and any aiohttp ``Application``: :func:`application_handler`).

Guarantees:

- every request the parser refuses (malformed framing, smuggling attempts, bare LF, obs-fold,
  NUL/CR in a value, a space before the colon...) is answered ``400`` — ``431`` when the head
  is larger than the limits — as ``application/problem+json``, and the connection is closed, so
  nothing after the refused bytes is ever read as a request; the refusal echoes none of them;
- a request is framed one way only: a ``Transfer-Encoding`` other than exactly ``chunked``
  (any case), or any ``Transfer-Encoding`` on an HTTP/1.0 request (RFC 9112 §6.1), is ``400``
  and closes the connection; so are versions other than HTTP/1.0 and 1.1, an HTTP/1.1 request
  without ``Host``, two copies of a header that may appear once (``Host``, ``Content-Type``...)
  and ``CONNECT`` (no tunnels);
- ``Expect: 100-continue`` is answered when the handler starts reading the body, so a client
  refused before (401, 413) never sends it;
- a request head must arrive whole within ``header_timeout`` of its first byte (of the
  connection opening, for the first request): slowloris gets ``408`` and is cut;
- a request body the gateway is reading must keep moving: a silence over ``body_idle_timeout``,
  or an average under ``body_min_rate`` once ``body_grace`` has passed, gets ``408`` (if no
  response has started) and the connection is cut — time the gateway itself holds the client
  back (flow control toward a slow upstream) is never counted against it;
- an idle keep-alive connection is closed after ``keepalive_timeout``;
- at most ``max_connections`` connections are open per process; one more is answered ``503``
  and closed at once, so the open ones keep being served;
- pipelined requests are answered in order; while one is served, at most one more is parsed
  ahead (reading pauses until its turn);
- a response sent before its request body was whole says ``Connection: close``; the rest of
  the body is read and dropped for up to ``lingering_time``, so the client sees the response
  rather than a reset;
- at most ``intake_per_turn`` new requests are taken in per turn of the event loop; the heads
  of the others wait, read and in order, for the next turns (HAProxy's ``maxpollevents``
  idea): a worker under a crowd of connections holds a few hundred requests in flight rather
  than one per connection, each with its coroutines and upstream connection, and no request
  is refused or dropped for it (it is a rate per turn, not a cap on requests in flight, so
  long polls and streams never hold others back);
- all of it costs the hot path one clock read per ``data_received`` and no timer per request:
  one timer per connection, rescheduled lazily, watches every deadline.

The limits are module constants gathered in :class:`Limits`; tests inject short ones.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import httptools
from aiohttp import web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http import HttpVersion, HttpVersion10, HttpVersion11
from aiohttp.http_parser import RawRequestMessage
from aiohttp.http_writer import StreamWriter
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_request import BaseRequest
from yarl import URL

from gateway import headers as hdr
from gateway.errors import (
    BadRequest,
    GatewayError,
    GatewayTimeout,
    Overloaded,
    RequestHeaderFieldsTooLarge,
    RequestTimeout,
)
from gateway.fields import HeaderFields
from gateway.memo import Memo
from gateway.middleware import problem_response
from gateway.timers import no_later_than

__all__ = [
    "CLIENT_CLOSED_REQUEST",
    "ClientGone",
    "Exchange",
    "GatewayRunner",
    "GatewayServer",
    "Handler",
    "Limits",
    "application_handler",
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
MAX_HEAD_SIZE = 64 * 1024  # bytes of a whole head (the parser holds a partial field in memory)
BODY_BUFFER = 64 * 1024  # request body bytes buffered before reading pauses (twice this)
INTAKE_PER_TURN = 64  # new requests taken in per event-loop turn (HAProxy: 200 events)


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
    max_head_size: int = MAX_HEAD_SIZE
    intake_per_turn: int = INTAKE_PER_TURN

    def __post_init__(self) -> None:
        for name in ("header_timeout", "body_idle_timeout", "keepalive_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if self.intake_per_turn < 1:
            raise ValueError("intake_per_turn must be at least 1")


DEFAULT_LIMITS = Limits()

MALFORMED = "The request is not well-formed HTTP/1.1."
HEAD_TOO_LARGE = "The request line or header fields are larger than the gateway accepts."
TOO_MANY_CONNECTIONS = Overloaded(1, "The gateway has too many open connections.")


def raw_problem(err: GatewayError, request_id: str | None = None) -> bytes:
    """``err`` as a complete HTTP/1.1 response that closes the connection, for the moments
    there is no handler to answer through (a refused head, a timeout, a refused connection)."""
    response = problem_response(err)
    body = response.body
    if not isinstance(body, bytes):
        raise TypeError("problem_response renders a bytes body")
    lines = [f"HTTP/1.1 {err.status} {HTTPStatus(err.status).phrase}"]
    lines += [f"{name}: {value}" for name, value in response.headers.items()]
    lines += [
        f"Content-Length: {len(body)}",
        f"X-Request-Id: {request_id or hdr.request_id(None)}",
        "Connection: close",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def parser_error(status: int, exc: BaseException | None) -> GatewayError:
    """What to tell a client whose request the parser (or the edge around it) refused.

    The detail is fixed: a parser's message may quote the offending bytes, which are the
    client's own and may hold anything."""
    if status == 400:
        if isinstance(exc, _HeadTooLarge) or "Too many headers" in str(exc):
            return RequestHeaderFieldsTooLarge(HEAD_TOO_LARGE)
        return BadRequest(MALFORMED)
    if status == 504:
        return GatewayTimeout("The request took too long to handle.")
    return GatewayError("The gateway failed to handle the request.")


def framing_problem(version: HttpVersion, codings: Iterable[str]) -> str | None:
    """Why a request's framing is refused even though llhttp parsed it, or None.

    One reading of the body for every hop: only ``chunked`` is understood (RFC 9112 §6.1), and
    an HTTP/1.0 message with ``Transfer-Encoding`` has faulty framing by definition."""
    if version != HttpVersion11 and version != HttpVersion10:
        return "Only HTTP/1.0 and HTTP/1.1 are served."
    codings = list(codings)
    if not codings:
        return None
    if version == HttpVersion10:
        return "Transfer-Encoding is not allowed in an HTTP/1.0 request."
    if [c.strip(" \t").lower() for c in ",".join(codings).split(",")] != ["chunked"]:
        return "The only transfer coding accepted is chunked."
    return None


class ClientGone(ConnectionResetError):
    """The client's connection closed under a request: nobody is left to answer."""


CLIENT_CLOSED_REQUEST = 499  # what nginx logs for it: no response was sent


class _HeadTooLarge(Exception):
    """Raised inside a parser callback: the head is over a limit."""


class _Duplicate(Exception):
    """Raised inside a parser callback: a header that may appear once appears twice."""


class _Refused(Exception):
    """Raised inside a parser callback: the refusal is already written."""


_VERSIONS = {"1.1": HttpVersion11, "1.0": HttpVersion10}
# Headers a request may carry once (aiohttp's list): two copies are a 400.
_SINGLETONS = frozenset(
    {
        "content-length",
        "content-location",
        "content-range",
        "content-type",
        "etag",
        "host",
        "max-forwards",
        "server",
        "transfer-encoding",
        "user-agent",
    }
)
_NO_BODY_STATUSES = frozenset((204, 304, *range(100, 200)))
_METHODS: Memo[bytes, str] = Memo(lambda method: method.decode("ascii"))  # (llhttp's: tokens)


_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

# Response header fields by what ``send_head`` does with them: framing is re-derived for the
# client's connection, a ``Date`` is added when there is none.
_PLAIN, _DATE, _LENGTH, _FRAMING = range(4)


def _field_kind(name: bytes) -> tuple[bytes, int]:
    lower = name.lower()
    if lower in (b"transfer-encoding", b"connection"):
        return lower, _FRAMING
    return lower, {b"date": _DATE, b"content-length": _LENGTH}.get(lower, _PLAIN)


_FIELD_KINDS: Memo[bytes, tuple[bytes, int]] = Memo(_field_kind)
_REQUEST_ID_ONLY = frozenset({b"x-request-id"})  # what the gateway's own headers usually replace

_date: tuple[int, bytes] = (0, b"")


def _http_date() -> bytes:
    """The ``Date`` header value, formatted once per second."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now)).encode())
    return _date[1]


def _url_of(target: str) -> URL:
    if target.startswith("/"):
        path, _, query = target.partition("?")
        return URL.build(path=path, query_string=query.partition("#")[0], encoded=True)
    try:
        return URL(target, encoded=True)
    except ValueError:
        return URL.build(path="/", encoded=True)


class Exchange:
    """One request and its response. The request side is read-only; the response is written
    either raw (``send_head``/``send``/``send_end``) or by an aiohttp response
    (``aiohttp_request`` + ``send_response``), never both.

    ``extra_headers`` go on whichever response is sent (a ``Vary`` is added to the response's
    own, any other replaces a header of the same name). The handler may note what the access
    log should say (``route``, ``user_id``, ``auth``,
    ``auth_reason``, ``upstream_seconds``, ``request_id``)."""

    __slots__ = (
        "method",
        "target",
        "version",
        "headers",
        "remote",
        "scheme",
        "body",
        "content_length",
        "chunked",
        "upgrade",
        "client_keep_alive",
        "arrived",
        "request_id",
        "extra_headers",
        "route",
        "user_id",
        "auth",
        "auth_reason",
        "upstream_seconds",
        "status",
        "bytes_sent",
        "keep_alive",
        "_protocol",
        "_expects_continue",
        "_head_sent",
        "_chunked_out",
        "_done",
        "_request",
    )

    def __init__(
        self,
        protocol: GatewayProtocol,
        method: str,
        target: str,
        version: HttpVersion,
        headers: HeaderFields,
        *,
        body: StreamReader,
        content_length: int | None,
        chunked: bool,
        upgrade: bool,
        keep_alive: bool,
    ) -> None:
        self._protocol = protocol
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.remote = protocol.remote
        self.scheme = "http"
        self.body = body
        self.content_length = content_length
        self.chunked = chunked
        self.upgrade = upgrade
        self.client_keep_alive = keep_alive
        self.arrived = time.perf_counter()
        self.request_id = ""
        self.extra_headers: list[tuple[str, str]] = []  # on every response (request id, CORS)
        self.route: str | None = None
        self.user_id: str | None = None
        self.auth = "none"
        self.auth_reason: str | None = None
        self.upstream_seconds: float | None = None
        self.status = 0
        self.bytes_sent = 0
        self.keep_alive = keep_alive and not upgrade
        self._expects_continue = (
            version == HttpVersion11
            and body is not EMPTY_PAYLOAD
            and headers.get("Expect", "").lower() == "100-continue"
        )
        self._head_sent = False
        self._chunked_out = False
        self._done = False
        self._request: BaseRequest | None = None

    # -- the request ------------------------------------------------------------------

    @property
    def raw_headers(self) -> tuple[tuple[bytes, bytes], ...]:
        return self.headers.raw

    @property
    def raw_path(self) -> str:
        return self.target

    @property
    def has_body(self) -> bool:
        return self.body is not EMPTY_PAYLOAD

    @property
    def started(self) -> bool:
        """True once any of the response went out: its status can no longer change."""
        return self._head_sent

    @property
    def done(self) -> bool:
        return self._done

    def expect_body(self) -> None:
        """The handler is about to read the body: answer ``Expect: 100-continue`` now (a
        client waiting for it sends nothing until then; one refused before never sends it)."""
        if self._expects_continue:
            self._expects_continue = False
            if not self._head_sent and self._protocol.receiving(self):
                self._protocol.write(_CONTINUE)

    # -- a raw response (the proxy) ----------------------------------------------------

    def send_head(
        self,
        status: int,
        reason: bytes,
        fields: Iterable[tuple[bytes, bytes]],
        *,
        whole: bytes | None = None,
    ) -> None:
        """The status line and header ``fields`` (framing fields among them are re-derived);
        with ``whole``, the entire body follows in the same write and the response is done.
        Otherwise the body goes by ``send`` and ``send_end``: with the ``Content-Length``
        found in ``fields``, else chunked (HTTP/1.1) or until close (HTTP/1.0).

        ``fields`` and ``extra_headers`` are vetted already, not searched for line breaks: an
        upstream's as llhttp parsed them (it refuses every control character but HTAB), the
        gateway's own printable by construction, a client's echoed value (CORS) as parsed."""
        no_body = self.method == "HEAD" or status in _NO_BODY_STATUSES
        lines = [b"HTTP/1.1 %d %s" % (status, reason)]
        extra = self.extra_headers
        if len(extra) == 1 and extra[0][0] == "X-Request-Id":  # the usual: no CORS, no Vary
            replaced = _REQUEST_ID_ONLY
            own = [b"X-Request-Id: " + extra[0][1].encode()]  # (ASCII by construction)
        else:
            replaced = frozenset(n.lower().encode() for n, _ in extra if n != "Vary")
            own = [n.encode() + b": " + v.encode("utf-8", "surrogateescape") for n, v in extra]
        length: bytes | None = None
        has_date = False
        kinds = _FIELD_KINDS
        for name, value in fields:
            lower, kind = kinds[name]
            if kind == _PLAIN:
                if lower not in replaced:
                    lines.append(name + b": " + value)
            elif kind == _DATE:
                has_date = True
                lines.append(name + b": " + value)
            elif kind == _LENGTH:
                length = value
        lines += own
        if not has_date:
            lines.append(b"Date: " + _http_date())
        if whole is not None and not no_body:
            length = b"%d" % len(whole)
        if status in _NO_BODY_STATUSES:
            length = None
        elif length is not None:
            lines.append(b"Content-Length: " + length)
        elif not no_body and whole is None:
            if self.version == HttpVersion11:
                self._chunked_out = True
                lines.append(b"Transfer-Encoding: chunked")
            else:
                self.keep_alive = False  # the end of the body is the end of the connection
        self._decide_keep_alive()
        if not self.keep_alive:
            lines.append(b"Connection: close")
        elif self.version == HttpVersion10:
            lines.append(b"Connection: keep-alive")
        lines.append(b"\r\n")
        head = b"\r\n".join(lines)
        data = head if whole is None or no_body else head + whole
        self._protocol.write(data)  # first: a client gone by now was sent nothing
        self.status = status
        self._head_sent = True
        self.bytes_sent += len(data)
        self._done = whole is not None

    async def send(self, chunk: bytes) -> None:
        """A piece of the body; waits while the client is not reading."""
        if not chunk:
            return
        if self._chunked_out:
            chunk = b"%x\r\n%b\r\n" % (len(chunk), chunk)
        self.bytes_sent += len(chunk)
        await self._protocol.write_and_drain(chunk)

    def send_end(self, chunk: bytes = b"") -> None:
        """The last piece of the body (if any) and the end of the response."""
        if self._chunked_out:
            data = (b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunk else b"") + b"0\r\n\r\n"
        else:
            data = chunk
        if data:
            self.bytes_sent += len(data)
            self._protocol.write(data)
        self._done = True

    def send_problem(self, err: GatewayError) -> None:
        """``err`` as problem+json (nothing may have been sent yet)."""
        response = problem_response(err)
        body = response.body
        assert isinstance(body, bytes)
        fields = [(n.encode(), v.encode()) for n, v in response.headers.items()]
        if not self.extra_headers:
            fields.append((b"X-Request-Id", hdr.request_id(None).encode()))
        self.send_head(err.status, HTTPStatus(err.status).phrase.encode(), fields, whole=body)

    def abort(self) -> None:
        """Cut the connection: a response under way cannot be completed honestly."""
        self.keep_alive = False
        self._done = True
        self._protocol.cut()

    def _decide_keep_alive(self) -> None:
        protocol = self._protocol
        if self.keep_alive and (protocol.closing or protocol.receiving(self)):
            # Draining, or the body is still arriving: end the connection with this response.
            self.keep_alive = False

    # -- an aiohttp response (own endpoints, websockets, aiohttp applications) --------

    def aiohttp_request(self, factory: Callable[..., BaseRequest] | None = None) -> BaseRequest:
        """This request as an aiohttp request over the same connection (made once)."""
        if self._request is None:
            self._decide_keep_alive()
            protocol = self._protocol
            message = RawRequestMessage(
                self.method,
                self.target,
                self.version,
                self.headers.as_multidict(),
                self.raw_headers,
                not self.keep_alive,
                None,
                self.upgrade,
                self.chunked,
                _url_of(self.target),
            )
            writer = StreamWriter(protocol, protocol.loop)
            task = asyncio.current_task()
            assert task is not None
            if factory is not None:
                self._request = factory(message, self.body, protocol, writer, task)
            else:
                self._request = _EdgeRequest(
                    message,
                    self.body,
                    protocol,  # type: ignore[arg-type]
                    writer,
                    task,
                    protocol.loop,
                    client_max_size=protocol.server.client_max_size,
                )
                self._request[_EXTRA_HEADERS] = self.extra_headers
        return self._request

    async def send_response(self, response: web.StreamResponse) -> None:
        """Write ``response`` (prepared already, e.g. a websocket, or not) to its end."""
        request = self.aiohttp_request()
        self._decide_keep_alive()
        if not self.keep_alive:
            response.force_close()
        if not response.prepared and not isinstance(request, _EdgeRequest):
            _add_extra_headers(response, self.extra_headers)
        self.status = response.status
        self._head_sent = True
        try:
            if not response.prepared:
                await response.prepare(request)
            await response.write_eof()
        finally:
            self.keep_alive = self.keep_alive and bool(response.keep_alive)
            self.bytes_sent += response.body_length
            self._done = True


Handler = Callable[[Exchange], Awaitable[None]]

_EXTRA_HEADERS: web.RequestKey[list[tuple[str, str]]] = web.RequestKey("edge_extra_headers", list)


def _add_extra_headers(response: web.StreamResponse, extra: list[tuple[str, str]]) -> None:
    for name, value in extra:
        if name == "Vary":
            response.headers.add(name, value)
        else:
            response.headers[name] = value


class _EdgeRequest(BaseRequest):
    """An aiohttp request on the edge: its response gets the exchange's extra headers as it
    is prepared (websocket handshakes included)."""

    async def _prepare_hook(self, response: web.StreamResponse) -> None:
        _add_extra_headers(response, self[_EXTRA_HEADERS])


class GatewayProtocol(BaseProtocol):
    """One client connection: parses requests, serves them one at a time, keeps deadlines.

    Deadlines are timestamps checked by one lazily rescheduled timer."""

    # Thousands of them under load: slots, not a dict each.
    __slots__ = (
        "server",
        "loop",
        "_limits",
        "_http",
        "remote",
        "peername",
        "sockname",
        "ssl_context",
        "_timeout_ceil_threshold",
        "max_field_size",
        "max_headers",
        "_in_head",
        "_head_bytes",
        "_url",
        "_fields",
        "_incoming",
        "_parsed",
        "_serving",
        "_waiting",
        "_task",
        "_next",
        "closing",
        "_dropping",
        "_refusal",
        "_upgraded_tail",
        "_ws_parser",
        "_ws_callback",
        "_watch",
        "_head_started",
        "_idle_since",
        "_linger_until",
        "_body_started",
        "_body_bytes",
        "_last_read",
        "_paused_at",
        "_held",
    )

    def __init__(self, server: GatewayServer) -> None:
        super().__init__(server.loop)
        self.server = server
        self.loop = server.loop
        self._limits = server.limits
        self._http = httptools.HttpRequestParser(self)
        self.remote: str | None = None
        self.peername: Any = None
        self.sockname: Any = None
        self.ssl_context: Any = None
        # aiohttp's request, response and websocket objects look for these.
        self._timeout_ceil_threshold = 5.0
        self.max_field_size = self._limits.max_field_size
        self.max_headers = self._limits.max_headers
        # the head being parsed
        self._in_head = False
        self._head_bytes = 0
        self._url = b""
        self._fields: list[tuple[bytes, bytes]] = []
        # exchanges
        self._incoming: Exchange | None = None  # the one whose message is arriving
        self._parsed: list[Exchange] = []  # heads parsed by the current feed, not yet served
        self._serving: Exchange | None = None
        # Pipelined requests parsed ahead: rarely any (a list: an empty deque is 600 bytes).
        self._waiting: list[Exchange] = []
        self._task: asyncio.Task[None] | None = None  # serves this connection's requests
        self._next: asyncio.Future[Exchange] | None = None  # the idle task waits on it
        self.closing = False  # no request after the one being served
        self._dropping = False  # refused or closing: what still arrives is read and dropped
        self._refusal: bytes | None = None  # to send once the response being served is out
        # after an upgrade: bytes for a websocket parser, or for nobody
        self._upgraded_tail: bytes | None = None
        self._ws_parser: Any = None
        self._ws_callback: Callable[[], None] | None = None
        # deadlines
        self._watch: asyncio.TimerHandle | None = None
        self._head_started: float | None = None
        self._idle_since: float | None = None
        self._linger_until: float | None = None
        self._body_started = 0.0
        self._body_bytes = 0
        self._last_read = 0.0
        self._paused_at: float | None = None
        # A new request's first bytes, read in a turn that took in enough already.
        self._held: bytes | None = None

    # -- connection life -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self.peername = peer
        self.sockname = transport.get_extra_info("sockname")
        self.remote = str(peer[0]) if isinstance(peer, tuple | list) and peer else None
        if not self.server.admit(self):
            log.info("refused a connection from %s: too many open", self.remote or "?")
            assert self.transport is not None
            self.transport.write(raw_problem(TOO_MANY_CONNECTIONS))
            self._close_after_linger()
            return
        now = self.loop.time()
        self._head_started = now
        self._last_read = now
        self._arm(now + self._limits.header_timeout)
        if self.server.shutting_down:
            # Accepted as the listener closed, made after the idle ones were told to close:
            # it is idle too.
            self.close_when_idle()

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        # The parser holds this protocol's callbacks: without this, connection and parser
        # are a reference cycle that only a full garbage collection frees, and a thousand
        # closed connections wait for it.
        del self._http
        self.server.forget(self)
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        lost = ClientGone("The client closed the connection.")
        for exchange in (self._incoming, *self._waiting):
            if exchange is not None and exchange.body is not EMPTY_PAYLOAD:
                exchange.body.set_exception(lost)
        self._incoming = None
        self._waiting.clear()
        self._held = None
        if self._ws_parser is not None:
            self._ws_parser.feed_eof()
            self._ws_parser = None
        if self._next is not None:
            self._next.cancel()
            self._next = None
        self.closing = True

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ClientGone("The client connection is closed.")
        transport.write(data)

    async def write_and_drain(self, data: bytes) -> None:
        self.write(data)
        if self._paused:
            await self._drain_helper()

    def cut(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def receiving(self, exchange: Exchange) -> bool:
        """True while ``exchange``'s body is still arriving."""
        return self._incoming is exchange

    # -- reading ---------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._ws_parser is not None:
            if self._ws_callback is not None:
                self._ws_callback()
            eof, _ = self._ws_parser.feed_data(data)
            if eof:
                self.cut()
            return
        if self._dropping:
            return
        if self._upgraded_tail is not None:
            self._upgraded_tail += data[: BODY_BUFFER - len(self._upgraded_tail)]
            return
        if self._held is not None:
            self._held += data  # (a read already under way as reading paused)
            return
        if (
            self._serving is None
            and self._incoming is None
            and not self._in_head
            and not self.server.take_in(self)
        ):
            self._held = data  # a new request, for a later turn
            self._idle_since = None  # (not idle: a request waits)
            self._pause_reading_for_buffer()
            return
        self._parse(data)

    def release_held(self) -> bool:
        """The server's turn for the request held back: parse it now. False if the
        connection is gone meanwhile."""
        data, self._held = self._held, None
        if data is None or self.transport is None or self._dropping:
            return False  # gone, or refused meanwhile (a head that waited past its timeout)
        self._resume_reading_for_buffer()
        self._parse(data)
        return True

    def _parse(self, data: bytes) -> None:
        now = self.loop.time()
        self._last_read = now
        if self._incoming is not None:
            self._body_bytes += len(data)
        else:
            self._head_bytes += len(data)
            if self._head_started is None:
                self._head_started = now  # these bytes begin a head
                self._idle_since = None
        failure: BaseException | None = None
        try:
            self._http.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._upgraded_tail = data[upgrade.args[0] :]
        except httptools.HttpParserCallbackError as err:
            failure = err.__context__
        except httptools.HttpParserError as err:
            failure = err
        if failure is not None and self._incoming in self._parsed:
            # The bytes went wrong inside this request (llhttp may object to a framing
            # header only after the head): it is never served.
            self._parsed.remove(self._incoming)
            self._incoming = None
        parsed = self._parsed
        if parsed:
            try:
                for exchange in parsed:
                    self._enqueue(exchange)  # (parses nothing: the list cannot grow meanwhile)
            finally:
                parsed.clear()  # each is enqueued once, whatever happens
        if failure is not None:
            self._refuse(failure)
            return
        if self._in_head:
            if self._head_bytes > self._limits.max_head_size:
                self._refuse(_HeadTooLarge())
                return
            self._arm(self._head_started + self._limits.header_timeout)  # type: ignore[operator]

    def _refuse(self, exc: BaseException | None) -> None:
        """The head or a body's framing is malformed: answer 400 (431 for a head over the
        limits) and close; nothing after the bad bytes is read as a request."""
        if isinstance(exc, _Refused):
            return
        log.info("refused a malformed request from %s: %s", self.remote, type(exc).__name__)
        self._refuse_with(parser_error(400, exc))

    def _refuse_with(self, err: GatewayError) -> None:
        incoming = self._incoming
        if incoming is not None and incoming is self._serving:
            # The body of the request being served is broken: its handler answers.
            incoming.body.set_exception(ValueError("The request body is malformed."))
            self._stop_reading()
            return
        self._stop_reading()
        if self._serving is None:
            self.write_quietly(raw_problem(err))
            self._close_after_linger()
        else:
            self._refusal = raw_problem(err)  # after the response under way

    def _stop_reading(self) -> None:
        self.closing = True
        self._dropping = True
        self._incoming = None
        self._waiting.clear()
        self._in_head = False
        self._head_started = None

    # -- parser callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_head = True
        self._url = b""
        self._fields = []
        if self._head_started is None:
            self._head_started = self.loop.time()

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._limits.max_line_size:
            raise _HeadTooLarge()

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) + len(value) > self._limits.max_field_size:
            raise _HeadTooLarge()
        fields = self._fields
        fields.append((name, value))
        if len(fields) > self._limits.max_headers:
            raise _HeadTooLarge()

    def on_headers_complete(self) -> None:
        now = self.loop.time()
        self._in_head = False
        self._head_started = None
        self._head_bytes = 0
        http = self._http
        version = _VERSIONS.get(http.get_http_version())
        headers = HeaderFields(tuple(self._fields))
        if headers.repeated and not headers.repeated.isdisjoint(_SINGLETONS):
            # Which copy would a filter in front of the gateway, or the upstream, read?
            raise _Duplicate()
        first = headers.first
        method = _METHODS[http.get_method()]
        chunked = "transfer-encoding" in first
        if version is None:
            problem: str | None = "Only HTTP/1.0 and HTTP/1.1 are served."
        elif method == "CONNECT":
            problem = "CONNECT is not served: the gateway opens no tunnels."
        elif version == HttpVersion11 and "host" not in first:
            problem = "An HTTP/1.1 request must carry a Host header (RFC 9112 §3.2)."
        elif chunked:
            problem = framing_problem(version, headers.getall("Transfer-Encoding", ()))
        else:
            problem = None
        if problem is not None:
            self._refuse_framing(problem)
            raise _Refused()
        if self.closing:
            self._dropping = True  # after "Connection: close" nothing more is served
            raise _Refused()
        assert version is not None
        length_field = first.get("content-length")  # digits only: llhttp checked it
        length = int(length_field) if length_field is not None else None
        has_body = chunked or bool(length)
        body = StreamReader(self, BODY_BUFFER, loop=self.loop) if has_body else EMPTY_PAYLOAD
        exchange = Exchange(
            self,
            method,
            self._url.decode("utf-8", "surrogateescape"),
            version,
            headers,
            body=body,
            content_length=length,
            chunked=chunked,
            upgrade=http.should_upgrade(),
            keep_alive=http.should_keep_alive(),
        )
        self._incoming = exchange
        if has_body:
            self._body_started, self._body_bytes = now, 0
            self._arm(now + self._limits.body_idle_timeout)
        self._parsed.append(exchange)

    def on_body(self, body: bytes) -> None:
        exchange = self._incoming
        if exchange is not None:
            exchange.body.feed_data(body)

    def on_message_complete(self) -> None:
        exchange, self._incoming = self._incoming, None
        if exchange is not None and exchange.body is not EMPTY_PAYLOAD:
            exchange.body.feed_eof()

    def _refuse_framing(self, problem: str) -> None:
        log.info("refused a request from %s: %s", self.remote, problem)
        self._refuse_with(BadRequest(problem))

    # -- serving ---------------------------------------------------------------------

    def _enqueue(self, exchange: Exchange) -> None:
        if self._serving is not None:
            self._waiting.append(exchange)
            if not self._buffer_paused:
                self._pause_reading_for_buffer()  # one parsed ahead is plenty
            return
        self._serving = exchange
        self._idle_since = None
        waiter, self._next = self._next, None
        if waiter is not None:
            waiter.set_result(exchange)  # the connection's task is waiting for it
        else:
            self._task = self.loop.create_task(self._serve_all(exchange))

    async def _serve_all(self, exchange: Exchange) -> None:
        """The connection's one task: serve its requests in turn, idle between them (a task
        per request would cost more than much of the request, and so would a coroutine per
        request wrapped around the handler's)."""
        try:
            while True:
                try:
                    await self.server.handler(exchange)
                    if not exchange.done:
                        self._unfinished(exchange)
                except (ConnectionError, asyncio.CancelledError):
                    exchange.abort()
                except Exception:
                    self._handler_failed(exchange)
                finally:
                    self.server.log_access(exchange)
                if not self._keep_serving(exchange):
                    return
                if self._waiting:
                    exchange = self._serving = self._waiting.pop(0)
                    if self._buffer_paused:
                        self._resume_reading_for_buffer()
                    continue
                self._serving = None
                now = self.loop.time()
                self._idle_since = now
                self._arm(now + self._limits.keepalive_timeout)
                self._next = self.loop.create_future()
                # Not held while idle: the finished exchange holds its whole head (a token's
                # kilobyte), and a thousand idle keep-alive connections held a thousand.
                del exchange
                exchange = await self._next
        except asyncio.CancelledError:
            pass  # the connection closed while idle
        finally:
            self._serving = None
            self._task = None

    @staticmethod
    def _unfinished(exchange: Exchange) -> None:
        if exchange.started:
            exchange.abort()  # the handler left a response half-sent
        else:
            exchange.send_problem(GatewayError("The gateway failed to handle the request."))

    @staticmethod
    def _handler_failed(exchange: Exchange) -> None:
        log.exception("unhandled error on %s %s", exchange.method, exchange.target[:200])
        if exchange.started:
            exchange.abort()
            return
        exchange.keep_alive = False  # whatever broke may have left the stream astray
        try:
            exchange.send_problem(GatewayError("The gateway failed to handle the request."))
        except Exception:
            exchange.abort()

    def _keep_serving(self, exchange: Exchange) -> bool:
        """After a response: whether the connection carries on, else how it ends."""
        if self.transport is None:
            return False
        if self._refusal is not None:
            self.write_quietly(self._refusal)
            self._close_after_linger()
        elif self._upgraded_tail is not None or self._ws_parser is not None:
            self._close_now()  # an upgraded connection carries no further requests
        elif self._incoming is exchange:
            self._close_after_linger()  # answered before its body was whole
        elif not exchange.keep_alive or self.closing:
            self._close_now()
        else:
            return True
        return False

    def _close_after_linger(self) -> None:
        """Stop answering; read and drop what still comes for a moment, then close. Closing a
        socket with unread input sends a reset, which can destroy the response before the
        client reads it."""
        self._stop_reading()
        transport = self.transport
        if transport is None:
            return
        if self._buffer_paused or self._reading_paused:
            self._buffer_paused = self._reading_paused = False
            self._resume_transport_reading()
        if transport.can_write_eof():
            transport.write_eof()
        self._linger_until = self.loop.time() + min(self._limits.lingering_time, 1.0)
        self._arm(self._linger_until)

    def _close_now(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    # -- flow control ----------------------------------------------------------------

    def pause_reading(self) -> None:
        # The gateway holds the client back (its body buffer is full): not the client's delay.
        if not self._reading_paused:
            self._reading_paused = True
            self._paused_at = self.loop.time()
            self._pause_transport_reading()

    def resume_reading(self, resume_parser: bool = True) -> None:
        if not self._reading_paused:
            return
        self._reading_paused = False
        if self._paused_at is not None:
            now = self.loop.time()
            self._body_started += now - self._paused_at
            self._last_read = now
            self._paused_at = None
        if not self._buffer_paused:
            self._resume_transport_reading()

    # -- what aiohttp's websocket response asks of its protocol -------------------------

    def set_parser(self, parser: Any, data_received_cb: Callable[[], None] | None = None) -> None:
        self._ws_parser = parser
        self._ws_callback = data_received_cb
        tail, self._upgraded_tail = self._upgraded_tail, None
        self._head_started = None
        if tail:
            parser.feed_data(tail)

    def keep_alive(self, val: bool) -> None:
        if not val:
            self.closing = True

    # -- deadlines -------------------------------------------------------------------

    def _arm(self, when: float) -> None:
        self._watch = no_later_than(self._watch, when, self.loop, self._on_watch)

    def _on_watch(self) -> None:
        self._watch = None
        if self.transport is None:
            return
        now = self.loop.time()
        if self._linger_until is not None:
            if now >= self._linger_until:
                self._close_now()
            else:
                self._watch = self.loop.call_at(self._linger_until, self._on_watch)
            return
        due: float | None = None
        for deadline, what in (
            (self._head_deadline(), "request head"),
            (self._body_deadline(now), "request body"),
            (self._idle_deadline(), "idle"),
        ):
            if deadline is None:
                continue
            if now >= deadline:
                self._expire(what)
                return
            due = deadline if due is None else min(due, deadline)
        if due is not None:
            self._watch = self.loop.call_at(due, self._on_watch)

    def _head_deadline(self) -> float | None:
        if self._head_started is None:
            return None
        return self._head_started + self._limits.header_timeout

    def _idle_deadline(self) -> float | None:
        if self._idle_since is None or self._serving is not None:
            return None
        return self._idle_since + self._limits.keepalive_timeout

    def _body_deadline(self, now: float) -> float | None:
        exchange = self._incoming
        if exchange is None:
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
        if what == "idle":
            self._close_now()  # a quiet keep-alive connection: nothing to say
            return
        log.info("closing a connection from %s: %s too slow", self.remote or "?", what)
        exchange = self._incoming
        if exchange is not None:
            exchange.body.set_exception(TimeoutError(f"The {what} arrived too slowly."))
            self._incoming = None
        serving = self._serving
        if serving is None or not serving.started:
            self.write_quietly(raw_problem(RequestTimeout(f"The {what} arrived too slowly.")))
        if serving is None:
            self._close_after_linger()
        else:
            serving.keep_alive = False
            self.cut()

    def write_quietly(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    # -- shutdown --------------------------------------------------------------------

    def close_when_idle(self) -> None:
        """Shutting down: an idle connection closes now, a busy one after its response."""
        self.closing = True
        if self._serving is None and self._held is None:
            self._close_now()

    async def finish(self, timeout: float | None) -> None:
        """Wait for the request being served (up to ``timeout``), then close."""
        self.closing = True
        task = self._task
        if self._next is not None:  # idle: nothing to wait for
            self._next.cancel()
            self._next = None
        elif task is not None and not task.done():
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.shield(task)
            except TimeoutError:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._close_now()


AccessLog = Callable[[Exchange, float], None]


class GatewayServer:
    """The listener's protocol factory: counts connections, refuses those over the cap, and
    gives each request to ``handler``; ``shutdown`` drains them all."""

    def __init__(
        self,
        handler: Handler,
        *,
        limits: Limits = DEFAULT_LIMITS,
        client_max_size: int = 1024**2,
        access_log: AccessLog | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.handler = handler
        self.limits = limits
        self.client_max_size = client_max_size
        self._access_log = access_log
        self.loop = loop or asyncio.get_running_loop()
        self.connections: set[GatewayProtocol] = set()
        self.shutting_down = False
        # The intake of this turn of the loop, and the connections whose requests wait for a
        # later one (in order).
        self._intake = 0
        self._held: deque[GatewayProtocol] = deque()
        self._turn_scheduled = False

    @property
    def open_connections(self) -> int:
        return len(self.connections)

    def __call__(self) -> GatewayProtocol:
        return GatewayProtocol(self)

    def admit(self, protocol: GatewayProtocol) -> bool:
        if len(self.connections) >= self.limits.max_connections:
            return False
        self.connections.add(protocol)
        return True

    def forget(self, protocol: GatewayProtocol) -> None:
        self.connections.discard(protocol)

    def take_in(self, protocol: GatewayProtocol) -> bool:
        """Whether ``protocol``'s new request is parsed in this turn of the loop; if not, the
        server releases it (``release_held``) in a later turn, after those held before it."""
        self._schedule_turn()
        if self._held or self._intake >= self.limits.intake_per_turn:
            self._held.append(protocol)
            return False
        self._intake += 1
        return True

    def _schedule_turn(self) -> None:
        if not self._turn_scheduled:
            self._turn_scheduled = True
            # Runs after this turn's reads: the next turn's intake starts with the held.
            self.loop.call_soon(self._next_turn)

    def _next_turn(self) -> None:
        self._turn_scheduled = False
        self._intake = 0
        self._release_held(self.limits.intake_per_turn)
        if self._held:
            self._schedule_turn()

    def _release_held(self, limit: int | None) -> None:
        """Parse held requests, in order, until this turn's intake reaches ``limit`` (None:
        all of them)."""
        held = self._held
        while held and (limit is None or self._intake < limit):
            if held.popleft().release_held():
                self._intake += 1

    def log_access(self, exchange: Exchange) -> None:
        if self._access_log is not None:
            try:
                self._access_log(exchange, time.perf_counter() - exchange.arrived)
            except Exception:
                log.exception("writing an access line failed")

    # what aiohttp's runners call

    def pre_shutdown(self) -> None:
        self.shutting_down = True
        self._release_held(None)  # read already: they are served, not dropped
        for protocol in list(self.connections):
            protocol.close_when_idle()

    async def shutdown(self, timeout: float | None = None) -> None:
        self._release_held(None)
        await asyncio.gather(*(p.finish(timeout) for p in list(self.connections)))
        self.connections.clear()


def application_handler(app: web.Application) -> Handler:
    """Serve an aiohttp ``Application`` (router, middlewares, signals) over the edge."""

    async def handle(exchange: Exchange) -> None:
        request = exchange.aiohttp_request(app._make_request)  # its router answers Expect
        try:
            response = await app._handle(request)  # type: ignore[arg-type]
        except web.HTTPException as exc:
            response = exc
        await exchange.send_response(response)

    return handle


EDGE_HANDLER: web.AppKey[Handler] = web.AppKey("edge_handler", object)  # type: ignore[arg-type]


class GatewayRunner(web.AppRunner):
    """``web.AppRunner`` whose listener is the edge (startup, cleanup_ctx and graceful
    shutdown are AppRunner's own). ``handler`` serves the requests; by default the one the app
    names under ``EDGE_HANDLER``, else the app's router and middlewares, through aiohttp
    requests."""

    def __init__(
        self,
        app: web.Application,
        *,
        limits: Limits = DEFAULT_LIMITS,
        handler: Handler | None = None,
        access_log: AccessLog | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **kwargs)
        self.limits = limits
        self._handler = handler
        self._access_log = access_log

    async def _make_server(self) -> Any:
        await super()._make_server()  # runs the app's startup and freezes it
        return GatewayServer(
            self._handler or self.app.get(EDGE_HANDLER) or application_handler(self.app),
            limits=self.limits,
            client_max_size=self.app._client_max_size,
            access_log=self._access_log,
            loop=asyncio.get_running_loop(),
        )
