"""The SQLite account store (aiosqlite): the embedded default.

One connection per store, in WAL mode with a busy timeout, foreign keys on and
``synchronous=NORMAL``. Every operation holds one asyncio lock, so a transaction of one
coroutine never takes in another coroutine's statements; multi-statement operations run in
``BEGIN IMMEDIATE`` … ``COMMIT`` and roll back on any failure, so nothing is half written.
Other processes on the same file are serialized by SQLite's own locking (``busy_timeout``).

The schema is kept portable to PostgreSQL: TEXT ids, REAL timestamps (unix seconds),
roles as JSON text, booleans as 0/1 integers. It evolves only by appending to
``MIGRATIONS``; ``schema_version`` records what was applied.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

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

BUSY_TIMEOUT_MS = 5000

# Append only: a released migration never changes, so every database converges.
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
                created_at REAL NOT NULL,
                disabled INTEGER NOT NULL DEFAULT 0
            )""",
            """CREATE TABLE refresh_families (
                id TEXT PRIMARY KEY,
                user_id TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
                created_at REAL NOT NULL,
                expires_at REAL NOT NULL,
                revoked_at REAL
            )""",
            "CREATE INDEX refresh_families_user ON refresh_families (user_id)",
            "CREATE INDEX refresh_families_expires ON refresh_families (expires_at)",
            """CREATE TABLE refresh_tokens (
                token_hash TEXT PRIMARY KEY,
                family_id TEXT NOT NULL REFERENCES refresh_families (id) ON DELETE CASCADE,
                user_id TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
                created_at REAL NOT NULL,
                expires_at REAL NOT NULL,
                spent_at REAL
            )""",
            "CREATE INDEX refresh_tokens_family ON refresh_tokens (family_id)",
            "CREATE INDEX refresh_tokens_expires ON refresh_tokens (expires_at)",
            """CREATE TABLE rate_events (
                id TEXT PRIMARY KEY,
                key TEXT NOT NULL,
                at REAL NOT NULL
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
    WHERE t.token_hash = ?"""


