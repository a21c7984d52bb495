"""JWT attacks, black-box: forged, confused, malleated and malformed tokens against running
gateways of each algorithm (RS256, ES256, EdDSA, HS256), over raw sockets.

Every refused token is sent to a required route, the profile endpoint, forward-auth and an
optional route, and must get the same answer from each: 401, ``WWW-Authenticate`` with
``error="invalid_token"``, problem+json, nothing forwarded, and the token nowhere in the
response. Tokens refused for a claim or a header are signed with the gateway's own private
key (read from its ``keys_dir``; HS256: the configured secret), so each differs from an
accepted token in exactly one way; the positive controls prove that this forger makes tokens
the gateway accepts, so every refusal below can fail.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import functools
import hashlib
import hmac
import json
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.x509.oid import NameOID
from jwt.algorithms import get_default_algorithms

from tests import threaded_http
from tests.blackbox.client import PASSWORD, RawResponse, raw_request, unique_email
from tests.blackbox.conftest import Echo, Gateway, launch_gateway, stop_process

HS_SECRET = "jwt-attacks-" + "k" * 40
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
ED25519_ORDER = 2**252 + 27742317777372353535851937790883648493
B64_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
# Each refused token goes to all of these: a required route, the gateway's own bearer
# endpoint, forward-auth without a target ("a valid token is required") and an optional route.
TARGET_PATHS = ("/api/x", "/auth/profile", "/auth/verify", "/maybe/x")


# --- encoding and signing ----------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def segment(value: Any) -> str:
    return b64(value if isinstance(value, bytes) else json.dumps(value).encode())


_HMAC = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}
_ECDSA: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "ES256": hashes.SHA256,
    "ES384": hashes.SHA384,
    "ES512": hashes.SHA512,
}


def sign_bytes(alg: str, key: Any, data: bytes) -> bytes:
    """A JWS signature by hand: HMAC takes any bytes (PyJWT refuses PEM-looking secrets,
    which is exactly the algorithm-confusion key), the rest goes through PyJWT."""
    if alg in _HMAC:
        return hmac.new(key, data, _HMAC[alg]).digest()
    if alg in _ECDSA:  # by hand: PyJWT refuses a P-256 key for ES384, the confusion tested
        r, s = decode_dss_signature(key.sign(data, ec.ECDSA(_ECDSA[alg]())))
        size = (key.curve.key_size + 7) // 8
        raw = r.to_bytes(size, "big") + s.to_bytes(size, "big")
        return low_s(raw) if alg == "ES256" else raw
    algorithm = get_default_algorithms()[alg]
    signature: bytes = algorithm.sign(data, algorithm.prepare_key(key))
    return signature


def low_s(signature: bytes) -> bytes:
    """The canonical ES256 signature: the gateway issues and accepts only low S."""
    s = int.from_bytes(signature[32:], "big")
    return signature if s <= P256_ORDER // 2 else twin(signature)


def twin(signature: bytes) -> bytes:
    """``(r, n - s)``: ECDSA's malleable twin, valid wherever ``(r, s)`` is."""
    s = int.from_bytes(signature[32:], "big")
    return signature[:32] + (P256_ORDER - s).to_bytes(32, "big")


def forge(header: Any, claims: Any, key: Any, alg: str) -> str:
    signing_input = f"{segment(header)}.{segment(claims)}"
    return f"{signing_input}.{b64(sign_bytes(alg, key, signing_input.encode()))}"


def with_signature(token: str, signature: bytes | str) -> str:
    encoded = signature if isinstance(signature, str) else b64(signature)
    return f"{token.rsplit('.', 1)[0]}.{encoded}"


def flip_bit(token: str, index: int, bit: int = 1) -> str:
    """Flip one bit of the base64 character at ``index`` (negative: from the end)."""
    chars = list(token)
    chars[index] = B64_ALPHABET[B64_ALPHABET.index(chars[index]) ^ bit]
    return "".join(chars)


# --- attackers' keys and a server for jku / x5u -------------------------------------------

ATTACKER_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ATTACKER_EC = ec.generate_private_key(ec.SECP256R1())
ATTACKER_ED = ed25519.Ed25519PrivateKey.generate()
ATTACKER_KID = "attacker-key"


def attacker_jwk(kid: str) -> dict[str, Any]:
    jwk = json.loads(get_default_algorithms()["RS256"].to_jwk(ATTACKER_RSA.public_key()))
    return {**jwk, "kid": kid, "alg": "RS256", "use": "sig"}


@functools.cache
def attacker_cert() -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ATTACKER_RSA.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(ATTACKER_RSA, hashes.SHA256())
    )


