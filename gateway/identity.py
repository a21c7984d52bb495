"""Identity: who a verified caller is, what they may do, and how email addresses compare.

Identity values are built only from verified token claims or from the account store;
nothing here trusts request headers. A malformed identity claim refuses the whole token
(CONTRACT §5): nothing half-valid reaches an upstream's identity headers. Errors name what
is missing by its configured name, never a value taken from a token.
"""

from __future__ import annotations

import base64
import json
import re
import sys
import types
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.config import ClaimMapping, RouteSettings
from gateway.errors import InsufficientScope, InvalidInput, InvalidToken
from gateway.memo import Memo

__all__ = [
    "NO_CLAIMS",
    "Identity",
    "TokenClaims",
    "normalize_email",
    "authorize",
    "identity_from_claims",
    "claim_value",
]

MAX_EMAIL_LENGTH = 254  # RFC 5321 §4.5.3.1.3, the longest usable forward-path
# Unicode categories never allowed in an email: controls, format characters (zero-width,
# bidi overrides), separators, lone surrogates, unassigned code points (NFKC is only stable
# for assigned ones).
_EMAIL_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Cn", "Zs", "Zl", "Zp"})
# Unicode's Default_Ignorable_Code_Point (DerivedCoreProperties.txt): rendered as nothing,
# so "kate\u034f@example.com" would show exactly as "kate@example.com" while being another
# account. Most are format characters (Cf, refused above); these ranges also hold the
# combining grapheme joiner, variation selectors and Hangul fillers, which are not.
_DEFAULT_IGNORABLE: tuple[tuple[int, int], ...] = (
    (0x00AD, 0x00AD),
    (0x034F, 0x034F),
    (0x061C, 0x061C),
    (0x115F, 0x1160),
    (0x17B4, 0x17B5),
    (0x180B, 0x180F),
    (0x200B, 0x200F),
    (0x202A, 0x202E),
    (0x2060, 0x206F),
    (0x3164, 0x3164),
    (0xFE00, 0xFE0F),
    (0xFEFF, 0xFEFF),
    (0xFFA0, 0xFFA0),
    (0xFFF0, 0xFFF8),
    (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A),
    (0xE0000, 0xE0FFF),
)
_MISSING = object()
_NO_SCOPES: frozenset[str] = frozenset()  # one for every identity without scopes
_ROLE_SETS: Memo[tuple[str, ...], tuple[str, ...]] = Memo(lambda roles: roles)
NO_CLAIMS: Mapping[str, Any] = types.MappingProxyType({})

# ASCII fast paths of the Unicode checks below (tests prove them equal on all of ASCII).
_ASCII_VISIBLE = re.compile(r"[\x21-\x7e]+")  # no whitespace, no control character
_ASCII_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ASCII_ROLE = re.compile(r"[\x21-\x2b\x2d-\x7e]+")  # visible, and no ","


@dataclass(frozen=True, slots=True)
class Identity:
    id: str
    issuer: str
    email: str | None = None
    name: str | None = None
    roles: tuple[str, ...] = ()
    scopes: frozenset[str] = frozenset()
    claims: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    # (``claims`` of a verified token: a ``TokenClaims``, decoded only when a route reads it.)
    # The identity headers as a gateway rendered them (one block of lines), and the settings
    # they were rendered for: set once by the gateway that first forwards this identity (it
    # is immutable else). Two fields, not a tuple: thousands of identities are cached.
    rendered: bytes | None = field(default=None, compare=False, repr=False)
    rendered_for: Any = field(default=None, compare=False, repr=False)
    # When the token behind it stops passing verification (exp + leeway); None: not a token.
    valid_until: float | None = field(default=None, compare=False, repr=False)


class TokenClaims(Mapping[str, Any]):
    """The claims of a verified token, decoded again from its payload segment the first
    time they are read. The verified-token cache holds thousands of identities and only
    routes with ``claims`` rules read them: a decoded dict each would triple the memory an
    entry takes."""

    __slots__ = ("_payload", "_claims")

    def __init__(self, token: str) -> None:
        self._payload = token.split(".")[1]
        self._claims: dict[str, Any] | None = None

    def _decoded(self) -> dict[str, Any]:
        if self._claims is None:
            padded = self._payload + "=" * (-len(self._payload) % 4)
            claims = json.loads(base64.urlsafe_b64decode(padded))
            self._claims = {sys.intern(k): v for k, v in claims.items()}
        return self._claims

    def __getitem__(self, name: str) -> Any:
        return self._decoded()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._decoded())

    def __len__(self) -> int:
        return len(self._decoded())


