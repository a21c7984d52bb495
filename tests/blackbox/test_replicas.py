"""Three gateway replicas sharing one PostgreSQL and one keys dir, behind a real HAProxy.

What this proves, with real processes only (gateways, HAProxy 2.6, PostgreSQL, echo):

- an account made on one replica signs in on another and its token works on the third; a
  refresh works anywhere (shared database, shared signing key);
- the failed-login limit is counted in the database: attempts spread over the replicas are
  limited as if there were one gateway, sequential or concurrent;
- a refresh token spent on two replicas at once: one wins, the other is reuse, and the
  family dies;
- SIGKILL of one replica mid-load loses no write that was answered 201, only requests in
  flight on it fail, and HAProxy routes around it (numbers printed and saved as JSON);
- PostgreSQL stopped: accounts answer 503 quickly and ``/readyz`` is 503 while tokens keep
  working on every replica; PostgreSQL back: everything recovers without a restart;
- SIGTERM under load: the draining replica completes every request that reached it, exits 0,
  and HAProxy sends the rest elsewhere.

Destructive tests (kill, terminate, database stop) get replicas of their own.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.blackbox.client import PASSWORD, Account, post_json, received, signed_in
from tests.blackbox.conftest import ROUTES, Echo, Gateway, launch_gateway, stop_process
from tests.blackbox.haproxy import HAProxy, free_port, start_haproxy, stop_haproxy
from tests.blackbox.upstreams import Upstream, start_upstream
from tests.pg import PgServer, query, started_server

pytest_plugins = ["tests.pg"]

REPLICAS = 3
LOGIN_LIMIT = 5  # failed logins per minute, per account and per client IP
LOAD_TIMEOUT = 60.0  # seconds any load run may take, whatever happens
CONCURRENCY = 8

CLUSTER_CONFIG = """
server: {{public_url: "{public}", shutdown_grace: 10s, drain_delay: 1500ms}}
database: {{url: "{db}"}}
tokens: {{keys_dir: "{keys}"}}
accounts:
  bcrypt_rounds: 4
  login_rate_limit: {limit}/min
  register_rate_limit: 100000/min
"""

SLOW_ROUTE = """
  - name: slow
    path: /slow
    upstream: {slow}
"""


# -- a cluster: replicas (+ HAProxy) ------------------------------------------------------


@dataclass
class Cluster:
    replicas: list[Gateway]
    db_url: str
    lb: HAProxy | None = None

    @property
    def urls(self) -> list[str]:
        return [gw.url for gw in self.replicas]


def start_cluster(
    workdir: Path, echo: Echo, db_url: str, *, lb: bool = True, routes: str = ROUTES
) -> Cluster:
    """Replica 1 first (it generates the signing key into the shared dir), then the others
    together; then HAProxy in front, on the port the replicas already call their public URL
    (so every replica issues and accepts the same ``iss``)."""
    lb_port = free_port()
    extra = CLUSTER_CONFIG.format(
        public=f"http://127.0.0.1:{lb_port}",
        db=db_url,
        keys=workdir / "keys",
        limit=LOGIN_LIMIT,
    )
    cluster = Cluster([], db_url)

    def launch(i: int) -> Gateway:
        replica_dir = workdir / f"replica{i}"
        replica_dir.mkdir()
        return launch_gateway(replica_dir, echo, extra=extra, routes=routes)

    try:
        cluster.replicas.append(launch(1))
        with ThreadPoolExecutor(REPLICAS - 1) as pool:
            futures = [pool.submit(launch, i) for i in range(2, REPLICAS + 1)]
            for future in futures:
                cluster.replicas.append(future.result())
        if lb:
            addresses = [gw.url.removeprefix("http://") for gw in cluster.replicas]
            cluster.lb = start_haproxy(workdir / "haproxy", addresses, port=lb_port)
    except BaseException:
        stop_cluster(cluster)
        raise
    return cluster


def stop_cluster(cluster: Cluster) -> None:
    try:
        if cluster.lb is not None:
            stop_haproxy(cluster.lb)
    finally:
        for gw in cluster.replicas:
            stop_process(gw.proc)


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, echo_upstream: Echo, pg_server: PgServer
) -> Iterator[Cluster]:
    """For the tests that disturb nothing: each uses its own accounts and client IPs."""
    db_url = pg_server.create_database(migrated=True)
    started = start_cluster(tmp_path_factory.mktemp("replicas"), echo_upstream, db_url)
    yield started
    stop_cluster(started)
    pg_server.drop_database(db_url)


@pytest.fixture
def own_cluster(
    tmp_path: Path, echo_upstream: Echo, pg_server: PgServer
) -> Iterator[Callable[..., Cluster]]:
    """A factory for a cluster of one test's own, on a database of its own."""
    started: list[Cluster] = []

    def start(**kwargs: Any) -> Cluster:
        db_url = pg_server.create_database(migrated=True)
        workdir = tmp_path / f"cluster{len(started)}"
        workdir.mkdir()
        one = start_cluster(workdir, echo_upstream, db_url, **kwargs)
        started.append(one)
        return one

    yield start
    for one in started:
        stop_cluster(one)
        pg_server.drop_database(one.db_url)


