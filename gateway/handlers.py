"""The gateway's own endpoints (CONTRACT §4): accounts, discovery, health.

Each handler parses its input, calls one service method and shapes the JSON answer. Token
responses carry ``Cache-Control: no-store``; account bodies are read with a small limit.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import StreamReader, web

from gateway import openapi
from gateway.accounts import AccountService, TokenPair
from gateway.config import Settings
from gateway.errors import (
    InvalidInput,
    PayloadTooLarge,
    ServiceUnavailable,
    Unauthorized,
    UnsupportedMediaType,
)
from gateway.identity import Identity
from gateway.policy import bearer_token, require_identity
from gateway.tokens import KeyRing, TokenService

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ClientIp = Callable[[web.Request], str]
Identify = Callable[[str], Awaitable[Identity]]

# Account requests are tiny; refusing big ones early keeps JSON parsing cheap and bounded.
MAX_JSON_BODY = 64 * 1024
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request's JSON object, or a 400/413/415 saying what is wrong with it.

    Only ``application/json`` in UTF-8 (RFC 8259 §8.1) is read: a declared Latin-1 body whose
    bytes also happen to be valid UTF-8 would otherwise be read as different text than the
    client meant. The body is read to its end but never past ``MAX_JSON_BODY``, whatever the
    framing (Content-Length or chunked).
    """
    if request.content_type != "application/json":
        raise UnsupportedMediaType("This endpoint takes Content-Type: application/json.")
    charset = request.charset
    if charset is not None and charset.lower() not in ("utf-8", "utf8"):
        raise UnsupportedMediaType("JSON bodies must be UTF-8.")
    if request.content_length is not None and request.content_length > MAX_JSON_BODY:
        raise PayloadTooLarge(f"The body must be at most {MAX_JSON_BODY} bytes.")
    return parse_json_object(await _read_limited(request.content, MAX_JSON_BODY))


