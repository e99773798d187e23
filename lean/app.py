"""App wiring: routes, middlewares (connections, errors, browsers, auth, draining), and the
server's life from start to drain."""

from __future__ import annotations

import asyncio
import errno
import gc
import hmac
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import WSCloseCode, web

from lean import (
    anthropic_routes,
    handlers,
    responses_route,
    resume_handlers,
    resume_remote,
    scene_handlers,
    static,
    ui_handlers,
    ws,
)
from lean.clients import Client, client_key
from lean.config import Config, ConfigError
from lean.connections import Connections
from lean.encoders import anthropic as anthropic_encoder
from lean.encoders.chat import error_response
from lean.errors import (
    BadRequest,
    Internal,
    LeanError,
    NotFound,
    Overloaded,
    ShuttingDown,
    Unauthorized,
    clip,
)
from lean.handlers import connections_key, services_key
from lean.origin import Browsers
from lean.services import Services

log = logging.getLogger("lean")
# The collector's thresholds once lean serves (see serve()): young objects, middle, old.
GC_THRESHOLDS = (50_000, 20, 20)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Answered on a connection let in past `max_connections` (lean.connections): the probes only.
PROBE_PATHS = frozenset({"/healthz", "/readyz"})
# No token and no Origin check: the probes, and the page and lean.js, which hold no secret (the
# page asks the user for a token, and starts nothing from another origin: its /v1 calls are
# checked).
PUBLIC_PATHS = PROBE_PATHS | static.PATHS


Renderer = Callable[[LeanError], web.Response]
# Errors in the body of the dialect a path speaks (its SDK raises its own typed error);
# OpenAI's elsewhere. A path-prefix, its renderer.
RENDERERS: list[tuple[str, Renderer]] = [
    ("/v1/messages", anthropic_encoder.error_response),
]


def _renderer(request: web.Request) -> Renderer:
    path = request.path
    for prefix, renderer in RENDERERS:
        if path.startswith(prefix):
            return renderer
    if path == "/v1/models" and "anthropic-version" in request.headers:
        return anthropic_encoder.error_response  # an Anthropic SDK listing models
    return error_response


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    error_response = _renderer(request)  # this path's dialect: its SDK types the error
    try:
        return await handler(request)
    except LeanError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind = NotFound if exc.status == 404 else BadRequest
        error: LeanError = kind(f"{request.method} {clip(request.path)}: {exc.reason}")
        error.status = exc.status
        response = error_response(error)
        if "Allow" in exc.headers:  # a 405 must say which methods are allowed
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(Internal("internal error; see lean's log"))


def connections_middleware(
    connections: Connections,
) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Tells `connections` which connections run a request (no deadline then); answers
    only the probes on a connection let in past the bound (lean.connections)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        protocol = request.protocol
        if request.path not in PROBE_PATHS and connections.refuses(protocol):
            limit = connections.max_connections
            response = error_response(
                Overloaded(f"lean holds its limit of {limit} client connections", retry_after=1)
            )
            response.force_close()
            return response
        connections.busy(protocol)
        try:
            return await handler(request)
        finally:
            connections.done(protocol, asyncio.get_running_loop().time())

    return middleware