def session_from(address: str) -> aiohttp.ClientSession:
    """A client whose connections come from ``address`` (another 127.x IP: a client of its
    own for the per-IP limits)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0)))


async def login(
    s: aiohttp.ClientSession, base: str, email: str, password: str = PASSWORD
) -> tuple[int, dict[str, Any] | None, aiohttp.ClientResponse]:
    return await post_json(s, f"{base}/auth/login", {"email": email, "password": password})


async def refresh(
    s: aiohttp.ClientSession, base: str, token: str
) -> tuple[int, dict[str, Any] | None, aiohttp.ClientResponse]:
    return await post_json(s, f"{base}/auth/refresh", {"refresh_token": token})


async def api_get(s: aiohttp.ClientSession, url: str, token: str) -> tuple[int, Any]:
    async with s.get(url, headers={"Authorization": f"Bearer {token}"}) as resp:
        return resp.status, await resp.json(content_type=None)


def email(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:12]}@example.com"


# -- 1. one account, three replicas -------------------------------------------------------


async def test_register_login_use_and_refresh_on_different_replicas(cluster: Cluster) -> None:
    r1, r2, r3 = cluster.urls
    address = email("hop")
    async with aiohttp.ClientSession() as s:
        # One signing key for all: the replicas that started second read replica 1's key.
        jwks = []
        for url in cluster.urls:
            async with s.get(f"{url}/.well-known/jwks.json") as resp:
                jwks.append(await resp.json())
        assert jwks[0]["keys"] and jwks[0] == jwks[1] == jwks[2]

        status, user, _ = await post_json(
            s, f"{r1}/auth/register", {"email": address, "password": PASSWORD}
        )
        assert status == 201, user
        status, tokens, _ = await login(s, r2, address)
        assert status == 200 and tokens is not None, tokens

        status, echoed = await api_get(s, f"{r3}/api/hop", tokens["access_token"])
        assert status == 200 and received(echoed, "X-User-Id") == [user["id"]], echoed
        # Negative control: a token the replicas did not sign is refused by the same route.
        forged = tokens["access_token"][:-4] + (
            "AAAA" if tokens["access_token"][-4:] != "AAAA" else "BBBB"
        )
        assert (await api_get(s, f"{r3}/api/hop", forged))[0] == 401

        status, renewed, _ = await refresh(s, r1, tokens["refresh_token"])
        assert status == 200 and renewed is not None, renewed
        assert renewed["refresh_token"] != tokens["refresh_token"]
        status, echoed = await api_get(s, f"{r2}/api/again", renewed["access_token"])
        assert status == 200 and received(echoed, "X-User-Id") == [user["id"]]
        # The rotated-out token is spent for every replica, not just the one that spent it.
        assert (await refresh(s, r3, tokens["refresh_token"]))[0] == 401


# -- 2. the failed-login limit, counted in the database -----------------------------------


async def test_failed_login_limit_holds_across_replicas(cluster: Cluster) -> None:
    async with aiohttp.ClientSession() as s:
        target = await signed_in(s, cluster.urls[0], tag="locked")
        other = await signed_in(s, cluster.urls[1], tag="free")

    async with session_from("127.0.0.2") as s:
        statuses = []
        for attempt in range(LOGIN_LIMIT + REPLICAS):  # round robin: every replica in turn
            status, problem, resp = await login(
                s, cluster.urls[attempt % REPLICAS], target.email, "wrong password!"
            )
            statuses.append(status)
            if status == 429:
                assert int(resp.headers["Retry-After"]) > 0
                assert resp.headers["Content-Type"].startswith("application/problem+json")
        # Five in total, not five per replica; then every replica says 429.
        assert statuses == [401] * LOGIN_LIMIT + [429] * REPLICAS
        # Locked before any password check: the right password does not get through either.
        assert (await login(s, cluster.urls[2], target.email))[0] == 429

    # Negative control: the lock is on that account and that IP, not on everybody.
    async with session_from("127.0.0.3") as s:
        for url in cluster.urls:
            assert (await login(s, url, other.email))[0] == 200


async def test_concurrent_failed_logins_on_all_replicas_never_overrun_the_limit(
    cluster: Cluster,
) -> None:
    async with aiohttp.ClientSession() as s:
        target = await signed_in(s, cluster.urls[0], tag="burst")
    async with session_from("127.0.0.4") as s:
        attempts = [
            login(s, cluster.urls[i % REPLICAS], target.email, "wrong password!")
            for i in range(4 * REPLICAS)
        ]
        statuses = [status for status, _, _ in await asyncio.gather(*attempts)]
    assert set(statuses) <= {401, 429}, statuses
    # At most five passwords were checked, however the attempts interleaved.
    assert statuses.count(401) <= LOGIN_LIMIT, statuses


# -- 3. one refresh token, two replicas, same moment --------------------------------------


async def test_refresh_token_spent_on_two_replicas_at_once_one_wins_family_revoked(
    cluster: Cluster,
) -> None:
    r1, r2, r3 = cluster.urls
    async with aiohttp.ClientSession() as s:
        for _ in range(3):  # a few rounds: the two arrive in either order, or truly together
            account = await signed_in(s, r3, tag="race")
            first, second = await asyncio.gather(
                refresh(s, r1, account.refresh_token), refresh(s, r2, account.refresh_token)
            )
            results = sorted([first, second], key=lambda r: r[0])
            (win_status, won, _), (lose_status, lost, _) = results
            assert (win_status, lose_status) == (200, 401), (first[:2], second[:2])
            assert won is not None and lost is not None and lost["status"] == 401
            # Reuse revoked the whole family: the winner's fresh token is dead too.
            assert (await refresh(s, r3, won["refresh_token"]))[0] == 401

        # Negative control: one refresh at a time keeps the family alive across replicas.
        account = await signed_in(s, r3, tag="calm")
        status, renewed, _ = await refresh(s, r1, account.refresh_token)
        assert status == 200 and renewed is not None
        assert (await refresh(s, r2, renewed["refresh_token"]))[0] == 200


# -- load through HAProxy -----------------------------------------------------------------


@dataclass
class Op:
    rid: str  # X-Request-Id: HAProxy logs which replica served it
    kind: str  # register | get | stream
    email: str = ""


@dataclass
class Outcome:
    op: Op
    sent: float
    done: float = 0.0
    status: int | None = None  # None: no HTTP response at all
    error: str | None = None
    ok: bool = False  # the expected status, with a complete, correct body

    @property
    def failed(self) -> bool:
        """No response, or HAProxy's own 5xx (the gateway answers these ops with 2xx)."""
        return self.status is None or self.status >= 500


