"""Forwarder against real upstreams on 127.0.0.1: exactly what arrives, streamed, bounded.

The "gateway" here is a tiny app that does what the real one does around the Forwarder:
clean the client's headers, add identity, X-Forwarded-* and X-Request-Id, forward, and
render ``GatewayError`` as its status.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import yarl
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict

from gateway.config import HeaderSettings, RouteSettings
from gateway.errors import GatewayError
from gateway.headers import (
    HeaderPolicy,
    clean_request_headers,
    forwarded_headers,
    identity_header_values,
    request_id,
)
from gateway.identity import Identity
from gateway.proxy import Forwarder, is_websocket_upgrade
from gateway.server import EDGE_HANDLER, Exchange
from tests.served import EdgeTestServer

MiB = 1024 * 1024
MAX_BODY = 6 * MiB
POLICY = HeaderPolicy(HeaderSettings())
CALLER = Identity(
    id="user-1", issuer="http://gw", email="ann@example.com", name="Ann", roles=("user",)
)

AiohttpServer = Callable[..., Awaitable[TestServer]]
AiohttpClient = Callable[..., Awaitable[TestClient]]


# --- upstream ------------------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    raw_path: str
    raw_headers: list[tuple[str, str]]
    body_len: int
    body_sha: str
    peer_port: int

    def headers(self, name: str) -> list[str]:
        return [v for k, v in self.raw_headers if k.lower() == name.lower()]


@dataclass
class Upstream:
    name: str
    server: TestServer
    seen: list[Seen] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    first_chunk_in: asyncio.Event = field(default_factory=asyncio.Event)
    ws_closed_with: list[int | None] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"


def upstream_app(up: Upstream) -> web.Application:
    async def record(request: web.Request) -> Seen:
        digest, size = hashlib.sha256(), 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
        transport = request.transport
        peer = transport.get_extra_info("peername") if transport else None
        seen = Seen(
            request.method,
            request.raw_path,
            [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers],
            size,
            digest.hexdigest(),
            peer[1] if peer else 0,
        )
        up.seen.append(seen)
        return seen

    async def echo(request: web.Request) -> web.StreamResponse:
        seen = await record(request)
        return web.json_response({"upstream": up.name, "len": seen.body_len, "sha": seen.body_sha})

    async def big(request: web.Request) -> web.StreamResponse:
        size = int(request.query["n"])
        response = web.StreamResponse()
        response.content_type = "application/octet-stream"
        await response.prepare(request)
        block = bytes(range(256)) * 256
        for offset in range(0, size, len(block)):
            await response.write(block[: min(len(block), size - offset)])
        await response.write_eof()
        return response

    async def trickle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"first")
        await asyncio.wait_for(up.release.wait(), 5)
        await response.write(b"second")
        await response.write_eof()
        return response

    async def upload_progress(request: web.Request) -> web.StreamResponse:
        first = await request.content.readany()
        up.first_chunk_in.set()
        rest = await request.read()
        return web.json_response({"first": len(first), "total": len(first) + len(rest)})

    async def sleep(request: web.Request) -> web.StreamResponse:
        await record(request)
        try:
            await asyncio.wait_for(up.release.wait(), 5)
        except TimeoutError:
            pass
        return web.Response(text="late")

    async def status(request: web.Request) -> web.StreamResponse:
        await record(request)
        code = int(request.match_info["tail"].rsplit("/", 1)[-1])
        return web.Response(status=code, headers={"ETag": '"v1"', "X-Upstream": up.name})

    async def head(request: web.Request) -> web.StreamResponse:
        await record(request)
        return web.Response(body=b"hello world", headers={"X-Upstream": up.name})

    async def gzipped(request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=gzip.compress(b"zipped" * 100), headers={"Content-Encoding": "gzip"}
        )

    async def redirect(request: web.Request) -> web.StreamResponse:
        return web.Response(status=302, headers={"Location": "/elsewhere"})

    async def hop(request: web.Request) -> web.StreamResponse:
        return web.Response(
            text="ok",
            headers={
                "Connection": "X-Private",
                "X-Private": "1",
                "Keep-Alive": "timeout=1",
                "Set-Cookie": "a=1",
                "X-Public": "2",
            },
        )

    async def reset(request: web.Request) -> web.StreamResponse:
        if request.transport is not None:
            request.transport.abort()
        await asyncio.sleep(0.01)
        return web.Response(text="never sent")

    async def die_mid_stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": "1000"})
        await response.prepare(request)
        await response.write(b"x" * 100)
        await asyncio.sleep(0.05)
        if request.transport is not None:
            request.transport.abort()
        return response

    async def ws(request: web.Request) -> web.StreamResponse:
        await record(request)
        sock = web.WebSocketResponse(protocols=("chat",))
        await sock.prepare(request)
        async for msg in sock:
            if msg.type is WSMsgType.TEXT and msg.data == "close-me":
                await sock.close(code=4001, message=b"bye")
            elif msg.type is WSMsgType.TEXT:
                await sock.send_str(msg.data)
            elif msg.type is WSMsgType.BINARY:
                await sock.send_bytes(msg.data)
        up.ws_closed_with.append(sock.close_code)
        return sock

    handlers = {
        "big": big,
        "trickle": trickle,
        "upload-progress": upload_progress,
        "sleep": sleep,
        "status": status,
        "head": head,
        "gzip": gzipped,
        "redirect": redirect,
        "hop": hop,
        "reset": reset,
        "die": die_mid_stream,
        "ws": ws,
    }

    async def dispatch(request: web.Request) -> web.StreamResponse:
        # /<route>/<handler>/...: the route name is the gateway's prefix, kept upstream.
        parts = request.path.split("/")
        handler = handlers.get(parts[2] if len(parts) > 2 else "", echo)
        return await handler(request)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", dispatch)
    return app


async def start_upstream(aiohttp_server: AiohttpServer, name: str) -> Upstream:
    up = Upstream(name, server=None)  # type: ignore[arg-type]
    up.server = await aiohttp_server(upstream_app(up))
    return up


# --- the gateway side -----------------------------------------------------------------------


def gateway_app(forwarder: Forwarder, routes: dict[str, RouteSettings]) -> EdgeTestServer:
    """The gateway's proxy step alone, on the edge: no auth, fixed identity, route by prefix."""

    async def handle(exchange: Exchange) -> None:
        route = routes[exchange.target.split("/")[1]]
        websocket = route.websocket and is_websocket_upgrade(exchange)
        headers = clean_request_headers(
            POLICY,
            exchange.headers,
            peer_trusted=False,
            websocket=websocket,
            forward_authorization=route.forward_authorization,
        )
        headers.extend(identity_header_values(POLICY.settings, CALLER))
        headers.extend(
            forwarded_headers(
                client_ip=exchange.remote or "unknown",
                proto=exchange.scheme,
                host=exchange.headers.get("Host"),
                existing_xff=None,
                peer_trusted=False,
            )
        )
        headers["X-Request-Id"] = request_id(exchange.headers.get("X-Request-Id"))
        upstream_path = exchange.target.partition("?")[0]
        try:
            if websocket:
                response = await forwarder.forward_websocket(
                    exchange.aiohttp_request(),
                    route=route,
                    upstream_path=upstream_path,
                    headers=headers,
                )
                await exchange.send_response(response)
                return
            exchange.expect_body()
            await forwarder.forward(
                exchange, route=route, upstream_path=upstream_path, headers=headers
            )
        except GatewayError as err:
            text = [(b"Content-Type", b"text/plain; charset=utf-8")]
            exchange.send_head(err.status, b"Refused", text, whole=err.code.encode())

    app = web.Application()
    app[EDGE_HANDLER] = handle
    return EdgeTestServer(app)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Env:
    a: Upstream
    b: Upstream
    client: TestClient
    forwarder: Forwarder


