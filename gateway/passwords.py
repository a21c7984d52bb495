"""Passwords: bcrypt, always in a thread pool, never on the event loop.

bcrypt reads only the first 72 bytes of a password; longer passwords are refused with a
clear 400 rather than silently truncated. Verification takes one bcrypt check whatever
happens (unknown user, malformed stored hash, unusable candidate), so its timing tells an
attacker nothing about which accounts exist. This is the only module that imports ``bcrypt``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import bcrypt

from gateway.errors import InvalidInput, Overloaded

__all__ = ["MAX_PASSWORD_BYTES", "PasswordHasher", "check_policy"]

# bcrypt ignores everything after 72 bytes: two passwords sharing a 72-byte prefix would match.
MAX_PASSWORD_BYTES = 72
MIN_ROUNDS, MAX_ROUNDS = 4, 31

# Compared against when there is no real hash, so that "no such user" costs what
# "wrong password" costs. Its value is irrelevant: nothing can match a hash of a random salt
# that no caller ever sees.
_DUMMY_PASSWORD = b"gateway-timing-equaliser"

_T = TypeVar("_T")

# bcrypt threads run at a lower CPU priority than the event loop: proxied traffic goes first
# and logins take the idle CPU. Measured with bench/login_storm.py on 2 cores: the p99 of
# proxied requests during a storm went from 3-25x the baseline to 1.0-1.2x.
BCRYPT_NICENESS = 10
# Checks waiting per pool thread before new ones are refused with 503: a storm of correct
# logins (the failed-login limit does not count them) must not build an unbounded queue.
PENDING_PER_WORKER = 16


def _lower_priority() -> None:
    """Thread initializer: on Linux, nice values are per thread, so only bcrypt yields."""
    get_id = getattr(threading, "get_native_id", None)
    set_priority = getattr(os, "setpriority", None)
    if get_id is None or set_priority is None:
        return
    with contextlib.suppress(OSError):
        set_priority(os.PRIO_PROCESS, get_id(), BCRYPT_NICENESS)


def _usable_cpus() -> int:
    """The CPUs this process may run on: ``os.cpu_count()`` counts those it may not (a
    container's cpuset, a worker pinned with taskset)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


def check_policy(password: object, min_length: int) -> str:
    """Return the password if acceptable, else raise ``InvalidInput`` saying why
    (not a string, shorter than ``min_length`` characters, over 72 UTF-8 bytes, NUL)."""
    if not isinstance(password, str):
        raise InvalidInput("password must be a string")
    if "\x00" in password:
        # Older bcrypt builds stop at NUL: "a\0x" and "a\0y" would be the same password.
        raise InvalidInput("password must not contain NUL characters")
    encoded = _encode(password)
    if encoded is None:
        raise InvalidInput("password must be valid Unicode text")
    if len(password) < min_length:
        raise InvalidInput(f"password must be at least {min_length} characters")
    if len(encoded) > MAX_PASSWORD_BYTES:
        raise InvalidInput(f"password must be at most {MAX_PASSWORD_BYTES} bytes in UTF-8")
    return password


def _encode(password: str) -> bytes | None:
    """UTF-8 bytes, or None when the string cannot be encoded (lone surrogates from JSON)."""
    try:
        return password.encode("utf-8")
    except UnicodeEncodeError:
        return None


def _usable(password: object) -> bytes | None:
    """The bytes bcrypt may see for ``password``, or None if it could never have been stored."""
    if not isinstance(password, str) or "\x00" in password:
        return None
    encoded = _encode(password)
    if encoded is None or len(encoded) > MAX_PASSWORD_BYTES:
        return None
    return encoded


class PasswordHasher:
    """bcrypt at a fixed cost, run in an executor owned by this object.

    bcrypt releases the GIL, so a pool of threads hashes in parallel while the event loop
    keeps serving. Call ``close()`` when the application shuts down.
    """

    def __init__(
        self, rounds: int, *, max_workers: int | None = None, max_pending: int | None = None
    ) -> None:
        if isinstance(rounds, bool) or not isinstance(rounds, int):
            raise TypeError("bcrypt rounds must be an integer")
        if not MIN_ROUNDS <= rounds <= MAX_ROUNDS:
            raise ValueError(f"bcrypt rounds must be between {MIN_ROUNDS} and {MAX_ROUNDS}")
        self.rounds = rounds
        workers = max_workers or max(2, _usable_cpus())
        self._executor = ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="bcrypt", initializer=_lower_priority
        )
        self._max_pending = max_pending or workers * PENDING_PER_WORKER
        self._pending = 0
        # Made once, at the real cost, in the pool: constructing a hasher never blocks the
        # loop, and the first job queued is this one, so workers waiting on it cannot deadlock.
        self._dummy: Future[bytes] = self._executor.submit(self._make_dummy)

    def __repr__(self) -> str:
        return f"PasswordHasher(rounds={self.rounds})"

    def _make_dummy(self) -> bytes:
        return bcrypt.hashpw(_DUMMY_PASSWORD, bcrypt.gensalt(self.rounds))

    async def hash(self, password: str) -> str:
        """Hash an already policy-checked password; refuses what bcrypt would truncate."""
        encoded = _usable(password)
        if encoded is None:
            check_policy(password, 0)  # raises the precise InvalidInput
            raise InvalidInput("password is not acceptable")
        hashed = await self._run(self._hash_sync, encoded)
        return hashed.decode("ascii")

    async def verify(self, password: str, hashed: str | None) -> bool:
        """``hashed=None`` (unknown user) still spends one bcrypt check, so that an unknown
        email and a wrong password take the same time; it returns False."""
        return await self._run(self._verify_sync, _usable(password), _stored(hashed))

    def close(self) -> None:
        """Stop the pool; queued work is cancelled, running checks finish in the background."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _run(self, fn: Callable[..., _T], *args: object) -> _T:
        if self._pending >= self._max_pending:
            raise Overloaded(retry_after=1, detail="Too many sign-ins at once; try again.")
        self._pending += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, fn, *args)
        finally:
            self._pending -= 1

    def _hash_sync(self, encoded: bytes) -> bytes:
        return bcrypt.hashpw(encoded, bcrypt.gensalt(self.rounds))

    def _verify_sync(self, candidate: bytes | None, stored: bytes | None) -> bool:
        if candidate is not None and stored is not None:
            try:
                return bcrypt.checkpw(candidate, stored)
            except ValueError:
                pass  # malformed stored hash: a data problem, answered like a wrong password
        # Same work as a real check, so no path is measurably faster than "wrong password".
        bcrypt.checkpw(candidate or _DUMMY_PASSWORD, self._dummy.result())
        return False


def _stored(hashed: str | None) -> bytes | None:
    if not isinstance(hashed, str):
        return None
    try:
        return hashed.encode("ascii")
    except UnicodeEncodeError:
        return None
