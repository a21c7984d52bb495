"""gateway.tokencache, and the cache as the request path uses it (gateway.app.identify)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.app import Gateway
from gateway.config import AccountSettings, DatabaseSettings, RouteSettings, Settings, TokenSettings
from gateway.errors import InvalidToken
from gateway.identity import Identity, authorize
from gateway.tokencache import VerifiedTokens


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def who(until: float | None, name: str = "u") -> Identity:
    return Identity(id=name, issuer="https://gw", valid_until=until)


def test_a_verified_token_is_answered_until_it_would_expire() -> None:
    clock = Clock()
    cache = VerifiedTokens(clock)
    cache.put("t", who(clock.now + 10))
    assert cache.get("t") == who(0)  # compares id and issuer
    clock.now += 9.999
    assert cache.get("t") is not None
    clock.now += 0.001
    assert cache.get("t") is None and len(cache) == 0  # gone, not just hidden


@pytest.mark.parametrize(
    ("token", "identity"),
    [("t", who(None)), ("x" * 4097, who(2_000_000.0))],
    ids=["not-from-a-token", "oversized-token"],
)
def test_what_is_never_kept(token: str, identity: Identity) -> None:
    cache = VerifiedTokens(Clock())
    cache.put(token, identity)
    assert cache.get(token) is None and len(cache) == 0


def test_the_oldest_entries_go_first_and_clear_empties() -> None:
    cache = VerifiedTokens(Clock(), max_entries=3)
    for n in range(5):
        cache.put(f"t{n}", who(2_000_000.0, f"u{n}"))
    assert len(cache) == 3
    assert [cache.get(f"t{n}") is not None for n in range(5)] == [False, False, True, True, True]
    cache.clear()
    assert len(cache) == 0


@pytest.fixture
def gateway(tmp_path: Path) -> tuple[Gateway, Clock]:
    clock = Clock(1_800_000_000.0)
    settings = Settings(
        routes=(RouteSettings(name="api", path="/api", upstreams=("http://127.0.0.1:9",)),),
        database=DatabaseSettings(url=f"sqlite:///{tmp_path}/gw.db"),
        tokens=TokenSettings(keys_dir=tmp_path / "keys", access_ttl=60, leeway=5),
        accounts=AccountSettings(bcrypt_rounds=4),
    )
    return Gateway(settings, clock=clock), clock


async def test_identify_caches_exactly_as_long_as_verification_would_pass(
    gateway: tuple[Gateway, Clock],
) -> None:
    gw, clock = gateway
    token, _ = gw.tokens.issue_access_token(user_id="u1", email=None, name=None, roles=())
    assert (await gw.identify(token)).id == "u1"
    assert len(gw.verified) == 1
    clock.now += 60 + 5 - 0.001  # exp + leeway, just before
    assert (await gw.identify(token)).id == "u1"
    clock.now += 0.001
    with pytest.raises(InvalidToken, match="expired"):
        await gw.identify(token)  # the cache let go at the moment verification refuses


async def test_refused_tokens_are_never_cached(gateway: tuple[Gateway, Clock]) -> None:
    gw, _ = gateway
    token, _ = gw.tokens.issue_access_token(user_id="u1", email=None, name=None, roles=())
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    for _ in range(2):
        with pytest.raises(InvalidToken):
            await gw.identify(forged)
    assert len(gw.verified) == 0


async def test_a_successful_key_fetch_empties_the_cache(gateway: tuple[Gateway, Clock]) -> None:
    gw, _ = gateway
    token, _ = gw.tokens.issue_access_token(user_id="u1", email=None, name=None, roles=())
    await gw.identify(token)
    gw._keys_fetched("okta", "unknown_kid", "error", 0.1, 1)
    assert len(gw.verified) == 1  # a failed fetch changes no key
    gw._keys_fetched("okta", "unknown_kid", "ok", 0.1, 2)
    assert len(gw.verified) == 0


def test_tokens_that_could_not_have_verified_are_never_kept_or_found() -> None:
    clock = Clock()
    cache = VerifiedTokens(clock)
    cache.put("t\udcff", who(clock.now + 10))  # a client's undecodable bytes, as text
    cache.put("é", who(clock.now + 10))
    assert len(cache) == 0
    assert cache.get("t\udcff") is None and cache.get("é") is None


def test_tokens_one_character_apart_are_different_entries() -> None:
    clock = Clock()
    cache = VerifiedTokens(clock)
    cache.put("a.b.c", who(clock.now + 10, "one"))
    cache.put("a.b.d", who(clock.now + 10, "two"))
    assert cache.get("a.b.c") == who(0, "one") and cache.get("a.b.d") == who(0, "two")
    assert cache.get("a.b.e") is None


@pytest.mark.parametrize("rules", [(), (("sub", "u1"),)])
async def test_a_cached_caller_keeps_its_claims_only_when_a_route_reads_them(
    tmp_path: Path, rules: tuple[tuple[str, object], ...]
) -> None:
    guarded = RouteSettings(
        name="api", path="/api", upstreams=("http://127.0.0.1:9",), claims=rules
    )
    settings = Settings(
        routes=(guarded,),
        database=DatabaseSettings(url=f"sqlite:///{tmp_path}/gw.db"),
        tokens=TokenSettings(keys_dir=tmp_path / "keys", access_ttl=60),
        accounts=AccountSettings(bcrypt_rounds=4),
    )
    gw = Gateway(settings)
    token, _ = gw.tokens.issue_access_token(user_id="u1", email=None, name=None, roles=())
    await gw.identify(token)
    cached = await gw.identify(token)  # from the cache
    assert dict(cached.claims).get("sub") == ("u1" if rules else None)
    if rules:
        authorize(guarded, cached)  # the route's rule reads the cached caller's claims