def _token_of(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token:
        return token.strip()
    if key := request.headers.get("x-api-key"):  # Anthropic's SDKs and Claude Code
        return key.strip()
    if request.method != "GET":
        return ""
    if request.path == "/v1/ws" and (token := ws.protocol_token(request)):
        return token  # a browser's WebSocket: `lean.bearer.<token>` (lean.ws)
    return request.query.get("access_token", "")  # EventSource cannot set headers


def auth_middleware(
    tokens: tuple[tuple[bytes, Client], ...],
) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Lets in a request whose token is one of `tokens`, as that token's client."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in PUBLIC_PATHS:
            given = _token_of(request).encode()
            # Compare with every token, always, and pick the client without a branch: the
            # time taken says nothing about which matched.
            found: Client | None = None
            for token, client in tokens:
                found = (found, client)[hmac.compare_digest(given, token)]
            if found is None:
                raise Unauthorized("missing or invalid bearer token")
            request[client_key] = found
        return await handler(request)

    return middleware


@web.middleware
async def draining_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.app[services_key].streams.draining and request.path not in PUBLIC_PATHS:
        raise ShuttingDown("lean is shutting down", retry_after=1)
    return await handler(request)


def create_app(config: Config) -> web.Application:
    services = Services(config)
    rejections = services.metrics.rejections
    connections = Connections(
        header_timeout=config.server.header_timeout,
        keepalive_timeout=config.server.keepalive_timeout,
        max_connections=config.server.max_connections,
        rejections=rejections,
    )
    browsers = Browsers(
        config.server.cors_origins,
        tokens=config.has_tokens,
        rejections=rejections,
        same_origin=frozenset(static.PAGE),
    )
    middlewares: list[Callable[..., Awaitable[web.StreamResponse]]] = [
        connections_middleware(connections),
        errors_middleware,
        browsers.middleware(PUBLIC_PATHS),
    ]
    if config.has_tokens:
        middlewares.append(auth_middleware(services.clients.tokens))
    middlewares.append(draining_middleware)
    app = web.Application(client_max_size=config.server.max_body_bytes, middlewares=middlewares)
    if browsers.cors:  # CORS headers on every response as it starts, errors and streams too
        app.on_response_prepare.append(browsers.add_cors_headers)
    app[services_key] = services
    services.cluster.deliver = scene_handlers.deliver(services)
    feeds = resume_remote.Feeds(services)  # other instances' resumes of our runs
    services.cluster.serve, services.cluster.stopped = feeds.serve, feeds.stopped
    if services.cluster.enabled:
        services.replays.remote = resume_remote.reader(services)
    app[connections_key] = connections
    app.router.add_post("/v1/chat/completions", handlers.chat_completions)
    app.router.add_post("/v1/responses", responses_route.responses)
    app.router.add_get("/v1/models", handlers.models)
    app.router.add_post("/v1/messages", anthropic_routes.messages)
    app.router.add_post("/v1/messages/count_tokens", anthropic_routes.count_tokens)
    app.router.add_get("/v1/scenes", scene_handlers.list_scenes)
    app.router.add_post("/v1/scenes/{scene}/stream", scene_handlers.stream_scene)
    app.router.add_get("/v1/scenes/{scene}/stream", scene_handlers.stream_scene)
    app.router.add_post("/v1/scenes/{scene}/ui", ui_handlers.stream_ui)
    app.router.add_get("/v1/scenes/{scene}/ui/{chat_id}/stream", ui_handlers.resume_ui)
    app.router.add_post("/v1/runs/{run_id}/cancel", scene_handlers.cancel_run)
    app.router.add_get("/v1/runs/{run_id}/stream", resume_handlers.resume_stream)
    app.router.add_post("/v1/runs/{run_id}/tool-results", scene_handlers.tool_result)
    app.router.add_get(
        "/v1/conversations/{conversation_id}/messages", scene_handlers.conversation_messages
    )
    app.router.add_get("/v1/ws", ws.websocket)
    app.router.add_get("/healthz", handlers.healthz)
    app.router.add_get("/readyz", handlers.readyz)
    app.router.add_get("/metrics", handlers.metrics)
    static.add_routes(app, web_ui=config.server.web_ui)

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        await services.start()
        yield
        await feeds.close()
        await services.close()

    app.cleanup_ctx.append(lifetime)
    return app


class Server:
    """lean on a real socket: the same path for `lean serve` and for the tests."""

    def __init__(self, config: Config, *, port: int | None = None) -> None:
        self.config = config
        self.app = create_app(config)
        self._port = config.server.port if port is None else port
        server = config.server
        self._runner = web.AppRunner(
            self.app,
            handler_cancellation=True,  # a client that leaves cancels its handler at once
            access_log=None,
            shutdown_timeout=2.0,
            # lean.connections keeps the deadlines; aiohttp's own timer (not reset by
            # bytes) is only a backstop that never fires before them.
            keepalive_timeout=server.keepalive_timeout + server.header_timeout,
        )
        self.connections = self.app[connections_key]
        self.port = 0

    @property
    def url(self) -> str:
        host = self.config.server.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    async def start(self) -> None:
        await self._runner.setup()
        assert self._runner.server is not None
        self.connections.watch(self._runner.server)
        host = self.config.server.host
        site = web.TCPSite(
            self._runner, host, self._port, backlog=1024, reuse_port=self.config.server.reuse_port
        )
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise _bind_error(host, self._port, exc) from None
        self.port = self._runner.addresses[0][1]
        self.connections.start()

    async def stop(self) -> None:
        """Drain: /readyz fails, no new connections, running streams get `drain_timeout`."""
        streams = self.app[services_key].streams
        streams.draining = True
        for site in list(self._runner.sites):
            await site.stop()
        if not await streams.drain(self.config.server.drain_timeout):
            log.warning("drain timeout: ending %d streams", len(streams))
            streams.interrupt_all(ShuttingDown("lean is shutting down", retry_after=1))
            await streams.drain(2.0)
        # Concurrently and bounded: a client that stopped reading must not hold the stop.
        await asyncio.gather(
            *(
                asyncio.wait_for(
                    socket.close(code=WSCloseCode.GOING_AWAY, message=b"lean is shutting down"),
                    2.0,
                )
                for socket in list(self.app[services_key].sockets)
            ),
            return_exceptions=True,
        )
        await self.connections.stop()
        await self._runner.cleanup()


def _bind_error(host: str, port: int, exc: OSError) -> ConfigError:
    """lean cannot listen where the config says: one line naming it, exit 2."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return ConfigError("server", "port", f"a free port ({address} is already in use)")
    if exc.errno == errno.EACCES:
        return ConfigError("server", "port", f"a port lean may bind ({address}: permission denied)")
    reason = exc.strerror or type(exc).__name__
    return ConfigError("server", "host", f"an address of this machine ({address}: {reason})")


async def serve(config: Config) -> None:
    """Run until SIGTERM or SIGINT, then drain and return."""
    server = Server(config)
    await server.start()
    # The one start-up line says what this lean serves and how it lets clients in.
    fields = {
        "config": config.path,
        "instance": config.cluster.instance,
        "models": ",".join(config.models),
        "scenes": ",".join(config.scenes) or None,
        "auth": "tokens" if config.has_tokens else "none (loopback only)",
        "clients": ",".join(config.clients) or None,
        "page": f"{server.url}/" if config.server.web_ui else "off",
    }
    log.info("lean listening on %s", server.url, extra={"fields": fields})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    from lean.systemd import Notifier  # sd_notify: a no-op without $NOTIFY_SOCKET

    notifier = Notifier()
    notifier.ready(f"listening on {server.url}")  # after the signal handlers: stoppable
    notifier.start_watchdog()
    # What exists now (modules, config, the app) lives as long as the process: frozen, a
    # full collection no longer walks it. Measured in `ttfb`: the one full collection of a
    # 1,000-run load paused the loop 18 ms with it in the heap, and did not happen after.
    gc.collect()
    gc.freeze()
    # A finished run, stream or socket is freed by reference counting (tests check it), so
    # the cycle collector has little to find; its passes still walk every live stream's
    # objects and pause the loop. Run them ~70x less often than Python's (700, 10, 10):
    # `ttfb` p99 added +2.4-3.3 ms on every wire, against +2.6-5.8 ms, peak RSS unchanged.
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        await stop.wait()
    finally:
        notifier.stopping(f"draining for up to {config.server.drain_timeout:g} s")
        log.info("lean stopping: draining for up to %g s", config.server.drain_timeout)
        await server.stop()
        await notifier.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
