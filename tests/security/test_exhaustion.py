"""Resource exhaustion against the running gateway: slow heads, idle connections, bodies over
``max_body_size``. Other clients must keep being served, memory must stay bounded, and every
refusal must be a clear status.

The timing of the deadlines themselves (header, body idle, body rate, keep-alive, connection
cap) is tested in-process with short limits in tests/test_server.py; here the defaults hold.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.server import HEADER_TIMEOUT
from tests.blackbox.conftest import ROUTES, Echo, Gateway, launch_gateway, stop_process
from tests.security.test_smuggling import Counting, counting, exchange, post, read_reply

__all__ = ["counting"]  # the fixture, imported so pytest finds it here

LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def small_gw(tmp_path_factory: pytest.TempPathFactory, counting: Counting) -> Iterator[Gateway]:
    workdir = tmp_path_factory.mktemp("small-gw")
    port = int(counting.url.rsplit(":", 1)[1])
    gw = launch_gateway(
        workdir,
        Echo(counting.url, port),
        routes=ROUTES,
        server_extra="max_body_size: 64KiB",
        extra="accounts: {login_rate_limit: 1000/min, register_rate_limit: 1000/min}",
    )
    yield gw
    stop_process(gw.proc)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def open_conn(base: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = base.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def timed_get(base: str, path: str) -> tuple[int, float]:
    started = time.monotonic()
    reply = await exchange(
        base, f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
    )
    return reply.status, time.monotonic() - started


# -- slow heads and idle connections ---------------------------------------------------


async def test_slowloris_and_idle_crowds_do_not_starve_others_and_are_cut(
    small_gw: Gateway,
) -> None:
    """200 connections trickling a head a byte every half second and 200 silent ones: a
    normal client is still answered at once, and the gateway cuts every one of them (408)
    once the header timeout has passed."""
    slow = [await open_conn(small_gw.url) for _ in range(200)]
    idle = [await open_conn(small_gw.url) for _ in range(200)]
    opened = time.monotonic()
    head = b"GET /public/slowloris HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 1000

    async def trickle(writer: asyncio.StreamWriter) -> None:
        try:
            for byte in head:
                writer.write(bytes([byte]))
                await asyncio.sleep(0.5)
        except (ConnectionError, RuntimeError):
            return

    senders = [asyncio.create_task(trickle(w)) for _, w in slow]
    try:
        await asyncio.sleep(1.0)
        timings = [await timed_get(small_gw.url, "/public/normal") for _ in range(20)]
        assert all(status == 200 for status, _ in timings)
        assert max(t for _, t in timings) < 1.0, timings
        # Every crowded connection is answered 408 and closed by the header timeout.
        deadline = opened + HEADER_TIMEOUT + 3
        replies = await asyncio.gather(
            *(read_reply(r, timeout=max(1.0, deadline - time.monotonic())) for r, _ in slow + idle)
        )
        assert {r.status for r in replies} == {408}
        assert all(r.closed for r in replies)
        assert all(r.headers["content-type"] == "application/problem+json" for r in replies)
    finally:
        for task in senders:
            task.cancel()
        for _, writer in slow + idle:
            writer.close()


# -- bodies over max_body_size ---------------------------------------------------------


@pytest.mark.parametrize("path", ["/public/declared/sink", "/auth/login", "/auth/register"])
async def test_declared_oversize_body_is_413_before_reading_it(
    small_gw: Gateway, counting: Counting, path: str
) -> None:
    reader, writer = await open_conn(small_gw.url)
    started = time.monotonic()
    writer.write(post(path, b"Content-Type: application/json", b"Content-Length: %d" % (LIMIT + 1)))
    reply = await read_reply(reader)  # no body sent at all: the answer cannot wait for it
    writer.close()
    assert reply.status == 413 and reply.closed
    assert reply.headers["content-type"] == "application/problem+json"
    assert reply.at - started < 1
    assert path not in counting.counters()


@pytest.mark.parametrize("chunk", [1024, 16 * 1024, 60 * 1024])
async def test_chunked_oversize_body_is_413_and_never_completes_upstream(
    small_gw: Gateway, counting: Counting, chunk: int
) -> None:
    path = f"/public/chunked-{chunk}/sink"
    body = b"".join(b"%x\r\n%s\r\n" % (chunk, b"x" * chunk) for _ in range(2 * LIMIT // chunk + 2))
    reply = await exchange(
        small_gw.url, post(path, b"Transfer-Encoding: chunked", body=body + b"0\r\n\r\n")
    )
    assert reply.status == 413
    assert reply.headers["content-type"] == "application/problem+json"
    stats = counting.counters().get(path, {"completed": 0, "body_bytes": 0})
    assert stats["completed"] == 0, "an oversized body must never reach the upstream whole"
    assert stats["body_bytes"] <= LIMIT + chunk


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_huge_body_keeps_memory_bounded(small_gw: Gateway, chunked: bool) -> None:
    """32 MiB pushed at a 64 KiB limit: the gateway answers 413 and discards the rest; its
    memory does not grow by anything like the body."""
    total = 32 * 1024 * 1024
    before = rss_kib(small_gw.proc.pid)
    reader, writer = await open_conn(small_gw.url)
    framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % total
    writer.write(post("/public/huge/sink", framing))
    piece = b"y" * (1024 * 1024)
    if chunked:
        piece = b"%x\r\n%s\r\n" % (len(piece), piece)

    async def push() -> None:
        try:
            for _ in range(total // (1024 * 1024)):
                writer.write(piece)
                await writer.drain()
        except (ConnectionError, RuntimeError):
            return

    sender = asyncio.create_task(push())
    try:
        reply = await read_reply(reader)
        assert reply.status == 413
        await asyncio.wait_for(sender, 10)
    finally:
        sender.cancel()
        writer.close()
    grown = rss_kib(small_gw.proc.pid) - before
    assert grown < 16 * 1024, f"gateway RSS grew by {grown} KiB"
    # And the gateway still answers.
    assert (await timed_get(small_gw.url, "/public/after-huge"))[0] == 200
