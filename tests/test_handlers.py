"""JSON bodies of the account endpoints (gateway.handlers.read_json, parse_json_object):
strict UTF-8 JSON objects, read whole but never past the limit."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.errors import InvalidInput
from gateway.handlers import MAX_JSON_BODY, parse_json_object, read_json
from gateway.middleware import problem_middleware

Client = TestClient[web.Request, web.Application]

# -- parse_json_object ------------------------------------------------------------------------

ACCEPTED = [
    (b'{"email": "a@example.com"}', {"email": "a@example.com"}),
    (b"\xef\xbb\xbf{}", {}),  # one UTF-8 BOM is ignored (RFC 8259 8.1 allows it)
    (b' \r\n{"a": [1, {"b": null}]} \n', {"a": [1, {"b": None}]}),
    ('{"name": "Zo\u00eb \u20ac"}'.encode(), {"name": "Zo\u00eb \u20ac"}),
    (b'{"a": {"a": 1}, "b": {"a": 2}}', {"a": {"a": 1}, "b": {"a": 2}}),  # same key, other objects
    (b'{"p": "\\ud800"}', {"p": "\ud800"}),  # an escaped lone surrogate: the service refuses it
]


@pytest.mark.parametrize(("raw", "expected"), ACCEPTED)
def test_parse_accepts(raw: bytes, expected: dict[str, Any]) -> None:
    assert parse_json_object(raw) == expected


REFUSED = [
    b"",
    b"[]",
    b'"a"',
    b"1",
    b"null",
    b"{} {}",
    b'{"a": 1, "a": 2}',  # duplicate key: parsers disagree on which copy wins
    b'{"a": 1, "a": 1}',
    b'{"x": {"a": 1, "a": 2}}',  # duplicated deeper down
    b'{"a": NaN}',
    b'{"a": Infinity}',
    b'{"a": -Infinity}',
    b'{"a": ' + b"1" * 5000 + b"}",  # past Python's int digit limit
    b'{"a": "\xff"}',
    b'{"a": "\xc0\xaf"}',  # overlong "/"
    b'{"a": "\xed\xa0\x80"}',  # UTF-8-encoded surrogate
    b'{"a": "\xe9"}',  # Latin-1
    b"\xef\xbb\xbf\xef\xbb\xbf{}",  # two BOMs
    '{"a": 1}'.encode("utf-16"),
    '{"a": 1}'.encode("utf-16-le"),
    '{"a": 1}'.encode("utf-32"),
    b"[" * 50_000 + b"]" * 50_000,  # RecursionError inside the parser
    b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    b'{"a": "b\x00"}',  # a raw control character inside a string
]


@pytest.mark.parametrize("raw", REFUSED, ids=lambda raw: repr(raw[:24]))
def test_parse_refuses(raw: bytes) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_json_object(raw)
    assert caught.value.detail is not None and "\\" not in caught.value.detail


# -- read_json over HTTP ----------------------------------------------------------------------


async def echo_json(request: web.Request) -> web.Response:
    return web.json_response(await read_json(request))


@pytest.fixture
async def client(aiohttp_client: Any) -> Client:
    app = web.Application(middlewares=[problem_middleware])
    app.router.add_post("/", echo_json)
    client: Client = await aiohttp_client(app)
    return client


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ("application/json", 200),
        ("application/json; charset=utf-8", 200),
        ("application/json; charset=UTF8", 200),
        ("APPLICATION/JSON", 200),
        ("application/json; charset=latin-1", 415),
        ("application/json; charset=utf-16", 415),
        ("application/json-patch+json", 415),
        ("text/json", 415),
        ("text/plain", 415),
    ],
)
async def test_media_types(client: Client, content_type: str, status: int) -> None:
    resp = await client.post("/", data=b'{"a": 1}', headers={"Content-Type": content_type})
    assert resp.status == status
    if status != 200:
        assert resp.content_type == "application/problem+json"


async def pieces(parts: list[bytes], pause: float) -> AsyncIterator[bytes]:
    for part in parts:
        yield part
        await asyncio.sleep(pause)


async def test_a_body_in_slow_pieces_is_read_whole(client: Client) -> None:
    """One ``StreamReader.read(n)`` returns only what has arrived: the first piece."""
    body = b'{"email": "a@example.com", "password": "correct horse battery"}'
    parts = [body[:10], body[10:30], body[30:]]
    resp = await client.post(
        "/", data=pieces(parts, 0.05), headers={"Content-Type": "application/json"}
    )
    assert resp.status == 200
    assert await resp.json() == {"email": "a@example.com", "password": "correct horse battery"}


@pytest.mark.parametrize("declared", [True, False])
async def test_over_the_limit_is_413_whatever_the_framing(client: Client, declared: bool) -> None:
    body = b'{"p": "' + b"x" * MAX_JSON_BODY + b'"}'
    if declared:
        resp = await client.post("/", data=body, headers={"Content-Type": "application/json"})
    else:  # chunked, in pieces smaller than the limit
        parts = [body[i : i + 8192] for i in range(0, len(body), 8192)]
        resp = await client.post(
            "/", data=pieces(parts, 0.001), headers={"Content-Type": "application/json"}
        )
    assert resp.status == 413
    assert resp.content_type == "application/problem+json"


async def test_exactly_the_limit_is_read(client: Client) -> None:
    body = b'{"p": "' + b"x" * (MAX_JSON_BODY - 9) + b'"}'
    assert len(body) == MAX_JSON_BODY
    parts = [body[i : i + 8192] for i in range(0, len(body), 8192)]
    resp = await client.post(
        "/", data=pieces(parts, 0.001), headers={"Content-Type": "application/json"}
    )
    assert resp.status == 200
