"""Real nginx and Caddy for black-box tests, run from the operator snippets in docs/forward-auth.

Each proxy is a foreground child process of the test, on a free loopback port, with every file
it writes (pid, logs, temp bodies, Caddy's data and config dirs) under the test's own directory.
The snippet runs as shipped: only its ``{{PLACEHOLDERS}}`` are filled in. What a process of its
own needs (nginx: pid, temp paths, events; Caddy: no admin API, no automatic HTTPS) lives in an
outer file that includes the snippet, so the tests prove the documented file itself.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.blackbox.conftest import stop_process_group
from tests.ports import free_port

SNIPPETS = Path(__file__).resolve().parents[2] / "docs" / "forward-auth"
NGINX_SNIPPET = SNIPPETS / "nginx.conf"
CADDY_SNIPPET = SNIPPETS / "Caddyfile"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
CADDY = shutil.which("caddy") or "/usr/bin/caddy"
START_TIMEOUT = 15.0  # seconds until the port must accept connections
STOP_TIMEOUT = 10.0

PLACEHOLDER = re.compile(r"\{\{[A-Z_]+\}\}")

# Process-local settings only; the snippet is included unchanged. As root (CI containers) the
# workers stay root: as `nobody` they could not reach temp dirs inside a 0700 pytest tmp dir.
NGINX_OUTER = """\
{user}
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {work}/access.log;
    client_body_temp_path {work}/temp/body;
    proxy_temp_path {work}/temp/proxy;
    fastcgi_temp_path {work}/temp/fastcgi;
    uwsgi_temp_path {work}/temp/uwsgi;
    scgi_temp_path {work}/temp/scgi;
    include {snippet};
}}
"""

# Global options only: no admin endpoint, no certificates, listeners on loopback only.
CADDY_OUTER = """\
{{
    admin off
    auto_https off
    default_bind 127.0.0.1
}}
import {snippet}
"""


@dataclass
class Proxy:
    kind: str
    url: str
    workdir: Path
    proc: subprocess.Popen[bytes]

    def log(self) -> str:
        """Everything the proxy wrote (stdout/stderr and, for nginx, its error log)."""
        parts = [p.read_text(errors="replace") for p in sorted(self.workdir.glob("*.log"))]
        return "\n".join(parts)


def render(template: str, values: Mapping[str, str]) -> str:
    """``template`` with each ``{{KEY}}`` replaced; a placeholder left over is an error."""
    text = template
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    left = PLACEHOLDER.findall(text)
    if left:
        raise ValueError(f"placeholders without a value: {sorted(set(left))}")
    return text


def _nginx_files(workdir: Path, snippet: str) -> list[str]:
    (workdir / "temp").mkdir()
    (workdir / "forward-auth.conf").write_text(snippet)
    user = f"user {pwd.getpwuid(0).pw_name};" if os.geteuid() == 0 else ""
    outer = NGINX_OUTER.format(user=user, work=workdir, snippet=workdir / "forward-auth.conf")
    (workdir / "nginx.conf").write_text(outer)
    conf = str(workdir / "nginx.conf")
    return [NGINX, "-p", str(workdir), "-c", conf, "-e", str(workdir / "error.log"),
            "-g", "daemon off;"]  # fmt: skip


def _caddy_files(workdir: Path, snippet: str) -> list[str]:
    (workdir / "site.Caddyfile").write_text(snippet)
    (workdir / "Caddyfile").write_text(CADDY_OUTER.format(snippet=workdir / "site.Caddyfile"))
    return [CADDY, "run", "--config", str(workdir / "Caddyfile"), "--adapter", "caddyfile"]


# kind: (snippet, writes the files and returns the command, the {{LISTEN}} value)
KINDS = {
    "nginx": (NGINX_SNIPPET, _nginx_files, "127.0.0.1:{port}"),
    "caddy": (CADDY_SNIPPET, _caddy_files, "http://127.0.0.1:{port}"),
}


def start_proxy(
    kind: str, workdir: Path, *, gateway: str, upstream: str, template: str | None = None
) -> Proxy:
    """Start ``kind`` ("nginx" | "caddy") from its snippet (or ``template``, a variant of it)
    in front of ``upstream``, asking ``gateway``; return once it accepts connections."""
    snippet_path, write_files, listen = KINDS[kind]
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    values = {"LISTEN": listen.format(port=port), "GATEWAY": gateway, "UPSTREAM": upstream}
    snippet = render(template if template is not None else snippet_path.read_text(), values)
    args = write_files(workdir, snippet)
    # Caddy writes to $HOME / XDG dirs (autosave, certificates): keep them in the test's dir.
    env = dict(
        os.environ,
        HOME=str(workdir),
        XDG_DATA_HOME=str(workdir / "data"),
        XDG_CONFIG_HOME=str(workdir / "config"),
    )
    with open(workdir / "process.log", "ab") as out:
        # A session of its own: stop_proxy can end nginx's workers with their master.
        proc = subprocess.Popen(
            args, cwd=workdir, stdout=out, stderr=out, env=env, start_new_session=True
        )
    proxy = Proxy(kind, f"http://127.0.0.1:{port}", workdir, proc)
    try:
        _wait_listening(port, proc)
    except RuntimeError as err:
        stop_proxy(proxy)
        raise RuntimeError(f"{kind} did not start: {err}\n{proxy.log()}") from None
    return proxy


def _wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} not listening within {START_TIMEOUT}s")


def stop_proxy(proxy: Proxy) -> None:
    """SIGTERM (nginx: fast shutdown, its workers exit with it); SIGKILL to the process group
    we created if it does not exit in time (the leader is not reaped yet, so the group id is
    still ours)."""
    stop_process_group(proxy.proc, STOP_TIMEOUT)


@contextmanager
def running_proxy(
    kind: str, workdir: Path, *, gateway: str, upstream: str, template: str | None = None
) -> Iterator[Proxy]:
    proxy = start_proxy(kind, workdir, gateway=gateway, upstream=upstream, template=template)
    try:
        yield proxy
    finally:
        stop_proxy(proxy)
