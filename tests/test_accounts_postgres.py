"""The PostgreSQL store where only a shared server can show it: replicas racing, a server
that stops and comes back, a database that is slow, full or unreachable.

A "replica" is a store with a pool of its own on the same database: the server, not this
process, decides who wins. Everything runs against a real PostgreSQL (tests/pg.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import secrets
import socket
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from gateway.accounts.models import TokenPair, User
from gateway.accounts.postgres import MIGRATION_LOCK, MIGRATIONS, PostgresStore
from gateway.accounts.service import AccountService
from gateway.accounts.sqlite import MIGRATIONS as SQLITE_MIGRATIONS
from gateway.accounts.sqlite import SqliteStore
from gateway.accounts.store import StoreError, StoreUnavailable
from gateway.config import AccountSettings, Rate, Secret, TokenSettings
from gateway.errors import EmailTaken, InvalidCredentials, InvalidToken
from gateway.passwords import PasswordHasher
from gateway.tokens import KeyRing, TokenService
from tests.pg import PgServer, query, started_server
from tests.test_accounts_store import make_refresh, make_user

pytest_plugins = ["tests.pg"]

PASSWORD = "correct horse battery"
IP = "192.0.2.10"
FAST = 3.0  # seconds: how soon an operation on a dead database must give up
TOKENS = TokenSettings(
    issuer="http://gateway.test",
    audience="gateway",
    algorithm="HS256",
    secret=Secret("s" * 48),
    access_ttl=900.0,
    refresh_ttl=3600.0,
    leeway=0.0,
    refresh_reuse_grace=0.0,
)
ACCOUNTS = AccountSettings(
    password_min_length=8,
    bcrypt_rounds=4,
    default_roles=("user",),
    login_rate_limit=Rate(1000, 60.0),
    register_rate_limit=Rate(1000, 60.0),
)


class Replica:
    """One gateway process's view: its own pool, hasher and service on the shared database."""

    def __init__(
        self, url: str, accounts: AccountSettings, clock: Callable[[], float] = time.time
    ) -> None:
        self.store = PostgresStore(url)
        self.hasher = PasswordHasher(accounts.bcrypt_rounds)
        tokens = TokenService(TOKENS, KeyRing.load(TOKENS), clock=clock)
        self.service = AccountService(
            self.store, self.hasher, tokens, accounts, TOKENS, clock=clock
        )


@pytest.fixture
async def migrated_url(pg_server: PgServer) -> AsyncIterator[str]:
    url = pg_server.create_database(migrated=True)
    yield url
    pg_server.drop_database(url)


@pytest.fixture
async def replicas(
    migrated_url: str,
) -> AsyncIterator[Callable[..., Awaitable[tuple[Replica, Replica]]]]:
    made: list[Replica] = []

    async def make(
        clocks: tuple[Callable[[], float], Callable[[], float]] = (time.time, time.time),
        **accounts: Any,
    ) -> tuple[Replica, Replica]:
        settings = dataclasses.replace(ACCOUNTS, **accounts)
        pair = (
            Replica(migrated_url, settings, clocks[0]),
            Replica(migrated_url, settings, clocks[1]),
        )
        for replica in pair:
            await replica.store.open()
            made.append(replica)
        return pair

    yield make
    for replica in made:
        await replica.store.close()
        replica.hasher.close()


@pytest.fixture
async def two_stores(migrated_url: str) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    first, second = PostgresStore(migrated_url), PostgresStore(migrated_url)
    await first.open()
    await second.open()
    yield first, second
    await first.close()
    await second.close()


def alternate(stores: tuple[PostgresStore, PostgresStore], n: int) -> Iterator[PostgresStore]:
    return (stores[i % 2] for i in range(n))


# --- schema and migrations ---------------------------------------------------------------


