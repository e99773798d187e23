"""Anthropic Messages API (`anthropic-version: 2023-06-01`): request builder and translators.

Follows docs.anthropic.com "Messages" (request shape, tool use, extended thinking) and
"Streaming Messages" (event flow). The OpenAI body is mapped as Anthropic requires:
system/developer text goes top level, `max_tokens` is always sent, roles strictly
alternate (consecutive same-role messages are merged, tool results become `tool_result`
blocks of a user turn), tool calls become `tool_use` blocks.

A stream is `message_start`, content blocks (`content_block_start` / `_delta` / `_stop`),
`message_delta` (stop reason, cumulative usage), then `message_stop`: the end marker.
Only `message_stop` completes a stream; bytes that end without it were truncated and
raise, so no finish is ever fabricated. `ping` is ignored; an `error` event raises the
matching upstream error. Thinking signatures come out as opaque `Signature` pieces, never
as text. Tool calls are numbered by their own order (0, 1, ...), not by block index.

A body that came in as an Anthropic request (`/v1/messages`) carries that request as a
`Native` under `NATIVE`: it is sent as the client wrote it, so nothing is lost in a round
trip through the OpenAI shape (see `Native`).
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

from lean.config import ModelConfig, ProviderConfig
from lean.errors import LeanError, Overloaded, RateLimited, UpstreamError, UpstreamTimeout
from lean.providers.base import (
    NATIVE,
    Finish,
    HttpRequest,
    Piece,
    Reasoning,
    Signature,
    Text,
    ToolCall,
    Usage,
)
from lean.sse import SSEMessage

VERSION = "2023-06-01"
# Anthropic requires max_tokens; this is used when neither the client nor the model sets it.
DEFAULT_MAX_TOKENS = 4096

FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


class _Usage(msgspec.Struct):
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None


class _Block(msgspec.Struct):
    """A content block, or the `delta` of a content_block_delta / message_delta event."""

    type: str | None = None
    text: str | None = None
    thinking: str | None = None
    signature: str | None = None
    data: str | None = None  # redacted_thinking
    id: str | None = None
    name: str | None = None
    input: Any = None
    partial_json: str | None = None
    stop_reason: str | None = None


class _Error(msgspec.Struct):
    type: str = ""
    message: str = ""


class _Answer(msgspec.Struct):
    """A whole message: the non-streaming answer, or message_start's `message`."""

    type: str = ""
    content: list[_Block] | None = None
    stop_reason: str | None = None
    usage: _Usage | None = None
    error: _Error | None = None


class _Event(msgspec.Struct):
    type: str = ""
    index: int = 0
    message: _Answer | None = None
    content_block: _Block | None = None
    delta: _Block | None = None
    usage: _Usage | None = None
    error: _Error | None = None


_decode_event = msgspec.json.Decoder(_Event).decode
_decode_answer = msgspec.json.Decoder(_Answer).decode
_encode = msgspec.json.Encoder().encode


# --- request -----------------------------------------------------------------------------


class Native(msgspec.Struct, frozen=True, kw_only=True):
    """An Anthropic Messages request as a client sent it (lean/dialects/anthropic.py).

    An Anthropic upstream gets it as it is, lean setting only `model` and `stream`, so what
    the OpenAI shape cannot hold arrives unchanged: `cache_control` on the system prompt,
    blocks and tools, thinking blocks with their `signature`, `redacted_thinking`, `top_k`,
    `thinking`, `metadata`, server tools, and fields lean does not know. Messages lean adds
    to the chat body after the request came in (past the first `messages`) are translated
    and appended, so a run that grows the conversation still sends all of it.
    """

    body: dict[str, Any]
    messages: int  # how many chat-body messages the client's request became
    version: str | None = None  # the client's `anthropic-version` header
    beta: str | None = None  # the client's `anthropic-beta` header


