"""Password policy and bcrypt hashing: limits in bytes, constant work, never on the loop."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator

import bcrypt
import pytest

from gateway.errors import InvalidInput, Overloaded
from gateway.passwords import BCRYPT_NICENESS, PasswordHasher, check_policy


@pytest.fixture
async def hasher() -> AsyncIterator[PasswordHasher]:
    h = PasswordHasher(4)
    yield h
    h.close()


@pytest.mark.parametrize(
    ("password", "min_length", "detail"),
    [
        (None, 8, "must be a string"),
        (12345678, 8, "must be a string"),
        (b"bytes-password", 8, "must be a string"),
        (["a" * 10], 8, "must be a string"),
        ("short", 8, "at least 8 characters"),
        ("", 1, "at least 1 characters"),
        ("a" * 73, 8, "at most 72 bytes in UTF-8"),
        ("é" * 37, 8, "at most 72 bytes in UTF-8"),  # 37 characters, 74 bytes
        ("😀" * 19, 8, "at most 72 bytes in UTF-8"),  # 19 characters, 76 bytes
        ("abc\x00defgh", 8, "NUL"),
        ("abcdefgh\ud800", 8, "valid Unicode"),  # a lone surrogate, as JSON can carry
    ],
)
def test_policy_refuses(password: object, min_length: int, detail: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        check_policy(password, min_length)
    assert detail in caught.value.detail


@pytest.mark.parametrize(
    ("password", "min_length"),
    [
        ("abcdefgh", 8),
        ("a" * 72, 8),
        ("é" * 36, 8),  # exactly 72 bytes
        ("😀" * 18, 8),  # exactly 72 bytes
        ("пароль12", 8),  # counted in characters for the minimum
        ("😀😀😀😀", 4),
    ],
)
def test_policy_accepts(password: str, min_length: int) -> None:
    assert check_policy(password, min_length) == password


def test_policy_detail_never_echoes_the_password() -> None:
    with pytest.raises(InvalidInput) as caught:
        check_policy("sekrit", 8)
    assert "sekrit" not in caught.value.detail


async def test_hash_and_verify(hasher: PasswordHasher) -> None:
    hashed = await hasher.hash("correct horse")
    assert hashed.startswith("$2b$04$")
    assert await hasher.verify("correct horse", hashed) is True
    assert await hasher.verify("correct horsf", hashed) is False
    assert await hasher.verify("", hashed) is False


async def test_hash_uses_the_configured_cost() -> None:
    h = PasswordHasher(5)
    try:
        assert (await h.hash("password")).startswith("$2b$05$")
    finally:
        h.close()


async def test_each_hash_is_salted(hasher: PasswordHasher) -> None:
    assert await hasher.hash("same password") != await hasher.hash("same password")


async def test_72_byte_password_is_fully_significant(hasher: PasswordHasher) -> None:
    password = "x" * 71 + "a"
    hashed = await hasher.hash(password)
    assert await hasher.verify(password, hashed) is True
    assert await hasher.verify("x" * 71 + "b", hashed) is False


async def test_multibyte_password_round_trip(hasher: PasswordHasher) -> None:
    password = "é" * 36
    hashed = await hasher.hash(password)
    assert await hasher.verify(password, hashed) is True
    assert await hasher.verify("e" * 36, hashed) is False


@pytest.mark.parametrize("password", ["a" * 73, "é" * 37, "a\x00b", "ab\udc80"])
async def test_hash_refuses_what_bcrypt_would_truncate(
    hasher: PasswordHasher, password: str
) -> None:
    with pytest.raises(InvalidInput):
        await hasher.hash(password)


async def test_overlong_candidate_never_matches_its_prefix(hasher: PasswordHasher) -> None:
    hashed = await hasher.hash("y" * 72)
    # A truncating bcrypt would accept this; we answer False and raise nothing.
    assert await hasher.verify("y" * 72 + "extra", hashed) is False


async def test_unknown_user_spends_a_check_and_fails(hasher: PasswordHasher) -> None:
    assert await hasher.verify("anything at all", None) is False
    # The dummy hash's own password does not open the door either.
    assert await hasher.verify("gateway-timing-equaliser", None) is False


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "not a hash",
        "$2b$04$short",
        "$2b$99$abcdefghijklmnopqrstuu5Zb6m1QmX1lQfHn9E8c6vX1N7u8bJXm",
        "$2b$04$" + "ÿ" * 53,  # right length, not ASCII
        "pbkdf2_sha256$600000$salt$hash",
    ],
)
async def test_malformed_stored_hash_is_false(hasher: PasswordHasher, stored: str) -> None:
    assert await hasher.verify("password", stored) is False


async def test_unknown_user_costs_about_what_a_wrong_password_costs() -> None:
    h = PasswordHasher(8)  # costly enough that bcrypt dominates the timing
    try:
        hashed = await h.hash("the password")
        await h.verify("warm", None)  # the dummy hash is made once; not part of the timing

        # Interleaved rounds and the best of each kind: other test workers load the machine
        # in bursts, and a burst must not land on one kind only.
        best = {"known": float("inf"), "unknown": float("inf"), "broken": float("inf")}
        for _ in range(7):
            for kind, stored in (("known", hashed), ("unknown", None), ("broken", "garbage")):
                start = time.perf_counter()
                assert await h.verify("wrong password", stored) is False
                best[kind] = min(best[kind], time.perf_counter() - start)
        known, unknown, broken = best["known"], best["unknown"], best["broken"]
        # Without the dummy check, "unknown" and "broken" would be ~1000x faster.
        assert unknown > known / 3
        assert broken > known / 3
    finally:
        h.close()


async def test_verify_runs_off_the_event_loop(hasher: PasswordHasher) -> None:
    loop_thread = threading.get_ident()
    seen: list[int] = []
    original = bcrypt.checkpw

    def spy(password: bytes, hashed: bytes) -> bool:
        seen.append(threading.get_ident())
        return original(password, hashed)

    hashed = await hasher.hash("password")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bcrypt, "checkpw", spy)
        assert await hasher.verify("password", hashed) is True
        assert await hasher.verify("password", None) is False
    assert seen
    assert loop_thread not in seen


async def test_loop_stays_responsive_while_verifying() -> None:
    h = PasswordHasher(10, max_workers=2)
    try:
        hashed = await h.hash("password")
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        start = time.perf_counter()
        results = await asyncio.gather(*(h.verify("password", hashed) for _ in range(4)))
        elapsed = time.perf_counter() - start
        stop.set()
        await task
        assert results == [True] * 4
        # On the loop, four cost-10 checks would block it for the whole run: zero ticks.
        assert ticks >= max(3, int(elapsed / 0.01 * 0.3))
    finally:
        h.close()


@pytest.mark.parametrize("rounds", [3, 32, 0, -1])
def test_rounds_out_of_range(rounds: int) -> None:
    with pytest.raises(ValueError):
        PasswordHasher(rounds)


def test_repr_is_harmless() -> None:
    h = PasswordHasher(4)
    try:
        assert repr(h) == "PasswordHasher(rounds=4)"
    finally:
        h.close()


async def test_close_stops_the_pool() -> None:
    h = PasswordHasher(4)
    h.close()
    with pytest.raises(RuntimeError):
        await h.hash("password")


async def test_bcrypt_threads_yield_the_cpu_to_the_event_loop() -> None:
    hasher = PasswordHasher(4, max_workers=1)
    try:
        loop = asyncio.get_running_loop()

        def niceness() -> int:
            return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

        in_pool = await loop.run_in_executor(hasher._executor, niceness)
        assert in_pool == niceness() + BCRYPT_NICENESS
    finally:
        hasher.close()


async def test_a_full_queue_answers_overloaded_instead_of_waiting() -> None:
    hasher = PasswordHasher(10, max_workers=1, max_pending=2)
    try:
        results = await asyncio.gather(
            *(hasher.verify("password1", None) for _ in range(5)), return_exceptions=True
        )
    finally:
        hasher.close()
    refused = [r for r in results if isinstance(r, Overloaded)]
    assert len(refused) == 3 and refused[0].retry_after >= 1
    assert results[:2] == [False, False]
