"""Anthropic Messages in (docs/protocol.md §1, "The Anthropic dialect"): requests, error
bodies, the model list.

`parse_request` checks a `POST /v1/messages` body the way Anthropic's API reads it and
turns it into lean's chat body, the OpenAI Chat Completions shape every provider adapter
takes, so any model alias can answer it:
- `system` (a string or text blocks) becomes one system message;
- user blocks: `text` and `image` (base64 or url) become content parts; each `tool_result`
  becomes a `tool` message, placed before the turn's other parts (Chat Completions wants
  tool results right after the call); images inside a result follow in a user message;
- assistant blocks: `text` becomes the content, each `tool_use` a tool call (its `input`
  as a JSON string); `thinking` and `redacted_thinking` are left out (no other API takes
  them back);
- `tools` (`input_schema` as `parameters`), `tool_choice` (auto/any/tool/none, and
  `disable_parallel_tool_use` as `parallel_tool_calls: false`), `max_tokens`,
  `stop_sequences` (as `stop`), `temperature`, `top_p`.
`thinking`, `top_k`, `metadata` (Claude Code's `user_id` is longer than some servers take
as `user`), server tools and fields lean does not know have no Chat Completions
form: they reach an Anthropic upstream only. For that, the body carries the request as
the client sent it (`providers.anthropic.Native` under `NATIVE`); the Anthropic adapter
sends that, so `cache_control`, thinking signatures and `redacted_thinking` round-trip
unchanged. What a non-Anthropic upstream would not see and that changes the request's
meaning (a block or tool lean cannot translate) is listed in `Request.untranslated`, for
the route to refuse when the alias is not an Anthropic one.

Every failure is a `BadRequest` naming the field (`$.messages[2].content[0].type`);
`error_status`/`error_body` render any `LeanError` as Anthropic does, so its SDKs raise
their own typed exceptions.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Annotated, Any, Literal

import msgspec

from lean.dialects.common import arguments, convert, invalid
from lean.errors import BadRequest, LeanError
from lean.inbound import decode
from lean.providers.anthropic import Native
from lean.providers.base import NATIVE

__all__ = [
    "ERROR_TYPES",
    "Request",
    "error_body",
    "error_event",
    "error_status",
    "error_type",
    "models_body",
    "parse_request",
]

Unit = Annotated[float, msgspec.Meta(ge=0, le=1)]


class _SystemBlock(msgspec.Struct):
    type: Literal["text"]
    text: str


class _Message(msgspec.Struct):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class _Tool(msgspec.Struct):
    name: Annotated[str, msgspec.Meta(min_length=1)]
    type: str | None = None  # absent or "custom": a client tool; else a server tool
    description: str | None = None
    input_schema: dict[str, Any] | None = None


class _ToolChoice(msgspec.Struct):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class _Thinking(msgspec.Struct):
    type: str
    budget_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None


class _Metadata(msgspec.Struct):
    user_id: str | None = None


class _Request(msgspec.Struct):
    model: Annotated[str, msgspec.Meta(min_length=1)]
    messages: Annotated[list[_Message], msgspec.Meta(min_length=1)]
    system: str | list[_SystemBlock] | None = None
    stop_sequences: list[str] | None = None
    temperature: Unit | None = None
    top_p: Unit | None = None
    top_k: Annotated[int, msgspec.Meta(ge=0)] | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None  # required but to count
    stream: bool = False
    tools: list[_Tool] | None = None
    tool_choice: _ToolChoice | None = None
    thinking: _Thinking | None = None
    metadata: _Metadata | None = None


# Content blocks, checked one by one once their `type` is known.
class _Text(msgspec.Struct):
    text: str


class _Source(msgspec.Struct):
    type: str
    media_type: str | None = None
    data: str | None = None
    url: str | None = None


class _Image(msgspec.Struct):
    source: _Source


class _ToolUse(msgspec.Struct):
    id: Annotated[str, msgspec.Meta(min_length=1)]
    name: Annotated[str, msgspec.Meta(min_length=1)]
    input: dict[str, Any]


class _ToolResult(msgspec.Struct):
    tool_use_id: Annotated[str, msgspec.Meta(min_length=1)]
    content: str | list[dict[str, Any]] | None = None
    is_error: bool = False


class _ThinkingBlock(msgspec.Struct):
    thinking: str
    signature: str | None = None


class _RedactedThinking(msgspec.Struct):
    data: str


class _Typed(msgspec.Struct):
    type: str


class Request(msgspec.Struct, kw_only=True):
    """A checked Messages request: the alias asked for, the chat body, and what the chat
    body could not carry (places in the client's body; an Anthropic upstream gets them)."""

    model: str
    stream: bool
    body: dict[str, Any]
    untranslated: list[str]


_decode_any = msgspec.json.Decoder(dict[str, Any])
_decode_request = msgspec.json.Decoder(_Request)
_encode = msgspec.json.Encoder().encode


def parse_request(
    body: bytes, *, version: str | None = None, beta: str | None = None, counting: bool = False
) -> Request:
    """The request as lean's chat body; `version`/`beta` are the client's
    `anthropic-version`/`anthropic-beta` headers, for an Anthropic upstream. `counting`:
    a `count_tokens` body, which has no `max_tokens`."""
    raw = decode(_decode_any, body)
    request = decode(_decode_request, body)
    if request.max_tokens is None and not counting:
        raise BadRequest("invalid request: Object missing required field `max_tokens`")
    untranslated: list[str] = []
    messages: list[dict[str, Any]] = []
    system = _system(request.system)
    if system:
        messages.append({"role": "system", "content": system})
    for i, message in enumerate(request.messages):
        messages.extend(_message(message, f"$.messages[{i}]", untranslated))
    chat: dict[str, Any] = {"model": request.model, "messages": messages}
    if request.max_tokens is not None:
        chat["max_tokens"] = request.max_tokens
    tools = _tools(request.tools, untranslated)
    if tools:
        chat["tools"] = tools
        choice = request.tool_choice
        if choice is not None:
            chat["tool_choice"] = _tool_choice(choice)
            if choice.disable_parallel_tool_use and choice.type != "none":
                chat["parallel_tool_calls"] = False
    if request.stop_sequences:
        chat["stop"] = request.stop_sequences
    if request.temperature is not None:
        chat["temperature"] = request.temperature
    if request.top_p is not None:
        chat["top_p"] = request.top_p
    raw.pop("stream", None)
    chat[NATIVE] = Native(body=raw, messages=len(messages), version=version, beta=beta)
    return Request(model=request.model, stream=request.stream, body=chat, untranslated=untranslated)


def _system(system: str | list[_SystemBlock] | None) -> str:
    if system is None or isinstance(system, str):
        return system or ""
    return "\n\n".join(block.text for block in system if block.text)


def _message(message: _Message, path: str, untranslated: list[str]) -> list[dict[str, Any]]:
    if isinstance(message.content, str):
        return [{"role": message.role, "content": message.content}]
    if message.role == "assistant":
        return [_assistant(message.content, path, untranslated)]
    results: list[dict[str, Any]] = []  # tool messages first, then the rest of the turn
    parts: list[dict[str, Any]] = []
    for j, block in enumerate(message.content):
        where = f"{path}.content[{j}]"
        kind = _kind(block, where)
        if kind == "text":
            parts.append({"type": "text", "text": convert(block, _Text, where).text})
        elif kind == "image":
            part = _image(convert(block, _Image, where), where)
            if part is None:
                untranslated.append(where)
            else:
                parts.append(part)
        elif kind == "tool_result":
            result = convert(block, _ToolResult, where)
            text, images = _result(result, where, untranslated)
            results.append({"role": "tool", "tool_call_id": result.tool_use_id, "content": text})
            parts.extend(images)
        elif kind in ("tool_use", "thinking", "redacted_thinking"):
            raise invalid(f"a `{kind}` block belongs in an assistant message", where + ".type")
        else:
            untranslated.append(where)
    if not parts:
        return results
    content: str | list[dict[str, Any]] = parts
    if len(parts) == 1 and parts[0]["type"] == "text":
        content = parts[0]["text"]
    return [*results, {"role": "user", "content": content}]


def _assistant(blocks: list[dict[str, Any]], path: str, untranslated: list[str]) -> dict[str, Any]:
    text: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(blocks):
        where = f"{path}.content[{j}]"
        kind = _kind(block, where)
        if kind == "text":
            text.append(convert(block, _Text, where).text)
        elif kind == "tool_use":
            use = convert(block, _ToolUse, where)
            calls.append(
                {
                    "id": use.id,
                    "type": "function",
                    "function": {"name": use.name, "arguments": arguments(use.input)},
                }
            )
        elif kind == "thinking":
            convert(block, _ThinkingBlock, where)  # checked; only an Anthropic upstream takes it
        elif kind == "redacted_thinking":
            convert(block, _RedactedThinking, where)
        elif kind in ("image", "tool_result"):
            raise invalid(f"a `{kind}` block belongs in a user message", where + ".type")
        else:
            untranslated.append(where)
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text)}
    if calls:
        message["tool_calls"] = calls
        message["content"] = message["content"] or None
    return message


