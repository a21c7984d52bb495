"""Black-box fixtures: the real gateway and a real echo upstream, each its own process.

The echo upstream answers with exactly what it received (raw path, every header copy, body),
so a test asserts on what reached the upstream, and on what did not.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.blackbox.client import assert_no_leak
from tests.ports import free_port


@pytest.fixture(autouse=True)
def no_leaks_in_any_response(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every body the gateway writes, read by any test here, is checked for leaks (§7)."""
    original = aiohttp.ClientResponse.read

    async def read_and_check(self: aiohttp.ClientResponse) -> bytes:
        body = await original(self)
        if "X-Upstream" not in self.headers:
            assert_no_leak(body, f"{self.method} {self.url}")
        return body

    monkeypatch.setattr(aiohttp.ClientResponse, "read", read_and_check)


def wait_until_up(url: str, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


def start_process(args: list[str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "gateway", *args], cwd=cwd, stdout=out, stderr=out, env=env
        )


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def stop_process_group(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM to a server started in its own process group; SIGKILL to the whole group if
    it lingers (the leader is not reaped yet, so the group id is still ours)."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout)


@dataclass
class Echo:
    url: str
    port: int


@pytest.fixture(scope="session")
def echo_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Echo]:
    workdir = tmp_path_factory.mktemp("echo")
    port = free_port()
    proc = start_process(["echo", "--port", str(port)], workdir, workdir / "echo.log")
    try:
        wait_until_up(f"http://127.0.0.1:{port}/ready", proc)
        yield Echo(f"http://127.0.0.1:{port}", port)
    finally:
        stop_process(proc)


ROUTES = """
routes:
  - name: api
    path: /api
    upstream: {echo}
  - name: admin
    path: /admin
    upstream: {echo}
    roles: [admin]
  - name: public
    path: /public
    upstream: {echo}
    auth: public
  - name: maybe
    path: /maybe
    upstream: {echo}
    auth: optional
  - name: stripped
    path: /strip
    upstream: {echo}/base
    strip_prefix: true
  - name: readonly
    path: /ro
    methods: [GET]
    upstream: {echo}
"""


@dataclass
class Gateway:
    url: str
    admin_url: str
    workdir: Path
    config: Path
    proc: subprocess.Popen[bytes]

    def log(self) -> str:
        return (self.workdir / "gateway.log").read_text(errors="replace")


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def gateway_config(
    port: int, admin_port: int, extra: str, routes: str, server_extra: str = ""
) -> str:
    """The test config: loopback defaults, deep-merged with ``extra`` (YAML text of any
    sections) and ``server_extra`` (YAML text of more ``server:`` keys), then ``routes``."""
    base: dict[str, Any] = {
        "server": {
            "host": "127.0.0.1",
            "port": port,
            "public_url": f"http://127.0.0.1:{port}",
            "admin": {"host": "127.0.0.1", "port": admin_port},
        },
        "database": {"url": "sqlite:///data/gateway.db"},
        "tokens": {"keys_dir": "data/keys"},
        "accounts": {"bcrypt_rounds": 4},
    }
    merged = deep_merge(base, yaml.safe_load(textwrap.dedent(extra)) or {})
    merged["server"].update(yaml.safe_load(textwrap.dedent(server_extra)) or {})
    return yaml.safe_dump(merged, sort_keys=False) + textwrap.dedent(routes)


def launch_gateway(
    workdir: Path,
    echo: Echo,
    *,
    extra: str = "",
    routes: str = ROUTES,
    server_extra: str = "",
) -> Gateway:
    port, admin_port = free_port(), free_port()
    text = gateway_config(port, admin_port, extra, routes.format(echo=echo.url), server_extra)
    config = workdir / "gateway.yaml"
    config.write_text(text)
    proc = start_process(["serve", "-c", str(config)], workdir, workdir / "gateway.log")
    gw = Gateway(
        f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}", workdir, config, proc
    )
    try:
        wait_until_up(gw.url + "/healthz", proc)
    except RuntimeError:
        stop_process(proc)
        raise RuntimeError("gateway did not start:\n" + gw.log()) from None
    return gw


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory, echo_upstream: Echo) -> Iterator[Gateway]:
    """One gateway for the read-mostly tests; generous rate limits so tests don't collide."""
    workdir = tmp_path_factory.mktemp("gateway")
    gw = launch_gateway(
        workdir,
        echo_upstream,
        extra="""
        accounts:
          bcrypt_rounds: 4
          login_rate_limit: 1000/min
          register_rate_limit: 1000/min
        """,
    )
    yield gw
    stop_process(gw.proc)


@pytest.fixture
def fresh_gateway(tmp_path: Path, echo_upstream: Echo) -> Iterator[object]:
    """A factory for a gateway of one test's own (for limits, closed registration...)."""
    started: list[Gateway] = []

    def start(extra: str = "", routes: str = ROUTES) -> Gateway:
        workdir = tmp_path / f"gw{len(started)}"
        workdir.mkdir()
        gw = launch_gateway(workdir, echo_upstream, extra=extra, routes=routes)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        stop_process(gw.proc)
