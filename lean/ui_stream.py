"""The AI SDK's UI message stream (docs/protocol.md §6): `useChat`'s request body in, a scene
run's events out as the SSE parts its reader (`ai` 5, 6 and 7) assembles into a `UIMessage`.
Pure code, no I/O: `lean.ui_handlers` does the HTTP.

Strategy. Each lean event becomes zero or more parts, written as one frame
(`data: <part JSON>\\n\\n` each), so a transport still writes once per event:

    start       start {messageId, messageMetadata: {runId, conversationId, scene, model}},
                start-step
    delta       text-start / reasoning-start when that kind of part is not open (the open
                one is ended first), then text-delta / reasoning-delta {id, delta}. A
                refusal is a text part of its own, marked `providerMetadata.lean.refusal`.
                A step is one model call with its tool round: the first delta after a
                round, or a tool call after a round's results, ends it (finish-step,
                start-step), as in the AI SDK's own streams.
    tool_start  a tool lean runs: tool-input-start + tool-input-available, both
                `dynamic` (the app does not declare lean's tools) and `providerExecuted`
                (so `useChat` never calls `onToolCall` for it). A client tool
                (`kind = client`): tool-input-start only, static (`tool-NAME` parts).
    waiting     tool-input-available, static, not provider-executed: `useChat` calls
                `onToolCall` exactly when lean waits for the answer (which the app POSTs
                to `/v1/runs/{runId}/tool-results`; the run id is in the message metadata).
    tool_end    tool-output-available {output: lean's result text}, or tool-output-error
                {errorText} when `isError`.
    done        the open part ended, finish-step, finish {messageMetadata: finishReason,
                usage, saved, fallback}, `data: [DONE]`.
    error       the open part ended, message-metadata {error: {code, message, retryable}},
                then `error {errorText}` (code `cancelled`: `abort`, which `useChat`
                treats as a stop, not a failure), `data: [DONE]`.

Only the fields of `ai` 5.0.0's strict part schemas are sent (later versions accept more,
5.0.0 rejects any field it does not know): hence lean's finish reason in the metadata,
not in `finish.finishReason`, and no `reason` on `abort`.

The request: `{"id": chatId, "messages": [UIMessage...], "inputs"?: {...}}`. `id` is the
conversation; the last message must be the user's and its text parts are the run's
message (lean keeps the history itself). Other fields (`trigger`, `messageId`, metadata)
are ignored.
"""

from __future__ import annotations

import json
from typing import Any, Final

import msgspec

from lean import events
from lean.errors import BadRequest, clip
from lean.inbound import decode
from lean.scenes import Scalar, SceneRequest, validated

__all__ = ["DONE", "ChatTurn", "UIChat", "UIMessage", "UIParts", "parse_chat", "scene_request"]

HEADER: Final = ("x-vercel-ai-ui-message-stream", "v1")
DONE: Final = b"data: [DONE]\n\n"


# -- the request ------------------------------------------------------------------------


class UIPart(msgspec.Struct, frozen=True):
    """A part of a `UIMessage`; only text parts are read (`file`, `tool-*`... are skipped)."""

    type: str
    text: Any = None


class UIMessage(msgspec.Struct, frozen=True):
    role: str
    parts: list[UIPart]
    id: str = ""


class UIChat(msgspec.Struct, frozen=True):
    """`useChat`'s body. Each message stays raw JSON: `useChat` sends the whole history every
    time, and lean reads only the last message (it keeps the history itself)."""

    id: str
    messages: list[msgspec.Raw]
    inputs: dict[str, Scalar] = {}


class ChatTurn(msgspec.Struct, frozen=True):
    """What lean takes from a `UIChat`: the conversation, the last message, the inputs."""

    id: str
    last: UIMessage
    inputs: dict[str, Scalar]


_decode_chat = msgspec.json.Decoder(UIChat)
_decode_message = msgspec.json.Decoder(UIMessage)


def parse_chat(body: bytes) -> ChatTurn:
    """`useChat`'s body; a 400 naming the field when it is not usable."""
    chat = decode(_decode_chat, body)
    if not chat.messages:
        raise BadRequest("invalid request: messages is empty (it must end with a user message)")
    where = f"messages[{len(chat.messages) - 1}]"
    last = decode(_decode_message, chat.messages[-1], what=f"request: {where}")
    if last.role != "user":
        # A body ending with an assistant message is `useChat` sending tool outputs back
        # (`sendAutomaticallyWhen`): lean's run is still waiting for them on its
        # tool-results route, and answering the question again would bill a second run.
        raise BadRequest(
            f"invalid request: {where}.role must be 'user', not '{clip(last.role, 40)}' "
            "(answer lean's client tools with POST /v1/runs/{runId}/tool-results)"
        )
    for n, part in enumerate(last.parts):
        if part.type == "text" and not isinstance(part.text, str):
            raise BadRequest(f"invalid request: {where}.parts[{n}].text must be a string")
    return ChatTurn(chat.id, last, chat.inputs)