async def test_schema_is_the_sqlite_schema(pg_url: str, tmp_path: Path) -> None:
    assert [v for v, _ in MIGRATIONS] == [v for v, _ in SQLITE_MIGRATIONS]
    pg = PostgresStore(pg_url)
    await pg.open()
    await pg.close()
    lite = SqliteStore(tmp_path / "gw.db")
    await lite.open()
    await lite.close()
    lite_url = f"sqlite:///{tmp_path / 'gw.db'}"

    # Column names, order, nullability and type family, table by table.
    family = {"text": "TEXT", "real": "REAL", "double precision": "REAL", "integer": "INTEGER"}
    pg_columns = await query(
        pg_url,
        "SELECT table_name, column_name, data_type, is_nullable = 'NO'"
        " FROM information_schema.columns WHERE table_schema = 'public'"
        " ORDER BY table_name, ordinal_position",
    )
    lite_columns = []
    for (table,) in await query(
        lite_url, "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
    ):
        for _, name, kind, notnull, _, pk in await query(lite_url, f"PRAGMA table_info({table})"):
            lite_columns.append((table, name, kind, bool(notnull or pk)))
    assert [(t, c, family[k.lower()], n) for t, c, k, n in pg_columns] == [
        (t, c, family[k.lower()], n) for t, c, k, n in lite_columns
    ]
    # Timestamps must not be PostgreSQL's 4-byte REAL: that rounds today to ~2 minutes.
    assert {k for _, _, k, _ in pg_columns} == {"text", "double precision", "integer"}

    pg_indexes = await query(
        pg_url,
        "SELECT indexname FROM pg_indexes WHERE schemaname = 'public'"
        " AND indexname NOT LIKE '%pkey' AND indexname NOT LIKE '%key'",
    )
    lite_indexes = await query(
        lite_url,
        "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL",
    )
    assert sorted(pg_indexes) == sorted(lite_indexes)
    assert await query(pg_url, "SELECT version FROM schema_version") == [(1,)]


async def test_migrations_from_three_replicas_at_once(pg_url: str) -> None:
    stores = [PostgresStore(pg_url) for _ in range(3)]
    try:
        await asyncio.gather(*(store.open() for store in stores))
        assert [await store.schema_version() for store in stores] == [MIGRATIONS[-1][0]] * 3
        await stores[0].create_user(make_user(1))
        assert await stores[2].get_user(make_user(1).id) == make_user(1)
    finally:
        for store in stores:
            await store.close()
    assert await query(pg_url, "SELECT version FROM schema_version") == [(1,)]
    tables = await query(
        pg_url,
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        " ORDER BY table_name",
    )
    assert tables == [
        ("rate_events",),
        ("refresh_families",),
        ("refresh_tokens",),
        ("schema_version",),
        ("users",),
    ]


async def test_migration_waits_for_the_advisory_lock(pg_url: str) -> None:
    """What makes concurrent starts safe: a replica holding the lock holds the others back."""
    holder = await asyncpg.connect(pg_url)
    store = PostgresStore(pg_url)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
        opening = asyncio.create_task(store.open())
        await asyncio.sleep(0.3)
        assert not opening.done()
        assert await query(pg_url, "SELECT to_regclass('schema_version') IS NULL") == [(True,)]
        await holder.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
        await asyncio.wait_for(opening, 5)
        assert await store.schema_version() == 1
    finally:
        await holder.close()
        await store.close()


async def test_reopen_is_idempotent_and_newer_schema_refused(pg_url: str) -> None:
    for _ in range(2):
        store = PostgresStore(pg_url)
        await store.open()
        await store.open()  # a second open of an open store is a no-op
        await store.close()
    assert await query(pg_url, "SELECT COUNT(*) FROM schema_version") == [(1,)]
    admin = await asyncpg.connect(pg_url)
    try:
        await admin.execute("INSERT INTO schema_version VALUES (999, 0)")
    finally:
        await admin.close()
    newer = PostgresStore(pg_url)
    with pytest.raises(StoreError, match="newer than this gateway") as info:
        await newer.open()
    assert not isinstance(info.value, StoreUnavailable)
    with pytest.raises(StoreUnavailable):
        await newer.ping()  # a failed open leaves the store closed


# --- replicas racing ---------------------------------------------------------------------


async def test_one_refresh_token_spent_by_two_replicas_once(
    two_stores: tuple[PostgresStore, PostgresStore],
) -> None:
    user = make_user(1)
    await two_stores[0].create_user(user)
    for round_ in range(5):
        await two_stores[round_ % 2].add_refresh(make_refresh(f"h{round_}", user, f"f{round_}"))
        results = await asyncio.gather(
            *(s.spend_refresh(f"h{round_}", 1010.0) for s in alternate(two_stores, 16))
        )
        assert results.count(True) == 1, results


