"""The account store protocol; the implementation is chosen by the database URL's scheme.

A store keeps users, refresh-token families and rate-limit events. The protocol is
database-neutral: the service above it never sees SQL, and each backend (SQLite embedded,
PostgreSQL shared by replicas) implements these methods with no change to the service or the
handlers.

Guarantees every implementation must keep:

- email uniqueness is enforced by the database (a UNIQUE constraint on ``email_key``), so two
  concurrent registrations of one address give exactly one account and one ``EmailTaken``;
- ``spend_refresh`` is one atomic conditional update: of concurrent spends of one token,
  exactly one returns True;
- a revoked family stays revoked, including for tokens added to it after the revocation
  (the flag lives on the family, and every read of a token reports it);
- nothing is partially written: multi-statement operations run in one transaction;
- driver errors are translated: ``EmailTaken`` for a duplicate email, ``StoreUnavailable``
  (HTTP 503) when the database cannot be used, ``StoreError`` for anything else;
- a database that is unreachable gives ``StoreUnavailable`` quickly (seconds, never a hang),
  and the store recovers by itself once it is back; ``open()`` raises ``StoreUnavailable``
  if it cannot reach the database, leaving the store closed (``open()`` may be retried);
- errors and reprs never show the database URL's password.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Protocol

from gateway.accounts.models import RefreshRecord, User
from gateway.errors import ServiceUnavailable

# The users table, the same in every backend: its columns, and a User to and from a row.
USER_COLUMNS = "id, email, email_key, name, roles, password_hash, created_at, disabled"


def user_row(user: User) -> tuple[Any, ...]:
    """``user`` as the values of ``USER_COLUMNS``."""
    return (
        user.id,
        user.email,
        user.email_key,
        user.name,
        json.dumps(list(user.roles)),
        user.password_hash,
        float(user.created_at),
        int(user.disabled),
    )


def user_from_row(row: Sequence[Any]) -> User:
    """A row of ``USER_COLUMNS`` as a User."""
    return User(
        id=row[0],
        email=row[1],
        email_key=row[2],
        name=row[3],
        roles=tuple(str(role) for role in json.loads(row[4])),
        password_hash=row[5],
        created_at=float(row[6]),
        disabled=bool(row[7]),
    )


def user_changes(
    *, roles: tuple[str, ...] | None, disabled: bool | None, password_hash: str | None
) -> list[tuple[str, Any]]:
    """``update_user``'s arguments as ``(column, value)`` pairs, None meaning unchanged.
    Column names come from this fixed list, never from input."""
    changes: list[tuple[str, Any]] = []
    if roles is not None:
        changes.append(("roles", json.dumps(list(roles))))
    if disabled is not None:
        changes.append(("disabled", int(disabled)))
    if password_hash is not None:
        changes.append(("password_hash", password_hash))
    return changes


class StoreError(Exception):
    """The account store failed in a way that is not the client's doing."""


class StoreUnavailable(StoreError, ServiceUnavailable):
    """The database cannot be used right now (locked, disk I/O, closed, unreachable,
    restarting); HTTP 503."""

    def __init__(self, detail: str | None = None) -> None:
        super().__init__(detail or "The account database is unavailable.")


class UnsupportedDatabase(StoreError, ValueError):
    """The database URL names a scheme this gateway cannot use (yet)."""


