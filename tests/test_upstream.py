"""The upstream pool (gateway.upstream) against real loopback servers.

Raw asyncio servers answer byte for byte what each test scripts, including what no sane server
sends; aiohttp servers check bodies and TLS. What this proves: every response framing (length,
chunked, until close, HEAD, 1xx, 204/304), headers in order with duplicates, bounded and
malformed heads refused, the reuse rules (keep-alive, expiry, idle bound, a stale idle connection
never handed out, one retry), timeouts, flow control both ways, TLS, and close().
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ipaddress
import json
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yarl
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from multidict import CIMultiDict

from gateway.proxy import _target
from gateway.routing import upstream_url
from gateway.upstream import (
    MAX_HEAD_SIZE,
    HeadItem,
    Origin,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
    serialize_head,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
MiB = 1024 * 1024


# --- servers ----------------------------------------------------------------------------------


@dataclass
class Raw:
    """A raw TCP server: ``handler`` runs once per connection; connections are counted."""

    handler: Handler
    server: asyncio.Server | None = None
    connections: int = 0
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    heads: list[bytes] = field(default_factory=list)

    @property
    def origin(self) -> Origin:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return Origin.of(f"http://127.0.0.1:{port}")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        """One request head (and its Content-Length body); ``b""`` when the client closed."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return b""
        self.heads.append(head)
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                await reader.readexactly(int(value))
        return head


@pytest.fixture
async def raw() -> AsyncIterator[Callable[[Handler], Awaitable[Raw]]]:
    started: list[Raw] = []

    async def start(handler: Handler) -> Raw:
        server = Raw(handler)
        server.server = await asyncio.start_server(server._serve, "127.0.0.1", 0)
        started.append(server)
        return server

    yield start
    for server in started:
        assert server.server is not None
        server.server.close()
        for writer in server.writers:
            writer.close()
        await server.server.wait_closed()


def answering(*responses: bytes, close: bool = False) -> Callable[[Raw], Handler]:
    """A handler answering each request on a connection with the next of ``responses``
    (the last one repeats); ``close`` hangs up after each answer."""

    def make(server: Raw) -> Handler:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            turn = 0
            while await server.read_request(reader):
                writer.write(responses[min(turn, len(responses) - 1)])
                await writer.drain()
                turn += 1
                if close:
                    return

        return handler

    return make


async def raw_answering(
    raw: Callable[[Handler], Awaitable[Raw]], *responses: bytes, close: bool = False
) -> Raw:
    holder: list[Raw] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await answering(*responses, close=close)(holder[0])(reader, writer)

    server = await raw(handler)
    holder.append(server)
    return server


@pytest.fixture
async def pool() -> AsyncIterator[UpstreamPool]:
    upstreams = UpstreamPool(connect_timeout=2.0, keepalive_timeout=5.0)
    yield upstreams
    await upstreams.close()


async def get(
    pool: UpstreamPool, origin: Origin, method: str = "GET", timeout: float = 2.0
) -> tuple[UpstreamResponse, bytes]:
    """One exchange, the whole body read and the connection released."""
    response = await pool.request(origin, method, "/x", {}, read_timeout=timeout)
    body = b""
    try:
        while chunk := await response.read():
            body += chunk
    finally:
        response.release()
    return response, body


