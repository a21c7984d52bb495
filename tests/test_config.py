"""gateway.config: every operator mistake is FILE:LINE: path: message; good files become settings."""

from __future__ import annotations

import ipaddress
import os
import stat
import textwrap
from pathlib import Path

import pytest

from gateway import config
from gateway.config import ConfigError, Rate, Secret, Settings, load

REPO = Path(__file__).resolve().parent.parent
ROUTE = """\
routes:
  - name: api
    path: /api
    upstream: http://127.0.0.1:9000
"""
SECRET = "s3cr3t-value-that-must-never-leak-0123456789"


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # keys_dir (data/keys by default) is created relative to the working directory.
    monkeypatch.chdir(tmp_path)


def write(text: str, name: str = "gw.yaml") -> str:
    Path(name).write_text(textwrap.dedent(text), encoding="utf-8")
    return name


def problems(text: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(write(text), environ or {})
    return [str(p) for p in caught.value.problems]


# ----------------------------------------------------------------------------------------
# Broken files: (case id, yaml, the exact "FILE:LINE: path:" prefix of every problem)

BROKEN = [
    ("unknown-top-key", "sevrer: {}\n" + ROUTE, ["gw.yaml:1: sevrer:"]),
    (
        "unknown-nested-key",
        "server:\n  host: 0.0.0.0\n  prot: 1\n" + ROUTE,
        ["gw.yaml:3: server.prot:"],
    ),
    ("unknown-route-key", ROUTE + "    upstreams: http://x\n", ["gw.yaml:5: routes[0].upstreams:"]),
    ("port-range", "server:\n  port: 70000\n" + ROUTE, ["gw.yaml:2: server.port:"]),
    ("port-bool", "server:\n  port: true\n" + ROUTE, ["gw.yaml:2: server.port:"]),
    ("port-string", "server:\n  port: '8080'\n" + ROUTE, ["gw.yaml:2: server.port:"]),
    ("workers-negative", "server:\n  workers: -1\n" + ROUTE, ["gw.yaml:2: server.workers:"]),
    (
        "public-url-scheme",
        "server:\n  public_url: ftp://x\n" + ROUTE,
        ["gw.yaml:2: server.public_url:"],
    ),
    (
        "bad-cidr",
        "server:\n  trusted_proxies:\n    - 10.0.0.0/8\n    - banana\n" + ROUTE,
        ["gw.yaml:4: server.trusted_proxies[1]:"],
    ),
    (
        "bad-size",
        "server:\n  max_body_size: 10 parsecs\n" + ROUTE,
        ["gw.yaml:2: server.max_body_size:"],
    ),
    (
        "admin-port",
        "server:\n  admin: {host: 127.0.0.1, port: 0}\n" + ROUTE,
        ["gw.yaml:2: server.admin.port:"],
    ),
    ("admin-on-public-port", "server:\n  port: 9091\n" + ROUTE, ["gw.yaml:2: server.port:"]),
    ("db-scheme", "database:\n  url: mysql://db/x\n" + ROUTE, ["gw.yaml:2: database.url:"]),
    ("algorithm", "tokens:\n  algorithm: none\n" + ROUTE, ["gw.yaml:2: tokens.algorithm:"]),
    (
        "hs256-no-secret",
        "tokens:\n  audience: x\n  algorithm: HS256\n" + ROUTE,
        ["gw.yaml:3: tokens.secret:"],
    ),
    (
        "hs256-short",
        "tokens:\n  algorithm: HS256\n  secret: tooshort\n" + ROUTE,
        ["gw.yaml:3: tokens.secret:"],
    ),
    ("secret-with-rs256", f"tokens:\n  secret: {SECRET}\n" + ROUTE, ["gw.yaml:2: tokens.secret:"]),
    (
        "bad-duration",
        "tokens:\n  access_ttl: 15\n  leeway: 5 minutes\n" + ROUTE,
        ["gw.yaml:2: tokens.access_ttl:", "gw.yaml:3: tokens.leeway:"],
    ),
    ("zero-ttl", "tokens:\n  access_ttl: 0s\n" + ROUTE, ["gw.yaml:2: tokens.access_ttl:"]),
    (
        "prefix-trailing-slash",
        "accounts:\n  prefix: /auth/\n" + ROUTE,
        ["gw.yaml:2: accounts.prefix:"],
    ),
    ("prefix-relative", "accounts:\n  prefix: auth\n" + ROUTE, ["gw.yaml:2: accounts.prefix:"]),
    (
        "registration",
        "accounts:\n  registration: maybe\n" + ROUTE,
        ["gw.yaml:2: accounts.registration:"],
    ),
    (
        "bcrypt-rounds",
        "accounts:\n  bcrypt_rounds: 3\n" + ROUTE,
        ["gw.yaml:2: accounts.bcrypt_rounds:"],
    ),
    (
        "min-length",
        "accounts:\n  password_min_length: 0\n" + ROUTE,
        ["gw.yaml:2: accounts.password_min_length:"],
    ),
    (
        "bad-rate",
        "accounts:\n  login_rate_limit: 10/week\n" + ROUTE,
        ["gw.yaml:2: accounts.login_rate_limit:"],
    ),
    (
        "role-with-comma",
        "accounts:\n  default_roles: [user, 'a,b']\n" + ROUTE,
        ["gw.yaml:2: accounts.default_roles[1]:"],
    ),
    ("header-name", "headers:\n  id: X User\n" + ROUTE, ["gw.yaml:2: headers.id:"]),
    (
        "header-reserved",
        "headers:\n  email: Authorization\n" + ROUTE,
        ["gw.yaml:2: headers.email:"],
    ),
    (
        "header-duplicate",
        "headers:\n  id: X-Who\n  email: x-who\n" + ROUTE,
        ["gw.yaml:3: headers.email:"],
    ),
    ("strip-everything", "headers:\n  strip: ['*']\n" + ROUTE, ["gw.yaml:2: headers.strip[0]:"]),
    (
        "cors-star-credentials",
        "cors:\n  allow_origins: ['*']\n  allow_credentials: true\n" + ROUTE,
        ["gw.yaml:3: cors.allow_credentials:"],
    ),
    (
        "cors-origin-path",
        "cors:\n  allow_origins: [https://a.example/app]\n" + ROUTE,
        ["gw.yaml:2: cors.allow_origins[0]:"],
    ),
    ("routes-missing", "server: {}\n", ["gw.yaml:1: routes:"]),
    ("routes-empty", "server: {}\nroutes: []\n", ["gw.yaml:2: routes:"]),
    (
        "route-upstream-ftp",
        "routes:\n  - name: a\n    path: /a\n    upstream: ftp://x\n",
        ["gw.yaml:4: routes[0].upstream:"],
    ),
    (
        "route-upstream-list",
        "routes:\n  - name: a\n    path: /a\n    upstream:\n      - http://127.0.0.1:1\n      - http://h?q=1\n",
        ["gw.yaml:6: routes[0].upstream[1]:"],
    ),
    (
        "route-upstream-empty",
        "routes:\n  - name: a\n    path: /a\n    upstream: []\n",
        ["gw.yaml:4: routes[0].upstream:"],
    ),
    (
        "route-missing-upstream",
        "routes:\n  - name: a\n    path: /a\n",
        ["gw.yaml:2: routes[0].upstream:"],
    ),
    (
        "route-path-dots",
        "routes:\n  - name: a\n    path: /x/../y\n    upstream: http://127.0.0.1:1\n",
        ["gw.yaml:3: routes[0].path:"],
    ),
    (
        "route-path-double-slash",
        "routes:\n  - name: a\n    path: /x//y\n    upstream: http://127.0.0.1:1\n",
        ["gw.yaml:3: routes[0].path:"],
    ),
    (
        "route-path-encoded-slash",
        "routes:\n  - name: a\n    path: /x%2fy\n    upstream: http://127.0.0.1:1\n",
        ["gw.yaml:3: routes[0].path:"],
    ),
    (
        "route-path-noncanonical",
        "routes:\n  - name: a\n    path: /%61pi\n    upstream: http://127.0.0.1:1\n",
        ["gw.yaml:3: routes[0].path:"],
    ),
    (
        "route-path-relative",
        "routes:\n  - name: a\n    path: api\n    upstream: http://127.0.0.1:1\n",
        ["gw.yaml:3: routes[0].path:"],
    ),
    (
        "route-methods-lower",
        ROUTE + "    methods: [GET, post]\n",
        ["gw.yaml:5: routes[0].methods[1]:"],
    ),
    ("route-methods-empty", ROUTE + "    methods: []\n", ["gw.yaml:5: routes[0].methods:"]),
    ("route-auth", ROUTE + "    auth: yes\n", ["gw.yaml:5: routes[0].auth:"]),
    (
        "route-roles-on-public",
        ROUTE + "    auth: public\n    roles: [admin]\n",
        ["gw.yaml:6: routes[0].roles:"],
    ),
    (
        "route-claims-list",
        ROUTE + "    claims: {tenant: [a]}\n",
        ["gw.yaml:5: routes[0].claims.tenant:"],
    ),
    ("route-timeout", ROUTE + "    timeout: soon\n", ["gw.yaml:5: routes[0].timeout:"]),
    ("route-bool", ROUTE + "    websocket: 'true'\n", ["gw.yaml:5: routes[0].websocket:"]),
    ("route-host", ROUTE + "    host: http://a.example/\n", ["gw.yaml:5: routes[0].host:"]),
    (
        "route-duplicate-name",
        ROUTE + "  - name: api\n    path: /b\n    upstream: http://127.0.0.1:1\n",
        ["gw.yaml:5: routes[1].name:"],
    ),
    (
        "route-overlap-later",
        ROUTE
        + "  - name: b\n    path: /api/\n    methods: [GET]\n    upstream: http://127.0.0.1:1\n",
        ["gw.yaml:5: routes[1]:"],
    ),
    (
        "route-overlap-host-normalized",
        ROUTE
        + "    host: A.Example\n  - name: b\n    host: a.example.:8443\n    path: /api\n    upstream: http://127.0.0.1:1\n",
        ["gw.yaml:6: routes[1]:"],
    ),
    (
        "issuer-http",
        "issuers:\n  - name: x\n    issuer: http://idp.example\n    audience: a\n" + ROUTE,
        ["gw.yaml:3: issuers[0].issuer:"],
    ),
    (
        "issuer-missing-audience",
        "issuers:\n  - name: x\n    issuer: https://idp.example\n" + ROUTE,
        ["gw.yaml:2: issuers[0].audience:"],
    ),
    (
        "issuer-claims-key",
        "issuers:\n  - name: x\n    issuer: https://idp.example\n    audience: a\n    claims: {group: g}\n"
        + ROUTE,
        ["gw.yaml:5: issuers[0].claims.group:"],
    ),
    (
        "issuer-duplicate",
        "issuers:\n  - {name: x, issuer: 'https://a.example', audience: a}\n"
        "  - {name: x, issuer: 'https://b.example', audience: a}\n" + ROUTE,
        ["gw.yaml:3: issuers[1].name:"],
    ),
    (
        "issuer-login-no-client",
        "issuers:\n  - name: x\n    issuer: https://idp.example\n    audience: a\n    login: true\n"
        + ROUTE,
        ["gw.yaml:5: issuers[0].login:"],
    ),
    ("duplicate-key", "server:\n  port: 1\n  port: 2\n" + ROUTE, ["gw.yaml:3: server.port:"]),
    ("non-string-key", "server:\n  1: x\n" + ROUTE, ["gw.yaml:2: server.1:"]),
    ("section-not-mapping", "server: [1]\n" + ROUTE, ["gw.yaml:1: server:"]),
    (
        "unset-variable",
        "server:\n  host: ${NOT_SET_ANYWHERE}\n" + ROUTE,
        ["gw.yaml:2: server.host:"],
    ),
    ("unterminated-variable", "server:\n  host: ${HOST\n" + ROUTE, ["gw.yaml:2: server.host:"]),
    ("bad-variable-name", "server:\n  host: ${1X}\n" + ROUTE, ["gw.yaml:2: server.host:"]),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in BROKEN], ids=[c[0] for c in BROKEN])
