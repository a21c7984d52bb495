"""A real OpenID provider for black-box tests: ``oidc-provider`` (npm) run by tests/node/provider.mjs.

The provider issues RFC 9068 JWT access tokens (RS256, ``typ: at+jwt``) through the
client_credentials grant, for a resource indicator that becomes the token's ``aud``. Its
signing keys are generated here and handed over as a private JWK set file, so a test knows
every key (to forge with it) and rotates keys by restarting the provider with another file.
``jwks_fetches()`` asks the provider how often its JWKS endpoint was requested: key fetches
are counted where they land, not where the gateway says they started.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.blackbox.conftest import free_port, stop_process

NODE_DIR = Path(__file__).resolve().parents[1] / "node"
PROVIDER_SCRIPT = NODE_DIR / "provider.mjs"
READY_TIMEOUT = 15.0
HTTP_TIMEOUT = 5.0


@dataclass(frozen=True)
class Client:
    """A client of the provider; ``claims`` go into each of its access tokens (``sub``
    included: it stands for the user the client acts for), ``ttl`` overrides the provider's."""

    client_id: str
    client_secret: str
    auth_method: str = "client_secret_basic"  # or client_secret_post
    claims: dict[str, Any] = field(default_factory=dict)
    ttl: int | None = None

    def as_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "client_id": self.client_id,
            "client_secret": self.client_secret,
            "auth_method": self.auth_method,
            "claims": self.claims,
        }
        if self.ttl is not None:
            entry["ttl"] = self.ttl
        return entry


@dataclass
class SigningKey:
    """An RSA key pair and its ``kid``; ``private_jwk`` is what the provider signs with."""

    kid: str
    key: rsa.RSAPrivateKey = field(repr=False)

    @classmethod
    def generate(cls, kid: str | None = None) -> SigningKey:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return cls(kid or f"key-{uuid.uuid4().hex[:8]}", key)

    def private_jwk(self) -> dict[str, Any]:
        jwk: dict[str, Any] = jwt.algorithms.RSAAlgorithm.to_jwk(self.key, as_dict=True)
        # PyJWT adds key_ops ["sign"], which the provider would publish as is; real
        # providers publish none, and a verifier may rightly skip a key not meant to verify.
        jwk.pop("key_ops", None)
        jwk.update(kid=self.kid, alg="RS256", use="sig")
        return jwk

    def sign(self, claims: dict[str, Any], kid: str | None = None) -> str:
        """A token as the provider would make it, signed with this key (for forgeries)."""
        headers = {"kid": self.kid if kid is None else kid, "typ": "at+jwt"}
        return jwt.encode(claims, self.key, algorithm="RS256", headers=headers)


def write_keys(path: Path, keys: list[SigningKey]) -> Path:
    """The provider's ``--keys`` file: the first key signs, all are published."""
    path.write_text(json.dumps({"keys": [k.private_jwk() for k in keys]}))
    path.chmod(0o600)
    return path


def unverified_claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    claims: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return claims


def unverified_kid(token: str) -> str:
    kid: str = jwt.get_unverified_header(token)["kid"]
    return kid


