"""External OpenID Connect issuers: their signing keys, and pinned verification of their tokens.

A token's unverified ``iss`` only *picks* the issuer; its signature is then checked against
that issuer's keys alone, so a key of one issuer never vouches for another's token. The
algorithm is the key's (its JWK ``alg``, else derived from ``kty``/``crv``), never the token's
alone: the header ``alg`` must equal it, and only asymmetric algorithms exist here, so a
public key can never be used as an HMAC secret. ``jku``, ``x5u``, ``x5c`` and ``jwk`` headers
are never looked at (CONTRACT §5).

Key sets are fetched from ``jwks_uri`` (or discovered from
``{issuer}/.well-known/openid-configuration``, whose ``issuer`` must match exactly) with a
5 s budget, at most 1 MiB read, and no redirect to another host; an error status, garbage or
a set without a usable key counts as unreachable. A set is cached for its
``Cache-Control: max-age`` (default 10 min, clamped to 1 min .. 24 h); an unknown ``kid``
refetches at most once a minute per issuer, and concurrent callers share one fetch; while
the provider is unreachable the last good set keeps serving. Keys are parsed once per fetch.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urljoin, urlsplit

import aiohttp
import jwt

from gateway.config import IssuerSettings
from gateway.errors import InvalidToken
from gateway.identity import Identity, identity_from_claims
from gateway.tokens import _unverified_header, check_header, check_times, verify_signed

__all__ = ["ExternalVerifier", "FetchObserver", "IssuerKeys", "JwksUnavailable"]

log = logging.getLogger(__name__)

FETCH_TIMEOUT = 5.0
MAX_DOCUMENT_BYTES = 1024 * 1024
MAX_REDIRECTS = 3
MAX_KEYS = 100  # bounds the work a kid-less token can cause (one try per key of its type)
DEFAULT_MAX_AGE = 600.0
MIN_MAX_AGE = 60.0
MAX_MAX_AGE = 86400.0
MISS_INTERVAL = 60.0  # an unknown kid refetches at most this often (CONTRACT §5)
RETRY_INTERVAL = 60.0  # after a failed fetch, the cached set is trusted this long again
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192  # a huge modulus would make every verification slow
DISCOVERY_PATH = "/.well-known/openid-configuration"

# Algorithm -> (kty, accepted curves or None). Asymmetric only: no "oct", no "none".
_ALGORITHMS: dict[str, tuple[str, frozenset[str] | None]] = {
    "RS256": ("RSA", None),
    "RS384": ("RSA", None),
    "RS512": ("RSA", None),
    "PS256": ("RSA", None),
    "PS384": ("RSA", None),
    "PS512": ("RSA", None),
    "ES256": ("EC", frozenset({"P-256"})),
    "ES384": ("EC", frozenset({"P-384"})),
    "ES512": ("EC", frozenset({"P-521"})),
    "EdDSA": ("OKP", frozenset({"Ed25519", "Ed448"})),
}
# The algorithm of a JWK without "alg" (RFC 7518 §3.1 defaults of each key type).
_DEFAULT_ALGORITHM: dict[tuple[object, object], str] = {
    ("RSA", None): "RS256",
    ("EC", "P-256"): "ES256",
    ("EC", "P-384"): "ES384",
    ("EC", "P-521"): "ES512",
    ("OKP", "Ed25519"): "EdDSA",
    ("OKP", "Ed448"): "EdDSA",
}
# Only public members reach the parser: a provider that leaks "d" must not make us hold it.
_PUBLIC_MEMBERS = {"RSA": ("n", "e"), "EC": ("crv", "x", "y"), "OKP": ("crv", "x")}
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_REQUIRED_CLAIMS = ["exp", "iss", "aud", "sub"]  # iat is optional for external issuers


class FetchObserver(Protocol):
    """Told of every key-set fetch (for metrics): which issuer, why, how it went, how long."""

    def __call__(
        self, issuer: str, reason: str, outcome: str, seconds: float, keys: int | None
    ) -> None: ...


class JwksUnavailable(Exception):
    """A discovery document or key set could not be fetched or used (operator-facing)."""


@dataclass(frozen=True)
class _Key:
    kid: str | None
    algorithm: str
    jwk: jwt.PyJWK = field(repr=False)


@dataclass(frozen=True)
class _KeySet:
    """One fetched key set, replaced whole (never mutated) so readers see old or new."""

    keys: tuple[_Key, ...]

    def by_kid(self, kid: str) -> tuple[_Key, ...]:
        return tuple(k for k in self.keys if k.kid == kid)

    def by_algorithm(self, algorithm: str) -> tuple[_Key, ...]:
        return tuple(k for k in self.keys if k.algorithm == algorithm)


SessionSource = aiohttp.ClientSession | Callable[[], aiohttp.ClientSession]


class IssuerKeys:
    """The cached signing keys of one configured issuer."""

    def __init__(
        self,
        settings: IssuerSettings,
        session: SessionSource,
        clock: Callable[[], float] = time.time,
        observer: FetchObserver | None = None,
    ) -> None:
        self.settings = settings
        self._session = session
        self._clock = clock
        self._observer = observer
        self._keys: _KeySet | None = None
        self._jwks_uri = settings.jwks_uri
        self._refresh_at = 0.0  # the first use fetches
        self._miss_allowed_at = 0.0
        self._inflight: asyncio.Future[None] | None = None
        self.fetches = 0  # attempts started; for metrics and tests

    def __repr__(self) -> str:
        kids = None if self._keys is None else [k.kid for k in self._keys.keys]
        name, issuer = self.settings.name, self.settings.issuer
        return f"IssuerKeys(name={name!r}, issuer={issuer!r}, kids={kids!r})"

    async def prefetch(self) -> None:
        """Fetch the keys now; a failure is logged, never raised (start must not fail)."""
        await self._refresh("prefetch")

    async def aclose(self) -> None:
        """Cancel a fetch in flight (call before the session closes)."""
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            inflight.cancel()
            await asyncio.gather(inflight, return_exceptions=True)

    async def candidates(self, kid: str | None, algorithm: str) -> tuple[_Key, ...]:
        """The keys a token with header ``kid`` and ``alg`` may be checked against.

        Raises ``InvalidToken``: ``jwks_unavailable`` when no key set was ever fetched,
        ``unknown_kid`` for a kid not in the (possibly refetched) set, ``algorithm`` when
        the matching keys are of another algorithm.
        """
        now = self._clock()
        if now >= self._refresh_at:
            await self._refresh("expired")
        elif self._missing(kid, algorithm) and now >= self._miss_allowed_at:
            self._miss_allowed_at = now + MISS_INTERVAL
            await self._refresh("unknown_kid")
        elif self._missing(kid, algorithm) and self._inflight is not None:
            await self._join()  # a concurrent miss started the fetch: share it
        return self._select(kid, algorithm)

    def _missing(self, kid: str | None, algorithm: str) -> bool:
        if self._keys is None:
            return True
        return not (
            self._keys.by_kid(kid) if kid is not None else self._keys.by_algorithm(algorithm)
        )

    def _select(self, kid: str | None, algorithm: str) -> tuple[_Key, ...]:
        if self._keys is None:
            raise InvalidToken("jwks_unavailable")
        if kid is None:
            keys = self._keys.by_algorithm(algorithm)
            if not keys:
                raise InvalidToken("algorithm")
            return keys
        keys = self._keys.by_kid(kid)
        if not keys:
            raise InvalidToken("unknown_kid")
        matching = tuple(k for k in keys if k.algorithm == algorithm)
        if not matching:
            raise InvalidToken("algorithm")
        return matching

    async def _refresh(self, reason: str) -> None:
        if self._inflight is None:
            inflight = asyncio.ensure_future(self._fetch_and_store(reason))
            inflight.add_done_callback(self._fetch_done)
            self._inflight = inflight
        await self._join()

    def _fetch_done(self, inflight: asyncio.Future[None]) -> None:
        if self._inflight is inflight:
            self._inflight = None

    async def _join(self) -> None:
        inflight = self._inflight
        if inflight is not None:
            # Shielded: one caller giving up (client gone) must not cancel everyone's fetch.
            await asyncio.shield(inflight)

    async def _fetch_and_store(self, reason: str) -> None:
        self.fetches += 1
        started = time.perf_counter()
        try:
            async with asyncio.timeout(FETCH_TIMEOUT):
                keys, ttl = await self._fetch()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any failure is "unreachable": keep the stale set
            self._jwks_uri = self.settings.jwks_uri  # rediscover next time
            self._refresh_at = self._clock() + RETRY_INTERVAL
            log.warning(
                "issuer %s: key set unavailable (%s); %s",
                self.settings.name,
                _describe(exc),
                "serving the cached keys" if self._keys is not None else "no keys yet",
            )
            self._observe(reason, "error", started)
        else:
            self._keys = keys
            self._refresh_at = self._clock() + ttl
            log.info("issuer %s: %d keys, cached %ds", self.settings.name, len(keys.keys), ttl)
            self._observe(reason, "ok", started)

    def _observe(self, reason: str, outcome: str, started: float) -> None:
        if self._observer is not None:
            keys = None if self._keys is None else len(self._keys.keys)
            seconds = time.perf_counter() - started
            self._observer(self.settings.name, reason, outcome, seconds, keys)

    async def _fetch(self) -> tuple[_KeySet, float]:
        uri = self._jwks_uri or await self._discover()
        self._jwks_uri = uri
        body, cache_control = await self._get(uri)
        return _parse_jwks(_json(body)), max_age(cache_control)

    async def _discover(self) -> str:
        url = self.settings.issuer.rstrip("/") + DISCOVERY_PATH  # OIDC Discovery §4
        document = _json((await self._get(url))[0])
        if not isinstance(document, dict) or document.get("issuer") != self.settings.issuer:
            raise JwksUnavailable("the discovery document names another issuer")
        uri = document.get("jwks_uri")
        if not isinstance(uri, str) or not _fetchable(uri, like=self.settings.issuer):
            raise JwksUnavailable("the discovery document has no usable jwks_uri")
        return uri

    async def _get(self, url: str) -> tuple[bytes, str | None]:
        """GET ``url``; redirects are followed only within its own origin."""
        session = self._session
        if not isinstance(session, aiohttp.ClientSession):
            session = session()  # the app's session, made once its event loop runs
        for _ in range(MAX_REDIRECTS + 1):
            async with session.get(
                url, allow_redirects=False, headers={"Accept": "application/json"}
            ) as response:
                if response.status in _REDIRECTS:
                    url = _same_origin_redirect(url, response.headers.get("Location"))
                    continue
                if response.status != 200:
                    raise JwksUnavailable(f"HTTP {response.status}")
                return await _read_limited(response), response.headers.get("Cache-Control")
        raise JwksUnavailable("too many redirects")


def _same_origin_redirect(url: str, location: str | None) -> str:
    if not location:
        raise JwksUnavailable("redirect without Location")
    target = urljoin(url, location)
    if _origin(target) != _origin(url):
        raise JwksUnavailable("redirect to another host refused")
    return target


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise JwksUnavailable("malformed URL") from None
    return parts.scheme.lower(), (parts.hostname or "").lower(), port


def _fetchable(uri: str, *, like: str) -> bool:
    """An absolute http(s) URL, and https whenever the issuer itself is https (no downgrade)."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    return parts.scheme == "https" or urlsplit(like).scheme != "https"


