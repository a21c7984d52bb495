"""The PostgreSQL account store (asyncpg): what replicas share when the gateway scales out.

One connection pool per store. Every operation borrows a connection for one statement, or
for one transaction when it writes several (``add_refresh``, ``prune_refresh``), so nothing
is half written. Concurrency is left to PostgreSQL, never to a lock in this process, so the
guarantees hold between replicas exactly as between coroutines:

- ``spend_refresh`` is one ``UPDATE … WHERE spent_at IS NULL … RETURNING``: under READ
  COMMITTED a second spender waits for the first to commit, re-checks the row, and matches
  nothing, so exactly one caller gets True;
- email uniqueness is the UNIQUE constraint on ``users.email_key``; the loser of a race gets
  ``EmailTaken``;
- each rate-limit event is its own autocommitted row, counted by the next statement that
  looks, so concurrent failed logins on any replica are all counted.

Migrations are the SQLite store's, numbered alike and recorded in ``schema_version``; they run
in one transaction behind a transaction-level advisory lock, so replicas that start together
migrate once and the others see the result. The one type that differs is the timestamp:
SQLite's REAL is 8 bytes, PostgreSQL's is 4 (it would round today's unix time to about
two minutes), so timestamps are DOUBLE PRECISION here.

Failures are quick and typed: connecting gives up after ``connect_timeout`` and a statement
after ``command_timeout``; a database that refuses, drops or is restarting is
``StoreUnavailable`` (HTTP 503). The pool replaces dead connections on the next use, so the
store recovers by itself when the database is back. The URL, which holds the password, is
never part of an error or a repr.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar
from urllib.parse import urlsplit

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type information

from gateway.accounts.models import RefreshRecord, User
from gateway.accounts.store import (
    USER_COLUMNS,
    StoreError,
    StoreUnavailable,
    user_changes,
    user_from_row,
    user_row,
)
from gateway.errors import EmailTaken

T = TypeVar("T")

# Pool sizing per process: replicas x workers x MAX_POOL_SIZE must stay under the server's
# max_connections (100 by default); the gateway holds a connection only for one statement.
MIN_POOL_SIZE = 1
MAX_POOL_SIZE = 10
CONNECT_TIMEOUT = 2.0  # seconds to establish one connection (TCP, TLS, authentication)
ACQUIRE_TIMEOUT = 3.0  # seconds to get a pooled connection, connecting included
COMMAND_TIMEOUT = 5.0  # seconds for one statement
CLOSE_TIMEOUT = 5.0  # seconds for connections in use to come back before they are cut
IDLE_LIFETIME = 300.0  # seconds an unused connection stays open

# pg_advisory_xact_lock key serializing migrations across replicas: "gwmigrat" in ASCII.
MIGRATION_LOCK = 0x67776D6967726174

# Append only, and in step with ``gateway.accounts.sqlite.MIGRATIONS`` (same numbers, tables,
# columns and indexes; a test compares the two schemas).
MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (
        1,
        (
            """CREATE TABLE users (
                id TEXT PRIMARY KEY,
                email TEXT NOT NULL,
                email_key TEXT NOT NULL UNIQUE,
                name TEXT,
                roles TEXT NOT NULL,
                password_hash TEXT,
                created_at DOUBLE PRECISION NOT NULL,
                disabled INTEGER NOT NULL DEFAULT 0
            )""",
            """CREATE TABLE refresh_families (
                id TEXT PRIMARY KEY,
                user_id TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
                created_at DOUBLE PRECISION NOT NULL,
                expires_at DOUBLE PRECISION NOT NULL,
                revoked_at DOUBLE PRECISION
            )""",
            "CREATE INDEX refresh_families_user ON refresh_families (user_id)",
            "CREATE INDEX refresh_families_expires ON refresh_families (expires_at)",
            """CREATE TABLE refresh_tokens (
                token_hash TEXT PRIMARY KEY,
                family_id TEXT NOT NULL REFERENCES refresh_families (id) ON DELETE CASCADE,
                user_id TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
                created_at DOUBLE PRECISION NOT NULL,
                expires_at DOUBLE PRECISION NOT NULL,
                spent_at DOUBLE PRECISION
            )""",
            "CREATE INDEX refresh_tokens_family ON refresh_tokens (family_id)",
            "CREATE INDEX refresh_tokens_expires ON refresh_tokens (expires_at)",
            """CREATE TABLE rate_events (
                id TEXT PRIMARY KEY,
                key TEXT NOT NULL,
                at DOUBLE PRECISION NOT NULL
            )""",
            "CREATE INDEX rate_events_key_at ON rate_events (key, at)",
            "CREATE INDEX rate_events_at ON rate_events (at)",
        ),
    ),
)

_REFRESH_SELECT = """
    SELECT t.token_hash, t.user_id, t.family_id, t.created_at, t.expires_at, t.spent_at,
           f.revoked_at IS NOT NULL
    FROM refresh_tokens t JOIN refresh_families f ON f.id = t.family_id
    WHERE t.token_hash = $1"""

# SQLSTATE classes (and codes) that mean "the database cannot serve now, try again later":
# connection exceptions, insufficient resources (too many connections, disk full), operator
# intervention (shutdown, starting up, statement cancelled), system errors, transaction
# rollbacks (serialization, deadlock), a read-only standby during failover, a lock wait.
_UNAVAILABLE_SQLSTATES = ("08", "53", "57", "58", "40", "25006", "55P03")


class PostgresStore:
    """``AccountStore`` on a PostgreSQL database, through an asyncpg connection pool."""

    def __init__(
        self,
        url: str,
        *,
        min_size: int = MIN_POOL_SIZE,
        max_size: int = MAX_POOL_SIZE,
        connect_timeout: float = CONNECT_TIMEOUT,
        acquire_timeout: float = ACQUIRE_TIMEOUT,
        command_timeout: float = COMMAND_TIMEOUT,
    ) -> None:
        self._url = url
        self.where = describe_url(url)  # the URL without its password, for messages
        self._min_size = min_size
        self._max_size = max_size
        self._connect_timeout = connect_timeout
        self._acquire_timeout = acquire_timeout
        self._command_timeout = command_timeout
        self._pool: Any = None  # asyncpg.Pool once open
        self._opening = asyncio.Lock()

    def __repr__(self) -> str:
        return f"PostgresStore({self.where!r})"

    # --- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the pool and migrate. ``StoreUnavailable`` if the database cannot be
        reached; the store then stays closed, and ``open()`` may simply be called again."""
        async with self._opening:
            if self._pool is not None:
                return
            try:
                pool = await self._guard(self._create_pool())
            except StoreError as exc:
                raise _at_open(exc, self.where) from exc
            try:
                await self._guard(self._migrate(pool))
            except BaseException as exc:
                pool.terminate()
                if isinstance(exc, StoreError):
                    raise _at_open(exc, self.where) from exc
                raise
            self._pool = pool

    async def _create_pool(self) -> Any:
        return await asyncpg.create_pool(
            dsn=self._url,
            min_size=self._min_size,
            max_size=self._max_size,
            timeout=self._connect_timeout,
            command_timeout=self._command_timeout,
            max_inactive_connection_lifetime=IDLE_LIFETIME,
            server_settings={"application_name": "gateway"},
        )

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), CLOSE_TIMEOUT)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            pool.terminate()  # a dead database or a stuck statement must not stall shutdown

    async def ping(self) -> None:
        await self._fetchval("SELECT 1")

    def pool_usage(self) -> dict[str, int]:
        """Connections open, of them in use, and the most allowed (for metrics); zeros when
        closed."""
        pool = self._pool
        if pool is None:
            return {"open": 0, "in_use": 0, "max": self._max_size}
        size = int(pool.get_size())
        return {"open": size, "in_use": size - int(pool.get_idle_size()), "max": self._max_size}

    async def _migrate(self, pool: Any) -> None:
        async with pool.acquire(timeout=self._acquire_timeout) as conn, conn.transaction():
            # Held until COMMIT: a replica starting alongside waits here, then finds the
            # schema current. DDL is transactional, so a failed migration leaves nothing.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version"
                " (version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
            )
            current = await conn.fetchval("SELECT MAX(version) FROM schema_version") or 0
            newest = MIGRATIONS[-1][0]
            if current > newest:
                raise StoreError(
                    f"the database schema is version {current}, newer than this gateway's"
                    f" {newest}; upgrade the gateway"
                )
            for version, statements in MIGRATIONS:
                if version <= current:
                    continue
                for statement in statements:
                    await conn.execute(statement)
                await conn.execute(
                    "INSERT INTO schema_version (version, applied_at) VALUES ($1, $2)",
                    version,
                    time.time(),
                )

    async def schema_version(self) -> int:
        return int(await self._fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version"))

    # --- plumbing ----------------------------------------------------------------------------

    async def _guard(self, op: Awaitable[T]) -> T:
        """Translate driver failures: the client sees 503, never SQL (``raise ... from``)."""
        try:
            return await op
        except asyncpg.UniqueViolationError as exc:
            if "email_key" in (exc.constraint_name or ""):
                raise EmailTaken("An account with this email already exists.") from exc
            raise StoreError("integrity error in the account store") from exc
        except asyncpg.PostgresError as exc:
            if str(exc.sqlstate or "").startswith(_UNAVAILABLE_SQLSTATES):
                raise StoreUnavailable() from exc
            raise StoreError(f"account store error (SQLSTATE {exc.sqlstate})") from exc
        except asyncpg.ClientConfigurationError as exc:
            raise StoreError(f"database.url: {exc}") from exc
        except asyncpg.InterfaceError as exc:
            if isinstance(exc, ValueError):  # a value the driver cannot send: our bug
                raise StoreError("the account store refused a value") from exc
            # The pool is closed or closing, or the connection went away.
            raise StoreUnavailable() from exc
        except OSError as exc:
            # Refused, unreachable, reset, DNS, and timeouts (TimeoutError is an OSError).
            raise StoreUnavailable() from exc
        except ValueError as exc:
            # The DSN parser's own complaints can quote pieces of a badly encoded password.
            raise StoreError(
                "database.url is not a valid PostgreSQL URL"
                " (percent-encode special characters in the password)"
            ) from exc

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        """A pooled connection; raw driver errors (callers translate them)."""
        pool = self._pool
        if pool is None:
            raise StoreUnavailable()
        async with pool.acquire(timeout=self._acquire_timeout) as conn:
            yield conn

    async def _run(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        """Run ``fn`` in one transaction, translating errors."""

        async def body() -> T:
            async with self._connection() as conn, conn.transaction():
                return await fn(conn)

        return await self._guard(body())

    async def _execute(self, sql: str, *args: Any) -> int:
        """One autocommitted statement; return the number of rows it touched."""

        async def body() -> int:
            async with self._connection() as conn:
                return _rowcount(await conn.execute(sql, *args))

        return await self._guard(body())

    async def _fetchval(self, sql: str, *args: Any) -> Any:
        async def body() -> Any:
            async with self._connection() as conn:
                return await conn.fetchval(sql, *args)

        return await self._guard(body())

    async def _fetchrow(self, sql: str, *args: Any) -> Any:
        async def body() -> Any:
            async with self._connection() as conn:
                return await conn.fetchrow(sql, *args)

        return await self._guard(body())

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        async def body() -> list[Any]:
            async with self._connection() as conn:
                return list(await conn.fetch(sql, *args))

        return await self._guard(body())

    # --- users -----------------------------------------------------------------------------

    async def create_user(self, user: User) -> None:
        await self._execute(
            f"INSERT INTO users ({USER_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            *user_row(user),
        )

    async def get_user(self, user_id: str) -> User | None:
        row = await self._fetchrow(f"SELECT {USER_COLUMNS} FROM users WHERE id = $1", user_id)
        return user_from_row(row) if row else None

    async def get_user_by_email(self, email_key: str) -> User | None:
        row = await self._fetchrow(
            f"SELECT {USER_COLUMNS} FROM users WHERE email_key = $1", email_key
        )
        return user_from_row(row) if row else None

    async def list_users(self) -> list[User]:
        # COLLATE "C": the byte order SQLite uses, whatever the database's locale.
        rows = await self._fetch(
            f'SELECT {USER_COLUMNS} FROM users ORDER BY created_at, email_key COLLATE "C"'
        )
        return [user_from_row(row) for row in rows]

    async def update_user(
        self,
        user_id: str,
        *,
        roles: tuple[str, ...] | None = None,
        disabled: bool | None = None,
        password_hash: str | None = None,
    ) -> User | None:
        changes = user_changes(roles=roles, disabled=disabled, password_hash=password_hash)
        if not changes:
            return await self.get_user(user_id)
        # Column names come from the fixed tuple above, never from input. One statement:
        # the row returned is the row written.
        assignments = ", ".join(f"{column} = ${n}" for n, (column, _) in enumerate(changes, 2))
        row = await self._fetchrow(
            f"UPDATE users SET {assignments} WHERE id = $1 RETURNING {USER_COLUMNS}",
            user_id,
            *(value for _, value in changes),
        )
        return user_from_row(row) if row else None

    # --- refresh tokens ----------------------------------------------------------------------

    async def add_refresh(self, record: RefreshRecord) -> None:
        async def add(conn: Any) -> None:
            await conn.execute(
                "INSERT INTO refresh_families (id, user_id, created_at, expires_at)"
                " VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO NOTHING",
                record.family_id,
                record.user_id,
                float(record.created_at),
                float(record.expires_at),
            )
            await conn.execute(
                "INSERT INTO refresh_tokens"
                " (token_hash, family_id, user_id, created_at, expires_at, spent_at)"
                " VALUES ($1, $2, $3, $4, $5, $6)",
                record.token_hash,
                record.family_id,
                record.user_id,
                float(record.created_at),
                float(record.expires_at),
                None if record.spent_at is None else float(record.spent_at),
            )

        await self._run(add)

    async def get_refresh(self, token_hash: str) -> RefreshRecord | None:
        row = await self._fetchrow(_REFRESH_SELECT, token_hash)
        if row is None:
            return None
        return RefreshRecord(
            token_hash=row[0],
            user_id=row[1],
            family_id=row[2],
            created_at=row[3],
            expires_at=row[4],
            spent_at=row[5],
            revoked=bool(row[6]),
        )

    async def spend_refresh(self, token_hash: str, now: float) -> bool:
        spent = await self._fetchval(
            "UPDATE refresh_tokens SET spent_at = $1"
            " WHERE token_hash = $2 AND spent_at IS NULL AND expires_at > $1"
            " AND family_id IN (SELECT id FROM refresh_families WHERE revoked_at IS NULL)"
            " RETURNING token_hash",
            float(now),
            token_hash,
        )
        return spent is not None

    async def revoke_family(self, family_id: str, now: float) -> None:
        await self._execute(
            "UPDATE refresh_families SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL",
            float(now),
            family_id,
        )

    async def revoke_user_refresh(self, user_id: str, now: float) -> None:
        await self._execute(
            "UPDATE refresh_families SET revoked_at = $1 WHERE user_id = $2 AND revoked_at IS NULL",
            float(now),
            user_id,
        )

    async def prune_refresh(self, before: float) -> int:
        async def prune(conn: Any) -> int:
            count = _rowcount(
                await conn.execute("DELETE FROM refresh_tokens WHERE expires_at < $1", before)
            )
            await conn.execute("DELETE FROM refresh_families WHERE expires_at < $1", before)
            return count

        return await self._run(prune)

    # --- rate-limit events -----------------------------------------------------------------

    async def record_event(self, key: str, at: float) -> str:
        event_id = uuid.uuid4().hex
        await self._execute(
            "INSERT INTO rate_events (id, key, at) VALUES ($1, $2, $3)", event_id, key, float(at)
        )
        return event_id

    async def discard_event(self, event_id: str) -> None:
        await self._execute("DELETE FROM rate_events WHERE id = $1", event_id)

    async def count_events(self, key: str, since: float) -> tuple[int, float | None]:
        row = await self._fetchrow(
            "SELECT COUNT(*), MIN(at) FROM rate_events WHERE key = $1 AND at > $2",
            key,
            float(since),
        )
        return int(row[0]), row[1]

    async def clear_events(self, key: str) -> None:
        await self._execute("DELETE FROM rate_events WHERE key = $1", key)

    async def prune_events(self, before: float) -> int:
        return await self._execute("DELETE FROM rate_events WHERE at <= $1", float(before))


def describe_url(url: str) -> str:
    """The URL as messages may show it: scheme, user, host, port and database; no password,
    no query (which may carry one as ``?password=``)."""
    try:
        parts = urlsplit(url)
        if "@" in parts.path or ":" in parts.path:
            # An unencoded "/" in the password ended the host part early: show none of it.
            raise ValueError("unparsable")
        host = parts.hostname or "localhost"
        port = f":{parts.port}" if parts.port else ""
        user = f"{parts.username}@" if parts.username else ""
    except ValueError:
        return "postgresql://(unparsable URL)"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{user}{host}{port}{parts.path}"


def _at_open(exc: StoreError, where: str) -> StoreError:
    """The same kind of error, told to the operator at startup: which database and why."""
    cause = exc.__cause__ or exc
    if isinstance(cause, StoreError):
        reason = str(cause)  # our own words (e.g. a newer schema) need no class name
    else:
        reason = f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__
    message = f"cannot open the database {where}: {reason}"
    return StoreUnavailable(message) if isinstance(exc, StoreUnavailable) else StoreError(message)


def _rowcount(status: str) -> int:
    """Rows touched, from a command tag: ``UPDATE 3``, ``DELETE 0``, ``INSERT 0 1``."""
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0