def normalize_email(raw: str) -> tuple[str, str]:
    """Trim, NFKC-normalize and validate an email (CONTRACT §4).

    Returns ``(email, key)`` where ``key = email.casefold()`` is what uniqueness and lookups
    compare. Raises ``InvalidInput`` for anything not of the contract's shape.
    """
    if not isinstance(raw, str):
        raise InvalidInput("The email address must be a string.")
    email = raw.strip()
    if not email.isascii():  # NFKC and the invisible checks only change or find non-ASCII
        email = unicodedata.normalize("NFKC", email)
    if not email or len(email) > MAX_EMAIL_LENGTH:
        raise InvalidInput(f"The email address must be 1 to {MAX_EMAIL_LENGTH} characters.")
    if _holds_invisible(email):
        raise InvalidInput("The email address holds whitespace or invisible characters.")
    local, at, domain = email.partition("@")
    if not at or "@" in domain or not local:
        raise InvalidInput("The email address must be of the form name@domain.")
    if not _valid_domain(domain):
        raise InvalidInput("The email address's domain is not valid.")
    return email, email.casefold()


def _holds_invisible(text: str) -> bool:
    if text.isascii():  # the same answer as the loop below, at regex speed
        return not _ASCII_VISIBLE.fullmatch(text)
    return any(_invisible_in_email(ch) for ch in text)


def _invisible_in_email(ch: str) -> bool:
    """Whitespace, controls, format characters, unassigned code points and anything else
    that renders as nothing: a character that could make two addresses look identical."""
    if ch.isspace() or unicodedata.category(ch) in _EMAIL_REFUSED_CATEGORIES:
        return True
    code = ord(ch)
    return any(low <= code <= high for low, high in _DEFAULT_IGNORABLE)


def _valid_domain(domain: str) -> bool:
    """``localhost``, or at least two non-empty dot-separated labels."""
    if domain.casefold() == "localhost":
        return True
    labels = domain.split(".")
    return len(labels) >= 2 and all(labels)


def claim_value(claims: Mapping[str, Any], name: str, default: Any = None) -> Any:
    """The claim ``name``, else the nested value at its dotted path; ``default`` if neither.

    The exact name wins so that namespaced claims (``https://example.com/roles``) work.
    """
    if name in claims:
        return claims[name]
    value: Any = claims
    for part in name.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return default
        value = value[part]
    return value


def _strictly_equal(expected: object, actual: object) -> bool:
    """Equality without Python's coercions: ``True`` is not ``1``, ``"1"`` is not ``1``."""
    if isinstance(expected, Mapping):
        return (
            isinstance(actual, Mapping)
            and expected.keys() == actual.keys()
            and all(_strictly_equal(v, actual[k]) for k, v in expected.items())
        )
    if isinstance(expected, Sequence) and not isinstance(expected, str):
        return (
            isinstance(actual, Sequence)
            and not isinstance(actual, str)
            and len(expected) == len(actual)
            and all(_strictly_equal(e, a) for e, a in zip(expected, actual, strict=True))
        )
    return type(expected) is type(actual) and expected == actual


def authorize(route: RouteSettings, identity: Identity) -> None:
    """Raise ``InsufficientScope`` unless ``identity`` has any of the route's roles, all of
    its scopes and exactly its claim values."""
    problems: list[str] = []
    if route.roles and not set(route.roles) & set(identity.roles):
        problems.append("one of the roles " + ", ".join(route.roles))
    missing_scopes = [s for s in route.scopes if s not in identity.scopes]
    if missing_scopes:
        problems.append("the scopes " + ", ".join(missing_scopes))
    # Only claim names: the values come from the token and are never echoed.
    wrong_claims = [
        name
        for name, expected in route.claims
        if not _strictly_equal(expected, claim_value(identity.claims, name, _MISSING))
    ]
    if wrong_claims:
        problems.append("the required value of the claims " + ", ".join(wrong_claims))
    if problems:
        raise InsufficientScope("This route requires " + "; ".join(problems) + ".")


