"""The upstream HTTP/1.1 client: a keep-alive connection pool on asyncio protocols.

Responses are parsed by httptools (llhttp). What this module guarantees:

- bodies stream both ways and are never buffered whole: reading from the upstream pauses while
  the consumer is behind, and a request body waits for the transport to drain;
- a request body goes with ``Content-Length`` when its length is known, chunked otherwise;
- a response is its status, reason, headers (in order, duplicates kept) and then its body,
  length-delimited, chunked or read until close; HEAD, 204 and 304 have none; 1xx informational
  responses are skipped; an unasked-for 101, a malformed head or one over ``MAX_HEAD_SIZE`` bytes
  or ``MAX_HEADERS`` fields is an ``UpstreamError``;
- a connection is reused only after a complete response to a completely sent request, when the
  parser says keep-alive, never after HEAD; an idle connection expires after
  ``keepalive_timeout`` and one the upstream closed while idle is never handed out; a request
  without a body that fails on a reused connection before any response byte is retried once on
  a fresh connection;
- ``read_timeout`` bounds the wait for the response head once the request is sent, and every
  wait for more of the body: expiry is ``TimeoutError``.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, cast

import httptools
import yarl
from multidict import CIMultiDict

from gateway.timers import no_later_than

__all__ = [
    "MAX_HEADERS",
    "MAX_HEAD_SIZE",
    "Origin",
    "UpstreamError",
    "UpstreamPool",
    "UpstreamResponse",
]

MAX_HEAD_SIZE = 64 * 1024
MAX_HEADERS = 256

# Response bytes buffered before reading from the upstream pauses (and where it resumes).
_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024

_GET_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
# Names the pool writes itself, from the origin and the body's framing.
_OWN_HEADERS = frozenset({"host", "content-length", "transfer-encoding"})
_FRAMING = (b"content-length", b"transfer-encoding")
# What a header line must not hold: control characters (CR and LF among them) but HTAB.
_CONTROL_OR_BREAK = bytes([*range(0x09), *range(0x0A, 0x20), 0x7F])

BodyReader = Callable[[], Awaitable[bytes]]


class UpstreamError(Exception):
    """The upstream refused, reset, closed too early or did not answer HTTP."""


class _Closed(UpstreamError):
    """The connection closed before the response was complete."""


@dataclass(frozen=True, slots=True)
class Origin:
    """Where connections go: scheme, host and port, and the ``Host`` header they imply."""

    scheme: str
    host: str
    port: int
    host_header: str

    @classmethod
    def of(cls, url: str | yarl.URL) -> Origin:
        parsed = yarl.URL(url, encoded=True) if isinstance(url, str) else url
        if parsed.scheme not in ("http", "https") or not parsed.raw_host or not parsed.port:
            raise ValueError(f"not an http(s) URL: {url}")
        host_header = parsed.host_port_subcomponent  # host[:port], the default port omitted
        assert host_header is not None
        return cls(parsed.scheme, parsed.raw_host, parsed.port, host_header)


# What the gateway's upstream heads are made of: a client's field as received (a request in
# flight keeps its fields once, not again as lines), or a block of the gateway's own lines.
HeadItem = tuple[bytes, bytes] | bytes


def head_lines(items: Iterable[HeadItem]) -> list[bytes]:
    """``items`` as lines and blocks of lines, to be joined by CRLF."""
    return [item if isinstance(item, bytes) else item[0] + b": " + item[1] for item in items]


# The response fields of a connection with no response under way. Never appended to:
# ``on_message_begin`` gives each response a list of its own.
_NO_FIELDS: list[tuple[bytes, bytes]] = []


def serialize_head(
    method: str,
    target: str,
    host: str,
    headers: Any,
    *,
    has_body: bool,
    length: int | None,
) -> bytes:
    """The request line and headers. ``Host`` comes first; the body's actual framing
    (``Content-Length`` or ``Transfer-Encoding``) last.

    ``headers``: either a list of head items (``(name, value)`` fields as received, or
    blocks of lines joined by CRLF), the gateway's own path, which holds no ``Host`` or
    framing field and whose every byte is already vetted (the client's as llhttp parsed
    them: no control character passes it; the gateway's own values printable ASCII by
    construction), sent as they are; or any ``items()`` mapping of text, whose ``Host`` and
    framing fields are replaced and which is checked for control characters."""
    encode = _encode
    lines = [encode(f"{method} {target} HTTP/1.1"), b"Host: " + encode(host)]
    if isinstance(headers, list):
        _refuse_control_characters(lines)
        lines += head_lines(headers)
    else:
        lines += [encode(f"{n}: {v}") for n, v in headers.items() if n.lower() not in _OWN_HEADERS]
        _refuse_control_characters(lines)
    if length is not None:
        lines.append(b"Content-Length: %d" % length)
    elif has_body:
        lines.append(b"Transfer-Encoding: chunked")
    elif method not in _GET_METHODS:
        lines.append(b"Content-Length: 0")  # what aiohttp's client sent; some servers want it
    lines.append(b"\r\n")
    return b"\r\n".join(lines)


def _refuse_control_characters(lines: list[bytes]) -> None:
    joined = b"".join(lines)
    if len(joined.translate(None, _CONTROL_OR_BREAK)) != len(joined):  # a regex costs 5x more
        raise ValueError("Forbidden control character in the request head.")


def _encode(text: str) -> bytes:
    # surrogateescape: header bytes the client sent that are not UTF-8 go out unchanged.
    return text.encode("utf-8", "surrogateescape")


class _Connection(asyncio.Protocol):
    """One upstream connection; at most one exchange at a time."""

    # A thousand of them under load: slots, not a dict each.
    __slots__ = (
        "pool",
        "origin",
        "loop",
        "transport",
        "parser",
        "closed",
        "busy",
        "head_deadline",
        "idle_deadline",
        "_watch",
        "_write_paused",
        "_drain_waiter",
        # one exchange's state (``_reset``)
        "head_only",
        "head_waiter",
        "writer",
        "request_sent",
        "got_bytes",
        "in_head",
        "head_size",
        "fed_in_head",
        "feeding",
        "informational",
        "status",
        "reason",
        "headers",
        "body",
        "buffered",
        "body_waiter",
        "complete",
        "keep_alive",
        "error",
        "read_paused",
    )

    def __init__(self, pool: UpstreamPool, origin: Origin) -> None:
        self.pool = pool
        self.origin = origin
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.busy = False
        # One timer per connection, moved lazily, watches both deadlines: the response head
        # once the request is sent, and the end of an idle spell in the pool.
        self.head_deadline: float | None = None
        self.idle_deadline: float | None = None
        self._watch: asyncio.TimerHandle | None = None
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._reset(head_only=False)

    # -- one exchange's state ----------------------------------------------------------------

    def _reset(self, *, head_only: bool) -> None:
        self.head_only = head_only
        self.head_waiter: asyncio.Future[None] | None = None
        self.head_deadline = None
        self.writer: asyncio.Task[None] | None = None
        self.request_sent = False
        self.got_bytes = False
        self.in_head = True
        self.head_size = 0
        self.fed_in_head = 0
        self.feeding = 0
        self.informational = False
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = _NO_FIELDS
        self.body: list[bytes] = []  # (a deque's first block alone is 600 bytes)
        self.buffered = 0
        self.body_waiter: asyncio.Future[None] | None = None
        self.complete = False
        self.keep_alive = False
        self.error: BaseException | None = None
        self.read_paused = False

    def begin(self, head: bytes, *, head_only: bool) -> None:
        self._reset(head_only=head_only)
        self.busy = True
        self.head_waiter = self.loop.create_future()
        assert self.transport is not None
        self.transport.write(head)

    @property
    def reusable(self) -> bool:
        return (
            self.complete
            and self.keep_alive
            and self.request_sent
            and self.error is None
            and not self.head_only
            and not self.closed
            and not self.body  # everything was read
        )

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its interface.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._forget(self)
        # Transport and parser both refer back to this connection: cycles that only a full
        # garbage collection would free, and a pool may drop hundreds at once.
        self.transport = None
        del self.parser
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_exception(_Closed("the upstream closed the connection"))
        if not self.busy or self.complete:
            return
        if not self.in_head and self._until_close() and exc is None:
            self._finish(keep_alive=False)  # the close is the end of this body
        else:
            self.fail(_Closed("the upstream closed the connection before the response ended"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        if not self.busy or self.complete:
            # Bytes nobody asked for: this connection can no longer be trusted.
            self.keep_alive = False
            self.abort()
            return
        self.got_bytes = True
        self.feeding = len(data)
        try:
            self.parser.feed_data(data)
        except Exception as exc:  # httptools' parse errors, and ours raised in callbacks
            if self.complete:
                self.keep_alive = False
            else:
                self.fail(UpstreamError(f"malformed upstream response: {exc}"))
            return
        if self.in_head and not self.complete:
            self.fed_in_head += len(data)
            if self.fed_in_head > MAX_HEAD_SIZE:
                self.fail(UpstreamError("the upstream's response head is too large"))

    # -- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            raise UpstreamError("a second response to one request")
        self.in_head = True
        self.head_size = 0
        self.fed_in_head = 0
        self.reason = b""
        self.headers = []

    def on_status(self, status: bytes) -> None:
        self.reason += status
        self.head_size += len(status)

    def on_header(self, name: bytes, value: bytes) -> None:
        # Sizes are checked once the head is whole: one feed holds at most a read's worth.
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        headers = self.headers
        if len(headers) > MAX_HEADERS or (
            self.fed_in_head + self.feeding > MAX_HEAD_SIZE  # else the head cannot be larger
            and self.head_size + sum(len(n) + len(v) + 4 for n, v in headers) > MAX_HEAD_SIZE
        ):
            raise UpstreamError("the upstream's response head is too large")
        status = self.parser.get_status_code()
        if status == 101:
            raise UpstreamError("an upgrade nobody asked for")
        if status < 200:
            self.informational = True  # 1xx: skipped, the real response follows
            return
        self.informational = False
        self.in_head = False
        self.status = status
        self.head_deadline = None
        if self.head_only:
            # httptools cannot be told the request was HEAD: the head is the whole message,
            # and the connection is never reused (its parser would expect a body).
            self._finish(keep_alive=False)
        waiter = self.head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self.complete:
            return  # a body to HEAD: ignored, the connection is not reused anyway
        self.body.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.read_paused and self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()
        self._wake_reader()

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
            return
        if not self.complete:
            self._finish(keep_alive=self.parser.should_keep_alive())

    # -- helpers -----------------------------------------------------------------------------

    def _until_close(self) -> bool:
        """Neither length nor chunking: the body ends when the upstream closes."""
        return not any(n.lower() in _FRAMING for n, _ in self.headers)

    def _finish(self, *, keep_alive: bool) -> None:
        self.complete = True
        self.keep_alive = keep_alive
        self._wake_reader()

    def _wake_reader(self) -> None:
        waiter = self.body_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def fail(self, exc: BaseException) -> None:
        """End the exchange with ``exc``: waiters get it, the connection is closed."""
        if self.error is None:
            self.error = exc
        self.keep_alive = False
        for waiter in (self.head_waiter, self.body_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_exception(exc)
        self.head_deadline = None
        self.abort()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()
        self.closed = True

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True

    def arm_head_timer(self, timeout: float) -> None:
        if self.in_head and self.error is None:
            self.head_deadline = self.loop.time() + timeout
            self._arm(self.head_deadline)

    def idle_until(self, deadline: float | None) -> None:
        """In the pool until ``deadline`` (then ``pool._expire_idle``); None: taken out."""
        self.idle_deadline = deadline
        if deadline is not None:
            self._arm(deadline)

    def _arm(self, when: float) -> None:
        self._watch = no_later_than(self._watch, when, self.loop, self._on_watch)

    def _on_watch(self) -> None:
        self._watch = None
        if self.closed:
            return
        now = self.loop.time()
        head, idle = self.head_deadline, self.idle_deadline
        if head is not None and now >= head:
            self.fail(TimeoutError())
        elif idle is not None and now >= idle:
            self.idle_deadline = None
            self.pool._expire_idle(self)
        elif head is not None or idle is not None:
            due = min(d for d in (head, idle) if d is not None)
            self._watch = self.loop.call_at(due, self._on_watch)

    def stop_watching(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None

    async def drain(self) -> None:
        if self.closed:
            raise _Closed("the upstream closed the connection")
        if not self._write_paused:
            return
        waiter = self.loop.create_future()
        self._drain_waiter = waiter
        await waiter

    async def upload(self, read: BodyReader, length: int | None, read_timeout: float) -> None:
        """Send the request body: ``length`` bytes, or chunked when it is ``None``."""
        transport = self.transport
        assert transport is not None
        sent = 0
        try:
            while length is None or sent < length:
                chunk = await read()
                if not chunk:
                    break
                if self.closed:
                    raise _Closed("the upstream closed the connection")
                sent += len(chunk)
                if length is None:
                    transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
                else:
                    transport.write(chunk)
                await self.drain()
            if length is None:
                transport.write(b"0\r\n\r\n")
            elif sent != length:
                raise UpstreamError("the request body ended before its Content-Length")
            self.request_sent = True
            self.arm_head_timer(read_timeout)
        except Exception as exc:
            if self.complete:
                # The upstream answered without waiting for the whole body: the response
                # stands, only the connection is done for.
                self.keep_alive = False
                self.abort()
            elif self.in_head:
                self.fail(exc)  # raised by ``request``: the caller knows its body's errors
            else:
                self.fail(UpstreamError(f"the request body failed: {type(exc).__name__}"))

    async def read(self, timeout: float) -> bytes:
        """The next piece of the body (all that is buffered), ``b""`` at its end."""
        while True:
            if self.body:
                return self._take()
            if self.complete:
                return b""
            if self.error is not None:
                raise self.error
            waiter = self.loop.create_future()
            self.body_waiter = waiter
            timer = self.loop.call_later(timeout, _expire, waiter)
            try:
                await waiter
            except TimeoutError:
                self.fail(TimeoutError())
                raise
            finally:
                timer.cancel()
                self.body_waiter = None

    def _take(self) -> bytes:
        body = self.body
        chunk = body[0] if len(body) == 1 else b"".join(body)
        body.clear()
        self.buffered = 0
        if self.read_paused and self.transport is not None and not self.closed:
            self.read_paused = False
            self.transport.resume_reading()
        return chunk

    def at_eof(self) -> bool:
        return self.complete and not self.body


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class UpstreamResponse:
    """A response whose head has arrived; read its body, then ``release()`` it (always)."""

    __slots__ = ("status", "reason", "fields", "_conn", "_read_timeout", "_released")

    def __init__(self, conn: _Connection, read_timeout: float) -> None:
        self._conn = conn
        self._read_timeout = read_timeout
        self._released = False
        self.status = conn.status
        self.reason: bytes = conn.reason
        self.fields: list[tuple[bytes, bytes]] = conn.headers  # as received, in order

    @property
    def headers(self) -> CIMultiDict[str]:
        """The header fields as text (UTF-8, undecodable bytes kept as surrogates)."""
        return CIMultiDict(
            (n.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape"))
            for n, v in self.fields
        )

    async def read(self) -> bytes:
        """The next piece of the body, ``b""`` at its end. Raises ``UpstreamError`` or
        ``TimeoutError`` (no byte for ``read_timeout``)."""
        return await self._conn.read(self._read_timeout)

    def at_eof(self) -> bool:
        """True when the whole body was read."""
        return self._conn.at_eof()

    def arrived_whole(self) -> bytes | None:
        """The whole body if it has already arrived with the head (a small answer), else None;
        never waits. Taken, it counts as read."""
        conn = self._conn
        if not conn.complete or conn.error is not None:
            return None
        return conn._take() if conn.body else b""

    def release(self) -> None:
        """Give the connection back to the pool, or close it when it cannot be reused."""
        if not self._released:
            self._released = True
            self._conn.pool._release(self._conn)

    def close(self) -> None:
        """Drop the connection whatever state it is in."""
        self._conn.fail(UpstreamError("closed by the consumer"))
        self.release()


class UpstreamPool:
    """Keep-alive HTTP/1.1 connections per origin; ``request`` sends one exchange."""

    def __init__(
        self,
        *,
        connect_timeout: float = 5.0,
        keepalive_timeout: float = 30.0,
        max_idle_per_origin: int = 256,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.keepalive_timeout = keepalive_timeout
        self.max_idle_per_origin = max_idle_per_origin
        self._ssl_context = ssl_context
        self._idle: dict[Origin, list[_Connection]] = {}
        self._all: set[_Connection] = set()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def idle_count(self, origin: Origin) -> int:
        return len(self._idle.get(origin, ()))

    async def request(
        self,
        origin: Origin,
        method: str,
        target: str,
        headers: Any,
        *,
        host: str | None = None,
        body: BodyReader | None = None,
        length: int | None = None,
        read_timeout: float,
    ) -> UpstreamResponse:
        """Send one request and return once the response head has arrived.

        ``headers`` (any ``items()`` mapping) go as given, but ``Host`` is ``host`` or the
        origin's and the framing follows ``body``/``length``. ``body`` is called for the next
        chunk (``b""`` at the end); its exceptions end the exchange and are raised here (or
        from the response's ``read`` once the head was already relayed).
        """
        host = host or origin.host_header
        head: bytes | None = serialize_head(
            method, target, host, headers, has_body=body is not None, length=length
        )
        conn = self._take_idle(origin)
        # An idle connection may have been closed by the upstream as we took it: a request
        # without a body is then asked again, once, on a new connection (nothing was answered,
        # nothing is lost).
        retry = conn is not None and body is None
        if conn is None:
            conn = await self._connect(origin)
        while True:
            if head is None:  # a retry: serialized again rather than kept while waiting (a
                # thousand requests waiting for their upstreams held a thousand copies)
                head = serialize_head(
                    method, target, host, headers, has_body=body is not None, length=length
                )
            waiter = self._send(conn, head, method, body, length, read_timeout)
            head = None
            try:
                await waiter
                return UpstreamResponse(conn, read_timeout)
            except _Closed:
                self._discard(conn)
                if not retry or conn.got_bytes:
                    raise
            except BaseException:
                self._discard(conn)
                raise
            retry = False
            conn = await self._connect(origin)

    def _send(
        self,
        conn: _Connection,
        head: bytes,
        method: str,
        body: BodyReader | None,
        length: int | None,
        read_timeout: float,
    ) -> asyncio.Future[None]:
        """Start the exchange on ``conn``; the future is done when the response head arrived."""
        conn.begin(head, head_only=method == "HEAD")
        if body is None:
            conn.request_sent = True
            conn.arm_head_timer(read_timeout)
        else:
            conn.writer = self.loop.create_task(conn.upload(body, length, read_timeout))
        waiter = conn.head_waiter
        assert waiter is not None
        return waiter

    def _take_idle(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to have expired
            conn.idle_until(None)
            if not conn.closed:
                return conn
        return None

    async def _connect(self, origin: Origin) -> _Connection:
        if self._closed:
            raise UpstreamError("the upstream pool is closed")
        tls = origin.scheme == "https"
        if tls and self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        async with asyncio.timeout(self.connect_timeout):
            _, conn = await self.loop.create_connection(
                lambda: _Connection(self, origin),
                origin.host,
                origin.port,
                ssl=self._ssl_context if tls else None,
                server_hostname=origin.host if tls else None,
            )
        if self._closed:
            conn.abort()
            raise UpstreamError("the upstream pool is closed")
        self._all.add(conn)
        return conn

    def _release(self, conn: _Connection) -> None:
        writer = conn.writer
        if writer is not None and not writer.done():
            writer.cancel()  # a body the upstream did not wait for; or only its EOF is left
        if not conn.reusable or self._closed:
            self._discard(conn)
            return
        conn.busy = False
        conn.writer = None
        conn.headers = _NO_FIELDS  # not kept while idle: hundreds may be
        idle = self._idle.setdefault(conn.origin, [])
        if len(idle) >= self.max_idle_per_origin:
            self._discard(conn)
            return
        idle.append(conn)
        conn.idle_until(self.loop.time() + self.keepalive_timeout)

    def _expire_idle(self, conn: _Connection) -> None:
        conn.close()
        self._forget(conn)

    def _discard(self, conn: _Connection) -> None:
        writer = conn.writer
        if writer is not None and not writer.done():
            writer.cancel()
        if conn.complete and not conn.body and conn.error is None:
            conn.close()
        else:
            conn.abort()
        self._forget(conn)

    def _forget(self, conn: _Connection) -> None:
        self._all.discard(conn)
        conn.stop_watching()
        idle = self._idle.get(conn.origin)
        if idle and conn in idle:
            idle.remove(conn)

    async def close(self) -> None:
        """Close every connection, idle or in use."""
        self._closed = True
        for conn in list(self._all):
            if conn.writer is not None and not conn.writer.done():
                conn.writer.cancel()
            if conn.busy and not conn.complete:
                conn.fail(UpstreamError("the upstream pool closed"))
            else:
                conn.close()
            self._forget(conn)
        self._idle.clear()
