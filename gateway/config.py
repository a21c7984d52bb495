"""Configuration: YAML read once into frozen, typed settings.

Nothing else in the gateway reads files or the environment for settings. Every mistake an
operator can make is reported as ``FILE:LINE: dotted.path: message`` (``ConfigError``),
all of them at once, in file order.

Durations are seconds (float), sizes are bytes (int), rates are ``Rate``.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import re
import urllib.parse
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import yaml

from gateway.errors import ConfigError, ConfigProblem, InvalidPath
from gateway.paths import canonical_path

__all__ = [
    "AdminSettings",
    "ServerSettings",
    "DatabaseSettings",
    "TokenSettings",
    "Rate",
    "AccountSettings",
    "ClaimMapping",
    "IssuerSettings",
    "HeaderSettings",
    "CorsSettings",
    "RouteSettings",
    "Settings",
    "Secret",
    "load",
    "parse_duration",
    "parse_size",
    "parse_rate",
    "ConfigError",
    "ConfigProblem",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Algorithm = Literal["RS256", "ES256", "EdDSA", "HS256"]
AuthMode = Literal["required", "optional", "public"]


class Secret:
    """A string that never shows itself in reprs, logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class AdminSettings:
    host: str = "127.0.0.1"
    port: int = 9091


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    public_url: str = "http://localhost:8080"
    trusted_proxies: tuple[Network, ...] = ()
    max_body_size: int = 10 * 1024 * 1024
    admin: AdminSettings | None = AdminSettings()
    # Not in the contract's example but needed by every operator: how long SIGTERM waits.
    shutdown_grace: float = 30.0
    # How long SIGTERM keeps accepting (with /readyz 503) before closing the listener, so
    # that a load balancer has stopped sending before connections go away.
    drain_delay: float = 0.0


@dataclass(frozen=True)
class DatabaseSettings:
    url: str = "sqlite:///data/gateway.db"


@dataclass(frozen=True)
class TokenSettings:
    issuer: str = "http://localhost:8080"
    audience: str = "gateway"
    algorithm: Algorithm = "RS256"
    keys_dir: Path = Path("data/keys")
    secret: Secret | None = None
    access_ttl: float = 15 * 60.0
    refresh_ttl: float = 30 * 86400.0
    leeway: float = 30.0
    refresh_reuse_grace: float = 0.0


@dataclass(frozen=True)
class Rate:
    """``count`` events per ``per`` seconds."""

    count: int
    per: float


@dataclass(frozen=True)
class AccountSettings:
    prefix: str = "/auth"
    registration: Literal["open", "closed"] = "open"
    password_min_length: int = 8
    bcrypt_rounds: int = 12
    default_roles: tuple[str, ...] = ("user",)
    login_rate_limit: Rate = Rate(10, 60.0)
    register_rate_limit: Rate = Rate(5, 60.0)
    redirect_hosts: tuple[str, ...] = ()


@dataclass(frozen=True)
class ClaimMapping:
    """Claim names (dotted paths allowed, e.g. ``realm_access.roles``) for each identity field."""

    id: str = "sub"
    email: str = "email"
    name: str = "name"
    roles: str = "roles"


@dataclass(frozen=True)
class IssuerSettings:
    name: str
    issuer: str
    audience: str
    jwks_uri: str | None = None
    claims: ClaimMapping = ClaimMapping()
    leeway: float | None = None
    client_id: str | None = None
    client_secret: Secret | None = None
    login: bool = False


@dataclass(frozen=True)
class HeaderSettings:
    id: str | None = "X-User-Id"
    email: str | None = "X-User-Email"
    name: str | None = "X-User-Name"
    roles: str | None = "X-User-Roles"
    issuer: str | None = "X-Auth-Issuer"
    assertion: str | None = None
    strip: tuple[str, ...] = ("X-User-*", "X-Auth-*")

    def identity_headers(self) -> tuple[str, ...]:
        """The configured identity header names, in a fixed order, unset ones left out."""
        names = (self.id, self.email, self.name, self.roles, self.issuer, self.assertion)
        return tuple(n for n in names if n)


@dataclass(frozen=True)
class CorsSettings:
    allow_origins: tuple[str, ...] = ()
    allow_credentials: bool = False


@dataclass(frozen=True)
class RouteSettings:
    name: str
    path: str
    upstreams: tuple[str, ...]
    host: str | None = None
    methods: tuple[str, ...] | None = None
    strip_prefix: bool = False
    auth: AuthMode = "required"
    roles: tuple[str, ...] = ()
    scopes: tuple[str, ...] = ()
    claims: tuple[tuple[str, object], ...] = ()
    timeout: float = 30.0
    websocket: bool = False
    forward_authorization: bool = True
    preserve_host: bool = False
    login_redirect: bool = True


@dataclass(frozen=True)
class Settings:
    routes: tuple[RouteSettings, ...]
    server: ServerSettings = ServerSettings()
    database: DatabaseSettings = DatabaseSettings()
    tokens: TokenSettings = TokenSettings()
    accounts: AccountSettings = AccountSettings()
    issuers: tuple[IssuerSettings, ...] = ()
    headers: HeaderSettings = HeaderSettings()
    cors: CorsSettings = CorsSettings()
    source: Path = field(default=Path("config/gateway.yaml"), compare=False)


# ----------------------------------------------------------------------------------------
# Reading: YAML nodes with the line they start on, ${VAR} substituted before typing.

_T = TypeVar("_T")
_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
# Values never echoed in a message, whatever is wrong with them.
_SECRET_PATHS = re.compile(r"tokens\.secret|issuers\[\d+\]\.client_secret|database\.url")
_REFERENCE = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_VARIABLE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)
_FILE = "(file)"


class _Invalid:
    """A value that was already reported (bad ``${VAR}``, bad tag): readers skip it."""


_INVALID = _Invalid()


class _Bad(ValueError):
    """A converter's complaint; the message names the value and what was expected."""