async def _read_limited(response: aiohttp.ClientResponse) -> bytes:
    if response.content_length is not None and response.content_length > MAX_DOCUMENT_BYTES:
        raise JwksUnavailable("document over 1 MiB")
    body = bytearray()
    # Counted after decompression, so a small gzip bomb is cut off at the same limit.
    async for chunk in response.content.iter_any():
        body += chunk
        if len(body) > MAX_DOCUMENT_BYTES:
            raise JwksUnavailable("document over 1 MiB")
    return bytes(body)


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise JwksUnavailable("not JSON") from None


def max_age(cache_control: str | None) -> float:
    """Seconds to cache a key set: ``max-age`` clamped to 1 min .. 24 h, else 10 min."""
    if cache_control is None:
        return DEFAULT_MAX_AGE
    for directive in cache_control.split(","):
        name, _, value = directive.strip().partition("=")
        name = name.strip().lower()
        if name in ("no-store", "no-cache"):
            return MIN_MAX_AGE
        if name == "max-age":
            value = value.strip().strip('"')
            if not value.isascii() or not value.isdigit():
                return DEFAULT_MAX_AGE
            # Compared as text-length first: int() of thousands of digits is slow or refused.
            seconds = int(value) if len(value) <= 12 else int(MAX_MAX_AGE)
            return float(min(max(seconds, int(MIN_MAX_AGE)), int(MAX_MAX_AGE)))
    return DEFAULT_MAX_AGE


