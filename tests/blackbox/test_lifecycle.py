"""The process lifecycle of the real gateway: SIGTERM drains, SIGHUP reloads (issue 5).

A scriptable upstream process holds requests open (``slow``, ``drip``) so that signals
arrive while requests are really in flight.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import jwt
import pytest

from tests.blackbox.client import signed_in
from tests.blackbox.conftest import Echo, Gateway, gateway_config, launch_gateway, stop_process
from tests.blackbox.upstreams import Upstream, start_upstream

ROUTES = """
routes:
  - name: slow
    path: /slow
    upstream: {slow}
    auth: public
  - name: api
    path: /api
    upstream: {echo}
"""

NEW_ROUTE = """
  - name: added
    path: /added
    upstream: {echo}
    auth: public
"""


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    workdir = tmp_path_factory.mktemp("lifecycle-upstream")
    started, proc = start_upstream("slow", workdir / "upstream.log")
    yield started
    stop_process(proc)


def routes(upstream: Upstream, echo: Echo, *, added: bool = False) -> str:
    text = ROUTES + (NEW_ROUTE if added else "")
    return text.replace("{slow}", upstream.url).replace("{echo}", echo.url)


@pytest.fixture
def gw(tmp_path: Path, upstream: Upstream, echo_upstream: Echo) -> Iterator[Gateway]:
    started = launch_gateway(
        tmp_path,
        echo_upstream,
        extra="server: {shutdown_grace: 10s}",
        routes=routes(upstream, echo_upstream),
    )
    yield started
    stop_process(started.proc)


def rewrite_config(gw: Gateway, routes_text: str, extra: str = "") -> None:
    port = int(gw.url.rsplit(":", 1)[1])
    admin_port = int(gw.admin_url.rsplit(":", 1)[1])
    text = gateway_config(port, admin_port, "server: {shutdown_grace: 10s}\n" + extra, routes_text)
    gw.config.write_text(text)


async def wait_for_log(gw: Gateway, needle: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while needle not in gw.log():
        assert time.monotonic() < deadline, f"{needle!r} never logged:\n{gw.log()[-3000:]}"
        await asyncio.sleep(0.05)


async def in_flight(upstream: Upstream, path: str, count: int, timeout: float = 10.0) -> None:
    """Wait until ``count`` requests on ``path`` are open at the upstream."""
    deadline = time.monotonic() + timeout
    while True:
        stats = await upstream.counters(path)
        if stats is not None and stats["open"] >= count:
            return
        assert time.monotonic() < deadline, f"only {stats} in flight at the upstream"
        await asyncio.sleep(0.02)


async def fetch(session: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    async with session.get(url) as resp:
        return resp.status, await resp.read()


def exit_code(proc: subprocess.Popen[bytes], timeout: float) -> int:
    return proc.wait(timeout)


# -- SIGTERM ------------------------------------------------------------------------------


async def test_sigterm_finishes_every_request_in_flight_then_exits_0(
    gw: Gateway, upstream: Upstream
) -> None:
    async with aiohttp.ClientSession() as s:
        slow = [
            asyncio.create_task(fetch(s, f"{gw.url}/slow/term-{i}/slow?sleep=1.5"))
            for i in range(8)
        ]
        stream = asyncio.create_task(fetch(s, f"{gw.url}/slow/term/drip?pause=1.5"))
        for i in range(8):
            await in_flight(upstream, f"/slow/term-{i}/slow", 1)
        await in_flight(upstream, "/slow/term/drip", 1)
        gw.proc.send_signal(signal.SIGTERM)
        await wait_for_log(gw, "draining in-flight requests")
        # No new connections from now on ...
        with pytest.raises(aiohttp.ClientConnectionError):
            async with aiohttp.ClientSession() as fresh:
                await fetch(fresh, f"{gw.url}/healthz")
        # ... while everything already inside completes, the stream to its last byte.
        results = await asyncio.gather(*slow)
        assert [status for status, _ in results] == [200] * 8
        assert await stream == (200, b"first\nsecond\n")
    assert await asyncio.to_thread(exit_code, gw.proc, 10) == 0
    assert "gateway stopped" in gw.log()


async def test_requests_longer_than_the_grace_are_cut_and_the_process_still_exits(
    tmp_path: Path, upstream: Upstream, echo_upstream: Echo
) -> None:
    gw = launch_gateway(
        tmp_path,
        echo_upstream,
        extra="server: {shutdown_grace: 1s}",
        routes=routes(upstream, echo_upstream),
    )
    try:
        async with aiohttp.ClientSession() as s:
            stuck = asyncio.create_task(fetch(s, f"{gw.url}/slow/grace/slow?sleep=30"))
            await in_flight(upstream, "/slow/grace/slow", 1)
            started = time.monotonic()
            gw.proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(exit_code, gw.proc, 15) == 0
            assert time.monotonic() - started < 8
            with pytest.raises(aiohttp.ClientError):
                await stuck
    finally:
        stop_process(gw.proc)


# -- SIGHUP -------------------------------------------------------------------------------


async def test_sighup_swaps_in_a_new_config_while_old_requests_finish(
    gw: Gateway, upstream: Upstream, echo_upstream: Echo
) -> None:
    async with aiohttp.ClientSession() as s:
        assert (await fetch(s, f"{gw.url}/added/x"))[0] == 404
        old = asyncio.create_task(fetch(s, f"{gw.url}/slow/hup/slow?sleep=1.5"))
        await in_flight(upstream, "/slow/hup/slow", 1)
        rewrite_config(gw, routes(upstream, echo_upstream, added=True))
        gw.proc.send_signal(signal.SIGHUP)
        await wait_for_log(gw, "configuration reloaded")
        status, body = await fetch(s, f"{gw.url}/added/x")
        assert status == 200 and json.loads(body)["path"] == "/added/x"
        assert (await old)[0] == 200
        status, _ = await fetch(s, f"{gw.url}/readyz")
        assert status == 200
    assert gw.proc.poll() is None


async def test_an_invalid_config_is_refused_and_the_old_one_keeps_serving(
    gw: Gateway, upstream: Upstream, echo_upstream: Echo
) -> None:
    good = gw.config.read_text()
    gw.config.write_text(good.replace("  - name: api\n", "  - name: api\n    colour: blue\n"))
    gw.proc.send_signal(signal.SIGHUP)
    await wait_for_log(gw, "the running configuration stays")
    line = next(x for x in gw.log().splitlines() if "reload refused: " in x and "colour" in x)
    assert f"{gw.config}:" in line and "routes[1].colour" in line  # FILE:LINE: path: message
    async with aiohttp.ClientSession() as s:
        assert (await fetch(s, f"{gw.url}/slow/after/echo"))[0] == 200
        assert (await fetch(s, f"{gw.url}/readyz"))[0] == 200
    assert gw.proc.poll() is None


async def test_sighup_picks_up_rotated_keys(gw: Gateway) -> None:
    async with aiohttp.ClientSession() as s:
        before = await signed_in(s, gw.url)
        rotate = subprocess.run(
            [sys.executable, "-m", "gateway", "keys", "rotate", "-c", str(gw.config)],
            cwd=gw.workdir,
            capture_output=True,
            timeout=30,
            env=dict(os.environ),
        )
        assert rotate.returncode == 0, rotate.stderr
        gw.proc.send_signal(signal.SIGHUP)
        await wait_for_log(gw, "configuration reloaded")
        async with s.get(f"{gw.url}/.well-known/jwks.json") as resp:
            kids = [key["kid"] for key in (await resp.json())["keys"]]
        after = await signed_in(s, gw.url)
        for account in (before, after):  # the old key still verifies what it signed
            async with s.get(f"{gw.url}/api/x", headers=account.bearer) as resp:
                assert resp.status == 200
    assert len(kids) == 2
    new_kid = header_kid(after.access_token)
    assert new_kid in kids and new_kid != header_kid(before.access_token)


def header_kid(token: str) -> str:
    return str(jwt.get_unverified_header(token)["kid"])


async def test_sighup_under_load_drops_no_request(
    gw: Gateway, upstream: Upstream, echo_upstream: Echo
) -> None:
    statuses: list[int] = []
    stop_at = time.monotonic() + 20  # a bound, never reached in a healthy run

    async def client(session: aiohttp.ClientSession, n: int) -> None:
        for i in range(40):
            assert time.monotonic() < stop_at
            status, _ = await fetch(session, f"{gw.url}/slow/load-{n}-{i}/echo")
            statuses.append(status)

    async def reloader() -> None:
        for round_ in range(4):
            await asyncio.sleep(0.15)
            rewrite_config(gw, routes(upstream, echo_upstream, added=round_ % 2 == 0))
            gw.proc.send_signal(signal.SIGHUP)

    async with aiohttp.ClientSession() as s:
        await asyncio.gather(reloader(), *(client(s, n) for n in range(8)))
    await wait_for_log(gw, "configuration reloaded")
    assert len(statuses) == 320 and set(statuses) == {200}
    assert gw.log().count("configuration reloaded") >= 1


async def test_drain_delay_keeps_accepting_with_readyz_503_and_connection_close(
    tmp_path: Path, upstream: Upstream, echo_upstream: Echo
) -> None:
    gw = launch_gateway(
        tmp_path,
        echo_upstream,
        extra="server: {shutdown_grace: 10s, drain_delay: 2s}",
        routes=routes(upstream, echo_upstream),
    )
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{gw.url}/readyz") as resp:
                assert resp.status == 200 and resp.headers.get("Connection") != "close"
            gw.proc.send_signal(signal.SIGTERM)
            await wait_for_log(gw, "accepting for 2.0s more")
            # A load balancer's next check and requests still get answers, told to go away.
            async with s.get(f"{gw.url}/readyz") as resp:
                assert resp.status == 503 and resp.headers["Connection"] == "close"
            async with s.get(f"{gw.url}/slow/drain/echo") as resp:
                assert resp.status == 200 and resp.headers["Connection"] == "close"
        await wait_for_log(gw, "draining in-flight requests")
        with pytest.raises(aiohttp.ClientConnectionError):
            async with aiohttp.ClientSession() as fresh:
                await fetch(fresh, f"{gw.url}/healthz")
        assert await asyncio.to_thread(exit_code, gw.proc, 15) == 0
    finally:
        stop_process(gw.proc)
