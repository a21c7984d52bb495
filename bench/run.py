"""The benchmark: the gateway against HAProxy and the raw upstream, in one command (issue 6).

Sets up, on 127.0.0.1 only, every target in front of one cheap upstream (nginx answering a
fixed 24-byte JSON body), drives each with wrk, and prints ONE table: requests/s, p50, p99,
the proxy's CPU microseconds per request and its RSS per worker, every figure also as a ratio
to the upstream direct and to HAProxy ``jwt_verify`` measured in the same run.

Targets (all started once, idle while another is measured):

- ``direct``: wrk straight to the upstream nginx;
- ``haproxy``: HAProxy 2.6, plain proxying;
- ``haproxy-jwt``: HAProxy verifying the gateway's RS256 tokens (alg pinned, ``exp`` checked,
  ``sub`` injected as ``X-User-Id``) with the gateway's public key;
- ``gw-1``: the gateway, one worker, pinned to one core;
- ``gw-all``: the gateway with ``server.workers: 0`` (one per CPU), not pinned;
- ``node``: the tutorial's Node/Express ``GET /profile`` (njwt HS256 and a SQLite row, no
  proxying; ``bench/node/``), pinned, in ``one-token`` only: the yardstick of "2.5 x Node".

Scenarios: ``one-token`` (one token repeated), ``tokens-10k`` (10,000 distinct valid tokens
rotated), ``post-64k`` (a 64 KiB POST body), ``conns-1000`` (1,000 keep-alive connections),
``login-storm`` (the gateway's proxied p99 with and without a bcrypt login storm beside it).

Pinning, on a machine with two CPUs or more: HAProxy and ``gw-1`` on the first CPU, wrk and
the upstream on the second, so that "per core" means the proxy alone on its core. Every load is
bounded in time (wrk ``-d``, with a hard timeout on top), every wait is bounded, and every
process is started in a session of its own and killed, with its whole group, on any exit.

This is a measurement, not a test: it exits 2 when a measurement saw errors (socket errors or
non-2xx answers), 1 when the setup failed, 0 otherwise.

    python bench/run.py [--quick] [--duration 10s] [--scenarios one-token,tokens-10k]
                        [--targets direct,gw-1] [--out results.json] [--keep]
"""

from __future__ import annotations

import argparse
import atexit
import base64
import concurrent.futures
import json
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

HOST = "127.0.0.1"  # loopback only, always
BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
CONFIGS = BENCH / "configs"
WRK = shutil.which("wrk") or "/usr/bin/wrk"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
TASKSET = shutil.which("taskset") or "/usr/bin/taskset"
NODE = shutil.which("node")
NPM = shutil.which("npm")
NODE_APP = BENCH / "node"  # the tutorial's server and its pinned npm dependencies
NPM_TIMEOUT = 600.0  # sqlite3 may compile from source on a machine without its prebuilt

ROUTE = "/api/bench"  # the gateway's route is /api; the other targets answer any path
ISSUER = "http://127.0.0.1/bench"
AUDIENCE = "gateway"
TOKEN_TTL = 3 * 3600  # outlives any run
PASSWORD = "bench-password-0123"
STORM_USERS = 8
STORM_CONNECTIONS = 8
BODY_BYTES = 64 * 1024
WANT_NOFILE = 65536  # 1,000 client connections + as many upstream ones, per process
MAX_CONNECTIONS = 4096  # nginx worker_connections, HAProxy maxconn: 1,000 clients + upstreams
WRK_TIMEOUT = "10s"  # a slower answer is a wrk "timeout" error, not a latency sample
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
RESULT_LINE = re.compile(r"^BENCH-RESULT (\{.*\})$", re.MULTILINE)
PLACEHOLDER = re.compile(r"\{\{[A-Z_]+\}\}")


# -- what is measured ---------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    kind: str  # "nginx" | "haproxy" | "gateway" | "node"
    authenticates: bool  # verifies the run's RS256 tokens and injects their sub
    pinned: bool  # on the proxy's own core
    scenarios: tuple[str, ...] = ()  # only these; () for every scenario


TARGETS = {
    t.name: t
    for t in (
        Target("direct", "nginx", authenticates=False, pinned=False),
        Target("haproxy", "haproxy", authenticates=False, pinned=True),
        Target("haproxy-jwt", "haproxy", authenticates=True, pinned=True),
        Target("gw-1", "gateway", authenticates=True, pinned=True),
        Target("gw-all", "gateway", authenticates=True, pinned=False),
        Target("node", "node", authenticates=False, pinned=True, scenarios=("one-token",)),
    )
}
BASELINES = ("direct", "haproxy-jwt")  # every figure is also given as a ratio to these


@dataclass(frozen=True)
class Scenario:
    name: str
    script: str | None = None  # a Lua file in bench/, run before report.lua
    connections: int | None = None  # None: --connections
    gateway_only: bool = False
    about: str = ""


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("one-token", about="GET with one token repeated"),
        Scenario("tokens-10k", "tokens.lua", about="GET, N distinct valid tokens rotated"),
        Scenario("post-64k", "post.lua", about="POST with a 64 KiB body"),
        Scenario("conns-1000", connections=1000, about="GET, 1,000 keep-alive connections"),
        Scenario(
            "login-storm",
            gateway_only=True,
            about="GET with one token, alone and beside a bcrypt login storm",
        ),
        Scenario(
            "soak",
            gateway_only=True,
            about="GET with one token, laps until --soak-requests; RSS after each lap",
        ),
    )
}
DEFAULT_SCENARIOS = [name for name in SCENARIOS if name != "soak"]  # soak: minutes per target


@dataclass
class Measurement:
    scenario: str
    target: str
    connections: int
    seconds: float
    requests: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    cpu_us_per_request: float | None
    rss_mb_per_worker: list[float]
    errors: dict[str, int]
    ratios: dict[str, dict[str, float | None]] = field(default_factory=dict)
    note: str = ""
    load_cores: float | None = None  # CPUs that wrk and the upstream used meanwhile
    # Each worker's event loop thread over the run: the share of the time it ran, and the
    # share it was ready to run but waited for a CPU (the kernel's schedstat).
    loop_running: list[float] = field(default_factory=list)
    loop_waiting: list[float] = field(default_factory=list)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