def build_request(
    provider: ProviderConfig, model: ModelConfig, body: dict[str, Any], *, stream: bool
) -> HttpRequest:
    native = body.get(NATIVE)
    if isinstance(native, Native):
        return _native_request(provider, model, body, native, stream=stream)
    system, messages = _messages(body.get("messages") or [])
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    payload: dict[str, Any] = {
        "model": model.upstream_model,
        "max_tokens": max_tokens or model.max_tokens or DEFAULT_MAX_TOKENS,
        "messages": messages,
    }
    if system:
        payload["system"] = system
    temperature = body.get("temperature", model.temperature)
    if temperature is not None:
        payload["temperature"] = min(float(temperature), 1.0)  # OpenAI allows 0-2, Anthropic 0-1
    if body.get("top_p") is not None:
        payload["top_p"] = body["top_p"]
    stop = body.get("stop")
    if stop:
        payload["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if body.get("tools"):
        tools = [t for t in body["tools"] if t.get("type", "function") == "function"]
        payload["tools"] = [_tool(t) for t in tools]
    if payload.get("tools"):
        choice = _tool_choice(body.get("tool_choice"))
        if body.get("parallel_tool_calls") is False and (choice or {}).get("type") != "none":
            choice = (choice or {"type": "auto"}) | {"disable_parallel_tool_use": True}
        if choice is not None:
            payload["tool_choice"] = choice
    if stream:
        payload["stream"] = True
    return HttpRequest(
        provider.base_url + "/messages", _headers(provider, stream, None), _encode(payload)
    )


def _headers(provider: ProviderConfig, stream: bool, native: Native | None) -> dict[str, str]:
    headers = {
        "Content-Type": "application/json",
        "Accept": "text/event-stream" if stream else "application/json",
        "anthropic-version": (native and native.version) or VERSION,
    }
    if native is not None and native.beta:
        headers["anthropic-beta"] = native.beta
    if provider.api_key is not None:
        headers["x-api-key"] = provider.api_key.reveal()
    headers.update(provider.headers)
    return headers


def _native_request(
    provider: ProviderConfig,
    model: ModelConfig,
    body: dict[str, Any],
    native: Native,
    *,
    stream: bool,
) -> HttpRequest:
    payload = dict(native.body)
    payload["model"] = model.upstream_model
    payload.pop("stream", None)
    if stream:
        payload["stream"] = True
    thinking = payload.get("thinking")
    thinks = isinstance(thinking, dict) and thinking.get("type") not in (None, "disabled")
    if model.temperature is not None and "temperature" not in payload and not thinks:
        payload["temperature"] = min(model.temperature, 1.0)  # Anthropic refuses it with thinking
    _, added = _messages((body.get("messages") or [])[native.messages :])
    if added:
        messages = list(payload.get("messages") or [])
        for message in added:
            if messages and messages[-1].get("role") == message["role"]:
                last = messages[-1]
                prior = last.get("content")
                blocks = _blocks(prior) if isinstance(prior, str) else list(prior or [])
                messages[-1] = {**last, "content": blocks + message["content"]}
            else:
                messages.append(message)
        payload["messages"] = messages
    return HttpRequest(
        provider.base_url + "/messages", _headers(provider, stream, native), _encode(payload)
    )


def build_count_request(
    provider: ProviderConfig, model: ModelConfig, native: Native
) -> HttpRequest:
    """`POST /messages/count_tokens` for a client's own count request, aimed at the
    upstream model: Anthropic counts, lean does not estimate."""
    payload = dict(native.body)
    payload["model"] = model.upstream_model
    return HttpRequest(
        provider.base_url + "/messages/count_tokens",
        _headers(provider, False, native),
        _encode(payload),
    )


class _Count(msgspec.Struct):
    input_tokens: int | None = None
    type: str = ""
    error: _Error | None = None


_decode_count = msgspec.json.Decoder(_Count).decode


def parse_count(body: bytes | bytearray) -> int:
    """The `input_tokens` of a count_tokens answer; its error raised as an upstream error."""
    try:
        count = _decode_count(body)
    except (msgspec.DecodeError, ValueError) as exc:
        raise UpstreamError(f"unparseable upstream answer: {exc}", retryable=True) from None
    if count.type == "error" or count.error is not None:
        raise _error(count.error or _Error())
    if count.input_tokens is None:
        raise UpstreamError("upstream count has no input_tokens", retryable=True)
    return count.input_tokens


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content if p.get("type") == "text")
    return ""


