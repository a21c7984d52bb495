"""Email comparison, route authorization and identities from claims (gateway.identity)."""

from __future__ import annotations

import base64
import json
import unicodedata
from typing import Any

import pytest

from gateway import identity
from gateway.config import ClaimMapping, RouteSettings
from gateway.errors import InsufficientScope, InvalidInput, InvalidToken
from gateway.identity import (
    Identity,
    TokenClaims,
    authorize,
    claim_value,
    identity_from_claims,
    normalize_email,
)

# -- normalize_email ---------------------------------------------------------------------

NORMALIZED = [
    # (raw, email, key)
    ("alice@example.com", "alice@example.com", "alice@example.com"),
    ("  Alice@Example.COM \n", "Alice@Example.COM", "alice@example.com"),
    ("\u3000bob@example.com\u3000", "bob@example.com", "bob@example.com"),  # ideographic space
    ("root@localhost", "root@localhost", "root@localhost"),
    ("root@LocalHost", "root@LocalHost", "root@localhost"),
    # NFKC: the Kelvin sign is K, fullwidth letters are ASCII, ligatures split
    ("\u212aelvin@example.com", "Kelvin@example.com", "kelvin@example.com"),
    ("\uff41\uff4c\uff49\uff43\uff45@example.com", "alice@example.com", "alice@example.com"),
    ("\ufb01le@example.com", "file@example.com", "file@example.com"),
    ("a\uff20example.com", "a@example.com", "a@example.com"),  # fullwidth @ is an @
    # casefold: dotless i stays dotless, dotted capital I keeps its dot, sharp s is ss
    ("\u0131@example.com", "\u0131@example.com", "\u0131@example.com"),
    ("I@example.com", "I@example.com", "i@example.com"),
    ("\u0130@example.com", "\u0130@example.com", "i\u0307@example.com"),
    ("stra\u00dfe@example.de", "stra\u00dfe@example.de", "strasse@example.de"),
    ("\u00c9milie@exemple.fr", "\u00c9milie@exemple.fr", "\u00e9milie@exemple.fr"),
    ("E\u0301milie@exemple.fr", "\u00c9milie@exemple.fr", "\u00e9milie@exemple.fr"),
    ("user+tag@sub.example.co.uk", "user+tag@sub.example.co.uk", "user+tag@sub.example.co.uk"),
    ("x@" + "a" * 249 + ".io", "x@" + "a" * 249 + ".io", "x@" + "a" * 249 + ".io"),  # 254
]


@pytest.mark.parametrize(("raw", "email", "key"), NORMALIZED)
def test_normalize_email(raw: str, email: str, key: str) -> None:
    assert normalize_email(raw) == (email, key)


def test_lookalikes_share_a_key() -> None:
    keys = {normalize_email(raw)[1] for raw in ("kelvin@x.io", "KELVIN@X.IO", "\u212aelvin@x.io")}
    assert keys == {"kelvin@x.io"}
    assert normalize_email("\u0131@x.io")[1] != normalize_email("i@x.io")[1]


# Unicode 15.1 DerivedCoreProperties.txt, Default_Ignorable_Code_Point, as published.
DEFAULT_IGNORABLE = (
    [0x00AD, 0x034F, 0x061C, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x3164, 0xFEFF, 0xFFA0]
    + list(range(0x180B, 0x1810))
    + list(range(0x200B, 0x2010))
    + list(range(0x202A, 0x202F))
    + list(range(0x2060, 0x2070))
    + list(range(0xFE00, 0xFE10))
    + list(range(0xFFF0, 0xFFF9))
    + list(range(0x1BCA0, 0x1BCA4))
    + list(range(0x1D173, 0x1D17B))
    + list(range(0xE0000, 0xE1000))
)


@pytest.mark.parametrize("position", ["start", "middle", "before-at", "domain"])
def test_no_default_ignorable_code_point_is_accepted(position: str) -> None:
    """Every one of them, wherever it stands: none can make a lookalike of an address."""
    for code in DEFAULT_IGNORABLE:
        ch = chr(code)
        raw = {
            "start": f"{ch}alice@example.com",
            "middle": f"al{ch}ice@example.com",
            "before-at": f"alice{ch}@example.com",
            "domain": f"alice@exa{ch}mple.com",
        }[position]
        with pytest.raises(InvalidInput):
            normalize_email(raw)


