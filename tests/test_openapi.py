"""gateway.openapi and ``GET {p}/openapi.json``: a valid OpenAPI 3.1 document of exactly the
gateway's own endpoints (CONTRACT §4), rewritten for the configuration it is served under.

The black-box check that the running gateway answers as documented is
tests/security/test_schemathesis.py; these tests hold the document itself.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient
from openapi_spec_validator import OpenAPIV31SpecValidator, validate

from gateway import openapi
from gateway.app import GATEWAY, create_app
from gateway.config import (
    AccountSettings,
    DatabaseSettings,
    HeaderSettings,
    RouteSettings,
    ServerSettings,
    Settings,
    TokenSettings,
)
from tests.served import EdgeTestServer

ROOT = Path(__file__).resolve().parent.parent
OWN = ("register", "login", "refresh", "logout", "profile", "password", "verify", "openapi.json")
UNPREFIXED = ("/.well-known/jwks.json", "/.well-known/openid-configuration", "/healthz", "/readyz")
PROBLEM = "application/problem+json"


def settings_for(tmp_path: Path, **changes: Any) -> Settings:
    base = Settings(
        routes=(RouteSettings(name="api", path="/api", upstreams=("http://127.0.0.1:9",)),),
        database=DatabaseSettings(url=f"sqlite:///{tmp_path}/gw.db"),
        tokens=TokenSettings(keys_dir=tmp_path / "keys"),
        accounts=AccountSettings(bcrypt_rounds=4),
    )
    return dataclasses.replace(base, **changes)


def resolve(doc: dict[str, Any], node: Any) -> Any:
    """Follow a local ``$ref`` (one level is all the document uses, chains included)."""
    while isinstance(node, dict) and "$ref" in node:
        target: Any = doc
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            yield path, method, operation


def responses(doc: dict[str, Any]) -> Iterator[tuple[str, str, str, dict[str, Any]]]:
    for path, method, operation in operations(doc):
        for status, response in operation["responses"].items():
            yield path, method, status, resolve(doc, response)


# -- the document as shipped ----------------------------------------------------------------


def test_the_shipped_document_is_valid_openapi_3_1() -> None:
    doc = openapi.load()
    assert doc["openapi"].startswith("3.1.")
    validate(doc, cls=OpenAPIV31SpecValidator)


def test_docs_openapi_yaml_is_the_shipped_document() -> None:
    text = (ROOT / "docs" / "openapi.yaml").read_text(encoding="utf-8")
    assert yaml.safe_load(text) == openapi.load()


# Every endpoint of CONTRACT §4 with the statuses the contract names for it (415 for every
# JSON body, §4 "All JSON endpoints take Content-Type: application/json").
CONTRACT_STATUSES = [
    ("/auth/register", "post", {"201", "400", "403", "409", "415", "429"}),
    ("/auth/login", "post", {"200", "401", "415", "429"}),
    ("/auth/refresh", "post", {"200", "401", "415"}),
    ("/auth/logout", "post", {"204", "401", "415"}),
    ("/auth/profile", "get", {"200", "401"}),
    ("/auth/password", "post", {"204", "400", "401", "415"}),
    ("/auth/verify", "get", {"200", "401", "403"}),
    ("/.well-known/jwks.json", "get", {"200"}),
    ("/.well-known/openid-configuration", "get", {"200"}),
    ("/healthz", "get", {"200"}),
    ("/readyz", "get", {"200", "503"}),
]


@pytest.mark.parametrize(("path", "method", "statuses"), CONTRACT_STATUSES)
def test_every_contract_endpoint_documents_its_statuses(
    path: str, method: str, statuses: set[str]
) -> None:
    documented = set(openapi.load()["paths"][path][method]["responses"])
    assert statuses <= documented, statuses - documented


@pytest.mark.parametrize(
    ("path", "required"),
    [
        ("/auth/register", ["email", "password"]),
        ("/auth/login", ["email", "password"]),
        ("/auth/refresh", ["refresh_token"]),
        ("/auth/password", ["current_password", "new_password"]),
    ],
)
def test_request_bodies_are_json_objects_with_the_contract_fields(
    path: str, required: list[str]
) -> None:
    doc = openapi.load()
    body = resolve(doc, doc["paths"][path]["post"]["requestBody"])
    schema = body["content"]["application/json"]["schema"]
    assert body["required"] is True
    assert list(body["content"]) == ["application/json"]
    assert schema["type"] == "object"
    assert schema["required"] == required


def test_logout_takes_a_refresh_token_or_all_with_a_bearer() -> None:
    doc = openapi.load()
    operation = doc["paths"]["/auth/logout"]["post"]
    schema = resolve(doc, operation["requestBody"])["content"]["application/json"]["schema"]
    assert [alt["required"] for alt in schema["anyOf"]] == [["refresh_token"], ["all"]]
    assert {} in operation["security"] and {"bearer": []} in operation["security"]


def test_bearer_is_an_http_bearer_scheme_required_where_the_contract_requires_a_token() -> None:
    doc = openapi.load()
    bearer = doc["components"]["securitySchemes"]["bearer"]
    assert (bearer["type"], bearer["scheme"], bearer["bearerFormat"]) == ("http", "bearer", "JWT")
    needs_token = {
        (path, method)
        for path, method, op in operations(doc)
        if op.get("security", doc.get("security")) == [{"bearer": []}]
    }
    assert needs_token == {("/auth/profile", "get"), ("/auth/password", "post")}


def test_every_error_is_problem_json_with_the_rfc_9457_members() -> None:
    doc = openapi.load()
    for path, method, status, response in responses(doc):
        if int(status) < 400:
            continue
        assert list(response["content"]) == [PROBLEM], (path, method, status)
        schema = resolve(doc, response["content"][PROBLEM]["schema"])
        assert schema["required"] == ["type", "title", "status", "detail"]


@pytest.mark.parametrize(
    ("status", "header", "value_pattern"),
    [
        ("401", "WWW-Authenticate", '^Bearer realm="gateway"(, error="invalid_token")?$'),
        ("429", "Retry-After", "^[1-9][0-9]*$"),
    ],
)
def test_statuses_carry_their_headers(status: str, header: str, value_pattern: str) -> None:
    doc = openapi.load()
    found = [r for _, _, s, r in responses(doc) if s == status]
    assert found
    for response in found:
        spec = resolve(doc, response["headers"][header])
        assert spec["required"] is True
        assert spec["schema"]["pattern"] == value_pattern


def test_token_and_account_responses_are_no_store_and_every_response_has_a_request_id() -> None:
    doc = openapi.load()
    for path, _, status, response in responses(doc):
        headers = {name: resolve(doc, h) for name, h in response.get("headers", {}).items()}
        assert headers["X-Request-Id"]["required"] is True, (path, status)
        if path.startswith("/auth/") and path != "/auth/openapi.json":
            assert headers["Cache-Control"]["schema"]["const"] == "no-store", (path, status)


def test_token_responses_have_the_classic_client_fields() -> None:
    doc = openapi.load()
    token = doc["components"]["schemas"]["TokenResponse"]
    assert set(token["required"]) == {
        "access_token",
        "token_type",
        "expires_in",
        "refresh_token",
        "auth",
        "token",
    }
    assert token["properties"]["token_type"] == {"const": "Bearer"}
    for path in ("/auth/login", "/auth/refresh"):
        ok = resolve(doc, doc["paths"][path]["post"]["responses"]["200"])
        assert ok["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/TokenResponse"
        }


# -- rewritten for a configuration ----------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "public_url"),
    [
        ("/auth", "http://localhost:8080"),
        ("", "https://gateway.example.com"),
        ("/api/v1/account", "http://127.0.0.1:9999"),
    ],
)
def test_document_follows_prefix_and_public_url(
    tmp_path: Path, prefix: str, public_url: str
) -> None:
    settings = settings_for(
        tmp_path,
        server=ServerSettings(public_url=public_url),
        accounts=AccountSettings(prefix=prefix),
    )
    doc = openapi.document(settings)
    validate(doc, cls=OpenAPIV31SpecValidator)
    assert doc["servers"] == [{"url": public_url, "description": "server.public_url"}]
    assert set(doc["paths"]) == {f"{prefix}/{name}" for name in OWN} | set(UNPREFIXED)


def test_verify_documents_the_configured_identity_headers(tmp_path: Path) -> None:
    headers = HeaderSettings(id="X-Remote-User", email=None, assertion="X-Identity-Assertion")
    doc = openapi.document(settings_for(tmp_path, headers=headers))
    documented = doc["paths"]["/auth/verify"]["get"]["responses"]["200"]["headers"]
    assert set(documented) == {
        "Cache-Control",
        "X-Request-Id",
        "X-Remote-User",
        "X-User-Name",
        "X-User-Roles",
        "X-Auth-Issuer",
        "X-Identity-Assertion",
    }
    assert documented["X-Identity-Assertion"] == {"$ref": "#/components/headers/IdentityAssertion"}


@pytest.mark.parametrize("minimum", [8, 12, 30])
def test_new_passwords_carry_the_configured_minimum_length(tmp_path: Path, minimum: int) -> None:
    accounts = AccountSettings(password_min_length=minimum)
    doc = openapi.document(settings_for(tmp_path, accounts=accounts))
    assert doc["components"]["schemas"]["NewPassword"]["minLength"] == minimum


def test_each_document_is_a_new_object(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    first = openapi.document(settings)
    first["paths"].clear()
    assert openapi.document(settings)["paths"]


# -- served -----------------------------------------------------------------------------------


@pytest.fixture(params=["/auth", "", "/account"])
async def served(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[TestClient]:
    settings = settings_for(tmp_path, accounts=AccountSettings(prefix=request.param))
    async with TestClient(EdgeTestServer(create_app(settings))) as client:
        yield client


async def test_openapi_json_is_served_under_the_prefix(served: TestClient) -> None:
    settings = served.app[GATEWAY].settings
    prefix = settings.accounts.prefix
    resp = await served.get(f"{prefix}/openapi.json")
    assert resp.status == 200
    assert resp.content_type == "application/json"
    assert resp.headers["Cache-Control"] == "public, max-age=300"
    doc = json.loads(await resp.read())
    assert doc == json.loads(json.dumps(openapi.document(settings)))
    validate(doc, cls=OpenAPIV31SpecValidator)
    if prefix != "/auth":
        assert (await served.get("/auth/openapi.json")).status == 404


async def test_document_and_endpoint_table_list_the_same_operations(served: TestClient) -> None:
    """An endpoint added without documenting it (or the reverse) fails here."""
    settings = served.app[GATEWAY].settings
    table = served.app[GATEWAY].own.table
    doc = openapi.document(settings)
    served_ops = {(path, m.lower()) for path, methods in table.items() for m in methods}
    documented = {(path, method) for path, method, _ in operations(doc)}
    # HEAD is answered wherever GET is, as by any HTTP server; the document leaves it implicit.
    assert {op for op in served_ops if op[1] != "head"} == documented