async def test_a_read_then_write_spend_would_let_both_replicas_win(
    two_stores: tuple[PostgresStore, PostgresStore], migrated_url: str
) -> None:
    """Negative control: the race above is real. A check-then-set spend (what the conditional
    UPDATE avoids) lets both replicas win when their reads come before either write."""
    user = make_user(1)
    await two_stores[0].create_user(user)
    await two_stores[0].add_refresh(make_refresh("h1", user, "fam"))
    both_read = asyncio.Barrier(2)

    async def naive_spend() -> bool:
        conn = await asyncpg.connect(migrated_url)
        try:
            spent = await conn.fetchval(
                "SELECT spent_at FROM refresh_tokens WHERE token_hash = 'h1'"
            )
            await both_read.wait()
            if spent is not None:
                return False
            await conn.execute("UPDATE refresh_tokens SET spent_at = 1 WHERE token_hash = 'h1'")
            return True
        finally:
            await conn.close()

    assert list(await asyncio.gather(naive_spend(), naive_spend())) == [True, True]


async def test_refresh_race_between_replicas_follows_the_reuse_rule(
    replicas: Callable[..., Awaitable[tuple[Replica, Replica]]],
) -> None:
    # One frozen clock for both: the race is decided by the database alone (see the next
    # test for what differing clocks do).
    now = time.time()
    a, b = await replicas(clocks=(lambda: now, lambda: now))
    await a.service.register("alice@example.com", PASSWORD, None, client_ip=IP)
    for _ in range(3):
        pair = await b.service.login("alice@example.com", PASSWORD, client_ip=IP)
        results = await asyncio.gather(
            a.service.refresh(pair.refresh_token),
            b.service.refresh(pair.refresh_token),
            return_exceptions=True,
        )
        winners = [r for r in results if isinstance(r, TokenPair)]
        losers = [r for r in results if isinstance(r, InvalidToken)]
        assert (len(winners), len(losers)) == (1, 1), results
        assert losers[0].reason == "refresh_reuse"
        # The loser revoked the family: the winner's new token is dead on either replica.
        for replica in (a, b):
            with pytest.raises(InvalidToken):
                await replica.service.refresh(winners[0].refresh_token)


async def test_reuse_on_a_replica_whose_clock_is_behind_is_still_reuse(
    replicas: Callable[..., Awaitable[tuple[Replica, Replica]]],
) -> None:
    """Replicas' clocks differ by milliseconds (NTP), and so do the start times of two racing
    requests in one process: the one that started first but lost the spend must still be
    treated as reuse when there is no grace period."""
    now = time.time()
    behind, ahead = await replicas(clocks=(lambda: now, lambda: now + 0.001))
    await ahead.service.register("alice@example.com", PASSWORD, None, client_ip=IP)
    pair = await ahead.service.login("alice@example.com", PASSWORD, client_ip=IP)
    await ahead.service.refresh(pair.refresh_token)  # spent at now + 0.001
    with pytest.raises(InvalidToken) as info:
        await behind.service.refresh(pair.refresh_token)  # a stolen copy, presented later
    assert info.value.reason == "refresh_reuse"


async def test_one_email_registered_on_two_replicas_at_once(
    replicas: Callable[..., Awaitable[tuple[Replica, Replica]]],
) -> None:
    a, b = await replicas()
    for n in range(4):
        results = await asyncio.gather(
            a.service.register(f"race{n}@example.com", PASSWORD, None, client_ip=IP),
            b.service.register(f"RACE{n}@Example.com", PASSWORD, None, client_ip=IP),
            return_exceptions=True,
        )
        assert sorted(type(r).__name__ for r in results) == ["EmailTaken", "User"], results
    assert len(await a.service.list_users()) == 4