class OidcProvider:
    """One oidc-provider process on loopback; restartable on the same port and issuer."""

    def __init__(
        self,
        workdir: Path,
        keys: list[SigningKey],
        clients: list[Client],
        resources: tuple[str, ...] = ("api://default",),
        ttl: int = 300,
        path: str = "/oauth2/default",
    ) -> None:
        self.workdir = workdir
        self.keys = keys
        self.clients = {c.client_id: c for c in clients}
        self.resources = resources
        self.ttl = ttl
        self.port = free_port()
        self.issuer = f"http://127.0.0.1:{self.port}{path}"  # no trailing slash: iss is this
        self.proc: subprocess.Popen[bytes] | None = None
        self._starts = 0
        self._token_endpoint: str | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / f"provider-{self.port}.log"

    @property
    def signing_key(self) -> SigningKey:
        return self.keys[0]

    def start(self, keys: list[SigningKey] | None = None) -> OidcProvider:
        """Start (again, on the same port) with ``keys`` if given; wait for "ready"."""
        if keys is not None:
            self.keys = keys
        self._starts += 1
        keys_file = write_keys(self.workdir / f"keys-{self.port}-{self._starts}.json", self.keys)
        args = [
            "node",
            str(PROVIDER_SCRIPT),
            f"--port={self.port}",
            f"--issuer={self.issuer}",
            f"--keys={keys_file}",
            f"--ttl={self.ttl}",
            f"--clients={json.dumps([c.as_json() for c in self.clients.values()])}",
            *(f"--resource={r}" for r in self.resources),
        ]
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                args, cwd=NODE_DIR, stdout=log, stderr=log, env=dict(os.environ)
            )
        self._wait_ready(offset)
        return self

    def _wait_ready(self, offset: int) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if f"ready {self.issuer}".encode() in self.log_path.read_bytes()[offset:]:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"oidc-provider did not start:\n{self.log()}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_process(proc)

    def restart(self, keys: list[SigningKey]) -> OidcProvider:
        self.stop()
        return self.start(keys)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _get_json(self, url: str) -> Any:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as resp:
            return json.loads(resp.read())

    def token_endpoint(self) -> str:
        if self._token_endpoint is None:
            discovery = self._get_json(f"{self.issuer}/.well-known/openid-configuration")
            assert discovery["issuer"] == self.issuer, discovery["issuer"]
            self._token_endpoint = str(discovery["token_endpoint"])
        return self._token_endpoint

    def token(self, client_id: str, resource: str | None = None) -> str:
        """An access token for ``client_id`` via client_credentials, for ``resource``."""
        client = self.clients[client_id]
        form = {"grant_type": "client_credentials", "resource": resource or self.resources[0]}
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        if client.auth_method == "client_secret_post":
            form.update(client_id=client.client_id, client_secret=client.client_secret)
        else:  # RFC 6749 §2.3.1: both parts form-urlencoded before base64
            pair = ":".join(
                urllib.parse.quote(p, safe="") for p in (client_id, client.client_secret)
            )
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        request = urllib.request.Request(
            self.token_endpoint(), data=urllib.parse.urlencode(form).encode(), headers=headers
        )
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as resp:
            body = json.loads(resp.read())
        assert body["token_type"] == "Bearer", body
        token: str = body["access_token"]
        return token

    def stats(self) -> dict[str, int]:
        stats: dict[str, int] = self._get_json(f"http://127.0.0.1:{self.port}/__stats")
        return stats

    def jwks_fetches(self) -> int:
        return self.stats()["jwks"]

    def wait_for_jwks_fetches(self, at_least: int, timeout: float = 10.0) -> int:
        """Bounded wait until the JWKS was fetched ``at_least`` times (the gateway's prefetch
        runs in the background after it starts answering)."""
        deadline = time.monotonic() + timeout
        while (count := self.jwks_fetches()) < at_least:
            if time.monotonic() > deadline:
                raise AssertionError(f"JWKS fetched {count} times, expected {at_least}")
            time.sleep(0.05)
        return count


ProviderFactory = Callable[..., OidcProvider]


@pytest.fixture
def oidc_provider(tmp_path: Path) -> Iterator[ProviderFactory]:
    """A factory of started providers (same arguments as ``OidcProvider``), all stopped after."""
    started: list[OidcProvider] = []

    def start(**kwargs: Any) -> OidcProvider:
        workdir = tmp_path / f"oidc{len(started)}"
        workdir.mkdir()
        kwargs.setdefault("keys", [SigningKey.generate()])
        provider = OidcProvider(workdir, **kwargs)
        started.append(provider)
        return provider.start()

    yield start
    for provider in started:
        provider.stop()
