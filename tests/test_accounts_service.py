"""The account service with real parts: bcrypt (4 rounds), HS256 tokens, and each store
backend on a real database (a SQLite file; a PostgreSQL server, see tests/pg.py).

Time is a fake clock shared by the service and the token service; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from gateway.accounts.models import TokenPair, User
from gateway.accounts.service import AccountService
from gateway.accounts.sqlite import SqliteStore
from gateway.accounts.store import StoreUnavailable, open_store
from gateway.config import AccountSettings, Rate, Secret, TokenSettings
from gateway.errors import (
    EmailTaken,
    InvalidCredentials,
    InvalidInput,
    InvalidToken,
    NotFound,
    RegistrationClosed,
    TooManyRequests,
)
from gateway.passwords import PasswordHasher
from gateway.tokens import KeyRing, TokenService
from tests.pg import PgServer, query

pytest_plugins = ["tests.pg"]

T0 = 1_800_000_000.0
IP = "192.0.2.10"
PASSWORD = "correct horse battery"

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
    login_rate_limit=Rate(3, 60.0),
    register_rate_limit=Rate(50, 60.0),
)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class CountingHasher(PasswordHasher):
    """The real hasher, counting bcrypt checks; ``during_verify`` runs inside a check."""

    def __init__(self, rounds: int) -> None:
        super().__init__(rounds)
        self.verifies = 0
        self.during_verify: Callable[[], Awaitable[None]] | None = None

    async def verify(self, password: str, hashed: str | None) -> bool:
        self.verifies += 1
        result = await super().verify(password, hashed)
        if self.during_verify is not None:
            await self.during_verify()
        return result


class Env:
    def __init__(self, url: str, accounts: AccountSettings, tokens: TokenSettings) -> None:
        self.url = url
        self.clock = Clock()
        self.store = open_store(url)
        self.hasher = CountingHasher(4)
        self.tokens = TokenService(tokens, KeyRing.load(tokens), clock=self.clock)
        self.service = AccountService(
            self.store, self.hasher, self.tokens, accounts, tokens, clock=self.clock
        )

    async def user(self, email: str = "alice@example.com", password: str = PASSWORD) -> User:
        return await self.service.register(email, password, "Alice", client_ip="198.51.100.1")

    async def login(
        self, email: str = "alice@example.com", password: str = PASSWORD, ip: str = IP
    ) -> TokenPair:
        return await self.service.login(email, password, client_ip=ip)


async def make_env(
    url: str, accounts: AccountSettings = ACCOUNTS, tokens: TokenSettings = TOKENS
) -> Env:
    env = Env(url, accounts, tokens)
    await env.store.open()
    return env


@pytest.fixture
async def make(
    db_url: str, db_backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[Env]]]:
    """Environments of the parametrized backend; the first on ``db_url``, any further one
    on a database of its own."""
    envs: list[Env] = []
    extra: list[str] = []

    async def fresh_url() -> str:
        if not envs:
            return db_url
        if db_backend == "sqlite":
            return f"sqlite:///{tmp_path / str(len(envs)) / 'gw.db'}"
        server: PgServer = request.getfixturevalue("pg_server")
        extra.append(server.create_database(migrated=True))
        return extra[-1]

    async def factory(**changes: object) -> Env:
        accounts = dataclasses.replace(
            ACCOUNTS, **{k: v for k, v in changes.items() if k in _fields(AccountSettings)}
        )
        tokens = dataclasses.replace(
            TOKENS, **{k: v for k, v in changes.items() if k in _fields(TokenSettings)}
        )
        env = await make_env(await fresh_url(), accounts, tokens)
        envs.append(env)
        return env

    yield factory
    for env in envs:
        await env.store.close()
        env.hasher.close()
    for url in extra:
        request.getfixturevalue("pg_server").drop_database(url)


@pytest.fixture
async def env(make: Callable[..., Awaitable[Env]]) -> Env:
    return await make()


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


# --- register, login, profile ---------------------------------------------------------------


async def test_ping_follows_the_store(env: Env) -> None:
    await env.service.ping()
    await env.store.close()
    with pytest.raises(StoreUnavailable) as info:
        await env.service.ping()
    assert info.value.status == 503


async def test_register_login_profile(env: Env) -> None:
    user = await env.service.register(
        " Alice@Example.com ", PASSWORD, "  Alice Liddell ", client_ip=IP
    )
    assert (user.email, user.email_key, user.name, user.roles) == (
        "Alice@Example.com",
        "alice@example.com",
        "Alice Liddell",
        ("user",),
    )
    assert user.created_at == T0
    assert user.password_hash and user.password_hash.startswith("$2b$04$")

    pair = await env.login("alice@example.com")
    identity = env.tokens.verify(pair.access_token)
    assert (identity.id, identity.email, identity.name, identity.roles) == (
        user.id,
        "Alice@Example.com",
        "Alice Liddell",
        ("user",),
    )
    assert pair.expires_in == 900
    assert len(pair.refresh_token) >= 43
    assert await env.service.profile(user.id) == user
    assert pair.access_token not in repr(pair) and pair.refresh_token not in repr(pair)


async def test_refresh_token_is_stored_only_as_a_hash(env: Env) -> None:
    await env.user()
    pair = await env.login()
    if isinstance(env.store, SqliteStore):
        with open(env.store.path, "rb") as db:
            raw = db.read()
        wal = Path(env.store.path + "-wal")
        raw += wal.read_bytes() if wal.exists() else b""
        assert pair.refresh_token.encode() not in raw
        return
    # PostgreSQL: every stored value of the refresh tables, as text.
    rows = await query(env.url, "SELECT t::text FROM refresh_tokens t")
    rows += await query(env.url, "SELECT f::text FROM refresh_families f")
    stored = " ".join(str(row[0]) for row in rows)
    assert pair.refresh_token not in stored
    assert hashlib.sha256(pair.refresh_token.encode()).hexdigest() in stored  # the control


@pytest.mark.parametrize(
    "variant",
    [
        "alice@example.com",
        "ALICE@EXAMPLE.COM",
        "  Alice@Example.Com\t",
        "\uff41lice@example.com",  # fullwidth "a": NFKC makes it "a"
        "\uff21\uff2c\uff29\uff23\uff25@example.com",  # fullwidth "ALICE"
    ],
)
async def test_duplicate_email_variants_are_taken(env: Env, variant: str) -> None:
    await env.service.register("Alice@Example.com", PASSWORD, None, client_ip=IP)
    with pytest.raises(EmailTaken):
        await env.service.register(variant, PASSWORD, None, client_ip=IP)
    assert len(await env.service.list_users()) == 1
    await env.login(variant)  # and every variant logs in to the one account


async def test_concurrent_registrations_make_one_account(env: Env) -> None:
    results = await asyncio.gather(
        *(
            env.service.register(variant, PASSWORD, None, client_ip=IP)
            for variant in (
                "alice@example.com",
                "ALICE@example.com",
                "Alice@EXAMPLE.com",
                "\uff41lice@example.com",
                " alice@example.com ",
            )
        ),
        return_exceptions=True,
    )
    assert sum(isinstance(r, User) for r in results) == 1
    assert sum(isinstance(r, EmailTaken) for r in results) == 4


@pytest.mark.parametrize(
    ("email", "password", "name", "detail"),
    [
        (None, PASSWORD, None, "email must be a string"),
        (42, PASSWORD, None, "email must be a string"),
        ("not-an-email", PASSWORD, None, "email"),
        ("a b@example.com", PASSWORD, None, "email"),
        ("alice\ud800@example.com", PASSWORD, None, "email"),
        ("alice@example.com", None, None, "password must be a string"),
        ("alice@example.com", "short", None, "at least 8"),
        ("alice@example.com", "é" * 37, None, "72 bytes"),  # 37 characters, 74 bytes
        ("alice@example.com", "a" * 73, None, "72 bytes"),
        ("alice@example.com", PASSWORD + "\ud800", None, "Unicode"),
        ("alice@example.com", PASSWORD, 7, "name must be a string"),
        ("alice@example.com", PASSWORD, ["x"], "name must be a string"),
        ("alice@example.com", PASSWORD, "x" * 201, "at most 200"),
        ("alice@example.com", PASSWORD, "Al\x00ice", "control"),
        ("alice@example.com", PASSWORD, "Alice\nX-User-Id: admin", "control"),
        ("alice@example.com", PASSWORD, "evil\u202egnp.exe", "control"),  # bidi override
        ("alice@example.com", PASSWORD, "Al\ud800ice", "Unicode"),
    ],
)
async def test_register_refuses_bad_input(
    env: Env, email: object, password: object, name: object, detail: str
) -> None:
    with pytest.raises(InvalidInput) as info:
        await env.service.register(email, password, name, client_ip=IP)
    assert detail in info.value.detail
    assert await env.service.list_users() == []  # nothing partially written


@pytest.mark.parametrize(
    ("name", "stored"),
    [
        (None, None),
        ("", None),
        ("   ", None),
        ("x" * 200, "x" * 200),
        ("Zoë 👩\u200d💻", "Zoë 👩\u200d💻"),  # a zero-width joiner in an emoji
    ],
)
async def test_register_names(env: Env, name: object, stored: str | None) -> None:
    user = await env.service.register("alice@example.com", PASSWORD, name, client_ip=IP)
    assert user.name == stored


async def test_registration_closed(make: Callable[..., Awaitable[Env]]) -> None:
    env = await make(registration="closed")
    with pytest.raises(RegistrationClosed):
        await env.service.register("alice@example.com", PASSWORD, None, client_ip=IP)
    assert await env.service.list_users() == []
    # Administrators can still add accounts.
    await env.service.add_user("alice@example.com", PASSWORD, name=None, roles=None)


async def test_register_rate_limit_per_ip(make: Callable[..., Awaitable[Env]]) -> None:
    env = await make(register_rate_limit=Rate(2, 60.0))
    await env.service.register("a@example.com", PASSWORD, None, client_ip=IP)
    env.clock.advance(10)
    with pytest.raises(InvalidInput):  # refused attempts count too
        await env.service.register("b@example.com", "short", None, client_ip=IP)
    env.clock.advance(10)
    with pytest.raises(TooManyRequests) as info:
        await env.service.register("c@example.com", PASSWORD, None, client_ip=IP)
    assert info.value.retry_after == 40
    await env.service.register("d@example.com", PASSWORD, None, client_ip="192.0.2.99")
    env.clock.advance(40)
    await env.service.register("c@example.com", PASSWORD, None, client_ip=IP)


# --- one answer for every failed login --------------------------------------------------------


@pytest.mark.parametrize(
    ("email", "password"),
    [
        ("nobody@example.com", PASSWORD),  # unknown
        ("alice@example.com", "wrong password"),  # wrong
        ("bob@example.com", PASSWORD),  # disabled
        ("not an email", PASSWORD),  # cannot be an account
        ("alice@example.com", "a" * 100),  # longer than bcrypt can check
        ("alice@example.com", "nul\x00password"),
        ("alice@example.com", ""),
    ],
)
async def test_failed_logins_get_one_answer_after_one_check(
    env: Env, email: str, password: str
) -> None:
    await env.user("alice@example.com")
    await env.user("bob@example.com")
    await env.service.set_disabled("bob@example.com", True)
    before = env.hasher.verifies
    with pytest.raises(InvalidCredentials) as info:
        await env.login(email, password)
    assert env.hasher.verifies == before + 1
    assert (info.value.status, info.value.code, info.value.detail) == (
        401,
        "invalid_credentials",
        "The email or password is incorrect.",
    )


@pytest.mark.parametrize(("email", "password"), [(None, PASSWORD), ("a@example.com", 12345678)])
async def test_login_refuses_non_strings(env: Env, email: object, password: object) -> None:
    with pytest.raises(InvalidInput):
        await env.service.login(email, password, client_ip=IP)


# --- failed-login limits -----------------------------------------------------------------------


async def test_per_ip_lockout_and_recovery(env: Env) -> None:
    await env.user()
    for email in ("x@example.com", "y@example.com", "alice@example.com"):
        with pytest.raises(InvalidCredentials):
            await env.login(email, "wrong password")
        env.clock.advance(10)
    checks = env.hasher.verifies
    with pytest.raises(TooManyRequests) as info:
        await env.login()  # even the right password: refused before it is checked
    assert info.value.retry_after == 30  # the first failure leaves the window at T0 + 60
    assert env.hasher.verifies == checks
    await env.login(ip="192.0.2.11")  # another address is not locked
    env.clock.advance(30)
    await env.login()


async def test_per_account_lockout_across_ips(env: Env) -> None:
    await env.user()
    for i in range(3):
        with pytest.raises(InvalidCredentials):
            await env.login(password="wrong password", ip=f"192.0.2.{20 + i}")
    with pytest.raises(TooManyRequests) as info:
        await env.login(ip="192.0.2.99")
    assert info.value.retry_after == 60
    env.clock.advance(60)
    await env.login(ip="192.0.2.99")


async def test_unknown_accounts_lock_like_known_ones(env: Env) -> None:
    for i in range(3):
        with pytest.raises(InvalidCredentials):
            await env.login("ghost@example.com", "guess", ip=f"192.0.2.{30 + i}")
    with pytest.raises(TooManyRequests):
        await env.login("GHOST@example.com", "guess", ip="192.0.2.99")


async def test_lockout_is_not_extended_by_hammering(env: Env) -> None:
    await env.user()
    for _ in range(3):
        with pytest.raises(InvalidCredentials):
            await env.login(password="wrong password")
    for _ in range(10):
        env.clock.advance(5)
        with pytest.raises(TooManyRequests):
            await env.login()
    env.clock.advance(10)  # 60 s after the failures
    await env.login()


async def test_success_resets_neither_counter(env: Env) -> None:
    await env.user()
    for _ in range(2):
        with pytest.raises(InvalidCredentials):
            await env.login(password="wrong password")
    await env.login()  # its own attempt is withdrawn, the two failures stay
    await env.login()
    with pytest.raises(InvalidCredentials):
        await env.login(password="wrong password")
    with pytest.raises(TooManyRequests):
        await env.login()
    with pytest.raises(TooManyRequests):  # the account too, from anywhere
        await env.login(ip="203.0.113.5")


async def test_ipv6_clients_are_counted_per_64(env: Env) -> None:
    for i in range(3):
        with pytest.raises(InvalidCredentials):
            await env.login(f"u{i}@example.com", "wrong password", ip=f"2001:db8:1:2::{i + 1}")
    with pytest.raises(TooManyRequests):
        await env.login("other@example.com", "x", ip="2001:db8:1:2:ffff::9")
    with pytest.raises(InvalidCredentials):
        await env.login("other@example.com", "x", ip="2001:db8:1:3::1")


async def test_concurrent_guesses_cannot_overrun_the_limit(env: Env) -> None:
    await env.user()
    results = await asyncio.gather(
        *(env.login(password=f"guess {i}") for i in range(12)), return_exceptions=True
    )
    assert all(isinstance(r, InvalidCredentials | TooManyRequests) for r in results)
    assert env.hasher.verifies <= 3


# --- refresh rotation ------------------------------------------------------------------------


async def test_refresh_rotates(env: Env) -> None:
    user = await env.user()
    first = await env.login()
    env.clock.advance(60)
    second = await env.service.refresh(first.refresh_token)
    assert second.refresh_token != first.refresh_token
    assert env.tokens.verify(second.access_token).id == user.id
    third = await env.service.refresh(second.refresh_token)
    assert third.refresh_token not in (first.refresh_token, second.refresh_token)


async def test_reuse_revokes_the_family(env: Env) -> None:
    await env.user()
    first = await env.login()
    other_session = await env.login()
    second = await env.service.refresh(first.refresh_token)
    env.clock.advance(1)
    with pytest.raises(InvalidToken) as info:
        await env.service.refresh(first.refresh_token)  # stolen copy presented
    assert info.value.reason == "refresh_reuse"
    with pytest.raises(InvalidToken) as info:
        await env.service.refresh(second.refresh_token)  # the legitimate new one dies too
    assert info.value.reason == "invalid_refresh"
    await env.service.refresh(other_session.refresh_token)  # other sessions live on


async def test_concurrent_refresh_of_one_token_without_grace(env: Env) -> None:
    await env.user()
    pair = await env.login()
    results = await asyncio.gather(
        *(env.service.refresh(pair.refresh_token) for _ in range(5)), return_exceptions=True
    )
    assert sum(isinstance(r, TokenPair) for r in results) == 1
    assert sum(isinstance(r, InvalidToken) for r in results) == 4
    winner = next(r for r in results if isinstance(r, TokenPair))
    with pytest.raises(InvalidToken):  # the race looked like reuse: the family is gone
        await env.service.refresh(winner.refresh_token)


async def test_grace_window(make: Callable[..., Awaitable[Env]]) -> None:
    env = await make(refresh_reuse_grace=10.0)
    await env.user()
    first = await env.login()
    second = await env.service.refresh(first.refresh_token)
    env.clock.advance(9)
    parallel = await env.service.refresh(first.refresh_token)  # another tab, just late
    assert parallel.refresh_token != second.refresh_token
    await env.service.refresh(second.refresh_token)  # nothing was revoked
    env.clock.advance(1)
    with pytest.raises(InvalidToken) as info:
        await env.service.refresh(first.refresh_token)
    assert info.value.reason == "refresh_reuse"
    with pytest.raises(InvalidToken):
        await env.service.refresh(parallel.refresh_token)


async def test_session_lifetime_is_absolute(env: Env) -> None:
    await env.user()
    pair = await env.login()
    env.clock.advance(3000)
    pair = await env.service.refresh(pair.refresh_token)
    env.clock.advance(599)
    pair = await env.service.refresh(pair.refresh_token)
    env.clock.advance(1)  # 3600 s after login, whatever the rotations
    with pytest.raises(InvalidToken) as info:
        await env.service.refresh(pair.refresh_token)
    assert info.value.reason == "invalid_refresh"


@pytest.mark.parametrize("token", ["", "garbage", "x" * 10_000, "\u00e9" * 43])
async def test_unknown_refresh_tokens(env: Env, token: str) -> None:
    with pytest.raises(InvalidToken) as info:
        await env.service.refresh(token)
    assert info.value.reason == "invalid_refresh"
    assert info.value.detail == "The refresh token is invalid or expired."


@pytest.mark.parametrize("token", [None, 5, ["x"], {"refresh_token": "x"}, "x\ud800"])
async def test_refresh_refuses_non_strings(env: Env, token: object) -> None:
    with pytest.raises(InvalidInput):
        await env.service.refresh(token)


async def test_refresh_of_a_user_disabled_behind_the_services_back(env: Env) -> None:
    user = await env.user()
    pair = await env.login()
    await env.store.update_user(user.id, disabled=True)  # e.g. by another tool, no revocation
    with pytest.raises(InvalidToken):
        await env.service.refresh(pair.refresh_token)


async def test_refreshed_token_carries_current_roles(env: Env) -> None:
    await env.user()
    pair = await env.login()
    await env.service.set_roles("alice@example.com", ("user", "ops"))
    pair = await env.service.refresh(pair.refresh_token)
    assert env.tokens.verify(pair.access_token).roles == ("user", "ops")


# --- logout ------------------------------------------------------------------------------------


async def test_logout_ends_only_that_session(env: Env) -> None:
    await env.user()
    laptop, phone = await env.login(), await env.login()
    laptop = await env.service.refresh(laptop.refresh_token)
    await env.service.logout(laptop.refresh_token)
    with pytest.raises(InvalidToken):
        await env.service.refresh(laptop.refresh_token)
    await env.service.refresh(phone.refresh_token)


async def test_logout_with_a_spent_token_ends_its_family(env: Env) -> None:
    await env.user()
    first = await env.login()
    second = await env.service.refresh(first.refresh_token)
    await env.service.logout(first.refresh_token)
    with pytest.raises(InvalidToken):
        await env.service.refresh(second.refresh_token)


@pytest.mark.parametrize("token", ["", "unknown", "x" * 10_000])
async def test_logout_unknown_is_fine(env: Env, token: str) -> None:
    await env.service.logout(token)


async def test_logout_twice_is_fine(env: Env) -> None:
    await env.user()
    pair = await env.login()
    await env.service.logout(pair.refresh_token)
    await env.service.logout(pair.refresh_token)


@pytest.mark.parametrize("token", [None, 1, True])
async def test_logout_refuses_non_strings(env: Env, token: object) -> None:
    with pytest.raises(InvalidInput):
        await env.service.logout(token)


async def test_logout_all(env: Env) -> None:
    user = await env.user()
    bob = await env.user("bob@example.com")
    sessions = [await env.login(), await env.login()]
    bobs = await env.login("bob@example.com")
    await env.service.logout_all(user.id)
    for pair in sessions:
        with pytest.raises(InvalidToken):
            await env.service.refresh(pair.refresh_token)
    await env.service.refresh(bobs.refresh_token)
    await env.login()  # a new login after it works
    assert bob.id != user.id


# --- profile and password --------------------------------------------------------------------


async def test_profile_of_unknown_or_disabled_user(env: Env) -> None:
    user = await env.user()
    with pytest.raises(InvalidToken) as info:
        await env.service.profile("00000000-0000-4000-8000-000000000000")
    assert info.value.reason == "unknown_user"
    await env.service.set_disabled("alice@example.com", True)
    with pytest.raises(InvalidToken):
        await env.service.profile(user.id)


async def test_change_password_revokes_every_session(env: Env) -> None:
    user = await env.user()
    sessions = [await env.login(), await env.login()]
    await env.service.change_password(user.id, PASSWORD, "a brand new secret")
    for pair in sessions:
        with pytest.raises(InvalidToken):
            await env.service.refresh(pair.refresh_token)
    with pytest.raises(InvalidCredentials):
        await env.login(password=PASSWORD)
    await env.login(password="a brand new secret")


@pytest.mark.parametrize(
    ("current", "new", "detail"),
    [
        ("wrong password", "a brand new secret", "current password is incorrect"),
        (None, "a brand new secret", "current_password must be a string"),
        (PASSWORD, "short", "at least 8"),
        (PASSWORD, "a" * 73, "72 bytes"),
        (PASSWORD, None, "must be a string"),
    ],
)
async def test_change_password_refusals_change_nothing(
    env: Env, current: object, new: object, detail: str
) -> None:
    user = await env.user()
    pair = await env.login()
    with pytest.raises(InvalidInput) as info:
        await env.service.change_password(user.id, current, new)
    assert detail in info.value.detail
    await env.service.refresh(pair.refresh_token)
    await env.login()


async def test_wrong_current_passwords_count_against_the_account(env: Env) -> None:
    user = await env.user()
    for _ in range(3):
        with pytest.raises(InvalidInput):
            await env.service.change_password(user.id, "guess", "a brand new secret")
    with pytest.raises(TooManyRequests):
        await env.service.change_password(user.id, PASSWORD, "a brand new secret")
    with pytest.raises(TooManyRequests):
        await env.login(ip="203.0.113.7")
    env.clock.advance(60)
    await env.service.change_password(user.id, PASSWORD, "a brand new secret")


async def test_change_password_of_disabled_user(env: Env) -> None:
    user = await env.user()
    await env.service.set_disabled("alice@example.com", True)
    with pytest.raises(InvalidToken):
        await env.service.change_password(user.id, PASSWORD, "a brand new secret")


async def test_login_racing_a_password_change_is_revoked(env: Env) -> None:
    user = await env.user()

    async def change_meanwhile() -> None:
        env.hasher.during_verify = None
        await env.service.change_password(user.id, PASSWORD, "a brand new secret")

    env.hasher.during_verify = change_meanwhile  # lands between the check and the session
    with pytest.raises(InvalidCredentials):
        await env.login()
    await env.login(password="a brand new secret")


async def test_login_racing_a_disable_is_revoked(env: Env) -> None:
    await env.user()

    async def disable_meanwhile() -> None:
        env.hasher.during_verify = None
        await env.service.set_disabled("alice@example.com", True)

    env.hasher.during_verify = disable_meanwhile
    with pytest.raises(InvalidCredentials):
        await env.login()


# --- administration ----------------------------------------------------------------------------


async def test_disable_revokes_and_enable_restores_login(env: Env) -> None:
    user = await env.user()
    pair = await env.login()
    disabled = await env.service.set_disabled("ALICE@example.com", True)
    assert disabled.disabled and disabled.id == user.id
    with pytest.raises(InvalidToken):
        await env.service.refresh(pair.refresh_token)
    with pytest.raises(InvalidCredentials):
        await env.login()
    enabled = await env.service.set_disabled("alice@example.com", False)
    assert not enabled.disabled
    with pytest.raises(InvalidToken):  # enabling does not bring old sessions back
        await env.service.refresh(pair.refresh_token)
    await env.login(ip="203.0.113.9")


async def test_add_user_list_and_roles(env: Env) -> None:
    admin = await env.service.add_user(
        "root@example.com", PASSWORD, name="Root", roles=("admin", "user", "admin")
    )
    env.clock.advance(1)
    plain = await env.service.add_user("plain@example.com", PASSWORD, name=None, roles=None)
    assert admin.roles == ("admin", "user") and plain.roles == ("user",)
    assert [u.email for u in await env.service.list_users()] == [
        "root@example.com",
        "plain@example.com",
    ]
    updated = await env.service.set_roles("Plain@Example.com", ("ops",))
    assert updated.roles == ("ops",)
    assert (await env.service.set_roles("plain@example.com", ())).roles == ()
    with pytest.raises(EmailTaken):
        await env.service.add_user("ROOT@example.com", PASSWORD, name=None, roles=None)


@pytest.mark.parametrize(
    "roles",
    [("",), ("a,b",), ("a b",), ("tab\t",), ("nl\n",), ("zw\u200b",), ("x" * 101,), (3,)],
)
async def test_bad_role_names(env: Env, roles: tuple[str, ...]) -> None:
    await env.user()
    with pytest.raises(InvalidInput):
        await env.service.set_roles("alice@example.com", roles)
    with pytest.raises(InvalidInput):
        await env.service.add_user("new@example.com", PASSWORD, name=None, roles=roles)
    assert (await env.service.list_users())[0].roles == ("user",)


@pytest.mark.parametrize("op", ["disable", "enable", "roles"])
async def test_admin_ops_on_unknown_email(env: Env, op: str) -> None:
    with pytest.raises(NotFound):
        if op == "roles":
            await env.service.set_roles("nobody@example.com", ("user",))
        else:
            await env.service.set_disabled("nobody@example.com", op == "disable")


async def test_add_user_enforces_password_policy(env: Env) -> None:
    with pytest.raises(InvalidInput):
        await env.service.add_user("a@example.com", "é" * 37, name=None, roles=None)
    assert await env.service.list_users() == []


async def test_prune_forgets_old_events_and_expired_tokens(env: Env) -> None:
    await env.user()
    await env.login()  # its family expires at T0 + 3600
    for _ in range(3):
        with pytest.raises(InvalidCredentials):
            await env.login(password="wrong password")
    env.clock.advance(3600)
    pair = await env.login()  # still valid after pruning
    env.clock.advance(1)
    await env.service.prune()
    [(events,)] = await query(env.url, "SELECT COUNT(*) FROM rate_events")
    [(tokens,)] = await query(env.url, "SELECT COUNT(*) FROM refresh_tokens")
    # Every event is older than any window; of the two sessions only the live one remains.
    assert (events, tokens) == (0, 1)
    await env.service.refresh(pair.refresh_token)
