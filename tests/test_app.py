"""gateway.app in-process: wiring that black-box tests cannot reach cheaply."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from gateway.app import GATEWAY, create_admin_app, create_app
from gateway.config import (
    AccountSettings,
    DatabaseSettings,
    RouteSettings,
    Settings,
    TokenSettings,
)
from tests.served import EdgeTestServer


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[TestClient]:
    settings = Settings(
        routes=(RouteSettings(name="api", path="/api", upstreams=("http://127.0.0.1:9",)),),
        database=DatabaseSettings(url=f"sqlite:///{tmp_path}/gw.db"),
        tokens=TokenSettings(keys_dir=tmp_path / "keys"),
        accounts=AccountSettings(bcrypt_rounds=4),
    )
    async with TestClient(EdgeTestServer(create_app(settings))) as client:
        yield client


async def test_readyz_is_503_while_the_database_is_unusable(client: TestClient) -> None:
    assert (await client.get("/readyz")).status == 200
    await client.app[GATEWAY].store.close()
    resp = await client.get("/readyz")
    assert resp.status == 503
    assert resp.content_type == "application/problem+json"
    assert (await client.get("/healthz")).status == 200  # alive, just not ready


async def test_logins_fail_fast_with_503_while_the_database_is_unusable(
    client: TestClient,
) -> None:
    await client.app[GATEWAY].store.close()
    resp = await client.post("/auth/login", json={"email": "a@example.com", "password": "x" * 8})
    assert resp.status == 503
    assert "sqlite" not in (await resp.text()).lower()


async def test_admin_app_serves_prometheus_text(client: TestClient) -> None:
    await client.get("/api/x")  # 401: counted
    admin = create_admin_app(client.app[GATEWAY].metrics)
    async with TestClient(EdgeTestServer(admin)) as admin_client:
        resp = await admin_client.get("/metrics")
        text = await resp.text()
    assert resp.headers["Content-Type"].startswith("text/plain")
    assert 'gateway_requests_total{route="api",status="401"} 1.0' in text
    assert 'gateway_auth_failures_total{reason="unauthorized"} 1.0' in text


async def test_admin_app_refuses_as_problem_json(client: TestClient) -> None:
    admin = create_admin_app(client.app[GATEWAY].metrics)
    async with TestClient(EdgeTestServer(admin)) as admin_client:
        missing = await admin_client.get("/nope")
        wrong_method = await admin_client.post("/metrics")
        bodies = [await missing.json(), await wrong_method.json()]
    assert (missing.status, wrong_method.status) == (404, 405)
    assert missing.headers["Content-Type"] == "application/problem+json"
    assert [b["status"] for b in bodies] == [404, 405]
