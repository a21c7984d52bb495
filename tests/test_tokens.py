"""Signing keys and access tokens: key files, rotation, JWKS, and pinned verification.

Attack tokens are forged by hand (``forge``) so that nothing PyJWT refuses to *produce*
is left untested on the verifying side.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import os
import secrets
import stat
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import get_default_algorithms

from gateway.config import Secret, TokenSettings
from gateway.errors import InvalidToken
from gateway.identity import Identity
from gateway.tokens import ASSERTION_TTL, ASSERTION_TYP, KeyRing, KeyRingError, TokenService

ISSUER = "https://gateway.test"
AUDIENCE = "gateway"
HS_SECRET = "s3cret-" + "x" * 40
ASYMMETRIC = ["RS256", "ES256", "EdDSA"]
ALL = [*ASYMMETRIC, "HS256"]
PRIVATE_JWK_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}
KTY = {"RS256": "RSA", "ES256": "EC", "EdDSA": "OKP"}


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def settings_for(tmp_path: Path, algorithm: str = "RS256", **overrides: Any) -> TokenSettings:
    values: dict[str, Any] = {
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "algorithm": algorithm,
        "keys_dir": tmp_path / "keys",
        "secret": Secret(HS_SECRET) if algorithm == "HS256" else None,
        "access_ttl": 900.0,
        "leeway": 30.0,
    }
    values.update(overrides)
    return TokenSettings(**values)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def forge(header: dict[str, Any], claims: Any, key: Any, alg: str | None = None) -> str:
    """A compact JWS signed with ``key`` under ``alg`` (defaults to the header's alg)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    alg = alg or header["alg"]
    if key is None:
        return signing_input + "."
    algorithm = get_default_algorithms()[alg]
    signature = algorithm.sign(signing_input.encode(), algorithm.prepare_key(key))
    if alg == "ES256":
        signature = low_s(signature)
    return f"{signing_input}.{b64(signature)}"


P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def low_s(signature: bytes) -> bytes:
    """The canonical twin of a raw ES256 signature (the only one the gateway accepts)."""
    s = int.from_bytes(signature[32:], "big")
    return signature if s <= P256_ORDER // 2 else twin_s(signature)


def twin_s(signature: bytes) -> bytes:
    """``(r, n - s)``: verifies wherever ``(r, s)`` does (ECDSA malleability)."""
    s = int.from_bytes(signature[32:], "big")
    return signature[:32] + (P256_ORDER - s).to_bytes(32, "big")


def unb64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def private_key_of(ring: KeyRing, settings: TokenSettings, kid: str) -> Any:
    """Our own private key, read back from disk the way an operator would."""
    if settings.algorithm == "HS256":
        return HS_SECRET.encode()
    return _parse_pem((Path(settings.keys_dir) / f"{kid}.pem").read_bytes())


@functools.cache
def _parse_pem(pem: bytes) -> Any:
    return serialization.load_pem_private_key(pem, password=None)  # RSA checks are slow


@dataclass
class Ctx:
    settings: TokenSettings
    ring: KeyRing
    service: TokenService
    clock: Clock
    kid: str
    key: Any

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(self.clock.now)
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "sub": str(uuid.uuid4()),
            "aud": AUDIENCE,
            "iat": now,
            "nbf": now,
            "exp": now + 900,
            "jti": uuid.uuid4().hex,
            "email": "ada@example.com",
            "name": "Ada",
            "roles": ["user"],
        }
        for name, value in overrides.items():
            if value is _DROP:
                del claims[name]
            else:
                claims[name] = value
        return claims

    def header(self, **overrides: Any) -> dict[str, Any]:
        header: dict[str, Any] = {"alg": self.settings.algorithm, "kid": self.kid, "typ": "JWT"}
        for name, value in overrides.items():
            if value is _DROP:
                del header[name]
            else:
                header[name] = value
        return header

    def sign(self, claims: Any = None, key: Any = None, **header: Any) -> str:
        """Signed under our algorithm whatever the header claims (the header is the attack)."""
        claims = self.claims() if claims is None else claims
        key = self.key if key is None else key
        return forge(self.header(**header), claims, key, self.settings.algorithm)

    def reason(self, token: Any) -> str:
        with pytest.raises(InvalidToken) as caught:
            self.service.verify(token)
        return caught.value.reason


_DROP = object()


def make_ctx(tmp_path: Path, algorithm: str = "RS256") -> Ctx:
    settings = settings_for(tmp_path, algorithm)
    return ctx_for(settings, KeyRing.load(settings))


def ctx_for(settings: TokenSettings, ring: KeyRing) -> Ctx:
    clock = Clock()
    kid = ring.keys()[-1].kid
    return Ctx(
        settings,
        ring,
        TokenService(settings, ring, clock=clock),
        clock,
        kid,
        private_key_of(ring, settings, kid),
    )