@dataclass
class KeyServer:
    """Serves the attacker's JWKS and certificate; counts requests (the gateway makes none)."""

    url: str
    hits: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def key_server() -> Iterator[KeyServer]:
    cert_der = attacker_cert().public_bytes(serialization.Encoding.DER)
    cert_pem = attacker_cert().public_bytes(serialization.Encoding.PEM)
    bodies = {
        "/jwks.json": json.dumps(
            {"keys": [attacker_jwk(ATTACKER_KID)]}, separators=(",", ":")
        ).encode(),
        "/cert.pem": cert_pem,
        "/cert.der": cert_der,
    }
    hits: list[str] = []

    class KeysHandler(threaded_http.Handler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            hits.append(self.path)
            self.answer(200, bodies.get(self.path.partition("?")[0], b"{}"))

    with threaded_http.serving(KeysHandler) as url:
        yield KeyServer(url, hits)


# --- the gateways under attack -------------------------------------------------------------


def _post_json(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        result: dict[str, Any] = json.loads(resp.read())
        return result


def _fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as resp:
        body: bytes = resp.read()
        return body


_DROP = object()


@dataclass
class Target:
    """One running gateway, its signing key, and a genuine signed-in account."""

    gw: Gateway
    algorithm: str
    kid: str
    key: Any = field(repr=False)  # private key object, or the HS256 secret's bytes
    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    user_id: str
    genuine_claims: dict[str, Any]
    jwks_body: bytes

    @property
    def public(self) -> Any:
        return self.key.public_key()

    def claims(self, **overrides: Any) -> dict[str, Any]:
        """Valid claims (the genuine token's identity, fresh times), then ``overrides``."""
        now = int(time.time())
        claims = {
            **self.genuine_claims,
            "iat": now,
            "nbf": now,
            "exp": now + 600,
            "jti": uuid.uuid4().hex,
        }
        for name, value in overrides.items():
            if value is _DROP:
                claims.pop(name, None)
            else:
                claims[name] = value
        return claims

    def header(self, **overrides: Any) -> dict[str, Any]:
        header: dict[str, Any] = {"alg": self.algorithm, "kid": self.kid, "typ": "JWT"}
        for name, value in overrides.items():
            if value is _DROP:
                header.pop(name, None)
            else:
                header[name] = value
        return header

    def sign(
        self, claims: Any = None, *, key: Any = None, sign_as: str | None = None, **header: Any
    ) -> str:
        """Signed with our key under our algorithm, whatever the header says (the header is
        the attack); ``key`` / ``sign_as`` change the actual signing."""
        return forge(
            self.header(**header),
            self.claims() if claims is None else claims,
            self.key if key is None else key,
            sign_as or self.algorithm,
        )

    def unsigned(self, alg: Any, signature: str = "") -> str:
        return f"{segment(self.header(alg=alg))}.{segment(self.claims())}.{signature}"


def _sign_in(base: str) -> tuple[dict[str, Any], dict[str, Any]]:
    email = unique_email("jwt")
    user = _post_json(f"{base}/auth/register", {"email": email, "password": PASSWORD})
    tokens = _post_json(f"{base}/auth/login", {"email": email, "password": PASSWORD})
    return user, tokens


def make_target(gw: Gateway, algorithm: str) -> Target:
    user, tokens = _sign_in(gw.url)
    access = tokens["access_token"]
    header_segment, payload_segment, _ = access.split(".")
    kid = json.loads(unb64(header_segment))["kid"]
    if algorithm == "HS256":
        key: Any = HS_SECRET.encode()
    else:
        pem = (gw.workdir / "data" / "keys" / f"{kid}.pem").read_bytes()
        key = serialization.load_pem_private_key(pem, password=None)
    claims = json.loads(unb64(payload_segment))
    genuine = {name: claims[name] for name in ("iss", "sub", "aud", "email", "roles")}
    return Target(
        gw,
        algorithm,
        kid,
        key,
        access,
        tokens["refresh_token"],
        user["id"],
        genuine,
        _fetch(f"{gw.url}/.well-known/jwks.json"),
    )


@pytest.fixture(scope="module")
def rs256(gateway: Gateway) -> Target:
    return make_target(gateway, "RS256")


@contextlib.contextmanager
def _own_gateway(factory: pytest.TempPathFactory, echo: Echo, algorithm: str) -> Iterator[Target]:
    secret = f"\n  secret: {HS_SECRET}" if algorithm == "HS256" else ""
    gw = launch_gateway(
        factory.mktemp(f"gw-{algorithm}"),
        echo,
        extra=f"tokens:\n  algorithm: {algorithm}{secret}\n"
        "accounts:\n  login_rate_limit: 1000/min\n  register_rate_limit: 1000/min\n",
    )
    try:
        yield make_target(gw, algorithm)
    finally:
        stop_process(gw.proc)


@pytest.fixture(scope="module")
def es256(tmp_path_factory: pytest.TempPathFactory, echo_upstream: Echo) -> Iterator[Target]:
    with _own_gateway(tmp_path_factory, echo_upstream, "ES256") as target:
        yield target


@pytest.fixture(scope="module")
def eddsa(tmp_path_factory: pytest.TempPathFactory, echo_upstream: Echo) -> Iterator[Target]:
    with _own_gateway(tmp_path_factory, echo_upstream, "EdDSA") as target:
        yield target


@pytest.fixture(scope="module")
def hs256(tmp_path_factory: pytest.TempPathFactory, echo_upstream: Echo) -> Iterator[Target]:
    with _own_gateway(tmp_path_factory, echo_upstream, "HS256") as target:
        yield target


ALGORITHMS = {"RS256": "rs256", "ES256": "es256", "EdDSA": "eddsa", "HS256": "hs256"}


@pytest.fixture(params=list(ALGORITHMS))
def any_target(request: pytest.FixtureRequest) -> Target:
    target: Target = request.getfixturevalue(ALGORITHMS[request.param])
    return target


# --- sending and judging --------------------------------------------------------------------


def request_bytes(path: str, header_lines: list[bytes]) -> bytes:
    head = [f"GET {path} HTTP/1.1".encode(), b"Host: 127.0.0.1", *header_lines]
    return b"\r\n".join([*head, b"Connection: close", b"", b""])


def bearer(token: str) -> list[bytes]:
    return [b"Authorization: Bearer " + token.encode("utf-8")]


async def send_everywhere(base: str, header_lines: list[bytes]) -> dict[str, RawResponse]:
    responses = await asyncio.gather(
        *(raw_request(base, request_bytes(path, header_lines)) for path in TARGET_PATHS)
    )
    return dict(zip(TARGET_PATHS, responses, strict=True))


def secret_parts(token: str) -> list[str]:
    """The token and each of its long segments: none may be echoed back (CONTRACT §5)."""
    core = token.strip(" \t.")
    parts = [core] + [part for part in core.split(".") if len(part) >= 16]
    return [part for part in parts if len(part) >= 16]


def assert_not_echoed(resp: RawResponse, token: str, where: str) -> None:
    text = resp.body.decode("utf-8", errors="replace")
    for part in secret_parts(token):
        assert part not in text, f"{where}: the refused token is echoed in the body"
        for name, value in resp.headers:
            assert part not in value, f"{where}: the refused token is echoed in {name}"


def assert_refused_as_invalid_token(resp: RawResponse, token: str, where: str) -> None:
    assert resp.status == 401, f"{where}: {resp.status} {resp.body[:300]!r}"
    assert resp.header("X-Upstream") is None, f"{where}: forwarded upstream"
    assert resp.header("X-User-Id") is None, f"{where}: an identity was asserted"
    challenge = resp.header("WWW-Authenticate") or ""
    assert challenge.startswith("Bearer") and 'error="invalid_token"' in challenge, (
        f"{where}: WWW-Authenticate {challenge!r}"
    )
    assert (resp.header("Content-Type") or "").startswith("application/problem+json"), where
    assert resp.json()["status"] == 401, where
    assert_not_echoed(resp, token, where)


async def assert_refused_everywhere(target: Target, token: str) -> None:
    responses = await send_everywhere(target.gw.url, bearer(token))
    for path, resp in responses.items():
        assert_refused_as_invalid_token(resp, token, f"{target.algorithm} {path}")


async def assert_accepted_everywhere(target: Target, header_lines: list[bytes]) -> None:
    responses = await send_everywhere(target.gw.url, header_lines)
    for path, resp in responses.items():
        where = f"{target.algorithm} {path}"
        assert resp.status == 200, f"{where}: {resp.status} {resp.body[:300]!r}"
    for path in ("/api/x", "/maybe/x"):  # the upstream got the verified identity
        echoed = responses[path].json()
        ids = [v for k, v in echoed["headers"] if k.lower() == "x-user-id"]
        assert ids == [target.user_id], f"{target.algorithm} {path}: {ids}"
    profile = responses["/auth/profile"].json()
    assert profile["id"] == target.user_id
    assert responses["/auth/verify"].header("X-User-Id") == target.user_id


# --- positive controls: without these, every refusal below could be a broken forger -------


async def test_genuine_token_is_accepted(any_target: Target) -> None:
    await assert_accepted_everywhere(any_target, bearer(any_target.access_token))


async def test_forged_token_with_the_gateways_own_key_is_accepted(any_target: Target) -> None:
    await assert_accepted_everywhere(any_target, bearer(any_target.sign()))


async def test_forged_token_with_every_optional_header_is_accepted(any_target: Target) -> None:
    # typ variants of RFC 9068 are accepted: so the typ refusals below are about the value.
    token = any_target.sign(any_target.claims(nbf=_DROP, jti=_DROP), typ="at+jwt")
    await assert_accepted_everywhere(any_target, bearer(token))


# --- attacks that apply to every algorithm ---------------------------------------------------

Attack = Callable[[Target], str]


def _swap_payload(t: Target) -> str:
    genuine = t.access_token.split(".")
    other = segment(t.claims(roles=["admin"]))
    return f"{genuine[0]}.{other}.{genuine[2]}"


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth  # built as text: json.dumps itself would recurse


_UNKNOWN_EXTENSION: dict[str, Any] = {"urn:example:ext": True}

GENERIC: list[tuple[str, Attack]] = [
    # alg none, in every spelling, with an empty signature and with the genuine one
    *[
        (f"alg {alg!r} unsigned", lambda t, alg=alg: t.unsigned(alg))
        for alg in ["none", "None", "NONE", "nOnE", "none ", " none", "none\u0000"]
    ],
    *[
        (
            f"alg {alg!r} genuine signature",
            lambda t, alg=alg: t.unsigned(alg, t.access_token.rsplit(".", 1)[1]),
        )
        for alg in ["none", "None", "NONE"]
    ],
    ("alg none, signature 'null'", lambda t: t.unsigned("none", "null")),
    ("alg empty string", lambda t: t.sign(alg="")),
    ("alg null", lambda t: t.sign(alg=None)),
    ("alg missing", lambda t: t.sign(alg=_DROP)),
    ("alg a list", lambda t: t.sign(alg=[t.algorithm])),
    ("alg lowercase", lambda t: t.sign(alg=t.algorithm.lower())),
    ("alg with trailing space", lambda t: t.sign(alg=t.algorithm + " ")),
    ("duplicate alg, none last", lambda t: _duplicate_alg(t)),
    # signatures that are empty, null or not ours
    ("empty signature", lambda t: with_signature(t.access_token, "")),
    ("signature of one zero byte", lambda t: with_signature(t.access_token, bytes(1))),
    ("signature 'null'", lambda t: with_signature(t.access_token, b"null")),
    ("all-zero signature", lambda t: with_signature(t.access_token, bytes(64))),
    ("payload swapped, genuine signature", _swap_payload),
    ("bit flipped: first signature char", lambda t: flip_bit(t.access_token, -40, 32)),
    ("bit flipped: mid signature", lambda t: flip_bit(t.access_token, -20, 4)),
    ("bit flipped: payload", lambda t: flip_bit(t.access_token, t.access_token.index(".") + 5)),
    ("bit flipped: header", lambda t: flip_bit(t.access_token, 3, 2)),
    # malleable base64: trailing bits of the last character set (same bytes to a lax decoder)
    ("non-canonical last char", lambda t: flip_bit(t.access_token, -1, 1)),
    ("signature truncated by a char", lambda t: t.access_token[:-1]),
    ("signature one char longer", lambda t: t.access_token + "A"),
    # remote and embedded keys: never fetched, never trusted
    (
        "embedded jwk, attacker key",
        lambda t: t.sign(key=ATTACKER_RSA, sign_as="RS256", alg="RS256", jwk=attacker_jwk(t.kid)),
    ),
    ("embedded jwk, our kid, our alg", lambda t: _attacker_signed(t, jwk=attacker_jwk(t.kid))),
    ("embedded jwk, no kid", lambda t: _attacker_signed(t, kid=_DROP, jwk=attacker_jwk("x"))),
    # crit: we implement no extension
    ("crit unknown", lambda t: t.sign(crit=["urn:example:ext"], **_UNKNOWN_EXTENSION)),
    ("crit exp", lambda t: t.sign(crit=["exp"], exp=1)),
    ("crit b64", lambda t: t.sign(crit=["b64"], b64=True)),
    ("crit empty list", lambda t: t.sign(crit=[])),
    ("crit a string", lambda t: t.sign(crit="exp")),
    ("b64 false without crit", lambda t: t.sign(b64=False)),
    # typ of another kind of token
    ("typ refresh+jwt", lambda t: t.sign(typ="refresh+jwt")),
    ("typ secevent+jwt", lambda t: t.sign(typ="secevent+jwt")),
    ("typ JWE", lambda t: t.sign(typ="JWE")),
    ("typ a number", lambda t: t.sign(typ=1)),
    # kid: an exact match in our ring, never a path, a query or a URL
    ("kid traversal /etc/passwd", lambda t: t.sign(kid="../../../../../../etc/passwd")),
    ("kid /dev/null", lambda t: t.sign(kid="/dev/null")),
    ("kid traversal to our own key file", lambda t: t.sign(kid=f"../keys/{t.kid}")),
    ("kid ./ prefix", lambda t: t.sign(kid=f"./{t.kid}")),
    ("kid with .pem", lambda t: t.sign(kid=f"{t.kid}.pem")),
    ("kid with NUL", lambda t: t.sign(kid=f"{t.kid}\u0000")),
    ("kid with trailing space", lambda t: t.sign(kid=f"{t.kid} ")),
    ("kid uppercased", lambda t: t.sign(kid=t.kid.upper())),
    ("kid SQL or-true", lambda t: t.sign(kid="' OR '1'='1")),
    ("kid SQL union", lambda t: t.sign(kid="x' UNION SELECT 'secret' -- ")),
    ("kid URL", lambda t: t.sign(kid="http://127.0.0.1:1/key.pem")),
    ("kid file URL", lambda t: t.sign(kid="file:///dev/null")),
    ("kid command", lambda t: t.sign(kid="$(id)|id;`id`")),
    ("kid a number", lambda t: t.sign(kid=1)),
    ("kid a list", lambda t: t.sign(kid=[t.kid])),
    ("kid an object", lambda t: t.sign(kid={"kid": t.kid})),
    ("kid missing", lambda t: t.sign(kid=_DROP)),
    (
        "kid /dev/null, HS256 with an empty key",
        lambda t: t.sign(kid="/dev/null", alg="HS256", sign_as="HS256", key=b""),
    ),
    (
        "kid SQL, HS256 keyed with the injected value",
        lambda t: t.sign(kid="' UNION SELECT 'k", alg="HS256", sign_as="HS256", key=b"k"),
    ),
    # claims: each token valid but for one claim
    ("expired an hour ago", lambda t: t.sign(t.claims(exp=int(time.time()) - 3600))),
    ("expired beyond the leeway", lambda t: t.sign(t.claims(exp=int(time.time()) - 31))),
    ("expired long ago", lambda t: t.sign(t.claims(iat=1, nbf=1, exp=2))),
    ("not yet valid", lambda t: t.sign(t.claims(nbf=int(time.time()) + 3600))),
    ("not yet valid beyond the leeway", lambda t: t.sign(t.claims(nbf=int(time.time()) + 90))),
    (
        "issued in the future",
        lambda t: t.sign(t.claims(iat=int(time.time()) + 3600, exp=int(time.time()) + 7200)),
    ),
    ("wrong iss", lambda t: t.sign(t.claims(iss="https://evil.example"))),
    ("iss with a trailing slash", lambda t: t.sign(t.claims(iss=t.genuine_claims["iss"] + "/"))),
    ("iss extended", lambda t: t.sign(t.claims(iss=t.genuine_claims["iss"] + ".evil.example"))),
    ("iss a prefix", lambda t: t.sign(t.claims(iss=t.genuine_claims["iss"][:-1]))),
    ("iss in a list", lambda t: t.sign(t.claims(iss=[t.genuine_claims["iss"]]))),
    ("iss empty", lambda t: t.sign(t.claims(iss=""))),
    ("wrong aud", lambda t: t.sign(t.claims(aud="another-service"))),
    ("aud a substring", lambda t: t.sign(t.claims(aud=t.genuine_claims["aud"][:-1]))),
    ("aud uppercased", lambda t: t.sign(t.claims(aud=t.genuine_claims["aud"].upper()))),
    ("aud list without ours", lambda t: t.sign(t.claims(aud=["a", "b"]))),
    ("aud empty list", lambda t: t.sign(t.claims(aud=[]))),
    ("aud an object", lambda t: t.sign(t.claims(aud={"aud": t.genuine_claims["aud"]}))),
    ("missing exp", lambda t: t.sign(t.claims(exp=_DROP))),
    ("exp null", lambda t: t.sign(t.claims(exp=None))),
    ("exp a string", lambda t: t.sign(t.claims(exp=str(int(time.time()) + 600)))),
    ("exp a boolean", lambda t: t.sign(t.claims(exp=True))),
    ("exp NaN", lambda t: t.sign(t.claims(exp=float("nan")))),
    ("exp Infinity", lambda t: t.sign(t.claims(exp=float("inf")))),
    ("exp 10**400", lambda t: t.sign(t.claims(exp=10**400))),
    ("missing sub", lambda t: t.sign(t.claims(sub=_DROP))),
    ("sub null", lambda t: t.sign(t.claims(sub=None))),
    ("sub empty", lambda t: t.sign(t.claims(sub=""))),
    ("sub a number", lambda t: t.sign(t.claims(sub=7))),
    ("sub with CRLF", lambda t: t.sign(t.claims(sub="u\r\nX-User-Roles: admin"))),
    ("missing iat", lambda t: t.sign(t.claims(iat=_DROP))),
    ("missing iss", lambda t: t.sign(t.claims(iss=_DROP))),
    ("missing aud", lambda t: t.sign(t.claims(aud=_DROP))),
    ("role with a comma", lambda t: t.sign(t.claims(roles=["user,admin"]))),
    ("role with CRLF", lambda t: t.sign(t.claims(roles=["user\r\nX-User-Id: x"]))),
    ("email with CRLF", lambda t: t.sign(t.claims(email="a@example.com\r\nX-User-Id: x"))),
    ("jti a number", lambda t: t.sign(t.claims(jti=7))),
    ("payload an array, signed", lambda t: t.sign(["sub", "admin"])),
    ("payload null, signed", lambda t: forge(t.header(), b"null", t.key, t.algorithm)),
    ("payload not JSON, signed", lambda t: forge(t.header(), b"{'sub': 1", t.key, t.algorithm)),
    (
        "payload nested 5000 deep, signed",
        lambda t: forge(t.header(), _nested(5000), t.key, t.algorithm),
    ),
    # malformed shapes
    ("trailing dot", lambda t: t.access_token + "."),
    ("leading dot", lambda t: "." + t.access_token),
    ("dots around", lambda t: "..." + t.access_token + "..."),
    ("padding on the signature", lambda t: t.access_token + "="),
    ("padding on the signature ==", lambda t: t.access_token + "=="),
    ("padding on the header", lambda t: t.access_token.replace(".", "=.", 1)),
    ("padding on the payload", lambda t: _pad_payload(t.access_token)),
    ("standard base64 alphabet", lambda t: _standard_alphabet(t)),
    ("JWE-like five parts", lambda t: _jwe_like(t)),
    ("four parts", lambda t: t.access_token + ".AAAA"),
    ("two parts", lambda t: t.access_token.rsplit(".", 1)[0]),
    ("one part", lambda t: t.access_token.replace(".", "")),
    ("only dots", lambda t: ".."),
    ("é in the signature", lambda t: t.access_token[:-3] + "é" + t.access_token[-2:]),
    (
        "fullwidth letter in the payload",
        lambda t: _replace_char(t.access_token, t.access_token.index(".") + 3, "\uff21"),
    ),
    (
        "zero-width space in the token",
        lambda t: _replace_char(t.access_token, 10, t.access_token[10] + "\u200b"),
    ),
    ("percent-encoded dot", lambda t: t.access_token.replace(".", "%2E")),
    ("header not JSON", lambda t: "bm90IGpzb24." + t.access_token.split(".", 1)[1]),
    ("header an array", lambda t: segment([1, 2]) + "." + t.access_token.split(".", 1)[1]),
    ("header null", lambda t: segment(None) + "." + t.access_token.split(".", 1)[1]),
    (
        "header nested 3000 deep",
        lambda t: (
            b64(b'{"alg":"%s","x":' % t.algorithm.encode() + _nested(3000) + b"}")
            + "."
            + t.access_token.split(".", 1)[1]
        ),
    ),
    ("header length 1 mod 4", lambda t: "a." + t.access_token.split(".", 1)[1]),
    (
        "header huge number",
        lambda t: b64(b'{"alg":1' + b"0" * 5000 + b"}") + "." + t.access_token.split(".", 1)[1],
    ),
    ("signed but over 8 KiB", lambda t: t.sign(t.claims(pad="x" * 9000))),
    ("12 KiB of garbage", lambda t: "A" * 12 * 1024),
    ("a word", lambda t: "garbage"),
    ("a JSON object", lambda t: '{"sub":"admin"}'),
    ("the JWKS", lambda t: t.jwks_body.decode()),
]


def _duplicate_alg(t: Target) -> str:
    # Python keeps the last duplicate (RFC 7515 §4 allows that): "none", unsigned.
    raw_header = f'{{"alg":"{t.algorithm}","kid":"{t.kid}","alg":"none"}}'.encode()
    return f"{b64(raw_header)}.{segment(t.claims())}."


def _attacker_signed(t: Target, **header: Any) -> str:
    """Signed with an attacker's key of our algorithm (HS256: an attacker's secret)."""
    key = {
        "RS256": ATTACKER_RSA,
        "ES256": ATTACKER_EC,
        "EdDSA": ATTACKER_ED,
        "HS256": b"attacker-" + b"s" * 40,
    }[t.algorithm]
    return t.sign(key=key, **header)


def _pad_payload(token: str) -> str:
    header, payload, signature = token.split(".")
    return f"{header}.{payload}==.{signature}"


def _standard_alphabet(t: Target) -> str:
    """A valid token holding ``-`` or ``_``, spelled with ``+`` and ``/`` instead."""
    for _ in range(200):  # a fresh jti each time; all but certain within a few tries
        token = t.sign()
        if "-" in token or "_" in token:
            return token.replace("-", "+").replace("_", "/")
    raise AssertionError("no token with '-' or '_' in 200 tries")


def _jwe_like(t: Target) -> str:
    header = segment({"alg": "dir", "enc": "A256GCM", "kid": t.kid})
    return f"{header}..{b64(bytes(12))}.{t.access_token.split('.')[1]}.{b64(bytes(16))}"


def _replace_char(token: str, index: int, replacement: str) -> str:
    return token[:index] + replacement + token[index + 1 :]


@pytest.mark.parametrize("build", [a[1] for a in GENERIC], ids=[a[0] for a in GENERIC])
async def test_generic_attack_refused(any_target: Target, build: Attack) -> None:
    await assert_refused_everywhere(any_target, build(any_target))


# --- algorithm confusion ---------------------------------------------------------------------


def _public_forms(t: Target) -> dict[str, bytes]:
    """Every spelling of our public key a confused verifier might use as an HMAC secret."""
    public = t.public
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    forms = {
        "SPKI PEM": pem,
        "SPKI PEM without newline": pem.rstrip(b"\n"),
        "SPKI DER": public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        "OpenSSH": public.public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        ),
        "JWKS document": t.jwks_body,
        "JWK": json.dumps(json.loads(t.jwks_body)["keys"][0]).encode(),
    }
    if isinstance(public, rsa.RSAPublicKey):
        forms["PKCS1 PEM"] = public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.PKCS1
        )
        forms["modulus bytes"] = public.public_numbers().n.to_bytes(256, "big")
    elif isinstance(public, ec.EllipticCurvePublicKey):
        forms["uncompressed point"] = public.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
    else:
        forms["raw public key"] = public.public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
    return forms


