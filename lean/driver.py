"""One request's run, for every stateless dialect: the upstream, the guard, the client
writes, the commit, the log line and metrics. What the client sees is its `Encoder`'s.

A stream is one task of its own: it reads the upstream, frames each read's pieces
and writes them to the client directly (`chunk_stream.ChunkStream`, which also decides
when the response commits). When the client stops reading, the write waits for the
transport to drain, so the task stops reading the upstream and TCP pushes back to the
provider; lean holds one read per stream. The stream's `Guard` cuts a client that has
not taken bytes for `slow_client_timeout`, ends an upstream that went silent, and sends
the dialect's heartbeat from byte zero.

How it ends (`core.Ending`): complete; cancelled (the client left: the upstream is
closed at once); or a failure — before the commit an HTTP status in the dialect's error
body (its SDK types it and retries it), after it one error frame, never a made-up finish.

The route admits the request to its client's limits first (`lean.clients`); the run ends
its `Ticket` with the tokens the answer used: the upstream's usage, else an estimate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from lean.chunk_stream import ChunkStream
from lean.client_io import ClientGone, bound_send_buffer, reset, unsent
from lean.clients import Ticket, estimate
from lean.config import ModelConfig
from lean.core import Ending
from lean.encoders import Encoder
from lean.errors import Internal, LeanError
from lean.guard import Guard
from lean.providers.base import Piece, Text, Usage
from lean.relay import Relay
from lean.services import Services

__all__ = ["SSE_HEADERS", "complete", "new_guard", "stream"]

log = logging.getLogger("lean.access")

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache, no-transform",
    "X-Accel-Buffering": "no",
    "Connection": "keep-alive",
}


def new_guard(
    services: Services,
    request: web.Request,
    *,
    ping: Callable[[], Awaitable[None]] | None = None,
) -> Guard:
    """The guard of one request; `ping` is its heartbeat (none: no heartbeats)."""

    def abort() -> None:
        reset(request)

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


class Outcome:
    """How one request's run ended: one log line and the metrics, never per chunk."""

    def __init__(
        self,
        services: Services,
        endpoint: str,
        model: ModelConfig,
        body: dict[str, Any],
        ticket: Ticket,
        *,
        stream: bool,
    ) -> None:
        self.endpoint = endpoint
        self.model = model
        self.stream = stream
        self.body = body
        self.ticket = ticket
        self.usage: Usage | None = None  # the upstream's, when it gave one
        self.answer = ""  # a whole (non-streaming) answer's text, for an estimate
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
        self.ticket.end(self.usage, self._estimate)
        services.metrics.run_ended(self.endpoint, "", self.status.value, self.frames, ttft)
        log.info(
            "run",
            extra={
                "fields": {
                    "endpoint": self.endpoint,
                    "client": self.ticket.client.name,
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

    def _estimate(self) -> float:
        """Without the upstream's usage: the prompt's estimate and the answer's, a streamed
        answer's counted as a token per frame relayed (the text is not kept; streams carry
        about one token per frame)."""
        return estimate(self.body, self.answer, self.frames)


class _Answer:
    """A whole answer, collected for one non-streaming response."""

    def __init__(self) -> None:
        self.pieces: list[Piece] = []

    def push(self, batch: list[Piece]) -> bool:
        self.pieces.extend(batch)
        return False

    async def drain(self) -> None:
        pass


async def complete(
    request: web.Request,
    services: Services,
    model: ModelConfig,
    body: dict[str, Any],
    encoder: Encoder,
    ticket: Ticket,
) -> web.Response:
    """The whole answer in one response (`encoder.whole`); a failure is raised (the app's
    error middleware, or the route, renders it in the dialect's body)."""
    guard = new_guard(services, request)
    services.streams.add(guard)
    outcome = Outcome(services, encoder.endpoint, model, body, ticket, stream=False)
    relay = Relay(services, model, body, guard)
    answer = _Answer()
    try:
        await relay.run(answer)
        for piece in answer.pieces:
            if isinstance(piece, Usage):
                outcome.usage = piece
            elif isinstance(piece, Text):
                outcome.answer += piece.text
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
    return encoder.whole(answer.pieces)


async def stream(
    request: web.Request,
    services: Services,
    model: ModelConfig,
    body: dict[str, Any],
    encoder: Encoder,
    ticket: Ticket,
) -> web.StreamResponse:
    """The answer as it comes, in the encoder's frames.

    The stream runs in a task of its own: an upstream read then resumes that task's
    few frames, not also aiohttp's handler and the middlewares above it (measured with
    `python -m bench.cpu_pair`: ~1 µs of the ~8 µs lean adds to a bare relay per chunk)."""
    task = asyncio.get_running_loop().create_task(
        _run_stream(request, services, model, body, encoder, ticket)
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
    encoder: Encoder,
    ticket: Ticket,
) -> web.StreamResponse:
    response = web.StreamResponse(headers=SSE_HEADERS)
    bound_send_buffer(request, services.config.limits.send_buffer_bytes)
    chunks: ChunkStream | None = None

    async def ping() -> None:
        assert chunks is not None
        await chunks.ping()

    guard = new_guard(services, request, ping=ping)
    try:
        services.streams.add(guard)
    except LeanError:
        await guard.close()
        raise
    outcome = Outcome(services, encoder.endpoint, model, body, ticket, stream=True)
    error: LeanError | None = None
    relay = Relay(services, model, body, guard)
    chunks = ChunkStream(request, response, encoder, guard, outcome)
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
        log.exception("%s stream failed", encoder.endpoint)
        error = Internal("internal error; see lean's log")
    finally:
        chunks.disarm()
        await guard.close()
        services.streams.discard(guard)
        if error is not None:
            outcome.failed(error, relay.committed)
        outcome.usage = encoder.usage
        outcome.end(services)
    if error is not None and not guard.evicted:
        if not await chunks.settle():
            if not relay.committed:
                # Before the commit a failure is an HTTP status in the dialect's body (and
                # the upstream's Retry-After): the client's SDK types it and retries it.
                # Returned, not raised: a raised error's traceback would hold this frame.
                return encoder.error_response(error)
            with contextlib.suppress(ClientGone):  # content went out: it stays in band
                await chunks.start()
        if chunks.started:
            chunks.release()
            # After the first byte an error travels in band: one error frame.
            with contextlib.suppress(ConnectionError, TimeoutError):
                async with asyncio.timeout(services.config.limits.slow_client_timeout):
                    await response.write(encoder.error_frame(error))
    return response
