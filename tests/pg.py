"""A real PostgreSQL for the tests, and a fresh database (of either backend) per test.

``PgServer`` runs the distribution's own ``initdb`` and ``pg_ctl`` into a private temp dir:
loopback TCP on a free port, the unix socket in that dir, password authentication (SCRAM)
over TCP so URLs carry a real password, and durability switched off (fsync) because the
data is thrown away; the cluster lives in /dev/shm when there is room (CREATE DATABASE
writes hundreds of small files). PostgreSQL refuses to run as root, and CI runs as root:
then the server runs as the ``postgres`` system user (``runuser``), owning the temp dir.
Other tests may start servers of their own with ``started_server()`` (and ``destroy()``).

Fixtures (a test module says ``pytest_plugins = ["tests.pg"]``; it may also import helpers
from here first, since this module opts out of assertion rewriting: PYTEST_DONT_REWRITE):

- ``pg_server`` — one server per session, so one per xdist worker; stopped at the end, also
  after failures;
- ``pg_url`` — a fresh, empty database on it (random name) for one test, dropped afterwards;
- ``db_url`` — parametrized by ``db_backend``: a fresh SQLite file or a fresh PostgreSQL
  database, as a ``database.url`` that ``open_store`` accepts. The PostgreSQL one is a copy
  of a template the gateway's own migrations ran on once per session.

Missing PostgreSQL binaries fail the tests (never skip): on Debian/Ubuntu install
``postgresql`` (which pulls ``postgresql-<major>``), as scripts/test does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest

from tests.ports import free_port

T = TypeVar("T")

TEMPLATE = "gw_template"  # a database the gateway's migrations ran on, copied per test
SHM_NEEDED = 1 << 30  # bytes free in /dev/shm before a cluster (~50 MB) goes there
START_TIMEOUT = 30  # seconds pg_ctl waits for the server to accept connections
SUPERUSER = "gateway_test"
INSTALL_HINT = (
    "PostgreSQL server binaries (initdb, pg_ctl) not found; install the Debian package "
    "'postgresql' (e.g. apt-get install -y postgresql), as scripts/test does"
)


def pg_bin(name: str) -> str:
    """``initdb`` / ``pg_ctl``: on PATH, else the newest /usr/lib/postgresql/<major>/bin."""
    found = shutil.which(name)
    if found:
        return found
    candidates = glob.glob(f"/usr/lib/postgresql/*/bin/{name}")
    candidates.sort(key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if not candidates:
        pytest.fail(INSTALL_HINT, pytrace=False)
    return candidates[-1]


def _fast_tmp() -> str | None:
    """/dev/shm when it has room: on a disk, CREATE DATABASE (hundreds of small files) takes
    about a second on a busy machine; in memory, tens of milliseconds."""
    try:
        stat = os.statvfs("/dev/shm")
    except OSError:
        return None
    return "/dev/shm" if stat.f_bavail * stat.f_frsize >= SHM_NEEDED else None


class PgServer:
    """One throwaway PostgreSQL cluster. ``start``/``stop`` may be called repeatedly (the
    fault tests stop it under a live pool); ``destroy`` stops it and removes every file."""

    def __init__(self) -> None:
        self.password = secrets.token_urlsafe(12)
        self.base = Path(tempfile.mkdtemp(prefix="gateway-pg-", dir=_fast_tmp()))
        self.data = self.base / "data"
        self.port = 0
        self.running = False
        self._admin_client: Admin | None = None
        self._template_ready = False
        self._owner: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            # Root: the server runs as "postgres", which must own its dir (mkdtemp is 0700).
            try:
                self._owner = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(self.base, ignore_errors=True)
                pytest.fail(
                    "running as root, and PostgreSQL refuses root: there is no 'postgres'"
                    " system user to run it as (the Debian package creates it)",
                    pytrace=False,
                )
            os.chown(self.base, self._owner.pw_uid, self._owner.pw_gid)
        try:
            self._initdb()
        except BaseException:
            shutil.rmtree(self.base, ignore_errors=True)
            raise

    def _run(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        command = list(argv)
        if self._owner is not None:
            command = ["runuser", "-u", self._owner.pw_name, "--", *command]
        return subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.base,  # the server user may not be allowed into the caller's cwd
            env={**os.environ, "LC_ALL": "C", "LANG": "C"},
        )

    def _initdb(self) -> None:
        pwfile = self.base / "pw"
        pwfile.write_text(self.password + "\n")
        if self._owner is not None:
            os.chown(pwfile, self._owner.pw_uid, self._owner.pw_gid)
        result = self._run(
            pg_bin("initdb"),
            "--pgdata",
            str(self.data),
            "--username",
            SUPERUSER,
            "--pwfile",
            str(pwfile),
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )
        pwfile.unlink()
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{result.stdout}\n{result.stderr}")

    def start(self) -> None:
        """Start on the port it had (a restart), or on a free one the first time."""
        fresh = not self.port
        for _ in range(3 if fresh else 1):
            if fresh:
                self.port = free_port()
            logged = len(self.log())
            result = self._run(
                pg_bin("pg_ctl"),
                "start",
                "--wait",
                f"--timeout={START_TIMEOUT}",
                "--pgdata",
                str(self.data),
                "--log",
                str(self.base / "server.log"),
                "-o",
                " ".join(
                    [
                        "-c listen_addresses=127.0.0.1",
                        f"-c port={self.port}",
                        f"-c unix_socket_directories={self.base}",
                        # Throwaway data: durability off makes CREATE DATABASE and commits fast.
                        "-c fsync=off",
                        "-c synchronous_commit=off",
                        "-c full_page_writes=off",
                        "-c shared_buffers=16MB",
                        "-c max_connections=200",
                    ]
                ),
                timeout=START_TIMEOUT + 10,
            )
            if result.returncode == 0:
                self.running = True
                return
            if "could not bind" not in self.log()[logged:]:
                break  # not a lost race for the port: another try would not help
        raise RuntimeError(f"pg_ctl start failed:\n{result.stdout}\n{result.stderr}\n{self.log()}")

    def stop(self, mode: str = "fast") -> None:
        """``fast``: what an operator's stop does (clients are disconnected); ``immediate``
        for teardown."""
        if not self.running:
            return
        result = self._run(
            pg_bin("pg_ctl"), "stop", "--wait", "--pgdata", str(self.data), "--mode", mode
        )
        self.running = False
        if result.returncode != 0:
            raise RuntimeError(f"pg_ctl stop failed:\n{result.stdout}\n{result.stderr}")

    def destroy(self) -> None:
        try:
            if self._admin_client is not None:
                self._admin_client.close()
        finally:
            try:
                self.stop("immediate")
            finally:
                shutil.rmtree(self.base, ignore_errors=True)

    def log(self) -> str:
        path = self.base / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}:{self.password}@127.0.0.1:{self.port}/{database}"

    # --- databases, through one admin connection on an event loop of its own -------------

    def create_database(self, *, migrated: bool = False) -> str:
        """A new database, empty or (``migrated``) a copy of one the gateway's migrations ran
        on, which spares each test the DDL; its URL."""
        name = f"t_{secrets.token_hex(6)}"
        template = f' TEMPLATE "{self._template()}"' if migrated else ""
        # FILE_COPY (PostgreSQL 15+) copies the template's files instead of WAL-logging them.
        strategy = " STRATEGY FILE_COPY" if self.major() >= 15 else ""
        self._admin().execute(f'CREATE DATABASE "{name}"{template}{strategy}')
        return self.url(name)

    def drop_database(self, url: str, *, wait: bool = False) -> None:
        """Dropped in the background unless ``wait`` (``destroy`` waits for it); ``WITH
        (FORCE)`` ends sessions left behind."""
        name = url.rsplit("/", 1)[-1]
        sql = f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'
        if wait:
            self._admin().execute(sql)
        else:
            self._admin().submit(sql)

    def major(self) -> int:
        return int((self.data / "PG_VERSION").read_text().split(".")[0])

    def _admin(self) -> Admin:
        if self._admin_client is None:
            self._admin_client = Admin(self.url())
        return self._admin_client

    def _template(self) -> str:
        if not self._template_ready:
            from gateway.accounts.postgres import PostgresStore

            self._admin().execute(f'CREATE DATABASE "{TEMPLATE}"')

            async def migrate() -> None:
                store = PostgresStore(self.url(TEMPLATE))
                await store.open()
                await store.close()

            self._admin().run(migrate())
            self._template_ready = True
        return TEMPLATE


class Admin:
    """One connection to the maintenance database, served by an event loop in a thread, so
    fixtures of any test (each test has its own loop) can use it synchronously."""

    def __init__(self, url: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pg-admin", daemon=True)
        self._thread.start()
        self._pending: list[concurrent.futures.Future[Any]] = []
        self._lock = asyncio.Lock()  # bound to the admin loop on first use
        try:
            self._conn = self.run(asyncpg.connect(url, timeout=10))
        except BaseException:
            self._stop()
            raise

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=60)

    def execute(self, sql: str) -> None:
        self.run(self._execute(sql))

    def submit(self, sql: str) -> None:
        self._pending.append(asyncio.run_coroutine_threadsafe(self._execute(sql), self._loop))

    async def _execute(self, sql: str) -> None:
        async with self._lock:  # one connection: one statement at a time
            await self._conn.execute(sql)

    def close(self) -> None:
        try:
            concurrent.futures.wait(self._pending, timeout=60)
            self.run(self._conn.close())
        finally:
            self._stop()

    def _stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


def started_server() -> PgServer:
    server = PgServer()
    try:
        server.start()
    except BaseException:
        server.destroy()
        raise
    return server


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    server = started_server()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def pg_url(pg_server: PgServer) -> Iterator[str]:
    """A fresh, empty database on the session's server."""
    url = pg_server.create_database()
    yield url
    pg_server.drop_database(url)


BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(params=BACKENDS)
def db_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def db_url(db_backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database of the parametrized backend, as a ``database.url``. PostgreSQL's
    comes migrated (the migrations themselves are tested in test_accounts_postgres.py)."""
    if db_backend == "sqlite":
        # An absolute path (sqlite:////tmp/...) in directories the store has to create.
        yield f"sqlite:///{tmp_path / 'nested' / 'dir' / 'gateway.db'}"
        return
    server: PgServer = request.getfixturevalue("pg_server")  # started only when needed
    url = server.create_database(migrated=True)
    yield url
    server.drop_database(url)


async def query(url: str, sql: str) -> list[tuple[Any, ...]]:
    """Rows of one SELECT, read past the store (to see what it really wrote)."""
    if url.startswith("sqlite:"):
        import sqlite3

        from gateway.accounts.store import sqlite_path

        with sqlite3.connect(sqlite_path(url.partition("://")[2])) as conn:
            return [tuple(row) for row in conn.execute(sql).fetchall()]
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return [tuple(row) for row in await conn.fetch(sql)]
    finally:
        await conn.close()
