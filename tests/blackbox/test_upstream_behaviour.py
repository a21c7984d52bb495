"""CONTRACT §6 against real upstream processes: streaming, limits, balancing, websockets,
upstream failures, and the per-route switches (preserve_host, forward_authorization, base path).

Each upstream is ``tests/blackbox/upstreams.py`` in its own process; it reports what it
received (``/__counters``, asked directly), so tests also prove what never reached it.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yarl

from tests.blackbox.client import PASSWORD, post_json, received, signed_in
from tests.blackbox.conftest import (
    Echo,
    Gateway,
    free_port,
    launch_gateway,
    stop_process,
)
from tests.blackbox.test_access_log import access_lines
from tests.blackbox.upstreams import Upstream, start_upstream

REPO_ROOT = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024
LIMIT = 1 * MiB
FORGED = "forged-admin"


@pytest.fixture(scope="module")
def upstreams(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Upstream, Upstream]]:
    workdir = tmp_path_factory.mktemp("upstreams")
    a, proc_a = start_upstream("A", workdir / "a.log")
    try:
        b, proc_b = start_upstream("B", workdir / "b.log")
    except BaseException:
        stop_process(proc_a)
        raise
    yield a, b
    stop_process(proc_a)
    stop_process(proc_b)


@pytest.fixture(scope="module")
def upstream(upstreams: tuple[Upstream, Upstream]) -> Upstream:
    return upstreams[0]


def routes_for(a: Upstream, b: Upstream, dead_port: int) -> str:
    # No braces: launch_gateway runs str.format over the routes.
    return f"""
routes:
  - name: up
    path: /up
    upstream: {a.url}
    auth: public
  - name: rr
    path: /rr
    upstream: [{a.url}, {b.url}]
    auth: public
  - name: ws
    path: /ws
    upstream: {a.url}
    websocket: true
  - name: dead
    path: /dead
    upstream: http://127.0.0.1:{dead_port}
    auth: public
  - name: slow
    path: /slow
    upstream: {a.url}
    auth: public
    timeout: 1s
  - name: based
    path: /based
    upstream: {a.url}/base
    auth: public
    strip_prefix: false
  - name: host-kept
    path: /host-kept
    upstream: {a.url}
    auth: public
    preserve_host: true
  - name: host-upstream
    path: /host-upstream
    upstream: {a.url}
    auth: public
    preserve_host: false
  - name: authz-kept
    path: /authz-kept
    upstream: {a.url}
  - name: authz-dropped
    path: /authz-dropped
    upstream: {a.url}
    forward_authorization: false
"""


@pytest.fixture(scope="module")
def gw(
    tmp_path_factory: pytest.TempPathFactory, upstreams: tuple[Upstream, Upstream]
) -> Iterator[Gateway]:
    """The gateway for most tests: bodies up to 64 MiB, generous rate limits."""
    a, b = upstreams
    workdir = tmp_path_factory.mktemp("gw-upstreams")
    gateway = launch_gateway(
        workdir,
        Echo(a.url, a.port),
        routes=routes_for(a, b, free_port()),
        server_extra="max_body_size: 64MiB",
        extra="""
        accounts:
          bcrypt_rounds: 4
          login_rate_limit: 1000/min
          register_rate_limit: 1000/min
        """,
    )
    yield gateway
    stop_process(gateway.proc)


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream) -> Iterator[Gateway]:
    """A gateway behind a trusted proxy (127.0.0.1), with a 1 MiB body limit and 2 failed
    logins a minute."""
    workdir = tmp_path_factory.mktemp("gw-limited")
    gateway = launch_gateway(
        workdir,
        Echo(upstream.url, upstream.port),
        routes=f"""
routes:
  - name: up
    path: /up
    upstream: {upstream.url}
    auth: public