def _blocks(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks: list[dict[str, Any]] = []
    for part in content if isinstance(content, list) else ():
        if part.get("type") == "text" and part.get("text"):
            blocks.append({"type": "text", "text": part["text"]})
        elif part.get("type") == "image_url":
            url = (part.get("image_url") or {}).get("url", "")
            blocks.append({"type": "image", "source": _image_source(url)})
    return blocks


def _image_source(url: str) -> dict[str, str]:
    if url.startswith("data:") and ";base64," in url:
        media_type, _, data = url[5:].partition(";base64,")
        return {"type": "base64", "media_type": media_type, "data": data}
    return {"type": "url", "url": url}


def _object(arguments: Any) -> dict[str, Any]:
    """OpenAI tool-call arguments (a JSON string) as the object Anthropic requires."""
    if not isinstance(arguments, str):
        return arguments if isinstance(arguments, dict) else {}
    try:
        value = json.loads(arguments or "{}")
    except ValueError:
        return {"arguments": arguments}
    return value if isinstance(value, dict) else {"arguments": value}


def _messages(openai: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    system: list[str] = []
    out: list[dict[str, Any]] = []
    for message in openai:
        role = message.get("role")
        content = message.get("content")
        if role in ("system", "developer"):
            if text := _text_of(content):
                system.append(text)
            continue
        if role == "tool":
            result: dict[str, Any] = {
                "type": "tool_result",
                "tool_use_id": message.get("tool_call_id") or "",
            }
            if text := _text_of(content):
                result["content"] = text
            blocks = [result]
        else:
            blocks = _blocks(content)
        if role == "assistant":
            for call in message.get("tool_calls") or ():
                function = call.get("function") or {}
                blocks.append(
                    {
                        "type": "tool_use",
                        "id": call.get("id") or "",
                        "name": function.get("name") or "",
                        "input": _object(function.get("arguments")),
                    }
                )
        else:
            role = "user"  # user, tool results, and legacy "function" messages
        if not blocks:
            continue  # Anthropic rejects empty turns
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)  # roles must alternate
        else:
            out.append({"role": role, "content": blocks})
    return "\n\n".join(system), out


def _tool(tool: dict[str, Any]) -> dict[str, Any]:
    function = tool.get("function") or {}
    out: dict[str, Any] = {
        "name": function.get("name", ""),
        "input_schema": function.get("parameters") or {"type": "object", "properties": {}},
    }
    if function.get("description"):
        out["description"] = function["description"]
    return out


_CHOICES = {"auto": {"type": "auto"}, "required": {"type": "any"}, "none": {"type": "none"}}


def _tool_choice(choice: Any) -> dict[str, Any] | None:
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "tool", "name": (choice.get("function") or {}).get("name", "")}
    return dict(_CHOICES[choice]) if isinstance(choice, str) and choice in _CHOICES else None


# --- answers -----------------------------------------------------------------------------


_ERRORS = {
    "overloaded_error": Overloaded,
    "rate_limit_error": RateLimited,
    "timeout_error": UpstreamTimeout,
}


def _error(error: _Error) -> LeanError:
    message = f"upstream error: {error.message or error.type or 'unknown'}"
    if error.type in _ERRORS:
        return _ERRORS[error.type](message)
    return UpstreamError(message, retryable=error.type == "api_error")


def _prompt_tokens(u: _Usage) -> int:
    # OpenAI's prompt_tokens include cached tokens; Anthropic's input_tokens exclude them.
    cached = (u.cache_creation_input_tokens or 0) + (u.cache_read_input_tokens or 0)
    return (u.input_tokens or 0) + cached


def _pieces(block: _Block, call: int, *, empty: str) -> list[Piece]:
    """What a whole content block (or a block's start) carries; `call` numbers a tool_use."""
    if block.type == "text":
        return [Text(block.text)] if block.text else []
    if block.type == "thinking":
        pieces: list[Piece] = [Reasoning(block.thinking)] if block.thinking else []
        return [*pieces, Signature(block.signature)] if block.signature else pieces
    if block.type == "redacted_thinking":
        return [Signature(block.data, "anthropic_redacted")] if block.data else []
    if block.type == "tool_use":
        arguments = _encode(block.input).decode() if block.input else empty
        return [ToolCall(call, arguments, block.id or "", block.name or "")]
    return []  # server tool blocks and later additions carry nothing lean shows