def test_broken_file_reports_file_line_and_path(text: str, expected: list[str]) -> None:
    found = problems(text)
    assert len(found) == len(expected), found
    for line, prefix in zip(found, expected, strict=True):
        assert line.startswith(prefix + " "), line
        assert len(line) > len(prefix) + 10, "the message must say what is wrong"


def test_messages_name_the_value_and_the_expectation() -> None:
    found = problems(ROUTE.replace("http://127.0.0.1:9000", "ftp://x") + "    timeout: soon\n")
    assert found == [
        "gw.yaml:4: routes[0].upstream: not an http(s) URL: 'ftp://x'",
        "gw.yaml:5: routes[0].timeout: not a duration: 'soon' (expected e.g. 0s, 500ms, 30s, 15m, 12h, 30d)",
    ]


def test_unknown_key_suggests_the_closest() -> None:
    (found,) = problems("server:\n  prot: 1\n" + ROUTE)
    assert "did you mean 'port'?" in found


def test_all_problems_at_once_in_file_order() -> None:
    text = (
        "routes:\n  - name: a\n    path: nope\n    upstream: ftp://x\n"
        "server:\n  port: 0\n"
        "tokens:\n  algorithm: XX256\n"
    )
    lines = [int(p.split(":")[1]) for p in problems(text)]
    assert lines == [3, 4, 6, 8]