@pytest.fixture
async def env(aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient) -> AsyncIterator[Env]:
    a = await start_upstream(aiohttp_server, "a")
    b = await start_upstream(aiohttp_server, "b")
    routes = {
        "api": RouteSettings(name="api", path="/api", upstreams=(a.url,)),
        "rr": RouteSettings(name="rr", path="/rr", upstreams=(a.url, b.url + "/")),
        "slow": RouteSettings(name="slow", path="/slow", upstreams=(a.url,), timeout=0.4),
        "down": RouteSettings(
            name="down", path="/down", upstreams=(f"http://127.0.0.1:{closed_port()}",)
        ),
        "host": RouteSettings(name="host", path="/host", upstreams=(a.url,), preserve_host=True),
        "noauth": RouteSettings(
            name="noauth", path="/noauth", upstreams=(a.url,), forward_authorization=False
        ),
        "based": RouteSettings(name="based", path="/based", upstreams=(a.url + "/base",)),
        "wsr": RouteSettings(name="wsr", path="/wsr", upstreams=(a.url,), websocket=True),
    }
    forwarder = Forwarder(max_body_size=MAX_BODY, connect_timeout=2.0)
    await forwarder.start()
    client = await aiohttp_client(gateway_app(forwarder, routes))
    try:
        yield Env(a, b, client, forwarder)
    finally:
        a.release.set()
        b.release.set()
        await forwarder.close()


NO_AUTO = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


# --- what arrives upstream -------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "/api/a%3Bb;c=d/%25x%20y",
        "/api/semi;colon/%3b/lower%2fslash-as-given",
        "/api/q?x=%2F&y=a+b;c&z=%25&&w",
        "/api/%E2%82%AC/~user/(x)!*$'",
        "/api/q?",
    ],
)
async def test_path_and_query_arrive_byte_identical(env: Env, target: str) -> None:
    # The test client would requote a str (%3B -> ;): send the bytes as written.
    url = yarl.URL(f"http://127.0.0.1:{env.client.port}{target}", encoded=True)
    async with env.client.session.get(url) as resp:
        assert resp.status == 200
    assert [s.raw_path for s in env.a.seen] == [target.rstrip("?")]


async def test_upstream_base_path_is_prepended(env: Env) -> None:
    url = yarl.URL(f"http://127.0.0.1:{env.client.port}/based/x%3By?q=1", encoded=True)
    async with env.client.session.get(url) as resp:
        assert resp.status == 200
    assert env.a.seen[0].raw_path == "/base/based/x%3By?q=1"


async def test_headers_upstream_sees(env: Env) -> None:
    headers = CIMultiDict(
        [
            ("X-User-Id", "forged"),
            ("x-user-id", "forged2"),
            ("X_User_Id", "forged3"),
            ("Connection", "X-Hop-Secret"),
            ("X-Hop-Secret", "s"),
            ("X-Forwarded-For", "6.6.6.6"),
            ("X-Real-IP", "6.6.6.6"),
            ("Cookie", "gateway_session=tok; theme=dark"),
            ("Authorization", "Bearer abc"),
            ("X-Custom", "kept"),
            ("X-Request-Id", "req-1"),
            ("Proxy-Authorization", "Basic x"),
        ]
    )
    async with env.client.get("/api/h", headers=headers, skip_auto_headers=NO_AUTO) as resp:
        assert resp.status == 200
    seen = env.a.seen[0]
    assert seen.headers("X-User-Id") == ["user-1"]
    assert seen.headers("X_User_Id") == []
    assert seen.headers("X-User-Email") == ["ann@example.com"]
    assert seen.headers("X-Hop-Secret") == []
    assert seen.headers("X-Forwarded-For") == ["127.0.0.1"]
    assert seen.headers("X-Forwarded-Host") == [f"127.0.0.1:{env.client.port}"]
    assert seen.headers("X-Forwarded-Proto") == ["http"]
    assert seen.headers("X-Real-IP") == []
    assert seen.headers("Cookie") == ["theme=dark"]
    assert seen.headers("Authorization") == ["Bearer abc"]
    assert seen.headers("X-Custom") == ["kept"]
    assert seen.headers("X-Request-Id") == ["req-1"]
    assert seen.headers("Proxy-Authorization") == []
    assert seen.headers("Host") == [f"127.0.0.1:{env.a.server.port}"]
    # Nothing the client did not send: no User-Agent, Accept, Accept-Encoding, Content-Type.
    for name in NO_AUTO + ("Transfer-Encoding", "Content-Length"):
        assert seen.headers(name) == [], name


async def test_client_user_agent_and_accept_encoding_pass_unchanged(env: Env) -> None:
    headers = {"User-Agent": "curl/8", "Accept-Encoding": "br"}
    async with env.client.get("/api/ua", headers=headers) as resp:
        assert resp.status == 200
    seen = env.a.seen[0]
    assert seen.headers("User-Agent") == ["curl/8"]
    assert seen.headers("Accept-Encoding") == ["br"]


@pytest.mark.parametrize(("route", "expected_host"), [("host", "app.example:8443"), ("api", None)])
async def test_preserve_host(env: Env, route: str, expected_host: str | None) -> None:
    async with env.client.get(f"/{route}/x", headers={"Host": "app.example:8443"}) as resp:
        assert resp.status == 200
    host = env.a.seen[0].headers("Host")
    assert host == [expected_host or f"127.0.0.1:{env.a.server.port}"]


async def test_authorization_withheld_when_route_says_so(env: Env) -> None:
    async with env.client.get("/noauth/x", headers={"Authorization": "Bearer abc"}) as resp:
        assert resp.status == 200
    assert env.a.seen[0].headers("Authorization") == []


