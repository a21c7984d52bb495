"""Schemathesis against the running gateway's own OpenAPI document ({p}/openapi.json).

Every operation of the document is called with generated requests, valid and invalid ones
(schemathesis' positive and negative modes), each with and without a real bearer token, and
every response is checked against the document: never a 5xx, a documented status, content
type, headers (``WWW-Authenticate``, ``Retry-After``, ``Cache-Control``...) and body schema,
and schema-violating requests refused with a 4xx. So the document and the gateway cannot
drift apart, and no generated input reaches a 500.

``FUZZ_EXAMPLES`` sets the examples per operation and test (default 100: 2 x 11 operations
keep this file under a minute; ``{p}/openapi.json`` itself, the document's own URL, is left
out by schemathesis and checked in tests/test_openapi.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.core.failures import FailureGroup

from tests.blackbox.client import signed_in
from tests.blackbox.conftest import Echo, Gateway, launch_gateway, stop_process

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "100"))

# Generous limits: the point is the endpoints' input handling, not the rate limiter (which
# answers 429, documented, and would otherwise hide everything behind it).
LIMITS = """
accounts:
  login_rate_limit: 1000000/min
  register_rate_limit: 1000000/min
"""


@pytest.fixture(scope="module")
def schema_gateway(
    tmp_path_factory: pytest.TempPathFactory, echo_upstream: Echo
) -> Iterator[Gateway]:
    workdir: Path = tmp_path_factory.mktemp("schemathesis")
    gw = launch_gateway(workdir, echo_upstream, extra=LIMITS)
    yield gw
    stop_process(gw.proc)


@pytest.fixture(scope="module")
def bearer(schema_gateway: Gateway) -> str:
    async def sign_in() -> str:
        async with aiohttp.ClientSession() as session:
            return (await signed_in(session, schema_gateway.url, tag="schemathesis")).access_token

    return asyncio.run(sign_in())


@pytest.fixture(scope="module")
def api_schema(schema_gateway: Gateway) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{schema_gateway.url}/auth/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")

# Everything schemathesis can check against a document, except ``positive_data_acceptance``:
# the document types fields (an email is a string) but cannot express every rule of §4
# (a well-formed address, the right current password), so schema-valid input may rightly
# get a 400. ``negative_data_rejection`` holds the other direction: schema-invalid, 4xx.
CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_headers_conformance,
    schemathesis.checks.response_schema_conformance,
    schemathesis.checks.negative_data_rejection,
    schemathesis.checks.missing_required_header,
    schemathesis.checks.unsupported_method,
    schemathesis.checks.ignored_auth,
]


FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.data_too_large,
    ],
)


@schema.parametrize()
@FUZZ_SETTINGS
def test_anonymous_requests_conform_to_the_document(case: schemathesis.Case) -> None:
    case.call_and_validate(checks=CHECKS)


@schema.parametrize()
@FUZZ_SETTINGS
def test_signed_in_requests_conform_to_the_document(case: schemathesis.Case, bearer: str) -> None:
    # Generated credentials almost never verify: a real token reaches the handlers behind them.
    case.call_and_validate(headers={"Authorization": f"Bearer {bearer}"}, checks=CHECKS)


# -- the checks above can fail ----------------------------------------------------------------


def drop_documented_400(doc: dict[str, Any]) -> None:
    del doc["paths"]["/auth/register"]["post"]["responses"]["400"]


def require_a_member_problems_lack(doc: dict[str, Any]) -> None:
    doc["components"]["schemas"]["Problem"]["required"].append("instance")


def expect_another_cache_control(doc: dict[str, Any]) -> None:
    doc["components"]["headers"]["NoStore"]["schema"]["const"] = "no-cache"


def expect_json_errors(doc: dict[str, Any]) -> None:
    for name in ("InvalidInput",):
        response = doc["components"]["responses"][name]
        response["content"] = {"application/json": response["content"]["application/problem+json"]}


@pytest.mark.parametrize(
    "drift",
    [
        drop_documented_400,
        require_a_member_problems_lack,
        expect_another_cache_control,
        expect_json_errors,
    ],
)
def test_a_document_that_drifted_from_the_gateway_is_caught(
    schema_gateway: Gateway, drift: Callable[[dict[str, Any]], None]
) -> None:
    """The same checks against the served document with one detail changed must fail on a
    request the gateway answers 400 (an invalid email), while the served document passes it:
    the conformance checks are not vacuous."""
    with urllib.request.urlopen(f"{schema_gateway.url}/auth/openapi.json", timeout=10) as resp:
        served = json.load(resp)
    drifted = json.loads(json.dumps(served))
    drift(drifted)
    register_invalid_email(served).call_and_validate(base_url=schema_gateway.url, checks=CHECKS)
    with pytest.raises(FailureGroup):
        register_invalid_email(drifted).call_and_validate(
            base_url=schema_gateway.url, checks=CHECKS
        )


def register_invalid_email(doc: dict[str, Any]) -> schemathesis.Case:
    operation = schemathesis.openapi.from_dict(doc)["/auth/register"]["POST"]
    return operation.Case(
        body={"email": "not an email", "password": "long enough"}, media_type="application/json"
    )
