"""External issuers against a real OpenID provider: npm ``oidc-provider``, not a fake (issue 4).

The provider issues RFC 9068 JWT access tokens through client_credentials; the real gateway
discovers its keys over loopback. Proven here: its tokens reach a protected upstream with the
provider's identity and policy; a wrong audience, expiry or an unconfigured issuer is refused;
a rotated provider key is picked up without restarting the gateway; cached keys keep serving
while the provider is down; a flood of unknown ``kid``s costs the provider at most one more
JWKS fetch (counted by the provider itself); two providers at once keep their audiences,
claim mappings and keys apart; and the README's "Use with Okta" config works as written.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from multidict import CIMultiDictProxy

from tests.blackbox import oidc
from tests.blackbox.conftest import Echo, Gateway, launch_gateway, stop_process
from tests.blackbox.oidc import (
    Client,
    OidcProvider,
    ProviderFactory,
    SigningKey,
    unverified_claims,
    unverified_kid,
)

oidc_provider = oidc.oidc_provider  # the fixture, used by name

README = Path(__file__).resolve().parents[2] / "README.md"
README_ISSUER = "https://dev-123456.okta.com/oauth2/default"

OKTA_AUDIENCE = "api://default"
KEYCLOAK_AUDIENCE = "api://orders"
OKTA_CLAIMS = {"id": "sub", "email": "email", "name": "name", "roles": "groups"}
KEYCLOAK_CLAIMS = {
    "id": "sub",
    "email": "email",
    "name": "preferred_username",
    "roles": "realm_access.roles",
}

# Each user also carries the *other* provider's role claim, so a mapping applied to the wrong
# issuer would show (Grace would pass /realm-admin, Ada /admin).
GRACE = Client(
    "orders-app",
    "orders-secret",
    claims={
        "sub": "00u1grace",
        "email": "grace@example.com",
        "name": "Grace Hopper",
        "groups": ["Everyone", "Admins"],
        "realm_access": {"roles": ["admin"]},
    },
)
ALAN = Client(
    "viewer-app",
    "viewer-secret",
    auth_method="client_secret_post",
    claims={"sub": "00u2alan", "email": "alan@example.com", "groups": ["Everyone"]},
)
# 3 s: iat is whole seconds, so the token lives 2-3 s; long enough to pass once before it
# dies even on a loaded machine, short enough that the expiry test waits little.
BRIEF = Client(
    "brief-app", "brief-secret", claims={"sub": "00u3brief", "groups": ["Everyone"]}, ttl=3
)
ADA = Client(
    "ledger-app",
    "ledger-secret",
    claims={
        "sub": "6f1c1a52-9d1e-4c9b-a1b7-0d6e2b7c1f00",
        "email": "ada@example.org",
        "preferred_username": "ada",
        "realm_access": {"roles": ["admin", "user"]},
        "groups": ["Admins"],
    },
)

ROUTES = """
routes:
  - name: api
    path: /api
    upstream: {echo}
  - name: admin
    path: /admin
    upstream: {echo}
    roles: [Admins]
  - name: realm-admin
    path: /realm-admin
    upstream: {echo}
    roles: [admin]
