"""gateway.middleware: every error as problem+json, nothing internal leaked."""

from __future__ import annotations

import json

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.errors import (
    EmailTaken,
    GatewayError,
    InsufficientScope,
    InvalidToken,
    MethodNotAllowed,
    TooManyRequests,
    Unauthorized,
)
from gateway.middleware import problem_middleware, problem_response


@pytest.mark.parametrize(
    ("err", "status", "header", "value"),
    [
        (Unauthorized(), 401, "WWW-Authenticate", 'Bearer realm="gateway"'),
        (
            InvalidToken("expired"),
            401,
            "WWW-Authenticate",
            'Bearer realm="gateway", error="invalid_token"',
        ),
        (
            InsufficientScope(),
            403,
            "WWW-Authenticate",
            'Bearer realm="gateway", error="insufficient_scope"',
        ),
        (MethodNotAllowed(("GET", "HEAD")), 405, "Allow", "GET, HEAD"),
        (TooManyRequests(12.7), 429, "Retry-After", "12"),
        (EmailTaken(), 409, "Cache-Control", "no-store"),
    ],
)
def test_problem_response(err: GatewayError, status: int, header: str, value: str) -> None:
    response = problem_response(err)
    body = json.loads(response.body)  # type: ignore[arg-type]
    assert response.status == status and response.content_type == "application/problem+json"
    assert set(body) == {"type", "title", "status", "detail"} and body["status"] == status
    assert response.headers[header] == value


async def test_unexpected_exceptions_leak_nothing(caplog: pytest.LogCaptureFixture) -> None:
    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("SELECT * FROM users WHERE password_hash = '/srv/secret.pem'")

    app = web.Application(middlewares=[problem_middleware])
    app.router.add_get("/", broken)
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/")
        text = await resp.text()
    assert resp.status == 500 and resp.content_type == "application/problem+json"
    for leak in ("SELECT", "password_hash", "secret.pem", "Traceback", "RuntimeError"):
        assert leak not in text
    assert "SELECT" in caplog.text  # the operator still gets the whole story in the log


async def test_aiohttp_own_refusals_become_problems() -> None:
    app = web.Application(middlewares=[problem_middleware], client_max_size=10)

    async def read(request: web.Request) -> web.Response:
        await request.read()
        return web.Response()

    app.router.add_post("/", read)
    async with TestClient(TestServer(app)) as client:
        resp = await client.post("/", data=b"x" * 100)
        assert resp.status == 413 and resp.content_type == "application/problem+json"
        resp = await client.get("/nowhere")
        assert resp.status == 404 and resp.content_type == "application/problem+json"