_COMMON_FORMS = [
    "SPKI PEM",
    "SPKI PEM without newline",
    "SPKI DER",
    "OpenSSH",
    "JWKS document",
    "JWK",
]
CONFUSION_CASES = [
    (algorithm, form, hmac_alg)
    for algorithm, own_forms in [
        ("RS256", ["PKCS1 PEM", "modulus bytes"]),
        ("ES256", ["uncompressed point"]),
        ("EdDSA", ["raw public key"]),
    ]
    for form in [*_COMMON_FORMS, *own_forms]
    for hmac_alg in ["HS256", "HS384", "HS512"]
]


@pytest.mark.parametrize(("algorithm", "form", "hmac_alg"), CONFUSION_CASES)
async def test_hmac_keyed_with_our_public_key_is_refused(
    request: pytest.FixtureRequest, algorithm: str, form: str, hmac_alg: str
) -> None:
    target: Target = request.getfixturevalue(ALGORITHMS[algorithm])
    token = target.sign(alg=hmac_alg, sign_as=hmac_alg, key=_public_forms(target)[form])
    await assert_refused_everywhere(target, token)


OTHER_ALGORITHMS: list[tuple[str, Any]] = [
    ("RS256", ATTACKER_RSA),
    ("RS512", ATTACKER_RSA),
    ("PS256", ATTACKER_RSA),
    ("ES256", ATTACKER_EC),
    ("ES384", ATTACKER_EC),
    ("EdDSA", ATTACKER_ED),
    ("HS256", b"attacker-" + b"s" * 40),
]