async def test_upgrade_on_a_plain_route_is_a_plain_get(env: Env) -> None:
    headers = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "x",
        "Sec-WebSocket-Version": "13",
    }
    async with env.client.get("/api/up", headers=headers) as resp:
        assert resp.status == 200
    seen = env.a.seen[0]
    assert (
        seen.method == "GET" and seen.headers("Upgrade") == [] and seen.headers("Connection") == []
    )


# --- bodies -----------------------------------------------------------------------------------


async def chunks(data: bytes, size: int = 256 * 1024) -> AsyncIterator[bytes]:
    for offset in range(0, len(data), size):
        yield data[offset : offset + size]


@pytest.mark.parametrize("chunked", [False, True])
async def test_large_request_body_streamed(env: Env, chunked: bool) -> None:
    body = os.urandom(5 * MiB)
    data: Any = chunks(body) if chunked else io.BytesIO(body)
    async with env.client.post("/api/upload", data=data) as resp:
        assert resp.status == 200
        answer = await resp.json()
    assert answer == {"upstream": "a", "len": len(body), "sha": hashlib.sha256(body).hexdigest()}
    seen = env.a.seen[0]
    if chunked:
        assert (
            seen.headers("Transfer-Encoding") == ["chunked"]
            and seen.headers("Content-Length") == []
        )
    else:
        assert (
            seen.headers("Content-Length") == [str(len(body))]
            and seen.headers("Transfer-Encoding") == []
        )


async def test_request_body_reaches_upstream_before_the_client_finishes(env: Env) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"a" * 1000
        # Only a streaming gateway lets the upstream see the first chunk now.
        await asyncio.wait_for(env.a.first_chunk_in.wait(), 3)
        yield b"b" * 1000

    async with env.client.post("/api/upload-progress", data=body()) as resp:
        assert resp.status == 200
        assert (await resp.json())["total"] == 2000


async def test_large_response_body_streamed(env: Env) -> None:
    size = 5 * MiB + 7
    async with env.client.get(f"/api/big?n={size}") as resp:
        assert resp.status == 200
        received = 0
        async for chunk in resp.content.iter_any():
            received += len(chunk)
    assert received == size


async def test_response_arrives_progressively(env: Env) -> None:
    async with env.client.get("/api/trickle") as resp:
        assert resp.status == 200
        first = await asyncio.wait_for(resp.content.readexactly(5), 2)
        assert first == b"first"
        env.a.release.set()
        assert await asyncio.wait_for(resp.content.read(), 2) == b"second"


@pytest.mark.parametrize("chunked", [False, True])
async def test_body_over_max_is_413(env: Env, chunked: bool) -> None:
    body = b"x" * (MAX_BODY + 1)
    data: Any = chunks(body) if chunked else io.BytesIO(body)
    async with env.client.post("/api/too-big", data=data) as resp:
        assert resp.status == 413
    if not chunked:
        assert env.a.seen == []  # refused before connecting
    else:
        assert all(s.body_len <= MAX_BODY for s in env.a.seen)


async def test_body_of_exactly_max_passes(env: Env) -> None:
    async with env.client.post("/api/max", data=chunks(b"y" * MAX_BODY)) as resp:
        assert resp.status == 200
        assert (await resp.json())["len"] == MAX_BODY


async def test_compressed_response_relayed_as_is(env: Env) -> None:
    async with env.client.get("/api/gzip", auto_decompress=False) as resp:
        assert resp.headers["Content-Encoding"] == "gzip"
        assert gzip.decompress(await resp.read()) == b"zipped" * 100


async def test_redirect_relayed_not_followed(env: Env) -> None:
    async with env.client.get("/api/redirect", allow_redirects=False) as resp:
        assert resp.status == 302 and resp.headers["Location"] == "/elsewhere"


async def test_response_hop_by_hop_headers_removed(env: Env) -> None:
    async with env.client.get("/api/hop") as resp:
        assert resp.status == 200
        assert "X-Private" not in resp.headers and "Keep-Alive" not in resp.headers
        assert resp.headers["X-Public"] == "2" and resp.headers["Set-Cookie"] == "a=1"


@pytest.mark.parametrize(
    ("method", "path", "status", "length"),
    [
        ("HEAD", "/api/head", 200, "11"),
        ("GET", "/api/status/204", 204, None),
        ("GET", "/api/status/304", 304, None),
    ],
)
async def test_responses_without_body(
    env: Env, method: str, path: str, status: int, length: str | None
) -> None:
    async with env.client.request(method, path) as resp:
        assert resp.status == status
        assert await resp.read() == b""
        assert resp.headers.get("Content-Length") == length
        assert "Transfer-Encoding" not in resp.headers
    assert env.a.seen[0].method == method
    # The connection is still usable afterwards: nothing was left unread on it.
    async with env.client.get("/api/after") as resp:
        assert resp.status == 200


