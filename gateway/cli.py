"""The ``gateway`` command line (CONTRACT §2).

The only module that prints or chooses exit codes. Every failure is one line on stderr and a
non-zero exit: 1 for bad input or a failed check, 2 for usage errors (argparse).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from gateway import accesslog
from gateway import config as config_module
from gateway.config import Settings
from gateway.errors import ConfigError, GatewayError

DEFAULT_CONFIG = "config/gateway.yaml"


class CliError(Exception):
    """A one-line message for stderr; the command exits 1."""


def default_config_path() -> str:
    return os.environ.get("GATEWAY_CONFIG") or DEFAULT_CONFIG


def load_settings(path: str) -> Settings:
    return config_module.load(path)


# -- commands -----------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.lifecycle import serve
    from gateway.workers import WORKER_ENV, Supervisor, worker_count

    settings = load_settings(args.config)
    _install_uvloop()
    reread = lambda: load_settings(args.config)  # noqa: E731 - SIGHUP reads the same file
    is_worker = WORKER_ENV in os.environ
    if not is_worker and worker_count(settings.server.workers) > 1:
        return asyncio.run(Supervisor(args.config, settings, reread).run())
    asyncio.run(serve(settings, reload=reread, worker=is_worker))
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    load_settings(args.config)
    print("ok")
    return 0


def cmd_routes(args: argparse.Namespace) -> int:
    from gateway.routing import RouteTable

    settings = load_settings(args.config)
    rows = [("NAME", "HOST", "PATH", "METHODS", "AUTH", "UPSTREAM")]
    for route in RouteTable(settings.routes):
        rows.append(
            (
                route.name,
                route.host or "*",
                route.path,
                ",".join(route.methods) if route.methods else "*",
                route.auth,
                " ".join(route.upstreams),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        padded = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)]
        print("  ".join([*padded, row[-1]]).rstrip())
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from gateway.explain import explain

    settings = load_settings(args.config)
    for line in explain(settings, args.method.upper(), args.url, token=args.token):
        print(line)
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from gateway.tokens import KeyRing

    settings = load_settings(args.config)
    # Never generate a key as a side effect: `rotate` makes the first one itself.
    ring = KeyRing.load(settings.tokens, create=False)
    if args.action == "rotate":
        info = ring.rotate()
        print(f"new signing key {info.kid}")
    elif args.action == "remove":
        ring.remove(args.kid)
        print(f"removed {args.kid}")
    for info in ring.keys():
        marker = "  (signing)" if info.signing else ""
        print(f"{info.kid}  {info.algorithm}{marker}")
    return 0


def cmd_users(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    return asyncio.run(_users(settings, args))


async def _users(settings: Settings, args: argparse.Namespace) -> int:
    from gateway.accounts import AccountService, open_store
    from gateway.passwords import PasswordHasher
    from gateway.tokens import KeyRing, TokenService

    store = open_store(settings.database.url)
    hasher = PasswordHasher(settings.accounts.bcrypt_rounds)
    await store.open()
    try:
        tokens = TokenService(settings.tokens, KeyRing.load(settings.tokens))
        service = AccountService(store, hasher, tokens, settings.accounts, settings.tokens)
        if args.action == "add":
            password = _read_password(args.password_stdin)
            user = await service.add_user(
                args.email, password, name=args.name, roles=_roles(args.roles)
            )
            print(json.dumps(user.public()))
        elif args.action == "list":
            for user in await service.list_users():
                state = "disabled" if user.disabled else "active"
                print(f"{user.id}  {user.email}  {','.join(user.roles)}  {state}")
        elif args.action in ("disable", "enable"):
            user = await service.set_disabled(args.email, args.action == "disable")
            print(f"{user.email} {args.action}d")
        elif args.action == "roles":
            user = await service.set_roles(args.email, _roles(args.roles) or ())
            print(f"{user.email} roles: {','.join(user.roles)}")
    finally:
        await store.close()
        hasher.close()
    return 0


def _roles(raw: str | None) -> tuple[str, ...] | None:
    if raw is None:
        return None
    return tuple(r.strip() for r in raw.split(",") if r.strip())


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        return line[:-1] if line.endswith("\n") else line
    if not sys.stdin.isatty():
        raise CliError("no terminal to ask for the password: use --password-stdin")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Repeat password: ") != first:
        raise CliError("the passwords do not match")
    return first


def cmd_echo(args: argparse.Namespace) -> int:
    from gateway.echo import run_echo

    _install_uvloop()
    run_echo(args.host, args.port)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    settings = load_settings(args.config)
    _install_uvloop()
    asyncio.run(run_demo(settings))
    return 0


# -- plumbing -----------------------------------------------------------------------------


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # optional: plain asyncio works, only slower
        return
    uvloop.install()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"gateway: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    # -c is accepted before or after the command; SUPPRESS keeps a subcommand's absent -c
    # from overwriting one given before it.
    common = _Parser(add_help=False)
    common.add_argument("-c", "--config", default=argparse.SUPPRESS, metavar="FILE")
    parser = _Parser(prog="gateway", description="Authentication gateway")
    parser.add_argument("-c", "--config", default=default_config_path(), metavar="FILE")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str) -> Any:
        p = sub.add_parser(name, parents=[common], help=help)
        p.set_defaults(func=func)
        return p

    add("serve", cmd_serve, "run the gateway")
    add("check-config", cmd_check_config, "validate the configuration")
    add("routes", cmd_routes, "print the route table in match order")
    explain = add("explain", cmd_explain, "show how a request would be handled")
    explain.add_argument("method")
    explain.add_argument("url")
    explain.add_argument("--token")

    users = add("users", cmd_users, "account administration")
    users_sub = users.add_subparsers(dest="action", required=True, parser_class=_Parser)
    u_add = users_sub.add_parser("add", parents=[common])
    u_add.add_argument("email")
    u_add.add_argument("--name")
    u_add.add_argument("--roles")
    u_add.add_argument("--password-stdin", action="store_true")
    users_sub.add_parser("list", parents=[common])
    for action in ("disable", "enable"):
        users_sub.add_parser(action, parents=[common]).add_argument("email")
    u_roles = users_sub.add_parser("roles", parents=[common])
    u_roles.add_argument("email")
    u_roles.add_argument("roles")

    keys = add("keys", cmd_keys, "signing keys")
    keys_sub = keys.add_subparsers(dest="action", required=True, parser_class=_Parser)
    keys_sub.add_parser("list", parents=[common])
    keys_sub.add_parser("rotate", parents=[common])
    keys_sub.add_parser("remove", parents=[common]).add_argument("kid")

    echo = add("echo", cmd_echo, "a tiny upstream that echoes requests as JSON")
    echo.add_argument("--host", default="127.0.0.1")
    echo.add_argument("--port", type=int, default=9000)
    add("demo", cmd_demo, "gateway + echo upstream with a curl walkthrough")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    accesslog.send_to(sys.stdout)  # JSON lines on stdout; everything else on stderr
    # While a database is down, asyncpg logs a traceback per reconnect attempt; the gateway
    # already says once, in one line, that the database is unavailable.
    logging.getLogger("asyncpg.pool").setLevel(logging.ERROR)
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as err:
        for problem in err.problems:
            print(problem, file=sys.stderr)
        return 1
    except (CliError, GatewayError) as err:
        print(f"gateway: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # one line, no traceback: the operator needs the message
        print(f"gateway: {type(err).__name__}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
