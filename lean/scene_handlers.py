"""Scene runs over HTTP: SSE (POST and EventSource GET) and NDJSON; cancel; history;
`new_run`, which starts a run for this module and `lean.ws`.

A cancel or a tool result for a run this instance does not have goes to the instance
that owns it (`lean.cluster`, docs/protocol.md §7), which answers as it would here.

Everything a request can get wrong is checked before the response starts (HTTP
status + error body); from `start` on, the run's events carry the outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any, Protocol

import msgspec
from aiohttp import web

from lean import events, scenes
from lean.client_io import BodyWriter, bound_send_buffer, reset
from lean.clients import Client, client_of
from lean.cluster_wire import Deliver, RunRequest
from lean.config import SceneConfig
from lean.driver import SSE_HEADERS
from lean.encoders.chat import error_response
from lean.errors import BadRequest, LeanError, NotFound, StoreUnavailable, clip
from lean.handlers import read_json, services_key
from lean.inbound import ClientId, decode
from lean.replay import Live
from lean.run import Run, Sink, new_run_id
from lean.scenes import SceneRequest, chat_body, new_conversation_id, render, typed
from lean.services import Services
from lean.store import StoreReadError, StoreWriteError

NDJSON = "application/x-ndjson"
NDJSON_HEADERS = {
    "Content-Type": "application/x-ndjson; charset=utf-8",
    "Cache-Control": "no-cache, no-transform",
    "X-Accel-Buffering": "no",
}


class _HttpSink:
    """A scene run's events on a streaming HTTP response; `frame` is the wire format."""

    PING = b""

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self.body: BodyWriter | None = None  # set once the response has started

    @staticmethod
    def frame(name: str, seq: int, payload: bytes) -> bytes:
        raise NotImplementedError

    def abort(self) -> None:
        reset(self._request)

    def write(self, name: str, seq: int, payload: bytes) -> bool:
        body = self.body
        assert body is not None, "the run starts after the response"
        return body.write(self.frame(name, seq, payload))

    async def drain(self) -> None:
        assert self.body is not None, "the run starts after the response"
        await self.body.drain()

    def pending(self) -> int:
        return self.body.pending() if self.body is not None else 0

    async def ping(self) -> None:
        assert self.body is not None, "the run starts after the response"
        if self.body.write(self.PING):
            await self.body.drain()


class SSESink(_HttpSink):
    PING = events.SSE_PING
    frame = staticmethod(events.sse_frame)


class NDJSONSink(_HttpSink):
    PING = events.NDJSON_PING

    @staticmethod
    def frame(name: str, seq: int, payload: bytes) -> bytes:
        return events.ndjson_frame(payload, seq)


# Seconds a client refused with `store_unavailable` is asked to wait: lean probes the store
# every second, but a full disk is rarely freed sooner than this.
STORE_RETRY_AFTER = 5.0


@contextlib.contextmanager
def reading() -> Iterator[None]:
    """A read the store could not make (a database that went away) is 503, retryable."""
    try:
        yield
    except StoreReadError as exc:
        raise StoreUnavailable(
            f"the store cannot read ({exc})", retry_after=STORE_RETRY_AFTER
        ) from None


async def new_run(
    services: Services,
    scene: SceneConfig,
    request: SceneRequest,
    *,
    run_id: str,
    sink: Sink,
    client: Client,
) -> Run:
    """A run of `scene` for `request` by `client`, its turn saved, ready to `start()`; the
    caller ends `run.ticket` if it never starts the run.

    Everything a request can get wrong raises here, before anything is sent: an unknown
    model, a missing template input, admission, the client's limits, a conversation of
    another client (404: to it, the conversation does not exist). A new conversation has no
    history and starts at turn 1 without asking the store first.
    """
    prompt = render(scene, request)  # what the model sees; saved beside what the user typed
    content = typed(scene, request)
    model = services.config.models.get(scene.model)
    if model is None:
        raise NotFound(f"model '{scene.model}' does not exist")
    services.streams.check()
    store = services.store
    if not store.writable:  # no run starts that could not be saved
        raise StoreUnavailable(
            f"the store cannot write ({store.error})", retry_after=STORE_RETRY_AFTER
        )
    ticket = await services.clients.admit(client)
    try:
        # The cluster's slot last, after the client's own limits (lean.limits.Streams.admit).
        await services.streams.admit()
        cid, turn, history = await _begin_turn(services, scene, request, content, prompt, client)
    except BaseException:
        ticket.end()
        raise
    return Run(
        services,
        run_id=run_id,
        scene=scene,
        model=model,
        conversation_id=cid,
        turn=turn,
        body=chat_body(scene, history, prompt),
        sink=sink,
        ticket=ticket,
    )


async def _begin_turn(
    services: Services,
    scene: SceneConfig,
    request: SceneRequest,
    content: str,
    prompt: str,
    client: Client,
) -> tuple[str, int, list[tuple[str, str]]]:
    """The run's conversation id, its turn (its user message saved) and its history."""
    store = services.store
    cid = request.conversation_id
    history: list[tuple[str, str]] = []
    if cid is None:  # a new conversation: no history to read, and its turn is 1
        cid = new_conversation_id()
        turn = await store.begin_first_turn(
            conversation_id=cid,
            scene=scene.name,
            user_content=content,
            prompt=prompt,
            client=client.owner,
        )
        return cid, turn, history
    if scene.history_turns:
        with reading():
            history = await store.history(cid, scene.history_turns)
    try:
        turn = await store.begin_turn(
            conversation_id=cid,
            scene=scene.name,
            user_content=content,
            prompt=prompt,
            client=client.owner,
        )
    except StoreWriteError as exc:
        raise StoreUnavailable(
            f"the store cannot write ({exc})", retry_after=STORE_RETRY_AFTER
        ) from None
    if turn == 0:  # another client's: the history read above is dropped unused
        raise NotFound(f"conversation '{clip(cid)}' does not exist")
    return cid, turn, history


