"""The account service: register, login, refresh rotation, logout, password, admin.

What it guarantees:

- Login gives one answer (``InvalidCredentials``, one detail) for an unknown email, a wrong
  password and a disabled account, after exactly one bcrypt check in every case.
- Failed logins are limited per client IP and, separately, per account (``email_key``, also
  for emails that have no account, so probing gains nothing), counted in the store so the
  limit holds across workers. An attempt is recorded *before* the password is checked and
  the count includes it, so concurrent attempts cannot overrun the limit; a locked caller gets
  ``TooManyRequests`` before any password check. A successful login withdraws only its own
  attempt: it resets neither counter, so a user logging in regularly cannot make room for
  someone guessing at the same account. IPv6 clients are counted per /64, since one host
  typically owns a whole /64.
- Refresh tokens are opaque (``secrets.token_urlsafe(32)``) and stored only as SHA-256 hex.
  Each login starts a family; rotation spends the presented token atomically and adds a new
  one to the family. A family's lifetime is absolute: ``tokens.refresh_ttl`` from login,
  never extended by rotation (re-authentication is required at least that often).
- Presenting a spent token revokes the whole family (OAuth 2.0 Security BCP, RFC 9700
  §4.14.2), unless it was spent less than ``tokens.refresh_reuse_grace`` ago (parallel tabs
  racing on one token), in which case the family continues.
- Disabling a user or changing the password revokes every refresh token of the user; a login
  racing with either is revoked too (it re-reads the user after starting its family).
- Everything time-dependent reads the injected clock.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import secrets
import time
import unicodedata
import uuid
from collections.abc import Callable

from gateway.accounts.models import RefreshRecord, TokenPair, User
from gateway.accounts.store import AccountStore
from gateway.config import AccountSettings, Rate, TokenSettings
from gateway.errors import (
    InvalidCredentials,
    InvalidInput,
    InvalidToken,
    NotFound,
    RegistrationClosed,
    TooManyRequests,
)
from gateway.identity import normalize_email
from gateway.passwords import PasswordHasher, check_policy
from gateway.tokens import TokenService

MAX_NAME_LENGTH = 200
MAX_ROLE_LENGTH = 100
MAX_REFRESH_TOKEN_LENGTH = 512  # ours are 43 characters; anything huge is not ours

BAD_CREDENTIALS = "The email or password is incorrect."
BAD_REFRESH = "The refresh token is invalid or expired."
WRONG_CURRENT_PASSWORD = "The current password is incorrect."

# Zero-width (non-)joiners are format characters that real names need (Indic and Persian
# scripts, emoji sequences); every other invisible or line-breaking character is refused.
_NAME_ALLOWED_FORMAT = frozenset({"\u200c", "\u200d"})
_NAME_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


class AccountService:
    def __init__(
        self,
        store: AccountStore,
        hasher: PasswordHasher,
        tokens: TokenService,
        accounts: AccountSettings,
        token_settings: TokenSettings,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._hasher = hasher
        self._tokens = tokens
        self._accounts = accounts
        self._token_settings = token_settings
        self._clock = clock

    def __repr__(self) -> str:
        return f"AccountService({self._store!r})"

    async def ping(self) -> None:
        """Raise ``StoreUnavailable`` unless the account database answers (for /readyz)."""
        await self._store.ping()

    # --- self-service ------------------------------------------------------------------------

    async def register(
        self, email: object, password: object, name: object, *, client_ip: str
    ) -> User:
        """Create an account with the default roles. Every attempt counts against the
        client IP's ``register_rate_limit``, including refused ones."""
        if self._accounts.registration != "open":
            raise RegistrationClosed("Registration is closed.")
        await self._admit((_key("register:ip", _ip_bucket(client_ip)),), self._register_rate)
        address, email_key = normalize_email(_text(email, "email"))
        valid_password = check_policy(password, self._accounts.password_min_length)
        return await self._create(
            address, email_key, valid_password, _clean_name(name), self._accounts.default_roles
        )

    async def login(self, email: object, password: object, *, client_ip: str) -> TokenPair:
        raw_email = _text(email, "email")
        candidate = _text(password, "password")
        try:
            email_key: str | None = normalize_email(raw_email)[1]
        except InvalidInput:
            email_key = None  # no account can have it: counted per IP only
        keys = [_key("login:ip", _ip_bucket(client_ip))]
        if email_key is not None:
            keys.append(_key("login:account", email_key))
        attempt = await self._admit(keys, self._login_rate)
        user = await self._store.get_user_by_email(email_key) if email_key else None
        # One bcrypt check whatever happens: unknown users are verified against a dummy.
        matches = await self._hasher.verify(candidate, user.password_hash if user else None)
        if user is None or user.disabled or not matches:
            raise InvalidCredentials(BAD_CREDENTIALS)  # the attempt stays counted
        await self._withdraw(attempt)
        return await self._start_session(user)

    async def refresh(self, refresh_token: object) -> TokenPair:
        """Rotate: spend the presented token, return a new pair of the same family."""
        token = _text(refresh_token, "refresh_token")
        now = self._clock()
        token_hash = _digest(token)
        record = await self._usable_refresh(token, token_hash, now)
        user = await self._active_user(record.user_id, reason="invalid_refresh", detail=BAD_REFRESH)
        if record.spent_at is None and await self._store.spend_refresh(token_hash, now):
            return await self._issue(user, record.family_id, record.expires_at, now)
        # Spent before, or by a concurrent request just now: look again.
        record = await self._usable_refresh(token, token_hash, now)
        grace = self._token_settings.refresh_reuse_grace
        # abs(): another replica's clock (or a racing request that read the clock first) may
        # be behind the spend; a negative age must not pass for "within grace" when grace is 0.
        if record.spent_at is not None and abs(now - record.spent_at) < grace:
            return await self._issue(user, record.family_id, record.expires_at, now)
        await self._store.revoke_family(record.family_id, now)
        raise InvalidToken("refresh_reuse", BAD_REFRESH)

    async def logout(self, refresh_token: object) -> None:
        """End the session (refresh-token family) behind a token. An unknown, spent or
        expired token is not an error (RFC 7009 §2.2)."""
        token = _text(refresh_token, "refresh_token")
        if not token or len(token) > MAX_REFRESH_TOKEN_LENGTH:
            return
        record = await self._store.get_refresh(_digest(token))
        if record is not None:
            await self._store.revoke_family(record.family_id, self._clock())

    async def logout_all(self, user_id: str) -> None:
        await self._store.revoke_user_refresh(user_id, self._clock())

    async def profile(self, user_id: str) -> User:
        return await self._active_user(user_id, reason="unknown_user")

    async def change_password(self, user_id: str, current: object, new: object) -> None:
        """Wrong ``current`` is ``InvalidInput`` (400, per the contract) and counts against the
        account's login limit, so a stolen access token cannot brute-force the password."""
        user = await self._active_user(user_id, reason="unknown_user")
        current_password = _text(current, "current_password")
        new_password = check_policy(new, self._accounts.password_min_length)
        attempt = await self._admit((_key("login:account", user.email_key),), self._login_rate)
        if not await self._hasher.verify(current_password, user.password_hash):
            raise InvalidInput(WRONG_CURRENT_PASSWORD)
        await self._withdraw(attempt)
        password_hash = await self._hasher.hash(new_password)
        # Hash first, then revoke: a login racing with this sees the new hash and revokes itself.
        await self._store.update_user(user.id, password_hash=password_hash)
        await self._store.revoke_user_refresh(user.id, self._clock())

    # --- administration (the CLI) ------------------------------------------------------------

    async def add_user(
        self,
        email: str,
        password: str,
        *,
        name: str | None,
        roles: tuple[str, ...] | None,
    ) -> User:
        address, email_key = normalize_email(_text(email, "email"))
        valid_password = check_policy(password, self._accounts.password_min_length)
        chosen = self._accounts.default_roles if roles is None else validate_roles(roles)
        return await self._create(address, email_key, valid_password, _clean_name(name), chosen)

    async def list_users(self) -> list[User]:
        return await self._store.list_users()

    async def set_disabled(self, email: str, disabled: bool) -> User:
        """Disable (revoking every refresh token) or enable an account."""
        user = await self._by_email(email)
        updated = await self._store.update_user(user.id, disabled=disabled)
        if disabled:
            await self._store.revoke_user_refresh(user.id, self._clock())
        return _found(updated)

    async def set_roles(self, email: str, roles: tuple[str, ...]) -> User:
        """Replace the whole role list (takes effect in access tokens issued from now on)."""
        chosen = validate_roles(roles)
        user = await self._by_email(email)
        return _found(await self._store.update_user(user.id, roles=chosen))

    async def prune(self) -> None:
        """Housekeeping: forget rate events outside every window and expired refresh tokens.
        Safe to call at any time, from any worker."""
        now = self._clock()
        window = max(self._login_rate.per, self._register_rate.per)
        await self._store.prune_events(now - window)
        await self._store.prune_refresh(now)

    # --- internals -----------------------------------------------------------------------------

    @property
    def _login_rate(self) -> Rate:
        return self._accounts.login_rate_limit

    @property
    def _register_rate(self) -> Rate:
        return self._accounts.register_rate_limit

    async def _create(
        self, email: str, email_key: str, password: str, name: str | None, roles: tuple[str, ...]
    ) -> User:
        # The hash is computed before the INSERT: no account ever exists without it.
        password_hash = await self._hasher.hash(password)
        user = User(
            id=str(uuid.uuid4()),
            email=email,
            email_key=email_key,
            name=name,
            roles=tuple(roles),
            password_hash=password_hash,
            created_at=self._clock(),
        )
        await self._store.create_user(user)  # EmailTaken from the UNIQUE constraint
        return user

    async def _admit(self, keys: tuple[str, ...] | list[str], rate: Rate) -> list[str]:
        """Record one attempt under each key, then refuse if any key is over its limit.

        Recording first makes the check safe under concurrency: the k-th attempt to be
        recorded counts at least k, so at most ``rate.count`` attempts per window get through.
        A refused attempt is withdrawn, so hammering does not extend the lock-out.
        """
        now = self._clock()
        attempt = [await self._store.record_event(key, now) for key in keys]
        wait = 0.0
        for key in keys:
            count, oldest = await self._store.count_events(key, now - rate.per)
            if count > rate.count:
                oldest_at = now if oldest is None else oldest
                wait = max(wait, oldest_at + rate.per - now)
        if wait > 0:
            await self._withdraw(attempt)
            raise TooManyRequests(math.ceil(wait), "Too many attempts; try again later.")
        return attempt

    async def _withdraw(self, attempt: list[str]) -> None:
        for event_id in attempt:
            await self._store.discard_event(event_id)

    async def _start_session(self, user: User) -> TokenPair:
        now = self._clock()
        family_id = str(uuid.uuid4())
        pair = await self._issue(user, family_id, now + self._token_settings.refresh_ttl, now)
        # A password change or disable may have landed since the check: both write the user
        # first and revoke second, so reading the user after creating the family closes the race.
        fresh = await self._store.get_user(user.id)
        if fresh is None or fresh.disabled or fresh.password_hash != user.password_hash:
            await self._store.revoke_family(family_id, now)
            raise InvalidCredentials(BAD_CREDENTIALS)
        return pair

    async def _issue(self, user: User, family_id: str, expires_at: float, now: float) -> TokenPair:
        refresh_token = secrets.token_urlsafe(32)
        await self._store.add_refresh(
            RefreshRecord(
                token_hash=_digest(refresh_token),
                user_id=user.id,
                family_id=family_id,
                created_at=now,
                expires_at=expires_at,
            )
        )
        access_token, expires_in = self._tokens.issue_access_token(
            user_id=user.id, email=user.email, name=user.name, roles=user.roles
        )
        return TokenPair(access_token, expires_in, refresh_token)

    async def _usable_refresh(self, token: str, token_hash: str, now: float) -> RefreshRecord:
        if not token or len(token) > MAX_REFRESH_TOKEN_LENGTH:
            raise InvalidToken("invalid_refresh", BAD_REFRESH)
        record = await self._store.get_refresh(token_hash)
        if record is None or record.revoked or record.expires_at <= now:
            raise InvalidToken("invalid_refresh", BAD_REFRESH)
        return record

    async def _active_user(self, user_id: str, *, reason: str, detail: str | None = None) -> User:
        user = await self._store.get_user(user_id)
        if user is None or user.disabled:
            raise InvalidToken(reason, detail)
        return user

    async def _by_email(self, email: str) -> User:
        email_key = normalize_email(_text(email, "email"))[1]
        return _found(await self._store.get_user_by_email(email_key))