@dataclass
class _Node:
    value: object  # dict[str, _Node] | list[_Node] | a scalar | _INVALID
    line: int  # where the value starts (1-based)
    path: str  # dotted, list items as [i]
    text: str = ""  # a scalar's source text after substitution (secrets keep it verbatim)
    key_line: int = 0  # where the key naming it sits, for mapping values


class _Loader(yaml.SafeLoader):
    """A safe loader that remembers which scalars were plain and untagged.

    Only those are re-typed after ``${VAR}`` substitution: ``port: ${PORT}`` becomes an int,
    ``port: "${PORT}"`` and ``!!str ${PORT}`` stay strings, as they would without a variable.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.retypable: set[int] = set()

    def compose_scalar_node(self, anchor: str | None) -> yaml.ScalarNode:  # type: ignore[override]
        event = self.peek_event()  # type: ignore[no-untyped-call]
        node = super().compose_scalar_node(anchor)  # type: ignore[arg-type]
        if event.tag is None and event.style is None:
            self.retypable.add(id(node))
        return node


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class _Reader:
    """Builds the located tree and collects every problem found while reading it."""

    def __init__(self, file: str, environ: Mapping[str, str]) -> None:
        self.file = file
        self.environ = environ
        self.problems: list[ConfigProblem] = []
        self._loader = _Loader("")

    def report(self, line: int, path: str, message: str) -> None:
        self.problems.append(ConfigProblem(self.file, line, path, message))

    def fail(self, line: int, path: str, message: str) -> ConfigError:
        return ConfigError([ConfigProblem(self.file, line, path, message)])

    # -- the file ------------------------------------------------------------------------

    def parse(self, path: Path) -> _Node:
        """The document's root mapping; a file-level failure raises at once."""
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise self.fail(1, _FILE, f"cannot read {self.file!r}: {exc.strerror or exc}") from None
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = raw[: exc.start].count(b"\n") + 1
            raise self.fail(line, _FILE, "not valid UTF-8 text") from None
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise self.fail(1, _FILE, "not valid YAML: nested too deeply") from None
        except yaml.MarkedYAMLError as exc:
            raise self.fail(*_yaml_error(exc)) from None
        except yaml.reader.ReaderError as exc:
            line = text[: exc.position].count("\n") + 1
            raise self.fail(line, _FILE, f"invalid character {exc.character!r}") from None
        except yaml.YAMLError as exc:  # pragma: no cover - every YAML error above is marked
            raise self.fail(1, _FILE, f"not valid YAML ({type(exc).__name__})") from None
        finally:
            loader.dispose()
        self._loader = loader
        if not isinstance(node, yaml.MappingNode):
            line = node.start_mark.line + 1 if node is not None else 1
            raise self.fail(line, _FILE, "expected a mapping of sections (server, routes, ...)")
        try:
            return self.tree(node, "", frozenset())
        except RecursionError:
            raise self.fail(1, _FILE, "nested too deeply") from None

    # -- the tree ------------------------------------------------------------------------

    def tree(self, node: yaml.Node, path: str, seen: frozenset[int]) -> _Node:
        line = node.start_mark.line + 1
        if id(node) in seen:
            self.report(line, path, "recursive YAML alias")
            return _Node(_INVALID, line, path)
        seen = seen | {id(node)}
        if not isinstance(node, yaml.ScalarNode) and node.tag not in (_MAP_TAG, _SEQ_TAG):
            # Scalars with foreign tags fail in the safe constructor; collections must too.
            self.report(line, path, f"unsupported YAML tag {node.tag!r}")
            return _Node(_INVALID, line, path)
        if isinstance(node, yaml.MappingNode):
            return _Node(self._mapping(node, path, seen), line, path)
        if isinstance(node, yaml.SequenceNode):
            items = [self.tree(item, f"{path}[{i}]", seen) for i, item in enumerate(node.value)]
            return _Node(items, line, path)
        return self._scalar(cast(yaml.ScalarNode, node), path)

    def _mapping(self, node: yaml.MappingNode, path: str, seen: frozenset[int]) -> dict[str, _Node]:
        out: dict[str, _Node] = {}
        merged: list[yaml.MappingNode] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                merged.extend(self._merge_sources(value_node, path))
                continue
            key = self._key(key_node, path)
            if key is None:
                continue
            key_line = key_node.start_mark.line + 1
            if key in out:
                first = out[key].key_line
                message = f"duplicate key (first given at line {first})"
                self.report(key_line, _join(path, key), message)
                continue
            child = self.tree(value_node, _join(path, key), seen)
            child.key_line = key_line
            out[key] = child
        # YAML merge keys (<<: *defaults): keys written out win over merged ones.
        for source in merged:
            if id(source) in seen:
                self.report(source.start_mark.line + 1, path, "recursive YAML merge")
                continue
            for key, child in self._mapping(source, path, seen | {id(source)}).items():
                out.setdefault(key, child)
        return out

    def _merge_sources(self, node: yaml.Node, path: str) -> list[yaml.MappingNode]:
        if isinstance(node, yaml.MappingNode):
            return [node]
        if isinstance(node, yaml.SequenceNode) and all(
            isinstance(n, yaml.MappingNode) for n in node.value
        ):
            return list(node.value)
        self.report(node.start_mark.line + 1, path, "'<<' expects a mapping or a list of mappings")
        return []

    def _key(self, node: yaml.Node, path: str) -> str | None:
        if isinstance(node, yaml.ScalarNode) and node.tag == _STR_TAG:
            return str(node.value)
        line = node.start_mark.line + 1
        if isinstance(node, yaml.ScalarNode):
            message = f"key must be a string, got {node.value!r}"
            self.report(line, _join(path, str(node.value)), message)
        else:
            self.report(line, path or "(top level)", "key must be a string, got a collection")
        return None

    def _scalar(self, node: yaml.ScalarNode, path: str) -> _Node:
        line = node.start_mark.line + 1
        text = str(node.value)
        if node.tag == _STR_TAG and "$" in text:
            substituted = self._substitute(text, line, path)
            if substituted is None:
                return _Node(_INVALID, line, path)
            if id(node) not in self._loader.retypable:
                return _Node(substituted, line, path, text=substituted)
            # Plain scalar: type the result as YAML would have typed it written out.
            tag = self._loader.resolve(  # type: ignore[no-untyped-call]
                yaml.ScalarNode, substituted, (True, False)
            )
            node = yaml.ScalarNode(tag, substituted, node.start_mark, node.end_mark)
            text = substituted
        try:
            value = self._loader.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, TypeError):
            # Explicit tags (!!int abc, !!python/...): the safe constructor refuses them. The
            # exception text may quote the value, which may be a secret: name the tag only.
            self.report(line, path, f"cannot read this value as {node.tag!r}")
            return _Node(_INVALID, line, path)
        return _Node(value, line, path, text=text)

    def _substitute(self, text: str, line: int, path: str) -> str | None:
        """``text`` with ``${VAR}``, ``${VAR:-default}`` and ``$${`` replaced; None if reported."""
        secret = _SECRET_PATHS.fullmatch(path) is not None
        failed = False

        def replace(match: re.Match[str]) -> str:
            nonlocal failed
            if match.group(0) == "$${":
                return "${"
            message = self._resolve(match, secret)
            if isinstance(message, _Bad):
                failed = True
                self.report(line, path, str(message))
                return ""
            return message

        result = _REFERENCE.sub(replace, text)
        return None if failed else result

    def _resolve(self, match: re.Match[str], secret: bool) -> str | _Bad:
        inner = match.group(1)
        if inner is None:
            return _Bad("unterminated '${' (write '$${' for a literal '${')")
        variable = _VARIABLE.fullmatch(inner)
        if variable is None:
            shown = "" if secret else f" {match.group(0)!r}"
            return _Bad(f"bad variable reference{shown}: expected ${{NAME}} or ${{NAME:-default}}")
        name, default = variable.group(1), variable.group(2)
        value = self.environ.get(name)
        # As in the shell, ":-" also replaces a variable that is set but empty.
        if default is not None and not value:
            return default
        if value is None:
            return _Bad(
                f"environment variable {name} is not set "
                f"(set it, or give a default: ${{{name}:-default}})"
            )
        return value

    # -- typed reading -------------------------------------------------------------------

    def take(self, node: _Node | None, convert: Callable[[Any], _T], default: _T) -> _T:
        """``convert(node.value)``; on a complaint, report it and return ``default``."""
        if node is None or node.value is _INVALID:
            return default
        try:
            return convert(node.value)
        except _Bad as bad:
            self.report(node.line, node.path, str(bad))
            return default

    def fields(self, node: _Node | None, allowed: Collection[str]) -> dict[str, _Node]:
        """A mapping's entries; unknown keys reported. Missing or null is empty."""
        if node is None or node.value is None or node.value is _INVALID:
            return {}
        if not isinstance(node.value, dict):
            self.report(node.line, node.path, f"expected a mapping, got {_show(node.value)}")
            return {}
        out: dict[str, _Node] = {}
        for key, child in node.value.items():
            if key in allowed:
                out[key] = child
            else:
                self.report(child.key_line, child.path, _unknown_key(key, allowed))
        return out

    def items(self, node: _Node | None) -> list[_Node]:
        """A list's items; missing or null is empty."""
        if node is None or node.value is None or node.value is _INVALID:
            return []
        if not isinstance(node.value, list):
            self.report(node.line, node.path, f"expected a list, got {_show(node.value)}")
            return []
        return list(node.value)

    def take_list(
        self, node: _Node | None, convert: Callable[[Any], _T], default: tuple[_T, ...]
    ) -> tuple[_T, ...]:
        if node is None or node.value is _INVALID:
            return default
        missing = object()
        taken = [self.take(item, convert, missing) for item in self.items(node)]
        return tuple(t for t in taken if t is not missing)  # type: ignore[misc]

    def require(self, parent: _Node, fields: dict[str, _Node], key: str, expected: str) -> bool:
        if key in fields:
            return True
        self.report(parent.line, _join(parent.path, key), f"required: {expected}")
        return False


