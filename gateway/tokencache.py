"""Identities of bearer tokens verified before, kept until the tokens expire.

Verifying a signature and its claims costs hundreds of microseconds; a client sends the same
token with every request until it expires. The key is the exact token string, so a hit is a
dict lookup and proves what the full verification proved: the same bytes passed it. Only
successes are kept (a flood of garbage must not fill the cache), an entry leaves when its
token would no longer pass (``exp`` + leeway), and the cache is bounded in entries and in
token size, the oldest entries going first. Whoever changes the keys clears it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from gateway.identity import Identity

__all__ = ["VerifiedTokens"]

MAX_ENTRIES = 32_768
MAX_TOKEN_LENGTH = 4096  # longer tokens are verified every time, never kept


class VerifiedTokens:
    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        *,
        max_entries: int = MAX_ENTRIES,
        max_token_length: int = MAX_TOKEN_LENGTH,
    ) -> None:
        self._clock = clock
        self._max_entries = max_entries
        self._max_token_length = max_token_length
        self._entries: dict[str, Identity] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, token: str) -> Identity | None:
        identity = self._entries.get(token)
        if identity is None:
            return None
        if identity.valid_until is None or self._clock() >= identity.valid_until:
            del self._entries[token]
            return None
        return identity

    def put(self, token: str, identity: Identity) -> None:
        if identity.valid_until is None or len(token) > self._max_token_length:
            return
        if len(self._entries) >= self._max_entries:
            del self._entries[next(iter(self._entries))]  # dicts keep insertion order
        self._entries[token] = identity

    def clear(self) -> None:
        self._entries.clear()
