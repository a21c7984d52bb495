"""The app: one request path from raw target to upstream, and the process that serves it.

Every request is canonicalized once; the gateway's own endpoints are looked up on that
canonical path, then the route table, then the route's policy, then the forwarder — which
sends upstream exactly the path the policy was evaluated on.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from gateway import headers as hdr
from gateway.accounts import AccountService, open_store
from gateway.config import Settings
from gateway.errors import Forbidden, MethodNotAllowed, Unauthorized
from gateway.handlers import Handler, OwnEndpoints
from gateway.identity import Identity
from gateway.issuers import ExternalVerifier
from gateway.metrics import NO_ROUTE, OWN_ENDPOINT, Metrics
from gateway.middleware import (
    REQUEST_ID,
    make_cors_hook,
    preflight_response,
    problem_middleware,
)
from gateway.passwords import PasswordHasher
from gateway.policy import bearer_token, decide
from gateway.proxy import Forwarder, is_websocket_upgrade
from gateway.routing import (
    RouteMatch,
    RouteTable,
    canonical_path,
    request_target,
    valid_host,
)
from gateway.server import DEFAULT_LIMITS, GatewayRunner
from gateway.tokens import KeyRing, TokenService

log = logging.getLogger("gateway")

METRICS = web.AppKey("metrics", Metrics)
PRUNE_INTERVAL = 600  # seconds between housekeeping rounds


class Gateway:
    """The request path, built once from settings; holds no per-request state."""

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.keyring = KeyRing.load(settings.tokens)
        self.tokens = TokenService(settings.tokens, self.keyring, clock=clock)
        self.store = open_store(settings.database.url)
        self.hasher = PasswordHasher(settings.accounts.bcrypt_rounds)
        self.accounts = AccountService(
            self.store, self.hasher, self.tokens, settings.accounts, settings.tokens, clock=clock
        )
        self.routes = RouteTable(settings.routes)
        # The audience of identity assertions: the origins of each route's upstreams.
        self.origins = {
            route.name: tuple(dict.fromkeys(str(URL(u).origin()) for u in route.upstreams))
            for route in settings.routes
        }
        self.header_policy = hdr.HeaderPolicy(settings.headers, settings.server.trusted_proxies)
        self.forwarder = Forwarder(max_body_size=settings.server.max_body_size)
        self._issuer_session: aiohttp.ClientSession | None = None
        self.metrics = Metrics()
        self.external = ExternalVerifier(
            settings.issuers,
            self._jwks_session,
            clock=clock,
            default_leeway=settings.tokens.leeway,
            observer=self.metrics.jwks_fetched,
        )
        self.own = OwnEndpoints(
            settings=settings,
            accounts=self.accounts,
            tokens=self.tokens,
            keyring=self.keyring,
            client_ip=self.client_ip,
            identify=self.identify,
            verify_handler=self.forward_auth,
        )

    # -- resources -------------------------------------------------------------------

    async def resources(self, app: web.Application) -> AsyncIterator[None]:
        """``cleanup_ctx``: open the store and upstream pool, close them on shutdown."""
        await self.store.open()
        await self.forwarder.start()
        housekeeping = asyncio.create_task(self._prune_forever())
        # Issuers' keys are fetched in the background: a provider that is down must not stop
        # the gateway from starting (its tokens get 401 until the keys arrive).
        prefetch = asyncio.create_task(self.external.prefetch())
        try:
            yield
        finally:
            housekeeping.cancel()
            prefetch.cancel()
            await self.external.aclose()
            if self._issuer_session is not None:
                await self._issuer_session.close()
            await self.forwarder.close()
            await self.store.close()
            self.hasher.close()

    def _jwks_session(self) -> aiohttp.ClientSession:
        """The session for issuers' discovery and JWKS, made on first use. No cookie jar: a
        provider must not be able to set cookies the session then sends to another."""
        if self._issuer_session is None:
            self._issuer_session = aiohttp.ClientSession(
                cookie_jar=aiohttp.DummyCookieJar(), trust_env=False
            )
        return self._issuer_session

    async def _prune_forever(self) -> None:
        """Keep the rate-event and refresh-token tables small; a failure only waits a round."""
        while True:
            try:
                await self.accounts.prune()
            except Exception:
                log.warning("housekeeping failed; retrying in %ds", PRUNE_INTERVAL, exc_info=True)
            await asyncio.sleep(PRUNE_INTERVAL)

    # -- who is asking ---------------------------------------------------------------

    async def identify(self, token: str) -> Identity:
        """The identity behind a bearer token: an external issuer's when its ``iss`` names a
        configured issuer (checked against that issuer's keys only), else one of ours."""
        if self.external.issuer_for(token) is not None:
            return await self.external.verify(token)
        return self.tokens.verify(token)

    def peer_trusted(self, request: web.Request) -> bool:
        return self.header_policy.trusts(request.remote)

    def client_ip(self, request: web.Request) -> str:
        return hdr.client_ip(
            request.remote,
            request.headers.getall("X-Forwarded-For", []),
            self.settings.server.trusted_proxies,
        )

    # -- the request path ------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        request[REQUEST_ID] = hdr.request_id(request.headers.get("X-Request-Id"))
        started = time.perf_counter()
        label, status = NO_ROUTE, 500
        try:
            preflight = preflight_response(request, self.settings.cors)
            if preflight is not None:
                label = OWN_ENDPOINT
                response: web.StreamResponse = preflight
            else:
                target = request_target(request.raw_path, request.headers.get("Host"))
                path = canonical_path(target.path)
                own = self.own.table.get(path)
                if own is not None:
                    label = OWN_ENDPOINT
                    response = await self._own_endpoint(request, own)
                else:
                    match = self.routes.match(request.method, target.host, path)
                    label = match.route.name
                    response = await self._proxy(request, match, target.host)
            status = response.status
            return response
        except (Unauthorized, Forbidden) as err:
            self.metrics.auth_failures.labels(getattr(err, "reason", err.code)).inc()
            status = err.status
            raise
        except web.HTTPException as exc:
            status = exc.status
            raise
        except Exception as err:
            status = getattr(err, "status", 500)
            raise
        finally:
            self.metrics.requests.labels(label, str(status)).inc()
            self.metrics.request_duration.labels(label).observe(time.perf_counter() - started)

    async def _own_endpoint(
        self, request: web.Request, handlers: dict[str, Handler]
    ) -> web.StreamResponse:
        handler = handlers.get(request.method)
        if handler is None:
            raise MethodNotAllowed(tuple(sorted(handlers)))
        return await handler(request)

    async def _proxy(
        self, request: web.Request, match: RouteMatch, host: str | None
    ) -> web.StreamResponse:
        route = match.route
        token = None if route.auth == "public" else self._bearer(request)
        identity = decide(route, await self.identify(token) if token is not None else None)
        upstream_headers = self._upstream_headers(request, identity, match, host)
        started = time.perf_counter()
        try:
            if route.websocket and is_websocket_upgrade(request):
                return await self.forwarder.forward_websocket(
                    request,
                    route=route,
                    upstream_path=match.upstream_path,
                    headers=upstream_headers,
                )
            return await self.forwarder.forward(
                request,
                route=route,
                upstream_path=match.upstream_path,
                headers=upstream_headers,
            )
        except Exception as err:
            status = getattr(err, "status", None)
            if status in (502, 504):
                kind = "timeout" if status == 504 else "unreachable"
                self.metrics.upstream_errors.labels(route.name, kind).inc()
            raise
        finally:
            self.metrics.upstream_duration.labels(route.name).observe(time.perf_counter() - started)

    def _bearer(self, request: web.Request) -> str | None:
        return bearer_token(request.headers.getall("Authorization", []))

    def _upstream_headers(
        self, request: web.Request, identity: Identity | None, match: RouteMatch, host: str | None
    ) -> CIMultiDict[str]:
        trusted = self.peer_trusted(request)
        out = hdr.clean_request_headers(
            self.header_policy,
            request.headers,
            peer_trusted=trusted,
            websocket=match.route.websocket,
            forward_authorization=match.route.forward_authorization,
        )
        if identity is not None:
            out.extend(hdr.identity_header_values(self.settings.headers, identity))
            assertion = self.settings.headers.assertion
            if assertion:
                audience = self.origins[match.route.name]
                out[assertion] = self.tokens.issue_assertion(identity, audience)
        chain = request.headers.getall("X-Forwarded-For", [])
        out.extend(
            hdr.forwarded_headers(
                client_ip=self.client_ip(request),
                proto=hdr.forwarded_proto(
                    request.scheme,
                    request.headers.getall("X-Forwarded-Proto", []),
                    peer_trusted=trusted,
                ),
                host=host,
                existing_xff=", ".join(chain) if chain else None,
                peer_trusted=trusted,
                peer=request.remote,
            )
        )
        out["X-Request-Id"] = request[REQUEST_ID]
        return out

    # -- forward-auth (nginx auth_request, Traefik ForwardAuth, Caddy forward_auth) ----

    async def forward_auth(self, request: web.Request) -> web.Response:
        """``GET {p}/verify``: the policy of the route the proxy is asking about."""
        token = self._bearer(request)
        original_uri = request.headers.get("X-Forwarded-Uri") or request.headers.get(
            "X-Original-URI"
        )
        if original_uri:
            method = (
                request.headers.get("X-Forwarded-Method")
                or request.headers.get("X-Original-Method")
                or "GET"
            )
            host = valid_host(request.headers.get("X-Forwarded-Host")) or valid_host(
                request.headers.get("Host")
            )
            target = original_uri.partition("?")[0]
            path = canonical_path(target if target.startswith("/") else "/" + target)
            route = self.routes.match(method.upper(), host, path).route
            # A public route's credentials are not examined, as when proxying.
            looked_at = token if route.auth != "public" else None
            identity = decide(route, await self.identify(looked_at) if looked_at else None)
        elif token is None:
            raise Unauthorized("A bearer token is required.")
        else:
            identity = await self.identify(token)
        headers = {"Cache-Control": "no-store"}
        if identity is not None:
            headers.update(hdr.identity_header_values(self.settings.headers, identity))
        return web.Response(status=200, headers=headers)


GATEWAY = web.AppKey("gateway", Gateway)


def create_app(settings: Settings, *, clock: Callable[[], float] = time.time) -> web.Application:
    """The public application. ``app[GATEWAY]`` exposes the wired parts to the CLI and tests."""
    gateway = Gateway(settings, clock=clock)
    app = web.Application(
        middlewares=[problem_middleware],
        client_max_size=settings.server.max_body_size,
        # Sizes and keep-alive for any runner; GatewayRunner (serve) adds the deadlines.
        handler_args=DEFAULT_LIMITS.handler_args(),
    )
    app[GATEWAY] = gateway
    app[METRICS] = gateway.metrics
    app.cleanup_ctx.append(gateway.resources)
    app.on_response_prepare.append(make_cors_hook(settings.cors))
    # [\s\S]: also paths with an (encoded) newline reach the handler, which refuses them.
    app.router.add_route("*", r"/{tail:[\s\S]*}", gateway.handle)
    return app


def create_admin_app(metrics: Metrics) -> web.Application:
    """The admin listener: ``/metrics`` lives here, never on the public port."""

    async def render_metrics(request: web.Request) -> web.Response:
        body, content_type = metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    admin = web.Application()
    admin.router.add_get("/metrics", render_metrics)
    admin.router.add_get("/healthz", healthz)
    return admin


async def serve(settings: Settings, *, ready: Callable[[], None] | None = None) -> None:
    """Run until SIGINT/SIGTERM, then stop accepting and let in-flight requests finish."""
    if settings.server.workers != 1:
        # Several processes on one port arrive with scale-out; say so rather than pretend.
        log.warning("server.workers=%d: this version runs one process", settings.server.workers)
    app = create_app(settings)
    runners = [GatewayRunner(app, shutdown_timeout=settings.server.shutdown_grace)]
    if settings.server.admin is not None:
        runners.append(GatewayRunner(create_admin_app(app[METRICS])))
    for runner in runners:
        await runner.setup()
    server = settings.server
    await web.TCPSite(runners[0], server.host, server.port, backlog=1024).start()
    if server.admin is not None:
        await web.TCPSite(runners[1], server.admin.host, server.admin.port).start()
    log.info("gateway listening on http://%s:%d", server.host, server.port)
    if ready is not None:
        ready()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("gateway stopping: draining in-flight requests")
        for runner in reversed(runners):
            await runner.cleanup()