def test_the_key_is_a_fixed_point() -> None:
    """Comparing keys is safe only if a key, typed in as an address, is its own key: for
    every assigned code point, an address holding the key's form (or the decomposed form)
    has the same key. Otherwise the folded spelling of an address would be another account."""
    import sys
    import unicodedata

    for code in range(sys.maxunicode + 1):
        ch = chr(code)
        changes = ch.casefold() != ch or unicodedata.normalize("NFKD", ch) != ch
        if not (changes or unicodedata.combining(ch)):
            continue  # nothing to fold, compose or decompose: its own key trivially
        try:
            _, key = normalize_email(f"a{ch}@x.io")
        except InvalidInput:
            continue
        assert normalize_email(key)[1] == key, hex(code)
        assert normalize_email(unicodedata.normalize("NFD", f"a{ch}@x.io"))[1] == key, hex(code)


REFUSED_EMAILS: list[Any] = [
    "",
    "   ",
    "alice",
    "alice@",
    "@example.com",
    "a@b@example.com",
    "alice@example",
    "alice@.com",
    "alice@example.",
    "alice@example..com",
    "al ice@example.com",
    "alice@exa mple.com",
    "alice\t@example.com",
    "alice@example.com\x00",
    "ali\x00ce@example.com",
    "ali\rce@example.com",
    "alice\u0085@example.com",  # C1 control
    "ali\u200bce@example.com",  # zero-width space
    "ali\u200dce@example.com",  # zero-width joiner
    "ali\u202ece@example.com",  # right-to-left override
    "\ufeffalice@example.com",  # byte order mark
    "ali\u00a0ce@example.com",  # no-break space
    "ali\u2028ce@example.com",  # line separator
    "ali\ud800ce@example.com",  # lone surrogate
    "ali\U000e0001ce@example.com",  # language tag (format)
    # default-ignorable but not format: render as nothing, so they would make lookalikes
    "alice\u034f@example.com",  # combining grapheme joiner (Mn)
    "alice\ufe0f@example.com",  # variation selector-16 (Mn)
    "alice\U000e0100@example.com",  # variation selector-17 (Mn)
    "ali\u180bce@example.com",  # Mongolian free variation selector (Mn)
    "ali\u17b4ce@example.com",  # Khmer inherent vowel (Mn)
    "ali\u3164ce@example.com",  # Hangul filler (Lo; NFKC makes it U+1160, also refused)
    "ali\uffa0ce@example.com",  # halfwidth Hangul filler (Lo)
    "\u115falice@example.com",  # Hangul choseong filler (Lo)
    "x@" + "a" * 250 + ".io",  # 255 characters
    None,
    b"alice@example.com",
    42,
    ["alice@example.com"],
]


@pytest.mark.parametrize("raw", REFUSED_EMAILS)
def test_normalize_email_refuses(raw: Any) -> None:
    with pytest.raises(InvalidInput):
        normalize_email(raw)


# -- authorize ---------------------------------------------------------------------------


def guarded(
    roles: tuple[str, ...] = (),
    scopes: tuple[str, ...] = (),
    claims: tuple[tuple[str, object], ...] = (),
) -> RouteSettings:
    return RouteSettings(
        name="r",
        path="/r",
        upstreams=("http://127.0.0.1:9000",),
        roles=roles,
        scopes=scopes,
        claims=claims,
    )


def caller(
    roles: tuple[str, ...] = (),
    scopes: tuple[str, ...] = (),
    claims: dict[str, Any] | None = None,
) -> Identity:
    return Identity(
        id="u1", issuer="http://issuer", roles=roles, scopes=frozenset(scopes), claims=claims or {}
    )


TOKEN_CLAIMS = {
    "tenant": "acme",
    "level": 3,
    "admin": True,
    "org": {"id": "o-1", "tier": {"name": "gold"}},
    "https://example.com/team": "blue",
    "groups": ["a", "b"],
}

ALLOWED = [
    (guarded(), caller()),
    (guarded(roles=("admin", "ops")), caller(roles=("user", "ops"))),
    (guarded(scopes=("read", "write")), caller(scopes=("write", "read", "extra"))),
    (guarded(claims=(("tenant", "acme"),)), caller(claims=TOKEN_CLAIMS)),
    (guarded(claims=(("level", 3), ("admin", True))), caller(claims=TOKEN_CLAIMS)),
    (guarded(claims=(("org.id", "o-1"),)), caller(claims=TOKEN_CLAIMS)),
    (guarded(claims=(("org.tier.name", "gold"),)), caller(claims=TOKEN_CLAIMS)),
    (guarded(claims=(("https://example.com/team", "blue"),)), caller(claims=TOKEN_CLAIMS)),
    (guarded(claims=(("groups", ("a", "b")),)), caller(claims=TOKEN_CLAIMS)),
    (
        guarded(roles=("admin",), scopes=("read",), claims=(("tenant", "acme"),)),
        caller(roles=("admin",), scopes=("read",), claims=TOKEN_CLAIMS),
    ),
]