def test_relative_and_path_file_names_are_reported_as_given(tmp_path: Path) -> None:
    Path("sub").mkdir()
    write("server:\n  port: 0\n" + ROUTE, "sub/x.yaml")
    for given in ("sub/x.yaml", Path("sub/x.yaml"), tmp_path / "sub/x.yaml"):
        with pytest.raises(ConfigError) as caught:
            load(given, {})
        assert str(caught.value).startswith(f"{given}:2: server.port: ")


# ----------------------------------------------------------------------------------------
# The file itself

FILE_LEVEL = [
    ("empty", "", 1),
    ("top-level-list", "- a\n- b\n", 1),
    ("top-level-scalar", "\n\nhello\n", 3),
    ("syntax", "server:\n  host: [unclosed\nroutes: []\n", 3),
    ("bad-indent", "server:\n  host: a\n port: 1\n", 3),
    ("two-documents", ROUTE + "---\n" + ROUTE, 5),
    ("tab", "server:\n\thost: a\n", 2),
    ("nested-too-deeply", "a: " + "[" * 5000 + "]" * 5000 + "\n", 1),
]


@pytest.mark.parametrize(
    ("text", "line"), [c[1:] for c in FILE_LEVEL], ids=[c[0] for c in FILE_LEVEL]
)
def test_unusable_file_is_one_problem(text: str, line: int) -> None:
    (found,) = problems(text)
    assert found.startswith(f"gw.yaml:{line}: (file): "), found