class StreamTranslator:
    def __init__(self) -> None:
        self.finished = False
        self._stopped = False
        self._prompt = 0
        self._completion = 0
        self._cached: int | None = None
        self._calls = 0  # tool_use blocks seen
        self._tool_blocks: dict[int, int] = {}  # block index -> tool-call index
        self._empty_args: set[int] = set()  # tool calls with no argument bytes yet

    def feed(self, message: SSEMessage) -> list[Piece]:
        if not message.data:
            return []
        try:
            event = _decode_event(message.data)
        except (msgspec.DecodeError, ValueError) as exc:
            raise UpstreamError(f"unparseable upstream event: {exc}", retryable=True) from None
        kind = event.type
        if kind == "content_block_delta" and event.delta is not None:
            return self._delta(event.index, event.delta)
        if kind == "content_block_start" and event.content_block is not None:
            return self._start(event.index, event.content_block)
        if kind == "content_block_stop":
            call = self._tool_blocks.get(event.index)
            if call is not None and call in self._empty_args:
                self._empty_args.discard(call)
                return [ToolCall(call, "{}")]  # a call without arguments: still valid JSON
            return []
        if kind == "message_start" and event.message and event.message.usage:
            self._usage(event.message.usage)
            return []
        if kind == "message_delta":
            if event.usage is not None:
                self._usage(event.usage)
            reason = event.delta.stop_reason if event.delta is not None else None
            if reason and not self.finished:
                self.finished = True
                return [Finish(FINISH.get(reason, "stop"))]
            return []
        if kind == "message_stop":
            self._stopped = True
            return [Usage(self._prompt, self._completion, self._cached)]
        if kind == "error":
            raise _error(event.error or _Error())
        return []  # ping, and event types added after this was written

    def _usage(self, usage: _Usage) -> None:
        if usage.input_tokens is not None:  # cumulative counts: the latest wins
            self._prompt = _prompt_tokens(usage)
            self._cached = usage.cache_read_input_tokens
        if usage.output_tokens is not None:
            self._completion = usage.output_tokens

    def _start(self, index: int, block: _Block) -> list[Piece]:
        call = self._calls
        if block.type == "tool_use":
            self._calls += 1
            self._tool_blocks[index] = call
            if not block.input:  # streamed calls start with {} and send their input as deltas
                self._empty_args.add(call)
        return _pieces(block, call, empty="")

    def _delta(self, index: int, delta: _Block) -> list[Piece]:
        kind = delta.type
        if kind == "text_delta":
            return [Text(delta.text)] if delta.text else []
        if kind == "input_json_delta":
            call = self._tool_blocks.get(index)
            if call is None or not delta.partial_json:
                return []
            self._empty_args.discard(call)
            return [ToolCall(call, delta.partial_json)]
        if kind == "thinking_delta":
            return [Reasoning(delta.thinking)] if delta.thinking else []
        if kind == "signature_delta" and delta.signature:
            return [Signature(delta.signature)]
        return []  # citations_delta and later additions carry nothing lean shows

    def close(self) -> None:
        if not self._stopped:
            raise UpstreamError(
                "upstream stream ended before message_stop (truncated)", retryable=True
            )


def parse_completion(body: bytes | bytearray) -> list[Piece]:
    """A non-streaming Messages answer, as the pieces a stream would have carried."""
    try:
        answer = _decode_answer(body)
    except (msgspec.DecodeError, ValueError) as exc:
        raise UpstreamError(f"unparseable upstream answer: {exc}", retryable=True) from None
    if answer.type == "error" or answer.error is not None:
        raise _error(answer.error or _Error())
    if answer.content is None:
        raise UpstreamError("upstream answer has no content", retryable=True)
    pieces: list[Piece] = []
    calls = 0
    for block in answer.content:
        pieces.extend(_pieces(block, calls, empty="{}"))
        calls += block.type == "tool_use"
    reason = answer.stop_reason or ("tool_use" if calls else "end_turn")
    pieces.append(Finish(FINISH.get(reason, "stop")))
    if answer.usage is not None:
        usage = answer.usage
        pieces.append(
            Usage(_prompt_tokens(usage), usage.output_tokens or 0, usage.cache_read_input_tokens)
        )
    return pieces
