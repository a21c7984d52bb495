"""The public listener: new connections accepted in batches, however busy the loop is.

uvloop (its libuv) accepts one connection per turn of the event loop. A turn of a loop
serving a thousand connections lasts a good fraction of a second, so connections arriving
under load waited seconds in the kernel's accept queue (measured: 569 queued, 4 accepted a
second, p99 4.4 s with 1,000 new connections). This listener accepts up to a batch each time
the socket is readable, as asyncio's own loop does, and hands each socket to the loop as an
accepted connection of the same protocol factory.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable

from aiohttp import web

__all__ = ["BatchAcceptSite"]

log = logging.getLogger("gateway")

ACCEPT_BATCH = 128  # connections accepted per readiness of the listening socket
# Out of file descriptors: stop accepting for a moment instead of spinning on the error (the
# queued connections wait in the kernel, as they would with any server).
_OUT_OF_FDS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_OUT_OF_FDS_PAUSE = 1.0


class _Acceptor:
    """What ``asyncio.Server`` is to aiohttp's sites: ``sockets`` and ``close()``."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sockets: list[socket.socket],
        factory: Callable[[], asyncio.BaseProtocol],
    ) -> None:
        self._loop = loop
        self.sockets = sockets
        self._factory = factory
        self._handshakes: set[asyncio.Task[object]] = set()
        self._closed = False

    def start(self) -> None:
        for sock in self.sockets:
            self._loop.add_reader(sock.fileno(), self._accept_batch, sock)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for sock in self.sockets:
            self._loop.remove_reader(sock.fileno())
            sock.close()

    def _accept_batch(self, listening: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = listening.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_FDS:
                    log.warning("cannot accept connections for now: %s", exc.strerror)
                    self._pause(listening)
                else:
                    log.warning("accepting a connection failed: %s", exc)
                return
            self._hand_over(conn)

    def _hand_over(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        task = self._loop.create_task(self._loop.connect_accepted_socket(self._factory, conn))
        self._handshakes.add(task)
        task.add_done_callback(lambda done: self._handed_over(done, conn))

    def _handed_over(self, task: asyncio.Task[object], conn: socket.socket) -> None:
        self._handshakes.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.info("dropped an accepted connection: %s", task.exception())
            conn.close()

    def _pause(self, listening: socket.socket) -> None:
        self._loop.remove_reader(listening.fileno())

        def resume() -> None:
            if not self._closed:
                self._loop.add_reader(listening.fileno(), self._accept_batch, listening)

        self._loop.call_later(_OUT_OF_FDS_PAUSE, resume)


class BatchAcceptSite(web.BaseSite):
    """``web.TCPSite`` with batched accepting (see the module's docstring)."""

    __slots__ = ("_host", "_port", "_reuse_port")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        backlog: int = 1024,
        reuse_port: bool = False,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self._reuse_port = reuse_port

    @property
    def name(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        sockets = _bound_sockets(self._host, self._port, self._backlog, self._reuse_port)
        acceptor = _Acceptor(asyncio.get_running_loop(), sockets, server)
        acceptor.start()
        self._server = acceptor  # type: ignore[assignment]


def _bound_sockets(host: str, port: int, backlog: int, reuse_port: bool) -> list[socket.socket]:
    """Listening sockets for every address of ``host``, as ``loop.create_server`` binds them."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets
