"""The OpenAPI 3.1 document of the gateway's own endpoints (CONTRACT §4), as this gateway serves it.

``gateway/openapi.yaml`` (shipped as package data; ``docs/openapi.yaml`` is the same file) is
written for the defaults. ``document(settings)`` returns a fresh copy rewritten for one
configuration, so that a client generated from ``{p}/openapi.json`` calls the right URLs:
the server URL is ``server.public_url``, paths under ``/auth`` move to ``accounts.prefix``,
the forward-auth response lists the configured identity headers, and new passwords carry the
configured minimum length.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import yaml

from gateway.config import HeaderSettings, Settings

__all__ = ["DEFAULT_PREFIX", "document", "load"]

DEFAULT_PREFIX = "/auth"
RESOURCE = "openapi.yaml"

# HeaderSettings field -> the component describing that identity header's value.
IDENTITY_HEADER_COMPONENTS = {
    "id": "IdentityId",
    "email": "IdentityEmail",
    "name": "IdentityName",
    "roles": "IdentityRoles",
    "issuer": "IdentityIssuer",
    "assertion": "IdentityAssertion",
}


def load() -> dict[str, Any]:
    """The document as written, for the default configuration."""
    text = resources.files("gateway").joinpath(RESOURCE).read_text(encoding="utf-8")
    doc: dict[str, Any] = yaml.safe_load(text)
    return doc


def document(settings: Settings) -> dict[str, Any]:
    """The document for ``settings``; a new object on every call."""
    doc = load()
    prefix = settings.accounts.prefix
    doc["servers"] = [{"url": settings.server.public_url, "description": "server.public_url"}]
    doc["paths"] = {_moved(path, prefix): item for path, item in doc["paths"].items()}
    _identity_headers(doc, prefix, settings.headers)
    doc["components"]["schemas"]["NewPassword"]["minLength"] = settings.accounts.password_min_length
    return doc


def _moved(path: str, prefix: str) -> str:
    """``/auth/x`` under ``prefix`` (``""`` puts it at the root); other paths unchanged."""
    if path.startswith(DEFAULT_PREFIX + "/"):
        return prefix + path[len(DEFAULT_PREFIX) :]
    return path


def _identity_headers(doc: dict[str, Any], prefix: str, configured: HeaderSettings) -> None:
    """Replace the default identity header names on the verify response by the configured ones."""
    headers = doc["paths"][f"{prefix}/verify"]["get"]["responses"]["200"]["headers"]
    defaults = HeaderSettings()
    for field in IDENTITY_HEADER_COMPONENTS:
        default_name = getattr(defaults, field)
        if default_name:
            headers.pop(default_name, None)
    for field, component in IDENTITY_HEADER_COMPONENTS.items():
        name = getattr(configured, field)
        if name:
            headers[name] = {"$ref": f"#/components/headers/{component}"}
