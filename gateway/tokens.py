"""Tokens: the gateway's signing keys, access-token issuing and pinned verification.

Verification pins the algorithm to the configured one, requires ``exp``, ``iat``, ``sub``,
``iss`` and ``aud``, checks ``iss`` and ``aud``, checks ``exp``, ``nbf`` and ``iat`` against
the injected clock with ``leeway``, refuses any ``crit``, accepts ``typ`` absent, ``JWT`` or
``at+jwt``, and ignores ``jku``, ``x5u``, ``x5c`` and embedded ``jwk``: a token is only ever
checked against a key of our own ring, chosen by an exact ``kid`` match (CONTRACT §5).

Every token has exactly one accepted spelling: base64url without padding and with zero
trailing bits, and for ES256 the low-S signature (ECDSA is malleable: ``(r, n - s)`` verifies
wherever ``(r, s)`` does). Tokens we issue are low-S; a high-S twin is refused.

Private keys live in ``keys_dir`` as unencrypted PKCS#8 PEM files named ``<kid>.pem``,
mode 0600, written atomically; each is parsed once, at load. This is the only module that
imports ``jwt``.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import contextlib
import hashlib
import json
import math
import os
import re
import secrets
import string
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, HMACAlgorithm, OKPAlgorithm, RSAAlgorithm

from gateway.config import TokenSettings
from gateway.errors import InvalidToken
from gateway.identity import Identity, identity_from_claims

try:  # POSIX: serialise "generate the first key" across processes sharing keys_dir
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["KeyInfo", "KeyRing", "KeyRingError", "TokenService", "MAX_TOKEN_LENGTH"]

MAX_TOKEN_LENGTH = 8 * 1024
# Identity assertions for upstreams (headers.assertion): short-lived, and typed so that
# nothing mistakes one for an access token (RFC 8725 §3.11, explicit typing).
ASSERTION_TTL = 60
ASSERTION_TYP = "identity+jwt"
MIN_RSA_BITS = 2048
MIN_SECRET_BYTES = 32  # RFC 7518 §3.2: an HS256 key at least as long as the hash output

# Compact JWS: header.payload.signature, base64url without padding. Checked before any
# decoding so that nothing else (padding, spaces, a fourth segment) reaches the parser.
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_KID_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_OUR_KID = re.compile(r"(\d{8}T\d{6})(\d{3})-[a-z0-9]{6}")
_KID_ALPHABET = string.ascii_lowercase + string.digits  # safe on case-insensitive filesystems
# RFC 9068 §4 and RFC 7515 §4.1.9: "application/" may be omitted from a typ media type.
_ACCEPTED_TYP = frozenset({"jwt", "at+jwt", "application/jwt", "application/at+jwt"})
_REQUIRED_CLAIMS = ["exp", "iat", "sub", "iss", "aud"]
# Order n of P-256 (SEC 2 §2.4.2): an ES256 signature is r || s, each 32 bytes big-endian.
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_P256_BYTES = 32


class KeyRingError(Exception):
    """The key ring cannot be used as asked (operator-facing; names files, never contents)."""


@dataclass(frozen=True)
class KeyInfo:
    kid: str
    algorithm: str
    created_at: float
    signing: bool  # the newest key signs


@dataclass(frozen=True)
class _Scheme:
    """How one asymmetric algorithm makes, recognises and publishes its keys."""

    algorithm: str
    generate: Callable[[], Any]
    accepts: Callable[[Any], bool]
    to_jwk: Callable[[Any], dict[str, Any]]


def _is_p256(key: Any) -> bool:
    return isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)


_SCHEMES: dict[str, _Scheme] = {
    "RS256": _Scheme(
        "RS256",
        lambda: rsa.generate_private_key(public_exponent=65537, key_size=MIN_RSA_BITS),
        lambda key: isinstance(key, rsa.RSAPrivateKey),
        lambda public: dict(RSAAlgorithm.to_jwk(public, as_dict=True)),
    ),
    "ES256": _Scheme(
        "ES256",
        lambda: ec.generate_private_key(ec.SECP256R1()),
        _is_p256,
        lambda public: dict(ECAlgorithm.to_jwk(public, as_dict=True)),
    ),
    "EdDSA": _Scheme(
        "EdDSA",
        ed25519.Ed25519PrivateKey.generate,
        lambda key: isinstance(key, ed25519.Ed25519PrivateKey),
        lambda public: dict(OKPAlgorithm.to_jwk(public, as_dict=True)),
    ),
}


@dataclass(frozen=True)
class _Key:
    """One parsed key: the objects PyJWT signs and verifies with, never re-read from disk."""

    kid: str
    created_at: float
    signer: Any = field(repr=False)
    verifier: Any = field(repr=False)
    jwk: dict[str, Any] | None = field(default=None, repr=False)
    path: Path | None = None


class KeyRing:
    """Keys in ``keys_dir`` (PEM files, mode 0600), or the HS256 secret."""

    def __init__(self, algorithm: str, keys_dir: Path | None, keys: list[_Key]) -> None:
        self._algorithm = algorithm
        self._keys_dir = keys_dir
        self._set(keys)

    def __repr__(self) -> str:
        return f"KeyRing(algorithm={self._algorithm!r}, kids={list(self._by_kid)!r})"

    @classmethod
    def load(cls, settings: TokenSettings, create: bool = True) -> KeyRing:
        """Load every key; generate one when the dir holds none and ``create``.

        With ``create=False`` an empty ring is returned as is (``keys()`` is empty); a
        ``TokenService`` refuses it. Raises ``KeyRingError`` for an unreadable or corrupt
        key file, an RSA key under 2048 bits, or an unusable HS256 secret.
        """
        if settings.algorithm == "HS256":
            return cls("HS256", None, [_secret_key(settings)])
        scheme = _scheme(settings.algorithm)
        keys_dir = Path(settings.keys_dir)
        ring = cls(scheme.algorithm, keys_dir, _read_dir(keys_dir, scheme))
        if ring._by_kid or not create:
            return ring
        _make_dir(keys_dir)
        # Two workers starting on an empty dir must not each sign with a key the other lacks.
        with _dir_lock(keys_dir):
            ring = cls(scheme.algorithm, keys_dir, _read_dir(keys_dir, scheme))
            if not ring._by_kid:
                ring.rotate()
        return ring

    @property
    def algorithm(self) -> str:
        return self._algorithm

    def rotate(self) -> KeyInfo:
        """Generate a new key; it signs from now on, older keys keep verifying."""
        scheme, keys_dir = self._asymmetric()
        kid, created_at = self._new_kid()
        private = scheme.generate()
        pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _make_dir(keys_dir)
        path = keys_dir / f"{kid}.pem"
        _write_private(path, pem)
        self._set([*self._ordered, _parsed(scheme, kid, created_at, private, path)])
        return self._info(self._ordered[-1])

    def remove(self, kid: str) -> None:
        """Delete key ``kid``; if it was signing, the next newest signs. The last key stays."""
        self._asymmetric()
        key = self._by_kid.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise KeyRingError(f"no key with kid {kid!r}")
        if len(self._ordered) == 1:
            raise KeyRingError("refusing to remove the only key: rotate first")
        if key.path is not None:
            with contextlib.suppress(FileNotFoundError):  # already gone: same outcome
                key.path.unlink()
        self._set([k for k in self._ordered if k.kid != kid])

    def keys(self) -> list[KeyInfo]:
        return [self._info(k) for k in self._ordered]

    def jwks(self) -> dict[str, Any]:
        """Public keys with ``kid``, ``alg`` and ``use``; empty for HS256."""
        return {"keys": [dict(k.jwk) for k in self._ordered if k.jwk is not None]}

    def verification_key(self, kid: str) -> Any | None:
        """The parsed key for an exact ``kid`` of this ring, else None."""
        key = self._by_kid.get(kid)
        return None if key is None else key.verifier

    def signing_key(self) -> tuple[str, Any]:
        """``(kid, key)`` of the newest key."""
        if not self._ordered:
            raise KeyRingError("the key ring is empty: no key to sign with")
        key = self._ordered[-1]
        return key.kid, key.signer

    def _set(self, keys: list[_Key]) -> None:
        # Replaced whole, never mutated, so a concurrent reader sees the old or new ring.
        self._ordered = tuple(sorted(keys, key=lambda k: (k.created_at, k.kid)))
        self._by_kid = {k.kid: k for k in self._ordered}

    def _info(self, key: _Key) -> KeyInfo:
        signing = bool(self._ordered) and key is self._ordered[-1]
        return KeyInfo(key.kid, self._algorithm, key.created_at, signing)

    def _asymmetric(self) -> tuple[_Scheme, Path]:
        if self._algorithm not in _SCHEMES or self._keys_dir is None:
            raise KeyRingError("keys apply to asymmetric algorithms")
        return _SCHEMES[self._algorithm], self._keys_dir

    def _new_kid(self) -> tuple[str, float]:
        """A kid whose timestamp sorts after every key of the ring (newest signs)."""
        millis = int(time.time() * 1000)
        if self._ordered:
            millis = max(millis, math.floor(self._ordered[-1].created_at * 1000) + 1)
        seconds, rest = divmod(millis, 1000)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(seconds))
        suffix = "".join(secrets.choice(_KID_ALPHABET) for _ in range(6))
        return f"{stamp}{rest:03d}-{suffix}", millis / 1000


def _scheme(algorithm: str) -> _Scheme:
    try:
        return _SCHEMES[algorithm]
    except KeyError:
        raise KeyRingError(f"unsupported token algorithm {algorithm!r}") from None


def _secret_key(settings: TokenSettings) -> _Key:
    if settings.secret is None:
        raise KeyRingError("tokens.secret is required for HS256")
    secret = settings.secret.reveal().encode("utf-8")
    if len(secret) < MIN_SECRET_BYTES:
        raise KeyRingError(f"tokens.secret must be at least {MIN_SECRET_BYTES} bytes for HS256")
    try:
        HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(secret)
    except jwt.InvalidKeyError:
        raise KeyRingError("tokens.secret looks like an asymmetric key, not a secret") from None
    # Derived from the secret, so every replica agrees on it without sharing state; 8 bytes
    # of a hash reveal nothing useful about a 32-byte secret.
    kid = hashlib.sha256(secret).hexdigest()[:16]
    return _Key(kid, 0.0, secret, secret)


def _read_dir(keys_dir: Path, scheme: _Scheme) -> list[_Key]:
    if not keys_dir.is_dir():
        return []
    keys = []
    for path in sorted(keys_dir.iterdir()):
        # Hidden names are our temporary files (and editors' backups); not keys.
        if path.name.startswith(".") or path.suffix != ".pem" or not path.is_file():
            continue
        key = _read_key(path, scheme)
        if key is not None:
            keys.append(key)
    return keys


def _read_key(path: Path, scheme: _Scheme) -> _Key | None:
    kid = path.stem
    if not _KID_FILE.fullmatch(kid):
        raise KeyRingError(f"{path}: file name is not a usable key id")
    try:
        data = path.read_bytes()
        stat = path.stat()
    except OSError as exc:
        raise KeyRingError(f"{path}: cannot read key file ({exc.strerror})") from None
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # No chaining: the parser's message is not ours to vouch for near key material.
        raise KeyRingError(f"{path}: not an unencrypted PEM private key") from None
    if not scheme.accepts(private):
        return None  # another algorithm's key: kept on disk, unused by this configuration
    if isinstance(private, rsa.RSAPrivateKey) and private.key_size < MIN_RSA_BITS:
        raise KeyRingError(f"{path}: RSA key has {private.key_size} bits, at least 2048 needed")
    return _parsed(scheme, kid, _created_at(kid, stat.st_mtime), private, path)


def _parsed(scheme: _Scheme, kid: str, created_at: float, private: Any, path: Path) -> _Key:
    public = private.public_key()
    jwk = {**scheme.to_jwk(public), "kid": kid, "alg": scheme.algorithm, "use": "sig"}
    return _Key(kid, created_at, private, public, jwk, path)


def _created_at(kid: str, mtime: float) -> float:
    match = _OUR_KID.fullmatch(kid)
    if match is None:
        return mtime
    try:
        parsed = time.strptime(match.group(1), "%Y%m%dT%H%M%S")
    except ValueError:
        return mtime
    return calendar.timegm(parsed) + int(match.group(2)) / 1000


def _make_dir(keys_dir: Path) -> None:
    try:
        keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise KeyRingError(f"{keys_dir}: cannot create keys dir ({exc.strerror})") from None


@contextlib.contextmanager
def _dir_lock(keys_dir: Path) -> Iterator[None]:
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    try:
        fd = os.open(keys_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise KeyRingError(f"{keys_dir}: cannot lock keys dir ({exc.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _write_private(path: Path, pem: bytes) -> None:
    """Write ``pem`` to ``path`` with mode 0600 from the first byte, atomically."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, 0o600)  # the umask could only narrow it; make it exact
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise KeyRingError(f"{path}: cannot write key file ({exc.strerror})") from None
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename durable; not every platform lets a directory be opened.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class TokenService:
    """Issues our access tokens and verifies presented ones against our key ring only."""

    def __init__(
        self,
        settings: TokenSettings,
        keyring: KeyRing,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if keyring.algorithm != settings.algorithm:
            raise KeyRingError("the key ring does not match tokens.algorithm")
        keyring.signing_key()  # fail at start-up, not on the first login
        self._settings = settings
        self._keyring = keyring
        self._clock = clock
        self._algorithm = settings.algorithm
        self._ttl = int(settings.access_ttl)
        self._leeway = float(settings.leeway)
        self._verifier = jwt.get_algorithm_by_name(self._algorithm)

    def issue_access_token(
        self, *, user_id: str, email: str, name: str | None, roles: tuple[str, ...]
    ) -> tuple[str, int]:
        """Return ``(token, expires_in_seconds)``."""
        now = int(self._clock())
        claims: dict[str, Any] = {
            "iss": self._settings.issuer,
            "sub": user_id,
            "aud": self._settings.audience,
            "iat": now,
            "nbf": now,
            "exp": now + self._ttl,
            "jti": uuid.uuid4().hex,
            "email": email,
            "roles": list(roles),
        }
        if name is not None:
            claims["name"] = name
        return self._sign(claims, typ="JWT"), self._ttl

    def issue_assertion(self, identity: Identity, audience: Sequence[str]) -> str:
        """A short-lived statement of ``identity`` for the upstreams at ``audience`` (their
        origins), verifiable with our JWKS. Its ``typ`` is not an access token's, and its
        ``aud`` is not ours, so it is never accepted back as a credential."""
        now = int(self._clock())
        claims: dict[str, Any] = {
            "iss": self._settings.issuer,
            "sub": identity.id,
            "aud": list(audience),
            "iat": now,
            "nbf": now,
            "exp": now + ASSERTION_TTL,
            "jti": uuid.uuid4().hex,
            "roles": list(identity.roles),
            "orig_iss": identity.issuer,
        }
        if identity.email is not None:
            claims["email"] = identity.email
        if identity.name is not None:
            claims["name"] = identity.name
        return self._sign(claims, typ=ASSERTION_TYP)

    def _sign(self, claims: dict[str, Any], *, typ: str) -> str:
        kid, key = self._keyring.signing_key()
        token = jwt.encode(claims, key, algorithm=self._algorithm, headers={"kid": kid, "typ": typ})
        if self._algorithm == "ES256":
            token = _with_low_s(token)
        return token

    def verify(self, token: str) -> Identity:
        """Raise ``InvalidToken(reason)`` for anything not a valid access token of ours."""
        key = self._key_for(_unverified_header(token))
        if self._algorithm == "ES256" and _has_high_s(token):
            raise InvalidToken("signature")  # the malleable twin of a token we issued low-S
        claims = self._decode(token, key)
        self._check_times(claims)
        return identity_from_claims(
            claims, issuer=self._settings.issuer, leeway=self._leeway, token=token
        )

    def _key_for(self, header: dict[str, Any]) -> Any:
        """Check the header and pick our key by exact ``kid``."""
        check_header(header, (self._algorithm,))
        kid = header.get("kid")
        key = self._keyring.verification_key(kid) if isinstance(kid, str) else None
        if key is None:
            raise InvalidToken("unknown_kid")
        return key

    def _decode(self, token: str, key: Any) -> dict[str, Any]:
        return verify_signed(
            token,
            self._verifier,
            key,
            issuer=self._settings.issuer,
            audience=self._settings.audience,
        )

    def _check_times(self, claims: dict[str, Any]) -> None:
        check_times(claims, now=self._clock(), leeway=self._leeway)


def check_header(header: Mapping[str, Any], algorithms: Collection[str]) -> str:
    """The ``alg`` of an acceptable JOSE header, for our tokens and issuers' alike: one of
    ``algorithms``, no ``crit`` (we implement no extension, RFC 7515 §4.1.11) and no ``b64``
    (RFC 7797), ``typ`` absent,
    JWT or at+jwt. jku, x5u, x5c and jwk are never looked at; ``kid`` is the caller's."""
    algorithm = header.get("alg")
    if not isinstance(algorithm, str) or algorithm not in algorithms:
        raise InvalidToken("algorithm")
    if "crit" in header:
        raise InvalidToken("crit")
    if "b64" in header:
        # RFC 7797's unencoded payload changes what is signed; we implement no extension, and
        # a verifier that ignored it would check another signing input than its sender meant.
        raise InvalidToken("malformed")
    typ = header.get("typ", "JWT")
    if not isinstance(typ, str) or typ.lower() not in _ACCEPTED_TYP:
        raise InvalidToken("typ")
    return algorithm


def verify_signed(
    token: str,
    algorithm: Any,
    key: Any,
    *,
    issuer: str,
    audience: str,
    required: Sequence[str] = _REQUIRED_CLAIMS,
) -> dict[str, Any]:
    """The claims of a compact JWS whose header ``check_header`` accepted: signature first,
    then PyJWT's claim rules — what ``jwt.decode`` checks, at a third of its cost.

    ``algorithm`` is PyJWT's algorithm object (``jwt.get_algorithm_by_name``), ``key`` a
    parsed key. PyJWT validates each segment's base64 character by character (half of a
    verification); ``_unverified_header`` has already checked the alphabet with one regex, so
    the segments only need the canonical-form check. Raises ``InvalidToken("signature")``
    for a signature that does not verify (the caller may try another key), other reasons
    for anything else.
    """
    head, payload_segment, signature_segment = token.split(".")
    payload = _canonical_b64decode(payload_segment)
    signature = _canonical_b64decode(signature_segment)
    signing_input = f"{head}.{payload_segment}".encode("ascii")
    try:
        valid = algorithm.verify(signing_input, algorithm.prepare_key(key), signature)
    except Exception:  # a crafted signature must never become a 500
        valid = False
    if not valid:
        raise InvalidToken("signature")
    try:
        claims = json.loads(payload)
    except (ValueError, RecursionError):
        raise InvalidToken("malformed") from None
    if not isinstance(claims, dict):
        raise InvalidToken("malformed")
    _check_claims(claims, issuer=issuer, audience=audience, required=required)
    return claims


def _check_claims(
    claims: dict[str, Any], *, issuer: str, audience: str, required: Sequence[str]
) -> None:
    """PyJWT's claim rules, in its order (so a token with several faults gets the same
    reason): required present, ``iss`` equal, ``aud`` holding ours, ``sub`` and ``jti``
    strings. Times are ``check_times``'s."""
    for name in required:
        if claims.get(name) is None:
            raise InvalidToken("missing_claim")
    if not isinstance(claims["iss"], str) or claims["iss"] != issuer:
        raise InvalidToken("issuer")
    audiences = claims["aud"]
    if not audiences:
        raise InvalidToken("missing_claim")
    if isinstance(audiences, str):
        audiences = [audiences]
    if not isinstance(audiences, list) or not all(isinstance(a, str) for a in audiences):
        raise InvalidToken("audience")
    if audience not in audiences:
        raise InvalidToken("audience")
    if not isinstance(claims["sub"], str):
        raise InvalidToken("malformed_claims")
    if "jti" in claims and not isinstance(claims["jti"], str):
        raise InvalidToken("malformed_claims")


def check_times(claims: Mapping[str, Any], *, now: float, leeway: float) -> None:
    """``iat`` not in the future, ``nbf`` reached, ``exp`` not passed, each within ``leeway``
    (checked here rather than by PyJWT so that the clock can be injected)."""
    iat = _timestamp(claims, "iat")
    nbf = _timestamp(claims, "nbf")
    exp = _timestamp(claims, "exp")
    if iat is not None and iat > now + leeway:
        raise InvalidToken("iat")
    if nbf is not None and nbf > now + leeway:
        raise InvalidToken("not_yet_valid")
    if exp is not None and exp <= now - leeway:
        raise InvalidToken("expired")


def _unverified_header(token: object) -> dict[str, Any]:
    """The JOSE header of a well-shaped compact JWS, or ``InvalidToken("malformed")``."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH:
        raise InvalidToken("malformed")
    if not _COMPACT_JWS.fullmatch(token):
        raise InvalidToken("malformed")
    raw = _canonical_b64decode(token.partition(".")[0])
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):
        raise InvalidToken("malformed") from None
    if not isinstance(header, dict):
        raise InvalidToken("malformed")
    return header


def _canonical_b64decode(segment: str) -> bytes:
    """A base64url segment (alphabet already checked) in its one canonical spelling only:
    a token has exactly one accepted form (no twin with other trailing bits)."""
    if len(segment) % 4 == 1:
        raise InvalidToken("malformed")
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        raise InvalidToken("malformed") from None
    if base64.urlsafe_b64encode(raw).rstrip(b"=") != segment.encode("ascii"):
        raise InvalidToken("malformed")
    return raw


def _signature_bytes(token: str) -> bytes | None:
    segment = token.rpartition(".")[2]
    try:
        return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        return None  # PyJWT refuses it as malformed; not ours to classify here


def _has_high_s(token: str) -> bool:
    """Whether an ES256 signature's ``s`` is above n/2 (a wrong length fails verification)."""
    signature = _signature_bytes(token)
    if signature is None or len(signature) != 2 * _P256_BYTES:
        return False
    return int.from_bytes(signature[_P256_BYTES:], "big") > _P256_ORDER // 2


def _with_low_s(token: str) -> str:
    """``token`` with its ES256 signature ``(r, s)`` replaced by ``(r, n - s)`` if s > n/2."""
    if not _has_high_s(token):
        return token
    signature = _signature_bytes(token) or b""
    s = _P256_ORDER - int.from_bytes(signature[_P256_BYTES:], "big")
    low = signature[:_P256_BYTES] + s.to_bytes(_P256_BYTES, "big")
    encoded = base64.urlsafe_b64encode(low).rstrip(b"=").decode("ascii")
    return f"{token.rpartition('.')[0]}.{encoded}"


def _timestamp(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidToken("malformed_claims")
    try:
        number = float(value)
    except OverflowError:
        raise InvalidToken("malformed_claims") from None
    if not math.isfinite(number):
        raise InvalidToken("malformed_claims")
    return number