def validate_roles(roles: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Role names as tokens and the comma-joined roles header can carry them: non-empty, no
    ``,``, whitespace, control or format characters. Duplicates are dropped, order kept."""
    for role in roles:
        if not isinstance(role, str) or not _valid_role(role):
            raise InvalidInput(
                "role names must be 1 to 100 characters without commas, whitespace"
                " or control characters"
            )
    return tuple(dict.fromkeys(roles))


def _valid_role(role: str) -> bool:
    return (
        0 < len(role) <= MAX_ROLE_LENGTH
        and "," not in role
        and not any(ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf", "Cs") for ch in role)
    )


def _text(value: object, field: str) -> str:
    """A JSON string that can be stored as UTF-8 (JSON allows lone surrogates; we do not)."""
    if not isinstance(value, str):
        raise InvalidInput(f"{field} must be a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(f"{field} must be valid Unicode text") from None
    return value


def _clean_name(value: object) -> str | None:
    """Optional display name: trimmed, at most 200 characters, nothing invisible."""
    if value is None:
        return None
    name = _text(value, "name").strip()
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidInput(f"name must be at most {MAX_NAME_LENGTH} characters")
    for ch in name:
        if ch not in _NAME_ALLOWED_FORMAT and unicodedata.category(ch) in _NAME_REFUSED_CATEGORIES:
            raise InvalidInput("name must not contain control or invisible characters")
    return name or None


def _found(user: User | None) -> User:
    if user is None:
        raise NotFound("No such user.")
    return user


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _key(kind: str, value: str) -> str:
    """An event key; the value is hashed so the table holds no email addresses."""
    return f"{kind}:{hashlib.sha256(value.encode('utf-8')).hexdigest()}"


def _ip_bucket(client_ip: str) -> str:
    """The unit a per-IP limit counts: the address, or its /64 for IPv6."""
    try:
        address = ipaddress.ip_address(client_ip)
    except ValueError:
        return client_ip  # not an address (a test client, a unix socket): count it as given
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))
    return str(address)