@pytest.fixture(scope="module")
def shared_rings(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[TokenSettings, KeyRing]]:
    """One ring per algorithm for tests that never change it (RSA keys are slow to make)."""
    rings = {}
    for algorithm in ALL:
        settings = settings_for(tmp_path_factory.mktemp(algorithm), algorithm)
        rings[algorithm] = (settings, KeyRing.load(settings))
    return rings


@pytest.fixture(params=ALL)
def any_ctx(
    request: pytest.FixtureRequest, shared_rings: dict[str, tuple[TokenSettings, KeyRing]]
) -> Ctx:
    return ctx_for(*shared_rings[request.param])


@pytest.fixture
def ctx(shared_rings: dict[str, tuple[TokenSettings, KeyRing]]) -> Ctx:
    """RS256 on a shared, read-only ring, with its own clock and service."""
    return ctx_for(*shared_rings["RS256"])


@pytest.fixture
def own_ctx(tmp_path: Path) -> Ctx:
    """RS256 on a ring of its own, for tests that rotate, remove or delete files."""
    return make_ctx(tmp_path, "RS256")


@functools.cache
def attacker_rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


# --- issuing and round trips -------------------------------------------------------------


def test_round_trip(any_ctx: Ctx) -> None:
    token, expires_in = any_ctx.service.issue_access_token(
        user_id="3f0c2a5e-1111-4222-8333-444455556666",
        email="ada@example.com",
        name="Ada Lovelace",
        roles=("user", "admin"),
    )
    assert expires_in == 900
    identity = any_ctx.service.verify(token)
    assert isinstance(identity, Identity)
    assert identity.id == "3f0c2a5e-1111-4222-8333-444455556666"
    assert identity.issuer == ISSUER
    assert identity.email == "ada@example.com"
    assert identity.name == "Ada Lovelace"
    assert identity.roles == ("user", "admin")


def test_issued_header_and_claims(any_ctx: Ctx) -> None:
    token, _ = any_ctx.service.issue_access_token(
        user_id="u-1", email="ada@example.com", name=None, roles=("user",)
    )
    header = jwt.get_unverified_header(token)
    assert header == {"alg": any_ctx.settings.algorithm, "kid": any_ctx.kid, "typ": "JWT"}
    claims = jwt.decode(token, options={"verify_signature": False})
    now = int(any_ctx.clock.now)
    assert claims["iss"] == ISSUER
    assert claims["aud"] == AUDIENCE
    assert claims["sub"] == "u-1"
    assert (claims["iat"], claims["nbf"], claims["exp"]) == (now, now, now + 900)
    assert len(claims["jti"]) == 32 and int(claims["jti"], 16) >= 0
    assert claims["email"] == "ada@example.com"
    assert claims["roles"] == ["user"]
    assert "name" not in claims


def test_each_token_has_its_own_jti(ctx: Ctx) -> None:
    def issue() -> str:
        return ctx.service.issue_access_token(
            user_id="u", email="a@example.com", name=None, roles=()
        )[0]

    jtis = {jwt.decode(issue(), options={"verify_signature": False})["jti"] for _ in range(5)}
    assert len(jtis) == 5


def test_forged_token_with_our_key_verifies(any_ctx: Ctx) -> None:
    # The forging helper itself is sound, so the refusals below are meaningful.
    assert any_ctx.service.verify(any_ctx.sign()).email == "ada@example.com"


@pytest.mark.parametrize("typ", [None, "JWT", "jwt", "at+jwt", "AT+JWT", "application/at+jwt"])
def test_accepted_typ(ctx: Ctx, typ: str | None) -> None:
    token = ctx.sign(typ=_DROP) if typ is None else ctx.sign(typ=typ)
    ctx.service.verify(token)


@pytest.mark.parametrize("aud", [AUDIENCE, [AUDIENCE], ["other", AUDIENCE]])
def test_accepted_audience_shapes(ctx: Ctx, aud: Any) -> None:
    ctx.service.verify(ctx.sign(ctx.claims(aud=aud)))


@pytest.mark.parametrize(
    "extra",
    [
        {"jku": "http://127.0.0.1:1/jwks.json"},
        {"x5u": "http://127.0.0.1:1/cert.pem"},
        {"x5c": ["MIIBfake"]},
    ],
)
def test_remote_key_headers_are_ignored(ctx: Ctx, extra: dict[str, Any]) -> None:
    # Signed by us: still valid, and nothing was fetched (the URLs point at a closed port).
    ctx.service.verify(ctx.sign(**extra))


# --- the attack table --------------------------------------------------------------------


def _public_pem(ctx: Ctx) -> bytes:
    pem: bytes = ctx.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem


