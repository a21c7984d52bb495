"""A third-party verifier accepts the gateway's identity assertion, and only the genuine one.

The npm package ``jose`` (tests/node/verify_assertion.mjs) stands for a backend written without
any of the gateway's code: it knows the gateway's JWKS URL, its issuer and its own origin, and
nothing else (issue 4, acceptance 4). The assertion is the one the real echo upstream received
through the real gateway. Every refused variant has a verified twin at the same clock, so a
refusal is caused by the one change made, and each pins jose's error code.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives import serialization
from jwt.algorithms import RSAAlgorithm

from tests.blackbox.client import Account, get_echo, received, signed_in
from tests.blackbox.conftest import (
    Echo,
    Gateway,
    launch_gateway,
    start_process,
    stop_process,
    wait_until_up,
)

HEADER = "X-Identity-Assertion"
EXTRA = f"headers: {{assertion: {HEADER}}}"
ROOT = Path(__file__).resolve().parents[2]
NODE_DIR = ROOT / "tests" / "node"
VERIFIER = NODE_DIR / "verify_assertion.mjs"
NODE_TIMEOUT = 20.0
OTHER_ORIGIN = "http://127.0.0.1:1"


# --- the verifier -------------------------------------------------------------------------


def node() -> str:
    found = shutil.which("node")
    # A missing peer fails loudly: a skipped third-party check would prove nothing.
    assert found, "node is not on PATH (scripts/test installs the test peers)"
    assert (NODE_DIR / "node_modules" / "jose").is_dir(), "jose missing: run scripts/test"
    return found


def jose(gw: Gateway, audience: str, *args: str, stdin: str = "") -> list[dict[str, Any]]:
    """Run the verifier; one parsed result per token. Exit 2/3 (usage, crash) fail the test."""
    command = [node(), str(VERIFIER), "--jwks", jwks_url(gw)]
    command += ["--issuer", gw.url, "--audience", audience, *args]
    done = subprocess.run(
        command, input=stdin, capture_output=True, text=True, timeout=NODE_TIMEOUT, cwd=NODE_DIR
    )
    assert done.returncode in (0, 1), (
        f"verifier broke ({done.returncode}): {done.stdout}{done.stderr}"
    )
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert done.returncode == (0 if all(r["ok"] for r in results) else 1), done.stdout
    return results


def jose_batch(gw: Gateway, audience: str, checks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Several checks in one node process (one JWKS fetch): the file stays fast."""
    stdin = "".join(json.dumps(check) + "\n" for check in checks)
    results = jose(gw, audience, "--batch", stdin=stdin)
    assert len(results) == len(checks), results
    return results


def jwks_url(gw: Gateway) -> str:
    return f"{gw.url}/.well-known/jwks.json"


# --- getting an assertion through the real gateway ----------------------------------------


async def assertion_for(session: aiohttp.ClientSession, gw: Gateway, account: Account) -> str:
    # A client-sent copy must be replaced, never passed on next to the gateway's.
    headers = {**account.bearer, HEADER: "forged.by.client"}
    status, echo = await get_echo(session, f"{gw.url}/api/x", headers)
    assert status == 200, echo
    [assertion] = received(echo, HEADER)
    return assertion


@dataclass
class Issued:
    gw: Gateway
    echo: Echo
    account: Account
    assertion: str
    jwks: dict[str, Any] = field(repr=False)

    @property
    def parts(self) -> tuple[dict[str, Any], dict[str, Any], str]:
        head, payload, signature = self.assertion.split(".")
        return decode_segment(head), decode_segment(payload), signature

    @property
    def iat(self) -> int:
        return int(self.parts[1]["iat"])


async def issue(gw: Gateway, echo: Echo) -> Issued:
    async with aiohttp.ClientSession() as s:
        account = await signed_in(s, gw.url, tag="jose")
        assertion = await assertion_for(s, gw, account)
        async with s.get(jwks_url(gw)) as resp:
            jwks = await resp.json()
    return Issued(gw, echo, account, assertion, jwks)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, echo_upstream: Echo) -> Iterator[Gateway]:
    # One gateway for the read-only checks below (fresh_gateway is per test; its settings).
    gateway = launch_gateway(tmp_path_factory.mktemp("jose-gw"), echo_upstream, extra=EXTRA)
    yield gateway
    stop_process(gateway.proc)


@pytest.fixture(scope="module")
def issued(gw: Gateway, echo_upstream: Echo) -> Issued:
    return asyncio.run(issue(gw, echo_upstream))


# --- forging ------------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def decode_segment(segment: str) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    )
    return value


