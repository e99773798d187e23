"""The AI SDK `useChat` routes (docs/protocol.md §6): a scene run as a UI message stream, and
the resume route `useChat` calls after a reload.

`POST /v1/scenes/{scene}/ui` starts a run exactly as the scene SSE route does
(`scene_handlers.new_run`: everything a request can get wrong is an HTTP error before the
response starts) and writes its events through `UISink`, which frames them with
`ui_stream.UIParts`. `GET /v1/scenes/{scene}/ui/{chatId}/stream` answers 204 unless an
answer of that chat is running; then it is meant to replay it through the same sink, which
waits for the per-run event buffer (`replay`, the seam): 409 `still_running` meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web

from lean import events, scenes
from lean.client_io import BodyWriter, ClientGone, bound_send_buffer, reset
from lean.clients import Client, client_of
from lean.config import Config, SceneConfig
from lean.driver import SSE_HEADERS
from lean.errors import BadRequest, Cancelled, StillRunning
from lean.handlers import read_json, services_key
from lean.run import Run, new_run_id
from lean.scene_handlers import new_run
from lean.services import Services
from lean.ui_stream import HEADER, UIParts, parse_chat, scene_request

UI_HEADERS = {**SSE_HEADERS, HEADER[0]: HEADER[1]}

# What one run's scene events are, from its first: (seq, name, encoded event), as a per-run
# event buffer gives them (`subscribe(run_id, after=0)`).
SceneEvents = AsyncIterator[tuple[int, str, bytes]]


class UISink:
    """A scene run's events on a streaming HTTP response, as UI message stream parts."""

    def __init__(self, request: web.Request, parts: UIParts) -> None:
        self._request = request
        self._parts = parts
        self._started = False
        self.body: BodyWriter | None = None  # set once the response has started

    def write(self, name: str, seq: int, payload: bytes) -> bool:
        body = self.body
        assert body is not None, "the run starts after the response"
        if name == "start":
            if self._started:
                # Only a replay does this: a buffer restarting the answer for a reader that
                # fell behind. Parts sent cannot be taken back: cut the reader, whose next
                # resume gets the answer from its start.
                self.abort()
                raise ClientGone(Cancelled("the answer restarted: resume it again"))
            self._started = True
        return body.write(self._parts.feed(name, payload))

    async def drain(self) -> None:
        assert self.body is not None, "the run starts after the response"
        await self.body.drain()

    def pending(self) -> int:
        return self.body.pending() if self.body is not None else 0

    async def ping(self) -> None:
        assert self.body is not None, "the run starts after the response"
        if self.body.write(events.SSE_PING):  # a comment: the AI SDK's reader skips it
            await self.body.drain()

    def abort(self) -> None:
        reset(self._request)


def client_tools(config: Config, scene: SceneConfig) -> frozenset[str]:
    """The scene's tools that the client answers (`kind = client`)."""
    return frozenset(
        name
        for name in scene.tools
        if (tool := config.tools.get(name)) is not None and tool.kind == "client"
    )


async def stream_ui(request: web.Request) -> web.StreamResponse:
    """`POST /v1/scenes/{scene}/ui`: `useChat`'s body in, the run as a UI message stream."""
    services = request.app[services_key]
    client = client_of(request)
    scene = services.clients.scene(client, request.match_info["scene"])
    scene_req = scene_request(parse_chat(await read_json(request)))
    response = web.StreamResponse(headers=UI_HEADERS)
    sink = UISink(request, UIParts(client_tools(services.config, scene)))
    run = await new_run(services, scene, scene_req, run_id=new_run_id(), sink=sink, client=client)
    try:
        bound_send_buffer(request, services.config.limits.send_buffer_bytes)
        sink.body = await BodyWriter.start(request, response)
        run.start()
    except BaseException:
        run.ticket.end()  # the run never started: its slot is free again
        raise
    assert run.task is not None
    try:
        await asyncio.shield(run.task)
    except asyncio.CancelledError:
        run.client_left()  # aiohttp cancelled us: the client is gone
        raise
    return response


def running_answer(
    services: Services, scene: SceneConfig, chat_id: str, client: Client
) -> Run | None:
    """The chat's answer in `scene` that `client` started and is running now, if any: the
    run registry holds a run until its end (it leaves it before its last event goes out).
    Another client's answer is not found (docs/protocol.md §8: nor resume it)."""
    return services.runs.of_conversation(chat_id, scene.name, client)


async def replay(services: Services, run: Run) -> SceneEvents | None:
    """SEAM (resume): the run's events from its first, then the live ones, from the per-run
    event buffer of docs/protocol.md §6 (`subscribe(run.run_id, after=0)`). lean has no such
    buffer yet, so a running answer cannot be replayed: None, and the route says 409. Once the
    buffer is merged, return its subscription here (and close it when `stream_events` returns);
    `stream_events` does the rest. It has no heartbeat nor slow-client limit of its own: the
    buffer's reader must bring them."""
    return None


async def resume_ui(request: web.Request) -> web.StreamResponse:
    """`GET /v1/scenes/{scene}/ui/{chatId}/stream`: the chat's running answer, or 204."""
    services = request.app[services_key]
    client = client_of(request)
    scene = services.clients.scene(client, request.match_info["scene"])
    chat_id = request.match_info["chat_id"]
    if not scenes.is_conversation_id(chat_id):
        raise BadRequest("invalid request: chatId must be 1-64 characters of A-Z, a-z, 0-9, _ or -")
    run = running_answer(services, scene, chat_id, client)
    if run is None:  # nothing running (or it has ended): `useChat` shows what it has
        return web.Response(status=204)
    source = await replay(services, run)
    if source is None:
        raise StillRunning(
            f"an answer of chat '{chat_id}' is running (run '{run.run_id}') and lean cannot "
            "replay it yet: its messages are at /v1/conversations/{id}/messages once it ends"
        )
    sink = UISink(request, UIParts(client_tools(services.config, scene)))
    return await stream_events(request, sink, source)


async def stream_events(
    request: web.Request, sink: UISink, source: SceneEvents
) -> web.StreamResponse:
    """Scene events from `source` (one run's, from its `start`) as a UI message stream, until
    the source ends or the client is gone. Once the buffer is merged, its `pump` (which adds
    heartbeats, the slow-client limit and `max_streams`) does this with the same `UISink`."""
    response = web.StreamResponse(headers=UI_HEADERS)
    sink.body = await BodyWriter.start(request, response)
    try:
        async for seq, name, payload in source:
            if sink.write(name, seq, payload):
                await sink.drain()
    except ClientGone:
        pass
    return response