@pytest.mark.parametrize(("alg", "key"), OTHER_ALGORITHMS, ids=[a for a, _ in OTHER_ALGORITHMS])
async def test_attacker_key_of_any_algorithm_is_refused(
    any_target: Target, alg: str, key: Any
) -> None:
    # Our kid, a well-formed signature by the attacker's key: only our key may verify.
    await assert_refused_everywhere(any_target, any_target.sign(alg=alg, sign_as=alg, key=key))


def _our_key_other_alg(t: Target) -> list[tuple[str, str]]:
    """Our own key under an algorithm of its family that the gateway did not configure."""
    if t.algorithm == "RS256":
        return [(alg, t.sign(alg=alg, sign_as=alg)) for alg in ("RS384", "RS512", "PS256")]
    if t.algorithm == "ES256":
        return [(alg, t.sign(alg=alg, sign_as=alg)) for alg in ("ES384", "ES512")]
    if t.algorithm == "HS256":
        return [(alg, t.sign(alg=alg, sign_as=alg)) for alg in ("HS384", "HS512")]
    return [("Ed25519", t.sign(alg="Ed25519")), ("EdDSA as ES256", t.sign(alg="ES256"))]


async def test_our_key_under_another_algorithm_is_refused(any_target: Target) -> None:
    for _, token in _our_key_other_alg(any_target):
        await assert_refused_everywhere(any_target, token)