def _yaml_error(exc: yaml.MarkedYAMLError) -> tuple[int, str, str]:
    """Line, path and message of a syntax error, never with the source snippet (secrets)."""
    mark = exc.problem_mark or exc.context_mark
    line = mark.line + 1 if mark is not None else 1
    message = f"not valid YAML: {exc.problem or 'syntax error'}"
    if exc.context and exc.context_mark is not None:
        # Where the parser noticed is often after the cause (an unclosed '[' or quote).
        message += f" ({exc.context} started at line {exc.context_mark.line + 1})"
    elif exc.context:
        message += f" ({exc.context})"
    return line, _FILE, message


def _unknown_key(key: str, allowed: Collection[str]) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key {key!r} ({hint}expected one of: {', '.join(sorted(allowed))})"


def _kind(value: object) -> str:
    if value is None:
        return "null"
    kinds = (
        (bool, "a boolean"),
        (int, "an integer"),
        (float, "a number"),
        (str, "a string"),
        (list, "a list"),
        (dict, "a mapping"),
    )
    for cls, name in kinds:
        if isinstance(value, cls):
            return name
    return f"a {type(value).__name__}"


def _show(value: object) -> str:
    """``a string 'x'``: the value's kind and, for scalars, the value itself."""
    if value is None or isinstance(value, list | dict):
        return _kind(value)
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return f"{_kind(value)} {shown}"


# ----------------------------------------------------------------------------------------
# Converters: value -> typed value, or _Bad naming the value and what was expected.