def _kind(block: dict[str, Any], where: str) -> str:
    return convert(block, _Typed, where).type


def _image(image: _Image, where: str) -> dict[str, Any] | None:
    source = image.source
    if source.type == "base64":
        if not source.media_type or source.data is None:
            raise invalid("a base64 image needs `media_type` and `data`", where + ".source")
        url = f"data:{source.media_type};base64,{source.data}"
    elif source.type == "url":
        if not source.url:
            raise invalid("a url image needs `url`", where + ".source")
        url = source.url
    else:
        return None  # a Files API id: only Anthropic can read it
    return {"type": "image_url", "image_url": {"url": url}}


def _result(
    result: _ToolResult, where: str, untranslated: list[str]
) -> tuple[str, list[dict[str, Any]]]:
    """A tool result's text (a tool message holds text only) and its images."""
    if result.content is None or isinstance(result.content, str):
        return result.content or "", []
    text: list[str] = []
    images: list[dict[str, Any]] = []
    for k, block in enumerate(result.content):
        inner = f"{where}.content[{k}]"
        kind = _kind(block, inner)
        if kind == "text":
            text.append(convert(block, _Text, inner).text)
        elif kind == "image" and (part := _image(convert(block, _Image, inner), inner)):
            images.append(part)
        else:
            untranslated.append(inner)
    return "\n".join(text), images


