"""HTTP handlers of the OpenAI-compatible surface and the operator endpoints.

A stream is one task: it reads the upstream, frames each piece and writes it to
the client directly. aiohttp's `write()` blocks when the client stops reading,
so the task stops reading the upstream and TCP pushes back to the provider;
lean holds one piece per stream. The stream's `Guard` cuts a client that has
not taken bytes for `slow_client_timeout`, ends an upstream that went silent,
and sends `: ping` heartbeats from byte zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from contextlib import aclosing
from typing import Any

from aiohttp import web

from lean.config import Config, ModelConfig
from lean.errors import LeanError, NotFound, PayloadTooLarge, openai_error_body
from lean.guard import Guard
from lean.openai_compat import (
    ChunkFramer,
    completion_body,
    error_frame,
    models_body,
    new_id,
    parse_request,
)
from lean.relay import Relay
from lean.services import Services

log = logging.getLogger("lean.access")

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache, no-transform",
    "X-Accel-Buffering": "no",
    "Connection": "keep-alive",
}
PING = b": ping\n\n"

services_key = web.AppKey("services", Services)


async def read_body(request: web.Request) -> bytes:
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[services_key].config.server.max_body_bytes
        raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes") from None


def find_model(config: Config, alias: str) -> ModelConfig:
    model = config.models.get(alias)
    if model is None:
        raise NotFound(f"model '{alias}' does not exist; GET /v1/models lists the aliases")
    return model


def new_guard(config: Config, response: web.StreamResponse | None, request: web.Request) -> Guard:
    def abort() -> None:
        if request.transport is not None:
            request.transport.abort()

    async def ping() -> None:
        assert response is not None
        await response.write(PING)

    return Guard(
        ping_interval=config.server.ping_interval,
        slow_client_timeout=config.limits.slow_client_timeout,
        ping=ping if response is not None else None,
        on_slow_client=abort,
    )


async def chat_completions(request: web.Request) -> web.StreamResponse:
    config = request.app[services_key].config
    chat, body = parse_request(await read_body(request))
    model = find_model(config, chat.model)
    request.app[services_key].streams.check()
    include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
    if chat.stream:
        return await _stream(request, model, body, include_usage)
    return await _complete(request, model, body)


async def _complete(request: web.Request, model: ModelConfig, body: dict[str, Any]) -> web.Response:
    app = request.app
    guard = new_guard(app[services_key].config, None, request)
    streams = app[services_key].streams
    streams.add(guard)
    started = time.monotonic()
    status = "error"
    try:
        services = app[services_key]
        relay = Relay(services.upstream, services.config, model, body, guard)
        async with aclosing(relay.pieces()) as pieces:
            answer = [piece async for piece in pieces]
        status = "complete"
    except asyncio.CancelledError:
        reason = guard.take()
        if reason is None:
            status = "cancelled"
            raise
        raise reason from None
    finally:
        await guard.close()
        streams.discard(guard)
        _log_run(model, status, started, stream=False)
    return web.Response(
        body=completion_body(answer, completion_id=new_id(), model=model.alias),
        content_type="application/json",
    )


async def _stream(
    request: web.Request, model: ModelConfig, body: dict[str, Any], include_usage: bool
) -> web.StreamResponse:
    app = request.app
    config = app[services_key].config
    response = web.StreamResponse(headers=SSE_HEADERS)
    guard = new_guard(config, response, request)
    streams = app[services_key].streams
    try:
        streams.add(guard)
    except LeanError:
        await guard.close()
        raise
    started = time.monotonic()
    status = "error"
    error: LeanError | None = None
    framer = ChunkFramer(completion_id=new_id(), model=model.alias, include_usage=include_usage)
    try:
        await response.prepare(request)
        services = app[services_key]
        relay = Relay(services.upstream, services.config, model, body, guard)
        async with aclosing(relay.pieces()) as pieces:
            async for piece in pieces:
                frame = framer.frame(piece)
                if frame is not None:
                    guard.writing()
                    await response.write(frame)
                    guard.wrote()
        guard.writing()
        await response.write(framer.end())
        guard.wrote()
        status = "complete"
    except asyncio.CancelledError:
        error = guard.take()
        if error is None:
            status = "cancelled"  # the client left; aclosing closed the upstream
            raise
    except LeanError as exc:
        error = exc
    except ConnectionError:
        status = "cancelled"
    finally:
        await guard.close()
        streams.discard(guard)
        if error is not None:
            status = error.code
        _log_run(model, status, started, stream=True)
    if error is not None and not guard.evicted:
        # After the first byte an error travels in band: one `data: {"error": ...}` line.
        with contextlib.suppress(ConnectionError, TimeoutError):
            async with asyncio.timeout(config.limits.slow_client_timeout):
                await response.write(error_frame(openai_error_body(error)))
    return response


def _log_run(model: ModelConfig, status: str, started: float, *, stream: bool) -> None:
    log.info(
        "run endpoint=chat.completions model=%s stream=%s status=%s duration_ms=%.0f",
        model.alias,
        "true" if stream else "false",
        status,
        (time.monotonic() - started) * 1000,
    )


async def models(request: web.Request) -> web.Response:
    aliases = list(request.app[services_key].config.models)
    return web.Response(body=models_body(aliases), content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    if request.app[services_key].streams.draining:
        return web.json_response({"status": "draining"}, status=503)
    return web.json_response({"status": "ready"})