# --- remote keys: jku, x5u, x5c are never fetched or trusted ----------------------------------


REMOTE_KEY_HEADERS: list[tuple[str, Callable[[KeyServer], dict[str, Any]]]] = [
    ("jku, our kid", lambda s: {"jku": f"{s.url}/jwks.json"}),
    ("jku, attacker kid", lambda s: {"jku": f"{s.url}/jwks.json", "kid": ATTACKER_KID}),
    ("jku, no kid", lambda s: {"jku": f"{s.url}/jwks.json", "kid": _DROP}),
    ("x5u PEM", lambda s: {"x5u": f"{s.url}/cert.pem", "kid": _DROP}),
    ("x5u DER, our kid", lambda s: {"x5u": f"{s.url}/cert.der"}),
    (
        "x5c self-signed",
        lambda s: {
            "x5c": [
                base64.b64encode(attacker_cert().public_bytes(serialization.Encoding.DER)).decode()
            ],
            "kid": _DROP,
        },
    ),
    (
        "x5c with x5t#S256",
        lambda s: {
            "x5c": [
                base64.b64encode(attacker_cert().public_bytes(serialization.Encoding.DER)).decode()
            ],
            "x5t#S256": b64(hashlib.sha256(b"x").digest()),
        },
    ),
    (
        "jwk and jku together",
        lambda s: {
            "jku": f"{s.url}/jwks.json",
            "jwk": attacker_jwk(ATTACKER_KID),
            "kid": ATTACKER_KID,
        },
    ),
]


