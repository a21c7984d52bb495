"""Benchmark: do proxied requests stall while a login storm runs? (issue 2, acceptance 5)

Starts, on loopback only, an echo upstream (``python -m gateway echo``) and the gateway
(``python -m gateway serve``) with bcrypt at the default cost (12), then measures a closed-loop
proxied load (``GET /api/x`` with a bearer token) twice:

  A. baseline: the proxied load alone;
  B. storm:    the same load while concurrent clients log in as fast as they can
               (correct passwords, so the failed-login limit never applies).

and prints the latency percentiles of both phases and the ratio p99(B) / p99(A).

The default load is closed-loop (each client sends its next request when the last one is
answered): it saturates the CPU, so its latency is mostly queueing and the storm shows up as
lost CPU share. ``--rate N`` paces the same clients at N requests/s in total (open loop,
latency measured from each request's scheduled start, so a stall is not hidden by the clients
waiting for it): that isolates "is a request stalled" from "is the CPU shared".
``--rounds N`` alternates A and B N times, so that drift on a shared machine hits both.

Every loop is bounded in count and in time, and the whole run has a hard stop; the
subprocesses are killed whatever happens. This is a benchmark, not a test: it asserts
nothing and is not run in CI.

    python bench/login_storm.py [--seconds 10] [--clients 16] [--storm 8] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

HOST = "127.0.0.1"  # loopback only, always
PASSWORD = "bench-password-0123"
BCRYPT_ROUNDS = 12  # the gateway's default cost: the point of the exercise
REPO = Path(__file__).resolve().parent.parent

CONFIG = """\
server:
  host: {host}
  port: {port}
  public_url: http://{host}:{port}
  admin: {{host: {host}, port: {admin_port}}}
database:
  url: sqlite:///{db}
tokens:
  algorithm: RS256
  keys_dir: {keys}
accounts:
  prefix: /auth
  registration: open
  bcrypt_rounds: {rounds}
  # Generous, so the storm measures bcrypt rather than the 429 path.
  login_rate_limit: 100000/min
  register_rate_limit: 100000/min
routes:
  - name: api
    path: /api
    upstream: http://{host}:{echo_port}
    auth: required
"""


@dataclass
class Options:
    seconds: float
    max_requests: int
    clients: int
    storm: int
    storm_users: int
    warmup: float
    hard_stop: float
    as_json: bool
    rate: float = 0.0  # total proxied requests/s; 0 = closed loop
    rounds: int = 1


@dataclass
class LoadResult:
    """What the proxied load saw during one phase."""

    phase: str
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


@dataclass
class StormResult:
    logins: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)


# -- processes ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class Processes:
    """The echo upstream and the gateway, logs in the temp dir, always killed on exit."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, *args: str) -> None:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the child
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", *args],
            cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT, env=env,
        )
        log.close()  # the child holds its own descriptor
        self.procs.append((name, proc))

    def check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")

    def log_tail(self, name: str, lines: int = 20) -> str:
        try:
            text = (self.workdir / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        for _, proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for _, proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


async def wait_healthy(session: aiohttp.ClientSession, url: str, procs: Processes,
                       timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.1) + 1):  # bounded in count as well as time
        procs.check_alive()
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                if resp.status == 200:
                    return
        except (TimeoutError, aiohttp.ClientError):
            pass
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} not healthy after {timeout:.0f} s")


# -- accounts -----------------------------------------------------------------------------


async def register_and_login(session: aiohttp.ClientSession, base: str, email: str) -> str:
    """Register ``email`` and return an access token for it."""
    body = {"email": email, "password": PASSWORD}
    async with session.post(f"{base}/auth/register", json=body) as resp:
        if resp.status != 201:
            raise RuntimeError(f"register {email}: {resp.status} {await resp.text()}")
    async with session.post(f"{base}/auth/login", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"login {email}: {resp.status} {await resp.text()}")
        return str((await resp.json())["access_token"])


# -- load ---------------------------------------------------------------------------------


async def proxied_worker(session: aiohttp.ClientSession, url: str, headers: dict[str, str],
                         end: float, budget: list[int], result: LoadResult,
                         interval: float = 0.0, offset: float = 0.0) -> None:
    """One request at a time until the phase ends or the shared budget is spent.

    ``interval`` 0: closed loop. Otherwise one request every ``interval`` seconds, starting
    ``offset`` from now, latency counted from the scheduled start (no coordinated omission).
    """
    scheduled = time.perf_counter() + offset
    while time.monotonic() < end and budget[0] > 0:
        budget[0] -= 1
        if interval:
            await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
            started = scheduled
            scheduled += interval
        else:
            started = time.perf_counter()
        try:
            async with session.get(url, headers=headers) as resp:
                await resp.read()
                status = resp.status
        except (TimeoutError, aiohttp.ClientError) as exc:
            result.error(type(exc).__name__)
            continue
        elapsed = (time.perf_counter() - started) * 1000
        if status == 200:
            result.latencies_ms.append(elapsed)
        else:
            result.error(f"HTTP {status}")