def _tools(tools: list[_Tool] | None, untranslated: list[str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, tool in enumerate(tools or ()):
        if tool.type not in (None, "custom"):
            untranslated.append(f"$.tools[{i}]")  # a server tool: Anthropic runs it
            continue
        if tool.input_schema is None:
            raise invalid("Object missing required field `input_schema`", f"$.tools[{i}]")
        function: dict[str, Any] = {"name": tool.name, "parameters": tool.input_schema}
        if tool.description:
            function["description"] = tool.description
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: _ToolChoice) -> str | dict[str, Any]:
    if choice.type == "tool":
        if not choice.name:
            raise invalid("a `tool` choice needs `name`", "$.tool_choice")
        return {"type": "function", "function": {"name": choice.name}}
    return {"auto": "auto", "any": "required", "none": "none"}[choice.type]


# --- errors ------------------------------------------------------------------------------

# Anthropic's error types by status (docs.anthropic.com "Errors"): 400 also stands for
# the other 4xx it does not list. lean's own 503s (full, shutting down, store) are
# Anthropic's 529 `overloaded_error`: its clients know it as "try again later".
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
OVERLOADED = 529


def error_status(error: LeanError) -> int:
    return OVERLOADED if error.status == 503 else error.status


def error_type(error: LeanError) -> str:
    status = error_status(error)
    default = "invalid_request_error" if status < 500 else "api_error"
    return ERROR_TYPES.get(status, default)


class _ErrorDetail(msgspec.Struct):
    type: str
    message: str


class _ErrorBody(msgspec.Struct, tag="error"):
    error: _ErrorDetail


def error_body(error: LeanError) -> bytes:
    """`{"type": "error", "error": {"type", "message"}}`, sent with `error_status(error)`."""
    return _encode(_ErrorBody(_ErrorDetail(error_type(error), error.message)))


def error_event(error: LeanError) -> bytes:
    """The error of a stream that has started: one `event: error` SSE message."""
    return b"event: error\ndata: " + error_body(error) + b"\n\n"


# --- the model list ------------------------------------------------------------------------


def models_body(aliases: Iterable[str], *, created: float | None = None) -> bytes:
    """`GET /v1/models` as Anthropic lists models: one page holding every alias.

    `created` (seconds since the epoch; default now) stands for every alias's
    `created_at`: config has no date per model."""
    stamp = time.strftime(
        "%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if created is None else created)
    )
    data = [
        {"type": "model", "id": alias, "display_name": alias, "created_at": stamp}
        for alias in aliases
    ]
    return _encode(
        {
            "data": data,
            "has_more": False,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        }
    )