async def test_many_creates_of_one_email_over_two_pools(
    two_stores: tuple[PostgresStore, PostgresStore],
) -> None:
    results = await asyncio.gather(
        *(
            store.create_user(make_user(n, email_key="race@example.com"))
            for n, store in enumerate(alternate(two_stores, 20))
        ),
        return_exceptions=True,
    )
    assert sum(r is None for r in results) == 1
    assert all(isinstance(r, EmailTaken) for r in results if r is not None)


async def test_failed_logins_on_two_replicas_are_all_counted(
    replicas: Callable[..., Awaitable[tuple[Replica, Replica]]],
) -> None:
    a, b = await replicas()
    await a.service.register("alice@example.com", PASSWORD, None, client_ip="198.51.100.1")
    n = 24
    results = await asyncio.gather(
        *(
            (a, b)[i % 2].service.login("alice@example.com", f"guess {i}", client_ip=IP)
            for i in range(n)
        ),
        return_exceptions=True,
    )
    assert all(isinstance(r, InvalidCredentials) for r in results), results
    ip_key = "login:ip:" + hashlib.sha256(IP.encode()).hexdigest()
    account_key = "login:account:" + hashlib.sha256(b"alice@example.com").hexdigest()
    for key in (ip_key, account_key):
        count, _ = await b.store.count_events(key, 0.0)
        assert count == n


async def test_the_limit_holds_across_replicas(
    replicas: Callable[..., Awaitable[tuple[Replica, Replica]]],
) -> None:
    a, b = await replicas(login_rate_limit=Rate(3, 60.0))
    await a.service.register("alice@example.com", PASSWORD, None, client_ip="198.51.100.1")
    results = await asyncio.gather(
        *(
            (a, b)[i % 2].service.login("alice@example.com", f"guess {i}", client_ip=IP)
            for i in range(12)
        ),
        return_exceptions=True,
    )
    names = [type(r).__name__ for r in results]
    assert set(names) <= {"InvalidCredentials", "TooManyRequests"}, results
    assert names.count("InvalidCredentials") <= 3  # never more guesses than the limit


async def test_pool_usage_for_metrics(migrated_url: str) -> None:
    store = PostgresStore(migrated_url, max_size=4)
    assert store.pool_usage() == {"open": 0, "in_use": 0, "max": 4}
    await store.open()
    try:
        assert store.pool_usage() == {"open": 1, "in_use": 0, "max": 4}
        # Four statements at once, each held a moment: the pool grows to its maximum.
        await asyncio.gather(*(store._fetchval("SELECT pg_sleep(0.1)") for _ in range(4)))
        assert store.pool_usage() == {"open": 4, "in_use": 0, "max": 4}
        busy = asyncio.create_task(store._fetchval("SELECT pg_sleep(0.3)"))
        await asyncio.sleep(0.15)
        assert store.pool_usage()["in_use"] == 1
        await busy
    finally:
        await store.close()
    assert store.pool_usage()["open"] == 0


async def test_events_recorded_through_two_pools_are_all_counted(
    two_stores: tuple[PostgresStore, PostgresStore],
) -> None:
    ids = await asyncio.gather(*(s.record_event("k", 100.0) for s in alternate(two_stores, 40)))
    assert len(set(ids)) == 40
    assert await two_stores[0].count_events("k", 0.0) == (40, 100.0)


# --- failures: unreachable, slow, refused, stopped ------------------------------------------


