"""Acceptance 3: a path never reaches an upstream under a policy other than its own.

Sent over raw sockets: aiohttp's client would normalize these paths before sending.
"""

from __future__ import annotations

import pytest

from tests.blackbox.client import get, raw_request
from tests.blackbox.conftest import Gateway


@pytest.mark.parametrize(
    "path",
    [
        "/public/%2e%2e/admin",
        "/public/%2E%2E/admin",
        "/public/.%2e/admin",
        "/public/%2e./admin",
        "/public/../admin",
        "/public/./../admin",
        "/public//../admin",
    ],
)
async def test_dot_segments_out_of_a_public_route_get_the_admin_policy(
    gateway: Gateway, path: str
) -> None:
    resp = await raw_request(gateway.url, get(path))
    # Either refused outright, or normalized to /admin and then held to /admin's policy.
    assert resp.status in (400, 401), (path, resp.status)
    assert resp.header("Content-Type") == "application/problem+json"


@pytest.mark.parametrize(
    "path",
    [
        "/admin%2fx",
        "/admin%2Fx",
        "/public%2f..%2fadmin",
        "/public/..%2fadmin",
        "/public/%2e%2e%2fadmin",
        "/public\\..\\admin",
        "/public/%5c../admin",
        "/public/%00/x",
        "/public/..;x/admin",
        "/public/.;/admin",
    ],
)
async def test_ambiguous_paths_are_refused(gateway: Gateway, path: str) -> None:
    resp = await raw_request(gateway.url, get(path))
    assert resp.status == 400, (path, resp.status)


async def test_double_slash_merges_into_the_routes_own_path(gateway: Gateway) -> None:
    resp = await raw_request(gateway.url, get("//admin"))
    assert resp.status == 401  # /admin's policy, not "no route" or a bypass
    resp = await raw_request(gateway.url, get("//public//x"))
    assert resp.status == 200
    assert resp.json()["path"] == "/public/x"


@pytest.mark.parametrize(
    ("sent", "forwarded"),
    [
        ("/public/a/./b/../c", "/public/a/c"),
        ("/public/%7Euser", "/public/~user"),
        ("/public/a%3Bb;c", "/public/a%3Bb;c"),
        ("/public/%25", "/public/%25"),
        ("/public/caf%c3%a9", "/public/caf%C3%A9"),
    ],
)
async def test_upstream_receives_the_canonical_path(
    gateway: Gateway, sent: str, forwarded: str
) -> None:
    resp = await raw_request(gateway.url, get(sent))
    assert resp.status == 200, resp.body
    assert resp.json()["path"] == forwarded


async def test_segment_aware_prefix(gateway: Gateway) -> None:
    resp = await raw_request(gateway.url, get("/publicity"))
    assert resp.status == 404