def _hs256_with_public_pem(ctx: Ctx) -> str:
    # Algorithm confusion: HMAC keyed with our (public) RSA key, crafted by hand because
    # PyJWT refuses to produce it.
    signing_input = f"{b64(json.dumps(ctx.header(alg='HS256')).encode())}." + b64(
        json.dumps(ctx.claims()).encode()
    )
    mac = hmac.new(_public_pem(ctx), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def _embedded_jwk(ctx: Ctx) -> str:
    attacker = attacker_rsa()
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(attacker.public_key()))
    return ctx.sign(key=attacker, jwk=jwk)


def _swapped_signature(ctx: Ctx) -> str:
    other = ctx.sign(ctx.claims(sub="someone-else"))
    return ctx.sign().rsplit(".", 1)[0] + "." + other.rsplit(".", 1)[1]


def _non_canonical_signature(ctx: Ctx) -> str:
    # Flip the trailing bits of the last base64 character: same bytes for a lax decoder.
    token = ctx.sign()
    last = token[-1]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    return token[:-1] + alphabet[alphabet.index(last) ^ 1]


ATTACKS: list[tuple[str, Callable[[Ctx], Any], str]] = [
    ("alg none", lambda c: forge(c.header(alg="none"), c.claims(), None), "algorithm"),
    ("alg None", lambda c: forge(c.header(alg="None"), c.claims(), None), "algorithm"),
    ("alg NONE", lambda c: forge(c.header(alg="NONE"), c.claims(), None), "algorithm"),
    ("alg nOnE signed", lambda c: c.sign(alg="nOnE"), "algorithm"),
    ("alg missing", lambda c: c.sign(alg=_DROP), "algorithm"),
    ("alg null", lambda c: c.sign(alg=None), "algorithm"),
    ("alg list", lambda c: c.sign(alg=["RS256"]), "algorithm"),
    ("alg rs256 lowercase", lambda c: c.sign(alg="rs256"), "algorithm"),
    ("alg RS512", lambda c: forge(c.header(alg="RS512"), c.claims(), c.key), "algorithm"),
    ("alg PS256", lambda c: forge(c.header(alg="PS256"), c.claims(), c.key), "algorithm"),
    ("HS256 keyed with our public PEM", _hs256_with_public_pem, "algorithm"),
    ("empty signature", lambda c: c.sign().rsplit(".", 1)[0] + ".", "signature"),
    ("signature of another token", _swapped_signature, "signature"),
    ("non-canonical signature", _non_canonical_signature, "malformed"),
    ("other key, same kid", lambda c: c.sign(key=attacker_rsa()), "signature"),
    ("attacker key + embedded jwk", _embedded_jwk, "signature"),
    (
        "attacker key + jku",
        lambda c: c.sign(key=attacker_rsa(), jku="http://127.0.0.1:1/jwks.json"),
        "signature",
    ),
    ("wrong iss", lambda c: c.sign(c.claims(iss="https://evil.test")), "issuer"),
    ("iss trailing slash", lambda c: c.sign(c.claims(iss=ISSUER + "/")), "issuer"),
    ("iss not a string", lambda c: c.sign(c.claims(iss=[ISSUER])), "issuer"),
    ("wrong aud", lambda c: c.sign(c.claims(aud="other")), "audience"),
    ("aud list without ours", lambda c: c.sign(c.claims(aud=["a", "b"])), "audience"),
    ("expired", lambda c: c.sign(c.claims(exp=int(c.clock.now) - 31)), "expired"),
    ("nbf in the future", lambda c: c.sign(c.claims(nbf=int(c.clock.now) + 31)), "not_yet_valid"),
    ("iat in the future", lambda c: c.sign(c.claims(iat=int(c.clock.now) + 31)), "iat"),
    ("missing exp", lambda c: c.sign(c.claims(exp=_DROP)), "missing_claim"),
    ("null exp", lambda c: c.sign(c.claims(exp=None)), "missing_claim"),
    ("missing sub", lambda c: c.sign(c.claims(sub=_DROP)), "missing_claim"),
    ("missing iat", lambda c: c.sign(c.claims(iat=_DROP)), "missing_claim"),
    ("missing iss", lambda c: c.sign(c.claims(iss=_DROP)), "missing_claim"),
    ("missing aud", lambda c: c.sign(c.claims(aud=_DROP)), "missing_claim"),
    ("exp a string", lambda c: c.sign(c.claims(exp="tomorrow")), "malformed_claims"),
    ("exp a boolean", lambda c: c.sign(c.claims(exp=True)), "malformed_claims"),
    ("exp NaN", lambda c: c.sign(c.claims(exp=float("nan"))), "malformed_claims"),
    ("exp huge", lambda c: c.sign(c.claims(exp=10**400)), "malformed_claims"),
    ("iat a string", lambda c: c.sign(c.claims(iat="now")), "malformed_claims"),
    ("sub a number", lambda c: c.sign(c.claims(sub=42)), "malformed_claims"),
    ("sub empty", lambda c: c.sign(c.claims(sub="")), "malformed_claims"),
    ("role with a comma", lambda c: c.sign(c.claims(roles=["user,admin"])), "malformed_claims"),
    ("jti a number", lambda c: c.sign(c.claims(jti=7)), "malformed_claims"),
    ("payload an array", lambda c: c.sign(["not", "an", "object"]), "malformed"),
    ("unknown crit", lambda c: c.sign(crit=["exp"], exp=1), "crit"),
    ("empty crit", lambda c: c.sign(crit=[]), "crit"),
    ("crit b64", lambda c: c.sign(crit=["b64"], b64=True), "crit"),
    ("b64 false without crit", lambda c: c.sign(b64=False), "malformed"),
    ("typ JWS", lambda c: c.sign(typ="JWS"), "typ"),
    ("typ of another token kind", lambda c: c.sign(typ="secevent+jwt"), "typ"),
    ("typ not a string", lambda c: c.sign(typ=1), "typ"),
    ("kid traversal", lambda c: c.sign(kid="../../etc/passwd"), "unknown_kid"),
    ("kid traversal to ours", lambda c: c.sign(kid=f"../keys/{c.kid}"), "unknown_kid"),
    ("kid with .pem", lambda c: c.sign(kid=f"{c.kid}.pem"), "unknown_kid"),
    ("kid case changed", lambda c: c.sign(kid=c.kid.upper()), "unknown_kid"),
    ("kid with trailing space", lambda c: c.sign(kid=c.kid + " "), "unknown_kid"),
    ("kid missing", lambda c: c.sign(kid=_DROP), "unknown_kid"),
    ("kid a number", lambda c: c.sign(kid=1), "unknown_kid"),
    ("kid a list", lambda c: c.sign(kid=[c.kid]), "unknown_kid"),
    ("empty string", lambda c: "", "malformed"),
    ("garbage", lambda c: "garbage", "malformed"),
    ("three dots", lambda c: "...", "malformed"),
    ("two dots", lambda c: "..", "malformed"),
    ("two segments", lambda c: c.sign().rsplit(".", 1)[0], "malformed"),
    ("four segments", lambda c: c.sign() + ".x", "malformed"),
    ("base64 padding", lambda c: c.sign() + "=", "malformed"),
    ("leading space", lambda c: " " + c.sign(), "malformed"),
    ("Bearer prefix", lambda c: "Bearer " + c.sign(), "malformed"),
    ("non-ASCII", lambda c: c.sign() + "é", "malformed"),
    ("header not JSON", lambda c: "bm90IGpzb24." + c.sign().split(".", 1)[1], "malformed"),
    ("header an array", lambda c: b64(b"[1,2]") + "." + c.sign().split(".", 1)[1], "malformed"),
    ("header bad base64 length", lambda c: "a." + c.sign().split(".", 1)[1], "malformed"),
    ("payload not JSON", lambda c: _raw(c, b"{{"), "malformed"),
    ("huge token", lambda c: c.sign(c.claims(pad="x" * 9000)), "malformed"),
    ("refresh token", lambda c: secrets.token_urlsafe(32), "malformed"),
    ("None", lambda c: None, "malformed"),
    ("bytes", lambda c: c.sign().encode(), "malformed"),
    ("int", lambda c: 12345, "malformed"),
]