def scene_request(chat: ChatTurn) -> SceneRequest:
    """The scene request `chat` makes: its last message's text, its id as the conversation."""
    text = "".join(part.text for part in chat.last.parts if part.type == "text")
    try:
        return validated(SceneRequest(inputs=chat.inputs, message=text, conversation_id=chat.id))
    except BadRequest:
        raise BadRequest(
            "invalid request: id (the chat id) must be 1-64 characters of A-Z, a-z, 0-9, _ or -"
        ) from None


# -- the parts ---------------------------------------------------------------------------

Unset = msgspec.UnsetType
UNSET: Final = msgspec.UNSET


class _Part(
    msgspec.Struct, frozen=True, tag_field="type", rename="camel", omit_defaults=True, gc=False
):
    pass


class Start(_Part, tag="start", frozen=True):
    message_id: str
    message_metadata: dict[str, Any]


class StartStep(_Part, tag="start-step", frozen=True):
    pass


class FinishStep(_Part, tag="finish-step", frozen=True):
    pass


class TextStart(_Part, tag="text-start", frozen=True):
    id: str
    provider_metadata: dict[str, dict[str, Any]] | Unset = UNSET


class TextDelta(_Part, tag="text-delta", frozen=True):
    id: str
    delta: str


class TextEnd(_Part, tag="text-end", frozen=True):
    id: str


class ReasoningStart(_Part, tag="reasoning-start", frozen=True):
    id: str


class ReasoningDelta(_Part, tag="reasoning-delta", frozen=True):
    id: str
    delta: str


class ReasoningEnd(_Part, tag="reasoning-end", frozen=True):
    id: str


class ToolInputStart(_Part, tag="tool-input-start", frozen=True):
    tool_call_id: str
    tool_name: str
    provider_executed: bool | Unset = UNSET
    dynamic: bool | Unset = UNSET


class ToolInputAvailable(_Part, tag="tool-input-available", frozen=True):
    tool_call_id: str
    tool_name: str
    input: Any
    provider_executed: bool | Unset = UNSET
    dynamic: bool | Unset = UNSET


class ToolOutputAvailable(_Part, tag="tool-output-available", frozen=True):
    tool_call_id: str
    output: Any
    provider_executed: bool | Unset = UNSET
    dynamic: bool | Unset = UNSET


class ToolOutputError(_Part, tag="tool-output-error", frozen=True):
    tool_call_id: str
    error_text: str
    provider_executed: bool | Unset = UNSET
    dynamic: bool | Unset = UNSET


class MessageMetadata(_Part, tag="message-metadata", frozen=True):
    message_metadata: dict[str, Any]


class Error(_Part, tag="error", frozen=True):
    error_text: str


class Abort(_Part, tag="abort", frozen=True):
    pass


class Finish(_Part, tag="finish", frozen=True):
    message_metadata: dict[str, Any]


_encode: Final = msgspec.json.Encoder().encode
# One decoder per event type: the sink is told the event's name, so no tag dispatch.
_DECODERS: Final[dict[str, msgspec.json.Decoder[Any]]] = {
    str(cls.__struct_config__.tag): msgspec.json.Decoder(cls)
    for cls in (
        events.Start,
        events.Delta,
        events.ToolStart,
        events.ToolEnd,
        events.Waiting,
        events.Done,
        events.Error,
    )
}
_START_STEP: Final = b'data: {"type":"start-step"}\n\n'
_FINISH_STEP: Final = b'data: {"type":"finish-step"}\n\n'
_NEXT_STEP: Final = _FINISH_STEP + _START_STEP
_REFUSAL: Final = {"lean": {"refusal": True}}
# A lean delta's part -> the kind of UI part it streams into, and the prefix of that part's id.
_KINDS: Final = {"content": "text", "thinking": "reasoning", "refusal": "refusal"}


def frame(part: _Part) -> bytes:
    return b"data: %b\n\n" % _encode(part)


def _input(arguments: str) -> Any:
    """A call's arguments as the JSON value they are; the text itself when they are not JSON
    (a model can write broken arguments; the tool then answered with an error)."""
    try:
        return json.loads(arguments) if arguments else {}
    except ValueError:
        return arguments


