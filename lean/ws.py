"""`GET /v1/ws`: one WebSocket, several concurrent runs (docs/protocol.md §3).

Client frames are `run`, `cancel`, `tool_result` and `resume`; server frames are the
events of §2 with `runId` and `seq` added. A `resume` frame subscribes the socket to a
run's events after a cursor (`lean.resume`; any run lean buffers, begun on this socket,
another or over HTTP), multiplexed with the socket's own runs and counted with them;
`cancel` and `tool_result` reach a resumed run as they reach the socket's own.
Each run writes its own frames, each in one `transport.write()`
(`client_io.TextFrames`), so runs never interleave inside a frame; a client that stops
reading blocks those writes and each run's guard cuts it as on SSE. A bad frame gets an
`error` frame for its run (or with `runId` null) and the socket stays open. Compression
is off: permessage-deflate costs ~100 KB per socket.

A browser cannot set headers on the upgrade: it sends its token as `?access_token=`
or, kept out of URLs (and so out of proxies' access logs), as a subprotocol:
`new WebSocket(url, ["lean", "lean.bearer." + token])`. lean answers `lean`, never
the token. A client offering subprotocols without `lean` is refused (400) before the
handshake: aiohttp would log the offered list, which may hold a token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Annotated, Any

import msgspec
from aiohttp import WSMsgType, web

from lean import events, scenes
from lean.aiohttp_internals import forget_data_callback
from lean.client_io import TextFrames, bound_send_buffer, reset
from lean.clients import client_of
from lean.cluster_wire import RunRequest
from lean.errors import BadRequest, LeanError, NotFound, Overloaded
from lean.handlers import services_key
from lean.inbound import ClientId, decode, is_client_id
from lean.replay import Live
from lean.resume_handlers import MAX_CURSOR, pump
from lean.resume_remote import refused
from lean.run import Run
from lean.scene_handlers import new_run
from lean.services import Services

log = logging.getLogger("lean.ws")

PROTOCOL = "lean"
BEARER_PROTOCOL = "lean.bearer."  # + the token: letters, digits, - _ . (token_urlsafe's)


def _offered(request: web.Request) -> list[str]:
    header = request.headers.get("Sec-WebSocket-Protocol", "")
    return [name for name in (part.strip() for part in header.split(",")) if name]


def protocol_token(request: web.Request) -> str:
    """The token a browser offered as the subprotocol `lean.bearer.<token>`, or ""."""
    for name in _offered(request):
        if name.startswith(BEARER_PROTOCOL):
            return name[len(BEARER_PROTOCOL) :]
    return ""


class _Frame(msgspec.Struct, tag_field="type", rename="camel", forbid_unknown_fields=True):
    run_id: ClientId


class RunFrame(_Frame, tag="run"):
    scene: str
    inputs: dict[str, scenes.Scalar] = {}
    message: str = ""
    conversation_id: str | None = None


class CancelFrame(_Frame, tag="cancel"):
    pass


class ToolResultFrame(_Frame, tag="tool_result"):
    tool_call_id: ClientId
    result: Any = None


class ResumeFrame(_Frame, tag="resume"):
    after: Annotated[int, msgspec.Meta(ge=0, le=MAX_CURSOR)] = 0


_decode = msgspec.json.Decoder(RunFrame | CancelFrame | ToolResultFrame | ResumeFrame)
_decode_loose = msgspec.json.Decoder(dict[str, Any])


class WSSink:
    """One run's events on its socket: text frames with the run's id."""

    def __init__(self, frames: TextFrames, request: web.Request, run_id: str) -> None:
        self._frames = frames
        self._request = request
        self._run_id = run_id

    def write(self, name: str, seq: int, payload: bytes) -> bool:
        return self._frames.write(events.ws_frame(self._run_id, payload, seq))

    async def drain(self) -> None:
        await self._frames.drain()

    def pending(self) -> int:
        return self._frames.pending()

    async def ping(self) -> None:
        """aiohttp's own heartbeat pings the socket."""

    def abort(self) -> None:
        reset(self._request)