def _raw(ctx: Ctx, payload: bytes) -> str:
    """A token whose payload bytes are ``payload``, correctly signed with our key."""
    signing_input = f"{b64(json.dumps(ctx.header()).encode())}.{b64(payload)}"
    algorithm = get_default_algorithms()[ctx.settings.algorithm]
    signature = algorithm.sign(signing_input.encode(), algorithm.prepare_key(ctx.key))
    if ctx.settings.algorithm == "ES256":
        signature = low_s(signature)
    return f"{signing_input}.{b64(signature)}"


@pytest.mark.parametrize(
    ("build", "reason"), [(a[1], a[2]) for a in ATTACKS], ids=[a[0] for a in ATTACKS]
)
def test_attack_refused(ctx: Ctx, build: Callable[[Ctx], Any], reason: str) -> None:
    assert ctx.reason(build(ctx)) == reason


def test_refusal_detail_never_echoes_the_token(ctx: Ctx) -> None:
    token = ctx.sign(ctx.claims(iss="https://evil.test"))
    with pytest.raises(InvalidToken) as caught:
        ctx.service.verify(token)
    assert token not in str(caught.value) and token not in caught.value.detail
    assert "evil" not in caught.value.detail


Rings = dict[str, tuple[TokenSettings, KeyRing]]


