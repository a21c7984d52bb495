"""gateway.listener: the public listener accepts connections in batches, on uvloop too."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import pytest
import uvloop
from aiohttp import web

from gateway.listener import ACCEPT_BATCH, BatchAcceptSite
from gateway.server import EDGE_HANDLER, Exchange, GatewayRunner


@pytest.fixture
def uvloop_only() -> Iterator[None]:
    """uvloop is what the gateway runs on, and the loop that accepted one connection a turn."""
    policy = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(policy)


async def ok(exchange: Exchange) -> None:
    exchange.send_head(200, b"OK", [], whole=b"ok")


async def edge_runner() -> GatewayRunner:
    """A runner whose edge answers every request 200 (``ok``), set up, not listening."""
    app = web.Application()
    app[EDGE_HANDLER] = ok
    runner = GatewayRunner(app)
    await runner.setup()
    return runner


def test_a_crowd_of_new_connections_is_accepted_in_one_turn_of_a_busy_loop(
    uvloop_only: None,
) -> None:
    async def scenario() -> None:
        runner = await edge_runner()
        site = BatchAcceptSite(runner, "127.0.0.1", 0, backlog=512)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        clients = []
        try:
            # The kernel completes these handshakes while the loop is busy elsewhere.
            for _ in range(ACCEPT_BATCH):
                client = socket.socket()
                client.setblocking(False)
                client.connect_ex(("127.0.0.1", port))
                clients.append(client)
            time.sleep(0.2)  # not asyncio.sleep: the loop must be busy while they queue
            server = runner.server
            assert server is not None
            for _ in range(10):  # a few turns: the readiness, then each connection_made
                await asyncio.sleep(0)
            # (Accepting one a turn, as uvloop's own server does, made this 10.)
            assert len(server.connections) == ACCEPT_BATCH  # type: ignore[attr-defined]
            clients[0].setblocking(True)
            clients[0].sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await asyncio.to_thread(clients[0].recv, 1024)).startswith(b"HTTP/1.1 200")
        finally:
            for client in clients:
                client.close()
            await runner.cleanup()

    asyncio.run(scenario())


async def test_it_binds_every_address_of_its_host_and_frees_them_on_stop() -> None:
    runner = await edge_runner()
    site = BatchAcceptSite(runner, "localhost", 0)
    try:
        await site.start()
        sockets = site._server.sockets  # type: ignore[union-attr]
        assert sockets and all(s.getsockname()[1] for s in sockets)
        assert site.name.startswith("http://localhost:")
    finally:
        await runner.cleanup()
    assert all(s.fileno() == -1 for s in sockets)


async def test_an_address_in_use_fails_the_start() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    runner = await edge_runner()
    try:
        with pytest.raises(OSError):
            await BatchAcceptSite(runner, "127.0.0.1", taken.getsockname()[1]).start()
    finally:
        taken.close()
        await runner.cleanup()


async def test_a_connection_made_after_shutdown_began_is_closed_at_once() -> None:
    # The listener hands accepted sockets over a turn later: one accepted as it closed may
    # only be made after the open connections were told to close when idle.
    runner = await edge_runner()
    site = BatchAcceptSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    server = runner.server
    assert server is not None
    try:
        server.pre_shutdown()  # type: ignore[attr-defined]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, never served
        writer.close()
    finally:
        await runner.cleanup()