class SqliteStore:
    """``AccountStore`` on one SQLite file (or ``:memory:``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._conn: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"SqliteStore({self.path!r})"

    # --- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        if self._conn is not None:
            return
        try:
            await self._guard(self._connect())
            await self._run(self._migrate)
        except StoreUnavailable as exc:
            await self.close()
            # Said at startup to the operator (never in a response): name the file and cause.
            cause = exc.__cause__ or exc
            raise StoreUnavailable(f"cannot open the database {self.path}: {cause}") from exc
        except BaseException:
            await self.close()
            raise

    async def _connect(self) -> None:
        if self.path != ":memory:":
            try:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create the directory of {self.path}: {exc}") from exc
        # isolation_level=None: autocommit; transactions are explicit (BEGIN IMMEDIATE).
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            for pragma in (
                f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}",
                "PRAGMA journal_mode = WAL",
                "PRAGMA synchronous = NORMAL",
                "PRAGMA foreign_keys = ON",
            ):
                await conn.execute(pragma)
        except BaseException:
            await conn.close()
            raise
        self._conn = conn

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            async with self._lock:
                await conn.close()

    async def ping(self) -> None:
        await self._fetchone("SELECT 1")

    async def _migrate(self, conn: aiosqlite.Connection) -> None:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version"
            " (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
        )
        async with conn.execute("SELECT MAX(version) FROM schema_version") as cur:
            row = await cur.fetchone()
        current = (row[0] if row else None) or 0
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
                "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                (version, time.time()),
            )

    async def schema_version(self) -> int:
        row = await self._fetchone("SELECT MAX(version) FROM schema_version")
        return int(row[0]) if row and row[0] is not None else 0

    # --- plumbing ----------------------------------------------------------------------------

    async def _guard(self, op: Awaitable[T]) -> T:
        """Translate driver failures: the client sees 503, never SQL (``raise ... from``)."""
        try:
            return await op
        except sqlite3.IntegrityError as exc:
            if "email_key" in str(exc):
                raise EmailTaken("An account with this email already exists.") from exc
            raise StoreError("integrity error in the account store") from exc
        except (sqlite3.OperationalError, sqlite3.DatabaseError) as exc:
            raise StoreUnavailable() from exc
        except ValueError as exc:
            # aiosqlite after close: "no active connection" / "Connection closed".
            if "connection" in str(exc).lower():
                raise StoreUnavailable() from exc
            raise

    def _live(self) -> aiosqlite.Connection:
        if self._conn is None:
            raise StoreUnavailable()
        return self._conn

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """One transaction under the lock; raw driver errors (callers translate them)."""
        async with self._lock:
            conn = self._live()
            await conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                await conn.commit()
            except BaseException:
                # Called directly, rollback() is queued on aiosqlite's worker at once, so even
                # under cancellation it runs before any statement of the next lock holder.
                try:
                    await conn.rollback()
                except (sqlite3.Error, ValueError):
                    pass  # the original error is the one worth reporting
                raise

    async def _run(self, fn: Callable[[aiosqlite.Connection], Awaitable[T]]) -> T:
        """Run ``fn`` in one transaction, translating errors."""

        async def body() -> T:
            async with self._transaction() as conn:
                return await fn(conn)

        return await self._guard(body())

    async def _execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """One autocommitted statement; return its rowcount."""

        async def body() -> int:
            async with self._lock:
                async with self._live().execute(sql, params) as cur:
                    return cur.rowcount

        return await self._guard(body())

    async def _fetchone(self, sql: str, params: Sequence[Any] = ()) -> Any:
        async def body() -> Any:
            async with self._lock:
                async with self._live().execute(sql, params) as cur:
                    return await cur.fetchone()

        return await self._guard(body())

    async def _fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        async def body() -> list[Any]:
            async with self._lock:
                async with self._live().execute(sql, params) as cur:
                    return list(await cur.fetchall())

        return await self._guard(body())

    # --- users -----------------------------------------------------------------------------

    async def create_user(self, user: User) -> None:
        await self._execute(
            f"INSERT INTO users ({USER_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            user_row(user),
        )

    async def get_user(self, user_id: str) -> User | None:
        row = await self._fetchone(f"SELECT {USER_COLUMNS} FROM users WHERE id = ?", (user_id,))
        return user_from_row(row) if row else None

    async def get_user_by_email(self, email_key: str) -> User | None:
        row = await self._fetchone(
            f"SELECT {USER_COLUMNS} FROM users WHERE email_key = ?", (email_key,)
        )
        return user_from_row(row) if row else None

    async def list_users(self) -> list[User]:
        rows = await self._fetchall(
            f"SELECT {USER_COLUMNS} FROM users ORDER BY created_at, email_key"
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

        async def update(conn: aiosqlite.Connection) -> User | None:
            if changes:
                # Column names come from the fixed tuple above, never from input.
                assignments = ", ".join(f"{column} = ?" for column, _ in changes)
                await conn.execute(
                    f"UPDATE users SET {assignments} WHERE id = ?",
                    [value for _, value in changes] + [user_id],
                )
            async with conn.execute(
                f"SELECT {USER_COLUMNS} FROM users WHERE id = ?", (user_id,)
            ) as cur:
                row = await cur.fetchone()
            return user_from_row(row) if row else None

        return await self._run(update)

    # --- refresh tokens ----------------------------------------------------------------------

    async def add_refresh(self, record: RefreshRecord) -> None:
        async def add(conn: aiosqlite.Connection) -> None:
            await conn.execute(
                "INSERT INTO refresh_families (id, user_id, created_at, expires_at)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                (record.family_id, record.user_id, record.created_at, record.expires_at),
            )
            await conn.execute(
                "INSERT INTO refresh_tokens"
                " (token_hash, family_id, user_id, created_at, expires_at, spent_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    record.token_hash,
                    record.family_id,
                    record.user_id,
                    record.created_at,
                    record.expires_at,
                    record.spent_at,
                ),
            )

        await self._run(add)

    async def get_refresh(self, token_hash: str) -> RefreshRecord | None:
        row = await self._fetchone(_REFRESH_SELECT, (token_hash,))
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
        count = await self._execute(
            "UPDATE refresh_tokens SET spent_at = ?"
            " WHERE token_hash = ? AND spent_at IS NULL AND expires_at > ?"
            " AND family_id IN (SELECT id FROM refresh_families WHERE revoked_at IS NULL)",
            (now, token_hash, now),
        )
        return count == 1

    async def revoke_family(self, family_id: str, now: float) -> None:
        await self._execute(
            "UPDATE refresh_families SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
            (now, family_id),
        )

    async def revoke_user_refresh(self, user_id: str, now: float) -> None:
        await self._execute(
            "UPDATE refresh_families SET revoked_at = ? WHERE user_id = ? AND revoked_at IS NULL",
            (now, user_id),
        )

    async def prune_refresh(self, before: float) -> int:
        async def prune(conn: aiosqlite.Connection) -> int:
            async with conn.execute(
                "DELETE FROM refresh_tokens WHERE expires_at < ?", (before,)
            ) as cur:
                count = cur.rowcount
            await conn.execute("DELETE FROM refresh_families WHERE expires_at < ?", (before,))
            return count

        return await self._run(prune)

    # --- rate-limit events -----------------------------------------------------------------

    async def record_event(self, key: str, at: float) -> str:
        event_id = uuid.uuid4().hex
        await self._execute(
            "INSERT INTO rate_events (id, key, at) VALUES (?, ?, ?)", (event_id, key, at)
        )
        return event_id

    async def discard_event(self, event_id: str) -> None:
        await self._execute("DELETE FROM rate_events WHERE id = ?", (event_id,))

    async def count_events(self, key: str, since: float) -> tuple[int, float | None]:
        row = await self._fetchone(
            "SELECT COUNT(*), MIN(at) FROM rate_events WHERE key = ? AND at > ?", (key, since)
        )
        return int(row[0]), row[1]

    async def clear_events(self, key: str) -> None:
        await self._execute("DELETE FROM rate_events WHERE key = ?", (key,))

    async def prune_events(self, before: float) -> int:
        return await self._execute("DELETE FROM rate_events WHERE at <= ?", (before,))
