"""Small clients for black-box tests: JSON over aiohttp, and raw bytes over a socket.

The raw client exists because aiohttp's client normalizes paths and refuses some headers,
so it cannot send many of the requests an attacker would.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

import aiohttp
import yarl

PASSWORD = "correct horse battery"

# What must never appear in a body the gateway itself wrote (CONTRACT §7): tracebacks, file
# paths, SQL, key material. Upstream answers (marked ``X-Upstream``) echo what the test sent.
LEAKS = re.compile(
    r"Traceback \(most recent call last\)|File \"/|\.py\", line \d"
    r"|/(?:home|root|tmp|usr|etc|var|srv|work)/[\w./-]+"
    # A file name, but not a JWT segment that happens to start "db" or "py" after its dot.
    r"|(?<![\w.-])[\w/-]+\.(?:py|pem|db|sqlite3?|yaml)(?![\w-])"
    r"|\b(?:SELECT|INSERT INTO|DELETE FROM|UPDATE \w+ SET|CREATE TABLE)\b"
    r"|sqlite3|aiosqlite|asyncpg|OperationalError|IntegrityError|ProgrammingError"
    r"|PRIVATE KEY|BEGIN [A-Z ]+-----|\"(?:d|p|q|dp|dq|qi|k)\"\s*:"
)


def assert_no_leak(body: bytes, where: str) -> None:
    text = body.decode("utf-8", errors="replace")
    found = LEAKS.search(text)
    assert found is None, f"{where}: response body leaks {found.group(0)!r}: {text[:300]!r}"


def unique_email(tag: str = "user") -> str:
    return f"{tag}-{uuid.uuid4().hex[:10]}@example.com"


async def post_json(
    session: aiohttp.ClientSession, url: str, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any] | None, aiohttp.ClientResponse]:
    async with session.post(url, json=body, headers=headers) as resp:
        text = await resp.text()
        return resp.status, (json.loads(text) if text else None), resp


@dataclass
class Account:
    email: str
    password: str
    access_token: str
    refresh_token: str
    user_id: str

    @property
    def bearer(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access_token}"}


async def signed_in(
    session: aiohttp.ClientSession, base: str, prefix: str = "/auth", tag: str = "user"
) -> Account:
    email = unique_email(tag)
    status, user, _ = await post_json(
        session, f"{base}{prefix}/register", {"email": email, "password": PASSWORD}
    )
    assert status == 201, user
    status, tokens, _ = await post_json(
        session, f"{base}{prefix}/login", {"email": email, "password": PASSWORD}
    )
    assert status == 200, tokens
    assert user is not None and tokens is not None
    return Account(email, PASSWORD, tokens["access_token"], tokens["refresh_token"], user["id"])


async def get_echo(
    session: aiohttp.ClientSession, url: str, headers: Any = None
) -> tuple[int, dict[str, Any]]:
    """GET through the gateway; the body is what the echo upstream received (or a problem)."""
    async with session.get(yarl.URL(url, encoded=True), headers=headers) as resp:
        return resp.status, await resp.json(content_type=None)


def received(echo_body: dict[str, Any], name: str) -> list[str]:
    """Every value of header ``name`` (any case) that reached the upstream."""
    return [v for k, v in echo_body["headers"] if k.lower() == name.lower()]


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def json(self) -> Any:
        return json.loads(self.body)


async def raw_request(base: str, request: bytes, timeout: float = 10.0) -> RawResponse:
    """Send ``request`` bytes as they are; read one response (the connection is closed)."""
    url = yarl.URL(base)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = [tuple(line.split(": ", 1)) for line in lines[1:] if ": " in line]
    if any(k.lower() == "transfer-encoding" for k, _ in headers):
        body = dechunk(body)
    if not any(k.lower() == "x-upstream" for k, _ in headers):
        assert_no_leak(body, lines[0])
    return RawResponse(status, headers, body)  # type: ignore[arg-type]


def dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return out


def get(path: str, *headers: str) -> bytes:
    """A raw GET request with ``Connection: close`` and the given header lines."""
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", *headers, "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1")
