"""The access log: one JSON object per line, per request, written after the response is sent.

A line holds what an operator needs to follow one request through the gateway and its
upstream, and nothing a log reader could abuse: no tokens, no passwords, no cookies, no query
strings (they may carry secrets). The client-chosen parts (the path, cut at 1 KiB, and the
request id) are JSON-escaped, so one request is always exactly one line (UTF-8 JSON).

The request handler notes what it learns on the request (``note_*`` below); aiohttp calls
:class:`JsonAccessLogger` once the response is complete, so ``bytes`` is what was sent to the
client, status line and headers included (nginx's ``$bytes_sent``).
"""

from __future__ import annotations

import logging
import os
import time
from typing import BinaryIO, TextIO

import orjson
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest

from gateway.middleware import REQUEST_ID

__all__ = [
    "ACCESS_LOGGER",
    "AUTH",
    "JsonAccessLogger",
    "note_auth",
    "note_route",
    "send_to",
    "note_upstream",
]

ACCESS_LOGGER = logging.getLogger("gateway.access")

_PID = os.getpid()
MAX_PATH = 1024  # a log line stays a line, not a megabyte

# What the gateway found out about one request, noted on the request object.
ROUTE = web.RequestKey("access_route", str)
USER_ID = web.RequestKey("access_user_id", str)
AUTH = web.RequestKey("access_auth", str)
AUTH_REASON = web.RequestKey("access_auth_reason", str)
UPSTREAM_SECONDS = web.RequestKey("access_upstream_seconds", float)


def note_route(request: web.Request, route: str) -> None:
    request[ROUTE] = route


def note_auth(
    request: web.Request, outcome: str, *, user_id: str | None = None, reason: str | None = None
) -> None:
    """``outcome``: ``ok`` (a verified caller), ``none`` (no credential looked at),
    ``refused`` (401) or ``forbidden`` (403); ``reason`` the error code for the last two."""
    request[AUTH] = outcome
    if user_id is not None:
        request[USER_ID] = user_id
    if reason is not None:
        request[AUTH_REASON] = reason


def note_upstream(request: web.Request, seconds: float) -> None:
    request[UPSTREAM_SECONDS] = seconds


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


class JsonAccessLogger(AbstractAccessLogger):
    """aiohttp's access-log hook, writing one JSON line to ``gateway.access``."""

    def log(self, request: BaseRequest, response: web.StreamResponse, time_: float) -> None:
        line = {
            "time": _utc_now(),
            "request_id": request.get(REQUEST_ID),
            "pid": _PID,  # which worker, when there are several
            "remote": request.remote,
            "method": request.method,
            "path": request.rel_url.raw_path[:MAX_PATH],
            "route": request.get(ROUTE),
            "status": response.status,
            "bytes": response.body_length,
            "duration_ms": round(time_ * 1000, 3),
            "upstream_ms": _ms(request.get(UPSTREAM_SECONDS)),
            "user_id": request.get(USER_ID),
            "auth": request.get(AUTH, "none"),
            "auth_reason": request.get(AUTH_REASON),
        }
        # orjson: the line costs a microsecond or two, where json.dumps took tens.
        data = orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE)
        if _stream is None:
            self.logger.info(data[:-1].decode())
            return
        _stream.write(data)
        _stream.flush()  # a line per request, visible at once (container logs)

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


_second: tuple[int, str] = (0, "")


def _utc_now() -> str:
    """ISO 8601 UTC with milliseconds; the date part formatted once per second."""
    global _second
    now = time.time()
    whole = int(now)
    if _second[0] != whole:
        _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    return f"{_second[1]}.{int((now - whole) * 1000):03d}Z"