_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)")
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "kib": 2**10,
    "mb": 10**6,
    "mib": 2**20,
    "gb": 10**9,
    "gib": 2**30,
}
_RATE = re.compile(r"(\d+)\s*/\s*([A-Za-z]+)")
_RATE_UNITS = {
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
}
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 §5.6.2
_GLOB = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z\[\]?-]+")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_HOSTNAME = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*")
_ROLE_FORBIDDEN = re.compile(r"[\s,\x00-\x1f\x7f]")
# Headers the gateway itself manages: an identity header by one of these names would
# either be stripped from every request or overwrite what the gateway sends.
_RESERVED_HEADERS = frozenset(
    "host connection keep-alive te trailer transfer-encoding upgrade content-length "
    "content-type authorization cookie set-cookie forwarded x-forwarded-for "
    "x-forwarded-proto x-forwarded-host x-request-id x-real-ip".split()
)


def _string(value: object, expected: str) -> str:
    if not isinstance(value, str):
        raise _Bad(f"expected {expected}, got {_show(value)}")
    return value


def _nonempty(value: object) -> str:
    text = _string(value, "a non-empty string")
    if not text.strip():
        raise _Bad("expected a non-empty string, got ''")
    return text


def _optional(convert: Callable[[Any], _T]) -> Callable[[Any], _T | None]:
    return lambda value: None if value is None else convert(value)


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise _Bad(f"expected true or false, got {_show(value)}")
    return value


def _int_range(low: int, high: int | None = None) -> Callable[[Any], int]:
    expected = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"

    def convert(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Bad(f"expected {expected}, got {_show(value)}")
        if value < low or (high is not None and value > high):
            raise _Bad(f"out of range: {value} (expected {expected})")
        return value

    return convert


_port = _int_range(1, 65535)


def _choice(*choices: str) -> Callable[[Any], Any]:
    expected = " | ".join(choices)

    def convert(value: object) -> str:
        if not isinstance(value, str) or value not in choices:
            raise _Bad(f"expected one of {expected}, got {_show(value)}")
        return value

    return convert


def parse_duration(value: object) -> float:
    """``30s``, ``15m``, ``12h``, ``30d``, ``500ms``, ``1h30m`` -> seconds."""
    text = _string(value, "a duration such as 30s, 15m, 12h or 30d").strip()
    if not _DURATION.fullmatch(text):
        raise _Bad(f"not a duration: {text!r} (expected e.g. 0s, 500ms, 30s, 15m, 12h, 30d)")
    return sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(text))


def _positive_duration(value: object) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise _Bad(f"must be longer than 0s, got {value!r}")
    return seconds


