"""The app: one request path from raw target to upstream, swappable whole on reload.

Every request is canonicalized once; the gateway's own endpoints are looked up on that
canonical path, then the route table, then the route's policy, then the forwarder — which
sends upstream exactly the path the policy was evaluated on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

import aiohttp
from aiohttp import web
from multidict import MultiMapping
from yarl import URL

from gateway import headers as hdr
from gateway.accounts import AccountService, open_store
from gateway.accounts.store import StoreUnavailable
from gateway.config import Settings
from gateway.errors import (
    Forbidden,
    GatewayError,
    InvalidInput,
    MethodNotAllowed,
    Unauthorized,
)
from gateway.handlers import Handler, OwnEndpoints
from gateway.identity import NO_CLAIMS, Identity
from gateway.issuers import ExternalVerifier
from gateway.memo import Memo
from gateway.metrics import NO_ROUTE, OWN_ENDPOINT, Metrics
from gateway.middleware import (
    CorsHeaders,
    preflight_response,
    problem_for,
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
from gateway.server import CLIENT_CLOSED_REQUEST, EDGE_HANDLER, ClientGone, Exchange
from gateway.tokencache import VerifiedTokens
from gateway.tokens import KeyRing, TokenService
from gateway.upstream import HeadItem, head_lines

log = logging.getLogger("gateway")

METRICS = web.AppKey("metrics", Metrics)


def _field_bytes(fields: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(n.encode(), v.encode("utf-8", "surrogateescape")) for n, v in fields]


def _untrusted_forwarded(key: tuple[str | None, str, str | None]) -> bytes:
    """The forwarding fields of a request from a peer that is no trusted proxy: its own
    address, its connection's scheme and the Host it asked for (whatever it claimed)."""
    remote, scheme, host = key
    return hdr.header_block(
        _field_bytes(
            hdr.forwarded_headers(
                client_ip=hdr.client_ip(remote, (), ()),  # the peer itself, whatever it claims
                proto=hdr.forwarded_proto(scheme, (), peer_trusted=False),
                host=host,
                existing_xff=None,
                peer_trusted=False,
            )
        )
    )


class _Peer(Protocol):
    """What the client-address rules read: an ``Exchange`` or an aiohttp request."""

    @property
    def remote(self) -> str | None: ...
    @property
    def headers(self) -> MultiMapping[str]: ...


PRUNE_INTERVAL = 600  # seconds between housekeeping rounds
POOL_REPORT_INTERVAL = 5.0
STORE_START_WAIT = 5.0  # how long start waits for a database server before serving anyway