"""


def issuer_entry(
    name: str, provider: OidcProvider, audience: str, claims: dict[str, str]
) -> dict[str, Any]:
    # leeway 0s: the expiry test waits only just past exp.
    entry = {"issuer": provider.issuer, "audience": audience, "claims": claims, "leeway": "0s"}
    return {"name": name, **entry}


def issuers_yaml(*entries: dict[str, Any]) -> str:
    return yaml.safe_dump({"issuers": list(entries)}, sort_keys=False)


def okta_yaml(provider: OidcProvider) -> str:
    return issuers_yaml(issuer_entry("okta", provider, OKTA_AUDIENCE, OKTA_CLAIMS))


@dataclass
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: Any

    def received(self, name: str) -> list[str]:
        """Every value of header ``name`` that reached the echo upstream."""
        return [v for k, v in self.body["headers"] if k.lower() == name.lower()]


async def call(session: aiohttp.ClientSession, url: str, token: str | None = None) -> Reply:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with session.get(url, headers=headers) as resp:
        return Reply(resp.status, resp.headers, await resp.json(content_type=None))


def assert_identity(reply: Reply, provider: OidcProvider, **expected: str | None) -> None:
    assert reply.status == 200, reply.body
    assert reply.headers["X-Upstream"] == "echo"
    assert reply.received("X-Auth-Issuer") == [provider.issuer]
    for header, value in expected.items():
        name = "X-User-" + header.capitalize()
        assert reply.received(name) == ([] if value is None else [value]), name


def assert_refused(reply: Reply, status: int = 401) -> None:
    """A problem+json the gateway wrote itself, never an upstream answer or a 5xx (§7)."""
    assert reply.status == status, reply.body
    assert "X-Upstream" not in reply.headers
    assert reply.headers["Content-Type"].startswith("application/problem+json")
    assert reply.body["status"] == status
    challenge = reply.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="gateway"')
    error = "invalid_token" if status == 401 else "insufficient_scope"
    assert f'error="{error}"' in challenge


def start_provider(workdir: Path, clients: list[Client], path: str) -> OidcProvider:
    # The same kid at both providers: a key must be chosen by issuer first, kid second.
    resources = (OKTA_AUDIENCE, KEYCLOAK_AUDIENCE)
    keys = [SigningKey.generate("key-1")]
    return OidcProvider(workdir, keys, clients, resources=resources, path=path).start()


@pytest.fixture(scope="module")
def okta(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    """An Okta-like provider shared by the tests that only read from it."""
    provider = start_provider(
        tmp_path_factory.mktemp("okta"), [GRACE, ALAN, BRIEF], "/oauth2/default"
    )
    yield provider
    provider.stop()


@pytest.fixture(scope="module")
def keycloak(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    """A Keycloak-like provider (realm path, nested roles), also shared read-only."""
    provider = start_provider(tmp_path_factory.mktemp("keycloak"), [ADA], "/realms/acme")
    yield provider
    provider.stop()


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    """A provider nobody configured: same path, kid, client and audience as ``okta``."""
    provider = start_provider(tmp_path_factory.mktemp("stranger"), [GRACE], "/oauth2/default")
    yield provider
    provider.stop()


@pytest.fixture(scope="module")
def oidc_gateway(
    tmp_path_factory: pytest.TempPathFactory,
    echo_upstream: Echo,
    okta: OidcProvider,
    keycloak: OidcProvider,
) -> Iterator[Gateway]:
    """A gateway trusting both providers, each with its own audience and claim mapping."""
    issuers = issuers_yaml(
        issuer_entry("okta", okta, OKTA_AUDIENCE, OKTA_CLAIMS),
        issuer_entry("keycloak", keycloak, KEYCLOAK_AUDIENCE, KEYCLOAK_CLAIMS),
    )
    gw = launch_gateway(tmp_path_factory.mktemp("gw"), echo_upstream, extra=issuers, routes=ROUTES)
    yield gw
    stop_process(gw.proc)


# 1. Identity and policy.


async def test_a_provider_token_reaches_the_upstream_as_its_subject(
    oidc_gateway: Gateway, okta: OidcProvider
) -> None:
    grace, alan = okta.token(GRACE.client_id), okta.token(ALAN.client_id)  # basic, post auth
    async with aiohttp.ClientSession() as s:
        api = await call(s, f"{oidc_gateway.url}/api/orders", grace)
        admin = await call(s, f"{oidc_gateway.url}/admin/panel", grace)
        async with s.get(
            f"{oidc_gateway.url}/auth/profile", headers={"Authorization": f"Bearer {grace}"}
        ) as resp:
            profile_status, profile = resp.status, await resp.json()
        denied = await call(s, f"{oidc_gateway.url}/admin/panel", alan)
        alan_api = await call(s, f"{oidc_gateway.url}/api/orders", alan)
        anonymous = await call(s, f"{oidc_gateway.url}/api/orders")

    grace_identity = {
        "id": "00u1grace",
        "email": "grace@example.com",
        "name": "Grace Hopper",
        "roles": "Everyone,Admins",
    }
    assert_identity(api, okta, **grace_identity)
    assert_identity(admin, okta, **grace_identity)
    assert api.received("Authorization") == [f"Bearer {grace}"]  # forward_authorization
    assert profile_status == 200, profile
    assert profile["id"] == "00u1grace" and profile["email"] == "grace@example.com"
    assert profile["roles"] == ["Everyone", "Admins"] and profile["name"] == "Grace Hopper"
    # Alan lacks the Admins group: 403 on /admin, though his token is good elsewhere.
    assert_refused(denied, 403)
    assert_identity(alan_api, okta, id="00u2alan", email="alan@example.com", name=None)
    assert anonymous.status == 401


# 2. Refusals: wrong audience, unconfigured issuer, expiry.


@pytest.mark.parametrize("case", ["audience of another resource", "issuer not configured"])
async def test_a_provider_token_is_refused_when_not_meant_for_us(
    oidc_gateway: Gateway, okta: OidcProvider, stranger: OidcProvider, case: str
) -> None:
    bad = {
        # Okta's key and issuer, but the audience the gateway expects from Keycloak.
        "audience of another resource": lambda: okta.token(GRACE.client_id, KEYCLOAK_AUDIENCE),
        # Everything as from Okta (path, kid, claims) but another provider's iss and key.
        "issuer not configured": lambda: stranger.token(GRACE.client_id, OKTA_AUDIENCE),
    }[case]()
    good = okta.token(GRACE.client_id, OKTA_AUDIENCE)
    async with aiohttp.ClientSession() as s:
        refused = await call(s, f"{oidc_gateway.url}/api/orders", bad)
        control = await call(s, f"{oidc_gateway.url}/api/orders", good)
    assert_refused(refused)
    assert_identity(control, okta, id="00u1grace")


async def test_a_provider_token_is_refused_just_after_it_expires(
    oidc_gateway: Gateway, okta: OidcProvider
) -> None:
    token = okta.token(BRIEF.client_id)
    exp = unverified_claims(token)["exp"]
    assert exp - time.time() <= 3.5  # the provider honoured the client's 3 s lifetime
    async with aiohttp.ClientSession() as s:
        fresh = await call(s, f"{oidc_gateway.url}/api/orders", token)
        # Issuer leeway is 0s: a token is dead from its exp second on (RFC 7519 §4.1.4).
        await asyncio.sleep(max(0.0, exp - time.time()) + 0.2)
        expired = await call(s, f"{oidc_gateway.url}/api/orders", token)
    assert_identity(fresh, okta, id="00u3brief", roles="Everyone")
    assert_refused(expired)


# 3-5. The provider's keys over time: rotation, outage, unknown-kid flood.


async def test_a_rotated_provider_key_is_picked_up_without_restart(
    fresh_gateway: Any, oidc_provider: ProviderFactory
) -> None:
    old_key, new_key = SigningKey.generate("2024-key"), SigningKey.generate("2025-key")
    provider = oidc_provider(keys=[old_key], clients=[GRACE])
    gw = fresh_gateway(extra=okta_yaml(provider), routes=ROUTES)
    provider.wait_for_jwks_fetches(1)  # the gateway holds the old key set only
    old_token = provider.token(GRACE.client_id)

    # Same port, same issuer; the new key signs and the old one is still published.
    provider.restart([new_key, old_key])
    new_token = provider.token(GRACE.client_id)
    assert unverified_kid(new_token) == new_key.kid != unverified_kid(old_token)
    assert provider.jwks_fetches() == 0  # the restarted provider has served no keys yet

    async with aiohttp.ClientSession() as s:
        new = await call(s, f"{gw.url}/api/orders", new_token)
        old = await call(s, f"{gw.url}/api/orders", old_token)
    assert_identity(new, provider, id="00u1grace", roles="Everyone,Admins")
    assert_identity(old, provider, id="00u1grace")
    assert provider.jwks_fetches() == 1  # the unknown kid made the gateway refetch, once


async def test_cached_keys_keep_serving_while_the_provider_is_down(
    fresh_gateway: Any, oidc_provider: ProviderFactory
) -> None:
    provider = oidc_provider(clients=[GRACE])
    gw = fresh_gateway(extra=okta_yaml(provider), routes=ROUTES)
    provider.wait_for_jwks_fetches(1)
    token = provider.token(GRACE.client_id)
    provider.stop()

    unknown_kid = SigningKey.generate().sign(unverified_claims(token))
    header, payload, signature = token.split(".")
    tampered = f"{header}.{payload}.{signature[:-6]}AAAAAA"
    async with aiohttp.ClientSession() as s:
        before = await call(s, f"{gw.url}/api/orders", token)
        # An unknown kid makes the gateway try the dead provider: still a 401, never a 5xx.
        unknown = await call(s, f"{gw.url}/api/orders", unknown_kid)
        after = await call(s, f"{gw.url}/api/orders", token)
        forged = await call(s, f"{gw.url}/api/orders", tampered)
    assert_identity(before, provider, id="00u1grace")
    assert_refused(unknown)
    assert_identity(after, provider, id="00u1grace")
    assert_refused(forged)  # the cached keys really verify: a bad signature is still refused
    # The failed refetch is told to the operator, naming the issuer, without a traceback.
    log = gw.log()
    assert re.search(r"WARNING .*\bokta\b.*unavailable", log), log
    assert "Traceback" not in log


def random_kid_tokens(real: str, count: int) -> list[str]:
    """Half re-signed with a throwaway key, half the real token with a rewritten header."""
    claims = unverified_claims(real)
    throwaway = SigningKey.generate()
    _, payload, signature = real.split(".")
    tokens = []
    for i in range(count):
        kid = uuid.uuid4().hex
        if i % 2:
            tokens.append(throwaway.sign(claims, kid=kid))
        else:
            header = {"alg": "RS256", "typ": "at+jwt", "kid": kid}
            encoded = base64.urlsafe_b64encode(json.dumps(header).encode()).rstrip(b"=")
            tokens.append(f"{encoded.decode()}.{payload}.{signature}")
    return tokens


async def test_an_unknown_kid_flood_costs_the_provider_one_fetch_at_most(
    fresh_gateway: Any, oidc_provider: ProviderFactory
) -> None:
    provider = oidc_provider(clients=[GRACE])
    gw = fresh_gateway(extra=okta_yaml(provider), routes=ROUTES)
    before = provider.wait_for_jwks_fetches(1)
    real = provider.token(GRACE.client_id)
    flood = random_kid_tokens(real, 50)

    async with aiohttp.ClientSession() as s:
        started = time.monotonic()
        replies = await asyncio.gather(*(call(s, f"{gw.url}/api/orders", t) for t in flood[:40]))
        replies += [await call(s, f"{gw.url}/api/orders", t) for t in flood[40:]]
        elapsed = time.monotonic() - started
        control = await call(s, f"{gw.url}/api/orders", real)

    for reply in replies:
        assert_refused(reply)
    assert elapsed < 30, elapsed  # well inside the gateway's one-minute refetch interval
    assert_identity(control, provider, id="00u1grace")
    assert provider.jwks_fetches() - before <= 1, provider.stats()


# 6. Two providers at once.


async def test_two_providers_keep_audiences_mappings_and_keys_apart(
    oidc_gateway: Gateway, okta: OidcProvider, keycloak: OidcProvider
) -> None:
    grace = okta.token(GRACE.client_id, OKTA_AUDIENCE)
    ada = keycloak.token(ADA.client_id, KEYCLOAK_AUDIENCE)
    grace_for_keycloak = okta.token(GRACE.client_id, KEYCLOAK_AUDIENCE)
    # Ada's claims exactly, signed by the other provider's key under the same kid "key-1".
    ada_claims = unverified_claims(ada)
    cross_signed = okta.signing_key.sign(ada_claims)
    control = keycloak.signing_key.sign(ada_claims)

    async with aiohttp.ClientSession() as s:
        r = {
            name: await call(s, f"{oidc_gateway.url}{path}", token)
            for name, path, token in [
                ("grace admin", "/admin/x", grace),
                ("grace realm-admin", "/realm-admin/x", grace),
                ("ada realm-admin", "/realm-admin/x", ada),
                ("ada admin", "/admin/x", ada),
                ("wrong audience", "/api/x", grace_for_keycloak),
                ("cross-signed", "/api/x", cross_signed),
                ("control", "/api/x", control),
            ]
        }
    assert_identity(r["grace admin"], okta, id="00u1grace", roles="Everyone,Admins")
    assert_refused(r["grace realm-admin"], 403)  # her realm_access is not read for Okta
    assert_identity(
        r["ada realm-admin"],
        keycloak,
        id=ADA.claims["sub"],
        email="ada@example.org",
        name="ada",
        roles="admin,user",
    )
    assert_refused(r["ada admin"], 403)  # her groups claim is not read for Keycloak
    assert_refused(r["wrong audience"])  # Okta's token, Keycloak's audience
    assert_refused(r["cross-signed"])
    assert_identity(r["control"], keycloak, id=ADA.claims["sub"])


# 7. The README's "Use with Okta", as an operator would copy it.


def readme_okta_config() -> dict[str, Any]:
    text = README.read_text()
    section = text.split("### Use with Okta", 1)[1].split("\n### ", 1)[0]
    block = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert block is not None, "README: no yaml block under '### Use with Okta'"
    assert README_ISSUER in block.group(1), "README: the Okta example issuer moved"
    config: dict[str, Any] = yaml.safe_load(block.group(1))
    return config


async def test_the_readme_okta_config_works_against_a_real_provider(
    fresh_gateway: Any, echo_upstream: Echo, okta: OidcProvider
) -> None:
    config = readme_okta_config()
    for issuer in config["issuers"]:
        issuer["issuer"] = issuer["issuer"].replace(README_ISSUER, okta.issuer)
    for route in config["routes"]:
        route["upstream"] = echo_upstream.url
    assert config["issuers"][0]["audience"] == OKTA_AUDIENCE
    admin = next(r for r in config["routes"] if r.get("roles"))
    assert admin["roles"] == ["Admins"]
    routes = yaml.safe_dump({"routes": config["routes"]}, sort_keys=False)
    gw = fresh_gateway(
        extra=yaml.safe_dump({"issuers": config["issuers"]}, sort_keys=False),
        routes=routes.replace("{", "{{").replace("}", "}}"),  # launch_gateway formats routes
    )
    # As the README tells the operator: email and groups claims in the access token.
    grace, alan = okta.token(GRACE.client_id), okta.token(ALAN.client_id)
    api, admin_path = config["routes"][0]["path"], admin["path"]
    async with aiohttp.ClientSession() as s:
        grace_api = await call(s, f"{gw.url}{api}/orders", grace)
        grace_admin = await call(s, f"{gw.url}{admin_path}/users", grace)
        alan_api = await call(s, f"{gw.url}{api}/orders", alan)
        alan_admin = await call(s, f"{gw.url}{admin_path}/users", alan)
        anonymous = await call(s, f"{gw.url}{api}/orders")
    grace_identity = {"id": "00u1grace", "email": "grace@example.com", "roles": "Everyone,Admins"}
    assert_identity(grace_api, okta, **grace_identity)
    assert_identity(grace_admin, okta, **grace_identity)
    assert_identity(alan_api, okta, id="00u2alan", email="alan@example.com", roles="Everyone")
    assert_refused(alan_admin, 403)
    assert anonymous.status == 401
