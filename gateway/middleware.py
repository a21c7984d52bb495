"""The HTTP edge's cross-cutting parts: errors as problem+json, request ids, CORS.

Guarantees: every error the gateway produces is ``application/problem+json`` (RFC 9457);
an unexpected exception is logged with its traceback and answered with a generic 500 that
holds nothing internal; every response carries ``X-Request-Id``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

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

REQUEST_ID = web.RequestKey("request_id", str)
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


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except GatewayError as err:
        return problem_response(err)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return problem_response(_translate_http_exception(exc))
    except Exception:  # the last line of defence: log it, tell the client nothing
        log.exception("unhandled error on %s %s", request.method, request.rel_url.raw_path)
        return problem_response(GatewayError("The gateway failed to handle the request."))


def make_cors_hook(
    cors: CorsSettings,
) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """An ``on_response_prepare`` hook: CORS headers on every response for allowed origins.

    Runs as headers are sent, so streamed proxy responses get them too.
    """
    allowed = frozenset(cors.allow_origins)
    wildcard = "*" in allowed

    async def add_headers(request: web.Request, response: web.StreamResponse) -> None:
        request_id = request.get(REQUEST_ID)
        if request_id:
            response.headers["X-Request-Id"] = request_id
        if not allowed:
            return
        response.headers.add("Vary", "Origin")
        origin = request.headers.get("Origin")
        if origin is None or not (wildcard or origin in allowed):
            return
        response.headers["Access-Control-Allow-Origin"] = "*" if wildcard else origin
        if cors.allow_credentials:
            response.headers["Access-Control-Allow-Credentials"] = "true"
        response.headers["Access-Control-Expose-Headers"] = "X-Request-Id, WWW-Authenticate"

    return add_headers


def preflight_response(request: web.Request, cors: CorsSettings) -> web.Response | None:
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