@pytest.mark.parametrize(("route", "identity"), ALLOWED)
def test_authorize_allows(route: RouteSettings, identity: Identity) -> None:
    authorize(route, identity)


DENIED = [
    # (route, identity, words the detail must name)
    (guarded(roles=("admin", "ops")), caller(roles=("user",)), ["admin", "ops"]),
    (guarded(roles=("admin",)), caller(roles=("Admin",)), ["admin"]),
    (guarded(scopes=("read", "write")), caller(scopes=("read",)), ["write"]),
    (guarded(scopes=("read",)), caller(), ["read"]),
    (guarded(claims=(("tenant", "acme"),)), caller(claims={"tenant": "evil"}), ["tenant"]),
    (guarded(claims=(("tenant", "acme"),)), caller(), ["tenant"]),
    # exact: no coercion between bool, int, float and str
    (guarded(claims=(("admin", True),)), caller(claims={"admin": 1}), ["admin"]),
    (guarded(claims=(("level", 1),)), caller(claims={"level": True}), ["level"]),
    (guarded(claims=(("level", 3),)), caller(claims={"level": 3.0}), ["level"]),
    (guarded(claims=(("level", 3),)), caller(claims={"level": "3"}), ["level"]),
    (guarded(claims=(("groups", ("a",)),)), caller(claims={"groups": ["a", "b"]}), ["groups"]),
    (guarded(claims=(("groups", ("a",)),)), caller(claims={"groups": "a"}), ["groups"]),
    (guarded(claims=(("org.id", "o-1"),)), caller(claims={"org": "o-1"}), ["org.id"]),
    (guarded(claims=(("org.id", "o-1"),)), caller(claims={"org": {"id": "o-2"}}), ["org.id"]),
    (
        guarded(roles=("admin",), scopes=("read",), claims=(("tenant", "acme"),)),
        caller(roles=("admin",), claims={"tenant": "acme"}),
        ["read"],
    ),
]


@pytest.mark.parametrize(("route", "identity", "named"), DENIED)
def test_authorize_denies(route: RouteSettings, identity: Identity, named: list[str]) -> None:
    with pytest.raises(InsufficientScope) as caught:
        authorize(route, identity)
    for word in named:
        assert word in caught.value.detail


def test_authorize_never_echoes_claim_values() -> None:
    identity = caller(claims={"tenant": "SECRET-VALUE-123", "org": {"id": "SECRET-ORG"}})
    route = guarded(claims=(("tenant", "acme"), ("org.id", "o-1")))
    with pytest.raises(InsufficientScope) as caught:
        authorize(route, identity)
    assert "SECRET" not in caught.value.detail
    assert "tenant" in caught.value.detail and "org.id" in caught.value.detail


def test_claim_value() -> None:
    assert claim_value(TOKEN_CLAIMS, "org.tier.name") == "gold"
    assert claim_value(TOKEN_CLAIMS, "org.nope") is None
    assert claim_value(TOKEN_CLAIMS, "tenant.x", "default") == "default"
    assert claim_value({"a.b": 1, "a": {"b": 2}}, "a.b") == 1


# -- identity_from_claims ----------------------------------------------------------------

ISSUER = "http://localhost:8080"


def test_identity_from_local_claims() -> None:
    claims = {
        "sub": "0b8a6a66-4a3e-4c7a-9d43-35a1b0b0c9f1",
        "email": " Alice@Example.COM",
        "name": "Alice Liddell",
        "roles": ["user", "admin", "user"],
        "scope": "read write",
        "scp": ["extra"],
        "tenant": "acme",
    }
    identity = identity_from_claims(claims, issuer=ISSUER)
    assert identity == Identity(
        id="0b8a6a66-4a3e-4c7a-9d43-35a1b0b0c9f1",
        issuer=ISSUER,
        email="Alice@Example.COM",
        name="Alice Liddell",
        roles=("user", "admin"),
        scopes=frozenset({"read", "write", "extra"}),
    )
    assert identity.claims["tenant"] == "acme"
    with pytest.raises(TypeError):
        identity.claims["tenant"] = "other"  # type: ignore[index]