def identity_from_claims(
    claims: Mapping[str, Any],
    *,
    issuer: str,
    mapping: ClaimMapping | None = None,
    leeway: float | None = None,
    token: str | None = None,
) -> Identity:
    """The identity in verified ``claims`` (CONTRACT §5), or ``InvalidToken("malformed_claims")``.

    ``mapping`` names the claims of an external issuer (dotted paths allowed); the default
    is the gateway's own (``sub``, ``email``, ``name``, ``roles``). Scopes come from
    ``scope`` and ``scp`` (each a space-separated string or a list of strings). With the
    ``token`` they were decoded from, the identity keeps that instead (``TokenClaims``).
    """
    mapping = mapping or ClaimMapping()
    subject = claim_value(claims, mapping.id, _MISSING)
    if not isinstance(subject, str) or not subject or _has_control(subject):
        raise InvalidToken("malformed_claims")
    return Identity(
        id=subject,
        issuer=issuer,
        email=_email_claim(claim_value(claims, mapping.email, _MISSING)),
        name=_name_claim(claim_value(claims, mapping.name, _MISSING)),
        roles=_roles_claim(claim_value(claims, mapping.roles, _MISSING)),
        scopes=_scopes(claims),
        # The verified token's own claims, or a read-only copy of ``claims``.
        claims=TokenClaims(token) if token is not None else types.MappingProxyType(dict(claims)),
        valid_until=_valid_until(claims.get("exp"), leeway),
    )


def _valid_until(exp: Any, leeway: float | None) -> float | None:
    if leeway is None or isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    return float(exp) + leeway


def _has_control(text: str) -> bool:
    if text.isascii():
        return _ASCII_CONTROL.search(text) is not None
    return any(unicodedata.category(ch) in ("Cc", "Cs") for ch in text)


def _email_claim(value: Any) -> str | None:
    if value is _MISSING or value is None:
        return None
    if not isinstance(value, str):
        raise InvalidToken("malformed_claims")
    try:
        return normalize_email(value)[0]
    except InvalidInput:
        raise InvalidToken("malformed_claims") from None


def _name_claim(value: Any) -> str | None:
    if value is _MISSING or value is None or value == "":
        return None
    if not isinstance(value, str) or _has_control(value):
        raise InvalidToken("malformed_claims")
    return value


def _roles_claim(value: Any) -> tuple[str, ...]:
    """Roles from a list of strings or one space-separated string, duplicates dropped."""
    if value is _MISSING or value is None:
        return ()
    if isinstance(value, str):
        value = [part for part in value.split(" ") if part]
    if not isinstance(value, list) or not all(isinstance(r, str) and _valid_role(r) for r in value):
        raise InvalidToken("malformed_claims")
    # A handful of role sets are shared by thousands of cached identities: one tuple each.
    return _ROLE_SETS[tuple(sys.intern(role) for role in dict.fromkeys(value))]


def _valid_role(role: str) -> bool:
    # "," would split one role into two in the comma-joined roles header.
    if role.isascii():
        return _ASCII_ROLE.fullmatch(role) is not None
    return (
        bool(role)
        and "," not in role
        and not any(ch.isspace() for ch in role)
        and not (_has_control(role) or any(unicodedata.category(ch) == "Cf" for ch in role))
    )


def _scopes(claims: Mapping[str, Any]) -> frozenset[str]:
    scopes: list[str] = []
    for name in ("scope", "scp"):
        value = claims.get(name)
        if value is None:
            continue
        if isinstance(value, str):
            value = value.split(" ")
        elif not isinstance(value, list):
            raise InvalidToken("malformed_claims")
        if not all(isinstance(s, str) and not _has_control(s) for s in value):
            raise InvalidToken("malformed_claims")
        scopes.extend(s for s in value if s)
    return frozenset(scopes) if scopes else _NO_SCOPES