# --- balancing, failures, time -----------------------------------------------------------------


async def test_round_robin_over_upstreams(env: Env) -> None:
    names = []
    for _ in range(4):
        async with env.client.get("/rr/x") as resp:
            names.append((await resp.json())["upstream"])
    assert names == ["a", "b", "a", "b"]
    assert [s.raw_path for s in env.b.seen] == ["/rr/x", "/rr/x"]


async def test_connections_are_pooled_and_released(env: Env) -> None:
    for _ in range(20):
        async with env.client.get("/api/pool") as resp:
            assert resp.status == 200
    assert len({s.peer_port for s in env.a.seen}) == 1


async def test_refused_connection_is_502(env: Env) -> None:
    async with env.client.get("/down/x") as resp:
        assert resp.status == 502


async def test_reset_before_response_is_502(env: Env) -> None:
    async with env.client.get("/api/reset") as resp:
        assert resp.status == 502


async def test_upstream_dying_mid_body_cuts_the_client(env: Env) -> None:
    async with env.client.get("/api/die") as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(resp.read(), 3)


async def test_slow_upstream_is_504_without_blocking_other_routes(env: Env) -> None:
    started = time.monotonic()
    slow = asyncio.create_task(env.client.get("/slow/sleep"))
    await asyncio.sleep(0.05)
    async with env.client.get("/api/fast") as resp:
        assert resp.status == 200
    assert not slow.done()  # the fast route answered while the slow one was still waiting
    resp = await asyncio.wait_for(slow, 3)
    async with resp:
        assert resp.status == 504
    assert 0.35 < time.monotonic() - started < 2


async def test_slow_upstream_mid_body_is_cut(env: Env) -> None:
    # sock_read bounds silences between body chunks too: no request is held forever.
    async with env.client.get("/slow/trickle") as resp:
        assert await resp.content.readexactly(5) == b"first"
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(resp.read(), 3)


async def test_forward_before_start_is_an_error() -> None:
    with pytest.raises(RuntimeError):
        Forwarder(max_body_size=1).session


# --- websockets --------------------------------------------------------------------------------


async def test_websocket_echo_text_binary_and_client_close(env: Env) -> None:
    headers = {"X-User-Id": "forged", "Cookie": "gateway_session=t; a=1"}
    async with env.client.ws_connect(
        "/wsr/ws?room=1", protocols=("chat",), headers=headers
    ) as sock:
        assert sock.protocol == "chat"
        await sock.send_str("hello ☃")
        assert await sock.receive_str(timeout=2) == "hello ☃"
        await sock.send_bytes(b"\x00\x01\xff")
        assert await sock.receive_bytes(timeout=2) == b"\x00\x01\xff"
        await sock.close(code=4000, message=b"done")
    for _ in range(100):
        if env.a.ws_closed_with:
            break
        await asyncio.sleep(0.02)
    assert env.a.ws_closed_with == [4000]
    seen = env.a.seen[0]
    assert seen.raw_path == "/wsr/ws?room=1"
    assert seen.headers("X-User-Id") == ["user-1"]
    assert seen.headers("Cookie") == ["a=1"]
    assert seen.headers("Sec-WebSocket-Protocol") == ["chat"]


async def test_websocket_upstream_close_reaches_client(env: Env) -> None:
    async with env.client.ws_connect("/wsr/ws") as sock:
        await sock.send_str("close-me")
        msg = await sock.receive(timeout=2)
        assert msg.type is WSMsgType.CLOSE
        assert (msg.data, msg.extra) == (4001, "bye")


async def test_websocket_refused_upstream_is_502_before_accepting(env: Env) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        await env.client.ws_connect("/wsr/not-a-websocket")
    assert caught.value.status == 502


async def test_websocket_upstream_down_is_502(
    aiohttp_client: AiohttpClient,
) -> None:
    forwarder = Forwarder(max_body_size=MAX_BODY)
    await forwarder.start()
    try:
        route = RouteSettings(
            name="wsr",
            path="/wsr",
            upstreams=(f"http://127.0.0.1:{closed_port()}",),
            websocket=True,
        )
        client = await aiohttp_client(gateway_app(forwarder, {"wsr": route}))
        with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
            await client.ws_connect("/wsr/x")
        assert caught.value.status == 502
    finally:
        await forwarder.close()
