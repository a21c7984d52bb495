"""gateway.server in-process, over raw sockets, with short limits injected.

A small app stands in for the gateway: the connection handling under test does not depend on
what the handler does, only on how it reads the body.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
from aiohttp import web
from aiohttp.http import HttpVersion, HttpVersion10, HttpVersion11

from gateway.errors import RequestHeaderFieldsTooLarge
from gateway.server import (
    Exchange,
    GatewayRunner,
    Limits,
    framing_problem,
    parser_error,
    raw_problem,
)


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, object]:
        data = json.loads(self.body)
        assert isinstance(data, dict)
        return data


async def read_response(reader: asyncio.StreamReader, timeout: float = 5.0) -> Response:
    """One response framed by Content-Length (everything these tests get back)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines[1:] if line)}
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", 0))), 5)
    return Response(int(lines[0].split(" ")[1]), headers, body)


async def closed_by_peer(reader: asyncio.StreamReader, timeout: float = 5.0) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), timeout) == b""
    except ConnectionResetError:
        return True


# -- the stand-in app ------------------------------------------------------------------


async def ok(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def read_body(request: web.Request) -> web.Response:
    total = 0
    async for chunk in request.content.iter_any():
        total += len(chunk)
    return web.json_response({"received": total})


async def read_late(request: web.Request) -> web.Response:
    """Let the body pile up until flow control stops the client, then read it all."""
    await asyncio.sleep(float(request.query.get("wait", "1")))
    return await read_body(request)


async def slow(request: web.Request) -> web.Response:
    await asyncio.sleep(0.5)
    return web.Response(text="slept")


async def boom(request: web.Request) -> web.Response:
    raise RuntimeError("/secret/path.py exploded")


def stand_in() -> web.Application:
    app = web.Application()
    app.router.add_get("/", ok)
    app.router.add_post("/read", read_body)
    app.router.add_post("/read-late", read_late)
    app.router.add_get("/slow", slow)
    app.router.add_get("/boom", boom)
    return app


@dataclass
class Served:
    port: int
    runner: GatewayRunner

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)

    async def exchange(self, data: bytes) -> tuple[Response, bool]:
        reader, writer = await self.connect()
        try:
            writer.write(data)
            response = await read_response(reader)
            return response, await closed_by_peer(reader)
        finally:
            writer.close()


Serve = Callable[..., Awaitable[Served]]
Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]

FAST = Limits(
    header_timeout=0.5,
    body_idle_timeout=0.5,
    body_grace=0.5,
    body_min_rate=100.0,
    keepalive_timeout=5.0,
    lingering_time=0.2,
)


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    runners: list[GatewayRunner] = []

    async def start(limits: Limits = FAST, **kwargs: object) -> Served:
        runner = GatewayRunner(stand_in(), limits=limits, **kwargs)  # type: ignore[arg-type]
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        return Served(port, runner)

    yield start
    for runner in runners:
        await runner.cleanup()


GET = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"
CLOSE = b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"


# -- parser refusals -------------------------------------------------------------------

MARK = b"zq7marker"  # in every malformed request; a refusal must never echo it

