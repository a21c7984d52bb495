"""The gateway's own endpoints (CONTRACT §4): accounts, discovery, health.

Each handler parses its input, calls one service method and shapes the JSON answer. Token
responses carry ``Cache-Control: no-store``; account bodies are read with a small limit.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from gateway.accounts import AccountService, TokenPair
from gateway.config import Settings
from gateway.errors import InvalidInput, PayloadTooLarge, ServiceUnavailable, UnsupportedMediaType
from gateway.identity import Identity
from gateway.policy import bearer_token, require_identity
from gateway.tokens import KeyRing, TokenService

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ClientIp = Callable[[web.Request], str]

# Account requests are tiny; refusing big ones early keeps JSON parsing cheap and bounded.
MAX_JSON_BODY = 64 * 1024
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request's JSON object, or a 400/413/415 saying what is wrong with it."""
    if request.content_type != "application/json":
        raise UnsupportedMediaType("This endpoint takes Content-Type: application/json.")
    if request.content_length is not None and request.content_length > MAX_JSON_BODY:
        raise PayloadTooLarge(f"The body must be at most {MAX_JSON_BODY} bytes.")
    raw = await request.content.read(MAX_JSON_BODY + 1)
    if len(raw) > MAX_JSON_BODY:
        raise PayloadTooLarge(f"The body must be at most {MAX_JSON_BODY} bytes.")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise InvalidInput("The body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise InvalidInput("The body must be a JSON object.")
    return body


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
        verify_handler: Handler,
    ) -> None:
        self.settings = settings
        self.accounts = accounts
        self.tokens = tokens
        self.keyring = keyring
        self.client_ip = client_ip
        p = settings.accounts.prefix
        self.table: dict[str, dict[str, Handler]] = {
            f"{p}/register": {"POST": self.register},
            f"{p}/login": {"POST": self.login},
            f"{p}/refresh": {"POST": self.refresh},
            f"{p}/logout": {"POST": self.logout},
            f"{p}/profile": {"GET": self.profile},
            f"{p}/password": {"POST": self.password},
            f"{p}/verify": {"GET": verify_handler},
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
        user = await self.accounts.profile(self._identity(request).id)
        return web.json_response(user.public(), headers=NO_STORE)

    async def password(self, request: web.Request) -> web.Response:
        identity = self._identity(request)
        body = await read_json(request)
        await self.accounts.change_password(
            identity.id, body.get("current_password"), body.get("new_password")
        )
        return web.Response(status=204, headers=NO_STORE)

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
        try:
            await self.accounts.ping()
        except Exception as exc:  # any failure to reach the store means "not ready"
            raise ServiceUnavailable("The account database is not reachable.") from exc
        return web.json_response({"status": "ready"}, headers=NO_STORE)