@pytest.mark.parametrize(("algorithm", "other"), [(a, b) for a in ALL for b in ALL if a != b])
def test_other_algorithms_keys_do_not_verify(
    shared_rings: Rings, algorithm: str, other: str
) -> None:
    # Each configured algorithm refuses tokens of every other algorithm, even with our kid.
    ours, theirs = ctx_for(*shared_rings[algorithm]), ctx_for(*shared_rings[other])
    assert ours.reason(theirs.sign(kid=ours.kid)) == "algorithm"


@pytest.mark.parametrize("algorithm", ALL)
def test_another_ring_same_algorithm_is_refused(
    tmp_path: Path, shared_rings: Rings, algorithm: str
) -> None:
    ours = ctx_for(*shared_rings[algorithm])
    theirs = make_ctx(tmp_path, algorithm)
    token, _ = theirs.service.issue_access_token(
        user_id="u", email="a@example.com", name=None, roles=()
    )
    if algorithm == "HS256":  # same secret, same kid: it is the same key
        ours.service.verify(token)
    else:
        assert ours.reason(token) == "unknown_kid"
        assert ours.reason(theirs.sign(kid=ours.kid)) == "signature"


def test_hs256_wrong_secret_is_refused(shared_rings: Rings) -> None:
    ctx = ctx_for(*shared_rings["HS256"])
    assert ctx.reason(ctx.sign(key=b"another-secret-" + b"y" * 40)) == "signature"


# --- ES256 signature malleability ----------------------------------------------------------


@pytest.fixture
def es_ctx(shared_rings: Rings) -> Ctx:
    return ctx_for(*shared_rings["ES256"])


def test_issued_es256_tokens_are_low_s(es_ctx: Ctx) -> None:
    # OpenSSL returns a high s half the time: 48 tokens all low-S only if we normalise.
    for _ in range(48):
        token, _ = es_ctx.service.issue_access_token(
            user_id="u", email="a@example.com", name=None, roles=()
        )
        signature = unb64(token.rsplit(".", 1)[1])
        assert len(signature) == 64
        assert int.from_bytes(signature[32:], "big") <= P256_ORDER // 2
        es_ctx.service.verify(token)


def test_es256_high_s_twin_is_refused(es_ctx: Ctx) -> None:
    for _ in range(8):
        token, _ = es_ctx.service.issue_access_token(
            user_id="u", email="a@example.com", name=None, roles=()
        )
        signing_input, _, signature = token.rpartition(".")
        twin = f"{signing_input}.{b64(twin_s(unb64(signature)))}"
        assert twin != token
        assert es_ctx.reason(twin) == "signature"
        es_ctx.service.verify(token)


@pytest.mark.parametrize(
    "signature",
    [
        bytes(64),  # r = s = 0: "psychic signatures", CVE-2022-21449
        P256_ORDER.to_bytes(32, "big") * 2,  # r = s = n, which is 0 mod n
        bytes(31) + b"\x01" + bytes(31) + b"\x01",  # r = s = 1
        (P256_ORDER // 2 + 1).to_bytes(32, "big") * 2,  # just high-S
        b"\xff" * 64,
        bytes(63),  # one byte short
        bytes(65),  # one byte long
    ],
    ids=["r=s=0", "r=s=n", "r=s=1", "high-S", "all-ones", "63 bytes", "65 bytes"],
)
def test_es256_degenerate_signatures_are_refused(es_ctx: Ctx, signature: bytes) -> None:
    signing_input = es_ctx.sign().rsplit(".", 1)[0]
    assert es_ctx.reason(f"{signing_input}.{b64(signature)}") == "signature"


def test_es256_der_signature_is_refused(es_ctx: Ctx) -> None:
    # JWS wants raw r || s (RFC 7518 §3.4); the DER form cryptography produces is refused.
    signing_input = es_ctx.sign().rsplit(".", 1)[0]
    der = es_ctx.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
    assert es_ctx.reason(f"{signing_input}.{b64(der)}") == "signature"


# --- clock and leeway --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "reason"),
    [
        (0, None),
        (899, None),
        (900 + 29, None),  # within leeway after exp
        (900 + 30, "expired"),
        (10_000, "expired"),
        (-29, None),  # our clock 29 s behind the issuer's: iat/nbf within leeway
        (-31, "iat"),
    ],
)
def test_leeway_with_injected_clock(ctx: Ctx, offset: int, reason: str | None) -> None:
    token, _ = ctx.service.issue_access_token(
        user_id="u", email="a@example.com", name=None, roles=()
    )
    ctx.clock.now += offset
    if reason is None:
        ctx.service.verify(token)
    else:
        assert ctx.reason(token) == reason


def test_nbf_leeway(ctx: Ctx) -> None:
    now = int(ctx.clock.now)
    ctx.service.verify(ctx.sign(ctx.claims(nbf=now + 30)))
    assert ctx.reason(ctx.sign(ctx.claims(nbf=now + 31))) == "not_yet_valid"