def test_missing_file() -> None:
    with pytest.raises(ConfigError) as caught:
        load("nope.yaml", {})
    assert [str(p) for p in caught.value.problems] == [
        "nope.yaml:1: (file): cannot read 'nope.yaml': No such file or directory"
    ]


def test_not_utf8() -> None:
    Path("gw.yaml").write_bytes(b"server:\n  host: \xff\n")
    with pytest.raises(ConfigError) as caught:
        load("gw.yaml", {})
    assert str(caught.value) == "gw.yaml:2: (file): not valid UTF-8 text"


@pytest.mark.parametrize(
    "value",
    [
        "!!python/object/apply:os.system ['true']",
        "!!python/name:os.system ''",
        "!!set {a: null}",
        "!!int abc",
        "!!float x",
        "!!timestamp 2024-99-99",
        "!!binary a",
    ],
)
def test_foreign_tags_are_refused_not_run(value: str) -> None:
    (found,) = problems(f"server:\n  host: {value}\n" + ROUTE)
    assert found.startswith("gw.yaml:2: server.host: "), found
    assert "tag" in found or "as 'tag:" in found


def test_recursive_alias_is_reported() -> None:
    found = problems("server: &a {admin: *a}\n" + ROUTE)
    assert found[0].startswith("gw.yaml:1: server.admin")


# ----------------------------------------------------------------------------------------
# ${VAR} substitution: before typing