class Socket:
    def __init__(
        self,
        services: Services,
        ws: web.WebSocketResponse,
        frames: TextFrames,
        request: web.Request,
    ):
        self.services = services
        self.ws = ws
        self.frames = frames
        self.request = request
        self.client = client_of(request)  # a socket's runs are its client's (lean.clients)
        self.runs: dict[str, Run] = {}
        # Runs this socket resumed: the task writing them, and the run while it runs.
        self.resumed: dict[str, tuple[asyncio.Task[None], Live | None]] = {}

    async def error(self, run_id: str | None, error: LeanError) -> None:
        after = error.retry_after_seconds()
        payload = events.encode(
            events.Error(
                message_id="",
                code=error.code,
                message=error.message,
                retryable=error.retryable,
                retry_after=msgspec.UNSET if after is None else after,
            )
        )
        if not self.ws.closed:
            await self.ws.send_frame(events.ws_frame(run_id, payload), WSMsgType.TEXT)

    async def handle(self, data: str | bytes) -> None:
        try:
            frame = decode(_decode, data, "frame")
        except BadRequest as exc:
            await self.error(_run_id_of(data), exc)
            return
        try:
            if isinstance(frame, RunFrame):
                await self._run(frame)
            elif isinstance(frame, ResumeFrame):
                await self._resume(frame)
            elif self._elsewhere(frame.run_id):
                await self._route(frame)
            elif isinstance(frame, CancelFrame):
                self._find(frame.run_id).cancel()
            else:
                self._find(frame.run_id).tools.answer(frame.tool_call_id, frame.result)
        except LeanError as exc:
            await self.error(frame.run_id, exc)

    def _find(self, run_id: str) -> Live:
        run: Live | None = self.runs.get(run_id)
        if run is None and run_id in self.resumed:
            run = self.resumed[run_id][1]
        if run is None:
            raise NotFound(f"run '{run_id}' is not running on this socket")
        return run

    def _elsewhere(self, run_id: str) -> bool:
        """Whether `run_id` is a run this socket resumed from another instance."""
        return run_id not in self.runs and run_id in self.resumed and not self.resumed[run_id][1]

    async def _route(self, frame: CancelFrame | ToolResultFrame) -> None:
        """A cancel or tool result for a run resumed from another instance, sent to it."""
        name = self.client.name
        if isinstance(frame, CancelFrame):
            request = RunRequest("cancel", frame.run_id, name)
        else:
            result = msgspec.Raw(msgspec.json.encode(frame.result))
            request = RunRequest("tool_result", frame.run_id, name, frame.tool_call_id, result)
        status, body = await self.services.cluster.route(request)
        if status >= 400:
            raise refused(status, body)

    def _check_room(self, run_id: str) -> None:
        limit = self.services.config.limits.max_runs_per_socket
        if run_id in self.runs or run_id in self.resumed:
            raise BadRequest(f"run id '{run_id}' is already running")
        if len(self.runs) + len(self.resumed) >= limit:
            raise Overloaded(f"this socket already carries its limit of {limit} runs")

    async def _resume(self, frame: ResumeFrame) -> None:
        services = self.services
        run_id = frame.run_id
        self._check_room(run_id)
        subscription = await services.replays.subscribe(run_id, frame.after, self.client)
        if subscription.empty:  # the client has the whole answer already
            subscription.close()
            return
        sink = WSSink(self.frames, self.request, run_id)
        task = asyncio.create_task(pump(services, subscription, sink))
        self.resumed[run_id] = (task, services.replays.running(run_id, self.client))
        task.add_done_callback(lambda _: self.resumed.pop(run_id, None))

    async def _run(self, frame: RunFrame) -> None:
        services = self.services
        self._check_room(frame.run_id)
        scene = services.clients.scene(self.client, frame.scene)
        request = scenes.SceneRequest(
            inputs=frame.inputs, message=frame.message, conversation_id=frame.conversation_id
        )
        sink = WSSink(self.frames, self.request, frame.run_id)
        run = await new_run(
            services,
            scene,
            scenes.validated(request),
            run_id=frame.run_id,
            sink=sink,
            client=self.client,
        )
        try:
            run.start(register=False)
        except BaseException:
            run.ticket.end()  # the run never started: its slot is free again
            raise
        assert run.task is not None
        self.runs[frame.run_id] = run
        run.task.add_done_callback(lambda _: self.runs.pop(frame.run_id, None))

    def close(self) -> None:
        for run in list(self.runs.values()):
            run.client_left()
        for task, _ in list(self.resumed.values()):
            task.cancel()  # its subscription closes: the run may wait for another reader


def _run_id_of(data: str | bytes) -> str | None:
    """The runId of a frame that failed, to address its error; None unless a valid id."""
    try:
        run_id = decode(_decode_loose, data).get("runId")
    except BadRequest:
        return None
    return run_id if is_client_id(run_id) else None


async def websocket(request: web.Request) -> web.WebSocketResponse:
    services = request.app[services_key]
    config = services.config
    offered = _offered(request)
    if offered and PROTOCOL not in offered:  # never echo the list: it may hold a token
        raise BadRequest(
            f"offer the WebSocket subprotocol '{PROTOCOL}' (with '{BEARER_PROTOCOL}<token>' "
            "to send a token); lean speaks no other"
        )
    ws = web.WebSocketResponse(
        protocols=(PROTOCOL,),
        compress=False,
        heartbeat=config.server.ping_interval,
        max_msg_size=config.server.max_body_bytes,
    )
    bound_send_buffer(request, config.limits.send_buffer_bytes)
    socket = Socket(services, ws, await TextFrames.start(request, ws), request)
    services.sockets.add(ws)
    try:
        async for message in ws:
            if message.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                await socket.handle(message.data)
    finally:
        services.sockets.discard(ws)
        socket.close()
        if not ws.closed:
            # The peer vanished and aiohttp cancelled this handler: the socket was never
            # closed, and its heartbeat timer would hold it (request, transport, buffers)
            # for a whole ping_interval. close() disarms the timer before its first await
            # and, with the transport gone, returns without waiting for anything.
            with contextlib.suppress(Exception):
                await ws.close()
        # A cycle per socket only the GC frees, else (`aiohttp_internals`, 5); a client
        # that opens a socket per run makes one per run.
        forget_data_callback(request)
    return ws