def _parse_jwks(document: Any) -> _KeySet:
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise JwksUnavailable("not a JWK set")
    keys, skipped = [], []
    for jwk in document["keys"][:MAX_KEYS]:
        parsed = _parse_jwk(jwk)
        if isinstance(parsed, _Key):
            keys.append(parsed)
        else:
            skipped.append(parsed)
    if not keys:
        # Say why: a provider that publishes key_ops ["sign"] is a common misconfiguration.
        reasons = "; ".join(sorted(set(skipped))) or "the set is empty"
        raise JwksUnavailable(f"no usable signing key ({reasons})")
    return _KeySet(tuple(keys))


def _parse_jwk(jwk: Any) -> _Key | str:
    """One usable verification key, or why this one is skipped (never fatal: others may do)."""
    if not isinstance(jwk, dict):
        return "a key that is not an object"
    if jwk.get("use", "sig") != "sig":
        return "use is not sig"
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return "key_ops without verify"
    kid = jwk.get("kid")
    algorithm = _key_algorithm(jwk)
    if algorithm is None:
        return "an algorithm, type or curve this gateway does not verify"
    if kid is not None and not isinstance(kid, str):
        return "a kid that is not a string"
    kty = jwk["kty"]
    public = {"kty": kty, **{m: jwk[m] for m in _PUBLIC_MEMBERS[kty] if m in jwk}}
    try:
        parsed = jwt.PyJWK(public, algorithm=algorithm)
    except Exception:  # untrusted input: a key that does not parse is skipped, whatever the cause
        return "a key that does not parse"
    if kty == "RSA" and not MIN_RSA_BITS <= parsed.key.key_size <= MAX_RSA_BITS:
        return f"an RSA key outside {MIN_RSA_BITS}-{MAX_RSA_BITS} bits"
    return _Key(kid, algorithm, parsed)