def test_zero_leeway(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, leeway=0.0)
    ring = KeyRing.load(settings)
    clock = Clock()
    service = TokenService(settings, ring, clock=clock)
    token, _ = service.issue_access_token(user_id="u", email="a@example.com", name=None, roles=())
    clock.now += 899.5
    service.verify(token)
    clock.now += 0.5
    with pytest.raises(InvalidToken) as caught:
        service.verify(token)
    assert caught.value.reason == "expired"


# --- key files ---------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ASYMMETRIC)
def test_first_load_generates_a_private_key_file(tmp_path: Path, algorithm: str) -> None:
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir(mode=0o750)
    os.chmod(keys_dir, 0o750)
    ring = KeyRing.load(settings_for(tmp_path, algorithm))
    [info] = ring.keys()
    assert info.signing and info.algorithm == algorithm
    path = keys_dir / f"{info.kid}.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(keys_dir.stat().st_mode) == 0o750  # the operator's dir is kept
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS8, unencrypted
    assert sorted(p.name for p in keys_dir.iterdir() if not p.name.startswith(".lock")) == [
        path.name
    ]


def test_concurrent_first_loads_agree_on_one_key(tmp_path: Path) -> None:
    # Workers starting together on an empty dir must not each make (and sign with) a key.
    settings = settings_for(tmp_path, "EdDSA")
    barrier = threading.Barrier(6)

    def load() -> list[str]:
        barrier.wait()
        return [k.kid for k in KeyRing.load(settings).keys()]

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: load(), range(6)))
    assert len(results[0]) == 1
    assert all(r == results[0] for r in results)
    assert len(list((tmp_path / "keys").glob("*.pem"))) == 1


def test_missing_keys_dir_is_created_private(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, keys_dir=tmp_path / "a" / "b")
    KeyRing.load(settings)
    assert stat.S_IMODE((tmp_path / "a" / "b").stat().st_mode) & 0o077 == 0


@pytest.mark.parametrize("algorithm", ASYMMETRIC)
def test_second_load_reuses_the_key(tmp_path: Path, algorithm: str) -> None:
    settings = settings_for(tmp_path, algorithm)
    first = KeyRing.load(settings)
    token, _ = TokenService(settings, first).issue_access_token(
        user_id="u", email="a@example.com", name=None, roles=()
    )
    second = KeyRing.load(settings)
    assert second.keys() == first.keys()
    assert second.jwks() == first.jwks()
    TokenService(settings, second).verify(token)


def test_keys_are_parsed_once(own_ctx: Ctx) -> None:
    ctx = own_ctx
    token = ctx.sign()
    for path in Path(ctx.settings.keys_dir).iterdir():
        path.unlink()
    ctx.service.verify(token)  # no file is read per call
    ctx.service.issue_access_token(user_id="u", email="a@example.com", name=None, roles=())