def plan(count: int, tag: str, *, get_every: int = 0, stream_every: int = 0) -> list[Op]:
    ops = []
    for i in range(count):
        rid = f"{tag}-{i}"
        if get_every and i % get_every == get_every - 1:
            ops.append(Op(rid, "get"))
        elif stream_every and i % stream_every == stream_every - 1:
            ops.append(Op(rid, "stream"))
        else:
            ops.append(Op(rid, "register", email(rid)))
    return ops


async def perform(s: aiohttp.ClientSession, base: str, op: Op, account: Account) -> Outcome:
    outcome = Outcome(op, time.monotonic())
    headers = {"X-Request-Id": op.rid}
    try:
        if op.kind == "register":
            body = {"email": op.email, "password": PASSWORD}
            async with s.post(f"{base}/auth/register", json=body, headers=headers) as resp:
                outcome.status, data = resp.status, await resp.read()
            outcome.ok = outcome.status == 201 and json.loads(data)["email"] == op.email
        elif op.kind == "get":
            headers.update(account.bearer)
            async with s.get(f"{base}/api/load/{op.rid}", headers=headers) as resp:
                outcome.status, data = resp.status, await resp.read()
            echoed = json.loads(data) if outcome.status == 200 else {}
            outcome.ok = outcome.status == 200 and (
                echoed["path"] == f"/api/load/{op.rid}"
                and received(echoed, "X-User-Id") == [account.user_id]
            )
        else:  # a streamed answer that takes a while: in flight when the signal comes
            headers.update(account.bearer)
            url = f"{base}/slow/{op.rid}/drip?pause=0.2"
            async with s.get(url, headers=headers) as resp:
                outcome.status, data = resp.status, await resp.read()
            outcome.ok = outcome.status == 200 and data == b"first\nsecond\n"
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
    outcome.done = time.monotonic()
    return outcome