@pytest.mark.parametrize(
    "extra", [h[1] for h in REMOTE_KEY_HEADERS], ids=[h[0] for h in REMOTE_KEY_HEADERS]
)
async def test_remote_key_headers_are_never_fetched(
    rs256: Target, key_server: KeyServer, extra: Callable[[KeyServer], dict[str, Any]]
) -> None:
    before = len(key_server.hits)
    token = rs256.sign(key=ATTACKER_RSA, **extra(key_server))
    await assert_refused_everywhere(rs256, token)
    assert key_server.hits[before:] == [], "the gateway fetched a key named by the token"


async def test_remote_key_headers_on_a_genuine_token_are_ignored(
    rs256: Target, key_server: KeyServer
) -> None:
    # Signed by our key: valid whatever the jku says, and still nothing fetched.
    before = len(key_server.hits)
    token = rs256.sign(jku=f"{key_server.url}/jwks.json", x5u=f"{key_server.url}/cert.pem")
    await assert_accepted_everywhere(rs256, bearer(token))
    assert key_server.hits[before:] == []


# --- ECDSA: psychic signatures, malleable twins, DER instead of raw --------------------------


def _es_signature_variants(t: Target) -> list[tuple[str, str]]:
    signing_input, _, encoded = t.access_token.rpartition(".")
    genuine = unb64(encoded)
    r, s = genuine[:32], int.from_bytes(genuine[32:], "big")
    n = P256_ORDER.to_bytes(32, "big")
    der = encode_dss_signature(int.from_bytes(r, "big"), s)
    ours_der = t.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
    variants = {
        "high-S twin of the genuine token": twin(genuine),
        "r=s=0 (CVE-2022-21449)": bytes(64),
        "r=s=n": n + n,
        "r=0, s genuine": bytes(32) + genuine[32:],
        "r genuine, s=0": r + bytes(32),
        "r=s=1": (1).to_bytes(32, "big") * 2,
        "s + n (33 bytes)": r + (s + P256_ORDER).to_bytes(33, "big"),
        "r, s=n-0 overflow": r + n,
        "genuine signature as DER": der,
        "fresh DER signature by our key": ours_der,
        "leading zero byte": b"\x00" + genuine,
        "63 bytes": genuine[1:],
        "all ones": b"\xff" * 64,
    }
    return [(name, f"{signing_input}.{b64(sig)}") for name, sig in variants.items()]