def parse_size(value: object) -> int:
    """``512KiB``, ``10MiB``, ``1GB``, ``100B`` or a plain integer -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    expected = "a size such as 512KiB, 10MiB or a number of bytes"
    text = _string(value, expected).strip()
    match = _SIZE.fullmatch(text)
    unit = match and _SIZE_UNITS.get(match.group(2).lower())
    if match is None or unit is None:
        raise _Bad(f"not a size: {text!r} (expected e.g. 512KiB, 10MiB, 1GiB, 100B)")
    return int(float(match.group(1)) * unit)


def _positive_size(value: object) -> int:
    size = parse_size(value)
    if size <= 0:
        raise _Bad(f"must be more than 0 bytes, got {value!r}")
    return size


def parse_rate(value: object) -> Rate:
    """``10/s``, ``10/min``, ``100/h``, ``1000/d`` -> ``Rate``."""
    text = _string(value, "a rate such as 10/min").strip()
    match = _RATE.fullmatch(text)
    per = match and _RATE_UNITS.get(match.group(2).lower())
    if match is None or per is None:
        raise _Bad(f"not a rate: {text!r} (expected N/s, N/min or N/h, e.g. 10/min)")
    count = int(match.group(1))
    if count < 1:
        raise _Bad(f"the count must be at least 1, got {text!r}")
    return Rate(count, per)


def _http_url(value: object, *, https_unless_loopback: bool = False) -> str:
    """An absolute http(s) URL with a host, no credentials, query or fragment."""
    text = _string(value, "an http(s) URL")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise _Bad(f"not an http(s) URL (holds whitespace or control characters): {text!r}")
    try:
        parts = urllib.parse.urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise _Bad(f"not an http(s) URL: {text!r}") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise _Bad(f"not an http(s) URL: {text!r}")
    if parts.username is not None or parts.password is not None:
        raise _Bad("credentials in the URL are not supported")
    if parts.query or parts.fragment or "?" in text or "#" in text:
        raise _Bad(f"must not have a query or fragment: {text!r}")
    if https_unless_loopback and parts.scheme.lower() != "https" and not _loopback(parts.hostname):
        raise _Bad(f"must be https (plain http only for loopback hosts): {text!r}")
    return text


def _loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _remote_url(value: object) -> str:
    return _http_url(value, https_unless_loopback=True)


def _public_url(value: object) -> str:
    text = _http_url(value)
    # "http://x/" and "http://x" are one origin; a trailing "/" would break "iss" equality.
    return text[:-1] if urllib.parse.urlsplit(text).path == "/" else text


def _split_host(text: str) -> tuple[str, int | None] | None:
    """``host[:port]`` as (lower-case host without one trailing dot, port); None if malformed."""
    if not text or any(c.isspace() or c in "/?#@\\" for c in text):
        return None
    try:
        parts = urllib.parse.urlsplit("//" + text)
        port = parts.port
    except ValueError:
        return None
    host = parts.hostname or ""
    if ":" in host:
        try:
            return f"[{ipaddress.IPv6Address(host)}]", port
        except ValueError:
            return None
    host = host[:-1] if host.endswith(".") else host
    return (host, port) if _HOSTNAME.fullmatch(host) else None


def _route_host(value: object) -> str:
    text = _string(value, "a host name such as api.example.com")
    split = _split_host(text)
    if split is None:
        raise _Bad(f"not a host name: {text!r} (expected e.g. api.example.com, no scheme or path)")
    # Matching ignores case, the port and one trailing dot (CONTRACT §3): store it that way.
    return split[0]


def _host_port(value: object) -> str:
    text = _string(value, "a host such as app.example.com or localhost:3000")
    split = _split_host(text)
    if split is None:
        raise _Bad(f"not a host: {text!r} (expected host or host:port, no scheme or path)")
    host, port = split
    return host if port is None else f"{host}:{port}"


def _bind_host(value: object) -> str:
    text = _nonempty(value)
    if any(c.isspace() or c in "/?#" for c in text):
        raise _Bad(f"not a listen address: {text!r} (expected e.g. 127.0.0.1, 0.0.0.0 or ::)")
    return text


def _network(value: object) -> Network:
    text = _string(value, "a CIDR such as 10.0.0.0/8")
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise _Bad(f"not an IP network: {text!r} (expected a CIDR such as 10.0.0.0/8)") from None


def _database_url(value: object) -> str:
    # The URL may hold a password: no message below ever shows the value.
    expected = "a URL such as sqlite:///data/gateway.db or postgresql://user:pass@host:5432/db"
    if not isinstance(value, str) or not value.strip():
        raise _Bad(f"expected {expected}, got {_kind(value)}")
    scheme, sep, rest = value.partition("://")
    if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme):
        raise _Bad(f"not a database URL (expected {expected})")
    scheme = scheme.lower()
    if scheme == "sqlite":
        if not rest.startswith("/") or not rest[1:]:
            raise _Bad("an SQLite URL needs a file: sqlite:///relative.db or sqlite:////abs.db")
        return value
    if scheme in ("postgresql", "postgres"):
        try:
            urllib.parse.urlsplit(value).port  # noqa: B018 - raises ValueError for a bad port
        except ValueError:
            raise _Bad("not a valid PostgreSQL URL (bad port)") from None
        return value
    raise _Bad(f"unsupported database scheme {scheme!r} (expected sqlite:// or postgresql://)")


def _route_path(value: object, *, what: str = "a path starting with '/'") -> str:
    """A route path in the form ``paths.canonical_path`` produces, trailing '/' removed.

    Refuses rather than rewrites anything else: a route written ``/a/../b`` or ``/%61pi``
    means the operator expects a match that would never happen.
    """
    text = _string(value, what)
    if not text.startswith("/"):
        raise _Bad(f"must start with '/': {text!r}")
    path = text[:-1] if len(text) > 1 and text.endswith("/") else text
    try:
        canonical = canonical_path(path)
    except InvalidPath as err:
        raise _Bad(f"{err.detail.rstrip('.')}: {text!r}") from None
    if canonical != path:
        raise _Bad(f"not in canonical form: {text!r} (write {canonical!r})")
    return path


def _prefix(value: object) -> str:
    if value == "":
        return ""
    path = _route_path(value, what="'' or a path such as /auth")
    if path == "/" or value != path:
        raise _Bad(f"must be '' or start with '/' and not end with '/', got {value!r}")
    return path


def _method(value: object) -> str:
    text = _string(value, "an HTTP method such as GET")
    if not _TOKEN.fullmatch(text):
        raise _Bad(f"not an HTTP method: {text!r}")
    if text != text.upper():
        # Methods are case-sensitive (RFC 9110 §9.1): "get" would never match a GET.
        raise _Bad(f"methods are upper case: {text!r} (write {text.upper()!r})")
    return text


def _role(value: object) -> str:
    text = _nonempty(value)
    if _ROLE_FORBIDDEN.search(text):
        raise _Bad(f"not a role name (no commas, whitespace or control characters): {text!r}")
    return text


def _scope(value: object) -> str:
    text = _nonempty(value)
    if _ROLE_FORBIDDEN.search(text.replace(",", "")):
        raise _Bad(f"not a scope (no whitespace or control characters): {text!r}")
    return text


def _claim_value(value: object) -> object:
    if not isinstance(value, str | int | float | bool):
        raise _Bad(f"expected a string, number or boolean, got {_show(value)}")
    return value


def _name(value: object) -> str:
    text = _string(value, "a name (letters, digits, '.', '_', '-')")
    if not _NAME.fullmatch(text):
        raise _Bad(f"not a valid name: {text!r} (letters, digits, '.', '_', '-')")
    return text


def _header_name(value: object) -> str:
    text = _string(value, "an HTTP header name such as X-User-Id")
    if not _TOKEN.fullmatch(text):
        raise _Bad(f"not a valid HTTP header name: {text!r}")
    if text.lower() in _RESERVED_HEADERS:
        raise _Bad(f"{text!r} is a header the gateway manages itself; choose another name")
    return text


def _header_glob(value: object) -> str:
    text = _string(value, "a header name pattern such as X-User-*")
    if not _GLOB.fullmatch(text):
        raise _Bad(f"not a header name pattern: {text!r} (header characters and * ? [ ])")
    if not text.strip("*?"):
        raise _Bad(f"{text!r} would strip every header")
    return text


def _origin(value: object) -> str:
    text = _string(value, "an origin such as https://app.example.com, or '*'")
    if text == "*":
        return text
    try:
        url = _http_url(text)
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except (_Bad, ValueError):
        raise _Bad(f"not an origin: {text!r} (expected scheme://host[:port] or '*')") from None
    if parts.path:
        raise _Bad(f"an origin has no path: {text!r} (expected scheme://host[:port])")
    scheme, host = parts.scheme.lower(), parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    default = {"http": 80, "https": 443}[scheme]
    # Browsers send the origin serialized: lower case, default port left out (RFC 6454 §6.2).
    return f"{scheme}://{host}" if port in (None, default) else f"{scheme}://{host}:{port}"


# ----------------------------------------------------------------------------------------
# Sections


def _keys(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(cls))


_TOP_KEYS = frozenset(_keys(Settings) - {"source"})
_ROUTE_KEYS = frozenset(_keys(RouteSettings) - {"upstreams"} | {"upstream"})
_ALGORITHMS = ("RS256", "ES256", "EdDSA", "HS256")
_MIN_HS256_SECRET = 32


def _server(r: _Reader, node: _Node | None) -> ServerSettings:
    m = r.fields(node, _keys(ServerSettings))
    d = ServerSettings()
    server = ServerSettings(
        host=r.take(m.get("host"), _bind_host, d.host),
        port=r.take(m.get("port"), _port, d.port),
        workers=r.take(m.get("workers"), _int_range(0), d.workers),
        public_url=r.take(m.get("public_url"), _public_url, d.public_url),
        trusted_proxies=r.take_list(m.get("trusted_proxies"), _network, d.trusted_proxies),
        max_body_size=r.take(m.get("max_body_size"), _positive_size, d.max_body_size),
        admin=_admin(r, m.get("admin")),
        shutdown_grace=r.take(m.get("shutdown_grace"), parse_duration, d.shutdown_grace),
        drain_delay=r.take(m.get("drain_delay"), parse_duration, d.drain_delay),
    )
    admin = server.admin
    if admin is not None and (admin.host, admin.port) == (server.host, server.port):
        # /metrics must never be reachable on the public listener.
        where = m.get("admin") or m.get("port") or m.get("host")
        path = "server.admin.port" if "admin" in m else "server.port"
        line = where.line if where is not None else 1
        r.report(line, path, f"same address as the admin listener ({admin.host}:{admin.port})")
    return server


def _admin(r: _Reader, node: _Node | None) -> AdminSettings | None:
    if node is not None and node.value is None:
        return None  # admin: null turns the admin listener off
    m = r.fields(node, _keys(AdminSettings))
    d = AdminSettings()
    return AdminSettings(
        host=r.take(m.get("host"), _bind_host, d.host),
        port=r.take(m.get("port"), _port, d.port),
    )


def _database(r: _Reader, node: _Node | None) -> DatabaseSettings:
    m = r.fields(node, _keys(DatabaseSettings))
    return DatabaseSettings(url=r.take(m.get("url"), _database_url, DatabaseSettings().url))


def _secret(r: _Reader, node: _Node | None) -> Secret | None:
    """The scalar's text, whatever YAML would type it as (a secret may look like a number)."""
    if node is None or node.value is None or node.value is _INVALID:
        return None
    if isinstance(node.value, list | dict):
        r.report(node.line, node.path, f"expected a string, got {_kind(node.value)}")
        return None
    return Secret(node.text) if node.text else None


