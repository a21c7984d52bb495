"""``gateway demo``: the gateway and an echo upstream on loopback, with a curl walkthrough.

The echo upstream listens where the first route points, so the demo config's routes work
unchanged; the walkthrough uses the configured prefix and port.
"""

from __future__ import annotations

import yarl
from aiohttp import web

from gateway.config import Settings
from gateway.echo import create_echo_app
from gateway.lifecycle import serve


def walkthrough(settings: Settings) -> str:
    base = f"http://{settings.server.host}:{settings.server.port}"
    p = settings.accounts.prefix
    protected = next((r.path for r in settings.routes if r.auth == "required"), "/api")
    return f"""
Gateway demo running on {base} (echo upstream behind it). Try:

  # 1. register an account
  curl -s -X POST {base}{p}/register -H 'Content-Type: application/json' \\
       -d '{{"email": "ada@example.com", "password": "correct horse battery"}}'

  # 2. log in and keep the access token
  TOKEN=$(curl -s -X POST {base}{p}/login -H 'Content-Type: application/json' \\
       -d '{{"email": "ada@example.com", "password": "correct horse battery"}}' \\
       | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')

  # 3. call a protected route: the echo upstream shows the X-User-* headers it received
  curl -s {base}{protected}/hello -H "Authorization: Bearer $TOKEN"

  # 4. without a token: 401 problem+json
  curl -si {base}{protected}/hello

  # 5. a forged identity header never reaches the upstream
  curl -s {base}{protected}/hello -H "Authorization: Bearer $TOKEN" -H 'X-User-Id: admin'

  # 6. your profile
  curl -s {base}{p}/profile -H "Authorization: Bearer $TOKEN"

Press Ctrl-C to stop.
"""


async def run_demo(settings: Settings) -> None:
    upstream = yarl.URL(settings.routes[0].upstreams[0])
    runner = web.AppRunner(create_echo_app())
    await runner.setup()
    await web.TCPSite(runner, upstream.host or "127.0.0.1", upstream.port).start()
    try:
        await serve(settings, ready=lambda: print(walkthrough(settings), flush=True))
    finally:
        await runner.cleanup()