ES_VARIANTS = [
    "high-S twin of the genuine token",
    "r=s=0 (CVE-2022-21449)",
    "r=s=n",
    "r=0, s genuine",
    "r genuine, s=0",
    "r=s=1",
    "s + n (33 bytes)",
    "r, s=n-0 overflow",
    "genuine signature as DER",
    "fresh DER signature by our key",
    "leading zero byte",
    "63 bytes",
    "all ones",
]


@pytest.mark.parametrize("variant", ES_VARIANTS)
async def test_es256_signature_forgeries_are_refused(es256: Target, variant: str) -> None:
    token = dict(_es_signature_variants(es256))[variant]
    await assert_refused_everywhere(es256, token)


async def test_es256_issued_tokens_are_low_s(es256: Target) -> None:
    # The twin of a high-S token would be its low-S form, which we accept: so every token
    # the gateway issues must be low-S for "no twin is accepted" to hold. 2**-12 by chance.
    for _ in range(12):
        _, tokens = _sign_in(es256.gw.url)
        signature = unb64(tokens["access_token"].rsplit(".", 1)[1])
        assert int.from_bytes(signature[32:], "big") <= P256_ORDER // 2


# --- EdDSA: non-canonical S, small-order points ---------------------------------------------


def _ed_signature_variants(t: Target) -> dict[str, bytes]:
    genuine = unb64(t.access_token.rsplit(".", 1)[1])
    r, s = genuine[:32], int.from_bytes(genuine[32:], "little")
    return {
        "S + L (non-canonical twin)": r + (s + ED25519_ORDER).to_bytes(32, "little"),
        "all zero": bytes(64),
        "identity R, S=0": (1).to_bytes(32, "little") + bytes(32),
        "R genuine, S=0": r + bytes(32),
        "S = L": r + ED25519_ORDER.to_bytes(32, "little"),
        "63 bytes": genuine[:-1],
    }


ED_VARIANTS = [
    "S + L (non-canonical twin)",
    "all zero",
    "identity R, S=0",
    "R genuine, S=0",
    "S = L",
    "63 bytes",
]


@pytest.mark.parametrize("variant", ED_VARIANTS)
async def test_eddsa_signature_forgeries_are_refused(eddsa: Target, variant: str) -> None:
    signature = _ed_signature_variants(eddsa)[variant]
    await assert_refused_everywhere(eddsa, with_signature(eddsa.access_token, signature))


# --- HS256: truncated and re-keyed MACs -----------------------------------------------------


HS_VARIANTS: list[tuple[str, Attack]] = [
    (
        "MAC truncated to 16 bytes",
        lambda t: with_signature(t.access_token, unb64(t.access_token.rsplit(".", 1)[1])[:16]),
    ),
    ("MAC keyed with the empty string", lambda t: t.sign(key=b"")),
    ("MAC keyed with the kid", lambda t: t.sign(key=t.kid.encode())),
    ("MAC keyed with the secret plus a newline", lambda t: t.sign(key=HS_SECRET.encode() + b"\n")),
    (
        "MAC keyed with the secret's SHA-256",
        lambda t: t.sign(key=hashlib.sha256(HS_SECRET.encode()).digest()),
    ),
    ("MAC keyed with the issuer", lambda t: t.sign(key=t.genuine_claims["iss"].encode())),
]


@pytest.mark.parametrize("build", [v[1] for v in HS_VARIANTS], ids=[v[0] for v in HS_VARIANTS])
async def test_hs256_rekeyed_macs_are_refused(hs256: Target, build: Attack) -> None:
    await assert_refused_everywhere(hs256, build(hs256))


# --- refresh tokens are not access tokens ----------------------------------------------------


async def test_refresh_token_as_bearer_is_refused(any_target: Target) -> None:
    await assert_refused_everywhere(any_target, any_target.refresh_token)


