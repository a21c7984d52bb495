"""Policy: a route's ``auth`` mode applied to the credential a request presents.

Guarantee: an identity is returned only for a token that verified; ``public`` routes never
examine credentials; ``optional`` routes still refuse a credential that is presented and bad.
"""

from __future__ import annotations

from collections.abc import Callable

from gateway.config import RouteSettings
from gateway.errors import InvalidToken, Unauthorized
from gateway.identity import Identity, authorize

Verifier = Callable[[str], Identity]


def bearer_token(authorization: list[str]) -> str | None:
    """The bearer token of the request's ``Authorization`` headers, or None if none is offered.

    A non-Bearer scheme (e.g. Basic meant for the upstream) is no credential of ours. Two
    ``Authorization`` headers, or an empty bearer, are a malformed credential.
    """
    if not authorization:
        return None
    if len(authorization) > 1:
        raise InvalidToken("malformed", "Exactly one Authorization header is allowed.")
    # The scheme ends at the first run of spaces or tabs (RFC 9110 §11.4 allows either, and
    # an upstream that splits on any whitespace must not see a token we did not check).
    parts = authorization[0].strip(" \t").split(None, 1)
    if not parts or parts[0].lower() != "bearer":
        return None
    token = parts[1].strip(" \t") if len(parts) > 1 else ""
    if not token:
        raise InvalidToken("malformed", "The bearer token is empty.")
    return token


def require_identity(token: str | None, verify: Verifier) -> Identity:
    """The identity behind ``token``; 401 without one (RFC 6750 §3.1: no error code)."""
    if token is None:
        raise Unauthorized("A bearer token is required.")
    return verify(token)


def decide(route: RouteSettings, identity: Identity | None) -> Identity | None:
    """Apply ``route.auth`` (CONTRACT §3) to the identity of an already verified token (None:
    no token offered); raises 401/403 errors, returns the identity to inject."""
    if route.auth == "public":
        return None
    if identity is None:
        if route.auth == "optional":
            return None
        raise Unauthorized("A bearer token is required.")
    authorize(route, identity)
    return identity


def evaluate(route: RouteSettings, token: str | None, verify: Verifier) -> Identity | None:
    """``decide`` with a synchronous verifier: the whole policy in one call."""
    identity = verify(token) if token is not None and route.auth != "public" else None
    return decide(route, identity)