SUBSTITUTION = [
    ("plain-int", "server:\n  port: ${P}\n", {"P": "8081"}, lambda s: s.server.port, 8081),
    ("default-int", "server:\n  port: ${P:-8082}\n", {}, lambda s: s.server.port, 8082),
    (
        "empty-takes-default",
        "server:\n  port: ${P:-8083}\n",
        {"P": ""},
        lambda s: s.server.port,
        8083,
    ),
    ("set-beats-default", "server:\n  port: ${P:-8083}\n", {"P": "9"}, lambda s: s.server.port, 9),
    (
        "bool",
        ROUTE + "    websocket: ${WS}\n",
        {"WS": "true"},
        lambda s: s.routes[0].websocket,
        True,
    ),
    (
        "inside-string",
        "server:\n  public_url: http://${H}:${P:-1}\n",
        {"H": "gw.example"},
        lambda s: s.server.public_url,
        "http://gw.example:1",
    ),
    (
        "literal-dollar-brace",
        "tokens:\n  audience: a-$${A}-${A}\n",
        {"A": "no"},
        lambda s: s.tokens.audience,
        "a-${A}-no",
    ),
    ("lone-dollar", "tokens:\n  audience: a$b\n", {}, lambda s: s.tokens.audience, "a$b"),
    (
        "default-with-colon",
        "server:\n  public_url: ${U:-http://h:9}\n",
        {},
        lambda s: s.server.public_url,
        "http://h:9",
    ),
    (
        "quoted-stays-string",
        "tokens:\n  audience: '${A}'\n",
        {"A": "123"},
        lambda s: s.tokens.audience,
        "123",
    ),
    (
        "list-item",
        ROUTE + "    roles: ['${R1}', '${R2:-ops}']\n",
        {"R1": "admin"},
        lambda s: s.routes[0].roles,
        ("admin", "ops"),
    ),
    (
        "secret-verbatim",
        "tokens:\n  algorithm: HS256\n  secret: ${S}\n",
        {"S": "1" * 40},
        lambda s: s.tokens.secret,
        Secret("1" * 40),
    ),
    (
        "value-not-reparsed",
        "tokens:\n  audience: ${A}\n",
        {"A": "${B}"},
        lambda s: s.tokens.audience,
        "${B}",
    ),
]


@pytest.mark.parametrize(
    ("text", "environ", "get", "expected"),
    [c[1:] for c in SUBSTITUTION],
    ids=[c[0] for c in SUBSTITUTION],
)
def test_substitution(text: str, environ: dict[str, str], get, expected) -> None:  # type: ignore[no-untyped-def]
    if "routes:" not in text:
        text += ROUTE
    settings = load(write(text), environ)
    value = get(settings)
    assert value == expected
    assert type(value) is type(expected)


def test_quoted_variable_is_a_string_so_a_port_is_refused() -> None:
    (found,) = problems('server:\n  port: "${P}"\n' + ROUTE, {"P": "8080"})
    assert (
        found == "gw.yaml:2: server.port: expected an integer from 1 to 65535, got a string '8080'"
    )


def test_environ_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GW_TEST_PORT", "8099")
    assert load(write("server:\n  port: ${GW_TEST_PORT}\n" + ROUTE)).server.port == 8099


def test_unset_variable_names_the_variable() -> None:
    (found,) = problems("server:\n  host: ${NOT_SET_ANYWHERE}\n" + ROUTE)
    assert "NOT_SET_ANYWHERE is not set" in found


# ----------------------------------------------------------------------------------------
# Durations, sizes, rates

DURATIONS = [
    ("0s", 0.0),
    ("30s", 30.0),
    ("15m", 900.0),
    ("12h", 43200.0),
    ("30d", 2592000.0),
    ("500ms", 0.5),
    ("1h30m", 5400.0),
    ("1.5s", 1.5),
]
SIZES = [
    (0, 0),
    (1024, 1024),
    ("100B", 100),
    ("512KiB", 524288),
    ("10MiB", 10485760),
    ("1GiB", 2**30),
    ("1KB", 1000),
    ("2MB", 2_000_000),
    ("1.5KiB", 1536),
    ("64", 64),
]
RATES = [
    ("10/s", Rate(10, 1.0)),
    ("10/min", Rate(10, 60.0)),
    ("5/h", Rate(5, 3600.0)),
    ("1000/d", Rate(1000, 86400.0)),
    ("3 / min", Rate(3, 60.0)),
]


