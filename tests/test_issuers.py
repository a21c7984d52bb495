"""External issuers: key discovery, caching and refetch limits, and pinned verification.

Every provider here is a real aiohttp server on 127.0.0.1 serving a discovery document and a
JWK set made from keys generated in the test; tokens are signed with PyJWT. Time is the
injected ``Clock``: nothing sleeps for more than a fraction of a second.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm, get_default_algorithms

from gateway import issuers
from gateway.config import ClaimMapping, IssuerSettings
from gateway.errors import InvalidToken
from gateway.issuers import ExternalVerifier, JwksUnavailable, max_age

NOW = 1_800_000_000.0
AUDIENCE = "api://default"
MIB = 1024 * 1024


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class Signer:
    """A provider's key pair: the private half signs tokens, the public half is served."""

    kid: str | None
    alg: str
    private: Any = field(repr=False)
    publish_alg: bool = True

    def jwk(self, **extra: Any) -> dict[str, Any]:
        public = self.private.public_key()
        kind: dict[str, Any] = {
            "RS": RSAAlgorithm,
            "PS": RSAAlgorithm,
            "ES": ECAlgorithm,
            "Ed": OKPAlgorithm,
        }
        jwk = dict(kind[self.alg[:2]].to_jwk(public, as_dict=True))
        if self.kid is not None:
            jwk["kid"] = self.kid
        if self.publish_alg:
            jwk["alg"] = self.alg
        jwk["use"] = "sig"
        return {**jwk, **extra}

    def rekeyed(self, kid: str | None, **changes: Any) -> Signer:
        return replace(self, kid=kid, **changes)


@pytest.fixture(scope="module")
def rsa_keys() -> list[rsa.RSAPrivateKey]:
    return [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(3)]


@pytest.fixture(scope="module")
def rsa_signer(rsa_keys: list[rsa.RSAPrivateKey]) -> Signer:
    return Signer("rsa-1", "RS256", rsa_keys[0])


def ec_signer(kid: str | None = "ec-1", curve: ec.EllipticCurve | None = None) -> Signer:
    curve = curve or ec.SECP256R1()
    alg = {"secp256r1": "ES256", "secp384r1": "ES384"}[curve.name]
    return Signer(kid, alg, ec.generate_private_key(curve))


def ed_signer(kid: str | None = "ed-1") -> Signer:
    return Signer(kid, "EdDSA", ed25519.Ed25519PrivateKey.generate())


class Provider:
    """A real OpenID provider's key endpoints, with knobs for every way one can misbehave."""

    def __init__(self, signers: list[Signer], path: str = "/oauth2") -> None:
        self.signers = signers
        self.path = path
        self.hits: Counter[str] = Counter()
        self.cache_control: str | None = None
        self.status = 200
        self.body: bytes | None = None  # served instead of the JWK set when set
        self.chunked = False
        self.delay = 0.0
        self.discovery_issuer: str | None = None  # None: our own issuer
        self.redirect_to: str | None = None
        self.announce_then_stall: int | None = None  # a Content-Length, then silence
        app = web.Application()
        app.router.add_get(f"{path}/.well-known/openid-configuration", self._discovery)
        app.router.add_get(f"{path}/keys", self._jwks)
        app.router.add_get("/moved", self._moved)
        self.server = TestServer(app, host="127.0.0.1", port=0)
        self.base = ""

    async def start(self) -> Provider:
        await self.server.start_server()
        self.base = str(self.server.make_url("")).rstrip("/")  # kept: still named once stopped
        return self

    async def stop(self) -> None:
        await self.server.close()

    @property
    def issuer(self) -> str:
        return self.base + self.path

    @property
    def jwks_uri(self) -> str:
        return self.issuer + "/keys"

    def jwks(self) -> dict[str, Any]:
        return {"keys": [s.jwk() for s in self.signers]}

    async def _discovery(self, request: web.Request) -> web.Response:
        self.hits["discovery"] += 1
        issuer = self.discovery_issuer or self.issuer
        return web.json_response({"issuer": issuer, "jwks_uri": self.jwks_uri})

    async def _jwks(self, request: web.Request) -> web.StreamResponse:
        self.hits["jwks"] += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.redirect_to is not None:
            raise web.HTTPFound(self.redirect_to)
        if self.announce_then_stall is not None:
            stalled = web.StreamResponse(headers={"Content-Type": "application/json"})
            stalled.content_length = self.announce_then_stall
            await stalled.prepare(request)
            await stalled.write(b'{"keys": [')
            await asyncio.sleep(30)  # cancelled when the server closes
        body = self.body if self.body is not None else json.dumps(self.jwks()).encode()
        headers = {"Content-Type": "application/json"}
        if self.cache_control is not None:
            headers["Cache-Control"] = self.cache_control
        if not self.chunked:
            return web.Response(status=self.status, body=body, headers=headers)
        response = web.StreamResponse(status=self.status, headers=headers)
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(body), 64 * 1024):
            await response.write(body[start : start + 64 * 1024])
        await response.write_eof()
        return response

    async def _moved(self, request: web.Request) -> web.Response:
        self.hits["moved"] += 1
        raise web.HTTPFound(self.jwks_uri)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
