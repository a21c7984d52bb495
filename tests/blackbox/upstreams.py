"""A scriptable upstream for black-box tests, run as its own process.

    python -m tests.blackbox.upstreams --port P --name N     (from the repository root)

Behaviour is chosen by the LAST path segment, so it works behind any route prefix:

- ``ready``: 200, for start-up polling (not counted);
- ``hash``: streams the body through sha256, answers ``{sha256, length, content_length}``
  (the last is the request's ``Content-Length`` header, null when chunked);
- ``sink``: reads the body, answers ``{received}``;
- ``drip``: answers ``first\\n``, waits ``?pause=`` seconds (default 1), then ``second\\n``;
- ``slow``: waits ``?sleep=`` seconds (default 3) before answering;
- ``204`` / ``304``: that status, no body (304 with an ``ETag``);
- ``hop``: a response carrying hop-by-hop headers (``Connection: X-Foo``, ``X-Foo``,
  ``Keep-Alive``) next to an ordinary ``X-Kept``;
- ``ws``: a websocket whose first message is the handshake as JSON; then it echoes text and
  binary, and a text ``close:CODE`` makes it close with CODE;
- anything else: the request as JSON (``name, method, path, query, headers, body``).

Every response carries ``X-Upstream: <name>``. ``GET /__counters`` (asked directly, not through
the gateway) answers, per path received, how many requests arrived, their methods, how many
body bytes were read, how many bodies were read to their end, how many requests are still in
flight, and the close code a websocket client sent. Tests assert on these to prove what an
upstream did NOT receive.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web

from tests.blackbox.conftest import free_port, stop_process, wait_until_up

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class PathStats:
    requests: int = 0
    methods: list[str] = field(default_factory=list)
    body_bytes: int = 0
    completed: int = 0
    open: int = 0
    ws_close: int | None = None


STATS = web.AppKey("stats", dict)
NAME = web.AppKey("name", str)

Handler = Callable[[web.Request, PathStats], Awaitable[web.StreamResponse]]


async def _consume(request: web.Request, stats: PathStats, sink: Callable[[bytes], None]) -> int:
    """Read the body chunk by chunk, counting bytes as they arrive (even if it breaks off)."""
    total = 0
    async for chunk in request.content.iter_any():
        total += len(chunk)
        stats.body_bytes += len(chunk)
        sink(chunk)
    stats.completed += 1
    return total


async def _hash(request: web.Request, stats: PathStats) -> web.StreamResponse:
    digest = hashlib.sha256()
    length = await _consume(request, stats, digest.update)
    return web.json_response(
        {"sha256": digest.hexdigest(), "length": length, "content_length": request.content_length}
    )


async def _sink(request: web.Request, stats: PathStats) -> web.StreamResponse:
    length = await _consume(request, stats, lambda _: None)
    return web.json_response({"received": length})


async def _drip(request: web.Request, stats: PathStats) -> web.StreamResponse:
    pause = float(request.query.get("pause", "1"))
    response = web.StreamResponse(headers={"Content-Type": "text/plain"})
    await response.prepare(request)
    await response.write(b"first\n")
    await asyncio.sleep(pause)
    await response.write(b"second\n")
    await response.write_eof()
    return response


async def _slow(request: web.Request, stats: PathStats) -> web.StreamResponse:
    await asyncio.sleep(float(request.query.get("sleep", "3")))
    return web.json_response({"slept": True})


async def _no_content(request: web.Request, stats: PathStats) -> web.StreamResponse:
    return web.Response(status=204)


async def _not_modified(request: web.Request, stats: PathStats) -> web.StreamResponse:
    return web.Response(status=304, headers={"ETag": '"v1"'})


async def _hop(request: web.Request, stats: PathStats) -> web.StreamResponse:
    return web.Response(
        text="hop",
        headers={
            "Connection": "X-Foo",
            "X-Foo": "hop-secret",
            "Keep-Alive": "timeout=5, max=100",
            "X-Kept": "yes",
        },
    )


async def _websocket(request: web.Request, stats: PathStats) -> web.StreamResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    handshake = {"path": request.path, "headers": [[k, v] for k, v in request.headers.items()]}
    await ws.send_str(json.dumps(handshake))
    async for msg in ws:
        if msg.type is WSMsgType.TEXT and msg.data.startswith("close:"):
            await ws.close(code=int(msg.data.partition(":")[2]), message=b"bye")
            break
        if msg.type is WSMsgType.TEXT:
            await ws.send_str(msg.data)
        elif msg.type is WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    if stats.ws_close is None:
        stats.ws_close = ws.close_code
    return ws


async def _echo(request: web.Request, stats: PathStats) -> web.StreamResponse:
    chunks: list[bytes] = []
    await _consume(request, stats, chunks.append)
    return web.json_response(
        {
            "name": request.app[NAME],
            "method": request.method,
            "path": request.raw_path.split("?", 1)[0],
            "query": request.rel_url.raw_query_string,
            "headers": [[k, v] for k, v in request.headers.items()],
            "body": b"".join(chunks).decode("utf-8", errors="replace"),
        }
    )


HANDLERS: dict[str, Handler] = {
    "hash": _hash,
    "sink": _sink,
    "drip": _drip,
    "slow": _slow,
    "204": _no_content,
    "304": _not_modified,
    "hop": _hop,
    "ws": _websocket,
}


async def _dispatch(request: web.Request) -> web.StreamResponse:
    if request.path == "/__counters":
        stats = request.app[STATS]
        return web.json_response({path: asdict(s) for path, s in stats.items()})
    last = request.path.rstrip("/").rpartition("/")[2]
    if last == "ready":
        return web.Response(text="ok")
    stats = request.app[STATS].setdefault(request.path, PathStats())
    stats.requests += 1
    stats.methods.append(request.method)
    stats.open += 1
    try:
        return await HANDLERS.get(last, _echo)(request, stats)
    finally:
        stats.open -= 1


async def _tag(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["X-Upstream"] = request.app[NAME]


def create_app(name: str) -> web.Application:
    app = web.Application()
    app[NAME] = name
    app[STATS] = {}
    app.on_response_prepare.append(_tag)
    app.router.add_route("*", "/{tail:.*}", _dispatch)
    return app


# -- driving it from a test ------------------------------------------------------------


@dataclass
class Upstream:
    name: str
    url: str
    port: int

    async def counters(self, path: str) -> dict[str, Any] | None:
        """What the upstream saw on ``path`` (None: no request ever arrived there)."""
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{self.url}/__counters") as resp:
                everything: dict[str, dict[str, Any]] = await resp.json()
        return everything.get(path)

    async def settled(self, path: str, timeout: float = 5.0) -> dict[str, Any] | None:
        """The counters once no request on ``path`` is in flight any more."""
        deadline = time.monotonic() + timeout
        while True:
            stats = await self.counters(path)
            if stats is None or stats["open"] == 0 or time.monotonic() > deadline:
                return stats
            await asyncio.sleep(0.05)


def start_upstream(name: str, log: Path) -> tuple[Upstream, subprocess.Popen[bytes]]:
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.blackbox.upstreams", "--port", str(port), "--name", name],
            cwd=REPO_ROOT,
            stdout=out,
            stderr=out,
            env=env,
        )
    try:
        wait_until_up(f"http://127.0.0.1:{port}/ready", proc)
    except RuntimeError:
        stop_process(proc)
        raise
    return Upstream(name, f"http://127.0.0.1:{port}", port), proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="upstream")
    args = parser.parse_args()
    # A short shutdown: a test's deliberately slow handler must not hold up the teardown.
    web.run_app(
        create_app(args.name), host=args.host, port=args.port, print=None, shutdown_timeout=0.5
    )


if __name__ == "__main__":
    main()
