"""``server.workers: N``: N gateway processes on one port under a supervisor (issue 5).

The supervisor is the real ``gateway serve`` process; its workers are found through /proc.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.blackbox.client import signed_in
from tests.blackbox.conftest import Echo, Gateway, launch_gateway, stop_process


def children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # pid (comm) state ppid ...: comm may hold spaces, so split after its ")".
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


async def until(condition, timeout: float = 15.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


def access_pids(gw: Gateway, prefix: str) -> list[int]:
    pids = []
    for text in gw.log().splitlines():
        if text.startswith("{"):
            line = json.loads(text)
            if str(line.get("request_id", "")).startswith(prefix):
                pids.append(line["pid"])
    return pids


@pytest.fixture
def gw(tmp_path: Path, echo_upstream: Echo) -> Iterator[Gateway]:
    started = launch_gateway(tmp_path, echo_upstream, server_extra="workers: 2")
    yield started
    stop_process(started.proc)


async def test_two_workers_share_the_port_and_the_work(gw: Gateway) -> None:
    await until(lambda: len(children(gw.proc.pid)) == 2, what="two workers")
    workers = children(gw.proc.pid)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        account = await signed_in(s, gw.url)
        # A worker starts listening a moment after the first one: ask until both answered.
        for i in range(400):
            headers = {**account.bearer, "X-Request-Id": f"spread-{i}"}
            async with s.get(f"{gw.url}/api/x", headers=headers) as resp:
                assert resp.status == 200
            if i % 20 == 19 and set(access_pids(gw, "spread-")) == workers:
                break
    assert set(access_pids(gw, "spread-")) == workers  # both served, nobody else did


async def test_admin_metrics_add_up_every_worker(gw: Gateway) -> None:
    """Workers add their observations to their metric files every half second (not on every
    request): the supervisor's sum shows all 40 within a second, never more."""
    await until(lambda: len(children(gw.proc.pid)) == 2, what="two workers")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        for _ in range(40):
            async with s.get(f"{gw.url}/public/x") as resp:
                assert resp.status == 200
        done = time.monotonic()
        counted: list[str] = []
        while time.monotonic() < done + 3:
            async with s.get(f"{gw.admin_url}/metrics") as resp:
                assert resp.status == 200
                text = await resp.text()
            counted = [x for x in text.splitlines() if x.startswith("gateway_requests_total{")]
            if 'gateway_requests_total{route="public",status="200"} 40.0' in counted:
                break
            await asyncio.sleep(0.1)
    assert 'gateway_requests_total{route="public",status="200"} 40.0' in counted
    assert time.monotonic() - done < 1.5


async def test_a_killed_worker_is_replaced_and_service_goes_on(gw: Gateway) -> None:
    await until(lambda: len(children(gw.proc.pid)) == 2, what="two workers")
    victim = min(children(gw.proc.pid))
    os.kill(victim, signal.SIGKILL)
    await until(
        lambda: len(children(gw.proc.pid) - {victim}) == 2 and not alive(victim),
        what="a replacement worker",
    )
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        for _ in range(20):
            async with s.get(f"{gw.url}/healthz") as resp:
                assert resp.status == 200
    assert "exited with -9; starting it again" in gw.log()


async def test_sigterm_stops_every_worker_and_exits_0(gw: Gateway) -> None:
    await until(lambda: len(children(gw.proc.pid)) == 2, what="two workers")
    workers = children(gw.proc.pid)
    gw.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(gw.proc.wait, 20) == 0
    assert not any(alive(pid) for pid in workers)


async def test_workers_drain_when_the_supervisor_is_killed(gw: Gateway) -> None:
    await until(lambda: len(children(gw.proc.pid)) == 2, what="two workers")
    workers = children(gw.proc.pid)
    gw.proc.kill()
    gw.proc.wait()
    await until(lambda: not any(alive(pid) for pid in workers), timeout=10, what="orphans gone")


async def test_sighup_reaches_the_workers_only_with_a_valid_config(gw: Gateway) -> None:
    await until(lambda: gw.log().count("gateway listening") == 2, what="two workers listening")
    good = gw.config.read_text()
    gw.config.write_text(good + "bogus_section: 1\n")
    gw.proc.send_signal(signal.SIGHUP)
    await until(lambda: "the running configuration stays" in gw.log(), what="refusal")
    assert "bogus_section" in gw.log()
    assert "configuration reloaded" not in gw.log()  # the workers never saw it
    gw.config.write_text(
        good.replace("  - name: public\n    path: /public\n", "  - name: public\n    path: /open\n")
    )
    gw.proc.send_signal(signal.SIGHUP)
    await until(lambda: gw.log().count("configuration reloaded") == 2, what="both reloaded")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        for _ in range(10):
            async with s.get(f"{gw.url}/open/x") as resp:
                assert resp.status == 200