class Load:
    """``ops`` through ``base`` by ``CONCURRENCY`` workers, in order; ops from ``gate_at``
    on wait for ``gate`` (so they are surely sent after some event)."""

    def __init__(self, base: str, ops: list[Op], account: Account, gate_at: int | None = None):
        self.base, self.ops, self.account = base, ops, account
        self.gate_at = len(ops) if gate_at is None else gate_at
        self.gate = asyncio.Event()
        self.outcomes: list[Outcome] = []
        self._next = 0

    async def run(self) -> list[Outcome]:
        timeout = aiohttp.ClientTimeout(total=15)
        async with aiohttp.ClientSession(timeout=timeout) as s:
            await asyncio.wait_for(
                asyncio.gather(*(self._worker(s) for _ in range(CONCURRENCY))), LOAD_TIMEOUT
            )
        return self.outcomes

    async def _worker(self, s: aiohttp.ClientSession) -> None:
        while self._next < len(self.ops):
            index, self._next = self._next, self._next + 1
            if index >= self.gate_at:
                await self.gate.wait()
            self.outcomes.append(await perform(s, self.base, self.ops[index], self.account))

    async def wait_done(self, count: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.outcomes) < count:
            assert time.monotonic() < deadline, f"only {len(self.outcomes)} of {count} done"
            await asyncio.sleep(0.01)


# -- 4. SIGKILL mid-load ------------------------------------------------------------------