@pytest.mark.parametrize(("text", "seconds"), DURATIONS)
def test_durations(text: str, seconds: float) -> None:
    assert config.parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(("text", "size"), SIZES)
def test_sizes(text: str | int, size: int) -> None:
    assert config.parse_size(text) == size


@pytest.mark.parametrize(("text", "rate"), RATES)
def test_rates(text: str, rate: Rate) -> None:
    assert config.parse_rate(text) == rate


@pytest.mark.parametrize(
    ("parse", "value"),
    [(config.parse_duration, v) for v in ("", "30", "-1s", "1w", "s", "1.s", 30, True, None)]
    + [(config.parse_size, v) for v in ("", "1TB", "-1", "MiB", "1.2.3KiB", True, -5, 1.5)]
    + [(config.parse_rate, v) for v in ("", "10", "10/week", "0/s", "-1/s", "x/s", 10)],
)
def test_bad_units_are_refused(parse, value: object) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError):
        parse(value)


def test_units_in_a_file() -> None:
    text = (
        "server:\n  max_body_size: 512KiB\n  shutdown_grace: 5s\n  drain_delay: 1500ms\n"
        "tokens:\n  access_ttl: 15m\n  refresh_ttl: 30d\n  leeway: 0s\n"
        "accounts:\n  login_rate_limit: 3/h\n" + ROUTE
    )
    s = load(write(text), {})
    assert (s.server.max_body_size, s.server.shutdown_grace) == (524288, 5.0)
    assert s.server.drain_delay == 1.5
    assert (s.tokens.access_ttl, s.tokens.refresh_ttl, s.tokens.leeway) == (900.0, 2592000.0, 0.0)
    assert s.accounts.login_rate_limit == Rate(3, 3600.0)


# ----------------------------------------------------------------------------------------
# Good files


def test_missing_sections_take_the_defaults() -> None:
    s = load(write(ROUTE), {})
    route = config.RouteSettings(name="api", path="/api", upstreams=("http://127.0.0.1:9000",))
    assert s == Settings(routes=(route,))
    assert s.source == Path("gw.yaml")
    assert s.server.admin == config.AdminSettings()


def test_null_sections_take_the_defaults() -> None:
    s = load(
        write("server:\ndatabase:\ntokens:\naccounts:\nheaders:\ncors:\nissuers:\n" + ROUTE), {}
    )
    assert s == Settings(routes=s.routes)


def test_values_are_typed_and_normalized() -> None:
    text = """\
        server:
          public_url: https://gw.example/
          trusted_proxies: [10.0.0.1/8, "::1"]
          admin: null
        tokens:
          algorithm: HS256
          secret: ${S}
        accounts:
          prefix: ""
          redirect_hosts: [App.Example, "localhost:3000"]
        cors:
          allow_origins: ["HTTPS://App.Example:443", "http://localhost:3000"]
          allow_credentials: true
        routes:
          - name: api
            path: /api/
            host: API.Example.:8443
            methods: [GET, POST]
            upstream: [http://127.0.0.1:9000, http://127.0.0.1:9001/base]
            claims: {tenant: acme, level: 3, admin: true}
            roles: [admin]
            scopes: [read, write]
          - name: root
            path: /
            upstream: http://127.0.0.1:9000
            auth: public
    """
    s = load(write(text), {"S": SECRET})
    assert s.server.public_url == "https://gw.example"
    assert s.tokens.issuer == "https://gw.example"
    assert s.server.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    assert s.server.admin is None
    assert s.tokens.secret == Secret(SECRET)
    assert s.accounts.prefix == ""
    assert s.accounts.redirect_hosts == ("app.example", "localhost:3000")
    assert s.cors.allow_origins == ("https://app.example", "http://localhost:3000")
    api, root = s.routes
    assert (api.path, api.host, api.methods) == ("/api", "api.example", ("GET", "POST"))
    assert api.upstreams == ("http://127.0.0.1:9000", "http://127.0.0.1:9001/base")
    assert api.claims == (("admin", True), ("level", 3), ("tenant", "acme"))
    assert (api.roles, api.scopes) == (("admin",), ("read", "write"))
    assert (root.path, root.auth, root.upstreams) == ("/", "public", ("http://127.0.0.1:9000",))


