"""`GET /v1/runs/{runId}/stream`: a run's events after a cursor, then the live ones, as SSE
or NDJSON (docs/protocol.md §2); and `pump`, which writes a subscription to a sink, for this
route and the WebSocket's `resume` frame.

The cursor is `Last-Event-ID` or `?after=`, and the header wins: an `EventSource` that
reconnects keeps its URL (with whatever `after` it started from) and sends, in the header,
the last id it got. A cursor at or past a finished run's last event gets `204`, which tells
an `EventSource` to stop reconnecting once it has the whole answer.

A resumed stream has its own guard (heartbeats; a client that takes nothing for
`slow_client_timeout` is cut) and counts as a stream for `max_streams` and the drain.
It does not hold the run back: a reader slower than the run falls behind in the buffer and,
past it, gets the answer again from its start (`lean.resume`).
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from lean.client_io import BodyWriter, ClientGone, bound_send_buffer
from lean.clients import client_of
from lean.driver import SSE_HEADERS
from lean.errors import BadRequest, clip
from lean.guard import Guard
from lean.handlers import services_key
from lean.resume import Subscription
from lean.run import Sink
from lean.scene_handlers import NDJSON, NDJSON_HEADERS, NDJSONSink, SSESink
from lean.services import Services

MAX_CURSOR = 2**53 - 1  # what every JSON reader holds exactly


def parse_cursor(field: str, raw: str) -> int:
    """An event id as a client sends it back; `BadRequest` naming `field` otherwise."""
    if not (raw.isascii() and raw.isdigit()) or int(raw) > MAX_CURSOR:
        raise BadRequest(f"{field} must be an event id (an integer >= 0), got '{clip(raw)}'")
    return int(raw)


def cursor(request: web.Request) -> int:
    header = request.headers.get("Last-Event-ID")
    if header is not None:
        return parse_cursor("Last-Event-ID", header.strip() or "0")
    after = request.query.get("after")
    return 0 if after is None else parse_cursor("after", after)


async def resume_stream(request: web.Request) -> web.StreamResponse:
    services = request.app[services_key]
    after = cursor(request)
    ndjson = NDJSON in request.headers.get("Accept", "")
    services.streams.check()
    run_id = request.match_info["run_id"]
    subscription = await services.replays.subscribe(run_id, after, client_of(request))
    try:
        if subscription.empty:
            return web.Response(status=204)
        response = web.StreamResponse(headers=NDJSON_HEADERS if ndjson else SSE_HEADERS)
        sink = NDJSONSink(request) if ndjson else SSESink(request)
        bound_send_buffer(request, services.config.limits.send_buffer_bytes)
        sink.body = await BodyWriter.start(request, response)
        await pump(services, subscription, sink)
        return response
    finally:
        subscription.close()


async def pump(services: Services, subscription: Subscription, sink: Sink) -> None:
    """Write the subscription's events to `sink` until the run's last one, the client
    leaves or is cut, or lean shuts down; then close the subscription."""
    config = services.config
    guard = Guard(
        ping_interval=config.server.ping_interval,
        slow_client_timeout=config.limits.slow_client_timeout,
        ping=sink.ping,
        on_slow_client=sink.abort,
        pending=sink.pending,
        metrics=services.metrics,
    )
    try:
        services.streams.add(guard)
        async for seq, name, payload in subscription:
            if sink.write(name, seq, payload):
                guard.writing()
                await sink.drain()
            guard.wrote()
    except ClientGone:
        pass
    except asyncio.CancelledError:
        if guard.take() is None:  # not the guard (slow client, shutdown): the client left
            raise
    finally:
        subscription.close()
        services.streams.discard(guard)
        await guard.close()
