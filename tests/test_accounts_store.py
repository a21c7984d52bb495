"""The account stores on real databases: schema, uniqueness, atomic spends, counters.

The behaviour tests run against both backends (``db_url``: a SQLite file and a database on a
real PostgreSQL server, see tests/pg.py); file- and SQLite-specific ones use ``SqliteStore``.
What only PostgreSQL can show (replicas racing, a server stopped) is in
test_accounts_postgres.py.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.accounts.models import RefreshRecord, User
from gateway.accounts.postgres import PostgresStore
from gateway.accounts.sqlite import MIGRATIONS, SqliteStore
from gateway.accounts.store import (
    AccountStore,
    StoreError,
    StoreUnavailable,
    UnsupportedDatabase,
    open_store,
    sqlite_path,
)
from gateway.errors import EmailTaken, ServiceUnavailable
from tests.pg import query

pytest_plugins = ["tests.pg"]


def make_user(n: int = 1, *, email_key: str | None = None, at: float = 1000.0) -> User:
    return User(
        id=f"00000000-0000-4000-8000-{n:012d}",
        email=f"user{n}@example.com",
        email_key=email_key or f"user{n}@example.com",
        name=f"User {n}",
        roles=("user", "admin") if n % 2 else ("user",),
        password_hash=f"$2b$04$hash{n}",
        created_at=at + n,
    )


def make_refresh(token: str, user: User, family: str, *, at: float = 1000.0) -> RefreshRecord:
    return RefreshRecord(
        token_hash=token, user_id=user.id, family_id=family, created_at=at, expires_at=at + 100
    )


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[AccountStore]:
    """An open store of each backend, on a fresh database."""
    s = open_store(db_url)
    await s.open()
    yield s
    await s.close()


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///data/gateway.db", "data/gateway.db"),
        ("sqlite:////abs/path.db", "/abs/path.db"),
        ("SQLite:///x.db", "x.db"),
        ("sqlite:///:memory:", ":memory:"),
        ("sqlite://:memory:", ":memory:"),
    ],
)
def test_open_store_picks_sqlite_by_scheme(url: str, path: str) -> None:
    store = open_store(url)
    assert isinstance(store, SqliteStore)
    assert store.path == path


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://admin:hunter2@db:5432/gw", "postgresql://admin@db:5432/gw"),
        ("postgres://admin:hunter2@db/gw", "postgres://admin@db/gw"),
        ("PostgreSQL://admin:hunter2@db/gw?sslmode=require", "postgresql://admin@db/gw"),
        ("postgresql://admin:hunter2@[::1]:5433/gw", "postgresql://admin@[::1]:5433/gw"),
        ("postgresql:///gw?password=hunter2", "postgresql://localhost/gw"),
        ("postgresql://admin:hun/ter2@db/gw", "postgresql://(unparsable URL)"),  # unencoded "/"
        ("postgresql://admin:123/ter2@db/gw", "postgresql://(unparsable URL)"),
    ],
)
def test_open_store_picks_postgres_by_scheme_and_hides_the_password(url: str, shown: str) -> None:
    store = open_store(url)
    assert isinstance(store, PostgresStore)
    assert repr(store).startswith(f"PostgresStore('{shown}")
    assert "hunter2" not in repr(store) and "ter2" not in repr(store) and "123" not in repr(store)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql+asyncpg://admin:hunter2@db/gw", "use postgresql://"),
        ("mysql://admin:hunter2@db/gw", "unsupported database scheme 'mysql'"),
        ("gateway.db", "sqlite:///"),
        ("sqlite://", "sqlite:///relative.db"),
        ("sqlite://relative.db", "sqlite:///relative.db"),
        ("sqlite:///x.db?mode=ro", "no query"),
    ],
)
def test_open_store_refuses_other_urls_without_echoing_them(url: str, message: str) -> None:
    with pytest.raises(UnsupportedDatabase) as info:
        open_store(url)
    assert message in str(info.value)
    assert "hunter2" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_sqlite_path_keeps_absolute_paths() -> None:
    assert sqlite_path("//var/lib/gw.db") == "/var/lib/gw.db"


async def test_open_creates_parent_dir_and_schema_version(tmp_path: Path) -> None:
    db = tmp_path / "a" / "b" / "gw.db"
    store = SqliteStore(db)
    await store.open()
    try:
        assert db.is_file()
        assert await store.schema_version() == MIGRATIONS[-1][0]
    finally:
        await store.close()
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        rows = conn.execute("SELECT version FROM schema_version").fetchall()
    assert {"users", "refresh_families", "refresh_tokens", "rate_events"} <= tables
    assert rows == [(1,)]


async def test_migrations_are_idempotent_on_reopen(tmp_path: Path) -> None:
    db = tmp_path / "gw.db"
    store = SqliteStore(db)
    await store.open()
    await store.create_user(make_user(1))
    await store.close()
    for _ in range(2):
        again = SqliteStore(db)
        await again.open()
        assert await again.get_user(make_user(1).id) == make_user(1)
        await again.close()
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == len(MIGRATIONS)


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "gw.db"
    store = SqliteStore(db)
    await store.open()
    await store.close()
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO schema_version VALUES (999, 0)")
    newer = SqliteStore(db)
    with pytest.raises(StoreError, match="newer than this gateway"):
        await newer.open()
    with pytest.raises(StoreUnavailable):
        await newer.ping()  # a failed open leaves the store closed


async def test_open_on_unusable_path_is_an_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError):
        await SqliteStore(blocker / "gw.db").open()


async def test_garbage_file_is_unavailable_not_a_crash(tmp_path: Path) -> None:
    db = tmp_path / "gw.db"
    db.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreUnavailable) as info:
        await SqliteStore(db).open()
    assert isinstance(info.value, ServiceUnavailable)
    assert isinstance(info.value.__cause__, StoreUnavailable)


async def test_closed_store_is_unavailable(store: AccountStore) -> None:
    await store.ping()
    await store.close()
    with pytest.raises(StoreUnavailable) as info:
        await store.ping()
    assert info.value.status == 503
    assert "SELECT" not in info.value.detail


async def test_user_round_trip_and_lookups(store: AccountStore) -> None:
    users = [make_user(n) for n in (3, 1, 2)]
    for user in users:
        await store.create_user(user)
    assert await store.get_user(users[0].id) == users[0]
    assert await store.get_user_by_email("user2@example.com") == users[2]
    assert await store.get_user("missing") is None
    assert await store.get_user_by_email("nobody@example.com") is None
    assert [u.id for u in await store.list_users()] == [make_user(n).id for n in (1, 2, 3)]


async def test_update_user_changes_only_given_fields(store: AccountStore) -> None:
    user = make_user(1)
    await store.create_user(user)
    updated = await store.update_user(user.id, roles=("ops",), disabled=True)
    assert updated is not None
    assert (updated.roles, updated.disabled, updated.password_hash) == (
        ("ops",),
        True,
        user.password_hash,
    )
    updated = await store.update_user(user.id, password_hash="$2b$04$new")
    assert updated is not None
    assert (updated.roles, updated.disabled) == (("ops",), True)
    assert updated.password_hash == "$2b$04$new"
    assert await store.update_user("missing", disabled=True) is None


async def test_duplicate_email_key_is_refused(store: AccountStore) -> None:
    await store.create_user(make_user(1, email_key="same@example.com"))
    with pytest.raises(EmailTaken):
        await store.create_user(make_user(2, email_key="same@example.com"))
    assert len(await store.list_users()) == 1


async def test_concurrent_creates_of_one_email_make_exactly_one_user(store: AccountStore) -> None:
    results = await asyncio.gather(
        *(store.create_user(make_user(n, email_key="race@example.com")) for n in range(20)),
        return_exceptions=True,
    )
    assert sum(r is None for r in results) == 1
    assert all(isinstance(r, EmailTaken) for r in results if r is not None)
    assert len(await store.list_users()) == 1


async def test_two_connections_to_one_file_share_the_unique_constraint(tmp_path: Path) -> None:
    first, second = SqliteStore(tmp_path / "gw.db"), SqliteStore(tmp_path / "gw.db")
    await first.open()
    await second.open()
    try:
        results = await asyncio.gather(
            first.create_user(make_user(1, email_key="race@example.com")),
            second.create_user(make_user(2, email_key="race@example.com")),
            return_exceptions=True,
        )
        assert sorted(type(r).__name__ for r in results) == ["EmailTaken", "NoneType"]
    finally:
        await first.close()
        await second.close()


async def test_refresh_round_trip(store: AccountStore) -> None:
    user = make_user(1)
    await store.create_user(user)
    record = make_refresh("h1", user, "fam")
    await store.add_refresh(record)
    assert await store.get_refresh("h1") == record
    assert await store.get_refresh("unknown") is None


async def test_spend_refresh_once(store: AccountStore) -> None:
    user = make_user(1)
    await store.create_user(user)
    await store.add_refresh(make_refresh("h1", user, "fam"))
    assert await store.spend_refresh("h1", 1010.0) is True
    assert await store.spend_refresh("h1", 1011.0) is False
    spent = await store.get_refresh("h1")
    assert spent is not None and spent.spent_at == 1010.0
    assert await store.spend_refresh("unknown", 1010.0) is False


async def test_spend_refresh_is_atomic_under_gather(store: AccountStore) -> None:
    user = make_user(1)
    await store.create_user(user)
    await store.add_refresh(make_refresh("h1", user, "fam"))
    results = await asyncio.gather(*(store.spend_refresh("h1", 1010.0 + i) for i in range(25)))
    assert results.count(True) == 1


@pytest.mark.parametrize(
    ("revoke", "now"),
    [("family", 1010.0), ("user", 1010.0), (None, 1100.0), (None, 1200.0)],
)
async def test_spend_refuses_revoked_or_expired(
    store: AccountStore, revoke: str | None, now: float
) -> None:
    user = make_user(1)
    await store.create_user(user)
    await store.add_refresh(make_refresh("h1", user, "fam"))
    if revoke == "family":
        await store.revoke_family("fam", 1005.0)
    elif revoke == "user":
        await store.revoke_user_refresh(user.id, 1005.0)
    assert await store.spend_refresh("h1", now) is False


async def test_revocation_covers_tokens_added_later(store: AccountStore) -> None:
    user = make_user(1)
    await store.create_user(user)
    await store.add_refresh(make_refresh("h1", user, "fam"))
    await store.revoke_family("fam", 1005.0)
    await store.add_refresh(make_refresh("h2", user, "fam", at=1006.0))
    late = await store.get_refresh("h2")
    assert late is not None and late.revoked
    assert await store.spend_refresh("h2", 1007.0) is False


async def test_revoke_user_leaves_other_users_alone(store: AccountStore) -> None:
    alice, bob = make_user(1), make_user(2)
    await store.create_user(alice)
    await store.create_user(bob)
    await store.add_refresh(make_refresh("a1", alice, "fa1"))
    await store.add_refresh(make_refresh("a2", alice, "fa2"))
    await store.add_refresh(make_refresh("b1", bob, "fb1"))
    await store.revoke_user_refresh(alice.id, 1005.0)
    records = {h: await store.get_refresh(h) for h in ("a1", "a2", "b1")}
    assert {h: r.revoked if r else None for h, r in records.items()} == {
        "a1": True,
        "a2": True,
        "b1": False,
    }


async def test_refresh_needs_an_existing_user(store: AccountStore) -> None:
    with pytest.raises(StoreError):
        await store.add_refresh(make_refresh("h1", make_user(9), "fam"))
    assert await store.get_refresh("h1") is None


async def test_add_refresh_is_all_or_nothing(store: AccountStore, db_url: str) -> None:
    user = make_user(1)
    await store.create_user(user)
    await store.add_refresh(make_refresh("h1", user, "fam"))
    # Same token hash in a new family: the token insert fails, so the family must not stay.
    with pytest.raises(StoreError):
        await store.add_refresh(make_refresh("h1", user, "other-family"))
    assert await query(db_url, "SELECT id FROM refresh_families") == [("fam",)]


async def test_prune_refresh_deletes_only_expired(store: AccountStore) -> None:
    user = make_user(1)
    await store.create_user(user)
    await store.add_refresh(make_refresh("old", user, "f-old", at=0.0))
    await store.add_refresh(make_refresh("new", user, "f-new", at=1000.0))
    assert await store.prune_refresh(500.0) == 1
    assert await store.get_refresh("old") is None
    assert await store.get_refresh("new") is not None


async def test_event_counting_window(store: AccountStore) -> None:
    for at in (100.0, 110.0, 120.0):
        await store.record_event("k", at)
    await store.record_event("other", 115.0)
    assert await store.count_events("k", 99.0) == (3, 100.0)
    assert await store.count_events("k", 100.0) == (2, 110.0)  # the window is (since, now]
    assert await store.count_events("k", 120.0) == (0, None)
    assert await store.count_events("nothing", 0.0) == (0, None)


async def test_discard_clear_and_prune_events(store: AccountStore) -> None:
    first = await store.record_event("k", 100.0)
    await store.record_event("k", 110.0)
    await store.record_event("j", 105.0)
    await store.discard_event(first)
    assert await store.count_events("k", 0.0) == (1, 110.0)
    await store.clear_events("k")
    assert await store.count_events("k", 0.0) == (0, None)
    assert await store.count_events("j", 0.0) == (1, 105.0)
    assert await store.prune_events(105.0) == 1
    assert await store.count_events("j", 0.0) == (0, None)


async def test_concurrent_records_are_all_counted(store: AccountStore) -> None:
    ids = await asyncio.gather(*(store.record_event("k", 100.0) for _ in range(30)))
    assert len(set(ids)) == 30
    assert await store.count_events("k", 0.0) == (30, 100.0)


def test_reprs_hide_secrets() -> None:
    user = make_user(1)
    record = make_refresh("secret-hash", user, "fam")
    assert "$2b$" not in repr(user)
    assert "secret-hash" not in repr(record)


def test_public_user_json() -> None:
    user = User(
        id="u1",
        email="A@example.com",
        email_key="a@example.com",
        name=None,
        roles=("user", "ops"),
        password_hash="$2b$04$x",
        created_at=1795985100.75,  # 2026-11-29T20:45:00.75Z: whole seconds shown
    )
    assert user.public() == {
        "id": "u1",
        "email": "A@example.com",
        "name": None,
        "roles": ["user", "ops"],
        "created_at": "2026-11-29T20:45:00Z",
    }
