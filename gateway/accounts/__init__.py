"""Accounts: users, refresh-token families and failure counters, behind one store protocol."""

from __future__ import annotations

from gateway.accounts.models import RefreshRecord, TokenPair, User
from gateway.accounts.service import AccountService
from gateway.accounts.store import (
    AccountStore,
    StoreError,
    StoreUnavailable,
    UnsupportedDatabase,
    open_store,
)

__all__ = [
    "AccountService",
    "AccountStore",
    "RefreshRecord",
    "StoreError",
    "StoreUnavailable",
    "TokenPair",
    "UnsupportedDatabase",
    "User",
    "open_store",
]
