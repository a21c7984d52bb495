"""A tiny upstream that answers every request with what it received, as JSON.

For demos and for debugging header injection: put it behind the gateway and look at which
identity headers arrived. It echoes the raw path exactly as the gateway sent it.
"""

from __future__ import annotations

from aiohttp import web


async def _echo(request: web.Request) -> web.Response:
    body = await request.read()
    response = web.json_response(
        {
            "method": request.method,
            "path": request.raw_path.split("?", 1)[0],
            "query": request.rel_url.raw_query_string,
            "headers": [[name, value] for name, value in request.headers.items()],
            "body": body.decode("utf-8", errors="replace"),
        }
    )
    # Tells an answer of the echo from one the gateway wrote itself.
    response.headers["X-Upstream"] = "echo"
    return response


def create_echo_app() -> web.Application:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _echo)
    return app


def run_echo(host: str = "127.0.0.1", port: int = 9000) -> None:
    web.run_app(create_echo_app(), host=host, port=port, print=None)
