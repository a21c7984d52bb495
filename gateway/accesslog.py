"""The access log: one JSON object per line, per request, written after the response is sent.

A line holds what an operator needs to follow one request through the gateway and its
upstream, and nothing a log reader could abuse: no tokens, no passwords, no cookies, no query
strings (they may carry secrets). The client-chosen parts (the path, cut at 1 KiB, and the
request id) are JSON-escaped, so one request is always exactly one line (UTF-8 JSON).

The request handler notes what it learns on the :class:`~gateway.server.Exchange` (route,
caller, auth outcome, upstream time); the edge calls :func:`write_line` once the response is
complete, so ``bytes`` is what was sent to the client, status line and headers included
(nginx's ``$bytes_sent``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import BinaryIO, TextIO

import orjson

from gateway.server import Exchange

__all__ = ["ACCESS_LOGGER", "send_to", "write_line"]

ACCESS_LOGGER = logging.getLogger("gateway.access")

_PID = os.getpid()
MAX_PATH = 1024  # a log line stays a line, not a megabyte


_stream: BinaryIO | None = None  # set by send_to: lines are written to it directly


def send_to(stream: TextIO) -> None:
    """Write access lines, bare (one JSON object each), to ``stream``; the gateway's other
    logs stay on their own handler (stderr), so stdout is a clean stream of JSON lines.

    The lines bypass the logging machinery (a LogRecord, handler lock and formatter cost
    more than the line itself, on every request); without ``send_to`` they go to the
    ``gateway.access`` logger like any other record."""
    global _stream
    stream.flush()
    _stream = stream.buffer
    ACCESS_LOGGER.setLevel(logging.INFO)
    ACCESS_LOGGER.propagate = False


def write_line(exchange: Exchange, seconds: float) -> None:
    """The access line of one finished exchange."""
    if _stream is None and not ACCESS_LOGGER.isEnabledFor(logging.INFO):
        return
    line = {
        "time": _utc_now(),
        "request_id": exchange.request_id or None,
        "pid": _PID,  # which worker, when there are several
        "remote": exchange.remote,
        "method": exchange.method,
        "path": _path_of(exchange.target)[:MAX_PATH],
        "route": exchange.route,
        "status": exchange.status,
        "bytes": exchange.bytes_sent,
        "duration_ms": round(seconds * 1e6) / 1000,  # (round(x, 3) costs five times more)
        "upstream_ms": _ms(exchange.upstream_seconds),
        "user_id": exchange.user_id,
        "auth": exchange.auth,
        "auth_reason": exchange.auth_reason,
    }
    # orjson: the line costs a microsecond or two, where json.dumps took tens.
    data = orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE)
    if _stream is None:
        ACCESS_LOGGER.info(data[:-1].decode())
        return
    # Lines are visible at once (container logs), yet written once per event-loop turn: under
    # load many requests finish in one turn, and each write is a system call. They wait as
    # bytes in one buffer: orjson's own bytes object is a kilobyte, whatever the line's length.
    if not _pending:
        asyncio.get_running_loop().call_soon(_flush)
    _pending.extend(data)


_pending = bytearray()


def _flush() -> None:
    if _stream is None:
        return
    _stream.write(_pending)
    _pending.clear()
    _stream.flush()


def _path_of(target: str) -> str:
    if not target.startswith("/"):  # absolute-form: the origin is not part of the path
        target = "/" + target.partition("://")[2].partition("/")[2]
    return target.partition("?")[0].partition("#")[0]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e6) / 1000


_second: tuple[int, str] = (0, "")
_MILLISECONDS = tuple(f".{ms:03d}Z" for ms in range(1000))  # formatting them cost a µs a line


def _utc_now() -> str:
    """ISO 8601 UTC with milliseconds; the date part formatted once per second."""
    global _second
    now = time.time()
    whole = int(now)
    if _second[0] != whole:
        _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    return _second[1] + _MILLISECONDS[int((now - whole) * 1000)]