REFUSED = [
    ("cl-and-te", b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n", 400),
    ("duplicate-cl", b"Content-Length: 3\r\nContent-Length: 3\r\n", 400),
    ("conflicting-cl", b"Content-Length: 3\r\nContent-Length: 4\r\n", 400),
    ("cl-list", b"Content-Length: 3, 3\r\n", 400),
    ("cl-sign", b"Content-Length: +3\r\n", 400),
    ("te-xchunked", b"Transfer-Encoding: xchunked\r\n", 400),
    ("te-chunked-identity", b"Transfer-Encoding: chunked, identity\r\n", 400),
    ("te-identity", b"Transfer-Encoding: identity\r\n", 400),
    ("te-gzip-chunked", b"Transfer-Encoding: gzip, chunked\r\n", 400),
    ("te-twice", b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", 400),
    ("te-space-before-colon", b"Transfer-Encoding : chunked\r\n", 400),
    ("te-obs-text", b"Transfer-Encoding: chunked\xff\r\n", 400),
    ("obs-fold", b"X-A: " + MARK + b"\r\n folded\r\n", 400),
    ("nul-in-value", b"X-A: " + MARK + b"\x00\r\n", 400),
    ("cr-in-value", b"X-A: " + MARK + b"\rx\r\n", 400),
    ("bare-lf", b"X-A: " + MARK + b"\nX-B: 1\r\n", 400),
    ("space-before-colon", b"X-A" + MARK + b" : 1\r\n", 400),
    ("header-too-long", b"X-A: " + MARK * 2000 + b"\r\n", 431),
    ("too-many-headers", b"".join(b"X-%d: 1\r\n" % i for i in range(120)), 431),
]


@pytest.mark.parametrize(("name", "header", "status"), REFUSED, ids=[r[0] for r in REFUSED])
async def test_refused_heads_are_problem_json_and_close(
    serve: Serve, name: str, header: bytes, status: int
) -> None:
    served = await serve()
    request = b"POST /read HTTP/1.1\r\nHost: t\r\n" + header + b"\r\n" + b"0\r\n\r\n" + GET
    response, closed = await served.exchange(request)
    assert (response.status, closed) == (status, True)
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["status"] == status
    assert MARK not in response.body
    assert response.headers.get("x-request-id")


@pytest.mark.parametrize(
    "request_line",
    [
        b"GET / HTTP/1.2",
        b"get / HTTP/1.1",
        b"G ET / HTTP/1.1",
        b"GET /" + b"a" * 20000 + b" HTTP/1.1",
    ],
)
async def test_refused_request_lines(serve: Serve, request_line: bytes) -> None:
    served = await serve()
    response, closed = await served.exchange(request_line + b"\r\nHost: t\r\n\r\n")
    assert response.status in (400, 431) and closed
    assert response.headers["content-type"] == "application/problem+json"


async def test_http_0_9_is_refused(serve: Serve) -> None:
    served = await serve()
    response, closed = await served.exchange(b"GET /\r\n\r\n")
    assert (response.status, closed) == (400, True)


async def test_te_on_http_1_0_is_refused_even_when_chunked(serve: Serve) -> None:
    served = await serve()
    request = b"POST /read HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    response, closed = await served.exchange(request)
    assert (response.status, closed) == (400, True)


@pytest.mark.parametrize(
    ("te", "chunks"),
    [
        (b"chunked", b"3\r\nabc\r\n0\r\n\r\n"),
        (b"CHUNKED", b"3\r\nabc\r\n0\r\n\r\n"),
        (b"\tChunked ", b"3\r\nabc\r\n0\r\n\r\n"),
        (b"chunked", b"3;ext=1\r\nabc\r\n0\r\n\r\n"),
        (b"chunked", b'3;ext="a b"\r\nabc\r\n0;last\r\n\r\n'),
        (b"chunked", b"3\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n"),
    ],
)
async def test_valid_chunked_bodies_still_work(serve: Serve, te: bytes, chunks: bytes) -> None:
    served = await serve()
    request = b"POST /read HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: " + te + b"\r\n\r\n" + chunks
    response, _ = await served.exchange(
        request + b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    assert response.status == 200 and response.json() == {"received": 3}


async def test_an_unexpected_error_is_a_bare_500(serve: Serve) -> None:
    served = await serve()
    response, _ = await served.exchange(b"GET /boom HTTP/1.1\r\nHost: t\r\n\r\n")
    assert response.status == 500
    assert response.headers["content-type"] == "application/problem+json"
    assert b"exploded" not in response.body and b".py" not in response.body


async def test_pipelined_requests_are_answered_in_order(serve: Serve) -> None:
    served = await serve()
    reader, writer = await served.connect()
    writer.write(
        b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n"
        + b"POST /read HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello"
        + CLOSE
    )
    first, second, third = [await read_response(reader) for _ in range(3)]
    assert (first.status, first.body) == (200, b"slept")
    assert second.json() == {"received": 5}
    assert (third.status, third.body) == (200, b"ok")
    assert await closed_by_peer(reader)
    writer.close()


async def test_expect_100_continue_is_answered_before_the_body(serve: Serve) -> None:
    served = await serve()
    reader, writer = await served.connect()
    writer.write(
        b"POST /read HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n"
    )
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"abc")
    response = await read_response(reader)
    assert response.status == 200 and response.json() == {"received": 3}
    writer.close()


async def test_http_1_0_keeps_alive_only_when_asked(serve: Serve) -> None:
    served = await serve()
    reader, writer = await served.connect()
    writer.write(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    response = await read_response(reader)
    assert response.headers["connection"] == "keep-alive"
    writer.write(b"GET / HTTP/1.0\r\n\r\n")
    assert (await read_response(reader)).status == 200
    assert await closed_by_peer(reader)
    writer.close()


# -- deadlines -------------------------------------------------------------------------


async def test_silent_connection_gets_408_after_the_header_timeout(serve: Serve) -> None:
    served = await serve()
    reader, writer = await served.connect()
    started = time.monotonic()
    response = await read_response(reader)
    elapsed = time.monotonic() - started
    writer.close()
    assert response.status == 408 and response.headers["connection"] == "close"
    assert 0.4 < elapsed < 1.5


async def trickle(writer: asyncio.StreamWriter, data: bytes, pause: float) -> None:
    for byte in data:
        writer.write(bytes([byte]))
        await asyncio.sleep(pause)


async def answer_while_trickling(
    served: Served, first: bytes, rest: bytes, pause: float
) -> tuple[Response, float]:
    """Send ``first``, then ``rest`` a byte per ``pause``; the response and when it came."""
    reader, writer = await served.connect()
    writer.write(first)
    started = time.monotonic()
    sender = asyncio.create_task(trickle(writer, rest, pause))
    try:
        response = await read_response(reader)
        return response, time.monotonic() - started
    finally:
        sender.cancel()
        writer.close()


async def test_slowloris_is_cut_at_the_header_timeout(serve: Serve) -> None:
    served = await serve()
    head = b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"a" * 100  # never finished
    response, elapsed = await answer_while_trickling(served, b"", head, 0.02)
    assert response.status == 408
    assert 0.4 < elapsed < 1.5


async def test_the_head_deadline_starts_with_the_heads_first_byte(serve: Serve) -> None:
    """Keep-alive idleness is not held against the next request's head."""
    served = await serve()
    reader, writer = await served.connect()
    writer.write(GET)
    assert (await read_response(reader)).status == 200
    await asyncio.sleep(0.8)  # longer than the header timeout, shorter than keep-alive
    writer.write(GET[:10])
    await asyncio.sleep(0.2)
    writer.write(GET[10:])
    assert (await read_response(reader)).status == 200
    writer.close()


async def test_idle_keepalive_connection_is_closed(serve: Serve) -> None:
    served = await serve(Limits(header_timeout=0.5, keepalive_timeout=0.5))
    reader, writer = await served.connect()
    writer.write(GET)
    assert (await read_response(reader)).status == 200
    started = time.monotonic()
    assert await closed_by_peer(reader, timeout=3)
    assert time.monotonic() - started < 2
    writer.close()


async def test_stalled_body_gets_408_and_is_cut(serve: Serve) -> None:
    served = await serve()
    reader, writer = await served.connect()
    writer.write(b"POST /read HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
    started = time.monotonic()
    response = await read_response(reader)
    assert response.status == 408
    assert 0.4 < time.monotonic() - started < 1.5
    assert await closed_by_peer(reader)
    writer.close()


async def test_trickling_body_under_the_minimum_rate_is_cut(serve: Serve) -> None:
    served = await serve()  # 100 B/s after 0.5 s; a byte every 50 ms is never idle for 0.5 s
    head = b"POST /read HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n"
    started = time.monotonic()
    try:
        response, elapsed = await answer_while_trickling(served, head, b"x" * 1000, 0.05)
    except ConnectionResetError:
        # A handler was reading the body, so the socket closes at once: the client's next
        # bytes can make the kernel answer with a reset that overtakes the 408. Cut it is.
        elapsed = time.monotonic() - started
    else:
        assert response.status == 408
    assert 0.5 < elapsed < 2.0


async def test_a_steady_body_is_not_cut(serve: Serve) -> None:
    served = await serve()
    reader, writer = await served.connect()
    writer.write(b"POST /read HTTP/1.1\r\nHost: t\r\nContent-Length: 3000\r\n\r\n")
    for _ in range(10):  # 300 B every 0.1 s = 3000 B/s for a second: above the floor
        writer.write(b"x" * 300)
        await asyncio.sleep(0.1)
    response = await read_response(reader)
    assert response.status == 200 and response.json() == {"received": 3000}
    writer.close()


async def test_flow_control_pauses_are_not_held_against_the_client(serve: Serve) -> None:
    """The handler leaves the body unread for 1.5 s (3x the idle timeout): reading pauses,
    the client is blocked by us, and the body must still go through whole."""
    served = await serve()
    size = 8 * 1024 * 1024
    reader, writer = await served.connect()
    writer.write(
        b"POST /read-late?wait=1.5 HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % size
    )
    writer.write(b"x" * size)
    await writer.drain()
    response = await read_response(reader)
    assert response.status == 200 and response.json() == {"received": size}
    writer.close()


# -- connections -----------------------------------------------------------------------


async def test_connections_over_the_cap_are_refused_promptly(serve: Serve) -> None:
    served = await serve(Limits(header_timeout=30, max_connections=3))
    held = [await served.connect() for _ in range(3)]
    reader, writer = await served.connect()
    started = time.monotonic()
    response = await read_response(reader)
    assert response.status == 503 and response.headers["retry-after"] == "1"
    assert await closed_by_peer(reader)
    assert time.monotonic() - started < 1
    writer.close()
    # The held ones are still served, and a freed slot is usable again.
    reader, writer = held.pop()
    writer.write(GET)
    assert (await read_response(reader)).status == 200
    writer.close()
    await asyncio.sleep(0.1)
    response, closed = await served.exchange(CLOSE)
    assert (response.status, closed) == (200, True)
    for _, w in held:
        w.close()


async def test_graceful_shutdown_lets_in_flight_requests_finish(serve: Serve) -> None:
    served = await serve(shutdown_timeout=5)
    reader, writer = await served.connect()
    writer.write(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
    await asyncio.sleep(0.1)
    await served.runner.cleanup()
    response = await read_response(reader)
    assert response.status == 200 and response.body == b"slept"
    writer.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", served.port), timeout=1).close()


# -- intake per loop turn --------------------------------------------------------------


class TurnCounter:
    """Counts turns of the event loop (a task that yields once a turn) and which turn each
    request's handler started in."""

    def __init__(self) -> None:
        self.turn = 0
        self.started: list[int] = []
        self._task = asyncio.get_running_loop().create_task(self._count())

    async def _count(self) -> None:
        while True:
            self.turn += 1
            await asyncio.sleep(0)

    def stop(self) -> None:
        self._task.cancel()

    async def handler(self, exchange: Exchange) -> None:
        self.started.append(self.turn)
        await asyncio.sleep(0.05)
        exchange.send_head(200, b"OK", [], whole=b"ok")


async def requests_at_once(served: Served, count: int, request: bytes = GET) -> list[Streams]:
    """``count`` connections, opened first, then each sends ``request`` in the same turn."""
    streams = [await served.connect() for _ in range(count)]
    await asyncio.sleep(0.1)  # every connection accepted
    for _, writer in streams:
        writer.write(request)
    return streams


async def crowd(serve: Serve, intake: int, count: int) -> TurnCounter:
    """``count`` requests sent at once to a server taking in ``intake`` a turn; all must be
    answered 200 (none refused, none dropped)."""
    counter = TurnCounter()
    served = await serve(Limits(intake_per_turn=intake), handler=counter.handler)
    streams = await requests_at_once(served, count)
    responses = [await read_response(reader) for reader, _ in streams]
    counter.stop()
    for _, writer in streams:
        writer.close()
    assert [r.status for r in responses] == [200] * count
    return counter


async def test_requests_beyond_the_intake_of_a_turn_wait_for_later_turns(serve: Serve) -> None:
    per_turn = Counter((await crowd(serve, intake=2, count=12)).started)
    # Two taken in as they are read, two more released at the turn's end: never all twelve.
    assert max(per_turn.values()) <= 4
    assert len(per_turn) >= 3


async def test_a_crowd_under_the_intake_is_taken_in_one_turn(serve: Serve) -> None:
    counter = await crowd(serve, intake=64, count=12)
    assert len(set(counter.started)) <= 2  # (the last reads may land a turn later)


async def test_shutdown_serves_the_requests_still_held_for_a_later_turn(serve: Serve) -> None:
    """Read is read: a request held back by the intake is answered, not dropped, when the
    worker stops."""
    counter = TurnCounter()
    served = await serve(Limits(intake_per_turn=1), handler=counter.handler, shutdown_timeout=5)
    streams = await requests_at_once(served, 30)
    while not counter.started:
        await asyncio.sleep(0)
    await served.runner.cleanup()
    responses = [await read_response(reader) for reader, _ in streams]
    counter.stop()
    assert [r.status for r in responses] == [200] * 30
    assert len(counter.started) == 30
    for _, writer in streams:
        writer.close()


async def test_a_held_request_whose_client_leaves_is_forgotten(serve: Serve) -> None:
    counter = TurnCounter()
    served = await serve(Limits(intake_per_turn=1), handler=counter.handler)
    streams = await requests_at_once(served, 8)
    for _, writer in streams[4:]:
        writer.transport.abort()  # gone before their turn, or while served
    responses = [await read_response(reader) for reader, _ in streams[:4]]
    assert [r.status for r in responses] == [200] * 4
    response, _ = await served.exchange(CLOSE)  # and the server carries on
    counter.stop()
    assert response.status == 200
    for _, writer in streams[:4]:
        writer.close()


# -- pure parts ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "exc", "expected"),
    [
        (400, ValueError("Too many headers received"), 431),
        (400, ValueError("Invalid header value char"), 400),
        (500, RuntimeError("x"), 500),
        (504, TimeoutError(), 504),
    ],
)
def test_parser_error_statuses(status: int, exc: BaseException, expected: int) -> None:
    assert parser_error(status, exc).status == expected


def test_raw_problem_is_a_complete_closing_response() -> None:
    raw = raw_problem(RequestHeaderFieldsTooLarge("too big"))
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert b"Connection: close" in head and b"Content-Type: application/problem+json" in head
    assert b"Content-Length: %d" % len(body) in head
    assert json.loads(body)["detail"] == "too big"


def test_limits_refuse_nonsense() -> None:
    with pytest.raises(ValueError):
        Limits(header_timeout=0)
    with pytest.raises(ValueError):
        Limits(max_connections=0)
    with pytest.raises(ValueError):
        Limits(intake_per_turn=0)


@pytest.mark.parametrize(
    ("version", "te", "refused"),
    [
        (HttpVersion11, None, False),
        (HttpVersion10, None, False),
        (HttpVersion11, "chunked", False),
        (HttpVersion11, " Chunked\t", False),
        (HttpVersion10, "chunked", True),
        (HttpVersion11, "gzip, chunked", True),
        (HttpVersion11, "chunked, chunked", True),
        (HttpVersion11, "", True),
        (HttpVersion(0, 9), None, True),
        (HttpVersion(2, 0), None, True),
    ],
)
def test_framing_problem(version: HttpVersion, te: str | None, refused: bool) -> None:
    codings = [] if te is None else [te]
    assert (framing_problem(version, codings) is not None) is refused
