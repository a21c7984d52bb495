"""Ports for the servers the tests start, never one another's.

Asking the kernel for a free port (bind to 0, then close) and starting a server on it later
races: meanwhile another test process (pytest-xdist runs several), binding to 0 itself, may be
handed the same port, and a test then talks to the wrong server (a gateway that could not bind
exits, and the other server answers its health check). Each test process takes its ports from
a range of its own below the kernel's ephemeral range (32768-60999), where no bind to 0 lands;
it starts at a random place in its range, so that two test sessions running at once (a
developer's and CI's) do not walk the same ports in step.
"""

from __future__ import annotations

import os
import random
import socket

__all__ = ["free_port"]

FIRST_PORT = 12_000
PORTS_PER_PROCESS = 2_000  # far more than one process's servers in a run


def _process_index() -> int:
    name = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1"... or unset
    digits = name.removeprefix("gw")
    return int(digits) % 8 if digits.isdigit() else 8  # 12000-29999: below 32768


_BASE = FIRST_PORT + _process_index() * PORTS_PER_PROCESS
_next = random.randrange(PORTS_PER_PROCESS)


def free_port() -> int:
    """A port of this process's range that nothing is bound to now (and that this process
    has not handed out before, until the range wraps around)."""
    global _next
    for _ in range(PORTS_PER_PROCESS):
        port = _BASE + _next
        _next = (_next + 1) % PORTS_PER_PROCESS
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use, or lingering from an earlier run
            return port
    raise RuntimeError(f"no free port in {_BASE}-{_BASE + PORTS_PER_PROCESS - 1}")