def test_create_false_on_empty_dir(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    ring = KeyRing.load(settings, create=False)
    assert ring.keys() == [] and ring.jwks() == {"keys": []}
    assert not (tmp_path / "keys").exists()
    with pytest.raises(KeyRingError):
        TokenService(settings, ring)


def test_rotate(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path)
    old_token, _ = ctx.service.issue_access_token(
        user_id="u", email="a@example.com", name=None, roles=()
    )
    new = ctx.ring.rotate()
    assert new.signing and new.kid != ctx.kid
    assert [k.kid for k in ctx.ring.keys()] == [ctx.kid, new.kid]
    assert [k.signing for k in ctx.ring.keys()] == [False, True]
    new_token, _ = ctx.service.issue_access_token(
        user_id="u", email="a@example.com", name=None, roles=()
    )
    assert jwt.get_unverified_header(new_token)["kid"] == new.kid
    ctx.service.verify(old_token)
    ctx.service.verify(new_token)
    assert {k["kid"] for k in ctx.ring.jwks()["keys"]} == {ctx.kid, new.kid}
    assert stat.S_IMODE((tmp_path / "keys" / f"{new.kid}.pem").stat().st_mode) == 0o600
    # Another process loading the dir agrees on which key signs.
    assert KeyRing.load(ctx.settings).keys() == ctx.ring.keys()


def test_quick_rotations_keep_their_order(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path, "EdDSA")
    kids = [ctx.kid] + [ctx.ring.rotate().kid for _ in range(6)]
    assert [k.kid for k in ctx.ring.keys()] == kids
    reloaded = KeyRing.load(ctx.settings)
    assert [k.kid for k in reloaded.keys()] == kids
    assert reloaded.keys()[-1].signing
    created = [k.created_at for k in reloaded.keys()]
    assert created == sorted(created) and len(set(created)) == len(created)


def test_remove(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path)
    old_token = ctx.sign()
    new = ctx.ring.rotate()
    ctx.ring.remove(ctx.kid)
    assert not (tmp_path / "keys" / f"{ctx.kid}.pem").exists()
    assert [k.kid for k in ctx.ring.keys()] == [new.kid]
    assert [k["kid"] for k in ctx.ring.jwks()["keys"]] == [new.kid]
    assert ctx.reason(old_token) == "unknown_kid"
    assert [k.kid for k in KeyRing.load(ctx.settings).keys()] == [new.kid]


def test_removing_the_signing_key_hands_over_to_the_next_newest(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path)
    middle = ctx.ring.rotate()
    newest = ctx.ring.rotate()
    ctx.ring.remove(newest.kid)
    assert [(k.kid, k.signing) for k in ctx.ring.keys()] == [
        (ctx.kid, False),
        (middle.kid, True),
    ]
    token, _ = ctx.service.issue_access_token(
        user_id="u", email="a@example.com", name=None, roles=()
    )
    assert jwt.get_unverified_header(token)["kid"] == middle.kid


@pytest.mark.parametrize("kid", ["nope", "../keys/x", "", None])
def test_remove_unknown_kid(own_ctx: Ctx, kid: Any) -> None:
    ctx = own_ctx
    ctx.ring.rotate()
    with pytest.raises(KeyRingError):
        ctx.ring.remove(kid)
    assert len(ctx.ring.keys()) == 2


def test_remove_the_last_key_is_refused(own_ctx: Ctx) -> None:
    ctx = own_ctx
    with pytest.raises(KeyRingError):
        ctx.ring.remove(ctx.kid)
    assert (Path(ctx.settings.keys_dir) / f"{ctx.kid}.pem").exists()


def _pem(key: Any) -> bytes:
    pem: bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return pem


@pytest.mark.parametrize(
    ("algorithm", "foreign"),
    [
        ("RS256", lambda: ec.generate_private_key(ec.SECP256R1())),
        ("RS256", ed25519.Ed25519PrivateKey.generate),
        ("ES256", attacker_rsa),
        ("ES256", lambda: ec.generate_private_key(ec.SECP384R1())),  # not P-256
        ("EdDSA", lambda: ec.generate_private_key(ec.SECP256R1())),
    ],
)
def test_other_key_types_are_skipped(
    tmp_path: Path, algorithm: str, foreign: Callable[[], Any]
) -> None:
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    (keys_dir / "foreign.pem").write_bytes(_pem(foreign()))
    ring = KeyRing.load(settings_for(tmp_path, algorithm))
    assert [k.kid for k in ring.keys()] != ["foreign"]
    assert "foreign" not in {k.kid for k in ring.keys()}
    assert len(ring.keys()) == 1  # a key of the right type was generated beside it
    assert (keys_dir / "foreign.pem").exists()


def test_operator_provided_key_is_used(tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    key = ec.generate_private_key(ec.SECP256R1())
    (keys_dir / "prod-2026.pem").write_bytes(_pem(key))
    settings = settings_for(tmp_path, "ES256")
    ring = KeyRing.load(settings)
    assert [k.kid for k in ring.keys()] == ["prod-2026"]
    token, _ = TokenService(settings, ring).issue_access_token(
        user_id="u", email="a@example.com", name=None, roles=()
    )
    jwt.decode(token, key.public_key(), algorithms=["ES256"], audience=AUDIENCE)


def test_non_key_files_are_ignored(tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    (keys_dir / "README.txt").write_text("not a key")
    (keys_dir / ".hidden.pem").write_text("half-written")
    (keys_dir / ".20260101T000000000-abcdef.pem.1234.tmp").write_text("left over")
    (keys_dir / "sub.pem").mkdir()
    ring = KeyRing.load(settings_for(tmp_path))
    assert len(ring.keys()) == 1


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not a pem at all",
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        b"-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n"
        b"-----END PUBLIC KEY-----\n",
    ],
)
def test_corrupt_key_file_is_a_clear_error(tmp_path: Path, content: bytes) -> None:
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    (keys_dir / "broken.pem").write_bytes(content)
    with pytest.raises(KeyRingError) as caught:
        KeyRing.load(settings_for(tmp_path))
    message = str(caught.value)
    assert "broken.pem" in message
    assert "AAAA" not in message and "MCow" not in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_encrypted_key_is_a_clear_error(tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    pem = attacker_rsa().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    )
    (keys_dir / "locked.pem").write_bytes(pem)
    with pytest.raises(KeyRingError, match="locked.pem"):
        KeyRing.load(settings_for(tmp_path))


def test_weak_rsa_key_is_refused(tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    (keys_dir / "weak.pem").write_bytes(_pem(weak))
    with pytest.raises(KeyRingError, match="weak.pem.*1024"):
        KeyRing.load(settings_for(tmp_path))


def test_ring_must_match_the_configured_algorithm(tmp_path: Path) -> None:
    ring = KeyRing.load(settings_for(tmp_path, "ES256"))
    with pytest.raises(KeyRingError):
        TokenService(settings_for(tmp_path, "RS256"), ring)


# --- JWKS --------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ASYMMETRIC)
def test_jwks_shape(tmp_path: Path, algorithm: str) -> None:
    ctx = make_ctx(tmp_path, algorithm)
    ctx.ring.rotate()
    jwks = ctx.ring.jwks()
    assert set(jwks) == {"keys"}
    assert [k["kid"] for k in jwks["keys"]] == [k.kid for k in ctx.ring.keys()]
    for jwk in jwks["keys"]:
        assert jwk["alg"] == algorithm
        assert jwk["use"] == "sig"
        assert jwk["kty"] == KTY[algorithm]
        assert not PRIVATE_JWK_MEMBERS & set(jwk)
    json.dumps(jwks)  # serialisable as is


@pytest.mark.parametrize("algorithm", ASYMMETRIC)
def test_jwks_verifies_our_tokens(shared_rings: Rings, algorithm: str) -> None:
    # What a backend does with our JWKS: it must hold the public half of the signing key.
    ctx = ctx_for(*shared_rings[algorithm])
    token, _ = ctx.service.issue_access_token(
        user_id="u", email="a@example.com", name=None, roles=()
    )
    [jwk] = ctx.ring.jwks()["keys"]
    claims = jwt.decode(
        token,
        jwt.PyJWK(jwk),
        algorithms=[algorithm],
        audience=AUDIENCE,
        issuer=ISSUER,
        options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
    )
    assert claims["sub"] == "u"


def test_jwks_copies_cannot_change_the_ring(ctx: Ctx) -> None:
    ctx.ring.jwks()["keys"][0]["kid"] = "tampered"
    assert ctx.ring.jwks()["keys"][0]["kid"] == ctx.kid


# --- HS256 -------------------------------------------------------------------------------


def test_hs256_kid_is_stable_and_derived_from_the_secret(tmp_path: Path) -> None:
    a = KeyRing.load(settings_for(tmp_path / "a", "HS256"))
    b = KeyRing.load(settings_for(tmp_path / "b", "HS256"))
    expected = hashlib.sha256(HS_SECRET.encode()).hexdigest()[:16]
    assert [k.kid for k in a.keys()] == [k.kid for k in b.keys()] == [expected]
    assert not (tmp_path / "a" / "keys").exists()  # no files for a shared secret
    assert a.jwks() == {"keys": []}


def test_hs256_has_no_rotate_or_remove(tmp_path: Path) -> None:
    ring = KeyRing.load(settings_for(tmp_path, "HS256"))
    with pytest.raises(KeyRingError, match="asymmetric"):
        ring.rotate()
    with pytest.raises(KeyRingError, match="asymmetric"):
        ring.remove(ring.keys()[0].kid)


_PUBLIC_PEM = (
    ec.generate_private_key(ec.SECP256R1())
    .public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    .decode()
)


@pytest.mark.parametrize(
    "secret",
    [None, Secret(""), Secret("short"), Secret("y" * 31), Secret(_PUBLIC_PEM)],
    ids=["none", "empty", "short", "31-bytes", "a-public-key"],
)
def test_hs256_unusable_secret(tmp_path: Path, secret: Secret | None) -> None:
    with pytest.raises(KeyRingError) as caught:
        KeyRing.load(settings_for(tmp_path, "HS256", secret=secret))
    if secret is not None and secret.reveal():
        assert secret.reveal() not in str(caught.value)


def test_reprs_hold_no_key_material(shared_rings: Rings) -> None:
    hs = shared_rings["HS256"][1]
    assert HS_SECRET not in repr(hs) and "x" * 10 not in repr(hs)
    for _, ring in shared_rings.values():
        assert "PRIVATE" not in repr(ring) and "KeyRing(" in repr(ring)
        assert "object at" not in repr(ring)


# --- identity assertions for upstreams ---------------------------------------------------


def test_assertion_states_the_identity_for_the_upstreams_only(any_ctx: Ctx) -> None:
    identity = Identity(
        id="00u1|okta", issuer="https://idp.example", email="g@example.com", roles=("a", "b")
    )
    token = any_ctx.service.issue_assertion(identity, ["http://127.0.0.1:9000"])
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert header["typ"] == ASSERTION_TYP and header["kid"]
    assert claims["sub"] == "00u1|okta" and claims["orig_iss"] == "https://idp.example"
    assert claims["iss"] == any_ctx.settings.issuer
    assert claims["aud"] == ["http://127.0.0.1:9000"]
    assert claims["roles"] == ["a", "b"] and claims["email"] == "g@example.com"
    assert claims["exp"] - claims["iat"] == ASSERTION_TTL
    # Signed with our key, yet never a credential: wrong typ and wrong audience.
    with pytest.raises(InvalidToken):
        any_ctx.service.verify(token)
