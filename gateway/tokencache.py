"""Identities of bearer tokens verified before, kept until the tokens expire.

Verifying a signature and its claims costs hundreds of microseconds; a client sends the same
token with every request until it expires. The key is the SHA-256 digest of the exact token
(a token of a kilobyte is kept in 32 bytes), so a hit is a digest and a dict lookup and
proves what the full verification proved: the same bytes passed it (other bytes with the
same digest are a SHA-256 second preimage, far beyond forging the signature). Only
successes are kept (a flood of garbage must not fill the cache), an entry leaves when its
token would no longer pass (``exp`` + leeway), and the cache is bounded in entries and in
token size, the oldest entries going first. Whoever changes the keys clears it.
"""

from __future__ import annotations

import hashlib
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
        self._entries: dict[bytes, Identity] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, token: str) -> Identity | None:
        if not token.isascii():
            return None  # never verified: tokens are base64url and dots
        key = _digest(token)
        identity = self._entries.get(key)
        if identity is None:
            return None
        if identity.valid_until is None or self._clock() >= identity.valid_until:
            del self._entries[key]
            return None
        return identity

    def put(self, token: str, identity: Identity) -> None:
        if (
            identity.valid_until is None
            or len(token) > self._max_token_length
            or not token.isascii()
        ):
            return
        if len(self._entries) >= self._max_entries:
            del self._entries[next(iter(self._entries))]  # dicts keep insertion order
        self._entries[_digest(token)] = identity

    def clear(self) -> None:
        self._entries.clear()


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()  # (ASCII: the fast encoder)