""",
        server_extra="""
        max_body_size: 1MiB
        trusted_proxies: [127.0.0.1/32]
        """,
        extra="""
        accounts:
          bcrypt_rounds: 4
          login_rate_limit: 2/min
          register_rate_limit: 1000/min
        """,
    )
    yield gateway
    stop_process(gateway.proc)


# -- raw HTTP, for what aiohttp's client would hide or refuse --------------------------------


@dataclass
class Raw:
    status: int
    headers: list[tuple[str, str]]
    after_head: bytes  # every byte after the blank line, unparsed

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self) -> Any:
        return json.loads(self.after_head)


async def raw_exchange(
    base: str, head: bytes, body: Iterable[bytes] = (), timeout: float = 15.0
) -> Raw:
    """Send ``head``, then ``body`` piece by piece while reading the response to EOF.

    The body is written concurrently so that a gateway answering early (413) is seen even if
    it stops reading; a reset while writing is the gateway's right and is ignored.
    """
    url = yarl.URL(base)
    reader, writer = await asyncio.open_connection(url.host, url.port)

    async def send() -> None:
        try:
            writer.write(head)
            for piece in body:
                writer.write(piece)
                await writer.drain()
        except ConnectionError:
            pass

    sender = asyncio.create_task(send())
    data = b""
    try:
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                data += chunk
    except ConnectionError:
        pass  # a reset after the response: what arrived is the answer
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        writer.close()
    head_bytes, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        raise AssertionError(f"no complete response head: {data[:200]!r}")
    lines = head_bytes.decode("latin-1").split("\r\n")
    headers = [(k, v) for k, _, v in (line.partition(": ") for line in lines[1:])]
    return Raw(int(lines[0].split(" ")[1]), headers, rest)


def request_head(method: str, path: str, *headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", *headers, "Connection: close", "", ""]
    if not any(h.lower().startswith("host:") for h in headers):
        lines.insert(1, "Host: 127.0.0.1")
    return "\r\n".join(lines).encode("latin-1")


def chunked(pieces: Iterable[bytes]) -> Iterator[bytes]:
    for piece in pieces:
        yield f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    yield b"0\r\n\r\n"


def assert_problem(raw: Raw, status: int) -> None:
    assert raw.status == status, raw.after_head[:300]
    assert raw.all("Content-Type")[0].startswith("application/problem+json")
    assert raw.json()["status"] == status


# -- streaming both ways ----------------------------------------------------------------------

BIG = os.urandom(20 * MiB)


async def _pieces(data: bytes, size: int = 256 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
async def test_a_20_mib_request_body_reaches_the_upstream_intact(
    gw: Gateway, upstream: Upstream, framing: str
) -> None:
    path = f"/up/big-{framing}/hash"
    data: Any = _pieces(BIG) if framing == "chunked" else io.BytesIO(BIG)
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{gw.url}{path}", data=data) as resp:
            assert resp.status == 200, await resp.text()
            answer = await resp.json()
    assert answer["sha256"] == hashlib.sha256(BIG).hexdigest()
    assert answer["length"] == len(BIG)
    # A chunked body still streams (no length known up front); a declared length is kept.
    assert answer["content_length"] == (None if framing == "chunked" else len(BIG))
    stats = await upstream.counters(path)
    assert stats is not None and stats["requests"] == 1


async def test_a_streamed_response_reaches_the_client_progressively(gw: Gateway) -> None:
    async with aiohttp.ClientSession() as s:
        started = time.monotonic()
        async with s.get(f"{gw.url}/up/stream/drip?pause=1") as resp:
            first = await resp.content.readany()
            first_at = time.monotonic() - started
            rest = await resp.content.read()
            last_at = time.monotonic() - started
    assert first == b"first\n"
    assert first_at < 0.5, f"first chunk only after {first_at:.2f}s: the response was buffered"
    assert rest == b"second\n"
    assert last_at >= 0.9  # the upstream really paused between the chunks


# -- max_body_size ----------------------------------------------------------------------------


async def test_content_length_over_the_limit_is_413_and_never_reaches_the_upstream(
    limited: Gateway, upstream: Upstream
) -> None:
    path = "/up/cl-over/sink"
    size = 2 * LIMIT
    head = request_head(
        "POST", path, f"Content-Length: {size}", "Content-Type: application/octet-stream"
    )
    raw = await raw_exchange(limited.url, head, (b"x" * 65536 for _ in range(size // 65536)))
    assert_problem(raw, 413)
    assert await upstream.settled(path) is None


async def test_a_chunked_body_growing_past_the_limit_is_413_and_cut_off(
    limited: Gateway, upstream: Upstream
) -> None:
    path = "/up/chunked-over/sink"
    pieces = (b"y" * 65536 for _ in range(2 * LIMIT // 65536))
    head = request_head(
        "POST", path, "Transfer-Encoding: chunked", "Content-Type: application/octet-stream"
    )
    raw = await raw_exchange(limited.url, head, chunked(pieces))
    assert_problem(raw, 413)
    stats = await upstream.settled(path)
    if stats is not None:  # the gateway may have started streaming before the limit was hit
        assert stats["body_bytes"] <= LIMIT
        assert stats["completed"] == 0, "the upstream got a truncated body as if it were whole"


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
async def test_a_body_under_the_limit_passes(
    limited: Gateway, upstream: Upstream, framing: str
) -> None:
    body = b"z" * (LIMIT - 1024)
    data: Any = _pieces(body, 64 * 1024) if framing == "chunked" else body
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{limited.url}/up/under-{framing}/sink", data=data) as resp:
            assert resp.status == 200
            assert await resp.json() == {"received": len(body)}


# -- balancing ---------------------------------------------------------------------------------


async def test_round_robin_alternates_between_two_upstreams(gw: Gateway) -> None:
    names = []
    async with aiohttp.ClientSession() as s:
        for i in range(10):
            async with s.get(f"{gw.url}/rr/n{i}") as resp:
                assert resp.status == 200
                names.append((await resp.json())["name"])
    assert set(names) == {"A", "B"}
    assert names == [names[0], names[1]] * 5


# -- websockets --------------------------------------------------------------------------------


def ws_url(gateway: Gateway, path: str) -> str:
    return gateway.url.replace("http://", "ws://", 1) + path


async def test_websocket_relays_text_binary_and_close_code_with_verified_identity(
    gw: Gateway,
) -> None:
    async with aiohttp.ClientSession() as s:
        account = await signed_in(s, gw.url)
        forged = {"X-User-Id": FORGED, "X-User-Roles": "admin", "X_User_Email": FORGED}
        async with s.ws_connect(
            ws_url(gw, "/ws/relay/ws"), headers={**account.bearer, **forged}
        ) as ws:
            handshake = json.loads(await ws.receive_str(timeout=5))
            await ws.send_str("hello ✓")
            text = await ws.receive_str(timeout=5)
            await ws.send_bytes(b"\x00\xff binary")
            binary = await ws.receive_bytes(timeout=5)
            await ws.send_str("close:4001")
            closing = await ws.receive(timeout=5)
    assert handshake["path"] == "/ws/relay/ws"
    assert received(handshake, "X-User-Id") == [account.user_id]
    assert received(handshake, "X-User-Roles") == ["user"]
    assert not any(FORGED in v for _, v in handshake["headers"])
    assert text == "hello ✓"
    assert binary == b"\x00\xff binary"
    assert closing.type is aiohttp.WSMsgType.CLOSE and closing.data == 4001


async def test_websocket_client_close_code_reaches_the_upstream(
    gw: Gateway, upstream: Upstream
) -> None:
    path = "/ws/client-close/ws"
    async with aiohttp.ClientSession() as s:
        account = await signed_in(s, gw.url)
        async with s.ws_connect(ws_url(gw, path), headers=account.bearer) as ws:
            await ws.receive_str(timeout=5)
            await ws.close(code=4002)
    deadline = time.monotonic() + 5
    while (stats := await upstream.counters(path)) is None or stats["ws_close"] is None:
        assert time.monotonic() < deadline, stats
        await asyncio.sleep(0.05)
    assert stats["ws_close"] == 4002


async def test_websocket_upgrade_without_token_is_401(gw: Gateway, upstream: Upstream) -> None:
    path = "/ws/anonymous/ws"
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await s.ws_connect(ws_url(gw, path), headers={"X-User-Id": FORGED})
    assert refused.value.status == 401
    assert await upstream.counters(path) is None


# -- upstream failures -------------------------------------------------------------------------


async def test_unreachable_upstream_is_502_problem(gw: Gateway) -> None:
    raw = await raw_exchange(gw.url, request_head("GET", "/dead/x"))
    assert_problem(raw, 502)


async def test_slow_upstream_is_504_and_does_not_hold_up_other_routes(gw: Gateway) -> None:
    slow_started = time.monotonic()
    slow = asyncio.create_task(raw_exchange(gw.url, request_head("GET", "/slow/x/slow?sleep=5")))
    await asyncio.sleep(0.2)
    async with aiohttp.ClientSession() as s:
        for path, expected in (("/up/meanwhile", 200), ("/dead/meanwhile", 502)):
            started = time.monotonic()
            async with s.get(f"{gw.url}{path}") as resp:
                await resp.read()
                assert resp.status == expected
            assert time.monotonic() - started < 0.5, f"{path} waited on the slow upstream"
    assert not slow.done()
    raw = await slow
    elapsed = time.monotonic() - slow_started
    assert_problem(raw, 504)
    assert 0.9 <= elapsed < 3.5, f"504 after {elapsed:.2f}s for a 1s route timeout"


# -- bodiless responses -----------------------------------------------------------------------


async def test_head_passes_through_without_a_body(gw: Gateway, upstream: Upstream) -> None:
    path = "/up/head-check/echo"
    raw = await raw_exchange(gw.url, request_head("HEAD", path))
    assert raw.status == 200
    assert raw.all("X-Upstream") == ["A"]
    assert raw.after_head == b""
    # The length of the body a GET would get, as the upstream said: not the 0 sent here.
    [length] = raw.all("Content-Length")
    assert int(length) > 0
    stats = await upstream.counters(path)
    assert stats is not None and stats["methods"] == ["HEAD"]


@pytest.mark.parametrize(
    ("path", "headers", "status"),
    [("/up/nc/204", (), 204), ("/up/nm/304", ('If-None-Match: "v1"',), 304)],
)
async def test_204_and_304_pass_through_without_a_body(
    gw: Gateway, path: str, headers: tuple[str, ...], status: int
) -> None:
    raw = await raw_exchange(gw.url, request_head("GET", path, *headers))
    assert raw.status == status
    assert raw.all("X-Upstream") == ["A"]
    assert raw.after_head == b""
    assert raw.all("Transfer-Encoding") == []
    if status == 304:
        assert raw.all("ETag") == ['"v1"']


# -- per-route switches -----------------------------------------------------------------------


async def test_upstream_base_path_is_prepended_without_strip_prefix(gw: Gateway) -> None:
    raw = await raw_exchange(gw.url, request_head("GET", "/based/a/b?q=1&r=%20"))
    assert raw.status == 200
    echo = raw.json()
    assert echo["path"] == "/base/based/a/b"
    assert echo["query"] == "q=1&r=%20"


@pytest.mark.parametrize("route", ["/host-kept", "/host-upstream"])
async def test_preserve_host(gw: Gateway, upstream: Upstream, route: str) -> None:
    raw = await raw_exchange(gw.url, request_head("GET", f"{route}/x", "Host: app.example:8443"))
    assert raw.status == 200
    expected = "app.example:8443" if route == "/host-kept" else f"127.0.0.1:{upstream.port}"
    assert received(raw.json(), "Host") == [expected]


@pytest.mark.parametrize(("route", "forwarded"), [("/authz-kept", True), ("/authz-dropped", False)])
async def test_forward_authorization(gw: Gateway, route: str, forwarded: bool) -> None:
    async with aiohttp.ClientSession() as s:
        account = await signed_in(s, gw.url)
        async with s.get(f"{gw.url}{route}/x", headers=account.bearer) as resp:
            assert resp.status == 200
            echo = await resp.json()
    expected = [f"Bearer {account.access_token}"] if forwarded else []
    assert received(echo, "Authorization") == expected
    assert received(echo, "X-User-Id") == [account.user_id]


async def test_hop_by_hop_response_headers_do_not_reach_the_client(gw: Gateway) -> None:
    raw = await raw_exchange(gw.url, request_head("GET", "/up/resp/hop"))
    assert raw.status == 200
    assert raw.all("X-Kept") == ["yes"]
    assert raw.all("X-Foo") == []
    assert raw.all("Keep-Alive") == []
    tokens = {t.strip().lower() for v in raw.all("Connection") for t in v.split(",")}
    assert tokens <= {"close", "keep-alive"}


# -- trusted proxies --------------------------------------------------------------------------


async def test_trusted_proxy_forwarding_headers_are_appended_to(limited: Gateway) -> None:
    raw = await raw_exchange(
        limited.url,
        request_head(
            "GET",
            "/up/trusted/echo",
            "X-Forwarded-For: 10.1.1.1",
            "X-Real-IP: 10.1.1.1",
            "X-Forwarded-Proto: https",
        ),
    )
    assert raw.status == 200
    echo = raw.json()
    assert received(echo, "X-Forwarded-For") == ["10.1.1.1, 127.0.0.1"]
    assert received(echo, "X-Real-IP") == ["10.1.1.1"]
    assert received(echo, "X-Forwarded-Proto") == ["https"]


async def test_login_rate_limit_keys_on_the_client_behind_a_trusted_proxy(
    limited: Gateway,
) -> None:
    async with aiohttp.ClientSession() as s:
        first, second, third = [await signed_in(s, limited.url, tag=t) for t in "abc"]

        async def login(email: str, password: str, client: str) -> int:
            status, _, _ = await post_json(
                s,
                f"{limited.url}/auth/login",
                {"email": email, "password": password},
                headers={"X-Forwarded-For": client},
            )
            return status

        failures = [await login(first.email, "wrong wrong", "10.0.0.1") for _ in range(2)]
        # 10.0.0.1 is locked now, even for an account that never failed...
        locked = await login(third.email, PASSWORD, "10.0.0.1")
        # ...but another client behind the same proxy is not.
        other_failure = await login(second.email, "wrong wrong", "10.0.0.2")
        other = await login(second.email, PASSWORD, "10.0.0.2")
    assert failures == [401, 401]
    assert locked == 429
    assert (other_failure, other) == (401, 200)


async def test_a_client_gone_before_the_answer_is_logged_499_not_as_an_error(gw: Gateway) -> None:
    url = yarl.URL(gw.url)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    writer.write(request_head("GET", "/slow/x/slow?sleep=0.4", "X-Request-Id: trace-gone"))
    await writer.drain()
    await asyncio.sleep(0.1)
    # Gone before the upstream answers (a reset: a mere FIN may be a half-close that still
    # waits for the answer).
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()
    await writer.wait_closed()
    [line] = access_lines(gw, "trace-gone")
    assert line["status"] == 499 and line["route"] == "slow"
    assert "unhandled error" not in gw.log()
