"""The serving process: listeners up, signals handled, drained on the way out.

- SIGTERM / SIGINT: ``/readyz`` turns 503 and responses say ``Connection: close``; after
  ``server.drain_delay`` (default 0) the listeners close (no new connections), the requests
  in flight — streams included — finish within ``server.shutdown_grace``, then the process
  exits 0.
- SIGHUP: the config file and the keys are read again. A valid config becomes a new gateway
  that serves every new request, while the requests in flight finish on the old one; an
  invalid one is refused with its ``FILE:LINE: path: message`` lines logged, and the old
  config keeps serving. Listener settings (address, port, admin, workers, body size) are
  bound to sockets already open: a change there is logged and takes effect on restart.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable

from aiohttp import web

from gateway import accesslog
from gateway.app import LIVE, METRICS, LiveGateway, create_admin_app, create_app
from gateway.config import ServerSettings, Settings
from gateway.errors import ConfigError
from gateway.listener import BatchAcceptSite
from gateway.server import GatewayRunner

__all__ = ["serve"]

log = logging.getLogger("gateway")

WORKER_ENV = "GATEWAY_WORKER"  # set in a worker's environment (gateway.workers): its index
SUPERVISOR_ENV = "GATEWAY_SUPERVISOR_PID"  # and whom it answers to

# Server settings a reload cannot change: they are sockets and processes already running.
RESTART_ONLY = ("host", "port", "admin", "workers", "max_body_size", "shutdown_grace")
# drain_delay is read at SIGTERM from the serving gateway's settings, so a reload changes it.


async def serve(
    settings: Settings,
    *,
    reload: Callable[[], Settings] | None = None,
    ready: Callable[[], None] | None = None,
    worker: bool = False,
) -> None:
    """Serve until SIGTERM/SIGINT; ``reload`` (called on SIGHUP) reads the config again.

    A ``worker`` (of ``gateway.workers``) shares the port with its siblings (SO_REUSEPORT),
    leaves the admin listener to its supervisor, and drains if the supervisor goes away.
    """
    app = create_app(settings)
    runners = await _listen(app, settings.server, worker=worker)
    log.info("gateway listening on http://%s:%d", settings.server.host, settings.server.port)
    if ready is not None:
        ready()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    orphan_watch = asyncio.create_task(_stop_when_orphaned(stop)) if worker else None
    reloader = Reloader(app[LIVE], reload) if reload is not None else None
    if reloader is not None:
        loop.add_signal_handler(signal.SIGHUP, reloader.trigger)
    try:
        await stop.wait()
    finally:
        if orphan_watch is not None:
            orphan_watch.cancel()
        app[LIVE].drain()
        delay = app[LIVE].current.settings.server.drain_delay
        if delay > 0:
            # Still accepting, answering /readyz 503 and "Connection: close", until the load
            # balancer has noticed; closing first would race requests it is already sending.
            log.info("gateway stopping: /readyz is 503; accepting for %.1fs more", delay)
            await asyncio.sleep(delay)
        log.info("gateway stopping: draining in-flight requests")
        if reloader is not None:
            loop.remove_signal_handler(signal.SIGHUP)
            await reloader.wait()
        for runner in reversed(runners):
            await runner.cleanup()
        log.info("gateway stopped")


async def _stop_when_orphaned(stop: asyncio.Event) -> None:
    # The supervisor's pid from the environment, not getppid() now: a worker still starting
    # when its supervisor died has already been handed to another parent.
    supervisor = int(os.environ.get(SUPERVISOR_ENV, "0")) or os.getppid()
    while os.getppid() == supervisor:
        await asyncio.sleep(1)
    log.error("worker: the supervisor is gone; draining")
    stop.set()


async def _listen(
    app: web.Application, server: ServerSettings, *, worker: bool
) -> list[GatewayRunner]:
    public = GatewayRunner(
        app,
        shutdown_timeout=server.shutdown_grace,
        access_log=accesslog.write_line,
    )
    runners = [public]
    await public.setup()
    site = BatchAcceptSite(public, server.host, server.port, backlog=1024, reuse_port=worker)
    await site.start()
    if server.admin is not None and not worker:
        admin = GatewayRunner(create_admin_app(app[METRICS]))
        runners.append(admin)
        await admin.setup()
        await web.TCPSite(admin, server.admin.host, server.admin.port).start()
    return runners


class Reloader:
    """SIGHUP: one reload at a time, in order; a signal during a reload queues one more."""

    def __init__(self, live: LiveGateway, read: Callable[[], Settings]) -> None:
        self._live = live
        self._read = read
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    def trigger(self) -> None:
        task = asyncio.get_running_loop().create_task(self._reload())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _reload(self) -> None:
        async with self._lock:
            log.info("SIGHUP: reloading the configuration")
            settings = await read_for_reload(self._read)
            if settings is None:
                return
            _warn_restart_only(self._live.current.settings.server, settings.server)
            try:
                await self._live.replace(settings)
            except Exception as err:
                log.error("reload refused: the new configuration cannot start: %s", err)
                return
            log.info("configuration reloaded: new requests use it")


async def read_for_reload(read: Callable[[], Settings]) -> Settings | None:
    """The config read again, or None after logging why it is refused (every
    ``FILE:LINE: path: message``): the running configuration then stays."""
    try:
        return await asyncio.to_thread(read)
    except ConfigError as err:
        for problem in err.problems:
            log.error("reload refused: %s", problem)
        log.error("reload refused: the running configuration stays")
    except Exception as err:  # unreadable file and kin: same answer, one line
        log.error("reload refused: %s; the running configuration stays", err)
    return None


def _warn_restart_only(old: ServerSettings, new: ServerSettings) -> None:
    changed = [name for name in RESTART_ONLY if getattr(old, name) != getattr(new, name)]
    if changed:
        log.warning("reload: server.%s changed; takes effect on restart", ", server.".join(changed))