def _key_algorithm(jwk: dict[str, Any]) -> str | None:
    """The key's own algorithm, if it is one we verify and it fits the key's type and curve."""
    kty, crv = jwk.get("kty"), jwk.get("crv")
    algorithm = jwk.get("alg")
    if algorithm is None:
        algorithm = _DEFAULT_ALGORITHM.get((kty, None if kty == "RSA" else crv))
    if not isinstance(algorithm, str) or algorithm not in _ALGORITHMS:
        return None
    want_kty, curves = _ALGORITHMS[algorithm]
    if kty != want_kty or (curves is not None and crv not in curves):
        return None
    return algorithm


def _describe(exc: BaseException) -> str:
    if isinstance(exc, JwksUnavailable):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return "timed out"
    return type(exc).__name__  # aiohttp's messages may carry URLs with credentials


class ExternalVerifier:
    """Verifies access tokens of the configured external issuers, each against its own keys."""

    def __init__(
        self,
        issuers: Sequence[IssuerSettings],
        session: SessionSource,
        clock: Callable[[], float] = time.time,
        default_leeway: float = 30.0,
        observer: FetchObserver | None = None,
    ) -> None:
        self._issuers: dict[str, IssuerKeys] = {}
        for settings in issuers:
            if settings.issuer in self._issuers:
                raise ValueError(f"issuer {settings.issuer!r} is configured twice")
            self._issuers[settings.issuer] = IssuerKeys(settings, session, clock, observer)
        self._clock = clock
        self._default_leeway = float(default_leeway)

    def __repr__(self) -> str:
        return f"ExternalVerifier(issuers={list(self._issuers)!r})"

    @property
    def issuers(self) -> tuple[IssuerKeys, ...]:
        return tuple(self._issuers.values())

    async def prefetch(self) -> None:
        """Fetch every issuer's keys concurrently; never raises."""
        await asyncio.gather(*(keys.prefetch() for keys in self._issuers.values()))

    async def aclose(self) -> None:
        await asyncio.gather(*(keys.aclose() for keys in self._issuers.values()))

    def issuer_for(self, token: object) -> IssuerKeys | None:
        """The issuer named by the token's *unverified* ``iss``; None if none of ours."""
        if not self._issuers:
            return None  # the common case: no payload decoding on every request for nothing
        issuer = _unverified_issuer(token)
        return None if issuer is None else self._issuers.get(issuer)

    async def verify(self, token: str) -> Identity:
        """Raise ``InvalidToken(reason)`` for anything not a valid token of a configured issuer."""
        header = _unverified_header(token)  # size and shape first, before anything else
        keys = self.issuer_for(token)
        if keys is None:
            raise InvalidToken("issuer")
        algorithm = check_header(header, _ALGORITHMS)
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise InvalidToken("malformed")
        candidates = await keys.candidates(kid, algorithm)
        claims = self._decode(token, candidates, keys.settings)
        self._check_times(claims, keys.settings)
        settings = keys.settings
        return identity_from_claims(
            claims,
            issuer=settings.issuer,
            mapping=settings.claims,
            leeway=self._leeway(settings),
            token=token,
        )

    def _decode(
        self, token: str, candidates: Sequence[_Key], settings: IssuerSettings
    ) -> dict[str, Any]:
        # Signatures are checked before claims, so only a signature failure means "try the
        # next key" (several only for a kid-less token or a duplicated kid).
        for key in candidates:
            try:
                return verify_signed(
                    token,
                    key.jwk.Algorithm,
                    key.jwk.key,
                    issuer=settings.issuer,
                    audience=settings.audience,
                    required=_REQUIRED_CLAIMS,
                )
            except InvalidToken as refused:
                if refused.reason != "signature":
                    raise
        raise InvalidToken("signature")

    def _check_times(self, claims: dict[str, Any], settings: IssuerSettings) -> None:
        check_times(claims, now=self._clock(), leeway=self._leeway(settings))

    def _leeway(self, settings: IssuerSettings) -> float:
        return self._default_leeway if settings.leeway is None else float(settings.leeway)


def _unverified_issuer(token: object) -> str | None:
    """The ``iss`` of a well-shaped token, unverified: it only chooses whose keys to try."""
    try:
        _unverified_header(token)
    except InvalidToken:
        return None
    if not isinstance(token, str):  # already refused above; narrows the type
        return None
    segment = token.split(".")[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (binascii.Error, ValueError, RecursionError):
        return None
    issuer = claims.get("iss") if isinstance(claims, dict) else None
    return issuer if isinstance(issuer, str) else None
