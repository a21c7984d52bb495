"""A real HAProxy in front of gateway replicas, for black-box tests.

HAProxy runs in the foreground (``haproxy -db -f cfg``) as a child of the test, with its
config and log in the test's own directory and both listeners (traffic, stats) on free
loopback ports. The config is the production shape in miniature: round robin, a replica
takes traffic only while ``GET /readyz`` answers 200, checks every 500 ms (down after 2
failures, up after 1 success) so tests wait little for HAProxy to notice.

Retries are the safe kind only: ``retry-on conn-failure`` with ``option redispatch``, i.e. a
request whose connection to a replica could not be established (refused after a kill or
after a draining replica closed its listener) goes to another replica. ``empty-response`` is
deliberately absent: HAProxy documents it as also covering "a server crash ... while
processing the request", i.e. a request that reached a replica; replaying that one would run
a POST twice (a registration answered 409 for its own success, a refresh token presented twice
and its whole family revoked).

Each request's ``X-Request-Id`` is captured in the log line next to the replica that served
it, so a test can tell which requests reached which replica (``served_by``).
"""

from __future__ import annotations

import csv
import io
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.blackbox.conftest import stop_process_group
from tests.ports import free_port

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
START_TIMEOUT = 15.0  # seconds until the listener accepts and every replica is UP
STOP_TIMEOUT = 10.0

CONFIG = """\
global
    log stdout format raw local0 info
    maxconn 1024

defaults
    mode http
    log global
    option httplog
    option dontlognull
    # A connection that could not be made is retried, on another replica (redispatch):
    # never a request that reached one (see the module docstring).
    option redispatch 1
    retries 3
    retry-on conn-failure
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    timeout http-request 10s
    timeout http-keep-alive 5s
    timeout queue 5s

frontend public
    bind 127.0.0.1:{port}
    capture request header X-Request-Id len 64
    default_backend gateways

backend gateways
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter 500ms fall 2 rise 1
{servers}

frontend stats
    bind 127.0.0.1:{stats_port}
    stats enable
    stats uri /stats
    no log
"""

# One httplog line: "... public gateways/gw2 0/0/0/1/1 201 ... {load-17} "POST /x HTTP/1.1""
LOG_LINE = re.compile(r" public gateways/(?P<server>\S+) .*? \{(?P<rid>[^}]*)\} \"")


@dataclass
class HAProxy:
    url: str
    stats_url: str
    workdir: Path
    proc: subprocess.Popen[bytes]

    def log(self) -> str:
        path = self.workdir / "haproxy.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def states(self) -> dict[str, str]:
        """Each replica's state as HAProxy sees it: ``UP``, ``DOWN``, ``UP 1/2``..."""
        with urllib.request.urlopen(self.stats_url + ";csv", timeout=2) as resp:
            text = resp.read().decode()
        rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
        return {
            row["svname"]: row["status"]
            for row in rows
            if row["pxname"] == "gateways" and row["svname"] not in ("FRONTEND", "BACKEND")
        }

    def wait_state(self, server: str, state: str, timeout: float = 5.0) -> float:
        """Seconds until ``server`` is in ``state`` (``UP``/``DOWN``); fails after
        ``timeout``."""
        started = time.monotonic()
        deadline = started + timeout
        while True:
            current = self.states().get(server)
            if current == state:
                return time.monotonic() - started
            if time.monotonic() > deadline:
                raise AssertionError(f"{server} is {current!r}, not {state} after {timeout}s")
            time.sleep(0.05)

    def served_by(self) -> dict[str, str]:
        """Request id -> the replica that served it, from the log lines so far."""
        return {m["rid"]: m["server"] for m in LOG_LINE.finditer(self.log()) if m["rid"]}


def write_config(workdir: Path, port: int, stats_port: int, replicas: list[str]) -> Path:
    """``replicas`` are ``host:port``; they are named gw1, gw2... in order."""
    servers = "\n".join(
        f"    server gw{i} {address} check" for i, address in enumerate(replicas, start=1)
    )
    path = workdir / "haproxy.cfg"
    path.write_text(CONFIG.format(port=port, stats_port=stats_port, servers=servers))
    return path


def start_haproxy(workdir: Path, replicas: list[str], *, port: int | None = None) -> HAProxy:
    """Start HAProxy before ``replicas`` (``host:port``) on ``port`` (free if None); return
    once it accepts connections and has seen every replica UP."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    stats_port = free_port()
    config = write_config(workdir, port, stats_port, replicas)
    check = subprocess.run([HAPROXY, "-c", "-f", str(config)], capture_output=True, timeout=10)
    if check.returncode != 0:
        raise RuntimeError(f"haproxy -c refused the config:\n{check.stdout!r}\n{check.stderr!r}")
    with open(workdir / "haproxy.log", "ab") as out:
        proc = subprocess.Popen(
            [HAPROXY, "-db", "-f", str(config)],
            cwd=workdir,
            stdout=out,
            stderr=out,
            start_new_session=True,  # stop_haproxy can end the whole group if it hangs
        )
    proxy = HAProxy(
        f"http://127.0.0.1:{port}", f"http://127.0.0.1:{stats_port}/stats", workdir, proc
    )
    try:
        _wait_ready(proxy, len(replicas))
    except (RuntimeError, AssertionError, OSError) as err:
        stop_haproxy(proxy)
        raise RuntimeError(f"haproxy did not start: {err}\n{proxy.log()}") from None
    return proxy


def _wait_ready(proxy: HAProxy, count: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        if proxy.proc.poll() is not None:
            raise RuntimeError(f"exited with {proxy.proc.returncode}")
        try:
            states = proxy.states()
        except OSError:
            states = {}
        if len(states) == count and all(s == "UP" for s in states.values()):
            return
        time.sleep(0.05)
    raise RuntimeError(f"replicas not all UP within {START_TIMEOUT}s: {states}")


def stop_haproxy(proxy: HAProxy) -> None:
    """SIGTERM (HAProxy's hard stop); SIGKILL to its process group if it lingers."""
    stop_process_group(proxy.proc, STOP_TIMEOUT)


@contextmanager
def running_haproxy(
    workdir: Path, replicas: list[str], *, port: int | None = None
) -> Iterator[HAProxy]:
    proxy = start_haproxy(workdir, replicas, port=port)
    try:
        yield proxy
    finally:
        stop_haproxy(proxy)
