"""The HTTP edge's cross-cutting parts: errors as problem+json, CORS.

Guarantees: every error the gateway produces is ``application/problem+json`` (RFC 9457);
an unexpected exception is logged with its traceback and answered with a generic 500 that
holds nothing internal.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from aiohttp import web
from multidict import MultiMapping

from gateway.config import CorsSettings
from gateway.errors import (
    GatewayError,
    MethodNotAllowed,
    Overloaded,
    PayloadTooLarge,
    TooManyRequests,
    UnsupportedMediaType,
)

log = logging.getLogger("gateway")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

PROBLEM_TYPE = "urn:gateway:problem:"
REALM = 'Bearer realm="gateway"'


def problem_response(err: GatewayError) -> web.Response:
    """Render ``err`` as RFC 9457 problem+json with the headers its status calls for."""
    body = {
        "type": PROBLEM_TYPE + err.code,
        "title": err.title,
        "status": err.status,
        "detail": err.detail,
    }
    headers: dict[str, str] = {"Cache-Control": "no-store"}
    bearer_error = getattr(err, "bearer_error", None)
    if err.status == 401:
        headers["WWW-Authenticate"] = REALM + (f', error="{bearer_error}"' if bearer_error else "")
    elif bearer_error:
        headers["WWW-Authenticate"] = f'{REALM}, error="{bearer_error}"'
    if isinstance(err, MethodNotAllowed):
        headers["Allow"] = ", ".join(err.allowed)
    if isinstance(err, TooManyRequests | Overloaded):
        headers["Retry-After"] = str(err.retry_after)
    return web.Response(
        status=err.status,
        body=json.dumps(body).encode(),
        content_type="application/problem+json",
        headers=headers,
    )


def _translate_http_exception(exc: web.HTTPException) -> GatewayError:
    """aiohttp's own refusals (oversized body, bad media type...) in our vocabulary."""
    if exc.status == 413:
        return PayloadTooLarge("The request body is larger than allowed.")
    if exc.status == 415:
        return UnsupportedMediaType()
    err = GatewayError(exc.reason)
    err.status, err.title = exc.status, exc.reason
    err.code = exc.reason.lower().replace(" ", "_")
    return err


def problem_for(exc: Exception, where: str = "") -> GatewayError:
    """What to tell the client about ``exc``: a GatewayError as it is, aiohttp's own refusals
    (oversized body, bad media type...) in our vocabulary, anything else a generic 500 whose
    traceback is logged and never shown."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, web.HTTPException) and exc.status >= 400:
        return _translate_http_exception(exc)
    log.error("unhandled error on %s", where, exc_info=exc)
    return GatewayError("The gateway failed to handle the request.")


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return problem_response(problem_for(exc))
    except Exception as exc:  # the last line of defence: log it, tell the client nothing
        where = f"{request.method} {request.rel_url.raw_path}"
        return problem_response(problem_for(exc, where))


class CorsHeaders:
    """The CORS headers of a response to a request from ``origin``, per configuration."""

    def __init__(self, cors: CorsSettings) -> None:
        self._allowed = frozenset(cors.allow_origins)
        self.enabled = bool(self._allowed)
        self._wildcard = "*" in self._allowed
        self._credentials = cors.allow_credentials

    def __call__(self, origin: str | None) -> list[tuple[str, str]]:
        if not self._allowed:
            return []
        out = [("Vary", "Origin")]
        if origin is None or not (self._wildcard or origin in self._allowed):
            return out
        out.append(("Access-Control-Allow-Origin", "*" if self._wildcard else origin))
        if self._credentials:
            out.append(("Access-Control-Allow-Credentials", "true"))
        out.append(("Access-Control-Expose-Headers", "X-Request-Id, WWW-Authenticate"))
        return out


class _Head(Protocol):
    @property
    def method(self) -> str: ...
    @property
    def headers(self) -> MultiMapping[str]: ...


def preflight_response(request: _Head, cors: CorsSettings) -> web.Response | None:
    """204 for a CORS preflight from an allowed origin (no token needed), else None."""
    if request.method != "OPTIONS":
        return None
    origin = request.headers.get("Origin")
    wanted = request.headers.get("Access-Control-Request-Method")
    if origin is None or wanted is None:
        return None
    if origin not in cors.allow_origins and "*" not in cors.allow_origins:
        return None
    headers = {
        "Access-Control-Allow-Methods": "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS",
        "Access-Control-Max-Age": "600",
    }
    requested = request.headers.get("Access-Control-Request-Headers")
    if requested:
        headers["Access-Control-Allow-Headers"] = requested
    return web.Response(status=204, headers=headers)
