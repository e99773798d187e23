"""HTTP handlers of the OpenAI-compatible surface and the operator endpoints.

A stream is one task of its own: it reads the upstream, frames each read's pieces
and writes them to the client directly (`chunk_stream.ChunkStream`, which also decides
when the response commits). When the client stops
reading, the write waits for the transport to drain, so the task stops reading the
upstream and TCP pushes back to the provider; lean holds one read per stream.
The stream's `Guard` cuts a client that has not taken bytes for
`slow_client_timeout`, ends an upstream that went silent, and sends `: ping`
heartbeats from byte zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from lean.chunk_stream import PING, ChunkStream
from lean.client_io import ClientGone, bound_send_buffer, reset, unsent
from lean.config import Config, ModelConfig
from lean.connections import Connections
from lean.core import Ending
from lean.errors import Internal, LeanError, NotFound, PayloadTooLarge, clip, openai_error_body
from lean.guard import Guard
from lean.inbound import require_json
from lean.openai_compat import (
    ChunkFramer,
    completion_body,
    error_frame,
    models_body,
    new_id,
    parse_request,
)
from lean.providers.base import Piece
from lean.relay import Relay
from lean.services import Services

log = logging.getLogger("lean.access")

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache, no-transform",
    "X-Accel-Buffering": "no",
    "Connection": "keep-alive",
}

services_key = web.AppKey("services", Services)
connections_key = web.AppKey("connections", Connections)


async def read_json(request: web.Request) -> bytes:
    """The body of a JSON endpoint: 415 unless it says it is JSON, 413 past the limit."""
    require_json(request)
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[services_key].config.server.max_body_bytes
        raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes") from None


def error_response(error: LeanError) -> web.Response:
    """`error` as an HTTP status with OpenAI's body (and its `Retry-After`, if any)."""
    return web.Response(
        status=error.status,
        body=openai_error_body(error),
        content_type="application/json",
        headers=error.headers(),
    )


def find_model(config: Config, alias: str) -> ModelConfig:
    model = config.models.get(alias)
    if model is None:
        raise NotFound(f"model '{clip(alias)}' does not exist; GET /v1/models lists the aliases")
    return model


def new_guard(
    services: Services,
    response: web.StreamResponse | None,
    request: web.Request,
    *,
    ping: Callable[[], Awaitable[None]] | None = None,
) -> Guard:
    """The guard of one request; `ping` replaces the default heartbeat (a `: ping` to a
    started `response`)."""

    def abort() -> None:
        reset(request)

    async def write_ping() -> None:
        assert response is not None
        await response.write(PING)

    if ping is None and response is not None:
        ping = write_ping

    def pending() -> int:
        return unsent(request.transport)

    return Guard(
        ping_interval=services.config.server.ping_interval,
        slow_client_timeout=services.config.limits.slow_client_timeout,
        ping=ping,
        on_slow_client=abort,
        pending=pending,
        metrics=services.metrics,
    )


async def chat_completions(request: web.Request) -> web.StreamResponse:
    services = request.app[services_key]
    chat, body = parse_request(await read_json(request))
    model = find_model(services.config, chat.model)
    await services.streams.admit()
    if chat.stream:
        include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
        return await _stream(request, services, model, body, include_usage)
    return await _complete(request, services, model, body)


class _Outcome:
    """How one chat completion ended: one log line and the metrics, never per chunk."""

    def __init__(
        self, services: Services, model: ModelConfig, body: dict[str, Any], *, stream: bool
    ) -> None:
        self.model = model
        self.stream = stream
        messages = body.get("messages") or [{}]
        self.prompt = messages[-1].get("content") if services.config.server.log_prompts else None
        self.started = time.monotonic()
        self.first_token: float | None = None
        self.frames = 0
        self.status = Ending.ERROR
        self.code = ""

    def failed(self, error: LeanError, committed: bool) -> None:
        self.code = error.code
        self.status = Ending.after(error, kept=committed)

    def end(self, services: Services) -> None:
        ttft = None if self.first_token is None else self.first_token - self.started
        services.metrics.run_ended("chat.completions", "", self.status.value, self.frames, ttft)
        log.info(
            "run",
            extra={
                "fields": {
                    "endpoint": "chat.completions",
                    "model": self.model.alias,
                    "stream": self.stream,
                    "status": self.status.value,
                    "code": self.code or None,
                    "first_token_ms": None if ttft is None else round(ttft * 1000),
                    "duration_ms": round((time.monotonic() - self.started) * 1000),
                    "chunks": self.frames,
                    "prompt": self.prompt,
                }
            },
        )


async def _complete(
    request: web.Request, services: Services, model: ModelConfig, body: dict[str, Any]
) -> web.Response:
    guard = new_guard(services, None, request)
    services.streams.add(guard)
    outcome = _Outcome(services, model, body, stream=False)
    relay = Relay(services, model, body, guard)
    answer = _Answer()
    try:
        await relay.run(answer)
        outcome.status = Ending.COMPLETE
        outcome.first_token = time.monotonic()
    except asyncio.CancelledError:
        reason = guard.take()
        if reason is None:
            outcome.status = Ending.CANCELLED
            raise
        outcome.failed(reason, False)
        raise reason from None
    except LeanError as exc:
        outcome.failed(exc, False)
        raise
    finally:
        await guard.close()
        services.streams.discard(guard)
        outcome.end(services)
    return web.Response(
        body=completion_body(answer.pieces, completion_id=new_id(), model=model.alias),
        content_type="application/json",
    )