class Gateway:
    """The request path, built once from settings; holds no per-request state."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.draining = False  # set on shutdown: /readyz answers 503 from then on
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._background: list[asyncio.Task[None]] = []
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
        self.cors_headers = CorsHeaders(settings.cors)
        self.header_policy = hdr.HeaderPolicy(settings.headers, settings.server.trusted_proxies)
        self._untrusted_forwarded = Memo(_untrusted_forwarded)
        self.forwarder = Forwarder(max_body_size=settings.server.max_body_size)
        self._issuer_session: aiohttp.ClientSession | None = None
        self.metrics = metrics or Metrics()  # one registry across reloads
        self.verified = VerifiedTokens(clock)  # per gateway: a reload (new keys) starts empty
        self._routes_read_claims = any(route.claims for route in settings.routes)
        self.external = ExternalVerifier(
            settings.issuers,
            self._jwks_session,
            clock=clock,
            default_leeway=settings.tokens.leeway,
            observer=self._keys_fetched,
        )
        self.own = OwnEndpoints(
            settings=settings,
            accounts=self.accounts,
            tokens=self.tokens,
            keyring=self.keyring,
            client_ip=self.client_ip,
            identify=self.identify,
            verify_handler=self.forward_auth,
            is_draining=lambda: self.draining,
        )

    # -- resources -------------------------------------------------------------------

    async def start(self) -> None:
        """Open the store and the upstream pool; start housekeeping and the key prefetch.

        A database server that is down does not stop a gateway on PostgreSQL from starting:
        token checks need no database, so requests with valid tokens are served while the
        store keeps trying to open (account endpoints and ``/readyz`` answer 503 until then).
        A local SQLite file that cannot be opened is a configuration error: start fails.
        """
        store_up = asyncio.create_task(self._open_store())
        if not self._database_is_a_server():
            await store_up
        await self.forwarder.start()
        self._background = [
            store_up,
            asyncio.create_task(self._prune_forever()),
            asyncio.create_task(self._report_pool_forever()),
            # Issuers' keys are fetched in the background: a provider that is down must not
            # stop the gateway from starting (its tokens get 401 until the keys arrive).
            asyncio.create_task(self.external.prefetch()),
        ]
        if self._database_is_a_server():
            await asyncio.wait([store_up], timeout=STORE_START_WAIT)  # usually opens at once
            if store_up.done():
                store_up.result()  # a wrong password or a newer schema: refuse to start
            else:
                store_up.add_done_callback(_log_store_failure)

    def _database_is_a_server(self) -> bool:
        return not self.settings.database.url.lower().startswith("sqlite")

    async def _open_store(self) -> None:
        delay = 1.0
        while True:
            try:
                await self.store.open()
                return
            except StoreUnavailable as err:
                if not self._database_is_a_server():
                    raise
                log.warning("account database unavailable (%s); retrying in %.0fs", err, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    async def close(self) -> None:
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.external.aclose()
        if self._issuer_session is not None:
            await self._issuer_session.close()
        await self.forwarder.close()
        await self.store.close()
        self.hasher.close()

    async def resources(self, app: web.Application) -> AsyncIterator[None]:
        """``cleanup_ctx`` for an app serving this gateway alone (tests, tools)."""
        await self.start()
        try:
            yield
        finally:
            await self.close()

    # -- in-flight requests: what a reload or a shutdown waits for ----------------------

    def enter(self) -> None:
        self._in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()

    async def retire(self, grace: float) -> None:
        """Close once the requests in flight are done, or after ``grace`` seconds."""
        try:
            async with asyncio.timeout(grace):
                await self._idle.wait()
        except TimeoutError:
            log.warning("%d requests still in flight after %.0fs; closing", self._in_flight, grace)
        await self.close()

    def _jwks_session(self) -> aiohttp.ClientSession:
        """The session for issuers' discovery and JWKS, made on first use. No cookie jar: a
        provider must not be able to set cookies the session then sends to another."""
        if self._issuer_session is None:
            self._issuer_session = aiohttp.ClientSession(
                cookie_jar=aiohttp.DummyCookieJar(), trust_env=False
            )
        return self._issuer_session

    async def _report_pool_forever(self) -> None:
        """Database pool use for /metrics, every few seconds (workers write it to files)."""
        usage = getattr(self.store, "pool_usage", None)
        if usage is None:
            return
        while True:
            self.metrics.database_pool(usage())
            await asyncio.sleep(POOL_REPORT_INTERVAL)

    async def _prune_forever(self) -> None:
        """Keep the rate-event and refresh-token tables small; a failure only waits a round."""
        while True:
            try:
                await self.accounts.prune()
            except StoreUnavailable:
                log.warning("housekeeping skipped: the account database is unavailable")
            except Exception:
                log.warning("housekeeping failed; retrying in %ds", PRUNE_INTERVAL, exc_info=True)
            await asyncio.sleep(PRUNE_INTERVAL)

    # -- who is asking ---------------------------------------------------------------

    async def identify(self, token: str) -> Identity:
        """The identity behind a bearer token: an external issuer's when its ``iss`` names a
        configured issuer (checked against that issuer's keys only), else one of ours.
        A token verified before is answered from the cache until it expires."""
        identity = self.verified.get(token)
        if identity is not None:
            return identity
        if self.external.issuer_for(token) is not None:
            identity = await self.external.verify(token)
        else:
            identity = self.tokens.verify(token)
        if not self._routes_read_claims:
            # Nothing will read them: a cached caller need not keep its token's payload.
            identity = dataclasses.replace(identity, claims=NO_CLAIMS)
        self.verified.put(token, identity)
        return identity

    def _keys_fetched(
        self, issuer: str, reason: str, outcome: str, seconds: float, keys: int | None
    ) -> None:
        self.metrics.jwks_fetched(issuer, reason, outcome, seconds, keys)
        if outcome == "ok":
            self.verified.clear()  # a key may have been withdrawn: verify everything again

    def peer_trusted(self, request: _Peer) -> bool:
        return self.header_policy.trusts(request.remote)

    def client_ip(self, request: _Peer) -> str:
        return hdr.client_ip(
            request.remote,
            request.headers.getall("X-Forwarded-For", []),
            self.settings.server.trusted_proxies,
        )

    # -- the request path ------------------------------------------------------------

    async def handle(self, exchange: Exchange) -> None:
        """Serve one request: a CORS preflight, one of the gateway's endpoints, or a route.
        Whatever goes wrong before the response started is answered as problem+json."""
        self.enter()
        request_id = hdr.request_id(exchange.headers.get("X-Request-Id"))
        exchange.request_id = request_id
        exchange.extra_headers = [("X-Request-Id", request_id)]
        if self.cors_headers.enabled:
            exchange.extra_headers += self.cors_headers(exchange.headers.get("Origin"))
        if self.draining:
            exchange.keep_alive = False  # a client reusing the connection learns it now
        exchange.route = NO_ROUTE
        started = time.perf_counter()
        try:
            preflight = preflight_response(exchange, self.settings.cors)
            if preflight is not None:
                exchange.route = OWN_ENDPOINT
                await exchange.send_response(preflight)
                return
            target = request_target(exchange.target, exchange.headers.get("Host"))
            path = canonical_path(target.path)
            own = self.own.table.get(path)
            if own is not None:
                exchange.route = OWN_ENDPOINT
                await self._own_endpoint(exchange, own)
                return
            match = self.routes.match(exchange.method, target.host, path)
            exchange.route = match.route.name
            await self._proxy(exchange, match, target.host)
        except ClientGone:
            if not exchange.started:
                exchange.status = CLIENT_CLOSED_REQUEST
            exchange.abort()  # nobody to answer: no problem to send, no error to log
        except Exception as exc:
            self._refuse(exchange, problem_for(exc, f"{exchange.method} {exchange.target[:200]}"))
        finally:
            status = exchange.status or 500
            self.metrics.request_done(exchange.route, status, time.perf_counter() - started)
            self.leave()

    def _refuse(self, exchange: Exchange, err: GatewayError) -> None:
        if isinstance(err, Unauthorized | Forbidden):
            reason = getattr(err, "reason", err.code)
            self.metrics.auth_failures.labels(reason).inc()
            exchange.auth = "refused" if isinstance(err, Unauthorized) else "forbidden"
            exchange.auth_reason = reason
        if exchange.started:
            exchange.abort()  # the status is out already: cutting is the only signal left
        else:
            exchange.send_problem(err)

    async def _own_endpoint(self, exchange: Exchange, handlers: dict[str, Handler]) -> None:
        handler = handlers.get(exchange.method)
        if handler is None:
            raise MethodNotAllowed(tuple(sorted(handlers)))
        request = exchange.aiohttp_request()
        exchange.expect_body()
        await exchange.send_response(await handler(request))  # type: ignore[arg-type]

    async def _proxy(self, exchange: Exchange, match: RouteMatch, host: str | None) -> None:
        route = match.route
        token = None if route.auth == "public" else self._bearer(exchange)
        identity = None
        if token is not None:
            # A token seen before is answered from the cache without a coroutine.
            identity = self.verified.get(token) or await self.identify(token)
            token = None  # not held (most of a kilobyte) while the upstream answers
        identity = decide(route, identity)
        if identity is not None:
            exchange.auth = "ok"
            exchange.user_id = identity.id
        upstream_fields = self._upstream_fields(exchange, identity, match, host)
        started = time.perf_counter()
        try:
            if route.websocket and is_websocket_upgrade(exchange):
                response = await self.forwarder.forward_websocket(
                    exchange.aiohttp_request(),
                    route=route,
                    upstream_path=match.upstream_path,
                    headers=hdr.lines_as_text(head_lines(upstream_fields)),
                )
                await exchange.send_response(response)
                return
            exchange.expect_body()
            await self.forwarder.forward(
                exchange,
                route=route,
                upstream_path=match.upstream_path,
                headers=upstream_fields,
            )
        except Exception as err:
            status = getattr(err, "status", None)
            if status in (502, 504):
                kind = "timeout" if status == 504 else "unreachable"
                self.metrics.upstream_errors.labels(route.name, kind).inc()
            raise
        finally:
            upstream_seconds = time.perf_counter() - started
            exchange.upstream_seconds = upstream_seconds
            self.metrics.upstream_done(route.name, upstream_seconds)

    def _bearer(self, request: _Peer) -> str | None:
        return bearer_token(request.headers.getall("Authorization", []))

    def _upstream_fields(
        self, exchange: Exchange, identity: Identity | None, match: RouteMatch, host: str | None
    ) -> list[HeadItem]:
        """The upstream request's header fields: the client's, cleaned (the very bytes
        received, not copied again while the upstream answers), then identity, forwarding
        and request id as blocks of lines."""
        trusted = self.peer_trusted(exchange)
        route = match.route
        lines: list[HeadItem] = hdr.upstream_request_fields(  # type: ignore[assignment]
            self.header_policy,
            exchange.raw_headers,
            peer_trusted=trusted,
            websocket=route.websocket,
            forward_authorization=route.forward_authorization,
        )
        if identity is not None:
            block = self._identity_block(identity)
            if block:
                lines.append(block)
            assertion = self.settings.headers.assertion
            if assertion:
                token = self.tokens.issue_assertion(identity, self.origins[route.name])
                lines.append(assertion.encode() + b": " + token.encode())
        if trusted:
            lines.append(self._forwarded_block(exchange, host))
        else:
            # Then the fields depend on the connection only (the client's claims are dropped).
            lines.append(self._untrusted_forwarded[(exchange.remote, exchange.scheme, host)])
        lines.append(b"X-Request-Id: " + exchange.request_id.encode())
        return lines

    def _forwarded_block(self, exchange: Exchange, host: str | None) -> bytes:
        """``X-Forwarded-For``, ``-Proto`` and ``-Host`` for a trusted proxy's request."""
        chain = exchange.headers.getall("X-Forwarded-For", [])
        forwarded = hdr.forwarded_headers(
            client_ip=self.client_ip(exchange),
            proto=hdr.forwarded_proto(
                exchange.scheme,
                exchange.headers.getall("X-Forwarded-Proto", []),
                peer_trusted=True,
            ),
            host=host,
            existing_xff=", ".join(chain) if chain else None,
            peer_trusted=True,
            peer=exchange.remote,
        )
        return hdr.header_block(_field_bytes(forwarded))

    def _identity_block(self, identity: Identity) -> bytes:
        """The identity headers of a caller as one block of head lines, rendered once per
        verified identity (the verified-token cache hands out the same object for every
        request with its token, and thousands of them: one bytes object each)."""
        settings = self.settings.headers
        block = identity.rendered
        if block is not None and identity.rendered_for is settings:
            return block
        values = hdr.identity_header_values(settings, identity)
        block = hdr.header_block(_field_bytes(values))  # printable ASCII: encode_value
        object.__setattr__(identity, "rendered", block)
        object.__setattr__(identity, "rendered_for", settings)
        return block

    # -- forward-auth (nginx auth_request, Traefik ForwardAuth, Caddy forward_auth) ----

    async def forward_auth(self, request: web.Request) -> web.Response:
        """``GET {p}/verify``: the policy of the route the proxy is asking about.

        The target comes from Traefik's and Caddy's ``X-Forwarded-Method``/``-Uri`` or from
        nginx's ``X-Original-Method``/``-URI``. Proxies pass client headers on, so one family
        may be the client's own: when the two (or two copies of one) disagree, the request is
        refused rather than one of them believed, else a forged ``X-Forwarded-Uri: /public``
        would open a protected location behind an nginx that forgot to clear it (and a forged
        ``X-Original-URI`` the same behind Traefik).
        """
        token = self._bearer(request)
        original_uri = _one_target(request, "X-Forwarded-Uri", "X-Original-URI", "URI")
        if original_uri:
            method = (
                _one_target(request, "X-Forwarded-Method", "X-Original-Method", "method") or "GET"
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


def _one_target(request: web.Request, forwarded: str, original: str, what: str) -> str | None:
    """The one value every non-empty copy of ``forwarded`` and ``original`` agrees on.

    Methods compare case-insensitively (they are upper-cased for routing anyway); URIs
    exactly. Raises ``InvalidInput`` (400) when they disagree; ``None`` when none is given.
    """
    values = [
        value.strip()
        for name in (forwarded, original)
        for value in request.headers.getall(name, [])
        if value.strip()
    ]
    distinct = {value.upper() if what == "method" else value for value in values}
    if len(distinct) > 1:
        raise InvalidInput(
            f"The forward-auth request names more than one target {what}: "
            f"the copies of {forwarded} / {original} disagree."
        )
    return values[0] if values else None


class LiveGateway:
    """The gateway that new requests go to. A reload builds a whole new :class:`Gateway`
    from the new settings and swaps it in at once: a request is served start to end by one
    gateway, old or new, never a mix; the replaced one closes its store and pools once its
    last request is done (or after ``grace``)."""

    def __init__(
        self, gateway: Gateway, *, grace: float, clock: Callable[[], float] = time.time
    ) -> None:
        self.current = gateway
        self._grace = grace
        self._clock = clock
        self._retiring: set[asyncio.Task[None]] = set()

    def handle(self, exchange: Exchange) -> Awaitable[None]:
        """The current gateway serves ``exchange`` to its end (it counts it in flight)."""
        return self.current.handle(exchange)

    async def replace(self, settings: Settings) -> None:
        """Start a gateway on ``settings`` and send new requests to it. Raises (and keeps the
        current one) if the new one cannot start, e.g. its database is unreachable."""
        new = Gateway(settings, clock=self._clock, metrics=self.current.metrics)
        try:
            await new.start()
        except BaseException:
            await new.close()
            raise
        old, self.current = self.current, new
        retiring = asyncio.create_task(old.retire(self._grace))
        self._retiring.add(retiring)
        retiring.add_done_callback(self._retiring.discard)

    def drain(self) -> None:
        """Shutting down: ``/readyz`` says 503 to whoever still asks."""
        self.current.draining = True

    async def resources(self, app: web.Application) -> AsyncIterator[None]:
        """``cleanup_ctx``: start the first gateway; at shutdown close whichever serves."""
        await self.current.start()
        try:
            yield
        finally:
            await asyncio.gather(*self._retiring, return_exceptions=True)
            await self.current.close()


def _log_store_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the account database cannot be used: %s", task.exception())


GATEWAY = web.AppKey("gateway", Gateway)
LIVE = web.AppKey("live", LiveGateway)


def create_app(settings: Settings, *, clock: Callable[[], float] = time.time) -> web.Application:
    """The public application. ``app[LIVE].current`` is the gateway serving new requests;
    ``app[GATEWAY]`` is the one it started with (for tools and tests)."""
    gateway = Gateway(settings, clock=clock)
    live = LiveGateway(gateway, grace=settings.server.shutdown_grace, clock=clock)
    app = web.Application(client_max_size=settings.server.max_body_size)
    app[GATEWAY] = gateway
    app[LIVE] = live
    app[METRICS] = gateway.metrics
    app[EDGE_HANDLER] = live.handle  # every request goes to the gateway, not to a router
    app.cleanup_ctx.append(live.resources)
    return app


class RendersMetrics(Protocol):
    def flush(self) -> None: ...
    def render(self) -> tuple[bytes, str]: ...


def create_admin_app(metrics: RendersMetrics) -> web.Application:
    """The admin listener: ``/metrics`` lives here, never on the public port. ``metrics``
    is this process's, or (``gateway.workers``) every worker's summed."""

    async def render_metrics(request: web.Request) -> web.Response:
        metrics.flush()  # the observations gathered since the last flush, on this thread
        # Off the loop: a scrape must not hold up requests while the text is put together.
        body, content_type = await asyncio.to_thread(metrics.render)
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    admin = web.Application(middlewares=[problem_middleware])  # errors as problem+json too
    admin.router.add_get("/metrics", render_metrics)
    admin.router.add_get("/healthz", healthz)
    return admin