@dataclass
class Options:
    duration: float
    warmup: float
    connections: int
    scenarios: list[str]
    targets: list[str]
    tokens: int
    out: Path
    keep: bool
    soak_requests: int = 1_000_000
    targets_chosen: bool = False  # --targets given: a target that cannot run is an error


# -- processes ----------------------------------------------------------------------------


@dataclass
class Process:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Processes:
    """Every child of the run, each in a session (process group) of its own, so that stopping
    one also ends what it started (nginx's and the gateway's workers)."""

    def __init__(self) -> None:
        self.running: list[Process] = []

    def start(
        self,
        name: str,
        args: Sequence[str],
        workdir: Path,
        cpus: str | None = None,
        extra_env: Mapping[str, str] | None = None,
    ) -> Process:
        command = [TASKSET, "-c", cpus, *args] if cpus else list(args)
        log = workdir / f"{name}.log"
        env = {**os.environ, "PYTHONPATH": str(REPO), **(extra_env or {})}
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                command,
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        process = Process(name, proc, log)
        self.running.append(process)
        return process

    def check_alive(self) -> None:
        for p in self.running:
            if p.proc.poll() is not None:
                raise SetupError(f"{p.name} exited with {p.proc.returncode}:\n{p.tail()}")

    def stop_all(self) -> None:
        for p in reversed(self.running):
            stop(p.proc)
        self.running.clear()