def test_same_path_with_disjoint_methods_or_hosts_is_fine() -> None:
    text = (
        ROUTE
        + """\
    methods: [GET]
  - {name: b, path: /api, methods: [POST], upstream: 'http://127.0.0.1:1'}
  - {name: c, path: /api, host: a.example, upstream: 'http://127.0.0.1:1'}
"""
    )
    assert [r.name for r in load(write(text), {}).routes] == ["api", "b", "c"]


def test_issuer_settings() -> None:
    text = """\
        issuers:
          - name: okta
            issuer: https://example.okta.com/oauth2/default
            audience: 12345
            claims: {roles: realm_access.roles}
            leeway: 60s
            client_id: 0123
            client_secret: ${CS}
            login: true
          - {name: local, issuer: 'http://127.0.0.1:8999', audience: a, jwks_uri: 'http://localhost:8999/jwks'}
    """
    s = load(write(textwrap.dedent(text) + ROUTE), {"CS": SECRET})
    okta, local = s.issuers
    assert okta == config.IssuerSettings(
        name="okta",
        issuer="https://example.okta.com/oauth2/default",
        audience="12345",
        claims=config.ClaimMapping(roles="realm_access.roles"),
        leeway=60.0,
        client_id="0123",
        client_secret=Secret(SECRET),
        login=True,
    )
    assert (local.jwks_uri, local.leeway, local.login) == (
        "http://localhost:8999/jwks",
        None,
        False,
    )


def test_yaml_merge_keys() -> None:
    text = """\
        defaults: &d
          upstream: http://127.0.0.1:9000
          auth: public
    """
    # An unknown top-level key is an error, so the anchor lives on the first route instead.
    text = """\
        routes:
          - &d {name: a, path: /a, upstream: 'http://127.0.0.1:9000', auth: public}
          - {<<: *d, name: b, path: /b}
    """
    a, b = load(write(text), {}).routes
    assert (b.name, b.path, b.upstreams, b.auth) == ("b", "/b", a.upstreams, "public")


@pytest.mark.parametrize("name", ["example.yaml", "gateway.yaml"])
def test_shipped_configs_load(name: str) -> None:
    s = load(REPO / "config" / name, {})
    assert s.routes
    assert s.tokens.algorithm == "RS256"
    assert Path("data/keys").is_dir()


def test_demo_config_is_what_the_demo_needs() -> None:
    s = load(REPO / "config" / "gateway.yaml", {"GATEWAY_PORT": "18080"})
    assert (s.server.host, s.server.port) == ("127.0.0.1", 18080)
    assert s.server.admin == config.AdminSettings("127.0.0.1", 9091)
    assert s.database.url == "sqlite:///data/gateway.db"
    assert s.accounts.bcrypt_rounds == 12
    assert {r.auth for r in s.routes} == {"required", "optional", "public"}
    assert all(r.upstreams == ("http://127.0.0.1:9000",) for r in s.routes)


def test_example_documents_every_key() -> None:
    text = (REPO / "config" / "example.yaml").read_text()
    keys = set()
    for cls in (
        config.ServerSettings,
        config.AdminSettings,
        config.DatabaseSettings,
        config.TokenSettings,
        config.AccountSettings,
        config.IssuerSettings,
        config.ClaimMapping,
        config.HeaderSettings,
        config.CorsSettings,
        config.RouteSettings,
        config.Settings,
    ):
        keys |= {f for f in cls.__dataclass_fields__}
    keys = keys - {"upstreams", "source"} | {"upstream"}
    missing = [k for k in sorted(keys) if f"{k}:" not in text]
    assert missing == []


# ----------------------------------------------------------------------------------------
# Secrets never appear in messages