def _text(r: _Reader, node: _Node | None, default: str | None) -> str | None:
    """A scalar's source text: client ids and audiences may look like numbers."""
    if node is None or node.value is _INVALID:
        return default
    if node.value is None or isinstance(node.value, list | dict) or not node.text.strip():
        r.report(node.line, node.path, f"expected a non-empty string, got {_kind(node.value)}")
        return default
    return node.text


def _tokens(r: _Reader, node: _Node | None, public_url: str) -> TokenSettings:
    m = r.fields(node, _keys(TokenSettings))
    d = TokenSettings()
    keys_dir = r.take(m.get("keys_dir"), lambda v: Path(_nonempty(v)), None)
    # None: given but refused (then no keys_dir is created for a guessed algorithm).
    algorithm = (
        r.take(m["algorithm"], _choice(*_ALGORITHMS), None) if "algorithm" in m else d.algorithm
    )
    tokens = TokenSettings(
        issuer=r.take(m.get("issuer"), _public_url, public_url),
        audience=_text(r, m.get("audience"), d.audience) or d.audience,
        algorithm=algorithm or d.algorithm,
        keys_dir=keys_dir or d.keys_dir,
        secret=_secret(r, m.get("secret")),
        access_ttl=r.take(m.get("access_ttl"), _positive_duration, d.access_ttl),
        refresh_ttl=r.take(m.get("refresh_ttl"), _positive_duration, d.refresh_ttl),
        leeway=r.take(m.get("leeway"), parse_duration, d.leeway),
        refresh_reuse_grace=r.take(
            m.get("refresh_reuse_grace"), parse_duration, d.refresh_reuse_grace
        ),
    )
    _check_secret(r, node, m, tokens)
    # Asymmetric keys are generated into keys_dir; HS256 needs none. Only a keys_dir that
    # was read without complaint (or the default) is created.
    usable = keys_dir is not None or "keys_dir" not in m
    if algorithm is not None and algorithm != "HS256" and usable:
        _make_keys_dir(r, m.get("keys_dir") or node, tokens.keys_dir)
    return tokens


def _check_secret(
    r: _Reader, node: _Node | None, m: dict[str, _Node], tokens: TokenSettings
) -> None:
    secret_node = m.get("secret")
    if secret_node is not None and secret_node.value is _INVALID:
        return  # already reported (an unset ${VAR})
    if tokens.algorithm != "HS256":
        if tokens.secret is not None and secret_node is not None:
            r.report(
                secret_node.line,
                secret_node.path,
                f"only used with algorithm HS256 (algorithm is {tokens.algorithm}); remove it",
            )
        return
    if tokens.secret is None:
        where = secret_node or m.get("algorithm") or node
        line = where.line if where is not None else 1
        r.report(line, "tokens.secret", "required when algorithm is HS256 (at least 32 bytes)")
    elif len(tokens.secret.reveal().encode("utf-8")) < _MIN_HS256_SECRET and secret_node:
        r.report(
            secret_node.line,
            secret_node.path,
            f"too short for HS256: use at least {_MIN_HS256_SECRET} random bytes",
        )


def _make_keys_dir(r: _Reader, node: _Node | None, keys_dir: Path) -> None:
    """Create ``keys_dir`` and its missing parents, mode 0700: private keys live there."""
    line = node.line if node is not None else 1
    try:
        if keys_dir.is_dir():
            return
        if keys_dir.exists():
            r.report(line, "tokens.keys_dir", f"exists and is not a directory: '{keys_dir}'")
            return
        missing = [keys_dir, *(p for p in keys_dir.parents if not p.exists())]
        for directory in sorted(missing, key=lambda p: len(p.parts)):
            directory.mkdir(mode=0o700)
            directory.chmod(0o700)  # mkdir's mode is masked by the umask
    except OSError as exc:
        r.report(line, "tokens.keys_dir", f"cannot create '{keys_dir}': {exc.strerror or exc}")