class UIParts:
    """One run's events in, its UI message stream out. The AI SDK reader's rules are kept
    here: a text or reasoning part is started before its deltas and ended once; a tool's
    input comes before its output; nothing follows `[DONE]` (a feed after it raises)."""

    __slots__ = (
        "_client_tools",
        "_count",
        "_finished",
        "_open",
        "_open_id",
        "_results",
        "_server",
        "_tools",
    )

    def __init__(self, client_tools: frozenset[str] = frozenset()) -> None:
        self._client_tools = client_tools  # the scene's `kind = client` tools, by name
        self._count = 0  # parts started: their ids are `text-1`, `reasoning-2`...
        self._open = ""  # the kind of the open text part ("text", "reasoning", "refusal")
        self._open_id = ""
        # A step is one model call and its tool round. The step has had a tool call: the next
        # delta is the next call's; it has had a tool result: so is the next tool call.
        self._tools = False
        self._results = False
        self._server: set[str] = set()  # tool call ids lean runs itself (dynamic parts)
        self._finished = False

    def feed(self, name: str, payload: bytes) -> bytes:
        """The frames for one encoded lean event (`events.encode`) named `name`: what a
        `Sink` is given."""
        return self.event(_DECODERS[name].decode(payload))

    def event(self, event: events.Event) -> bytes:
        """The frames for one lean event, as one bytes object (b"" when there are none)."""
        if self._finished:
            raise RuntimeError(f"{events.event_name(event)} event after the UI stream ended")
        if isinstance(event, events.Delta):
            return self._delta(event.text, _KINDS[event.part])
        if isinstance(event, events.ToolStart):
            return self._end_part() + self._tool_start(event)
        if isinstance(event, events.Waiting):
            return self._end_part() + frame(
                ToolInputAvailable(event.tool_call_id, event.name, _input(event.arguments))
            )
        if isinstance(event, events.ToolEnd):
            return self._tool_end(event)
        if isinstance(event, events.Start):
            started: dict[str, Any] = {
                "runId": event.run_id,
                "conversationId": event.conversation_id,
                "scene": event.scene,
                "model": event.model,
            }
            return frame(Start(event.message_id, started)) + _START_STEP
        self._finished = True
        if isinstance(event, events.Done):
            ended: dict[str, Any] = {
                "finishReason": event.finish_reason,
                "usage": msgspec.to_builtins(event.usage),
                "saved": event.saved,
                "fallback": event.fallback,
            }
            return self._end_part() + _FINISH_STEP + frame(Finish(ended)) + DONE
        error: dict[str, Any] = {
            "code": event.code,
            "message": event.message,
            "retryable": event.retryable,
        }
        last: _Part = Abort() if event.code == "cancelled" else Error(event.message)
        return self._end_part() + frame(MessageMetadata({"error": error})) + frame(last) + DONE

    def _delta(self, text: str, kind: str) -> bytes:
        head = b""
        if self._tools:  # the model answers the tool round: a new step
            head = self._end_part() + _NEXT_STEP
            self._tools = self._results = False
        if kind != self._open:
            head += self._end_part()
            self._count += 1
            prefix = "reasoning" if kind == "reasoning" else "text"
            self._open, self._open_id = kind, f"{prefix}-{self._count}"
            if kind == "reasoning":
                head += frame(ReasoningStart(self._open_id))
            elif kind == "refusal":
                head += frame(TextStart(self._open_id, _REFUSAL))
            else:
                head += frame(TextStart(self._open_id))
        if kind == "reasoning":
            return head + frame(ReasoningDelta(self._open_id, text))
        return head + frame(TextDelta(self._open_id, text))

    def _end_part(self) -> bytes:
        kind, part_id = self._open, self._open_id
        if not kind:
            return b""
        self._open = self._open_id = ""
        return frame(ReasoningEnd(part_id) if kind == "reasoning" else TextEnd(part_id))

    def _tool_start(self, event: events.ToolStart) -> bytes:
        head = b""
        if self._results:  # the model asks for more tools after a round: a new step
            head = _NEXT_STEP
            self._results = False
        self._tools = True
        call_id, name = event.tool_call_id, event.name
        if name in self._client_tools:  # its input goes out with `waiting`
            return head + frame(ToolInputStart(call_id, name))
        self._server.add(call_id)
        return (
            head
            + frame(ToolInputStart(call_id, name, True, True))
            + frame(ToolInputAvailable(call_id, name, _input(event.arguments), True, True))
        )

    def _tool_end(self, event: events.ToolEnd) -> bytes:
        self._results = True
        call_id = event.tool_call_id
        ours: bool | Unset = True if call_id in self._server else UNSET
        self._server.discard(call_id)
        if event.is_error:
            return frame(ToolOutputError(call_id, event.result, ours, ours))
        return frame(ToolOutputAvailable(call_id, event.result, ours, ours))