SECRET_LEAKS = [
    ("short-hs256", "tokens:\n  algorithm: HS256\n  secret: {s}\n", SECRET[:20]),
    ("secret-unused", "tokens:\n  secret: {s}\n", SECRET),
    ("secret-wrong-type", "tokens:\n  algorithm: HS256\n  secret: [{s}]\n", SECRET),
    ("db-scheme", "database:\n  url: mysql://u:{s}@db/x\n", SECRET),
    ("db-no-scheme", "database:\n  url: u:{s}@db\n", SECRET),
    ("db-bad-port", "database:\n  url: postgresql://u:{s}@db:99999/x\n", SECRET),
    ("db-wrong-type", "database:\n  url: [{s}]\n", SECRET),
    (
        "client-secret-type",
        "issuers:\n  - {{name: x, issuer: 'https://i.example', audience: a, client_secret: [{s}]}}\n",
        SECRET,
    ),
    ("bad-reference-in-secret", "tokens:\n  algorithm: HS256\n  secret: ${{S:{s}}}\n", SECRET),
    ("syntax-error-on-secret-line", "tokens:\n  secret: '{s}\n  algorithm: HS256\n", SECRET),
    ("syntax-error-after-secret", "tokens:\n  secret: {s}: x\n", SECRET),
]


@pytest.mark.parametrize(
    ("template", "secret"), [c[1:] for c in SECRET_LEAKS], ids=[c[0] for c in SECRET_LEAKS]
)
def test_secrets_never_appear_in_errors(template: str, secret: str) -> None:
    text = template.format(s=secret) + ROUTE
    with pytest.raises(ConfigError) as caught:
        load(write(text), {})
    rendered = str(caught.value) + repr(caught.value.problems)
    assert caught.value.problems
    assert secret not in rendered
    assert secret[:12] not in rendered


def test_secret_from_environment_too_short_does_not_leak() -> None:
    (found,) = problems(
        "tokens:\n  algorithm: HS256\n  secret: ${S}\n" + ROUTE, {"S": "hunter2hunter2"}
    )
    assert found.startswith("gw.yaml:3: tokens.secret: ")
    assert "hunter2" not in found


def test_settings_repr_hides_the_secret() -> None:
    s = load(write("tokens:\n  algorithm: HS256\n  secret: ${S}\n" + ROUTE), {"S": SECRET})
    assert SECRET not in repr(s)
    assert s.tokens.secret is not None and s.tokens.secret.reveal() == SECRET


# ----------------------------------------------------------------------------------------
# keys_dir


def test_keys_dir_is_created_with_parents_mode_0700() -> None:
    load(write("tokens:\n  keys_dir: a/b/keys\n" + ROUTE), {})
    for path in ("a", "a/b", "a/b/keys"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o700


def test_keys_dir_not_created_for_hs256() -> None:
    load(write(f"tokens:\n  algorithm: HS256\n  secret: {SECRET}\n  keys_dir: k\n" + ROUTE), {})
    assert not Path("k").exists()


@pytest.mark.parametrize("keys_dir", ["blocker/keys", "blocker"])
def test_keys_dir_that_cannot_be_created_is_reported(keys_dir: str) -> None:
    Path("blocker").write_text("a regular file")
    (found,) = problems(f"tokens:\n  audience: a\n  keys_dir: {keys_dir}\n" + ROUTE)
    assert found.startswith("gw.yaml:3: tokens.keys_dir: "), found
    assert keys_dir in found


def test_default_keys_dir_failure_points_at_tokens() -> None:
    Path("data").write_text("a regular file")
    (found,) = problems("tokens:\n  audience: a\n" + ROUTE)
    assert found.startswith("gw.yaml:2: tokens.keys_dir: "), found


# ----------------------------------------------------------------------------------------
# tests/configs/: a broken file per mistake, for `gateway check-config` demos. The first
# line of each says what check-config must print first: "# expect: LINE: path".

BROKEN_FILES = sorted((REPO / "tests" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", BROKEN_FILES, ids=[p.stem for p in BROKEN_FILES])
def test_broken_example_files(path: Path) -> None:
    expect = path.read_text().splitlines()[0].removeprefix("# expect: ")
    with pytest.raises(ConfigError) as caught:
        load(path, {})
    assert str(caught.value.problems[0]).startswith(f"{path}:{expect}: "), str(caught.value)
    assert len(caught.value.problems) == 1, str(caught.value)


def test_there_are_a_dozen_broken_example_files() -> None:
    assert len(BROKEN_FILES) >= 12