def _accounts(r: _Reader, node: _Node | None) -> AccountSettings:
    m = r.fields(node, _keys(AccountSettings))
    d = AccountSettings()
    return AccountSettings(
        prefix=r.take(m.get("prefix"), _prefix, d.prefix),
        registration=r.take(m.get("registration"), _choice("open", "closed"), d.registration),
        password_min_length=r.take(
            m.get("password_min_length"), _int_range(1, 72), d.password_min_length
        ),
        bcrypt_rounds=r.take(m.get("bcrypt_rounds"), _int_range(4, 31), d.bcrypt_rounds),
        default_roles=r.take_list(m.get("default_roles"), _role, d.default_roles),
        login_rate_limit=r.take(m.get("login_rate_limit"), parse_rate, d.login_rate_limit),
        register_rate_limit=r.take(m.get("register_rate_limit"), parse_rate, d.register_rate_limit),
        redirect_hosts=r.take_list(m.get("redirect_hosts"), _host_port, d.redirect_hosts),
    )


def _issuers(r: _Reader, node: _Node | None, own_issuer: str) -> tuple[IssuerSettings, ...]:
    out: list[IssuerSettings] = []
    names: dict[str, int] = {}
    urls: dict[str, int] = {}
    for item in r.items(node):
        issuer = _issuer(r, item)
        if issuer is None:
            continue
        m = item.value if isinstance(item.value, dict) else {}
        _unique(r, m.get("name"), issuer.name, names, "issuer name")
        _unique(r, m.get("issuer"), issuer.issuer, urls, "issuer URL")
        if issuer.issuer == own_issuer and "issuer" in m:
            # Two key sets for one "iss": a token would verify against either.
            r.report(m["issuer"].line, m["issuer"].path, "is the gateway's own tokens.issuer")
        out.append(issuer)
    return tuple(out)


def _unique(r: _Reader, node: _Node | None, value: str, seen: dict[str, int], what: str) -> None:
    if node is None:
        return
    if value in seen:
        r.report(node.line, node.path, f"duplicate {what} {value!r} (first at line {seen[value]})")
    else:
        seen[value] = node.line


def _issuer(r: _Reader, item: _Node) -> IssuerSettings | None:
    m = r.fields(item, _keys(IssuerSettings))
    if not isinstance(item.value, dict):
        if item.value is None:
            r.report(item.line, item.path, "expected an issuer mapping, got null")
        return None
    ok = all(
        [
            r.require(item, m, key, what)
            for key, what in (
                ("name", "a name for this issuer"),
                ("issuer", "the issuer URL (its 'iss')"),
                ("audience", "the 'aud' its tokens carry for this gateway"),
            )
        ]
    )
    name = r.take(m.get("name"), _name, None)
    url = r.take(m.get("issuer"), _remote_url, None)
    audience = _text(r, m.get("audience"), None)
    issuer = IssuerSettings(
        name=name or "",
        issuer=url or "",
        audience=audience or "",
        jwks_uri=r.take(m.get("jwks_uri"), _optional(_remote_url), None),
        claims=_claim_mapping(r, m.get("claims")),
        leeway=r.take(m.get("leeway"), _optional(parse_duration), None),
        client_id=_text(r, m.get("client_id"), None) if _present(m.get("client_id")) else None,
        client_secret=_secret(r, m.get("client_secret")),
        login=r.take(m.get("login"), _boolean, False),
    )
    if issuer.login and issuer.client_id is None and "login" in m:
        r.report(m["login"].line, m["login"].path, "login: true needs a client_id")
    return issuer if ok and name and url and audience else None


def _present(node: _Node | None) -> bool:
    return node is not None and node.value is not None


def _claim_mapping(r: _Reader, node: _Node | None) -> ClaimMapping:
    m = r.fields(node, _keys(ClaimMapping))
    d = ClaimMapping()
    return ClaimMapping(**{key: r.take(m.get(key), _nonempty, getattr(d, key)) for key in m})


def _headers(r: _Reader, node: _Node | None) -> HeaderSettings:
    m = r.fields(node, _keys(HeaderSettings))
    d = HeaderSettings()
    names = {
        key: r.take(m.get(key), _optional(_header_name), getattr(d, key))
        for key in ("id", "email", "name", "roles", "issuer", "assertion")
    }
    seen: dict[str, str] = {}
    for key, name in names.items():
        if name is None:
            continue
        if name.lower() in seen and key in m:
            first = seen[name.lower()]
            r.report(m[key].line, m[key].path, f"same header as headers.{first}: {name!r}")
        seen.setdefault(name.lower(), key)
    return HeaderSettings(**names, strip=r.take_list(m.get("strip"), _header_glob, d.strip))


def _cors(r: _Reader, node: _Node | None) -> CorsSettings:
    m = r.fields(node, _keys(CorsSettings))
    cors = CorsSettings(
        allow_origins=r.take_list(m.get("allow_origins"), _origin, ()),
        allow_credentials=r.take(m.get("allow_credentials"), _boolean, False),
    )
    if "*" in cors.allow_origins and len(cors.allow_origins) > 1:
        where = m["allow_origins"]
        r.report(where.line, where.path, "'*' must be the only origin when given")
    if "*" in cors.allow_origins and cors.allow_credentials:
        # Any site could then make credentialed requests as the user (Fetch §3.2.5 forbids it).
        where = m["allow_credentials"]
        r.report(where.line, where.path, "true is not allowed with allow_origins '*'")
    return cors


def _routes(r: _Reader, node: _Node | None) -> tuple[RouteSettings, ...]:
    if node is None:
        r.report(1, "routes", "required: a list of at least one route")
        return ()
    items = r.items(node)
    if not items:
        if node.value is not _INVALID and (node.value is None or node.value == []):
            r.report(node.line, "routes", "must list at least one route")
        return ()
    built = [(item, _route(r, item)) for item in items]
    _check_names(r, items)
    _check_overlaps(r, [(item, route) for item, route in built if route is not None])
    return tuple(route for _, route in built if route is not None)


