"""Account records as the service and the stores exchange them.

Records are frozen values. Secrets never show in a repr: ``password_hash``, the refresh
token's hash and both tokens of a ``TokenPair`` are left out of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime


def iso_utc(timestamp: float) -> str:
    """Unix seconds as ISO-8601 UTC with a ``Z`` and whole seconds: ``2026-11-29T20:45:00Z``."""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class User:
    id: str  # UUID string
    email: str  # as given (normalized)
    email_key: str  # casefolded: what uniqueness compares
    name: str | None
    roles: tuple[str, ...]
    password_hash: str | None = field(repr=False)  # None: the account cannot log in by password
    created_at: float  # unix seconds
    disabled: bool = False

    def public(self) -> dict[str, object]:
        """The JSON body of register/profile: ``{id, email, name, roles, created_at}``."""
        return {
            "id": self.id,
            "email": self.email,
            "name": self.name,
            "roles": list(self.roles),
            "created_at": iso_utc(self.created_at),
        }


@dataclass(frozen=True)
class RefreshRecord:
    """One refresh token of a family (one login session).

    ``expires_at`` is the family's absolute end: rotation never extends it.
    ``revoked`` is true once the family was revoked (logout, reuse, disable, password change).
    """

    # sha256 hex of the opaque token; the token itself is never stored
    token_hash: str = field(repr=False)
    user_id: str
    family_id: str
    created_at: float
    expires_at: float
    spent_at: float | None = None
    revoked: bool = False


@dataclass(frozen=True)
class TokenPair:
    access_token: str = field(repr=False)
    expires_in: int
    refresh_token: str = field(repr=False)
