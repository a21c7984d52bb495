"""A bounded memo for verdicts on values that repeat from request to request.

Header names, Host values and the like recur on nearly every request while the rules that
judge them never change: each is judged once. A client inventing new ones cannot grow a memo
past its bound (it is emptied and starts again), and a value whose judgement raises is never
kept.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

__all__ = ["Memo"]

# Entries kept before a memo starts again: far more header names, Host values or peers than a
# gateway sees in normal traffic, far less memory than a client inventing them could cost.
DEFAULT_BOUND = 4096

K = TypeVar("K")
V = TypeVar("V")


class Memo(dict[K, V]):
    """``memo[key]`` is ``compute(key)``, computed on first sight and kept (a hit is a plain
    dict lookup, in C)."""

    def __init__(self, compute: Callable[[K], V], bound: int = DEFAULT_BOUND) -> None:
        super().__init__()
        self._compute = compute
        self._bound = bound

    def __missing__(self, key: K) -> V:
        value = self._compute(key)
        if len(self) >= self._bound:
            self.clear()
        self[key] = value
        return value