async def provider(rsa_signer: Signer) -> AsyncIterator[Provider]:
    started = await Provider([rsa_signer]).start()
    yield started
    await started.stop()


@pytest.fixture
def clock() -> Clock:
    return Clock()


MakeVerifier = Callable[..., ExternalVerifier]


@pytest.fixture
async def make_verifier(
    session: aiohttp.ClientSession, clock: Clock
) -> AsyncIterator[MakeVerifier]:
    made: list[ExternalVerifier] = []

    def make(*settings: IssuerSettings, default_leeway: float = 30.0) -> ExternalVerifier:
        verifier = ExternalVerifier(settings, session, clock=clock, default_leeway=default_leeway)
        made.append(verifier)
        return verifier

    yield make
    for verifier in made:
        await verifier.aclose()


def settings_for(provider: Provider, discover: bool = False, **changes: Any) -> IssuerSettings:
    values: dict[str, Any] = {
        "name": "okta",
        "issuer": provider.issuer,
        "audience": AUDIENCE,
        "jwks_uri": None if discover else provider.jwks_uri,
        "claims": ClaimMapping(id="sub", email="email", name="name", roles="groups"),
    }
    values.update(changes)
    return IssuerSettings(**values)


def claims_for(provider: Provider, **changes: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": provider.issuer,
        "sub": "00u1abcd2EFGH3ij4x5",  # Okta-style: not a UUID
        "aud": AUDIENCE,
        "iat": int(NOW),
        "exp": int(NOW) + 300,
        "email": "Ann@Example.com",
        "name": "Ann",
        "groups": ["admin", "dev"],
    }
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def sign(signer: Signer, claims: dict[str, Any], **header: Any) -> str:
    headers: dict[str, Any] = {"typ": "JWT"}
    if signer.kid is not None:
        headers["kid"] = signer.kid
    headers.update(header)
    headers = {k: v for k, v in headers.items() if v is not None}
    token = jwt.encode(claims, signer.private, algorithm=signer.alg, headers=headers)
    if "kid" not in headers and '"kid"' in _header_json(token):
        raise RuntimeError("PyJWT added a kid")  # the kid-less tests would prove nothing
    return token


