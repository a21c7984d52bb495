"""A gateway on PostgreSQL starts while its database server is down, and recovers by itself.

Token checks need no database: the gateway serves what it can (health, public routes,
valid tokens) and answers 503 for accounts and ``/readyz`` until the store opens.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.blackbox.client import PASSWORD, post_json, unique_email
from tests.blackbox.conftest import Echo, launch_gateway, stop_process
from tests.pg import PgServer, started_server

pytest_plugins = ["tests.pg"]


@pytest.fixture
def stopped_server() -> Iterator[PgServer]:
    server = started_server()
    try:
        url = server.create_database()
        server.stop()
        server.test_url = url  # type: ignore[attr-defined]
        yield server
    finally:
        server.destroy()


async def test_starts_without_its_database_and_recovers_when_it_comes_back(
    tmp_path: Path, stopped_server: PgServer, echo_upstream: Echo
) -> None:
    url = stopped_server.test_url  # type: ignore[attr-defined]
    started = time.monotonic()
    gw = launch_gateway(tmp_path, echo_upstream, extra=f"database: {{url: '{url}'}}")
    try:
        assert time.monotonic() - started < 15  # serves after a bounded wait for the database
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{gw.url}/readyz") as resp:
                assert resp.status == 503
            async with s.get(f"{gw.url}/public/x") as resp:
                assert resp.status == 200  # no account needed, no database needed
            email = unique_email("outage")
            asked = time.monotonic()
            status, problem, resp = await post_json(
                s, f"{gw.url}/auth/register", {"email": email, "password": PASSWORD}
            )
            assert status == 503 and time.monotonic() - asked < 3, problem
            assert resp.headers["Content-Type"].startswith("application/problem+json")
            assert url.split("@")[0].split(":")[-1] not in gw.log()  # no password in the log

            stopped_server.start()
            deadline = time.monotonic() + 40  # the retry backs off 1, 2, 4 ... 30 s
            while True:
                async with s.get(f"{gw.url}/readyz") as resp:
                    if resp.status == 200:
                        break
                assert time.monotonic() < deadline, gw.log()[-2000:]
                await asyncio.sleep(0.2)
            status, _, _ = await post_json(
                s, f"{gw.url}/auth/register", {"email": email, "password": PASSWORD}
            )
            assert status == 201
            async with s.get(f"{gw.admin_url}/metrics") as resp:
                metrics = await resp.text()
        assert 'gateway_db_pool_connections{state="max"} 10.0' in metrics
        assert "account database unavailable" in gw.log()
        assert "Traceback" not in gw.log()
    finally:
        stop_process(gw.proc)


async def test_a_wrong_database_password_stops_the_start(
    tmp_path: Path, pg_url: str, echo_upstream: Echo
) -> None:
    wrong = re.sub(r":[^:@/]+@", ":wrong-password@", pg_url, count=1)
    assert wrong != pg_url
    with pytest.raises(RuntimeError, match="did not start"):
        launch_gateway(tmp_path, echo_upstream, extra=f"database: {{url: '{wrong}'}}")