def _route(r: _Reader, item: _Node) -> RouteSettings | None:
    m = r.fields(item, _ROUTE_KEYS)
    if not isinstance(item.value, dict):
        if item.value is None:
            r.report(item.line, item.path, "expected a route mapping, got null")
        return None
    required = (
        ("name", "a route name"),
        ("path", "a path such as /api"),
        ("upstream", "an http(s) URL or a list of them"),
    )
    ok = all([r.require(item, m, key, what) for key, what in required])
    d = RouteSettings(name="", path="/", upstreams=())
    route = RouteSettings(
        name=r.take(m.get("name"), _name, ""),
        path=r.take(m.get("path"), _route_path, ""),
        upstreams=_route_upstreams(r, m.get("upstream")),
        host=r.take(m.get("host"), _optional(_route_host), None),
        methods=_methods(r, m.get("methods")),
        strip_prefix=r.take(m.get("strip_prefix"), _boolean, d.strip_prefix),
        auth=r.take(m.get("auth"), _choice("required", "optional", "public"), d.auth),
        roles=r.take_list(m.get("roles"), _role, ()),
        scopes=r.take_list(m.get("scopes"), _scope, ()),
        claims=_claims(r, m.get("claims")),
        timeout=r.take(m.get("timeout"), _positive_duration, d.timeout),
        websocket=r.take(m.get("websocket"), _boolean, d.websocket),
        forward_authorization=r.take(
            m.get("forward_authorization"), _boolean, d.forward_authorization
        ),
        preserve_host=r.take(m.get("preserve_host"), _boolean, d.preserve_host),
        login_redirect=r.take(m.get("login_redirect"), _boolean, d.login_redirect),
    )
    _check_policy(r, m, route)
    if not ok or not route.name or not route.path or not route.upstreams:
        return None
    return route


def _check_policy(r: _Reader, m: dict[str, _Node], route: RouteSettings) -> None:
    if route.auth == "required":
        return
    # A public or optional route with roles looks protected in review but is not.
    for key in ("roles", "scopes", "claims"):
        if getattr(route, key) and key in m:
            message = f"only applies with auth: required (auth is {route.auth})"
            r.report(m[key].line, m[key].path, message)


def _route_upstreams(r: _Reader, node: _Node | None) -> tuple[str, ...]:
    if node is None or node.value is _INVALID:
        return ()
    if isinstance(node.value, list):
        if not node.value:
            r.report(node.line, node.path, "must list at least one URL")
        return r.take_list(node, _http_url, ())
    return r.take(node, lambda value: (_http_url(value),), ())


def _methods(r: _Reader, node: _Node | None) -> tuple[str, ...] | None:
    if node is None or node.value is None or node.value is _INVALID:
        return None
    methods = r.take_list(node, _method, ())
    if isinstance(node.value, list) and not node.value:
        r.report(node.line, node.path, "must not be empty (use null for any method)")
    return tuple(dict.fromkeys(methods)) or None


def _claims(r: _Reader, node: _Node | None) -> tuple[tuple[str, object], ...]:
    if node is None or node.value is None or node.value is _INVALID:
        return ()
    if not isinstance(node.value, dict):
        message = f"expected a mapping of claim name to value, got {_show(node.value)}"
        r.report(node.line, node.path, message)
        return ()
    missing = object()
    pairs = [(name, r.take(child, _claim_value, missing)) for name, child in node.value.items()]
    return tuple(sorted((n, v) for n, v in pairs if v is not missing))


def _check_names(r: _Reader, items: list[_Node]) -> None:
    """Route names are unique (they label metrics and ``gateway routes`` output)."""
    names: dict[str, int] = {}
    for item in items:
        node = item.value.get("name") if isinstance(item.value, dict) else None
        if node is not None and isinstance(node.value, str) and _NAME.fullmatch(node.value):
            _unique(r, node, node.value, names, "route name")


def _check_overlaps(r: _Reader, routes: list[tuple[_Node, RouteSettings]]) -> None:
    """Two routes that would tie for a request: the later one is reported."""
    for index, (item, route) in enumerate(routes):
        for earlier_item, earlier in routes[:index]:
            if _overlap(earlier, route):
                methods = (
                    "any method"
                    if route.methods is None or earlier.methods is None
                    else (", ".join(x for x in route.methods if x in earlier.methods))
                )
                r.report(
                    item.line,
                    item.path,
                    f"overlaps route {earlier.name!r} (line {earlier_item.line}): same host "
                    f"and path {route.path!r}, both match {methods}",
                )
                break


def _overlap(a: RouteSettings, b: RouteSettings) -> bool:
    if (a.host, a.path) != (b.host, b.path):
        return False
    return a.methods is None or b.methods is None or bool(set(a.methods) & set(b.methods))


def load(path: str | Path, environ: Mapping[str, str] | None = None) -> Settings:
    """Read, substitute ``${VAR}``, validate and type the file at ``path``.

    Raises ``ConfigError`` listing every problem; ``environ`` defaults to ``os.environ``.
    Side effect: ``tokens.keys_dir`` is created (mode 0700) if missing; failure to create it
    is a config problem.
    """
    r = _Reader(str(path), os.environ if environ is None else environ)
    root = r.parse(Path(path))
    sections = r.fields(root, _TOP_KEYS)
    server = _server(r, sections.get("server"))
    tokens = _tokens(r, sections.get("tokens"), server.public_url)
    settings = Settings(
        routes=_routes(r, sections.get("routes")),
        server=server,
        database=_database(r, sections.get("database")),
        tokens=tokens,
        accounts=_accounts(r, sections.get("accounts")),
        issuers=_issuers(r, sections.get("issuers"), tokens.issuer),
        headers=_headers(r, sections.get("headers")),
        cors=_cors(r, sections.get("cors")),
        source=Path(path),
    )
    if r.problems:
        raise ConfigError(sorted(r.problems, key=lambda p: p.line))
    return settings