def test_identity_from_mapped_claims() -> None:
    claims = {
        "oid": "external|123",
        "mail": "bob@example.com",
        "realm_access": {"roles": "dev ops  dev"},
        "scp": "a b",
    }
    mapping = ClaimMapping(id="oid", email="mail", name="display", roles="realm_access.roles")
    identity = identity_from_claims(claims, issuer="https://idp", mapping=mapping)
    assert (identity.id, identity.email, identity.name) == ("external|123", "bob@example.com", None)
    assert identity.roles == ("dev", "ops")
    assert identity.scopes == frozenset({"a", "b"})
    assert identity.issuer == "https://idp"


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"email": None, "name": None, "roles": None},
        {"name": ""},
        {"roles": []},
        {"roles": ""},
        {"scope": ""},
    ],
)
def test_identity_from_minimal_claims(extra: dict[str, Any]) -> None:
    identity = identity_from_claims({"sub": "s", **extra}, issuer=ISSUER)
    assert (identity.email, identity.name, identity.roles, identity.scopes) == (
        None,
        None,
        (),
        frozenset(),
    )


MALFORMED = [
    {},
    {"sub": ""},
    {"sub": 42},
    {"sub": None},
    {"sub": ["a"]},
    {"sub": "a\nb"},
    {"sub": "a\x00"},
    {"sub": "s", "roles": "admin,user"},
    {"sub": "s", "roles": ["admin,user"]},
    {"sub": "s", "roles": ["admin user"]},
    {"sub": "s", "roles": ["admin\tuser"]},
    {"sub": "s", "roles": ["ad\nmin"]},
    {"sub": "s", "roles": ["ad\u200bmin"]},
    {"sub": "s", "roles": ["admin\u00a0"]},
    {"sub": "s", "roles": [""]},
    {"sub": "s", "roles": [1]},
    {"sub": "s", "roles": [["admin"]]},
    {"sub": "s", "roles": {"admin": True}},
    {"sub": "s", "roles": "admin\tops"},
    {"sub": "s", "roles": 7},
    {"sub": "s", "email": "not-an-email"},
    {"sub": "s", "email": "a@b"},
    {"sub": "s", "email": "ali\u200bce@example.com"},
    {"sub": "s", "email": ["a@example.com"]},
    {"sub": "s", "email": 1},
    {"sub": "s", "name": "Eve\r\nX-User-Id: admin"},
    {"sub": "s", "name": 5},
    {"sub": "s", "name": ["Eve"]},
    {"sub": "s", "scope": 5},
    {"sub": "s", "scope": "a\x00b"},
    {"sub": "s", "scp": [1]},
    {"sub": "s", "scp": {"a": 1}},
]


@pytest.mark.parametrize("claims", MALFORMED)
def test_identity_from_malformed_claims(claims: dict[str, Any]) -> None:
    with pytest.raises(InvalidToken) as caught:
        identity_from_claims(claims, issuer=ISSUER)
    assert caught.value.reason == "malformed_claims"
    # the refused values are never echoed
    assert "admin" not in caught.value.detail and "Eve" not in caught.value.detail


# -- the ASCII fast paths answer exactly as the Unicode checks ---------------------------------


@pytest.mark.parametrize("code", range(128))
def test_ascii_fast_paths_agree_with_the_unicode_checks(code: int) -> None:
    ch = chr(code)
    for text in (ch, f"a{ch}b"):
        assert identity._holds_invisible(text) == any(
            identity._invisible_in_email(c) for c in text
        ), repr(text)
        assert identity._has_control(text) == any(
            unicodedata.category(c) in ("Cc", "Cs") for c in text
        ), repr(text)
        slow_role = (
            bool(text)
            and "," not in text
            and not any(c.isspace() for c in text)
            and not any(unicodedata.category(c) in ("Cc", "Cs", "Cf") for c in text)
        )
        assert identity._valid_role(text) == slow_role, repr(text)


def test_a_tokens_claims_are_read_from_its_payload_when_asked() -> None:
    payload = base64.urlsafe_b64encode(json.dumps(TOKEN_CLAIMS).encode()).rstrip(b"=").decode()
    claims = TokenClaims(f"e30.{payload}.sig")
    assert dict(claims) == TOKEN_CLAIMS and len(claims) == len(TOKEN_CLAIMS)
    assert claim_value(claims, "org.tier.name", None) == "gold"
    identity = identity_from_claims(
        {**TOKEN_CLAIMS, "sub": "u1"}, issuer="i", token=f"e30.{payload}.x"
    )
    authorize(guarded(claims=(("tenant", "acme"),)), identity)  # read from the token's payload
