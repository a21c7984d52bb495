"""The benchmark harness (bench/run.py) runs end to end and reports sane figures.

Not a benchmark: a one-second run of the upstream direct and the one-worker gateway, through
the harness's own command line, must print the table and write the JSON with requests
counted, no wrk errors and the same-run ratios computed. The negative controls: the harness's
sanity check refuses a "verifier" that lets every request through (it would look fast), and a
load that is answered non-2xx is counted as errors and fails the run's exit code.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import jwt
import pytest

from tests import threaded_http

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "bench" / "run.py"


def load_harness() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_run", RUN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def harness() -> ModuleType:
    # A missing tool fails loudly: a skipped smoke run would prove nothing.
    for tool in ("wrk", "nginx", "taskset"):
        assert shutil.which(tool), f"{tool} is not installed (scripts/test installs it)"
    return load_harness()


def test_quick_run_prints_the_table_and_writes_sane_json(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    args = [
        "--quick",
        "--duration",
        "1s",
        "--warmup",
        "1s",
        "--scenarios",
        "one-token",
        "--targets",
        "direct,gw-1",
        "--out",
        str(out),
    ]
    run = subprocess.run(
        [sys.executable, str(RUN), *args], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert run.returncode == 0, run.stderr[-3000:]

    lines = run.stdout.splitlines()
    assert lines[0].split()[:4] == ["scenario", "target", "conns", "req/s"]
    assert any(line.startswith("one-token") and " gw-1 " in line for line in lines)
    assert f"results: {out}" in lines

    report = json.loads(out.read_text())
    rows = {m["target"]: m for m in report["measurements"]}
    assert set(rows) == {"direct", "gw-1"}
    for row in rows.values():
        assert row["requests"] > 0 and row["rps"] > 0, row
        assert row["errors"] == {}, row
        assert 0 < row["p50_ms"] <= row["p99_ms"] <= row["max_ms"], row
        assert row["cpu_us_per_request"] > 0, row
        assert row["load_cores"] > 0, row  # wrk at least: it did the load
        if row["target"] == "gw-1":
            assert len(row["loop_running"]) == 1 and 0 < row["loop_running"][0] <= 1.05, row
        assert row["rss_mb_per_worker"] and all(mb > 0 for mb in row["rss_mb_per_worker"]), row
    direct, gateway = rows["direct"], rows["gw-1"]
    assert direct["ratios"]["direct"]["rps"] == 1.0
    assert gateway["ratios"]["direct"]["rps"] == pytest.approx(
        gateway["rps"] / direct["rps"], abs=0.01
    )
    assert gateway["ratios"]["haproxy-jwt"]["rps"] is None  # not measured in this run


@pytest.fixture
def lab(harness: ModuleType, tmp_path: Path) -> Iterator[object]:
    """The upstream and the one-worker gateway, started as bench/run.py starts them."""
    opts = harness.Options(
        1.0, 1.0, 8, ["one-token"], ["direct", "gw-1"], 10, tmp_path / "out.json", False
    )
    procs = harness.Processes()
    lab = harness.Lab(opts, tmp_path, procs)
    try:
        lab.start()
        yield lab
    finally:
        procs.stop_all()


def test_a_verifier_that_lets_everything_through_is_refused(
    harness: ModuleType, lab: object
) -> None:
    gateway = lab.targets["gw-1"]  # type: ignore[attr-defined]
    harness.check_target(lab, gateway)  # the real verifier passes the check

    # The upstream itself answers 200 to anything: as a "verifier" it must fail the check.
    direct = lab.targets["direct"]  # type: ignore[attr-defined]
    fake = harness.Target("fake-jwt", "nginx", authenticates=True, pinned=False)
    with pytest.raises(harness.SetupError, match="X-User-Id"):
        harness.check_target(lab, harness.Running(fake, direct.url, direct.process))


def test_a_node_server_that_skips_the_signature_is_refused(
    harness: ModuleType, lab: object
) -> None:
    """The tutorial's server is only a yardstick if it verifies: one that reads the token's
    ``sub`` without checking the signature answers the right user and must still fail."""

    class Careless(threaded_http.Handler):
        def do_GET(self) -> None:
            token = self.headers.get("Authorization", "").removeprefix("Bearer ")
            if not token:
                self.answer(401)
                return
            # Reads the claims without checking the signature: the careless server under test.
            sub = jwt.decode(token, options={"verify_signature": False})["sub"]
            self.answer(200, json.dumps({"id": sub}).encode())

    direct = lab.targets["direct"]  # type: ignore[attr-defined]
    with threaded_http.serving(Careless) as url:
        running = harness.Running(harness.TARGETS["node"], url, direct.process)
        with pytest.raises(harness.SetupError, match="another secret answered 200"):
            harness.check_target(lab, running)


def test_the_gateway_is_judged_against_node_of_the_same_run() -> None:
    harness = load_harness()

    def measured(scenario: str, target: str, rps: float) -> object:
        return harness.Measurement(
            scenario, target, 64, 10.0, int(rps * 10), rps, 1.0, 2.0, 3.0, 4.0, 500.0, [60.0], {}
        )

    results = [
        measured("one-token", "gw-1", 4000),
        measured("one-token", "node", 1600),
        measured("tokens-10k", "gw-1", 3000),
    ]
    assert harness.node_lines(results) == [
        "gw-1 against the tutorial's Node /profile (1,600 req/s, 500 us a request, same run): x2.50"
    ]
    assert harness.node_lines(results[:1]) == []  # no Node measured: no ratio


def test_non_2xx_answers_are_counted_as_errors(harness: ModuleType, lab: object) -> None:
    gateway = lab.targets["gw-1"]  # type: ignore[attr-defined]
    workdir = lab.workdir  # type: ignore[attr-defined]
    no_token = harness.Load(harness.ROUTE, 4, harness.wrk_script(workdir, None))
    result = harness.run_wrk(gateway.url, no_token, 1.0, None)
    errors = harness.wrk_errors(result)
    assert result["requests"] > 0
    assert errors.get("non-2xx/3xx") == result["requests"], errors

    measurement = harness.Measurement(
        "one-token", "gw-1", 4, 1.0, 10, 10.0, 1.0, 1.0, 1.0, 1.0, 1.0, [1.0], errors
    )
    assert harness.failures([measurement]) == ["one-token/gw-1"]  # the run exits 2
    assert "non-2xx/3xx" in harness.table([measurement])
    clean = harness.Measurement(
        "one-token", "gw-1", 4, 1.0, 10, 10.0, 1.0, 1.0, 1.0, 1.0, 1.0, [1.0], {}
    )
    assert harness.failures([clean]) == []


def test_the_in_process_harness_runs_the_real_request_path() -> None:
    """bench/inprocess.py fakes the sockets but must drive the real edge, gateway and pool:
    a path it no longer reaches (an internal renamed) fails here, not on the next run."""
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "inprocess.py"),
            "--requests",
            "300",
            "--rounds",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("CPU per request, µs: "), done.stdout
    best = float(done.stdout.rsplit("best ", 1)[1])
    assert 1 < best < 100_000  # a figure, not a skipped loop (every answer was the upstream's)


def test_two_workers_are_also_judged_per_whole_core() -> None:
    """On two CPUs the second worker shares its core with wrk and the upstream: besides the
    measured ratio, the CPU per request says what two whole cores would give."""
    harness = load_harness()

    def measured(target: str, rps: float, cpu: float, workers: int) -> object:
        return harness.Measurement(
            "one-token",
            target,
            64,
            10.0,
            int(rps * 10),
            rps,
            1.0,
            2.0,
            3.0,
            4.0,
            cpu,
            [60.0] * workers,
            {},
        )

    lines = harness.worker_lines([measured("gw-1", 5000, 200, 1), measured("gw-all", 7000, 220, 2)])
    assert lines == [
        "2 workers, one-token: x1.40 gw-1 measured, on 1.54 cores (wrk and the upstream had "
        "the rest); 220 us of CPU a request against gw-1's 200, so 2 whole cores = x1.82 one"
    ]
    assert harness.worker_lines([measured("gw-all", 7000, 220, 2)]) == []  # no gw-1 to judge by
    two = measured("gw-all", 7000, 220, 2)
    two.load_cores = 0.45  # measured: wrk's and the upstream's CPU in the same window
    two.loop_running, two.loop_waiting = [0.72, 0.75], [0.27, 0.24]  # short of CPU, not work
    line = harness.worker_lines([measured("gw-1", 5000, 200, 1), two])[0]
    assert "(wrk and the upstream had 0.45)" in line
    assert line.endswith("; each loop ran + waited for a CPU: 72% + 27%, 75% + 24% of the time")