async def wait_for(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


# --- responses: framing and reuse --------------------------------------------------------------

FRAMINGS = {
    "length": (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", b"hello", True),
    "chunked": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n",
        b"hello",
        True,
    ),
    "until-close": (b"HTTP/1.1 200 OK\r\n\r\nhello", b"hello", False),
    "http/1.0": (b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello", b"hello", False),
    "connection-close": (
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello",
        b"hello",
        False,
    ),
    "204": (b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n", b"", True),
    "304": (b'HTTP/1.1 304 Not Modified\r\nETag: "v"\r\nContent-Length: 9\r\n\r\n', b"", True),
    "1xx-skipped": (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        b"hello",
        True,
    ),
}


@pytest.mark.parametrize("name", FRAMINGS)
async def test_framing_body_and_reuse(
    raw: Callable[[Handler], Awaitable[Raw]], pool: UpstreamPool, name: str
) -> None:
    response_bytes, body, reusable = FRAMINGS[name]
    server = await raw_answering(raw, response_bytes, close=not reusable)
    for _ in range(2):
        response, got = await get(pool, server.origin)
        assert got == body
        assert response.status in (200, 204, 304)
        assert response.at_eof()
    # Two requests, one connection exactly when the response allowed keeping it.
    assert server.connections == (1 if reusable else 2)


async def test_status_reason_and_headers_in_order_with_duplicates(
    raw: Callable[[Handler], Awaitable[Raw]], pool: UpstreamPool
) -> None:
    server = await raw_answering(
        raw,
        b"HTTP/1.1 299 Very Fine\r\nSet-Cookie: a=1\r\nX-Mid: m\r\nset-cookie: b=2\r\n"
        b"Content-Length: 0\r\n\r\n",
    )
    response, _ = await get(pool, server.origin)
    assert (response.status, response.reason) == (299, b"Very Fine")
    assert list(response.headers.items()) == [
        ("Set-Cookie", "a=1"),
        ("X-Mid", "m"),
        ("set-cookie", "b=2"),
        ("Content-Length", "0"),
    ]


async def test_head_has_no_body_and_its_connection_is_not_reused(
    raw: Callable[[Handler], Awaitable[Raw]], pool: UpstreamPool
) -> None:
    # The length is the GET's: a parser that did not know about HEAD would wait for 11 bytes.
    server = await raw_answering(raw, b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n")
    response, body = await get(pool, server.origin, "HEAD")
    assert (response.status, body, response.headers["Content-Length"]) == (200, b"", "11")
    await get(pool, server.origin, "HEAD")
    assert server.connections == 2


@pytest.mark.parametrize(
    "response_bytes",
    [
        pytest.param(b"NOT HTTP AT ALL\r\n\r\n", id="garbage"),
        pytest.param(b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n", id="bad-header"),
        pytest.param(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n", id="101"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * MAX_HEAD_SIZE + b"\r\n\r\n", id="big-header"
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\n" + b"X-A: 1\r\n" * 300 + b"Content-Length: 0\r\n\r\n",
            id="too-many-headers",
        ),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel", id="closed-early"),
        pytest.param(b"", id="closed-silently"),
    ],
)
async def test_a_bad_or_oversized_response_is_an_upstream_error(
    raw: Callable[[Handler], Awaitable[Raw]], pool: UpstreamPool, response_bytes: bytes
) -> None:
    server = await raw_answering(raw, response_bytes, close=True)
    with pytest.raises(UpstreamError):
        await get(pool, server.origin)
    # Negative control: the same pool still works against a sane server.
    sane = await raw_answering(raw, FRAMINGS["length"][0])
    assert (await get(pool, sane.origin))[1] == b"hello"


async def test_a_head_that_never_ends_is_cut_at_the_limit(
    raw: Callable[[Handler], Awaitable[Raw]], pool: UpstreamPool
) -> None:
    # One header value growing in small pieces: the parser would keep gathering it forever.
    written = 0

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal written
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nX-Big: ")
        while written < 64 * MiB:
            writer.write(b"a" * 1024)
            written += 1024
            await writer.drain()
            await asyncio.sleep(0)

    server = await raw(endless)
    with pytest.raises(UpstreamError):
        await pool.request(server.origin, "GET", "/", {}, read_timeout=10)
    assert written < 8 * MiB


async def test_a_head_just_under_the_limit_passes(
    raw: Callable[[Handler], Awaitable[Raw]], pool: UpstreamPool
) -> None:
    big = b"a" * (MAX_HEAD_SIZE - 200)
    server = await raw_answering(raw, b"HTTP/1.1 200 OK\r\nX-Big: " + big + b"\r\n\r\n", close=True)
    response, _ = await get(pool, server.origin)
    assert response.headers["X-Big"] == big.decode()


async def test_upstream_dying_mid_body_fails_the_read(
    raw: Callable[[Handler], Awaitable[Raw]], pool: UpstreamPool
) -> None:
    server = await raw_answering(
        raw, b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 100, close=True
    )
    response = await pool.request(server.origin, "GET", "/", {}, read_timeout=2)
    try:
        assert await response.read() == b"x" * 100
        with pytest.raises(UpstreamError):
            await response.read()
    finally:
        response.release()


# --- reuse rules --------------------------------------------------------------------------------


async def test_an_idle_connection_the_upstream_closed_is_never_handed_out(
    raw: Callable[[Handler], Awaitable[Raw]], pool: UpstreamPool
) -> None:
    # The upstream says keep-alive, then hangs up while the connection sits idle.
    server = await raw_answering(raw, FRAMINGS["length"][0], close=True)
    await get(pool, server.origin)
    await wait_for(lambda: pool.idle_count(server.origin) == 0)
    assert (await get(pool, server.origin))[1] == b"hello"
    assert server.connections == 2


async def test_a_request_failing_on_a_reused_connection_is_retried_once(
    raw: Callable[[Handler], Awaitable[Raw]], pool: UpstreamPool
) -> None:
    # First connection: answers once, then reads the next request and hangs up unanswered
    # (the race of an upstream closing an idle connection just as it is reused).
    holder: list[Raw] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server = holder[0]
        first = server.connections == 1
        await server.read_request(reader)
        writer.write(FRAMINGS["length"][0])
        if first:
            await server.read_request(reader)
            writer.transport.abort()
            return
        while await server.read_request(reader):
            writer.write(FRAMINGS["length"][0])

    server = await raw(handler)
    holder.append(server)
    await get(pool, server.origin)
    assert (await get(pool, server.origin))[1] == b"hello"  # retried on a new connection
    assert server.connections == 2 and len(server.heads) == 3


async def test_a_request_with_a_body_is_not_retried(
    raw: Callable[[Handler], Awaitable[Raw]], pool: UpstreamPool
) -> None:
    holder: list[Raw] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await holder[0].read_request(reader)
        writer.write(FRAMINGS["length"][0])
        await holder[0].read_request(reader)
        writer.transport.abort()

    server = await raw(handler)
    holder.append(server)
    await get(pool, server.origin)
    pieces = [b"data", b""]

    async def body() -> bytes:
        return pieces.pop(0)

    with pytest.raises(UpstreamError):
        await pool.request(server.origin, "POST", "/", {}, body=body, length=4, read_timeout=2)
    assert server.connections == 1


async def test_idle_connections_expire(
    raw: Callable[[Handler], Awaitable[Raw]],
) -> None:
    server = await raw_answering(raw, FRAMINGS["length"][0])
    upstreams = UpstreamPool(keepalive_timeout=0.1)
    try:
        await get(upstreams, server.origin)
        assert upstreams.idle_count(server.origin) == 1
        await wait_for(lambda: upstreams.idle_count(server.origin) == 0)
        await get(upstreams, server.origin)
        assert server.connections == 2
    finally:
        await upstreams.close()


async def test_idle_connections_per_origin_are_bounded(
    raw: Callable[[Handler], Awaitable[Raw]],
) -> None:
    server = await raw_answering(raw, FRAMINGS["length"][0])
    upstreams = UpstreamPool(max_idle_per_origin=2)
    try:
        await asyncio.gather(*(get(upstreams, server.origin) for _ in range(5)))
        assert server.connections == 5
        assert upstreams.idle_count(server.origin) == 2
    finally:
        await upstreams.close()


async def test_close_closes_idle_and_busy_connections(
    raw: Callable[[Handler], Awaitable[Raw]],
) -> None:
    server = await raw_answering(
        raw, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf", FRAMINGS["length"][0]
    )
    upstreams = UpstreamPool()
    busy = await upstreams.request(server.origin, "GET", "/", {}, read_timeout=2)
    await upstreams.close()
    assert await busy.read() == b"half"  # what had arrived is still there...
    with pytest.raises(UpstreamError):
        await busy.read()  # ...then the cut
    busy.release()
    with pytest.raises(UpstreamError):
        await upstreams.request(server.origin, "GET", "/", {}, read_timeout=2)


# --- timeouts --------------------------------------------------------------------------------


async def test_a_silent_upstream_times_out_waiting_for_the_head(
    raw: Callable[[Handler], Awaitable[Raw]], pool: UpstreamPool
) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client hangs up

    server = await raw(silent)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        await pool.request(server.origin, "GET", "/", {}, read_timeout=0.2)
    assert 0.18 < loop.time() - started < 1.5


async def test_a_silence_mid_body_times_out(
    raw: Callable[[Handler], Awaitable[Raw]], pool: UpstreamPool
) -> None:
    server = await raw_answering(raw, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nfirst")
    response = await pool.request(server.origin, "GET", "/", {}, read_timeout=0.2)
    try:
        assert await response.read() == b"first"
        with pytest.raises(TimeoutError):
            await response.read()
    finally:
        response.release()
    assert pool.idle_count(server.origin) == 0


async def test_connect_refused_is_an_os_error(pool: UpstreamPool) -> None:
    sock_server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = sock_server.sockets[0].getsockname()[1]
    sock_server.close()
    await sock_server.wait_closed()
    with pytest.raises(OSError):
        await pool.request(Origin.of(f"http://127.0.0.1:{port}"), "GET", "/", {}, read_timeout=1)


# --- flow control -----------------------------------------------------------------------------


async def test_a_response_faster_than_its_reader_is_not_buffered_whole(
    raw: Callable[[Handler], Awaitable[Raw]], pool: UpstreamPool
) -> None:
    size = 16 * MiB
    block = os.urandom(64 * 1024)
    written = 0

    async def fast(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal written
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        for _ in range(size // len(block)):
            writer.write(block)
            written += len(block)
            await writer.drain()

    server = await raw(fast)
    response = await pool.request(server.origin, "GET", "/", {}, read_timeout=5)
    try:
        await asyncio.sleep(0.3)  # the reader is behind: the upstream must be held back
        assert written < size // 2
        digest, total = hashlib.sha256(), 0
        while chunk := await response.read():
            digest.update(chunk)
            total += len(chunk)
    finally:
        response.release()
    assert total == size
    assert digest.hexdigest() == hashlib.sha256(block * (size // len(block))).hexdigest()


async def test_a_request_body_waits_for_a_slow_upstream(
    raw: Callable[[Handler], Awaitable[Raw]], pool: UpstreamPool
) -> None:
    size = 64 * MiB
    block = b"z" * (256 * 1024)
    produced = 0
    go = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await go.wait()
        await reader.readexactly(size)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    async def body() -> bytes:
        nonlocal produced
        if produced >= size:
            return b""
        produced += len(block)
        return block

    server = await raw(slow)
    request = asyncio.create_task(
        pool.request(server.origin, "PUT", "/", {}, body=body, length=size, read_timeout=5)
    )
    await asyncio.sleep(0.3)
    assert produced < size // 4  # held back by the transport, not read ahead into memory
    go.set()
    response = await asyncio.wait_for(request, 10)
    assert await response.read() == b"ok"
    response.release()


# --- request bodies against aiohttp --------------------------------------------------------------


async def _echo(request: web.Request) -> web.Response:
    data = await request.read()
    return web.json_response(
        {
            "sha": hashlib.sha256(data).hexdigest(),
            "length": request.headers.get("Content-Length"),
            "te": request.headers.get("Transfer-Encoding"),
            "headers": [[k, v] for k, v in request.headers.items()],
        }
    )


@pytest.fixture
async def echo() -> AsyncIterator[TestServer]:
    app = web.Application(client_max_size=16 * MiB)
    app.router.add_route("*", "/{tail:.*}", _echo)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield server
    await server.close()


@pytest.mark.parametrize("known_length", [True, False])
async def test_request_bodies_framed_by_length_or_chunked(
    echo: TestServer, pool: UpstreamPool, known_length: bool
) -> None:
    data = os.urandom(3 * MiB + 5)
    pieces = [data[i : i + 100_000] for i in range(0, len(data), 100_000)] + [b""]

    async def body() -> bytes:
        return pieces.pop(0)

    origin = Origin.of(f"http://127.0.0.1:{echo.port}")
    response = await pool.request(
        origin,
        "POST",
        "/up",
        {"X-A": "1"},
        body=body,
        length=len(data) if known_length else None,
        read_timeout=5,
    )
    answer = json.loads(b"".join([c async for c in _chunks(response)]))
    assert answer["sha"] == hashlib.sha256(data).hexdigest()
    assert (answer["length"], answer["te"]) == (
        (str(len(data)), None) if known_length else (None, "chunked")
    )
    assert answer["headers"][0] == ["Host", f"127.0.0.1:{echo.port}"]


async def _chunks(response: UpstreamResponse) -> AsyncIterator[bytes]:
    try:
        while chunk := await response.read():
            yield chunk
    finally:
        response.release()


async def test_a_failing_body_fails_the_request_and_the_connection(
    echo: TestServer, pool: UpstreamPool
) -> None:
    class Boom(Exception):
        pass

    sent = [b"part"]

    async def body() -> bytes:
        if sent:
            return sent.pop()
        raise Boom()

    origin = Origin.of(f"http://127.0.0.1:{echo.port}")
    with pytest.raises(Boom):
        await pool.request(origin, "POST", "/", {}, body=body, read_timeout=2)
    assert pool.idle_count(origin) == 0


# --- the request head ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "has_body", "length", "framing"),
    [
        ("GET", False, None, []),
        ("POST", False, None, ["Content-Length: 0"]),
        ("POST", False, 0, ["Content-Length: 0"]),
        ("PUT", True, 12, ["Content-Length: 12"]),
        ("PATCH", True, None, ["Transfer-Encoding: chunked"]),
    ],
)
def test_request_head_host_first_framing_last_nothing_invented(
    method: str, has_body: bool, length: int | None, framing: list[str]
) -> None:
    headers = CIMultiDict(
        [("X-A", "1"), ("Host", "ignored"), ("Content-Length", "99"), ("x-a", "2")]
    )
    head = serialize_head(method, "/p?q", "up:81", headers, has_body=has_body, length=length)
    lines = head.decode().split("\r\n")
    assert lines[:2] == [f"{method} /p?q HTTP/1.1", "Host: up:81"]
    assert lines[2:-2] == ["X-A: 1", "x-a: 2", *framing]
    assert lines[-2:] == ["", ""]


@pytest.mark.parametrize("value", ["a\r\nX-Evil: 1", "a\nb", "a\rb", "a\x00b", "a\x7fb"])
def test_request_head_refuses_control_characters(value: str) -> None:
    with pytest.raises(ValueError):
        serialize_head("GET", "/", "h", {"X-A": value}, has_body=False, length=None)
    serialize_head("GET", "/", "h", {"X-A": "tab\tok é"}, has_body=False, length=None)


def test_request_head_from_fields_and_blocks_keeps_their_order() -> None:
    """The gateway's own path: client fields as received, its own lines as blocks."""
    items: list[HeadItem] = [
        (b"Accept", b"*/*"),
        b"X-User-Id: u1\r\nX-User-Roles: a,b",
        (b"Cookie", b"\xff"),
        b"X-Request-Id: r",
    ]
    head = serialize_head("GET", "/p", "up:81", items, has_body=False, length=None)
    assert head == (
        b"GET /p HTTP/1.1\r\nHost: up:81\r\nAccept: */*\r\nX-User-Id: u1\r\n"
        b"X-User-Roles: a,b\r\nCookie: \xff\r\nX-Request-Id: r\r\n\r\n"
    )


def test_request_head_passes_undecodable_client_bytes_unchanged() -> None:
    value = b"\xff\xfe".decode("utf-8", "surrogateescape")
    head = serialize_head("GET", "/", "h", {"X-A": value}, has_body=False, length=None)
    assert b"X-A: \xff\xfe\r\n" in head


@pytest.mark.parametrize(
    "base", ["http://h:1", "http://h:1/", "http://h/base/", "https://h:443/b%20x", "http://[::1]:8"]
)
@pytest.mark.parametrize("path", ["/a/./b/../c", "/a%3Bb;c=d/%25x", "//x", "", "/€"])
@pytest.mark.parametrize("query", ["", "x=%2F&y=a+b;c&&w"])
def test_target_and_host_match_what_aiohttp_would_send(base: str, path: str, query: str) -> None:
    url = upstream_url(base, path, query)
    parsed = yarl.URL(base, encoded=True)
    assert _target(parsed.raw_path.rstrip("/"), path, query) == url.raw_path_qs
    assert Origin.of(parsed).host_header == url.host_port_subcomponent


# --- TLS ----------------------------------------------------------------------------------------


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_https_upstream_with_verified_certificate(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    app = web.Application(client_max_size=16 * MiB)
    app.router.add_route("*", "/{tail:.*}", _echo)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
    await site.start()
    port = runner.addresses[0][1]
    origin = Origin.of(f"https://127.0.0.1:{port}")
    trusting = ssl.create_default_context(cafile=str(cert))
    good = UpstreamPool(ssl_context=trusting)
    default = UpstreamPool()  # the system's CAs: the self-signed certificate is refused
    try:
        for _ in range(2):
            response = await good.request(origin, "GET", "/tls", {}, read_timeout=5)
            assert response.status == 200
            assert b"sha" in b"".join([c async for c in _chunks(response)])
        assert good.idle_count(origin) == 1  # kept alive over TLS too
        with pytest.raises(ssl.SSLCertVerificationError):
            await default.request(origin, "GET", "/tls", {}, read_timeout=5)
    finally:
        await good.close()
        await default.close()
        await runner.cleanup()