def forge(header: dict[str, Any], claims: dict[str, Any], key: Any, alg: str) -> str:
    """A compact JWS with exactly ``header``, for headers PyJWT refuses to produce."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    algorithm = get_default_algorithms()[alg]
    signature = algorithm.sign(signing_input.encode(), algorithm.prepare_key(key))
    return f"{signing_input}.{b64(signature)}"


def _header_json(token: str) -> str:
    segment = token.split(".")[0]
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)).decode()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


async def refused(verifier: ExternalVerifier, token: str) -> str:
    with pytest.raises(InvalidToken) as info:
        await verifier.verify(token)
    return info.value.reason


# --- accepting ----------------------------------------------------------------------------


@pytest.mark.parametrize("discover", [False, True], ids=["jwks_uri", "discovery"])
@pytest.mark.parametrize(
    "make_signer",
    [
        lambda keys: Signer("rsa", "RS256", keys[0]),
        lambda keys: Signer("rsa", "RS256", keys[0], publish_alg=False),
        lambda keys: Signer("ps", "PS256", keys[1]),
        lambda keys: Signer("rs512", "RS512", keys[2]),
        lambda keys: ec_signer(),
        lambda keys: ec_signer(curve=ec.SECP384R1()),
        lambda keys: ec_signer().rekeyed("ec-noalg", publish_alg=False),
        lambda keys: ed_signer(),
        lambda keys: ed_signer().rekeyed("ed-noalg", publish_alg=False),
    ],
    ids=[
        "RS256",
        "RS256-derived",
        "PS256",
        "RS512",
        "ES256",
        "ES384",
        "ES256-derived",
        "EdDSA",
        "EdDSA-derived",
    ],
)
async def test_valid_token_is_accepted(
    make_signer: Callable[[list[Any]], Signer],
    rsa_keys: list[Any],
    make_verifier: MakeVerifier,
    discover: bool,
) -> None:
    signer = make_signer(rsa_keys)
    provider = await Provider([signer]).start()
    try:
        verifier = make_verifier(settings_for(provider, discover=discover))
        identity = await verifier.verify(sign(signer, claims_for(provider)))
    finally:
        await provider.stop()
    assert identity.id == "00u1abcd2EFGH3ij4x5"
    assert identity.issuer == provider.issuer
    assert identity.email == "Ann@Example.com"
    assert identity.name == "Ann"
    assert identity.roles == ("admin", "dev")
    assert provider.hits["discovery"] == (1 if discover else 0)
    assert provider.hits["jwks"] == 1


@pytest.mark.parametrize(
    "changes",
    [
        {"aud": ["other", AUDIENCE]},  # a list holding ours
        {"iat": None},  # external issuers may omit iat
        {"exp": int(NOW) - 29},  # within the default leeway
        {"typ": "at+jwt"},
        {"scp": ["read", "write"]},
    ],
    ids=["aud-list", "no-iat", "leeway", "at+jwt", "scp"],
)
async def test_accepted_variants(
    provider: Provider, rsa_signer: Signer, make_verifier: MakeVerifier, changes: dict[str, Any]
) -> None:
    changes = dict(changes)
    typ = changes.pop("typ", "JWT")
    verifier = make_verifier(settings_for(provider))
    identity = await verifier.verify(sign(rsa_signer, claims_for(provider, **changes), typ=typ))
    assert identity.id == "00u1abcd2EFGH3ij4x5"


async def test_nested_claim_mapping_keycloak(
    provider: Provider, rsa_signer: Signer, make_verifier: MakeVerifier
) -> None:
    mapping = ClaimMapping(
        id="sub", email="email", name="preferred_username", roles="realm_access.roles"
    )
    verifier = make_verifier(settings_for(provider, claims=mapping))
    claims = claims_for(
        provider, groups=None, preferred_username="ann", realm_access={"roles": ["ops"]}
    )
    identity = await verifier.verify(sign(rsa_signer, claims))
    assert (identity.name, identity.roles) == ("ann", ("ops",))


# --- refusing -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"aud": "api://other"}, "audience"),
        ({"aud": ["a", "b"]}, "audience"),
        ({"aud": None}, "missing_claim"),
        ({"exp": None}, "missing_claim"),
        ({"sub": None}, "missing_claim"),
        ({"sub": ""}, "malformed_claims"),
        ({"exp": int(NOW) - 31}, "expired"),
        ({"nbf": int(NOW) + 31}, "not_yet_valid"),
        ({"iat": int(NOW) + 31}, "iat"),
        ({"exp": "tomorrow"}, "malformed_claims"),
        ({"groups": ["a,b"]}, "malformed_claims"),
        ({"email": "not-an-email"}, "malformed_claims"),
    ],
    ids=lambda v: str(v) if isinstance(v, str) else "-".join(f"{k}" for k in v),
)
async def test_refused_claims(
    provider: Provider,
    rsa_signer: Signer,
    make_verifier: MakeVerifier,
    changes: dict[str, Any],
    reason: str,
) -> None:
    verifier = make_verifier(settings_for(provider))
    claims = claims_for(provider, **changes)
    if "sub" in changes and changes["sub"] is None:
        claims.pop("sub", None)
    assert await refused(verifier, sign(rsa_signer, claims)) == reason


async def test_expiry_follows_the_injected_clock(
    provider: Provider, rsa_signer: Signer, make_verifier: MakeVerifier, clock: Clock
) -> None:
    verifier = make_verifier(settings_for(provider))
    token = sign(rsa_signer, claims_for(provider))
    await verifier.verify(token)
    clock.now = NOW + 300 + 30  # exp + default leeway
    assert await refused(verifier, token) == "expired"


@pytest.mark.parametrize(
    ("issuer_leeway", "default", "late", "accepted"),
    [
        (None, 30.0, 29, True),
        (None, 30.0, 31, False),
        (None, 90.0, 89, True),  # the default comes from the constructor (tokens.leeway)
        (60.0, 30.0, 59, True),  # the issuer's own leeway wins
        (60.0, 30.0, 61, False),
        (0.0, 30.0, 1, False),
    ],
)
async def test_leeway_per_issuer(
    provider: Provider,
    rsa_signer: Signer,
    make_verifier: MakeVerifier,
    clock: Clock,
    issuer_leeway: float | None,
    default: float,
    late: int,
    accepted: bool,
) -> None:
    verifier = make_verifier(settings_for(provider, leeway=issuer_leeway), default_leeway=default)
    token = sign(rsa_signer, claims_for(provider))
    clock.now = NOW + 300 + late
    if accepted:
        await verifier.verify(token)
    else:
        assert await refused(verifier, token) == "expired"


async def test_unconfigured_issuer_is_refused(
    provider: Provider, rsa_signer: Signer, make_verifier: MakeVerifier
) -> None:
    verifier = make_verifier(settings_for(provider))
    for iss in ("https://evil.example", provider.issuer + "/", provider.issuer.upper()):
        token = sign(rsa_signer, claims_for(provider, iss=iss))
        assert verifier.issuer_for(token) is None
        assert await refused(verifier, token) == "issuer"
    assert provider.hits["jwks"] == 0  # an unknown issuer costs no fetch


@pytest.mark.parametrize(
    "token",
    ["", "a.b", "a.b.c.d", "x" * 9000, "e30.e30.", "bm90anNvbg.e30.x", "W10.e30.x", "e30.W10.x"],
)
def test_issuer_for_malformed_token_is_none(token: str, provider: Provider) -> None:
    verifier = ExternalVerifier([settings_for(provider)], session=lambda: None)  # type: ignore[arg-type,return-value]
    assert verifier.issuer_for(token) is None


async def test_algorithm_confusion_hs256_with_public_key(
    provider: Provider, rsa_signer: Signer, make_verifier: MakeVerifier
) -> None:
    verifier = make_verifier(settings_for(provider))
    pem = rsa_signer.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = {"alg": "HS256", "typ": "JWT", "kid": rsa_signer.kid}
    signing_input = (
        f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims_for(provider)).encode())}"
    )
    mac = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    assert await refused(verifier, f"{signing_input}.{b64(mac)}") == "algorithm"
    none_token = (
        f"{b64(json.dumps({**header, 'alg': 'none'}).encode())}.{signing_input.split('.')[1]}."
    )
    assert await refused(verifier, none_token) == "algorithm"
    assert provider.hits["jwks"] == 0  # refused before any key is looked up


async def test_header_alg_must_equal_the_keys(
    rsa_keys: list[Any], make_verifier: MakeVerifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The JWK says RS256; a PS256 signature by the same key pair is refused before any
    # signature check (not merely by PyJWT's own guard).
    decoded: list[str] = []
    real_decode = jwt.decode

    def spy(token: str, *args: Any, **kwargs: Any) -> Any:
        decoded.append(token)
        return real_decode(token, *args, **kwargs)

    monkeypatch.setattr(jwt, "decode", spy)
    provider = await Provider([Signer("k", "RS256", rsa_keys[0])]).start()
    try:
        verifier = make_verifier(settings_for(provider))
        token = sign(Signer("k", "PS256", rsa_keys[0]), claims_for(provider))
        assert await refused(verifier, token) == "algorithm"
        assert decoded == []
    finally:
        await provider.stop()


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ({"crit": ["exp"]}, "crit"),
        ({"crit": []}, "crit"),
        ({"typ": "JOSE"}, "typ"),
        ({"typ": 1}, "typ"),
        ({"kid": 7}, "malformed"),
        ({"kid": ["rsa-1"]}, "malformed"),
    ],
)
async def test_refused_headers(
    provider: Provider,
    rsa_signer: Signer,
    make_verifier: MakeVerifier,
    header: dict[str, Any],
    reason: str,
) -> None:
    verifier = make_verifier(settings_for(provider))
    full = {"alg": "RS256", "typ": "JWT", "kid": rsa_signer.kid, **header}
    token = forge(full, claims_for(provider), rsa_signer.private, "RS256")
    assert await refused(verifier, token) == reason


@pytest.mark.parametrize("member", ["jku", "x5u", "jwk", "x5c"])
async def test_key_hints_in_the_header_are_ignored(
    provider: Provider, rsa_signer: Signer, make_verifier: MakeVerifier, member: str
) -> None:
    attacker = Signer(rsa_signer.kid, "ES256", ec.generate_private_key(ec.SECP256R1()))
    hint: Any = {
        "jku": "http://127.0.0.1:1/keys",
        "x5u": "http://127.0.0.1:1/cert",
        "jwk": attacker.jwk(),
        "x5c": ["MIIB"],
    }[member]
    verifier = make_verifier(settings_for(provider))
    forged = sign(attacker, claims_for(provider), **{member: hint})
    assert await refused(verifier, forged) == "algorithm"
    same_alg = Signer(rsa_signer.kid, "RS256", rsa.generate_private_key(65537, 2048))
    assert await refused(verifier, sign(same_alg, claims_for(provider), **{member: hint})) == (
        "signature"
    )
    # ... while a genuine token carrying the same hint is fine: the hint is simply not used.
    await verifier.verify(sign(rsa_signer, claims_for(provider), **{member: hint}))


async def test_tampered_payload_is_refused(
    provider: Provider, rsa_signer: Signer, make_verifier: MakeVerifier
) -> None:
    verifier = make_verifier(settings_for(provider))
    header, _, signature = sign(rsa_signer, claims_for(provider)).split(".")
    body = b64(json.dumps(claims_for(provider, groups=["root"])).encode())
    assert await refused(verifier, f"{header}.{body}.{signature}") == "signature"


# --- refetching on an unknown kid ---------------------------------------------------------


async def test_unknown_kid_refetches_exactly_once(
    provider: Provider, rsa_signer: Signer, make_verifier: MakeVerifier
) -> None:
    verifier = make_verifier(settings_for(provider))
    await verifier.prefetch()
    assert provider.hits["jwks"] == 1
    stranger = rsa_signer.rekeyed("nobody")
    assert await refused(verifier, sign(stranger, claims_for(provider))) == "unknown_kid"
    assert provider.hits["jwks"] == 2
    assert await refused(verifier, sign(stranger, claims_for(provider))) == "unknown_kid"
    assert provider.hits["jwks"] == 2
    await verifier.verify(sign(rsa_signer, claims_for(provider)))  # known kids: no fetch
    assert provider.hits["jwks"] == 2


async def test_flood_of_unknown_kids_shares_one_fetch_per_minute(
    provider: Provider, rsa_signer: Signer, make_verifier: MakeVerifier, clock: Clock
) -> None:
    provider.cache_control = "max-age=86400"  # expiry never triggers a fetch here
    verifier = make_verifier(settings_for(provider))
    await verifier.prefetch()
    provider.delay = 0.05  # so that all 100 misses are really concurrent with the fetch
    tokens = [sign(rsa_signer.rekeyed(f"kid-{i}"), claims_for(provider)) for i in range(100)]

    async def flood() -> list[str]:
        return await asyncio.gather(*(refused(verifier, token) for token in tokens))

    assert set(await flood()) == {"unknown_kid"}
    assert provider.hits["jwks"] == 2
    clock.now += 59
    assert set(await flood()) == {"unknown_kid"}
    assert provider.hits["jwks"] == 2
    clock.now += 2  # 61 s after the first flood
    assert set(await flood()) == {"unknown_kid"}
    assert provider.hits["jwks"] == 3


async def test_concurrent_misses_all_see_the_refetched_key(
    provider: Provider, rsa_signer: Signer, rsa_keys: list[Any], make_verifier: MakeVerifier
) -> None:
    verifier = make_verifier(settings_for(provider))
    await verifier.prefetch()
    fresh = Signer("rsa-2", "RS256", rsa_keys[1])
    provider.signers = [rsa_signer, fresh]
    provider.delay = 0.05
    token = sign(fresh, claims_for(provider))
    identities = await asyncio.gather(*(verifier.verify(token) for _ in range(50)))
    assert len(identities) == 50
    assert provider.hits["jwks"] == 2


async def test_rotated_provider_key_is_picked_up(
    provider: Provider, rsa_signer: Signer, rsa_keys: list[Any], make_verifier: MakeVerifier
) -> None:
    verifier = make_verifier(settings_for(provider, discover=True))
    await verifier.prefetch()
    await verifier.verify(sign(rsa_signer, claims_for(provider)))
    rotated = Signer("rsa-rotated", "RS256", rsa_keys[1])
    provider.signers = [rotated]  # the old key is withdrawn
    await verifier.verify(sign(rotated, claims_for(provider)))
    assert provider.hits["jwks"] == 2
    assert provider.hits["discovery"] == 1  # the discovered jwks_uri is remembered
    assert await refused(verifier, sign(rsa_signer, claims_for(provider))) == "unknown_kid"


async def test_a_cancelled_caller_does_not_cancel_the_shared_fetch(
    provider: Provider, rsa_signer: Signer, make_verifier: MakeVerifier
) -> None:
    verifier = make_verifier(settings_for(provider))
    provider.delay = 0.1
    token = sign(rsa_signer, claims_for(provider))
    first = asyncio.ensure_future(verifier.verify(token))
    second = asyncio.ensure_future(verifier.verify(token))
    await asyncio.sleep(0.02)
    first.cancel()
    assert (await second).id == "00u1abcd2EFGH3ij4x5"
    assert provider.hits["jwks"] == 1
    with pytest.raises(asyncio.CancelledError):
        await first


# --- caching and outages ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        (None, 600),
        ("max-age=300", 300),
        ("public, max-age=3600, must-revalidate", 3600),
        ('max-age="120"', 120),
        ("MAX-AGE=120", 120),
        ("max-age=5", 60),  # floor
        ("max-age=0", 60),
        ("max-age=999999", 86400),  # ceiling
        ("max-age=" + "9" * 400, 86400),
        ("no-store", 60),
        ("no-cache", 60),
        ("max-age=-5", 600),
        ("max-age=1e3", 600),
        ("max-age=٣٠٠", 600),  # Arabic-Indic digits are not HTTP digits
        ("private", 600),
    ],
)
def test_max_age(header: str | None, seconds: int) -> None:
    assert max_age(header) == seconds


@pytest.mark.parametrize(("header", "ttl"), [("max-age=300", 300), ("max-age=1", 60), (None, 600)])
async def test_cache_control_decides_when_keys_are_refetched(
    provider: Provider,
    rsa_signer: Signer,
    make_verifier: MakeVerifier,
    clock: Clock,
    header: str | None,
    ttl: int,
) -> None:
    provider.cache_control = header
    verifier = make_verifier(settings_for(provider))
    await verifier.prefetch()
    token = sign(rsa_signer, claims_for(provider, exp=int(NOW) + 10_000))
    clock.now = NOW + ttl - 1
    await verifier.verify(token)
    assert provider.hits["jwks"] == 1
    clock.now = NOW + ttl
    await verifier.verify(token)
    assert provider.hits["jwks"] == 2


async def test_ceiling_caps_a_huge_max_age(
    provider: Provider, rsa_signer: Signer, make_verifier: MakeVerifier, clock: Clock
) -> None:
    provider.cache_control = "max-age=31536000"
    verifier = make_verifier(settings_for(provider))
    await verifier.prefetch()
    clock.now = NOW + 86400
    await verifier.verify(sign(rsa_signer, claims_for(provider, exp=int(NOW) + 100_000)))
    assert provider.hits["jwks"] == 2


async def test_stopped_provider_cached_keys_keep_verifying(
    provider: Provider, rsa_signer: Signer, make_verifier: MakeVerifier, clock: Clock
) -> None:
    verifier = make_verifier(settings_for(provider))
    await verifier.prefetch()
    await provider.stop()
    token = sign(rsa_signer, claims_for(provider, exp=int(NOW) + 10 * 86400))
    await verifier.verify(token)
    clock.now = NOW + 2 * 86400  # long past any max-age: the stale copy still serves
    await verifier.verify(token)
    clock.now += 61
    await verifier.verify(token)
    stranger = rsa_signer.rekeyed("nobody")
    assert await refused(verifier, sign(stranger, claims_for(provider))) == "unknown_kid"


@pytest.mark.parametrize(
    "breakage",
    ["status-500", "status-404", "garbage", "not-a-set", "empty-set", "only-unusable-keys"],
)
async def test_unusable_answers_count_as_unreachable(
    provider: Provider,
    rsa_signer: Signer,
    make_verifier: MakeVerifier,
    clock: Clock,
    breakage: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    verifier = make_verifier(settings_for(provider))
    await verifier.prefetch()
    if breakage.startswith("status-"):
        provider.status = int(breakage.removeprefix("status-"))
    else:
        provider.body = {
            "garbage": b"<html>oops</html>",
            "not-a-set": b'[{"keys": []}]',
            "empty-set": b'{"keys": []}',
            "only-unusable-keys": json.dumps({"keys": [rsa_signer.jwk(use="enc")]}).encode(),
        }[breakage]
    token = sign(rsa_signer, claims_for(provider, exp=int(NOW) + 10_000))
    clock.now = NOW + 601
    with caplog.at_level(logging.WARNING, logger="gateway.issuers"):
        await verifier.verify(token)  # the refresh failed; the last good set still serves
    assert provider.hits["jwks"] == 2
    assert "serving the cached keys" in caplog.text
    assert token not in caplog.text


async def test_failing_prefetch_does_not_raise_and_recovers(
    rsa_signer: Signer, make_verifier: MakeVerifier, clock: Clock
) -> None:
    provider = await Provider([rsa_signer]).start()
    settings = settings_for(provider, discover=True)
    port = provider.server.port
    await provider.stop()
    verifier = make_verifier(settings)
    await verifier.prefetch()  # provider down at start: logged, not raised
    token = sign(rsa_signer, claims_for(provider, exp=int(NOW) + 10_000))
    assert await refused(verifier, token) == "jwks_unavailable"
    # The provider comes back on the same address; within the minute no new attempt ...
    revived = Provider([rsa_signer])
    revived.server = TestServer(revived.server.app, host="127.0.0.1", port=port)
    await revived.start()
    try:
        assert await refused(verifier, token) == "jwks_unavailable"
        assert revived.hits["discovery"] == 0
        clock.now += 61  # ... and after it, the keys arrive.
        await verifier.verify(token)
        assert (revived.hits["discovery"], revived.hits["jwks"]) == (1, 1)
    finally:
        await revived.stop()


async def test_slow_provider_times_out(
    provider: Provider,
    rsa_signer: Signer,
    make_verifier: MakeVerifier,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(issuers, "FETCH_TIMEOUT", 0.1)
    provider.delay = 1.0
    verifier = make_verifier(settings_for(provider))
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await refused(verifier, sign(rsa_signer, claims_for(provider))) == "jwks_unavailable"
    assert loop.time() - started < 0.8


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_jwks_over_one_mib_is_refused(
    provider: Provider, rsa_signer: Signer, make_verifier: MakeVerifier, chunked: bool
) -> None:
    document = provider.jwks()
    document["padding"] = "x" * MIB
    provider.body = json.dumps(document).encode()
    provider.chunked = chunked
    verifier = make_verifier(settings_for(provider))
    assert await refused(verifier, sign(rsa_signer, claims_for(provider))) == "jwks_unavailable"
    assert provider.hits["jwks"] == 1


async def test_announced_oversize_is_refused_without_reading(
    provider: Provider,
    rsa_signer: Signer,
    make_verifier: MakeVerifier,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(issuers, "FETCH_TIMEOUT", 2.0)
    provider.announce_then_stall = MIB + 1
    verifier = make_verifier(settings_for(provider))
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await refused(verifier, sign(rsa_signer, claims_for(provider))) == "jwks_unavailable"
    assert loop.time() - started < 1.0  # refused on the header, not after the timeout


async def test_jwks_just_under_one_mib_is_accepted(
    provider: Provider, rsa_signer: Signer, make_verifier: MakeVerifier
) -> None:
    document = provider.jwks()
    size = len(json.dumps({**document, "padding": ""}).encode())
    document["padding"] = "x" * (MIB - size)
    provider.body = json.dumps(document).encode()
    assert len(provider.body) == MIB
    provider.chunked = True
    verifier = make_verifier(settings_for(provider))
    await verifier.verify(sign(rsa_signer, claims_for(provider)))


async def test_redirect_to_another_host_is_not_followed(
    provider: Provider, rsa_signer: Signer, make_verifier: MakeVerifier
) -> None:
    evil = await Provider([rsa_signer]).start()
    try:
        for target in (evil.jwks_uri, evil.jwks_uri.replace("127.0.0.1", "localhost")):
            provider.redirect_to = target
            verifier = make_verifier(settings_for(provider))
            token = sign(rsa_signer, claims_for(provider))
            assert await refused(verifier, token) == "jwks_unavailable"
        assert evil.hits["jwks"] == 0
    finally:
        await evil.stop()


async def test_redirect_within_the_same_origin_is_followed(
    provider: Provider, rsa_signer: Signer, make_verifier: MakeVerifier
) -> None:
    verifier = make_verifier(settings_for(provider, jwks_uri=provider.base + "/moved"))
    await verifier.verify(sign(rsa_signer, claims_for(provider)))
    assert (provider.hits["moved"], provider.hits["jwks"]) == (1, 1)


async def test_redirect_loop_gives_up(
    provider: Provider, rsa_signer: Signer, make_verifier: MakeVerifier
) -> None:
    provider.redirect_to = "/oauth2/keys"  # relative, same origin, forever
    verifier = make_verifier(settings_for(provider))
    assert await refused(verifier, sign(rsa_signer, claims_for(provider))) == "jwks_unavailable"
    assert provider.hits["jwks"] == issuers.MAX_REDIRECTS + 1


@pytest.mark.parametrize(
    "announced",
    ["{issuer}/", "{issuer}/other", "https://evil.example/oauth2", "{upper}"],
)
async def test_discovery_naming_another_issuer_is_refused(
    provider: Provider, rsa_signer: Signer, make_verifier: MakeVerifier, announced: str
) -> None:
    provider.discovery_issuer = announced.format(
        issuer=provider.issuer, upper=provider.issuer.upper()
    )
    verifier = make_verifier(settings_for(provider, discover=True))
    assert await refused(verifier, sign(rsa_signer, claims_for(provider))) == "jwks_unavailable"
    assert (provider.hits["discovery"], provider.hits["jwks"]) == (1, 0)


# --- several issuers ----------------------------------------------------------------------


@pytest.fixture
async def two_providers(rsa_keys: list[Any]) -> AsyncIterator[tuple[Provider, Provider]]:
    # Same kid on both sides: the kid alone must never decide whose key is used.
    a = await Provider([Signer("1", "RS256", rsa_keys[0])], path="/realms/a").start()
    b = await Provider([Signer("1", "RS256", rsa_keys[1])], path="/realms/b").start()
    yield a, b
    await a.stop()
    await b.stop()


async def test_two_issuers_each_with_own_audience_and_claims(
    two_providers: tuple[Provider, Provider], make_verifier: MakeVerifier
) -> None:
    a, b = two_providers
    keycloak = ClaimMapping(
        id="sub", email="email", name="preferred_username", roles="realm_access.roles"
    )
    verifier = make_verifier(
        settings_for(a, name="okta", audience="aud-a"),
        settings_for(b, name="keycloak", audience="aud-b", claims=keycloak, discover=True),
    )
    await verifier.prefetch()
    signer_a, signer_b = a.signers[0], b.signers[0]
    from_a = sign(signer_a, claims_for(a, aud="aud-a"))
    from_b = sign(
        signer_b,
        claims_for(
            b, aud="aud-b", groups=None, preferred_username="bob", realm_access={"roles": ["ops"]}
        ),
    )
    identity_a, identity_b = await verifier.verify(from_a), await verifier.verify(from_b)
    assert (identity_a.issuer, identity_a.roles, identity_a.name) == (
        a.issuer,
        ("admin", "dev"),
        "Ann",
    )
    assert (identity_b.issuer, identity_b.roles, identity_b.name) == (b.issuer, ("ops",), "bob")
    assert verifier.issuer_for(from_a).settings.name == "okta"  # type: ignore[union-attr]

    # A's key, B's iss (and B's audience): checked against B's keys only.
    assert await refused(verifier, sign(signer_a, claims_for(b, aud="aud-b"))) == "signature"
    # Each issuer's audience is its own.
    assert await refused(verifier, sign(signer_a, claims_for(a, aud="aud-b"))) == "audience"
    assert await refused(verifier, sign(signer_b, claims_for(b, aud="aud-a"))) == "audience"


async def test_another_issuers_kid_is_unknown_here(
    two_providers: tuple[Provider, Provider], rsa_keys: list[Any], make_verifier: MakeVerifier
) -> None:
    a, b = two_providers
    a.signers = [Signer("only-a", "RS256", rsa_keys[0])]
    verifier = make_verifier(settings_for(a, audience="x"), settings_for(b, audience="x"))
    await verifier.prefetch()
    forged = sign(a.signers[0], claims_for(b, aud="x"))
    assert await refused(verifier, forged) == "unknown_kid"
    assert await verifier.verify(sign(a.signers[0], claims_for(a, aud="x")))


def test_the_same_issuer_twice_is_a_programming_error(provider: Provider) -> None:
    settings = settings_for(provider)
    with pytest.raises(ValueError, match="twice"):
        ExternalVerifier([settings, replace(settings, name="again")], session=lambda: None)  # type: ignore[arg-type,return-value]


# --- kid-less tokens ----------------------------------------------------------------------


async def test_kidless_token_is_tried_against_keys_of_its_type_only(
    rsa_keys: list[Any], make_verifier: MakeVerifier
) -> None:
    rsa_a = Signer(None, "RS256", rsa_keys[0])
    rsa_b = Signer("rsa-b", "RS256", rsa_keys[1])
    ec_key = ec_signer(None)
    provider = await Provider([rsa_a, rsa_b, ec_key]).start()
    try:
        verifier = make_verifier(settings_for(provider))
        for signer in (rsa_a, rsa_b.rekeyed(None), ec_key):
            await verifier.verify(sign(signer, claims_for(provider)))
        assert provider.hits["jwks"] == 1
        # No EdDSA key here: refused without trying the RSA or EC keys.
        assert await refused(verifier, sign(ed_signer(None), claims_for(provider))) == "algorithm"
        assert await refused(verifier, sign(ec_signer(None), claims_for(provider))) == "signature"
    finally:
        await provider.stop()


async def test_kidless_token_of_a_missing_type_tries_keys_of_that_type_only(
    rsa_keys: list[Any], make_verifier: MakeVerifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    ec_key, rsa_key = ec_signer("e"), Signer("r", "RS256", rsa_keys[0])
    provider = await Provider([ec_key, rsa_key]).start()
    tried: list[str] = []
    real_verify = issuers.verify_signed

    def spy(token: str, algorithm: Any, key: Any, **kwargs: Any) -> Any:
        tried.append(type(algorithm).__name__)
        return real_verify(token, algorithm, key, **kwargs)

    monkeypatch.setattr(issuers, "verify_signed", spy)
    try:
        verifier = make_verifier(settings_for(provider))
        await verifier.verify(sign(rsa_key.rekeyed(None), claims_for(provider)))
        assert tried == ["RSAAlgorithm"]
    finally:
        await provider.stop()


# --- which JWKs are used ------------------------------------------------------------------


def _jwk_variants(rsa_keys: list[Any]) -> dict[str, tuple[dict[str, Any], bool]]:
    good = Signer("k", "RS256", rsa_keys[0]).jwk()
    small = Signer("k", "RS256", rsa.generate_private_key(65537, 1024)).jwk()
    p384 = ec_signer("k", ec.SECP384R1()).jwk()
    return {
        "good": (good, True),
        "use-absent": ({k: v for k, v in good.items() if k != "use"}, True),
        "key_ops-verify": ({**good, "key_ops": ["verify"]}, True),
        "use-enc": ({**good, "use": "enc"}, False),
        "key_ops-encrypt": ({**good, "key_ops": ["encrypt"]}, False),
        "alg-HS256": ({**good, "alg": "HS256"}, False),
        "alg-none": ({**good, "alg": "none"}, False),
        "alg-of-other-kty": ({**good, "alg": "ES256"}, False),
        "ES256-on-P-384": ({**p384, "alg": "ES256"}, False),
        "oct": ({"kty": "oct", "k": b64(b"s" * 32), "kid": "k"}, False),
        "rsa-1024": (small, False),
        "kid-not-string": ({**good, "kid": 1}, False),
        "missing-n": ({k: v for k, v in good.items() if k != "n"}, False),
        "not-an-object": (["RSA"], False),  # type: ignore[dict-item]
        "with-private-part": ({**good, "d": b64(b"leaked")}, True),
    }


def test_jwk_filter(rsa_keys: list[Any]) -> None:
    for name, (jwk, usable) in _jwk_variants(rsa_keys).items():
        parsed = issuers._parse_jwk(jwk)
        assert isinstance(parsed, issuers._Key) is usable, (name, parsed)
        if isinstance(parsed, issuers._Key):
            assert isinstance(parsed.jwk.key, rsa.RSAPublicKey), name  # never a private key


def test_a_set_without_usable_keys_is_unavailable_and_says_why(rsa_keys: list[Any]) -> None:
    with pytest.raises(JwksUnavailable, match="algorithm, type or curve"):
        issuers._parse_jwks({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]})
    signing_only = {**_jwk_variants(rsa_keys)["use-absent"][0], "key_ops": ["sign"]}
    with pytest.raises(JwksUnavailable, match=r"no usable signing key \(key_ops without verify\)"):
        issuers._parse_jwks({"keys": [signing_only]})
    with pytest.raises(JwksUnavailable, match="the set is empty"):
        issuers._parse_jwks({"keys": []})


def test_reprs_hold_no_key_material(provider: Provider, rsa_signer: Signer) -> None:
    verifier = ExternalVerifier([settings_for(provider)], session=lambda: None)  # type: ignore[arg-type,return-value]
    keys = verifier.issuers[0]
    key = issuers._parse_jwk(rsa_signer.jwk())
    assert rsa_signer.jwk()["n"] not in repr(key) + repr(keys) + repr(verifier)


async def test_every_fetch_is_reported_with_its_reason_and_outcome(
    provider: Provider, rsa_signer: Signer, session: aiohttp.ClientSession, clock: Clock
) -> None:
    seen: list[tuple[str, str, str, int | None]] = []

    def observe(issuer: str, reason: str, outcome: str, seconds: float, keys: int | None) -> None:
        assert 0 <= seconds < 5
        seen.append((issuer, reason, outcome, keys))

    verifier = ExternalVerifier([settings_for(provider)], session, clock=clock, observer=observe)
    try:
        await verifier.prefetch()
        stranger = rsa_signer.rekeyed("nobody")
        assert await refused(verifier, sign(stranger, claims_for(provider))) == "unknown_kid"
        provider.status = 503
        clock.now += 601  # past the default max-age: the next use refreshes, and fails
        await verifier.verify(sign(rsa_signer, claims_for(provider, exp=int(NOW) + 10_000)))
    finally:
        await verifier.aclose()
    assert seen == [
        ("okta", "prefetch", "ok", 1),
        ("okta", "unknown_kid", "ok", 1),
        ("okta", "expired", "error", 1),  # the stale set keeps serving: still 1 key
    ]
