"""The ``gateway`` command line, run as an operator would: a subprocess, exit codes, stderr."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ports import free_port

BASE = """\
server:
  port: 18080
database:
  url: sqlite:///data/gateway.db
tokens:
  keys_dir: data/keys
accounts:
  bcrypt_rounds: 4
routes:
  - name: api
    path: /api
    upstream: http://127.0.0.1:9000
  - name: docs
    host: docs.example.com
    path: /
    upstream: http://127.0.0.1:9001/site
    auth: public
"""


def run(cwd: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "gateway.yaml").write_text(BASE)
    return tmp_path


def test_check_config_ok(workdir: Path) -> None:
    result = run(workdir, "check-config", "-c", "gateway.yaml")
    assert (result.returncode, result.stdout.strip(), result.stderr) == (0, "ok", "")


BROKEN = [
    ("server:\n  port: eighty\n" + BASE.split("\n", 2)[2], 2, "server.port"),
    (BASE.replace("  port: 18080", "  port: 18080\n  colour: blue"), 3, "server.colour"),
    (
        BASE.replace("upstream: http://127.0.0.1:9000", "upstream: ftp://x"),
        12,
        "routes[0].upstream",
    ),
    (
        BASE.replace("  - name: api\n    path: /api", "  - name: api\n    path: api"),
        11,
        "routes[0].path",
    ),
    (BASE.replace("    auth: public", "    auth: maybe"), 17, "routes[1].auth"),
    (BASE.replace("name: docs", "name: api"), 13, "routes[1].name"),
    (
        BASE + "  - name: api2\n    path: /api\n    upstream: http://127.0.0.1:9000\n",
        18,
        "routes[2]",
    ),
    (
        BASE.replace("  keys_dir: data/keys", "  keys_dir: data/keys\n  algorithm: HS256"),
        7,
        "tokens.secret",
    ),
    (
        BASE.replace("  bcrypt_rounds: 4", "  bcrypt_rounds: 4\n  login_rate_limit: lots"),
        9,
        "accounts.login_rate_limit",
    ),
    (
        BASE.replace("  keys_dir: data/keys", "  keys_dir: data/keys\n  access_ttl: 15 minutes"),
        7,
        "tokens.access_ttl",
    ),
    (BASE.split("routes:")[0] + "routes: []\n", 9, "routes"),
    (BASE.replace("  url: sqlite:///data/gateway.db", "  url: mysql://db/x"), 4, "database.url"),
    (BASE.replace("  port: 18080", "  port: ${NOT_SET_ANYWHERE}"), 2, "server.port"),
    (
        BASE.replace("  bcrypt_rounds: 4", "  bcrypt_rounds: 4\n  registration: sometimes"),
        9,
        "accounts.registration",
    ),
]


@pytest.mark.parametrize(("text", "line", "path"), BROKEN)
def test_check_config_points_at_the_mistake(workdir: Path, text: str, line: int, path: str) -> None:
    (workdir / "bad.yaml").write_text(text)
    result = run(workdir, "check-config", "-c", "bad.yaml")
    assert result.returncode == 1
    assert result.stdout == ""
    first = result.stderr.splitlines()[0]
    assert first.startswith(f"bad.yaml:{line}: {path}"), result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_on_a_missing_file(workdir: Path) -> None:
    result = run(workdir, "check-config", "-c", "nope.yaml")
    assert result.returncode == 1
    assert result.stderr.startswith("nope.yaml:")
    assert len(result.stderr.strip().splitlines()) == 1


def test_routes_in_match_order(workdir: Path) -> None:
    result = run(workdir, "routes", "-c", "gateway.yaml")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[0].split()[0] == "NAME"
    assert [line.split()[0] for line in lines[1:]] == ["docs", "api"]  # host-specific first


def test_explain(workdir: Path) -> None:
    result = run(workdir, "explain", "GET", "http://localhost/api/x?y=1", "-c", "gateway.yaml")
    assert result.returncode == 0, result.stderr
    assert "route:    api" in result.stdout
    assert "refused:  401" in result.stdout
    result = run(workdir, "explain", "GET", "http://docs.example.com/guide", "-c", "gateway.yaml")
    assert "route:    docs" in result.stdout
    assert "forward:  GET http://127.0.0.1:9001/site/guide" in result.stdout
    result = run(workdir, "explain", "GET", "http://localhost/api/%2e%2e%2fx", "-c", "gateway.yaml")
    assert "refused:  400" in result.stdout


def test_users_lifecycle(workdir: Path) -> None:
    c = ("-c", "gateway.yaml")
    added = run(
        workdir,
        "users",
        "add",
        "ops@example.com",
        "--name",
        "Ops",
        "--roles",
        "admin,user",
        "--password-stdin",
        *c,
        stdin="a long password\n",
    )
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["roles"] == ["admin", "user"]
    dup = run(
        workdir,
        "users",
        "add",
        "OPS@example.com",
        "--password-stdin",
        *c,
        stdin="a long password\n",
    )
    assert dup.returncode == 1 and dup.stderr.startswith("gateway: ")
    assert "ops@example.com" in run(workdir, "users", "list", *c).stdout
    assert run(workdir, "users", "disable", "ops@example.com", *c).returncode == 0
    assert "disabled" in run(workdir, "users", "list", *c).stdout
    assert run(workdir, "users", "enable", "ops@example.com", *c).returncode == 0
    roles = run(workdir, "users", "roles", "ops@example.com", "auditor", *c)
    assert roles.returncode == 0 and "auditor" in roles.stdout
    assert "admin" not in run(workdir, "users", "list", *c).stdout
    missing = run(workdir, "users", "disable", "ghost@example.com", *c)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr


def test_users_add_without_a_terminal_needs_password_stdin(workdir: Path) -> None:
    result = run(workdir, "users", "add", "x@example.com", "-c", "gateway.yaml", stdin="")
    assert result.returncode == 1
    assert "--password-stdin" in result.stderr


def test_keys_rotate_and_remove(workdir: Path) -> None:
    c = ("-c", "gateway.yaml")
    first = run(workdir, "keys", "rotate", *c)
    assert first.returncode == 0, first.stderr
    second = run(workdir, "keys", "rotate", *c)
    listing = run(workdir, "keys", "list", *c).stdout.splitlines()
    assert len(listing) == 2 and listing[-1].endswith("(signing)")
    old_kid = listing[0].split()[0]
    assert run(workdir, "keys", "remove", old_kid, *c).returncode == 0
    assert old_kid not in run(workdir, "keys", "list", *c).stdout
    for pem in (workdir / "data" / "keys").iterdir():
        assert pem.stat().st_mode & 0o777 == 0o600
    assert second.returncode == 0


def test_bad_usage_exits_non_zero_with_one_line(workdir: Path) -> None:
    result = run(workdir, "frobnicate")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_demo_answers_its_own_walkthrough(tmp_path: Path) -> None:
    """`gateway demo` on the shipped demo config (ports moved so tests can run anywhere)."""
    import time
    import urllib.request

    port, echo, admin = free_port(), free_port(), free_port()
    shipped = (Path(__file__).parent.parent / "config" / "gateway.yaml").read_text()
    config = (
        shipped.replace("${GATEWAY_PORT:-8080}", str(port))
        .replace("127.0.0.1:9000", f"127.0.0.1:{echo}")
        .replace("port: 9091", f"port: {admin}")
        .replace("bcrypt_rounds: 12", "bcrypt_rounds: 4")
    )
    (tmp_path / "demo.yaml").write_text(config)
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "demo", "-c", "demo.yaml"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"

    def call(path: str, body: dict | None = None, token: str | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(base + path, data=data, method="POST" if data else "GET")
        req.add_header("Content-Type", "application/json")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(base + "/healthz", timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "demo did not start"
                time.sleep(0.1)
        creds = {"email": "ada@example.com", "password": "correct horse battery"}
        call("/auth/register", creds)
        token = call("/auth/login", creds)["access_token"]
        echoed = call("/api/hello", token=token)
        names = {name.lower(): value for name, value in echoed["headers"]}
        assert names["x-user-email"] == "ada@example.com" and names["x-user-roles"] == "user"
        assert call("/auth/profile", token=token)["email"] == "ada@example.com"
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=15)
    assert "curl" in output and f"{base}/auth/register" in output