async def test_sigkill_mid_load_loses_no_completed_write_and_lb_routes_around(
    own_cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    cluster = own_cluster()
    assert cluster.lb is not None
    victim, victim_name = cluster.replicas[1], "gw2"
    async with aiohttp.ClientSession() as s:
        account = await signed_in(s, cluster.lb.url, tag="reader")

    # 300 registrations and 60 authenticated GETs; the last 100 only once HAProxy has
    # marked the victim DOWN, so they prove the routing around it.
    ops = plan(360, "kill", get_every=6)
    load = Load(cluster.lb.url, ops, account, gate_at=len(ops) - 100)
    running = asyncio.create_task(load.run())
    try:
        await load.wait_done(len(ops) // 3)
        victim.proc.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        noticed = await asyncio.to_thread(cluster.lb.wait_state, victim_name, "DOWN", 3.0)
        load.gate.set()
        outcomes = await running
    finally:
        load.gate.set()
        running.cancel()
    await asyncio.to_thread(victim.proc.wait, 10)

    created = {o.op.email for o in outcomes if o.op.kind == "register" and o.status == 201}
    stored = {row[0] for row in await query(cluster.db_url, "SELECT email FROM users")}
    failed = [o for o in outcomes if o.failed]
    numbers = {
        "requests_sent": len(outcomes),
        "completed": len(outcomes) - len(failed),
        "failed": len(failed),
        "writes_answered_201": len(created),
        "writes_lost": len(created - stored),
        "failed_but_written": len({o.op.email for o in failed if o.op.kind == "register"} & stored),
        "failed_sent_after_kill": sum(1 for o in failed if o.sent >= killed_at),
        "lb_noticed_after_s": round(noticed, 2),
        "killed_after_requests": len(ops) // 3,
        "concurrency": CONCURRENCY,
        "failures": [
            f"{o.op.rid} sent {1000 * (o.sent - killed_at):+.0f} ms from the kill: "
            + (o.error or f"HTTP {o.status}")
            for o in failed
        ],
    }
    report(tmp_path / "replica-sigkill.json", "SIGKILL one of 3 replicas mid-load", numbers)

    assert len(outcomes) == len(ops)
    assert numbers["writes_lost"] == 0, sorted(created - stored)
    # Everything that got an answer got the right one.
    wrong = [o for o in outcomes if not o.failed and not o.ok]
    assert not wrong, wrong[:5]
    # Only requests caught on the victim failed: in flight at the kill, or handed to a
    # keep-alive connection to it before HAProxy saw that connection die (HAProxy then closes
    # the client's connection without a response or a log line, as a server would). At most
    # one per client connection, none on the survivors, none after HAProxy marked it DOWN.
    served = cluster.lb.served_by()
    down_at = killed_at + noticed
    assert len(failed) <= CONCURRENCY, failed
    for o in failed:
        assert o.sent < down_at, o
        assert served.get(o.op.rid) in (victim_name, None), (o, served.get(o.op.rid))
    # Routed around: the last 100, all sent after HAProxy marked it DOWN, all succeeded.
    tail = [o for o in outcomes if int(o.op.rid.rsplit("-", 1)[1]) >= len(ops) - 100]
    assert len(tail) == 100 and all(o.ok for o in tail)
    assert all(served.get(o.op.rid) != victim_name for o in tail)
    # Negative control: the load really ran through the victim before the kill.
    assert sum(1 for o in outcomes if served.get(o.op.rid) == victim_name and o.ok) > 10


def report(path: Path, title: str, numbers: dict[str, Any]) -> None:
    """One line on stdout (pytest -s or a failure shows it) and the same as JSON."""
    path.write_text(json.dumps({"test": title, **numbers}, indent=2) + "\n")
    summary = ", ".join(f"{key}={value}" for key, value in numbers.items())
    print(f"\n{title}: {summary} (saved in {path})")


# -- 5. PostgreSQL stopped and started again ---------------------------------------------


@pytest.fixture
def own_pg() -> Iterator[PgServer]:
    server = started_server()
    try:
        yield server
    finally:
        server.destroy()


async def timed_post(
    s: aiohttp.ClientSession, url: str, body: dict[str, str]
) -> tuple[int, str, float]:
    started = time.monotonic()
    async with s.post(url, json=body) as resp:
        await resp.read()
        return resp.status, resp.headers.get("Content-Type", ""), time.monotonic() - started


async def readyz(s: aiohttp.ClientSession, base: str) -> int:
    async with s.get(f"{base}/readyz") as resp:
        return resp.status


async def test_postgres_down_accounts_503_tokens_still_work_then_recover_without_restart(
    tmp_path: Path, echo_upstream: Echo, own_pg: PgServer
) -> None:
    cluster = start_cluster(
        tmp_path, echo_upstream, own_pg.create_database(migrated=True), lb=False
    )
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as s:
            account = await signed_in(s, cluster.urls[0], tag="before")
            assert [await readyz(s, url) for url in cluster.urls] == [200] * REPLICAS

            await asyncio.to_thread(own_pg.stop, "fast")
            for url in cluster.urls:
                await database_down_behaviour(s, url, account)

            await asyncio.to_thread(own_pg.start)
            for url in cluster.urls:
                await wait_ready(s, url)
                fresh = await signed_in(s, url, tag="after")
                status, echoed = await api_get(s, f"{url}/api/after", fresh.access_token)
                assert status == 200 and received(echoed, "X-User-Id") == [fresh.user_id]
            for gw in cluster.replicas:
                assert gw.proc.poll() is None  # recovered in place, never restarted
    finally:
        stop_cluster(cluster)


async def database_down_behaviour(s: aiohttp.ClientSession, url: str, account: Account) -> None:
    for path, body in [
        ("login", {"email": account.email, "password": PASSWORD}),
        ("register", {"email": email("down"), "password": PASSWORD}),
    ]:
        status, content_type, took = await timed_post(s, f"{url}/auth/{path}", body)
        assert status == 503 and took < 3, (url, path, status, took)
        assert content_type.startswith("application/problem+json")
    assert await readyz(s, url) == 503
    # Token checks need no database: the request is still proxied, with the identity.
    status, echoed = await api_get(s, f"{url}/api/still", account.access_token)
    assert status == 200 and received(echoed, "X-User-Id") == [account.user_id], echoed


async def wait_ready(s: aiohttp.ClientSession, url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while await readyz(s, url) != 200:
        assert time.monotonic() < deadline, f"{url} not ready {timeout}s after PostgreSQL is back"
        await asyncio.sleep(0.1)


# -- 6. SIGTERM under load ----------------------------------------------------------------


@pytest.fixture
def slow_upstream(tmp_path: Path) -> Iterator[Upstream]:
    started, proc = start_upstream("slow", tmp_path / "slow-upstream.log")
    yield started
    stop_process(proc)


async def test_sigterm_under_load_completes_every_request_that_reached_it(
    own_cluster: Callable[..., Cluster], slow_upstream: Upstream
) -> None:
    cluster = own_cluster(routes=ROUTES + SLOW_ROUTE.replace("{slow}", slow_upstream.url))
    assert cluster.lb is not None
    victim, victim_name = cluster.replicas[1], "gw2"
    async with aiohttp.ClientSession() as s:
        account = await signed_in(s, cluster.lb.url, tag="term")

    ops = plan(240, "term", get_every=4, stream_every=3)
    load = Load(cluster.lb.url, ops, account)
    running = asyncio.create_task(load.run())
    try:
        await load.wait_done(len(ops) // 3)
        victim.proc.send_signal(signal.SIGTERM)
        signalled_at = time.monotonic()
        outcomes = await running
    finally:
        running.cancel()
    assert await asyncio.to_thread(victim.proc.wait, 15) == 0

    assert len(outcomes) == len(ops)
    served = cluster.lb.served_by()
    bad = [o for o in outcomes if not o.ok]
    # A request HAProxy wrote to a keep-alive connection at the moment the draining replica
    # closed it gets no response and leaves no log line anywhere: say so when it happens.
    unlogged = [o.op.rid for o in bad if o.status is None and o.op.rid not in served]
    assert not bad, (f"{len(bad)} failed; with no response nor log line: {unlogged}", bad[:5])
    # What reached the victim according to HAProxy is what the victim logged, all answered.
    reached = {rid for rid, name in served.items() if name == victim_name}
    logged = access_log(victim)
    assert reached <= set(logged), sorted(reached - set(logged))[:5]
    assert all(logged[rid] < 500 for rid in reached), {rid: logged[rid] for rid in reached}
    # Negative control: requests really were in flight on the victim when it was signalled.
    caught = [o for o in outcomes if o.op.rid in reached and o.sent < signalled_at < o.done]
    assert caught, "no request was in flight on the victim at SIGTERM"


def access_log(gw: Gateway) -> dict[str, int]:
    """Request id -> status, from the replica's JSON access log lines."""
    statuses = {}
    for line in gw.log().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if "request_id" in entry and "status" in entry:
                statuses[entry["request_id"]] = entry["status"]
    return statuses
