"""``gateway explain``: the decisions the running gateway would take for one request.

It uses the same canonicalization, route table, policy and header rules as the request
path, so what it says is what the gateway does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import yarl

from gateway import headers as hdr
from gateway.config import RouteSettings, Settings
from gateway.errors import GatewayError, InvalidToken
from gateway.identity import Identity
from gateway.policy import evaluate
from gateway.routing import RouteTable, canonical_path, upstream_url
from gateway.tokens import KeyRing, TokenService


def explain(settings: Settings, method: str, url: str, *, token: str | None) -> list[str]:
    return list(_steps(settings, method, url, token))


def _steps(settings: Settings, method: str, url: str, token: str | None) -> Iterator[str]:
    target = yarl.URL(url, encoded=True)
    if not target.is_absolute():
        target = yarl.URL(settings.server.public_url.rstrip("/") + url, encoded=True)
    yield f"request:  {method} {target}"
    try:
        path = canonical_path(target.raw_path or "/")
        yield f"path:     {path}"
        own = _own_endpoint(settings, path)
        if own:
            yield f"handled:  by the gateway itself ({own})"
            return
        match = RouteTable(settings.routes).match(method, target.raw_host, path)
        route = match.route
        yield (
            f"route:    {route.name} (path {route.path}, host {route.host or '*'}, "
            f"auth {route.auth})"
        )
        identity = _identity(settings, route, token)
        yield "policy:   pass" + (f" as {identity.id}" if identity else " (no identity)")
        base = route.upstreams[0]
        forwarded = upstream_url(base, match.upstream_path, target.raw_query_string)
        yield f"forward:  {method} {forwarded}"
        if identity is not None:
            for name, value in hdr.identity_header_values(settings.headers, identity):
                yield f"header:   {name}: {value}"
    except GatewayError as err:
        yield f"refused:  {err.status} {err.title}: {err.detail}"


def _identity(settings: Settings, route: RouteSettings, token: str | None) -> Identity | None:
    if route.auth == "public":
        token = None
    # Keys are loaded only when there is a token to check: explaining never creates keys.
    verify = _verifier(settings) if token is not None else _unused_verifier
    return evaluate(route, token, verify)


def _verifier(settings: Settings) -> Callable[[str], Identity]:
    tokens = TokenService(settings.tokens, KeyRing.load(settings.tokens, create=False))
    return tokens.verify


def _unused_verifier(token: str) -> Identity:
    raise InvalidToken("malformed")


def _own_endpoint(settings: Settings, path: str) -> str | None:
    p = settings.accounts.prefix
    own = {
        f"{p}/{name}"
        for name in ("register", "login", "refresh", "logout", "profile", "password", "verify")
    }
    own |= {"/.well-known/jwks.json", "/.well-known/openid-configuration", "/healthz", "/readyz"}
    return path if path in own else None
