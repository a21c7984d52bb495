"""HeaderFields answers as aiohttp's CIMultiDictProxy of the same fields would."""

from __future__ import annotations

import tracemalloc

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.fields import HeaderFields

RAW = (
    (b"Host", b"api.example.com"),
    (b"X-Forwarded-For", b"10.0.0.1"),
    (b"authorization", b"Bearer abc"),
    (b"x-forwarded-for", b"10.0.0.2, 10.0.0.3"),
    (b"Cookie", b"a=\xff\xfe"),  # not UTF-8: kept as surrogates, as aiohttp does
    (b"Empty", b""),
)


def reference(raw: tuple[tuple[bytes, bytes], ...]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(
        CIMultiDict(
            (n.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape"))
            for n, v in raw
        )
    )


@pytest.mark.parametrize(
    "name",
    [
        "Host",
        "HOST",
        "x-forwarded-for",
        "X-Forwarded-For",
        "Authorization",
        "cookie",
        "empty",
        "Missing",
    ],
)
def test_reads_like_a_cimultidictproxy(name: str) -> None:
    fields, expected = HeaderFields(RAW), reference(RAW)
    assert fields.get(name) == expected.get(name)
    assert fields.get(name, "d") == expected.get(name, "d")
    assert fields.getall(name, []) == expected.getall(name, [])
    assert fields.getone(name, None) == expected.getone(name, None)
    assert (name in fields) == (name in expected)
    if name in expected:
        assert fields[name] == expected[name]
    else:
        with pytest.raises(KeyError):
            fields[name]
        with pytest.raises(KeyError):
            fields.getall(name)
        with pytest.raises(KeyError):
            fields.getone(name)


def test_order_length_and_conversion() -> None:
    fields = HeaderFields(RAW)
    assert fields.items() == list(reference(RAW).items())
    assert list(fields) == list(reference(RAW).keys())
    assert len(fields) == len(RAW)
    assert fields.as_multidict() == reference(RAW)
    assert fields.raw is RAW
    assert 42 not in fields  # type: ignore[comparison-overlap]


def test_repeated_names_are_known_case_insensitively() -> None:
    assert HeaderFields(RAW).repeated == {"x-forwarded-for"}
    assert HeaderFields(RAW[:3]).repeated == frozenset()


def test_keeps_the_bytes_not_a_text_copy() -> None:
    """The point of it: a request in flight holds its head once (the bytes), not again as
    text; a kilobyte token is not copied until something reads it."""
    token = b"Bearer " + b"x" * 1000
    raw = ((b"Host", b"h"), (b"Authorization", token))
    HeaderFields(raw)  # memo the names first
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = [HeaderFields(raw) for _ in range(100)]
        per_request = (tracemalloc.get_traced_memory()[0] - before) / len(kept)
    finally:
        tracemalloc.stop()
    assert per_request < 500  # the object and its index of first values; the token was 1 KB
    assert kept[0].get("authorization") == token.decode()