class AccountStore(Protocol):
    """Persistence for accounts. All timestamps are unix seconds (float)."""

    async def open(self) -> None:
        """Connect and bring the schema up to date (migrations are idempotent)."""
        ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Return if the database answers; else raise ``StoreUnavailable`` (for /readyz)."""
        ...

    # --- users -----------------------------------------------------------------------------

    async def create_user(self, user: User) -> None:
        """Insert; raise ``EmailTaken`` if ``user.email_key`` exists."""
        ...

    async def get_user(self, user_id: str) -> User | None: ...

    async def get_user_by_email(self, email_key: str) -> User | None: ...

    async def list_users(self) -> list[User]:
        """Every user, oldest first."""
        ...

    async def update_user(
        self,
        user_id: str,
        *,
        roles: tuple[str, ...] | None = None,
        disabled: bool | None = None,
        password_hash: str | None = None,
    ) -> User | None:
        """Change the given fields (None = unchanged); return the updated user, or None."""
        ...

    # --- refresh tokens ----------------------------------------------------------------------

    async def add_refresh(self, record: RefreshRecord) -> None:
        """Store a token; its family is created with it if new (``expires_at`` from the
        first record). A token added to a revoked family is revoked from the start."""
        ...

    async def get_refresh(self, token_hash: str) -> RefreshRecord | None:
        """The record, with ``revoked`` true if its family was revoked."""
        ...

    async def spend_refresh(self, token_hash: str, now: float) -> bool:
        """Atomically mark an unspent, unexpired token of an unrevoked family spent;
        True only for the one caller that did."""
        ...

    async def revoke_family(self, family_id: str, now: float) -> None: ...

    async def revoke_user_refresh(self, user_id: str, now: float) -> None:
        """Revoke every refresh-token family of the user."""
        ...

    async def prune_refresh(self, before: float) -> int:
        """Delete tokens and families that expired before ``before``; return tokens deleted."""
        ...

    # --- rate-limit events -----------------------------------------------------------------

    async def record_event(self, key: str, at: float) -> str:
        """Record one event under ``key``; return its id (for ``discard_event``)."""
        ...

    async def discard_event(self, event_id: str) -> None: ...

    async def count_events(self, key: str, since: float) -> tuple[int, float | None]:
        """Events under ``key`` later than ``since``: their count and the oldest's time."""
        ...

    async def clear_events(self, key: str) -> None: ...

    async def prune_events(self, before: float) -> int:
        """Delete events at or before ``before``; return how many."""
        ...


_POSTGRES_SCHEMES = ("postgres", "postgresql")


def open_store(url: str) -> AccountStore:
    """Pick the backend by the URL's scheme (one backend's driver is imported, chosen here):

    - ``sqlite:///relative.db`` (relative to the working directory), ``sqlite:////abs.db``,
      ``sqlite:///:memory:``;
    - ``postgresql://user:password@host:5432/database`` (or ``postgres://``), with libpq's
      query parameters such as ``?sslmode=require``; special characters in the password
      percent-encoded.

    Returns an unopened store: call ``await store.open()``. Errors never echo the URL, which
    may hold a password.
    """
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise UnsupportedDatabase(
            "database.url must look like sqlite:///path/to/file.db or postgresql://host/db"
        )
    if scheme in _POSTGRES_SCHEMES:
        from gateway.accounts.postgres import PostgresStore

        # asyncpg accepts only the lowercase scheme; the rest is passed on untouched.
        return PostgresStore(f"{scheme}://{rest}")
    if scheme.startswith(("postgresql+", "postgres+")):
        raise UnsupportedDatabase(
            f"unsupported database scheme {scheme!r}; use postgresql:// (the driver is asyncpg)"
        )
    if scheme != "sqlite":
        raise UnsupportedDatabase(
            f"unsupported database scheme {scheme!r}; use sqlite:/// or postgresql://"
        )
    from gateway.accounts.sqlite import SqliteStore

    return SqliteStore(sqlite_path(rest))


def sqlite_path(rest: str) -> str:
    """The file path of a ``sqlite://`` URL after the scheme (``/rel.db``, ``//abs.db``)."""
    if rest in (":memory:", "/:memory:"):
        return ":memory:"
    if not rest.startswith("/") or len(rest) < 2:
        raise UnsupportedDatabase("a sqlite URL is sqlite:///relative.db or sqlite:////abs.db")
    if "?" in rest or "#" in rest or "\x00" in rest:
        raise UnsupportedDatabase("a sqlite URL takes no query, fragment or NUL")
    return rest[1:]