async def stream_scene(request: web.Request) -> web.StreamResponse:
    """`POST` (JSON body) or `GET` (query, for EventSource) `/v1/scenes/{scene}/stream`."""
    services = request.app[services_key]
    client = client_of(request)
    scene = services.clients.scene(client, request.match_info["scene"])
    if request.method == "GET":
        if "Last-Event-ID" in request.headers:
            # An EventSource reconnecting after its stream ended: a new run would be a
            # second, billed answer. 204 tells EventSource to stop reconnecting.
            return web.Response(status=204)
        scene_request = scenes.parse_query(request.query)
    else:
        scene_request = scenes.parse_body(await read_json(request))
    ndjson = request.method == "POST" and NDJSON in request.headers.get("Accept", "")
    response = web.StreamResponse(headers=NDJSON_HEADERS if ndjson else SSE_HEADERS)
    sink = NDJSONSink(request) if ndjson else SSESink(request)
    run = await new_run(
        services, scene, scene_request, run_id=new_run_id(), sink=sink, client=client
    )
    return await serve_run(request, run, sink, response)


class BodySink(Sink, Protocol):
    """A sink that writes a streaming HTTP response's body, once it has started."""

    body: BodyWriter | None


async def serve_run(
    request: web.Request, run: Run, sink: BodySink, response: web.StreamResponse
) -> web.StreamResponse:
    """Start `run` with `response` as its stream (`sink` writes its body) and wait for its
    end; a client that leaves is the run's `client_left`."""
    try:
        bound_send_buffer(request, request.app[services_key].config.limits.send_buffer_bytes)
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


def _running(services: Services, run_id: str, client: Client | str) -> Live | None:
    """`client`'s run started over HTTP, or any resumable one of its (a WebSocket's too);
    `client` by name for a request another instance routed here."""
    return services.runs.get(run_id, client) or services.replays.running(run_id, client)


async def cancel_run(request: web.Request) -> web.Response:
    run_id = request.match_info["run_id"]
    return await _on_owner(request, RunRequest("cancel", run_id, client_of(request).name))


class ToolResult(msgspec.Struct, rename="camel", forbid_unknown_fields=True):
    tool_call_id: ClientId
    result: Any = None


class _RawToolResult(ToolResult):
    """The same body, its result kept as JSON text until the run's owner decodes it."""

    result: msgspec.Raw = msgspec.Raw(b"null")


_decode_tool_result = msgspec.json.Decoder(_RawToolResult)


async def tool_result(request: web.Request) -> web.Response:
    """Answers a `waiting` event: `{"toolCallId", "result"}`."""
    run_id = request.match_info["run_id"]
    answer = decode(_decode_tool_result, await read_json(request))
    client = client_of(request).name
    return await _on_owner(
        request, RunRequest("tool_result", run_id, client, answer.tool_call_id, answer.result)
    )


async def _on_owner(request: web.Request, run_request: RunRequest) -> web.Response:
    """Acted on here when this instance has the run (whichever client's: another client's
    is 404 here, never routed), else by the instance that has it, which checks the client
    the same way."""
    services = request.app[services_key]
    if run_request.run_id in services.runs or services.replays.is_running(run_request.run_id):
        return _act(services, run_request)
    status, body = await services.cluster.route(run_request)
    return web.Response(status=status, body=body, content_type="application/json")


def _act(services: Services, run_request: RunRequest) -> web.Response:
    run_id = run_request.run_id
    run = _running(services, run_id, run_request.client)
    if run is None:
        raise NotFound(f"run '{clip(run_id)}' is not running")
    if run_request.op == "cancel":
        run.cancel()
        return web.json_response({"runId": run_id, "status": "cancelling"}, status=202)
    run.tools.answer(run_request.tool_call_id, msgspec.json.decode(run_request.result))
    return web.json_response(
        {"runId": run_id, "toolCallId": run_request.tool_call_id, "status": "accepted"}
    )


def deliver(services: Services) -> Deliver:
    """How this instance answers another's request for one of its runs."""

    def answer(run_request: RunRequest) -> tuple[int, bytes]:
        try:
            response = _act(services, run_request)
        except LeanError as exc:
            response = error_response(exc)
        assert isinstance(response.body, bytes)
        return response.status, response.body

    return answer


async def conversation_messages(request: web.Request) -> web.Response:
    cid = request.match_info["conversation_id"]
    store = request.app[services_key].store
    try:
        limit = int(request.query.get("limit", "1000"))
    except ValueError:
        raise BadRequest("limit must be an integer") from None
    if not 1 <= limit <= 10_000:
        raise BadRequest("limit must be between 1 and 10000")
    with reading():
        if not await store.conversation_exists(cid, client_of(request).owner):
            raise NotFound(f"conversation '{clip(cid)}' does not exist")
        messages = await store.messages(cid, limit=limit)
    body = msgspec.json.encode({"conversationId": cid, "messages": messages})
    return web.Response(body=body, content_type="application/json")


async def list_scenes(request: web.Request) -> web.Response:
    """`GET /v1/scenes`: each scene's name, model alias, template inputs and tools (those
    the client may use)."""
    clients = request.app[services_key].clients
    listed = [
        {
            "name": scene.name,
            "model": scene.model,
            "inputs": list(scene.inputs),
            "tools": list(scene.tools),
            "needsMessage": scene.uses_message,
        }
        for scene in clients.scenes(client_of(request))
    ]
    return web.Response(
        body=msgspec.json.encode({"scenes": listed}), content_type="application/json"
    )