def stop(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM, a bounded wait, then SIGKILL to the whole group (workers included)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the session is ours: its id is the leader's pid
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        pass


class SetupError(RuntimeError):
    """The run could not be set up (a process did not start, a sanity check failed)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def render(template: Path, values: Mapping[str, object]) -> str:
    text = template.read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", str(value))
    left = PLACEHOLDER.findall(text)
    if left:
        raise SetupError(f"{template}: placeholders without a value: {sorted(set(left))}")
    return text


def raise_nofile() -> int:
    """Raise the soft open-files limit (inherited by every child) for 1,000 connections."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = WANT_NOFILE if hard == resource.RLIM_INFINITY else min(WANT_NOFILE, hard)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return soft
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return want


def cpu_layout() -> tuple[str | None, str | None]:
    """(the proxy's CPU, the load's CPU): the first two CPUs we may use; none on one CPU."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return str(cpus[0]), str(cpus[1])


# -- /proc: CPU time and memory of a process tree -----------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int(_stat_fields(int(entry.name))[1]) == pid:
                found.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue  # exited meanwhile
    return sorted(found)


def process_tree(pid: int) -> list[int]:
    tree: list[int] = []
    todo = [pid]
    while todo and len(tree) < 1000:  # bounded: a proxy has a handful of processes
        current = todo.pop()
        tree.append(current)
        todo.extend(children(current))
    return tree


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of ``pids`` (all their threads: bcrypt's pool included)."""
    ticks = 0
    for pid in pids:
        try:
            fields = _stat_fields(pid)
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # stat fields 14 and 15
    return ticks / CLOCK_TICKS


def schedstat_seconds(pid: int) -> tuple[float, float]:
    """The main thread of ``pid`` (a worker's event loop): seconds it ran on a CPU and seconds
    it was runnable but waited for one (``/proc/<pid>/schedstat``)."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            running, waiting, _ = f.read().split()
    except (OSError, ValueError):
        return 0.0, 0.0
    return int(running) / 1e9, int(waiting) / 1e9


def reaped_children_cpu_seconds() -> float:
    """utime + stime of this process's children that have been waited for: measured around
    one wrk run, that wrk's CPU (it is reaped when it ends)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_idle(pids: Sequence[int], limit: float = 15.0, interval: float = 0.2) -> float:
    """Wait (at most ``limit`` s) until ``pids`` use under 10 % of a CPU: a proxy still
    working off a backlog (requests of a wrk that has quit) would steal the next measurement's
    CPU or be billed to it. Returns the seconds waited."""
    started = time.monotonic()
    if not pids:
        return 0.0
    last = cpu_seconds(pids)
    for _ in range(int(limit / interval)):
        time.sleep(interval)
        now = cpu_seconds(pids)
        if now - last < 0.1 * interval:
            break
        last = now
    return time.monotonic() - started


def rss_peaks_while(proc: subprocess.Popen[str], pids: list[int], limit: float) -> list[float]:
    """The highest RSS of each of ``pids`` seen while ``proc`` (the load) runs: the memory
    *at* the load, not what is left after it."""
    peaks = [0.0] * len(pids)
    deadline = time.monotonic() + limit
    while proc.poll() is None and time.monotonic() < deadline:
        peaks = [max(peak, rss_mb(pid)) for peak, pid in zip(peaks, pids, strict=True)]
        time.sleep(0.2)
    return peaks


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0


def worker_pids(pid: int) -> list[int]:
    """The processes that serve: a supervisor's or nginx master's children, else itself."""
    return children(pid) or [pid]


# -- keys and tokens ----------------------------------------------------------------------


@dataclass(frozen=True)
class Keys:
    kid: str
    private_pem: bytes
    public_pem_path: Path


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(now: int, ttl: int = TOKEN_TTL, sub: str | None = None) -> dict[str, Any]:
    """An access token's claims, as the gateway issues them (CONTRACT §5)."""
    sub = sub or str(uuid.uuid4())
    return {
        "iss": ISSUER,
        "sub": sub,
        "aud": AUDIENCE,
        "iat": now,
        "nbf": now,
        "exp": now + ttl,
        "jti": uuid.uuid4().hex,
        "email": f"u{sub[:8]}@bench.example.com",
        "name": "Bench User",
        "roles": ["user"],
    }


_MINT_KEY: Any = None


def _mint_init(private_pem: bytes) -> None:
    global _MINT_KEY
    _MINT_KEY = serialization.load_pem_private_key(private_pem, password=None)


def _mint_chunk(args: tuple[str, int, int]) -> list[str]:
    kid, now, count = args
    return [
        jwt.encode(claims(now), _MINT_KEY, algorithm="RS256", headers={"kid": kid, "typ": "JWT"})
        for _ in range(count)
    ]


def mint(keys: Keys, count: int) -> list[str]:
    """``count`` distinct valid tokens (distinct ``sub`` and ``jti``), signed on every CPU:
    an RS256 signature costs about 1 ms."""
    now = int(time.time())
    chunks = [(keys.kid, now, min(500, count - i)) for i in range(0, count, 500)]
    workers = max(1, len(os.sched_getaffinity(0)))
    with concurrent.futures.ProcessPoolExecutor(
        workers, initializer=_mint_init, initargs=(keys.private_pem,)
    ) as pool:
        return [token for chunk in pool.map(_mint_chunk, chunks) for token in chunk]


def sign(keys: Keys, payload: Mapping[str, Any], header: Mapping[str, Any] | None = None) -> str:
    key = serialization.load_pem_private_key(keys.private_pem, password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise SetupError("the signing key is not an RSA key")
    headers = {"kid": keys.kid, "typ": "JWT", **(header or {})}
    return jwt.encode(dict(payload), key, algorithm="RS256", headers=headers)


def create_keys(config: Path, workdir: Path) -> Keys:
    """The gateway makes its own signing key (``gateway keys rotate``); the public half is
    exported as a public-key PEM for HAProxy."""
    run = subprocess.run(
        [sys.executable, "-m", "gateway", "keys", "rotate", "-c", str(config)],
        cwd=workdir,
        capture_output=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    if run.returncode != 0:
        raise SetupError(f"gateway keys rotate failed: {run.stderr.decode(errors='replace')}")
    keys_dir = workdir / "keys"
    files = sorted(keys_dir.glob("*.pem"))
    if len(files) != 1:
        raise SetupError(f"expected one key in {keys_dir}, found {[f.name for f in files]}")
    private_pem = files[0].read_bytes()
    private = serialization.load_pem_private_key(private_pem, password=None)
    if not isinstance(private, rsa.RSAPrivateKey):
        raise SetupError(f"{files[0]} is not an RSA key")
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    public_path = workdir / "public.pem"
    public_path.write_bytes(public_pem)
    return Keys(files[0].stem, private_pem, public_path)


# -- HTTP probes (setup and sanity checks, never load) ------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def http(
    url: str,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 10.0,
) -> Answer:
    request = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return Answer(resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read())
    except urllib.error.HTTPError as err:
        return Answer(err.code, {k.lower(): v for k, v in err.headers.items()}, err.read())


def wait_http(url: str, process: Process, accept: Callable[[int], bool]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    last = ""
    for _ in range(int(START_TIMEOUT / 0.05) + 1):  # bounded in count as well as time
        if process.proc.poll() is not None:
            raise SetupError(
                f"{process.name} exited with {process.proc.returncode}:\n{process.tail()}"
            )
        try:
            status = http(url, timeout=2).status
            if accept(status):
                return
            last = f"HTTP {status}"
        except OSError as err:
            last = str(err)
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    raise SetupError(
        f"{process.name}: {url} not up within {START_TIMEOUT:.0f} s ({last})\n{process.tail()}"
    )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# -- the run's servers --------------------------------------------------------------------


@dataclass
class Running:
    target: Target
    url: str
    process: Process


class Lab:
    """The upstream and every selected target, started once for the whole run."""

    def __init__(self, opts: Options, workdir: Path, procs: Processes) -> None:
        self.opts = opts
        self.workdir = workdir
        self.procs = procs
        self.proxy_cpu, self.load_cpu = cpu_layout()
        self.upstream_port = free_port()
        self.upstream: Process | None = None
        self.targets: dict[str, Running] = {}
        self.keys: Keys | None = None
        self.token = ""
        self.token_sub = ""
        self.database = workdir / "gateway.db"
        self.node_secret = secrets.token_urlsafe(32)  # HS256, as the tutorial signs
        self.node_token = ""

    def start(self) -> None:
        self.upstream = self._start_nginx()
        gateway_config = self._gateway_config("gw-keys", 1, free_port())
        self.keys = create_keys(gateway_config, self.workdir)
        self.token_sub = str(uuid.uuid4())
        self.token = sign(self.keys, claims(int(time.time()), sub=self.token_sub))
        self.node_token = jwt.encode(
            claims(int(time.time()), sub=self.token_sub), self.node_secret, algorithm="HS256"
        )
        for name in self.opts.targets:
            self.targets[name] = self._start_target(TARGETS[name])

    def _dir(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _start_nginx(self) -> Process:
        work = self._dir("upstream")
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (work / "temp" / sub).mkdir(parents=True, exist_ok=True)
        # As root, the worker stays root: as `nobody` it could not reach our 0700 temp dir.
        user = "user root;" if os.geteuid() == 0 else ""
        conf = work / "nginx.conf"
        conf.write_text(
            render(
                CONFIGS / "upstream-nginx.conf",
                {
                    "USER": user,
                    "WORK": work,
                    "PORT": self.upstream_port,
                    "NOFILE": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                    "CONNECTIONS": MAX_CONNECTIONS,
                },
            )
        )
        args = [
            NGINX,
            "-p",
            str(work),
            "-c",
            str(conf),
            "-e",
            str(work / "error.log"),
            "-g",
            "daemon off;",
        ]
        process = self.procs.start("upstream-nginx", args, work, self.load_cpu)
        wait_http(f"http://{HOST}:{self.upstream_port}/", process, lambda s: s == 200)
        return process

    def _gateway_config(self, name: str, workers: int, port: int) -> Path:
        work = self._dir(name)
        path = work / "gateway.yaml"
        values = {
            "PORT": port,
            "WORKERS": workers,
            "ADMIN_PORT": free_port(),
            "DATABASE": self.database,
            "ISSUER": ISSUER,
            "AUDIENCE": AUDIENCE,
            "KEYS_DIR": self.workdir / "keys",
            "UPSTREAM_PORT": self.upstream_port,
        }
        path.write_text(render(CONFIGS / "gateway.yaml", values))
        return path

    def _start_target(self, target: Target) -> Running:
        cpus = self.proxy_cpu if target.pinned else None
        if target.kind == "nginx":
            assert self.upstream is not None
            return Running(target, f"http://{HOST}:{self.upstream_port}", self.upstream)
        port = free_port()
        url = f"http://{HOST}:{port}"
        work = self._dir(target.name)
        if target.kind == "haproxy":
            assert self.keys is not None
            template = "haproxy-jwt.cfg" if target.authenticates else "haproxy.cfg"
            conf = work / "haproxy.cfg"
            values = {
                "PORT": port,
                "UPSTREAM_PORT": self.upstream_port,
                "MAXCONN": MAX_CONNECTIONS,
                "PUBLIC_KEY": self.keys.public_pem_path,
            }
            conf.write_text(render(CONFIGS / template, values))
            check = subprocess.run(
                [HAPROXY, "-c", "-f", str(conf)], capture_output=True, timeout=30
            )
            if check.returncode != 0:
                raise SetupError(f"haproxy -c refused {conf}: {check.stdout!r} {check.stderr!r}")
            process = self.procs.start(target.name, [HAPROXY, "-db", "-f", str(conf)], work, cpus)
            wait_http(url + "/", process, lambda s: s in (200, 401))
            return Running(target, url, process)
        if target.kind == "node":
            return self._start_node(target, port, cpus)
        workers = 1 if target.name == "gw-1" else 0
        conf = self._gateway_config(target.name, workers, port)
        args = [sys.executable, "-m", "gateway", "serve", "-c", str(conf)]
        process = self.procs.start(target.name, args, work, cpus)
        wait_http(url + "/healthz", process, lambda s: s == 200)
        self._wait_workers(process, workers or os.cpu_count() or 1)
        return Running(target, url, process)

    def _start_node(self, target: Target, port: int, cpus: str | None) -> Running:
        """The tutorial's server on a database of one user: the run's token's ``sub``."""
        work = self._dir(target.name)
        users = work / "users.db"
        with sqlite3.connect(users) as db:
            db.execute("CREATE TABLE users (id TEXT PRIMARY KEY, email TEXT NOT NULL, name TEXT)")
            db.execute(
                "INSERT INTO users VALUES (?, ?, ?)",
                (self.token_sub, "bench@bench.example.com", "Bench User"),
            )
        db.close()
        assert NODE is not None  # main() drops the target without node
        env = {"PORT": str(port), "JWT_SECRET": self.node_secret, "DATABASE": str(users)}
        args = [NODE, str(NODE_APP / "server.js")]
        process = self.procs.start(target.name, args, work, cpus, env)
        url = f"http://{HOST}:{port}"
        wait_http(url + "/profile", process, lambda s: s == 401)
        return Running(target, url, process)

    def _wait_workers(self, process: Process, count: int) -> None:
        if count <= 1:
            return
        deadline = time.monotonic() + START_TIMEOUT
        while len(children(process.proc.pid)) < count:
            if time.monotonic() > deadline or process.proc.poll() is not None:
                raise SetupError(f"{process.name}: {count} workers not up\n{process.tail()}")
            time.sleep(0.1)

    def all_pids(self) -> list[int]:
        roots = {r.process.proc.pid for r in self.targets.values()}
        if self.upstream is not None:
            roots.add(self.upstream.proc.pid)
        return [pid for root in sorted(roots) for pid in process_tree(root)]

    def upstream_pids(self) -> list[int]:
        return process_tree(self.upstream.proc.pid) if self.upstream is not None else []

    def gateway(self) -> Running | None:
        return next((r for r in self.targets.values() if r.target.kind == "gateway"), None)


# -- sanity: what each target does before it is measured ----------------------------------


def check_target(lab: Lab, running: Running) -> None:
    """A valid token is let through with its ``sub`` injected; a missing, expired, foreign-key
    or unsigned one is refused. A proxy that let everything through would look fast."""
    assert lab.keys is not None
    if running.target.kind == "node":
        check_node(lab, running)
        return
    url = running.url + ROUTE
    good = http(url, headers=bearer(lab.token))
    if good.status != 200:
        raise SetupError(f"{running.target.name}: valid token answered {good.status}")
    if not running.target.authenticates:
        return
    seen = good.headers.get("x-seen-user-id", "")
    if seen != lab.token_sub:
        raise SetupError(
            f"{running.target.name}: upstream saw X-User-Id {seen!r}, "
            f"not the token's sub {lab.token_sub!r}"
        )
    now = int(time.time())
    other = Keys(lab.keys.kid, _other_private_pem(), lab.keys.public_pem_path)
    unsigned = ".".join(
        [
            b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode()),
            b64url(json.dumps(claims(now)).encode()),
            "",
        ]
    )
    refused = {
        "no token": {},
        "expired": bearer(sign(lab.keys, claims(now - 7200, ttl=3600))),
        "another key": bearer(sign(other, claims(now))),
        "alg none": bearer(unsigned),
    }
    for what, headers in refused.items():
        status = http(url, headers=headers).status
        if status != 401:
            raise SetupError(f"{running.target.name}: a request with {what} answered {status}")


def check_node(lab: Lab, running: Running) -> None:
    """The tutorial's /profile answers the token's user, and refuses what it should."""
    url = running.url + "/profile"
    good = http(url, headers=bearer(lab.node_token))
    try:
        user = json.loads(good.body).get("id")
    except (ValueError, AttributeError):  # not JSON, or not an object
        user = None
    if good.status != 200 or user != lab.token_sub:
        raise SetupError(f"node: a valid token answered {good.status} {good.body[:200]!r}")
    now = int(time.time())
    refused = {
        "no token": {},
        "another secret": bearer(jwt.encode(claims(now), "not-the-secret" * 3, "HS256")),
        "expired": bearer(jwt.encode(claims(now - 7200, ttl=3600), lab.node_secret, "HS256")),
    }
    for what, headers in refused.items():
        status = http(url, headers=headers).status
        if status != 401:
            raise SetupError(f"node: a request with {what} answered {status}")


_OTHER_KEY: bytes = b""


def _other_private_pem() -> bytes:
    global _OTHER_KEY
    if not _OTHER_KEY:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        _OTHER_KEY = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    return _OTHER_KEY


def check_jwks(lab: Lab, running: Running) -> None:
    """The gateway serves the key the tokens are signed with (HAProxy has its public half)."""
    assert lab.keys is not None
    kids = [
        k.get("kid")
        for k in json.loads(http(running.url + "/.well-known/jwks.json").body).get("keys", [])
    ]
    if lab.keys.kid not in kids:
        raise SetupError(f"{running.target.name}: JWKS has {kids}, not {lab.keys.kid}")


# -- wrk ----------------------------------------------------------------------------------


@dataclass
class Load:
    """One wrk invocation's shape (everything but the duration)."""

    path: str
    connections: int
    script: Path
    headers: dict[str, str] = field(default_factory=dict)
    script_args: list[str] = field(default_factory=list)
    timeout: str = WRK_TIMEOUT


def wrk_script(workdir: Path, name: str | None) -> Path:
    """The scenario's Lua (if any) followed by report.lua: wrk takes one script."""
    path = workdir / f"wrk-{name or 'plain'}.lua"
    if not path.exists():
        parts = [(BENCH / name).read_text()] if name else []
        path.write_text("\n".join([*parts, (BENCH / "report.lua").read_text()]))
    return path


def wrk_command(url: str, load: Load, seconds: float, cpu: str | None) -> list[str]:
    command = [
        WRK,
        "-t1",
        f"-c{load.connections}",
        f"-d{max(1, round(seconds))}s",
        f"--timeout={load.timeout}",
        "--latency",
        "-s",
        str(load.script),
    ]
    for name, value in load.headers.items():
        command += ["-H", f"{name}: {value}"]
    command.append(url + load.path)
    if load.script_args:
        command += ["--", *load.script_args]
    return [TASKSET, "-c", cpu, *command] if cpu else command


def start_wrk(url: str, load: Load, seconds: float, cpu: str | None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        wrk_command(url, load, seconds, cpu),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finish_wrk(proc: subprocess.Popen[str], seconds: float) -> dict[str, float]:
    try:
        out, err = proc.communicate(timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        raise SetupError("wrk did not finish in time") from None
    finally:
        if proc.poll() is None:  # timed out, or we are being stopped: wrk goes too
            stop(proc)
    match = RESULT_LINE.search(out)
    if proc.returncode != 0 or match is None:
        raise SetupError(f"wrk failed ({proc.returncode}): {err.strip()} {out.strip()[-500:]}")
    return {k: float(v) for k, v in json.loads(match.group(1)).items()}


def run_wrk(url: str, load: Load, seconds: float, cpu: str | None) -> dict[str, float]:
    return finish_wrk(start_wrk(url, load, seconds, cpu), seconds)


def wrk_errors(result: Mapping[str, float]) -> dict[str, int]:
    kinds = ("connect", "read", "write", "timeout", "status")
    return {("non-2xx/3xx" if k == "status" else k): int(result[k]) for k in kinds if result[k]}


# -- measuring ----------------------------------------------------------------------------


class Bench:
    def __init__(self, opts: Options, lab: Lab, workdir: Path) -> None:
        self.opts = opts
        self.lab = lab
        self.workdir = workdir
        self.results: list[Measurement] = []
        self.storm: list[dict[str, Any]] = []
        self.token_file: Path | None = None
        self.login_file: Path | None = None

    def load(self, scenario: Scenario, running: Running) -> Load:
        connections = scenario.connections or self.opts.connections
        if running.target.kind == "node":
            return Load(
                "/profile",
                connections,
                wrk_script(self.workdir, scenario.script),
                headers=bearer(self.lab.node_token),
            )
        if scenario.name == "tokens-10k":
            assert self.token_file is not None
            return Load(
                ROUTE,
                connections,
                wrk_script(self.workdir, scenario.script),
                script_args=[str(self.token_file), ROUTE],
            )
        return Load(
            ROUTE,
            connections,
            wrk_script(self.workdir, scenario.script),
            headers=bearer(self.lab.token),
        )

    def check_scenario(self, scenario: Scenario, running: Running, load: Load) -> None:
        """One request of exactly the scenario's kind must be answered 200 first."""
        if scenario.name == "post-64k":
            answer = http(
                running.url + load.path,
                "POST",
                {**load.headers, "Content-Type": "application/octet-stream"},
                b"x" * BODY_BYTES,
            )
        elif scenario.name == "tokens-10k":
            assert self.token_file is not None
            lines = self.token_file.read_text().split()
            for token in (lines[0], lines[-1]):
                answer = http(running.url + load.path, headers=bearer(token))
                if answer.status != 200:
                    break
        else:
            answer = http(running.url + load.path, headers=load.headers)
        if answer.status != 200:
            raise SetupError(f"{scenario.name} on {running.target.name}: HTTP {answer.status}")

    def measure(
        self, scenario: Scenario, running: Running, load: Load, label: str = "", settle: bool = True
    ) -> Measurement:
        """Warm up, then one measured wrk run; CPU and RSS of the target's processes."""
        self.lab.procs.check_alive()
        everything = self.lab.all_pids() if settle else []
        wait_idle(everything)
        run_wrk(running.url, load, self.opts.warmup, self.lab.load_cpu)
        wait_idle(everything)
        pids = process_tree(running.process.proc.pid)
        workers = worker_pids(running.process.proc.pid)
        upstream = self.lab.upstream_pids() if running.target.kind != "nginx" else []
        cpu_before = cpu_seconds(pids)
        load_before = cpu_seconds(upstream) + reaped_children_cpu_seconds()
        loops_before = [schedstat_seconds(pid) for pid in workers]
        wrk = start_wrk(running.url, load, self.opts.duration, self.lab.load_cpu)
        peak_rss = rss_peaks_while(wrk, workers, self.opts.duration + 30)
        result = finish_wrk(wrk, self.opts.duration)
        cpu_after = cpu_seconds(pids)
        load_after = cpu_seconds(upstream) + reaped_children_cpu_seconds()
        loops = [
            (run1 - run0, wait1 - wait0)
            for (run0, wait0), (run1, wait1) in zip(
                loops_before, [schedstat_seconds(pid) for pid in workers], strict=True
            )
        ]
        requests = int(result["requests"])
        seconds = result["duration_us"] / 1e6
        cpu = (cpu_after - cpu_before) * 1e6 / requests if requests else None
        return Measurement(
            scenario=scenario.name,
            target=running.target.name + label,
            connections=load.connections,
            seconds=round(seconds, 2),
            requests=requests,
            rps=round(requests / seconds, 1) if seconds else 0.0,
            p50_ms=round(result["p50_us"] / 1000, 2),
            p90_ms=round(result["p90_us"] / 1000, 2),
            p99_ms=round(result["p99_us"] / 1000, 2),
            max_ms=round(result["max_us"] / 1000, 2),
            cpu_us_per_request=round(cpu, 1) if cpu is not None else None,
            rss_mb_per_worker=[
                max(peak, rss_mb(p)) for p, peak in zip(workers, peak_rss, strict=True)
            ],
            errors=wrk_errors(result),
            load_cores=round((load_after - load_before) / seconds, 2) if seconds else None,
            loop_running=[round(run / seconds, 2) for run, _ in loops] if seconds else [],
            loop_waiting=[round(wait / seconds, 2) for _, wait in loops] if seconds else [],
        )

    def run(self) -> None:
        for name in self.opts.scenarios:
            scenario = SCENARIOS[name]
            for running in self.lab.targets.values():
                if scenario.gateway_only and running.target.kind != "gateway":
                    continue
                if running.target.scenarios and scenario.name not in running.target.scenarios:
                    continue
                log(f"{scenario.name} / {running.target.name} ...")
                if scenario.name == "login-storm":
                    self.run_storm(scenario, running)
                    continue
                if scenario.name == "soak":
                    self.run_soak(scenario, running)
                    continue
                load = self.load(scenario, running)
                self.check_scenario(scenario, running, load)
                measurement = self.measure(scenario, running, load)
                if scenario.name == "tokens-10k":
                    # A cache that holds every token misses on the first lap only.
                    laps = measurement.requests / self.opts.tokens
                    measurement.note = f"{laps:.1f} laps over the {self.opts.tokens} tokens"
                self.results.append(measurement)

    def run_soak(self, scenario: Scenario, running: Running) -> None:
        """Laps of one-token load until ``--soak-requests`` are served: is the memory flat?
        The first lap warms up (caches, pools, allocator arenas); the spread is of the rest."""
        load = self.load(scenario, running)
        self.check_scenario(scenario, running, load)
        served, laps, rss = 0, [], []
        deadline = time.monotonic() + 3600  # bounded whatever the machine's speed
        while served < self.opts.soak_requests and time.monotonic() < deadline:
            lap = self.measure(scenario, running, load, settle=False)
            served += lap.requests
            laps.append(lap)
            rss.append(max(lap.rss_mb_per_worker))
        summary = laps[-1]
        summary.requests = served
        after_warmup = rss[1:] or rss
        summary.note = (
            f"{served:,} requests in {len(laps)} laps; RSS MB after each: "
            + " ".join(f"{r:.0f}" for r in rss)
            + f"; spread after the first lap {max(after_warmup) - min(after_warmup):.1f} MB"
        )
        self.results.append(summary)

    def run_storm(self, scenario: Scenario, running: Running) -> None:
        """Proxied load alone, then the same load while wrk logs in as fast as the gateway
        lets it (correct passwords, bcrypt at the default cost) from the load's core."""
        load = self.load(scenario, running)
        self.check_scenario(scenario, running, load)
        alone = self.measure(scenario, running, load)
        assert self.login_file is not None
        login_load = Load(
            "/auth/login",
            STORM_CONNECTIONS,
            wrk_script(self.workdir, "login.lua"),
            script_args=[str(self.login_file), "/auth/login"],
            timeout="30s",
        )
        # The storm starts first and outlasts warm-up and measurement: the measured window is
        # all storm.
        storm_seconds = self.opts.warmup + self.opts.duration + 3
        wait_idle(self.lab.all_pids())
        storm = start_wrk(running.url, login_load, storm_seconds, self.lab.load_cpu)
        try:
            time.sleep(1.0)  # the first logins are queued in the gateway's bcrypt pool
            stormed = self.measure(scenario, running, load, label=" +storm", settle=False)
            login = finish_wrk(storm, storm_seconds)
        finally:
            stop(storm)
        logins_per_s = login["requests"] / (login["duration_us"] / 1e6)
        stormed.note = f"{logins_per_s:.1f} logins/s beside it"
        self.results += [alone, stormed]
        self.storm.append(
            {
                "target": running.target.name,
                "p99_alone_ms": alone.p99_ms,
                "p99_storm_ms": stormed.p99_ms,
                "p99_ratio": round(stormed.p99_ms / alone.p99_ms, 2) if alone.p99_ms else None,
                "rps_ratio": round(stormed.rps / alone.rps, 2) if alone.rps else None,
                "logins": int(login["requests"]),
                "logins_per_s": round(logins_per_s, 1),
                "login_p50_ms": round(login["p50_us"] / 1000, 1),
                "login_p99_ms": round(login["p99_us"] / 1000, 1),
                "login_errors": wrk_errors(login),
            }
        )


# -- setup of the scenarios' inputs -------------------------------------------------------


def prepare_tokens(bench: Bench, lab: Lab, workdir: Path) -> None:
    assert lab.keys is not None
    started = time.monotonic()
    tokens = mint(lab.keys, bench.opts.tokens)
    if len(set(tokens)) != len(tokens):
        raise SetupError("minted tokens are not distinct")
    bench.token_file = workdir / "tokens.txt"
    bench.token_file.write_text("\n".join(tokens) + "\n")
    log(f"minted {len(tokens)} tokens in {time.monotonic() - started:.1f} s")


def prepare_storm(bench: Bench, lab: Lab, workdir: Path) -> None:
    """Register the storm's users through a gateway (bcrypt at the default cost)."""
    gateway = lab.gateway()
    if gateway is None:
        raise SetupError("the login storm needs a gateway target")
    bodies = [
        json.dumps({"email": f"storm{i}@bench.example.com", "password": PASSWORD})
        for i in range(STORM_USERS)
    ]

    def register(body: str) -> int:
        headers = {"Content-Type": "application/json"}
        return http(gateway.url + "/auth/register", "POST", headers, body.encode(), 60).status

    with concurrent.futures.ThreadPoolExecutor(STORM_USERS) as pool:
        statuses = list(pool.map(register, bodies))
    if any(s != 201 for s in statuses):
        raise SetupError(f"registering the storm users answered {statuses}")
    login = http(
        gateway.url + "/auth/login",
        "POST",
        {"Content-Type": "application/json"},
        bodies[0].encode(),
        60,
    )
    if login.status != 200:
        raise SetupError(f"a storm user's login answered {login.status}")
    bench.login_file = workdir / "logins.txt"
    bench.login_file.write_text("\n".join(bodies) + "\n")


# -- report -------------------------------------------------------------------------------

RATIO_FIELDS = ("rps", "p50_ms", "p99_ms", "cpu_us_per_request")


def add_ratios(results: list[Measurement]) -> None:
    """Each figure ÷ the same figure of the baseline target in the same scenario (the storm
    rows: in ``one-token``, the same request)."""
    index = {(m.scenario, m.target): m for m in results}
    for m in results:
        scenario = "one-token" if m.scenario == "login-storm" else m.scenario
        for base in BASELINES:
            ref = index.get((scenario, base))
            m.ratios[base] = {
                f: _ratio(getattr(m, f), getattr(ref, f)) if ref else None for f in RATIO_FIELDS
            }


def _ratio(value: float | None, ref: float | None) -> float | None:
    if value is None or not ref:
        return None
    return round(value / ref, 2)


def _num(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def table(results: list[Measurement]) -> str:
    head = [
        "scenario",
        "target",
        "conns",
        "req/s",
        "/dir",
        "/hjwt",
        "p50 ms",
        "/dir",
        "/hjwt",
        "p99 ms",
        "/dir",
        "/hjwt",
        "cpu us/req",
        "/dir",
        "/hjwt",
        "RSS MB/worker",
        "errors",
    ]
    rows = [head]
    for m in results:
        row = [m.scenario, m.target, str(m.connections)]
        for f, digits in zip(RATIO_FIELDS, (0, 2, 2, 1), strict=True):
            row.append(_num(getattr(m, f), digits))
            row += [_num(m.ratios.get(b, {}).get(f), 2) for b in BASELINES]
        row.append(" ".join(f"{r:.0f}" for r in m.rss_mb_per_worker) or "-")
        row.append(str(m.error_count) + (f" {m.errors}" if m.errors else ""))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [
        "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def storm_lines(storm: list[dict[str, Any]]) -> list[str]:
    return [
        f"login storm, {s['target']}: proxied p99 {s['p99_alone_ms']} ms alone, "
        f"{s['p99_storm_ms']} ms beside the storm = x{s['p99_ratio']} (req/s x{s['rps_ratio']}); "
        f"{s['logins']} logins, {s['logins_per_s']} logins/s, login p50 {s['login_p50_ms']} ms, "
        f"p99 {s['login_p99_ms']} ms, errors {s['login_errors'] or 0}"
        for s in storm
    ]


def worker_lines(results: Sequence[Measurement]) -> list[str]:
    """Two workers against one, per scenario, and what the two could do on whole cores.

    On a machine with two CPUs, wrk and the upstream take part of the second core from the
    second worker: the measured ratio understates the workers' scaling. The CPU each spends
    per request says what a whole core would give each."""
    by_key = {(m.scenario, m.target): m for m in results}
    lines = []
    for m in results:
        one = by_key.get((m.scenario, "gw-1"))
        if m.target != "gw-all" or one is None or not one.rps:
            continue
        if not (m.cpu_us_per_request and one.cpu_us_per_request):
            continue
        cores = m.rps * m.cpu_us_per_request / 1e6
        workers = len(m.rss_mb_per_worker)
        scaling = workers * one.cpu_us_per_request / m.cpu_us_per_request
        others = "the rest" if m.load_cores is None else f"{m.load_cores:.2f}"
        lines.append(
            f"{workers} workers, {m.scenario}: x{m.rps / one.rps:.2f} gw-1 measured, on "
            f"{cores:.2f} cores (wrk and the upstream had {others}); "
            f"{m.cpu_us_per_request:.0f} us of CPU a request against gw-1's "
            f"{one.cpu_us_per_request:.0f}, so {workers} whole cores = x{scaling:.2f} one"
            + _loop_shares(m)
        )
    return lines


def node_lines(results: Sequence[Measurement]) -> list[str]:
    """Each gateway target against the tutorial's Node server, one token, same run."""
    by_target = {m.target: m for m in results if m.scenario == "one-token"}
    node = by_target.get("node")
    if node is None or not node.rps:
        return []
    return [
        f"{m.target} against the tutorial's Node /profile ({node.rps:,.0f} req/s, "
        f"{_num(node.cpu_us_per_request, 0)} us a request, same run): x{m.rps / node.rps:.2f}"
        for m in by_target.values()
        if m.target.startswith("gw-")
    ]


def node_app_missing(targets: Sequence[str]) -> str | None:
    """Why the ``node`` target cannot run, after installing its npm dependencies if need be
    (pinned by ``bench/node/package-lock.json``); None when it can."""
    if "node" not in targets:
        return None
    if NODE is None or NPM is None:
        return "node and npm are not installed (Debian: nodejs, npm)"
    if (NODE_APP / "node_modules" / "sqlite3").is_dir():
        return None
    log(f"installing the tutorial server's npm dependencies in {NODE_APP} ...")
    try:
        install = subprocess.run(
            [NPM, "ci", "--silent", "--no-audit", "--no-fund"],
            cwd=NODE_APP,
            capture_output=True,
            timeout=NPM_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        return f"npm ci took longer than {NPM_TIMEOUT:.0f} s"
    if install.returncode != 0:
        return f"npm ci failed: {install.stderr.decode(errors='replace')[-500:]}"
    return None


def _loop_shares(m: Measurement) -> str:
    """Were the workers short of work or of CPU? Each loop's share of the run running, and
    waiting for a CPU while it had work."""
    if not m.loop_running:
        return ""
    shares = ", ".join(
        f"{run:.0%} + {wait:.0%}" for run, wait in zip(m.loop_running, m.loop_waiting, strict=True)
    )
    return f"; each loop ran + waited for a CPU: {shares} of the time"


def setup_info(opts: Options, lab: Lab, nofile: int) -> dict[str, Any]:
    return {
        "cpus": len(os.sched_getaffinity(0)),
        "proxy_cpu": lab.proxy_cpu,
        "load_cpu": lab.load_cpu,
        "python": platform.python_version(),
        "python_executable": sys.executable,  # the gateway's: its build counts (docs)
        "platform": platform.platform(),
        "duration_s": opts.duration,
        "warmup_s": opts.warmup,
        "connections": opts.connections,
        "wrk_threads": 1,
        "tokens": opts.tokens,
        "nofile": nofile,
        "load_average": os.getloadavg()[0],
    }


def summary_line(setup: Mapping[str, Any]) -> str:
    pin = (
        f"gw-1/haproxy/node on CPU {setup['proxy_cpu']}, wrk+upstream on CPU {setup['load_cpu']}"
        if setup["proxy_cpu"] is not None
        else "nothing pinned (one CPU)"
    )
    return (
        f"setup: {setup['cpus']} CPUs ({pin}), wrk -t1 -c{setup['connections']} "
        f"{setup['duration_s']:g} s after {setup['warmup_s']:g} s warm-up, Python "
        f"{setup['python']} ({setup['python_executable']}), load average "
        f"{setup['load_average']:.2f} before"
    )


def failures(results: Sequence[Measurement]) -> list[str]:
    """The measurements that make the run fail: any wrk error, or nothing measured."""
    return [f"{m.scenario}/{m.target}" for m in results if m.error_count or not m.requests]


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# -- main ---------------------------------------------------------------------------------


def parse_seconds(text: str) -> float:
    value = text[:-1] if text.endswith("s") else text
    seconds = float(value)
    if not 0 < seconds <= 600:
        raise argparse.ArgumentTypeError(f"{text}: between 0 and 600 seconds")
    return seconds


def parse_names(choices: Mapping[str, object]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [n for n in re.split(r"[,\s]+", text) if n]
        unknown = [n for n in names if n not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"{unknown or text!r}: choose from {list(choices)}")
        return [n for n in choices if n in names]  # canonical order

    return parse


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 s per measurement (smoke run)")
    parser.add_argument("--duration", type=parse_seconds, help="per measurement (default 10s)")
    parser.add_argument("--warmup", type=parse_seconds, help="before each (default 2s)")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--scenarios", type=parse_names(SCENARIOS), default=DEFAULT_SCENARIOS)
    parser.add_argument(
        "--soak-requests", type=int, default=1_000_000, help="for soak: requests in all"
    )
    parser.add_argument("--targets", type=parse_names(TARGETS))
    parser.add_argument("--tokens", type=int, default=10_000, help="for tokens-10k")
    parser.add_argument("--out", type=Path, help="results JSON (default /tmp/...)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = parser.parse_args(argv)
    duration = args.duration or (2.0 if args.quick else 10.0)
    warmup = args.warmup or (1.0 if args.quick else 2.0)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    out = args.out or Path(tempfile.gettempdir()) / f"gateway-bench-{stamp}.json"
    if not 1 <= args.connections <= 10000 or not 1 <= args.tokens <= 1_000_000:
        parser.error("--connections 1..10000, --tokens 1..1000000")
    return Options(
        duration,
        warmup,
        args.connections,
        args.scenarios,
        args.targets or list(TARGETS),
        args.tokens,
        out,
        args.keep,
        args.soak_requests,
        targets_chosen=args.targets is not None,
    )


@contextmanager
def workspace(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    try:
        yield path
    finally:
        if keep:
            log(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through every finally: children are stopped


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    for tool in (WRK, NGINX, HAPROXY, TASKSET):
        if not Path(tool).exists():
            log(f"{tool} is missing (Debian: wrk, nginx-light, haproxy, util-linux)")
            return 1
    missing = node_app_missing(opts.targets)
    if missing:
        if not opts.targets_chosen:
            log(f"the node target is skipped: {missing}")
            opts.targets.remove("node")
        else:
            log(f"the node target cannot run: {missing}")
            return 1
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    nofile = raise_nofile()
    procs = Processes()
    atexit.register(procs.stop_all)  # also on an exception that escapes everything below
    with workspace(opts.keep) as workdir:
        try:
            lab = Lab(opts, workdir, procs)
            bench = Bench(opts, lab, workdir)
            log(f"starting {', '.join(opts.targets)} in {workdir}")
            lab.start()
            for running in lab.targets.values():
                check_target(lab, running)
                if running.target.kind == "gateway":
                    check_jwks(lab, running)
            if "tokens-10k" in opts.scenarios:
                prepare_tokens(bench, lab, workdir)
            if "login-storm" in opts.scenarios:
                prepare_storm(bench, lab, workdir)
            setup = setup_info(opts, lab, nofile)
            bench.run()
        except SetupError as err:
            log(f"setup failed: {err}")
            return 1
        finally:
            procs.stop_all()
    add_ratios(bench.results)
    report = {
        "setup": setup,
        "scenarios": {n: SCENARIOS[n].about for n in opts.scenarios},
        "measurements": [asdict(m) for m in bench.results],
        "login_storm": bench.storm,
    }
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(bench.results))
    notes = [f"{m.scenario} / {m.target}: {m.note}" for m in bench.results if m.note]
    lines = [
        *notes,
        *node_lines(bench.results),
        *worker_lines(bench.results),
        *storm_lines(bench.storm),
        summary_line(setup),
        f"results: {opts.out}",
    ]
    for line in lines:
        print(line)
    failed = failures(bench.results)
    if failed:
        log(f"measurements with errors or no requests: {', '.join(failed)}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
