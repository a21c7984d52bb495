"""Forward-auth through REAL proxies: nginx ``auth_request`` and Caddy ``forward_auth``, each run
from the operator snippet in docs/forward-auth/ as shipped, in front of the echo upstream, asking
the real gateway's ``GET /auth/verify`` (CONTRACT §4).

Proves, for both proxies: a valid token reaches the service with exactly the gateway's identity;
no/bad token is 401 (with the gateway's WWW-Authenticate), a missing role 403, and then the
service never sees the request; a client's forged identity headers never reach the service; a
client naming a public route in X-Forwarded-Uri / X-Original-URI does not open a protected one —
and the gateway alone still stops that when the snippet's clearing lines are left out.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yarl
from multidict import CIMultiDict

from tests.blackbox.client import Account, received, signed_in
from tests.blackbox.conftest import Echo, Gateway
from tests.blackbox.proxies import KINDS, Proxy, running_proxy

PROXIES = sorted(KINDS)


@pytest.fixture(scope="module", params=PROXIES)
def proxy(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    gateway: Gateway,
    echo_upstream: Echo,
) -> Iterator[Proxy]:
    """One proxy of each kind per module, from its snippet, in front of the echo."""
    kind = request.param
    workdir = tmp_path_factory.mktemp(kind)
    with running_proxy(kind, workdir, gateway=gateway.url, upstream=echo_upstream.url) as p:
        yield p


@dataclass
class Answer:
    status: int
    headers: CIMultiDict[str]
    body: bytes

    @property
    def echo(self) -> dict[str, Any] | None:
        """What the echo upstream received; ``None`` when the echo did not answer (it marks
        every answer ``X-Upstream: echo``, and both proxies relay the upstream's answer)."""
        if self.headers.get("X-Upstream") != "echo":
            return None
        return json.loads(self.body)  # type: ignore[no-any-return]


async def fetch(
    base: str, path: str, headers: Any = None, *, method: str = "GET", data: bytes | None = None
) -> Answer:
    async with aiohttp.ClientSession() as s:
        url = yarl.URL(base + path, encoded=True)
        async with s.request(method, url, headers=headers, data=data) as resp:
            return Answer(resp.status, CIMultiDict(resp.headers), await resp.read())


async def sign_in(gateway: Gateway) -> Account:
    # Directly at the gateway: its own endpoints are not behind the proxy in this setup.
    async with aiohttp.ClientSession() as s:
        return await signed_in(s, gateway.url)


def tampered(token: str) -> str:
    head, payload, signature = token.split(".")
    return ".".join([head, payload, ("A" if signature[0] != "A" else "B") + signature[1:]])


# -- the happy path ------------------------------------------------------------------------


async def test_a_valid_token_reaches_the_service_with_the_identity(
    proxy: Proxy, gateway: Gateway
) -> None:
    account = await sign_in(gateway)
    answer = await fetch(proxy.url, "/api/things?x=1", account.bearer)
    assert answer.status == 200, (answer.body, proxy.log())
    echo = answer.echo
    assert echo is not None
    assert (echo["method"], echo["path"], echo["query"]) == ("GET", "/api/things", "x=1")
    assert received(echo, "X-User-Id") == [account.user_id]
    assert received(echo, "X-User-Email") == [account.email]
    assert received(echo, "X-User-Roles") == ["user"]
    assert received(echo, "X-Auth-Issuer") == [gateway.url]
    # The user has no name and the gateway sends none: no header, not an empty or placeholder
    # one (Caddy 2.6.2's copy_headers would send "{http.reverse_proxy.header.X-User-Name}").
    assert received(echo, "X-User-Name") == []


async def test_a_body_goes_to_the_service_not_to_the_gateway(
    proxy: Proxy, gateway: Gateway
) -> None:
    account = await sign_in(gateway)
    body = b'{"order": 42}'
    answer = await fetch(proxy.url, "/api/orders", account.bearer, method="POST", data=body)
    assert answer.status == 200, (answer.body, proxy.log())
    echo = answer.echo
    assert echo is not None
    assert (echo["method"], echo["body"]) == ("POST", body.decode())
    assert received(echo, "X-User-Id") == [account.user_id]


async def test_a_public_route_passes_without_a_token_and_without_identity(
    proxy: Proxy,
) -> None:
    answer = await fetch(proxy.url, "/public/page")
    assert answer.status == 200, (answer.body, proxy.log())
    assert answer.echo is not None
    assert [k for k, _ in answer.echo["headers"] if k.lower().startswith("x-user")] == []


# -- refusals --------------------------------------------------------------------------------

REFUSED_CREDENTIALS = {
    "no token": (lambda account: {}, None),
    "garbage": (lambda account: {"Authorization": "Bearer not-a-jwt"}, "invalid_token"),
    "tampered": (
        lambda account: {"Authorization": f"Bearer {tampered(account.access_token)}"},
        "invalid_token",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED_CREDENTIALS))
@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_no_or_a_bad_token_is_401_and_the_service_never_sees_it(
    proxy: Proxy, gateway: Gateway, case: str, method: str
) -> None:
    account = await sign_in(gateway)
    make_headers, bearer_error = REFUSED_CREDENTIALS[case]
    answer = await fetch(
        proxy.url, "/api/things", make_headers(account), method=method, data=b"payload"
    )
    assert answer.status == 401, (answer.status, answer.body)
    assert answer.echo is None
    challenge = answer.headers.get("WWW-Authenticate", "")
    assert challenge.startswith('Bearer realm="gateway"'), challenge
    if bearer_error is not None:
        assert f'error="{bearer_error}"' in challenge
    # Negative control: the same request with the real token is let through.
    ok = await fetch(proxy.url, "/api/things", account.bearer, method=method, data=b"payload")
    assert ok.status == 200 and ok.echo is not None


async def test_a_role_the_user_lacks_is_403_even_with_a_forged_role_header(
    proxy: Proxy, gateway: Gateway
) -> None:
    account = await sign_in(gateway)
    for extra in ({}, {"X-User-Roles": "admin"}):
        answer = await fetch(proxy.url, "/admin/panel", {**account.bearer, **extra})
        assert answer.status == 403, (extra, answer.status, answer.body)
        assert answer.echo is None


# -- forged headers --------------------------------------------------------------------------

# Every identity header in several spellings; X-Not-Identity is the control that shows the
# check would see a client header that got through.
FORGED = [
    ("X-User-Id", "forged-id"),
    ("x-user-id", "forged-lower"),
    ("X_User_Id", "forged-underscore"),
    ("X-User-Email", "forged@example.com"),
    ("X-User-Name", "forged name"),
    ("X-User-Roles", "admin,forged"),
    ("X-Auth-Issuer", "https://forged.example"),
    ("X-Identity-Assertion", "forged.assertion.jwt"),
    ("X-Not-Identity", "forged-control"),
]

# (path, send a token, the X-User-Id the service must see: "self" = the user's, None = none)
FORGERY_CASES = [
    ("/api/x", True, "self"),
    ("/maybe/x", True, "self"),
    ("/maybe/x", False, None),
    ("/public/x", False, None),
    ("/public/x", True, None),
]


@pytest.mark.parametrize(("path", "with_token", "expected_id"), FORGERY_CASES)
async def test_forged_identity_headers_never_reach_the_service(
    proxy: Proxy, gateway: Gateway, path: str, with_token: bool, expected_id: str | None
) -> None:
    account = await sign_in(gateway)
    headers = CIMultiDict(FORGED)
    if with_token:
        headers.extend(account.bearer)
    answer = await fetch(proxy.url, path, headers)
    assert answer.status == 200, (answer.body, proxy.log())
    echo = answer.echo
    assert echo is not None
    forged_values = [v for _, v in echo["headers"] if "forged" in v.lower()]
    assert forged_values == ["forged-control"], echo["headers"]
    assert received(echo, "X-User-Id") == ([account.user_id] if expected_id else [])


# -- naming another route ----------------------------------------------------------------------

# A client naming a public route while asking for a protected path, in every header a proxy
# or the gateway might take the target from.
TARGET_FORGERIES = {
    "forwarded-uri": {"X-Forwarded-Uri": "/public/x"},
    "forwarded-uri+method": {"X-Forwarded-Uri": "/public/x", "X-Forwarded-Method": "GET"},
    "original-uri": {"X-Original-URI": "/public/x"},
    "original-uri+method": {"X-Original-URI": "/public/x", "X-Original-Method": "GET"},
    "both": {"X-Forwarded-Uri": "/public/x", "X-Original-URI": "/public/x"},
}


@pytest.mark.parametrize("forgery", sorted(TARGET_FORGERIES))
async def test_naming_a_public_route_does_not_open_a_protected_one(
    proxy: Proxy, gateway: Gateway, forgery: str
) -> None:
    forged = TARGET_FORGERIES[forgery]
    # Negative control: the public route itself is open, so a successful forgery would show.
    assert (await fetch(proxy.url, "/public/x")).status == 200
    answer = await fetch(proxy.url, "/api/secret", forged)
    assert answer.status == 401, (answer.status, answer.body)
    assert answer.echo is None
    account = await sign_in(gateway)
    answer = await fetch(proxy.url, "/admin/secret", {**forged, **account.bearer})
    assert answer.status == 403, (answer.status, answer.body)
    assert answer.echo is None


# What each snippet does to keep the client's copy of the OTHER family away from the gateway.
CLEARING_LINES = {
    "nginx": ['proxy_set_header X-Forwarded-Uri    "";', 'proxy_set_header X-Forwarded-Method "";'],
    "caddy": ["header_up -X-Original-URI", "header_up -X-Original-Method"],
}
# How each proxy relays the gateway's 400 for disagreeing targets: nginx's auth_request treats
# any status but 2xx/401/403 as an error (500); Caddy relays it.
CONFLICT_STATUS = {"nginx": 500, "caddy": 400}


def without_clearing(kind: str) -> str:
    snippet_path = KINDS[kind][0]
    text = snippet_path.read_text()
    for line in CLEARING_LINES[kind]:
        assert line in text, f"{snippet_path.name} no longer has {line!r}"
        text = text.replace(line, "")
    return text


@pytest.mark.parametrize("kind", PROXIES)
async def test_the_gateway_alone_stops_a_forged_target_when_the_snippet_forgets_to_clear_it(
    tmp_path: Path, gateway: Gateway, echo_upstream: Echo, kind: str
) -> None:
    # The snippet minus its clearing lines: the client's header now reaches /verify next to
    # the proxy's own, and only the gateway's refusal of a disagreement stands in the way.
    other_family = "X-Forwarded-Uri" if kind == "nginx" else "X-Original-URI"
    account = await sign_in(gateway)
    with running_proxy(
        kind,
        tmp_path / kind,
        gateway=gateway.url,
        upstream=echo_upstream.url,
        template=without_clearing(kind),
    ) as naive:
        # Negative control: this proxy works for honest requests.
        ok = await fetch(naive.url, "/api/x", account.bearer)
        assert ok.status == 200 and ok.echo is not None
        for path, headers in (("/api/secret", {}), ("/admin/secret", account.bearer)):
            answer = await fetch(naive.url, path, {other_family: "/public/x", **headers})
            assert answer.status == CONFLICT_STATUS[kind], (path, answer.status, answer.body)
            assert answer.echo is None
