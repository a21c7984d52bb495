"""The access log of the real gateway process: one JSON line per request on stdout, with the
request id, route, user, status, bytes, durations and auth outcome; never a credential."""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp

from tests.blackbox.client import PASSWORD, post_json, signed_in
from tests.blackbox.conftest import Gateway


def access_lines(gw: Gateway, request_id: str, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The access lines of one request id (the line follows the response: wait for it)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = []
        for text in gw.log().splitlines():
            if text.startswith("{"):
                line = json.loads(text)  # every line that looks like JSON must be JSON
                if line.get("request_id") == request_id:
                    lines.append(line)
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


async def test_a_proxied_request_is_one_line_with_who_where_and_how_long(
    fresh_gateway,
) -> None:
    gw = fresh_gateway()
    async with aiohttp.ClientSession() as s:
        account = await signed_in(s, gw.url)
        headers = {**account.bearer, "X-Request-Id": "trace-proxied-1"}
        async with s.get(f"{gw.url}/api/things?secret=hunter2", headers=headers) as resp:
            assert resp.status == 200
            body = await resp.read()
    [line] = access_lines(gw, "trace-proxied-1")
    assert line["route"] == "api" and line["status"] == 200 and line["method"] == "GET"
    assert line["path"] == "/api/things"  # the query may hold secrets: never logged
    assert line["user_id"] == account.user_id and line["auth"] == "ok"
    assert len(body) < line["bytes"] < len(body) + 1024  # what was sent, head included
    assert 0 < line["upstream_ms"] <= line["duration_ms"]
    assert line["remote"] == "127.0.0.1" and line["time"].endswith("Z")
    log = gw.log()
    assert account.access_token not in log and account.refresh_token not in log
    assert "hunter2" not in log and PASSWORD not in log


async def test_refusals_say_why_and_own_endpoints_are_logged(fresh_gateway) -> None:
    gw = fresh_gateway()
    forged = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhZG1pbiJ9."
    async with aiohttp.ClientSession() as s:
        headers = {"Authorization": f"Bearer {forged}", "X-Request-Id": "trace-refused"}
        async with s.get(f"{gw.url}/api/things", headers=headers) as resp:
            assert resp.status == 401
        headers = {"X-Request-Id": "trace-anonymous"}
        async with s.get(f"{gw.url}/api/things", headers=headers) as resp:
            assert resp.status == 401
        status, _, _ = await post_json(
            s,
            f"{gw.url}/auth/login",
            {"email": "nobody@example.com", "password": PASSWORD},
            headers={"X-Request-Id": "trace-login"},
        )
        assert status == 401
    [refused] = access_lines(gw, "trace-refused")
    assert (refused["auth"], refused["auth_reason"], refused["status"]) == (
        "refused",
        "algorithm",
        401,
    )
    assert refused["user_id"] is None and refused["upstream_ms"] is None
    [anonymous] = access_lines(gw, "trace-anonymous")
    assert anonymous["auth"] == "refused" and anonymous["route"] == "api"
    [login] = access_lines(gw, "trace-login")
    assert login["route"] == "_gateway" and login["status"] == 401
    assert forged not in gw.log()


async def test_a_hostile_path_stays_one_escaped_line(fresh_gateway) -> None:
    gw = fresh_gateway()
    async with aiohttp.ClientSession() as s:
        url = f"{gw.url}/public/%0d%0a{{%22status%22:200}}" + "x" * 5000
        headers = {"X-Request-Id": "trace-hostile"}
        async with s.get(aiohttp.client.URL(url, encoded=True), headers=headers) as resp:
            await resp.read()
    [line] = access_lines(gw, "trace-hostile")
    assert len(line["path"]) == 1024 and "\n" not in line["path"]