def _unique(constraint: str) -> asyncpg.UniqueViolationError:
    error = asyncpg.UniqueViolationError("duplicate key value violates unique constraint")
    error.constraint_name = constraint
    return error


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (asyncpg.CannotConnectNowError("the database system is starting up"), StoreUnavailable),
        (asyncpg.TooManyConnectionsError("sorry, too many clients already"), StoreUnavailable),
        (asyncpg.AdminShutdownError("terminating connection"), StoreUnavailable),
        (asyncpg.ConnectionDoesNotExistError("closed in the middle"), StoreUnavailable),
        (asyncpg.SerializationError("could not serialize access"), StoreUnavailable),
        (asyncpg.DeadlockDetectedError("deadlock detected"), StoreUnavailable),
        (asyncpg.ReadOnlySQLTransactionError("read-only transaction"), StoreUnavailable),
        (asyncpg.DiskFullError("could not extend file"), StoreUnavailable),
        (asyncpg.InterfaceError("pool is closing"), StoreUnavailable),
        (ConnectionRefusedError(111, "Connection refused"), StoreUnavailable),
        (ConnectionResetError(104, "Connection reset by peer"), StoreUnavailable),
        (socket.gaierror(-2, "Name or service not known"), StoreUnavailable),
        (TimeoutError(), StoreUnavailable),
        (_unique("users_email_key_key"), EmailTaken),
        (_unique("users_pkey"), StoreError),
        (asyncpg.ForeignKeyViolationError("violates foreign key constraint"), StoreError),
        (asyncpg.InvalidPasswordError("password authentication failed"), StoreError),
        (asyncpg.InvalidCatalogNameError('database "x" does not exist'), StoreError),
        (asyncpg.UndefinedTableError('relation "users" does not exist'), StoreError),
        (asyncpg.ClientConfigurationError("`sslmode` parameter must be one of"), StoreError),
        (ValueError("invalid literal for int() with base 10: 'pw-part'"), StoreError),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else None,
)
async def test_driver_errors_are_translated(error: BaseException, expected: type) -> None:
    """503 for what passes (the client may retry), 409 for a taken email, and a plain
    StoreError (500, the operator's to fix) for everything else; no SQL, no URL pieces."""

    async def failing() -> None:
        raise error

    store = PostgresStore("postgresql://u:pw-part@db/gw")
    with pytest.raises(Exception) as info:
        await store._guard(failing())
    assert type(info.value) is expected
    assert info.value.__cause__ is error
    assert "pw-part" not in str(info.value)


def _silent_listener() -> socket.socket:
    """A port that completes TCP handshakes (the kernel's backlog) and never says a word: a
    database host behind a dead network path, as the client sees it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


async def test_a_silent_server_gives_unavailable_within_the_connect_timeout() -> None:
    with _silent_listener() as sock:
        port = sock.getsockname()[1]
        store = PostgresStore(f"postgresql://u:hunter2@127.0.0.1:{port}/db", connect_timeout=0.5)
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as info:
            await store.open()
        assert time.monotonic() - started < 2.0
    assert "hunter2" not in _everything_about(info.value)
    assert f"postgresql://u@127.0.0.1:{port}/db" in str(info.value)


async def test_a_slow_statement_gives_unavailable_not_a_hang(migrated_url: str) -> None:
    store = PostgresStore(migrated_url, command_timeout=0.5)
    await store.open()
    blocker = await asyncpg.connect(migrated_url)
    try:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.get_user("someone")
        assert time.monotonic() - started < 2.0
        await tx.rollback()
        assert await store.get_user("someone") is None  # the pool carries on
    finally:
        await blocker.close()
        await store.close()


@pytest.mark.parametrize(
    ("problem", "unavailable"),
    [
        ("too many connections", True),
        ("wrong password", False),
        ("no such database", False),
    ],
)
async def test_refusals_at_open(pg_server: PgServer, problem: str, unavailable: bool) -> None:
    """Too many connections is passing (503, try later); a wrong password or database name
    is the operator's to fix (StoreError, the gateway should not start). None shows the
    password."""
    role, secret = f"r_{secrets.token_hex(4)}", f"pw-{secrets.token_hex(8)}"
    database = pg_server.create_database()
    name = database.rsplit("/", 1)[-1]
    admin = await asyncpg.connect(pg_server.url())
    await admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{secret}' CONNECTION LIMIT 1")
    await admin.execute(f'GRANT ALL ON DATABASE "{name}" TO {role}')
    await admin.execute(f'ALTER DATABASE "{name}" OWNER TO {role}')
    url = f"postgresql://{role}:{secret}@127.0.0.1:{pg_server.port}/{name}"
    occupant = PostgresStore(url, max_size=1)
    try:
        if problem == "too many connections":
            await occupant.open()  # takes the role's only connection
        elif problem == "wrong password":
            url = url.replace(secret, secret + "x")
        else:
            url = url.rsplit("/", 1)[0] + "/missing"
        store = PostgresStore(url)
        with pytest.raises(StoreError) as info:
            await store.open()
        assert isinstance(info.value, StoreUnavailable) is unavailable
        assert secret not in _everything_about(info.value)
        assert info.value.args[0].startswith("cannot open the database postgresql://")
    finally:
        await occupant.close()
        pg_server.drop_database(database, wait=True)  # before its owner goes
        await admin.execute(f'DROP ROLE IF EXISTS "{role}"')
        await admin.close()


@pytest.fixture
def own_server() -> Iterator[PgServer]:
    """A server of this test's own, to stop and start under a live pool."""
    server = started_server()
    try:
        yield server
    finally:
        server.destroy()