async def storm_worker(session: aiohttp.ClientSession, url: str, email: str, end: float,
                       budget: list[int], result: StormResult) -> None:
    body = {"email": email, "password": PASSWORD}
    while time.monotonic() < end and budget[0] > 0:
        budget[0] -= 1
        started = time.perf_counter()
        try:
            async with session.post(url, json=body) as resp:
                await resp.read()
                status = resp.status
        except (TimeoutError, aiohttp.ClientError) as exc:
            result.errors[type(exc).__name__] = result.errors.get(type(exc).__name__, 0) + 1
            continue
        if status == 200:
            result.logins += 1
            result.latencies_ms.append((time.perf_counter() - started) * 1000)
        else:
            result.errors[f"HTTP {status}"] = result.errors.get(f"HTTP {status}", 0) + 1


def new_session(limit: int) -> aiohttp.ClientSession:
    # One pooled session per phase; a per-request cap so a stalled gateway cannot hang us.
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=limit)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=15))


async def run_phase(base: str, token: str, storm_emails: list[str], opts: Options,
                    result: LoadResult, storm: StormResult | None, seconds: float) -> None:
    """Run one phase, adding what it saw to ``result`` (and ``storm``, if there is a storm)."""
    url = f"{base}/api/x"
    headers = {"Authorization": f"Bearer {token}"}
    interval = opts.clients / opts.rate if opts.rate else 0.0
    async with new_session(opts.clients) as proxied, new_session(max(opts.storm, 1)) as logins:
        start = time.monotonic()
        end = start + seconds
        budget = [opts.max_requests]
        load = asyncio.gather(*(
            proxied_worker(proxied, url, headers, end, budget, result,
                           interval, interval * i / opts.clients)
            for i in range(opts.clients)))
        storm_budget = [opts.max_requests]
        logins_done = asyncio.gather(*(
            storm_worker(logins, f"{base}/auth/login", storm_emails[i % len(storm_emails)],
                         end, storm_budget, storm)
            for i in range(opts.storm) if storm is not None and storm_emails))
        # In-flight requests finish after `end`; 20 s more is the most they may take. The
        # proxied rate is over the proxied load's own time, not the storm's slower tail.
        try:
            await asyncio.wait_for(load, timeout=seconds + 20)
            result.seconds += time.monotonic() - start
            await asyncio.wait_for(logins_done, timeout=max(1.0, end + 20 - time.monotonic()))
        finally:
            logins_done.cancel()
        if storm is not None:
            storm.seconds += time.monotonic() - start


# -- report -------------------------------------------------------------------------------


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile; NaN for no samples."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def summarize(result: LoadResult) -> dict[str, Any]:
    values = sorted(result.latencies_ms)
    return {
        "phase": result.phase,
        "requests": len(values),
        "seconds": round(result.seconds, 3),
        "req_per_s": round(len(values) / result.seconds, 1) if result.seconds else 0.0,
        "p50_ms": round(percentile(values, 50), 2),
        "p95_ms": round(percentile(values, 95), 2),
        "p99_ms": round(percentile(values, 99), 2),
        "max_ms": round(values[-1], 2) if values else float("nan"),
        "errors": sum(result.errors.values()),
        "error_kinds": dict(result.errors),
    }


def storm_summary(storm: StormResult) -> dict[str, Any]:
    values = sorted(storm.latencies_ms)
    return {
        "logins": storm.logins,
        "seconds": round(storm.seconds, 3),
        "logins_per_s": round(storm.logins / storm.seconds, 1) if storm.seconds else 0.0,
        "login_p50_ms": round(percentile(values, 50), 1),
        "login_p99_ms": round(percentile(values, 99), 1),
        "errors": sum(storm.errors.values()),
        "error_kinds": dict(storm.errors),
    }


def render(report: dict[str, Any]) -> str:
    rows = report["phases"]
    head = ("phase", "requests", "req/s", "p50 ms", "p95 ms", "p99 ms", "max ms", "errors")
    keys = ("phase", "requests", "req_per_s", "p50_ms", "p95_ms", "p99_ms", "max_ms", "errors")
    table = [head] + [tuple(str(row[k]) for k in keys) for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w)
                       for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    storm = report["storm"]
    lines += [
        "",
        f"storm (phase B): {storm['logins']} logins in {storm['seconds']} s = "
        f"{storm['logins_per_s']} logins/s, login p50 {storm['login_p50_ms']} ms, "
        f"p99 {storm['login_p99_ms']} ms, errors {storm['errors']}",
        f"p99 ratio B/A: {report['p99_ratio']}",
        f"setup: {report['setup']}",
    ]
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------------------


