"""The AI SDK `useChat` routes (docs/protocol.md §6): a scene run as a UI message stream, and
the resume route `useChat` calls after a reload.

`POST /v1/scenes/{scene}/ui` starts a run exactly as the scene SSE route does
(`scene_handlers.new_run`: everything a request can get wrong is an HTTP error before the
response starts) and writes its events through `UISink`, which frames them with
`ui_stream.UIParts`. `GET /v1/scenes/{scene}/ui/{chatId}/stream` answers 204 unless an
answer of that chat is running; then it replays it from its `start` and goes on live, from
the run's event buffer (`lean.resume`: `subscribe(run_id, 0)`, written by
`resume_handlers.pump` through the same sink, with its heartbeats and slow-client limit).
A buffer that restarts the answer for a reader that fell behind cuts that reader (`UISink`).
"""

from __future__ import annotations

from aiohttp import web

from lean import events, scenes
from lean.client_io import BodyWriter, ClientGone, bound_send_buffer, reset
from lean.clients import Client, client_of
from lean.config import Config, SceneConfig
from lean.driver import SSE_HEADERS
from lean.errors import BadRequest, Cancelled, NotFound, StillRunning
from lean.handlers import read_json, services_key
from lean.resume import Subscription
from lean.resume_handlers import pump
from lean.resume_remote import RemoteSubscription
from lean.run import Run, new_run_id
from lean.scene_handlers import new_run, serve_run
from lean.services import Services
from lean.ui_stream import HEADER, UIParts, parse_chat, scene_request

UI_HEADERS = {**SSE_HEADERS, HEADER[0]: HEADER[1]}


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
    return await serve_run(request, run, sink, response)


def running_answer(
    services: Services, scene: SceneConfig, chat_id: str, client: Client
) -> Run | None:
    """The chat's answer in `scene` that `client` started and is running now, if any: the
    run registry holds a run until its end (it leaves it before its last event goes out).
    Another client's answer is not found (docs/protocol.md §8: nor resume it)."""
    return services.runs.of_conversation(chat_id, scene.name, client)


async def running_elsewhere(
    services: Services, scene: SceneConfig, chat_id: str, client: Client
) -> RemoteSubscription | None:
    """The chat's answer in `scene`, running on another instance sharing Redis
    (docs/protocol.md §7), subscribed from its start there; else None. The store names it:
    the chat's newest row, still `streaming`, with its run id."""
    store = services.store
    if services.replays.remote is None or not await store.conversation_exists(
        chat_id, client.owner
    ):
        return None
    rows = await store.messages(chat_id, limit=1)
    answer = rows[-1] if rows else None
    if (
        answer is None
        or answer.role != "assistant"
        or answer.status != "streaming"
        or answer.scene != scene.name
        or not answer.run_id
    ):
        return None
    try:
        subscription = await services.replays.subscribe(answer.run_id, 0, client)
    except NotFound:  # ended meanwhile, or its instance keeps no events
        return None
    if not isinstance(subscription, RemoteSubscription):  # ended, or its instance died
        subscription.close()
        return None
    return subscription


async def resume_ui(request: web.Request) -> web.StreamResponse:
    """`GET /v1/scenes/{scene}/ui/{chatId}/stream`: the chat's running answer replayed from its
    `start`, then live (the run's event buffer, `lean.resume`), or 204."""
    services = request.app[services_key]
    client = client_of(request)
    scene = services.clients.scene(client, request.match_info["scene"])
    chat_id = request.match_info["chat_id"]
    if not scenes.is_conversation_id(chat_id):
        raise BadRequest("invalid request: chatId must be 1-64 characters of A-Z, a-z, 0-9, _ or -")
    run = running_answer(services, scene, chat_id, client)
    if run is None:
        services.streams.check()
        elsewhere = await running_elsewhere(services, scene, chat_id, client)
        if elsewhere is None:  # nothing running (or it has ended): `useChat` shows what it has
            return web.Response(status=204)
        subscription: Subscription = elsewhere
    else:
        if run.replay is None:  # resume_buffer_kb = 0: lean keeps no events to replay
            raise StillRunning(
                f"an answer of chat '{chat_id}' is running (run '{run.run_id}') and lean keeps "
                "no events to replay it: its messages are at /v1/conversations/{id}/messages "
                "once it ends"
            )
        services.streams.check()
        subscription = await services.replays.subscribe(run.run_id, 0, client)
    try:
        if subscription.empty:  # ended meanwhile without an event: nothing to show
            return web.Response(status=204)
        response = web.StreamResponse(headers=UI_HEADERS)
        sink = UISink(request, UIParts(client_tools(services.config, scene)))
        bound_send_buffer(request, services.config.limits.send_buffer_bytes)
        sink.body = await BodyWriter.start(request, response)
        await pump(services, subscription, sink)
        return response
    finally:
        subscription.close()
