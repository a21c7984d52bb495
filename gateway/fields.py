"""A request's header fields as the parser gave them, read like aiohttp's headers.

A proxied request's fields go upstream as the bytes they arrived in; the gateway itself reads
only a few of them (``Host``, ``Authorization``, ``X-Request-Id``...). Decoding every field to
text in a ``CIMultiDict`` cost each request in flight a second copy of its head — the bearer
token alone is most of a kilobyte, a browser's cookies several — and a thousand requests in
flight are a thousand heads. :class:`HeaderFields` keeps the bytes and an index of each
name's first value, and decodes only what is read, the way ``CIMultiDictProxy`` answers
(names compared case-insensitively, values as UTF-8 with undecodable bytes kept as
surrogates).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, TypeVar, overload

from multidict import CIMultiDict, CIMultiDictProxy, MultiMapping

from gateway.memo import Memo

__all__ = ["HeaderFields", "Field"]

Field = tuple[bytes, bytes]
T = TypeVar("T")
_NO_DEFAULT: Any = object()
_NONE_REPEATED: frozenset[str] = frozenset()  # (not a singleton: one per request else)


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _key(name: bytes) -> str:
    return name.decode("latin-1").lower()


_KEYS: Memo[bytes, str] = Memo(_key)  # field names recur on every request


class HeaderFields(MultiMapping[str]):
    """Read-only, case-insensitive, multi-valued: ``get``, ``getall``, ``in``, ``items``.

    ``raw`` is the fields in order, as received; ``first`` each lowercase name's first value,
    as bytes (what the edge reads without decoding); ``repeated`` the lowercase names that
    appear more than once."""

    __slots__ = ("raw", "first", "repeated")

    def __init__(self, raw: tuple[Field, ...]) -> None:
        self.raw = raw
        first: dict[str, bytes] = {}
        repeated: set[str] | None = None
        keys = _KEYS
        for name, value in raw:
            key = keys[name]
            if key not in first:
                first[key] = value
            elif repeated is None:
                repeated = {key}
            else:
                repeated.add(key)
        self.first = first
        self.repeated: frozenset[str] = frozenset(repeated) if repeated else _NONE_REPEATED

    @overload
    def get(self, name: str) -> str | None: ...
    @overload
    def get(self, name: str, default: str | T) -> str | T: ...
    def get(self, name: str, default: Any = None) -> Any:
        value = self.first.get(name.lower())
        return default if value is None else _text(value)

    def getall(self, name: str, default: Any = _NO_DEFAULT) -> Any:
        key = name.lower()
        if key in self.repeated:
            return [_text(v) for n, v in self.raw if _KEYS[n] == key]
        value = self.first.get(key)
        if value is not None:
            return [_text(value)]
        if default is _NO_DEFAULT:
            raise KeyError(name)
        return default

    def getone(self, name: str, default: Any = _NO_DEFAULT) -> Any:
        value = self.first.get(name.lower())
        if value is not None:
            return _text(value)
        if default is _NO_DEFAULT:
            raise KeyError(name)
        return default

    def __getitem__(self, name: str) -> str:
        value = self.first.get(name.lower())
        if value is None:
            raise KeyError(name)
        return _text(value)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self.first

    def __iter__(self) -> Iterator[str]:
        """Each name once, as first written (what multidict's iteration gives)."""
        seen: set[str] = set()
        for name, _ in self.raw:
            key = _KEYS[name]
            if key not in seen:
                seen.add(key)
                yield _text(name)

    def __len__(self) -> int:
        return len(self.raw)

    def items(self) -> Any:
        return [(_text(n), _text(v)) for n, v in self.raw]

    def as_multidict(self) -> CIMultiDictProxy[str]:
        """The fields as aiohttp's requests hold them."""
        return CIMultiDictProxy(CIMultiDict(self.items()))