async def test_access_token_as_refresh_token_is_refused(any_target: Target) -> None:
    body = json.dumps({"refresh_token": any_target.access_token}).encode()
    request = (
        b"POST /auth/refresh HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    resp = await raw_request(any_target.gw.url, request)
    assert resp.status == 401, resp.body[:300]
    assert_not_echoed(resp, any_target.access_token, "POST /auth/refresh")


# --- the Authorization header itself ---------------------------------------------------------

# A genuine token under a lenient but RFC-valid framing may be accepted or refused (never 5xx);
# a bad token under the same framing must always be refused as invalid.
FRAMINGS: list[tuple[str, Callable[[str], list[bytes]]]] = [
    ("two spaces", lambda tok: [b"Authorization: Bearer  " + tok.encode()]),
    ("five spaces", lambda tok: [b"Authorization: Bearer     " + tok.encode()]),
    ("tab", lambda tok: [b"Authorization: Bearer\t" + tok.encode()]),
    ("space and tabs", lambda tok: [b"Authorization: Bearer \t\t" + tok.encode()]),
    ("lowercase scheme", lambda tok: [b"Authorization: bearer " + tok.encode()]),
    ("uppercase scheme", lambda tok: [b"Authorization: BEARER " + tok.encode()]),
    ("trailing whitespace", lambda tok: [b"Authorization: Bearer " + tok.encode() + b" \t "]),
    ("leading whitespace", lambda tok: [b"Authorization:    Bearer " + tok.encode()]),
    ("lowercase header name", lambda tok: [b"authorization: Bearer " + tok.encode()]),
]


@pytest.mark.parametrize("frame", [f[1] for f in FRAMINGS], ids=[f[0] for f in FRAMINGS])
async def test_framing_never_lets_a_bad_token_through(
    rs256: Target, frame: Callable[[str], list[bytes]]
) -> None:
    bad = flip_bit(rs256.access_token, -20, 4)
    responses = await send_everywhere(rs256.gw.url, frame(bad))
    for path, resp in responses.items():
        assert_refused_as_invalid_token(resp, bad, f"{path} {frame(bad)[0][:30]!r}")


@pytest.mark.parametrize("frame", [f[1] for f in FRAMINGS], ids=[f[0] for f in FRAMINGS])
async def test_framing_of_a_genuine_token_is_never_a_5xx(
    rs256: Target, frame: Callable[[str], list[bytes]]
) -> None:
    responses = await send_everywhere(rs256.gw.url, frame(rs256.access_token))
    for path, resp in responses.items():
        assert resp.status in (200, 400, 401), (path, resp.status)
        if resp.status != 200:
            assert_not_echoed(resp, rs256.access_token, path)


DUPLICATES: list[tuple[str, Callable[[Target], list[bytes]]]] = [
    ("genuine twice", lambda t: bearer(t.access_token) * 2),
    ("genuine then forged", lambda t: bearer(t.access_token) + bearer(t.unsigned("none"))),
    ("forged then genuine", lambda t: bearer(t.unsigned("none")) + bearer(t.access_token)),
    (
        "genuine and lowercase name",
        lambda t: [*bearer(t.access_token), b"authorization: Bearer x.y.z"],
    ),
    ("Basic then Bearer", lambda t: [b"Authorization: Basic YTpi", *bearer(t.access_token)]),
    (
        "one header, two tokens",
        lambda t: [
            b"Authorization: Bearer " + f"{t.access_token}, Bearer {t.access_token}".encode()
        ],
    ),
]


@pytest.mark.parametrize("build", [d[1] for d in DUPLICATES], ids=[d[0] for d in DUPLICATES])
async def test_duplicate_authorization_is_refused(
    rs256: Target, build: Callable[[Target], list[bytes]]
) -> None:
    # Which copy would a proxy, the gateway and the upstream each believe? None: refused.
    responses = await send_everywhere(rs256.gw.url, build(rs256))
    for path, resp in responses.items():
        assert_refused_as_invalid_token(resp, rs256.access_token, path)


@pytest.mark.parametrize(
    "value",
    ["Basic YTpi, Bearer {token}", "Digest x=1, Bearer {token}", "Negotiate, Bearer {token}"],
)
async def test_bearer_behind_another_scheme_never_authenticates(rs256: Target, value: str) -> None:
    # One header, the first scheme not ours: a credential for the upstream, not for us (§3).
    # Whatever the gateway answers, no identity may come of the embedded genuine token.
    line = b"Authorization: " + value.format(token=rs256.access_token).encode()
    responses = await send_everywhere(rs256.gw.url, [line])
    for path in ("/api/x", "/auth/profile", "/auth/verify"):
        assert responses[path].status == 401, (path, responses[path].status)
    maybe = responses["/maybe/x"]
    assert maybe.status in (200, 401), maybe.status
    if maybe.status == 200:
        assert not [k for k, _ in maybe.json()["headers"] if k.lower().startswith("x-user-")]


@pytest.mark.parametrize(
    "size", [9 * 1024, 17 * 1024, 64 * 1024, 1024 * 1024], ids=["9KiB", "17KiB", "64KiB", "1MiB"]
)
async def test_huge_authorization_header_is_a_clear_4xx(rs256: Target, size: int) -> None:
    token = rs256.access_token + "A" * (size - len(rs256.access_token))
    for path in TARGET_PATHS:
        resp = await send_tolerant(rs256.gw.url, request_bytes(path, bearer(token)))
        if resp is None:
            # The gateway answered 431 and closed while this client was still sending the
            # rest of the head; the kernel may then reset the connection before the answer
            # is read. Only possible once the head is past the 16 KiB the gateway reads.
            assert size > 16 * 1024, f"{path}: connection dropped without an answer"
            continue
        assert resp.status in (400, 401, 431), (path, resp.status)
        assert resp.header("X-Upstream") is None
        assert b"A" * 64 not in resp.body


async def send_tolerant(base: str, request: bytes) -> RawResponse | None:
    """Like ``raw_request``, but the server may answer (and close) before reading it all."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        with contextlib.suppress(ConnectionError):
            writer.write(request)
            await writer.drain()
        try:
            data = await asyncio.wait_for(reader.read(), 10)
        except ConnectionError:
            return None
    finally:
        writer.close()
    if not data:
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = [tuple(line.split(": ", 1)) for line in lines[1:] if ": " in line]
    return RawResponse(int(lines[0].split(" ")[1]), headers, body)  # type: ignore[arg-type]


async def test_forward_auth_for_an_optional_route_refuses_a_bad_token(rs256: Target) -> None:
    bad = rs256.unsigned("none")
    lines = [
        *bearer(bad),
        b"X-Forwarded-Method: GET",
        b"X-Forwarded-Host: 127.0.0.1",
        b"X-Forwarded-Uri: /maybe/x",
    ]
    resp = await raw_request(rs256.gw.url, request_bytes("/auth/verify", lines))
    assert_refused_as_invalid_token(resp, bad, "verify /maybe/x")