async def _read_limited(content: StreamReader, limit: int) -> bytes:
    """The whole body, or ``PayloadTooLarge`` as soon as it exceeds ``limit``.

    ``StreamReader.read(n)`` returns whatever has arrived (up to n bytes), not n bytes: one
    call would see half of a body sent in several segments.
    """
    chunks: list[bytes] = []
    size = 0
    while chunk := await content.read(limit + 1 - size):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"The body must be at most {limit} bytes.")
    return b"".join(chunks)


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """Strict JSON: one object, UTF-8 (a leading BOM is ignored, as RFC 8259 allows), no
    duplicate keys, no ``NaN``/``Infinity``. Nesting too deep for the parser is a 400.

    Duplicate keys are refused because parsers disagree on which copy wins: a filter in
    front of us might check the first ``email`` while we would use the last.
    """
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8) :]
    try:
        text = raw.decode("utf-8")  # strict: no overlong forms, no encoded surrogates
    except UnicodeDecodeError:
        raise InvalidInput("The body must be JSON in UTF-8.") from None
    try:
        body = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise InvalidInput("The body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise InvalidInput("The body must be a JSON object.")
    return body


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise InvalidInput("The body repeats a key.")  # which one is not echoed
    return obj


def _no_constant(name: str) -> Any:
    raise InvalidInput("The body is not valid JSON.")  # NaN, Infinity: not JSON (RFC 8259 §6)


def external_profile(identity: Identity) -> dict[str, Any]:
    return {
        "id": identity.id,
        "email": identity.email,
        "name": identity.name,
        "roles": list(identity.roles),
        "created_at": None,
        "issuer": identity.issuer,
    }


def token_response(pair: TokenPair) -> web.Response:
    return web.json_response(
        {
            "access_token": pair.access_token,
            "token_type": "Bearer",
            "expires_in": pair.expires_in,
            "refresh_token": pair.refresh_token,
            # The classic register/login/profile API read these two.
            "auth": True,
            "token": pair.access_token,
        },
        headers=NO_STORE,
    )


class OwnEndpoints:
    """Handlers for ``{p}/...`` and ``/.well-known/...``, keyed by canonical path."""

    def __init__(
        self,
        *,
        settings: Settings,
        accounts: AccountService,
        tokens: TokenService,
        keyring: KeyRing,
        client_ip: ClientIp,
        identify: Identify,
        verify_handler: Handler,
        is_draining: Callable[[], bool] = lambda: False,
    ) -> None:
        self.settings = settings
        self.is_draining = is_draining
        self.accounts = accounts
        self.tokens = tokens
        self.keyring = keyring
        self.client_ip = client_ip
        self.identify = identify
        p = settings.accounts.prefix
        # Rendered once: the document depends only on the configuration.
        self._openapi = json.dumps(openapi.document(settings)).encode()
        self.table: dict[str, dict[str, Handler]] = {
            f"{p}/register": {"POST": self.register},
            f"{p}/login": {"POST": self.login},
            f"{p}/refresh": {"POST": self.refresh},
            f"{p}/logout": {"POST": self.logout},
            f"{p}/profile": {"GET": self.profile},
            f"{p}/password": {"POST": self.password},
            f"{p}/verify": {"GET": verify_handler},
            f"{p}/openapi.json": {"GET": self.openapi_document},
            "/.well-known/jwks.json": {"GET": self.jwks},
            "/.well-known/openid-configuration": {"GET": self.openid_configuration},
            "/healthz": {"GET": self.healthz},
            "/readyz": {"GET": self.readyz},
        }
        # Every GET also answers HEAD, as any HTTP server would.
        for methods in self.table.values():
            if "GET" in methods:
                methods["HEAD"] = methods["GET"]

    def _identity(self, request: web.Request) -> Identity:
        """A local account's identity: only our own tokens change our own accounts."""
        token = bearer_token(request.headers.getall("Authorization", []))
        return require_identity(token, self.tokens.verify)

    async def register(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        user = await self.accounts.register(
            body.get("email"),
            body.get("password"),
            body.get("name"),
            client_ip=self.client_ip(request),
        )
        return web.json_response(user.public(), status=201, headers=NO_STORE)

    async def login(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        pair = await self.accounts.login(
            body.get("email"), body.get("password"), client_ip=self.client_ip(request)
        )
        return token_response(pair)

    async def refresh(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        return token_response(await self.accounts.refresh(body.get("refresh_token")))

    async def logout(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        if body.get("all") is True:
            await self.accounts.logout_all(self._identity(request).id)
        else:
            await self.accounts.logout(body.get("refresh_token"))
        return web.Response(status=204, headers=NO_STORE)

    async def profile(self, request: web.Request) -> web.Response:
        token = bearer_token(request.headers.getall("Authorization", []))
        if token is None:
            raise Unauthorized("A bearer token is required.")
        identity = await self.identify(token)
        if identity.issuer != self.settings.tokens.issuer:
            # An external issuer's user has no account here: the verified claims are the profile.
            return web.json_response(external_profile(identity), headers=NO_STORE)
        user = await self.accounts.profile(identity.id)
        return web.json_response(user.public(), headers=NO_STORE)

    async def password(self, request: web.Request) -> web.Response:
        identity = self._identity(request)
        body = await read_json(request)
        await self.accounts.change_password(
            identity.id, body.get("current_password"), body.get("new_password")
        )
        return web.Response(status=204, headers=NO_STORE)

    async def openapi_document(self, request: web.Request) -> web.Response:
        """``GET {p}/openapi.json``: the OpenAPI 3.1 document of these endpoints."""
        return web.Response(
            body=self._openapi,
            content_type="application/json",
            headers={"Cache-Control": "public, max-age=300"},
        )

    async def jwks(self, request: web.Request) -> web.Response:
        return web.json_response(
            self.keyring.jwks(), headers={"Cache-Control": "public, max-age=300"}
        )

    async def openid_configuration(self, request: web.Request) -> web.Response:
        base = self.settings.server.public_url.rstrip("/")
        p = self.settings.accounts.prefix
        return web.json_response(
            {
                "issuer": self.settings.tokens.issuer,
                "jwks_uri": f"{base}/.well-known/jwks.json",
                "id_token_signing_alg_values_supported": [self.settings.tokens.algorithm],
                "registration_endpoint": f"{base}{p}/register",
                "token_endpoint": f"{base}{p}/login",
                "refresh_endpoint": f"{base}{p}/refresh",
                "revocation_endpoint": f"{base}{p}/logout",
                "userinfo_endpoint": f"{base}{p}/profile",
                "password_endpoint": f"{base}{p}/password",
                "verify_endpoint": f"{base}{p}/verify",
            },
            headers={"Cache-Control": "public, max-age=300"},
        )

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"}, headers=NO_STORE)

    async def readyz(self, request: web.Request) -> web.Response:
        if self.is_draining():
            raise ServiceUnavailable("The gateway is shutting down.")
        try:
            await self.accounts.ping()
        except Exception as exc:  # any failure to reach the store means "not ready"
            raise ServiceUnavailable("The account database is not reachable.") from exc
        return web.json_response({"status": "ready"}, headers=NO_STORE)