def encode_segment(value: dict[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def with_payload(token: str, **changes: Any) -> str:
    """The genuine header and signature over a changed payload."""
    head, payload, signature = token.split(".")
    return f"{head}.{encode_segment({**decode_segment(payload), **changes})}.{signature}"


def with_header(token: str, **changes: Any) -> str:
    head, payload, signature = token.split(".")
    return f"{encode_segment({**decode_segment(head), **changes})}.{payload}.{signature}"


def with_signature(token: str, signature: str) -> str:
    head, payload, _ = token.split(".")
    return f"{head}.{payload}.{signature}"


def flipped_signature(token: str) -> str:
    # A middle character: the last one of an RS256 signature partly holds padding bits only.
    signature = token.split(".")[2]
    i = len(signature) // 2
    flipped = signature[:i] + ("A" if signature[i] != "A" else "B") + signature[i + 1 :]
    return with_signature(token, flipped)


def public_pem(issued: Issued) -> bytes:
    kid = issued.parts[0]["kid"]
    [jwk] = [k for k in issued.jwks["keys"] if k["kid"] == kid]
    key = RSAAlgorithm.from_jwk(jwk)
    return key.public_bytes(  # type: ignore[union-attr]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def hs256_with_public_key(issued: Issued) -> str:
    """RFC 8725 §2.1 algorithm confusion: the same claims, HMAC'd with the public key as secret
    (signed by hand: PyJWT rightly refuses a PEM as an HMAC secret)."""
    header, claims, _ = issued.parts
    signing_input = f"{encode_segment({**header, 'alg': 'HS256'})}.{encode_segment(claims)}"
    mac = hmac.new(public_pem(issued), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


# --- the table ----------------------------------------------------------------------------

# Every check runs at this offset from ``iat`` unless it says otherwise: well inside the 60 s,
# and independent of how long the suite took to get here.
INSIDE = 30


@dataclass(frozen=True)
class Case:
    token: Callable[[Issued], str]
    code: str | None  # None: verified
    claim: str | None = None
    at: int = INSIDE
    overrides: Mapping[str, Any] = field(default_factory=dict)  # the verifier's own settings


CASES: dict[str, Case] = {
    # Positive controls: the same token and clock the refusals below use.
    "genuine, 30 s after issue": Case(lambda i: i.assertion, None),
    "genuine, in its last second": Case(lambda i: i.assertion, None, at=59),
    "replayed after 60 s": Case(lambda i: i.assertion, "ERR_JWT_EXPIRED", "exp", at=61),
    "presented before it was issued": Case(
        lambda i: i.assertion, "ERR_JWT_CLAIM_VALIDATION_FAILED", "nbf", at=-5
    ),
    "roles raised to admin": Case(
        lambda i: with_payload(i.assertion, roles=["admin"]),
        "ERR_JWS_SIGNATURE_VERIFICATION_FAILED",
    ),
    "another user's sub": Case(
        lambda i: with_payload(i.assertion, sub="00000000-0000-0000-0000-000000000000"),
        "ERR_JWS_SIGNATURE_VERIFICATION_FAILED",
    ),
    "lifetime stretched": Case(
        lambda i: with_payload(i.assertion, exp=i.iat + 3600),
        "ERR_JWS_SIGNATURE_VERIFICATION_FAILED",
    ),
    "signature altered": Case(
        lambda i: flipped_signature(i.assertion), "ERR_JWS_SIGNATURE_VERIFICATION_FAILED"
    ),
    "signature removed": Case(
        lambda i: with_signature(i.assertion, ""), "ERR_JWS_SIGNATURE_VERIFICATION_FAILED"
    ),
    "alg none": Case(
        lambda i: with_signature(with_header(i.assertion, alg="none"), ""),
        "ERR_JOSE_ALG_NOT_ALLOWED",
    ),
    "HS256 with the public key as secret": Case(hs256_with_public_key, "ERR_JOSE_ALG_NOT_ALLOWED"),
    "unknown kid": Case(
        lambda i: with_header(i.assertion, kid="no-such-key"), "ERR_JWKS_NO_MATCHING_KEY"
    ),
    "meant for another upstream": Case(
        lambda i: i.assertion,
        "ERR_JWT_CLAIM_VALIDATION_FAILED",
        "aud",
        overrides={"audience": OTHER_ORIGIN},
    ),
    "from another issuer": Case(
        lambda i: i.assertion,
        "ERR_JWT_CLAIM_VALIDATION_FAILED",
        "iss",
        overrides={"issuer": OTHER_ORIGIN},
    ),
    # Same key, same issuer: only the explicit typ (RFC 8725 §3.11) tells them apart.
    "the caller's access token": Case(
        lambda i: i.account.access_token, "ERR_JWT_CLAIM_VALIDATION_FAILED", "typ"
    ),
}


def as_check(case: Case, issued: Issued) -> dict[str, Any]:
    return {
        "token": case.token(issued),
        "currentDate": issued.iat + case.at,
        **case.overrides,
    }


@pytest.fixture(scope="module")
def verdicts(issued: Issued) -> dict[str, dict[str, Any]]:
    """The whole table in one node run."""
    checks = [as_check(case, issued) for case in CASES.values()]
    results = jose_batch(issued.gw, issued.echo.url, checks)
    return dict(zip(CASES, results, strict=True))


@pytest.mark.parametrize("name", CASES)
def test_jose_verdict(name: str, verdicts: dict[str, dict[str, Any]]) -> None:
    case, result = CASES[name], verdicts[name]
    if case.code is None:
        assert result["ok"] is True, result
    else:
        assert result["ok"] is False, result
        assert result["code"] == case.code, result
        assert result.get("claim") == case.claim, result


# --- the genuine assertion, as a backend sees it ------------------------------------------


async def test_jose_verifies_what_the_upstream_received(issued: Issued) -> None:
    async with aiohttp.ClientSession() as s:
        # A fresh one: verified as a backend would, at the real time, token on stdin.
        assertion = await assertion_for(s, issued.gw, issued.account)
    [result] = await asyncio.to_thread(jose, issued.gw, issued.echo.url, stdin=assertion)
    assert result["ok"] is True, result
    payload, header = result["payload"], result["protectedHeader"]
    assert payload["sub"] == issued.account.user_id
    assert payload["email"] == issued.account.email
    assert payload["roles"] == ["user"]
    assert payload["iss"] == payload["orig_iss"] == issued.gw.url
    assert payload["aud"] == [issued.echo.url]
    assert payload["exp"] - payload["iat"] == 60
    [key] = [k for k in issued.jwks["keys"] if k["kid"] == header["kid"]]
    assert header == {"alg": key["alg"], "kid": key["kid"], "typ": "identity+jwt"}
    assert key["alg"] == "RS256" and key["use"] == "sig"
    # Public halves only: nothing a confused verifier could use as an HMAC secret or to sign.
    assert all(k["kty"] == "RSA" and not {"d", "k"} & k.keys() for k in issued.jwks["keys"])


def test_a_replay_exits_nonzero_with_the_reason(issued: Issued) -> None:
    # The single-token form, token in argv; jose() also holds the exit status to the verdict
    # (1 here), which is what a shell script would act on.
    args = ["--current-date", str(issued.iat + 61), issued.assertion]
    [result] = jose(issued.gw, issued.echo.url, *args)
    assert (result["ok"], result["code"], result["claim"]) == (False, "ERR_JWT_EXPIRED", "exp")


# --- key rotation -------------------------------------------------------------------------


def rotate_keys(gw: Gateway) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "keys", "rotate", "-c", str(gw.config)],
        cwd=gw.workdir,
        capture_output=True,
        text=True,
        timeout=NODE_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    first = done.stdout.splitlines()[0]
    assert first.startswith("new signing key "), done.stdout
    return first.removeprefix("new signing key ")


def restart(gw: Gateway) -> None:
    """CONTRACT §2: a running gateway picks up keys on restart (there is no reload signal).
    Same workdir, config and port: the issuer, and so every ``iss``, stays the same."""
    stop_process(gw.proc)
    # fresh_gateway stops ``gw.proc`` at teardown: point it at the new process.
    gw.proc = start_process(["serve", "-c", str(gw.config)], gw.workdir, gw.workdir / "gateway.log")
    try:
        wait_until_up(gw.url + "/healthz", gw.proc)
    except RuntimeError:
        raise RuntimeError("gateway did not restart:\n" + gw.log()) from None


async def test_jose_follows_a_key_rotation(
    fresh_gateway: Callable[..., Gateway], echo_upstream: Echo
) -> None:
    gw: Gateway = fresh_gateway(extra=EXTRA)
    before = await issue(gw, echo_upstream)
    new_kid = rotate_keys(gw)
    restart(gw)
    async with aiohttp.ClientSession() as s:
        # The access token signed by the old key stays valid: old keys stay in the JWKS.
        after = await assertion_for(s, gw, before.account)
    old_kid = before.parts[0]["kid"]
    assert new_kid != old_kid
    checks: list[dict[str, Any]] = [
        {"token": after},
        {"token": before.assertion, "currentDate": before.iat + INSIDE},
    ]
    fresh, old = await asyncio.to_thread(jose_batch, gw, echo_upstream.url, checks)
    assert fresh["ok"] is True and fresh["protectedHeader"]["kid"] == new_kid, fresh
    assert old["ok"] is True and old["protectedHeader"]["kid"] == old_kid, old