OPERATIONS: list[tuple[str, Callable[[PostgresStore], Awaitable[object]]]] = [
    ("ping", lambda s: s.ping()),
    ("create_user", lambda s: s.create_user(make_user(7))),
    ("get_user", lambda s: s.get_user(make_user(1).id)),
    ("get_user_by_email", lambda s: s.get_user_by_email("user1@example.com")),
    ("list_users", lambda s: s.list_users()),
    ("update_user", lambda s: s.update_user(make_user(1).id, disabled=True)),
    ("add_refresh", lambda s: s.add_refresh(make_refresh("h2", make_user(1), "f2"))),
    ("get_refresh", lambda s: s.get_refresh("h1")),
    ("spend_refresh", lambda s: s.spend_refresh("h1", 1010.0)),
    ("revoke_family", lambda s: s.revoke_family("f1", 1010.0)),
    ("revoke_user_refresh", lambda s: s.revoke_user_refresh(make_user(1).id, 1010.0)),
    ("prune_refresh", lambda s: s.prune_refresh(0.0)),
    ("record_event", lambda s: s.record_event("k", 100.0)),
    ("discard_event", lambda s: s.discard_event("nothing")),
    ("count_events", lambda s: s.count_events("k", 0.0)),
    ("clear_events", lambda s: s.clear_events("other")),
    ("prune_events", lambda s: s.prune_events(0.0)),
]


async def test_database_stopped_then_back(own_server: PgServer) -> None:
    url = own_server.url()
    store = PostgresStore(url)
    await store.open()
    await store.create_user(make_user(1))
    await store.add_refresh(make_refresh("h1", make_user(1), "f1"))
    try:
        own_server.stop()  # pg_ctl stop -m fast: what an operator or a failover does
        for name, operation in OPERATIONS:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable) as info:
                await operation(store)
            assert time.monotonic() - started < FAST, name
            assert info.value.status == 503
            assert own_server.password not in _everything_about(info.value)
        # A replica starting while the database is down: refused quickly, and may retry.
        late = PostgresStore(url)
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await late.open()
        assert time.monotonic() - started < FAST

        own_server.start()  # same port: the database is back
        for _, operation in OPERATIONS:
            await operation(store)  # the same store object: no restart, no re-create
        assert (await store.get_user(make_user(1).id)) is not None
        await late.open()
        assert await late.schema_version() == 1
        await late.close()
    finally:
        await store.close()


async def test_service_answers_503_while_the_database_is_down(own_server: PgServer) -> None:
    replica = Replica(own_server.url(), ACCOUNTS)
    await replica.store.open()
    try:
        await replica.service.register("alice@example.com", PASSWORD, None, client_ip=IP)
        own_server.stop()
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: replica.service.login("alice@example.com", PASSWORD, client_ip=IP),
            lambda: replica.service.register("bob@example.com", PASSWORD, None, client_ip=IP),
            lambda: replica.service.refresh("x" * 43),
            replica.service.ping,
        ]
        for call in calls:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await call()
            assert time.monotonic() - started < FAST
        own_server.start()
        pair = await replica.service.login("alice@example.com", PASSWORD, client_ip=IP)
        assert isinstance(await replica.service.refresh(pair.refresh_token), TokenPair)
        user = await replica.service.register("bob@example.com", PASSWORD, None, client_ip=IP)
        assert isinstance(user, User)
    finally:
        await replica.store.close()
        replica.hasher.close()


def _everything_about(exc: BaseException) -> str:
    """The error as a log would show it: message, repr and the whole chain of causes."""
    return "".join(traceback.format_exception(exc)) + repr(exc)
