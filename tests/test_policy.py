"""gateway.policy: a route's auth mode applied to the credential presented."""

from __future__ import annotations

import pytest

from gateway.config import RouteSettings
from gateway.errors import InsufficientScope, InvalidToken, Unauthorized
from gateway.identity import Identity
from gateway.policy import bearer_token, evaluate

ALICE = Identity(id="u1", issuer="http://gw", roles=("user",))


def verify(token: str) -> Identity:
    if token == "good":
        return ALICE
    raise InvalidToken("signature")


def route(auth: str, roles: tuple[str, ...] = ()) -> RouteSettings:
    return RouteSettings(
        name="r", path="/r", upstreams=("http://127.0.0.1:1",), auth=auth, roles=roles
    )  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("headers", "token"),
    [
        ([], None),
        (["Bearer abc"], "abc"),
        (["bearer   abc  "], "abc"),
        (["Bearer\tabc"], "abc"),  # a tab separates the scheme too (RFC 9110 §11.4)
        (["Basic dXNlcjpwYXNz"], None),  # meant for the upstream, not a credential of ours
        (["Digest x"], None),
    ],
)
def test_bearer_token(headers: list[str], token: str | None) -> None:
    assert bearer_token(headers) == token


@pytest.mark.parametrize(
    "headers", [["Bearer"], ["Bearer   "], ["Bearer\t"], ["Bearer a", "Bearer b"]]
)
def test_malformed_bearer_is_an_invalid_token(headers: list[str]) -> None:
    with pytest.raises(InvalidToken):
        bearer_token(headers)


@pytest.mark.parametrize(
    ("auth", "token", "outcome"),
    [
        ("public", None, None),
        ("public", "bad", None),  # never examined
        ("optional", None, None),
        ("optional", "good", ALICE),
        ("optional", "bad", InvalidToken),  # presented and bad: still 401
        ("required", "good", ALICE),
        ("required", None, Unauthorized),
        ("required", "bad", InvalidToken),
    ],
)
def test_evaluate(auth: str, token: str | None, outcome: object) -> None:
    if isinstance(outcome, type):
        with pytest.raises(outcome):  # type: ignore[call-overload]
            evaluate(route(auth), token, verify)
    else:
        assert evaluate(route(auth), token, verify) == outcome


def test_missing_role_is_insufficient_scope() -> None:
    with pytest.raises(InsufficientScope):
        evaluate(route("required", roles=("admin",)), "good", verify)
    assert evaluate(route("required", roles=("admin", "user")), "good", verify) == ALICE


def test_no_credential_401_carries_no_error_code() -> None:
    with pytest.raises(Unauthorized) as caught:
        evaluate(route("required"), None, verify)
    assert caught.value.bearer_error is None  # RFC 6750 §3.1: no error without a token
