"""The proxied request path in one process, sockets faked: Python CPU per request.

wrk runs measure everything at once (kernel, loop, Python) on a machine whose speed drifts by
a fifth from minute to minute. This harness runs the real edge, gateway and upstream pool on
one connection with a canned upstream answer and no system call, and reports the CPU time per
request over several rounds: the best round is the least disturbed one. It is for comparing
two versions of the code on the same machine in the same minute, not for absolute figures.

    python bench/inprocess.py [--requests 20000] [--rounds 5] [--profile] [--keys-dir DIR]

With ``--keys-dir`` the signing keys are kept there between runs (made once): runs under an
instruction counter (valgrind) are then deterministic, not dominated by key generation.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.app import LIVE, create_app  # noqa: E402
from gateway.cli import load_settings  # noqa: E402
from gateway.server import GatewayProtocol, GatewayServer  # noqa: E402
from gateway.upstream import Origin, _Connection  # noqa: E402

UPSTREAM = "http://127.0.0.1:9"  # never connected: the pool is handed a fake connection
CONFIG = """\
server: {{host: 127.0.0.1, port: 9, public_url: "http://127.0.0.1:9", admin: null}}
database: {{url: "sqlite:///{dir}/bench.db"}}
tokens: {{keys_dir: "{keys}", access_ttl: 1h}}
accounts: {{bcrypt_rounds: 4}}
routes:
  - {{name: api, path: /api, upstream: "{upstream}"}}
"""
ANSWER = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 30 Nov 2026 01:26:50 GMT\r\n"
    b"Content-Type: application/json\r\nContent-Length: 24\r\nConnection: keep-alive\r\n\r\n"
    b'{"ok":true,"from":"ngx"}'
)


class _Transport:
    """Enough of a transport for the edge and the pool; ``on_write`` sees every write."""

    def __init__(self, on_write: Any, peer: tuple[str, int] | None = None) -> None:
        self.on_write = on_write
        self.peer = peer

    def write(self, data: bytes) -> None:
        self.on_write(data)

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name in ("peername", "sockname") else default

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...
    def can_write_eof(self) -> bool:
        return False


async def run_round(server: GatewayServer, request: bytes, count: int) -> float:
    """CPU seconds per request for ``count`` requests, one after the other, one connection."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    answered = 0
    protocol: GatewayProtocol = server()

    def on_response(data: bytes) -> None:
        nonlocal answered
        if not data.startswith(b"HTTP/1.1 200 ") or not data.endswith(ANSWER[-24:]):
            if not done.done():  # measuring refusals would be measuring the wrong path
                done.set_exception(RuntimeError(f"not the upstream's answer: {data[:200]!r}"))
            return
        answered += 1
        if answered >= count:
            done.set_result(None)
        else:
            loop.call_soon(protocol.data_received, request)

    protocol.connection_made(_Transport(on_response, ("127.0.0.1", 40000)))  # type: ignore[arg-type]
    started = time.process_time()
    protocol.data_received(request)
    await done
    return (time.process_time() - started) / count


async def main(requests: int, rounds: int, profile: bool, keys_dir: str | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "bench.yaml"
        config.write_text(
            CONFIG.format(dir=tmp, keys=keys_dir or f"{tmp}/keys", upstream=UPSTREAM)
        )
        app = create_app(load_settings(str(config)))
        gateway = app[LIVE].current
        await gateway.start()
        try:
            token, _ = gateway.tokens.issue_access_token(
                user_id="00000000-0000-4000-8000-000000000001",
                email="bench@example.com",
                name=None,
                roles=("user",),
            )
            request = (
                b"GET /api/x HTTP/1.1\r\nHost: 127.0.0.1:9\r\nUser-Agent: wrk\r\n"
                b"Authorization: Bearer " + token.encode() + b"\r\n\r\n"
            )
            loop = asyncio.get_running_loop()
            pool = gateway.forwarder.pool
            origin = Origin.of(UPSTREAM)
            conn = _Connection(pool, origin)
            conn.connection_made(
                _Transport(lambda _: loop.call_soon(conn.data_received, ANSWER))  # type: ignore[arg-type]
            )
            pool._all.add(conn)
            pool._idle.setdefault(origin, []).append(conn)
            server = GatewayServer(app[LIVE].handle)
            results = [await run_round(server, request, requests) for _ in range(rounds)]
            print(
                "CPU per request, µs: "
                + ", ".join(f"{r * 1e6:.1f}" for r in results)
                + f"; best {min(results) * 1e6:.1f}"
            )
            if profile:
                profiler = cProfile.Profile()
                profiler.enable()
                await run_round(server, request, requests)
                profiler.disable()
                pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
        finally:
            await gateway.close()


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="cProfile one more round")
    parser.add_argument("--keys-dir", help="keep the signing keys here between runs")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main(args.requests, args.rounds, args.profile, args.keys_dir))


if __name__ == "__main__":
    cli()