class _Answer:
    """A whole answer, collected for one non-streaming response."""

    def __init__(self) -> None:
        self.pieces: list[Piece] = []

    def push(self, batch: list[Piece]) -> bool:
        self.pieces.extend(batch)
        return False

    async def drain(self) -> None:
        pass


async def _stream(
    request: web.Request,
    services: Services,
    model: ModelConfig,
    body: dict[str, Any],
    include_usage: bool,
) -> web.StreamResponse:
    """The stream runs in a task of its own: an upstream read then resumes that task's
    few frames, not also aiohttp's handler and the middlewares above it (measured with
    `python -m bench.cpu_pair`: ~1 µs of the ~8 µs lean adds to a bare relay per chunk)."""
    task = asyncio.get_running_loop().create_task(
        _run_stream(request, services, model, body, include_usage)
    )
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.cancel()  # the client left (aiohttp cancelled the handler): close the upstream
        with contextlib.suppress(asyncio.CancelledError, Exception):  # it ends as it can
            await task
        raise


async def _run_stream(
    request: web.Request,
    services: Services,
    model: ModelConfig,
    body: dict[str, Any],
    include_usage: bool,
) -> web.StreamResponse:
    response = web.StreamResponse(headers=SSE_HEADERS)
    bound_send_buffer(request, services.config.limits.send_buffer_bytes)
    chunks: ChunkStream | None = None

    async def ping() -> None:
        assert chunks is not None
        await chunks.ping()

    guard = new_guard(services, response, request, ping=ping)
    try:
        services.streams.add(guard)
    except LeanError:
        await guard.close()
        raise
    outcome = _Outcome(services, model, body, stream=True)
    error: LeanError | None = None
    framer = ChunkFramer(completion_id=new_id(), model=model.alias, include_usage=include_usage)
    relay = Relay(services, model, body, guard)
    chunks = ChunkStream(request, response, framer, guard, outcome)
    commit_wait = services.config.server.commit_wait
    try:
        if commit_wait > 0:
            chunks.arm(commit_wait)
        else:
            await chunks.start()
        await relay.run(chunks)
        await chunks.write_end()
        outcome.status = Ending.COMPLETE
    except asyncio.CancelledError:
        error = guard.take()
        if error is None:
            outcome.status = Ending.CANCELLED  # the client left; the upstream was closed
            raise
    except LeanError as exc:
        error = exc.with_traceback(None)  # kept with its traceback, this frame is a cycle
    except ClientGone:
        outcome.status = Ending.CANCELLED
    except Exception:  # a bug: end this stream with a typed error, never a silent hang
        log.exception("chat completion stream failed")
        error = Internal("internal error; see lean's log")
    finally:
        chunks.disarm()
        await guard.close()
        services.streams.discard(guard)
        if error is not None:
            outcome.failed(error, relay.committed)
        outcome.end(services)
    if error is not None and not guard.evicted:
        if not await chunks.settle():
            if not relay.committed:
                # Before the commit a failure is an HTTP status with OpenAI's body (and
                # the upstream's Retry-After): the client's SDK types it and retries it.
                # Returned, not raised: a raised error's traceback would hold this frame.
                return error_response(error)
            with contextlib.suppress(ClientGone):  # content went out: it stays in band
                await chunks.start()
        if chunks.started:
            chunks.release()
            # After the first byte an error travels in band: one `data: {"error": ...}` line.
            with contextlib.suppress(ConnectionError, TimeoutError):
                async with asyncio.timeout(services.config.limits.slow_client_timeout):
                    await response.write(error_frame(openai_error_body(error)))
    return response


async def models(request: web.Request) -> web.Response:
    aliases = list(request.app[services_key].config.models)
    return web.Response(body=models_body(aliases), content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    services = request.app[services_key]
    body = services.metrics.render(
        [
            ("lean_active_streams", "Streams and runs in progress.", len(services.streams)),
            ("lean_active_scene_runs", "Scene runs in progress.", len(services.runs)),
            ("lean_draining", "1 while lean shuts down.", 1 if services.streams.draining else 0),
            (
                "lean_client_connections",
                "Client connections open, of [server] max_connections.",
                len(request.app[connections_key]),
            ),
        ]
    )
    return web.Response(
        body=body,
        content_type="text/plain",
        charset="utf-8",
        headers={"X-Content-Type-Options": "nosniff"},
    )


async def readyz(request: web.Request) -> web.Response:
    services = request.app[services_key]
    if services.streams.draining:
        return web.json_response({"status": "draining"}, status=503)
    if not services.store.writable:  # runs are refused (store_unavailable) until it writes
        body = {"status": "store_unavailable", "error": services.store.error}
        return web.json_response(body, status=503)
    return web.json_response({"status": "ready"})
