"""Several worker processes on one port: ``server.workers: N`` (``0`` = one per CPU).

Each worker is a whole gateway process (``gateway serve`` with ``GATEWAY_WORKER`` set) that
binds the public port itself with ``SO_REUSEPORT``: the kernel spreads new connections over
the workers' listening sockets, with no accept lock and no hand-off through this process.
Token checks need no shared state, and what must be shared (accounts, refresh families,
login counters) lives in the database, so the workers need nothing from each other.

This process, the supervisor, only:

- starts the workers and starts again one that dies (with a back-off, so a worker that
  cannot start does not spin);
- passes SIGTERM/SIGINT on and waits for every worker to drain, then exits 0;
- on SIGHUP checks the config first (an invalid file is refused here, with its
  ``FILE:LINE`` lines logged, and never reaches the workers), then passes SIGHUP on;
- serves the admin listener: ``/metrics`` adds up every worker's metrics (prometheus-client's
  multiprocess mode, files in a private directory) and ``/healthz``.

A worker whose supervisor disappears (killed with SIGKILL) notices within a second and
drains itself, so no orphan keeps the port.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from gateway.app import create_admin_app
from gateway.config import Settings
from gateway.lifecycle import SUPERVISOR_ENV, WORKER_ENV, read_for_reload
from gateway.server import GatewayRunner

__all__ = ["SUPERVISOR_ENV", "WORKER_ENV", "Supervisor", "worker_count"]

log = logging.getLogger("gateway")

METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus-client in every worker
MAX_BACKOFF = 30.0
STABLE_AFTER = 10.0  # a worker that lived this long resets its back-off


def worker_count(configured: int) -> int:
    return configured if configured > 0 else (os.cpu_count() or 1)


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    backoff: float = field(default=0.5)


class Supervisor:
    """Runs ``count`` workers of ``gateway serve -c config_path`` and supervises them."""

    def __init__(self, config_path: str, settings: Settings, read: Callable[[], Settings]) -> None:
        self.config_path = config_path
        self.settings = settings
        self._read = read
        self._workers = [_Worker(i) for i in range(worker_count(settings.server.workers))]
        self._stopping = False
        self._metrics_dir = tempfile.mkdtemp(prefix="gateway-metrics-")

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self._reload()))
        admin = await self._start_admin()
        try:
            for worker in self._workers:
                self._spawn(worker)
            log.info("supervisor: %d workers on port %d", len(self._workers), self._port)
            watch = asyncio.create_task(self._watch())
            await stop.wait()
            watch.cancel()
            return await self._stop_all()
        finally:
            if admin is not None:
                await admin.cleanup()
            shutil.rmtree(self._metrics_dir, ignore_errors=True)

    @property
    def _port(self) -> int:
        return self.settings.server.port

    # -- workers ------------------------------------------------------------------------

    def _spawn(self, worker: _Worker) -> None:
        env = {
            **os.environ,
            WORKER_ENV: str(worker.index),
            SUPERVISOR_ENV: str(os.getpid()),
            METRICS_DIR_ENV: self._metrics_dir,
        }
        worker.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "-c", self.config_path], env=env
        )
        worker.started_at = time.monotonic()

    async def _watch(self) -> None:
        """Start again any worker that died; its back-off doubles while it keeps dying."""
        while True:
            await asyncio.sleep(0.2)
            for worker in self._workers:
                if worker.proc is None or worker.proc.poll() is None or self._stopping:
                    continue
                lived = time.monotonic() - worker.started_at
                worker.backoff = (
                    0.5 if lived > STABLE_AFTER else min(worker.backoff * 2, MAX_BACKOFF)
                )
                log.error(
                    "worker %d (pid %d) exited with %s; starting it again in %.1fs",
                    worker.index,
                    worker.proc.pid,
                    worker.proc.returncode,
                    worker.backoff,
                )
                _mark_dead(worker.proc.pid, self._metrics_dir)
                worker.proc = None
                asyncio.get_running_loop().call_later(worker.backoff, self._respawn, worker)

    def _respawn(self, worker: _Worker) -> None:
        if not self._stopping and worker.proc is None:
            self._spawn(worker)

    async def _stop_all(self) -> int:
        self._stopping = True
        log.info("supervisor: stopping %d workers", len(self._workers))
        running = [w.proc for w in self._workers if w.proc is not None and w.proc.poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        deadline = self.settings.server.shutdown_grace + 10
        codes = await asyncio.gather(*(asyncio.to_thread(_wait, p, deadline) for p in running))
        # -SIGTERM: a worker still starting up, before it could drain anything; that is clean.
        failed = [code for code in codes if code not in (0, -signal.SIGTERM)]
        if failed:
            log.error("supervisor: %d workers exited uncleanly: %s", len(failed), failed)
        return 0 if not failed else 1

    async def _reload(self) -> None:
        if await read_for_reload(self._read) is None:
            return  # refused here, with its reasons logged: the workers never see it
        for worker in self._workers:
            if worker.proc is not None and worker.proc.poll() is None:
                worker.proc.send_signal(signal.SIGHUP)

    # -- admin: metrics of all workers ----------------------------------------------------

    async def _start_admin(self) -> GatewayRunner | None:
        admin = self.settings.server.admin
        if admin is None:
            return None
        runner = GatewayRunner(create_admin_app(_AllWorkers(self._metrics_dir)))
        await runner.setup()
        await web.TCPSite(runner, admin.host, admin.port).start()
        return runner


def _wait(proc: subprocess.Popen[bytes], timeout: float) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def _mark_dead(pid: int, metrics_dir: str) -> None:
    """Forget a dead worker's live gauges (its counters keep counting in the totals)."""
    from prometheus_client import multiprocess

    try:
        multiprocess.mark_process_dead(pid, metrics_dir)  # type: ignore[no-untyped-call]
    except OSError as err:
        log.warning("could not clear the metrics of worker pid %d: %s", pid, err)


class _AllWorkers:
    """Every worker's metrics, summed from their files (prometheus-client multiprocess)."""

    def __init__(self, metrics_dir: str) -> None:
        self._metrics_dir = metrics_dir

    def flush(self) -> None:
        """Nothing is pending here: each worker flushes its own observations to its files."""

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CollectorRegistry
        from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self._metrics_dir)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