async def bench(opts: Options, workdir: Path, procs: Processes) -> dict[str, Any]:
    port, admin_port, echo_port = free_port(), free_port(), free_port()
    config = workdir / "bench.yaml"
    config.write_text(CONFIG.format(host=HOST, port=port, admin_port=admin_port,
                                    echo_port=echo_port, db=workdir / "gateway.db",
                                    keys=workdir / "keys", rounds=BCRYPT_ROUNDS))
    procs.start("echo", "echo", "--host", HOST, "--port", str(echo_port))
    procs.start("gateway", "serve", "-c", str(config))
    base = f"http://{HOST}:{port}"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        await wait_healthy(session, f"http://{HOST}:{echo_port}/healthz", procs)
        await wait_healthy(session, f"{base}/healthz", procs)
        token = await register_and_login(session, base, "load@bench.example.com")
        emails = [f"storm{i}@bench.example.com" for i in range(opts.storm_users)]
        for email in emails:
            await register_and_login(session, base, email)
    load_before = os.getloadavg()[0]
    # Warm-up (not recorded): connections, caches, the first token verification.
    await run_phase(base, token, [], opts, LoadResult("warmup"), None, opts.warmup)
    baseline, stormed, storm = LoadResult("A baseline"), LoadResult("B storm"), StormResult()
    for _ in range(opts.rounds):
        procs.check_alive()
        await run_phase(base, token, [], opts, baseline, None, opts.seconds)
        procs.check_alive()
        await run_phase(base, token, emails, opts, stormed, storm, opts.seconds)
    procs.check_alive()
    phases = [summarize(baseline), summarize(stormed)]
    p99_a, p99_b = phases[0]["p99_ms"], phases[1]["p99_ms"]
    load = "closed loop" if not opts.rate else f"open loop at {opts.rate:g} req/s"
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "phases": phases,
        "storm": storm_summary(storm),
        "p99_ratio": round(p99_b / p99_a, 2) if p99_a > 0 else float("nan"),
        "setup": (f"{os.cpu_count()} CPUs, Python {platform.python_version()}, "
                  f"bcrypt cost {BCRYPT_ROUNDS}, {opts.clients} proxied clients ({load}), "
                  f"{opts.storm} login clients, {opts.rounds} x {opts.seconds:g} s per phase, "
                  f"load average {load_before:.2f} before / {os.getloadavg()[0]:.2f} after"),
    }


def parse_args(argv: list[str] | None) -> Options:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    p.add_argument("--max-requests", type=int, default=200_000,
                   help="cap on proxied requests (and on logins) per phase")
    p.add_argument("--clients", type=int, default=16, help="concurrent proxied clients")
    p.add_argument("--storm", type=int, default=8, help="concurrent login clients")
    p.add_argument("--storm-users", type=int, default=8, help="accounts the storm logs into")
    p.add_argument("--warmup", type=float, default=1.0, help="unrecorded warm-up seconds")
    p.add_argument("--hard-stop", type=float, default=None,
                   help="abort the whole run after this many seconds (default 120, or more "
                        "for long phases)")
    p.add_argument("--rate", type=float, default=0.0,
                   help="pace the proxied clients at this many requests/s in total "
                        "(open loop); 0, the default, is closed loop")
    p.add_argument("--rounds", type=int, default=1, help="alternate phases A and B this often")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    a = p.parse_args(argv)
    if (a.seconds <= 0 or a.clients < 1 or a.storm < 1 or a.storm_users < 1
            or a.max_requests < 1 or a.rounds < 1 or a.rate < 0 or a.warmup < 0):
        p.error("--seconds, --clients, --storm, --storm-users, --max-requests and --rounds "
                "must be positive; --rate and --warmup not negative")
    hard_stop = a.hard_stop or max(120.0, a.rounds * (2 * a.seconds + 40) + a.warmup + 60)
    return Options(a.seconds, a.max_requests, a.clients, a.storm, a.storm_users, a.warmup,
                   hard_stop, a.json, a.rate, a.rounds)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
        procs = Processes(Path(tmp))
        try:
            report = asyncio.run(asyncio.wait_for(bench(opts, Path(tmp), procs),
                                                  timeout=opts.hard_stop))
        except (TimeoutError, RuntimeError, aiohttp.ClientError) as err:
            print(f"login_storm: {type(err).__name__}: {err}", file=sys.stderr)
            tail = procs.log_tail("gateway")
            if tail:
                print(f"--- gateway log (tail) ---\n{tail}", file=sys.stderr)
            return 1
        finally:
            procs.stop()
    print(json.dumps(report, indent=2) if opts.as_json else render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
