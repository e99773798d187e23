"""Anthropic Messages API: its answers, streamed or whole, as lean's pieces (no I/O).

Follows docs.anthropic.com "Streaming Messages" (event flow) and "Messages" (the answer).
A stream is `message_start`, content blocks (`content_block_start` / `_delta` / `_stop`),
`message_delta` (stop reason, cumulative usage), then `message_stop`: the end marker.
Only `message_stop` completes a stream; bytes that end without it were truncated and
raise, so no finish is ever fabricated. `ping` is ignored; an `error` event raises the
matching upstream error. Thinking signatures come out as opaque `Signature` pieces, never
as text. Tool calls are numbered by their own order (0, 1, ...), not by block index.
The request side (the OpenAI body as an Anthropic request) is `lean.providers.anthropic`,
which is the adapter lean uses and re-exports `StreamTranslator`, `parse_completion` and
`parse_count` from here.
"""

from __future__ import annotations

from typing import Any

import msgspec

from lean.errors import LeanError, Overloaded, RateLimited, UpstreamError, UpstreamTimeout
from lean.providers.base import (
    Finish,
    Piece,
    Reasoning,
    Signature,
    Text,
    ToolCall,
    Usage,
    decode_answer,
)
from lean.sse import SSEMessage

FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
# Stop reasons OpenAI's words say as they are: any other is kept as `Finish.native` too.
_SAID = frozenset({"end_turn", "max_tokens", "tool_use"})


def _finish(reason: str, stop_sequence: str | None) -> Finish:
    if reason in _SAID:
        return Finish(FINISH[reason])
    return Finish(FINISH.get(reason, "stop"), reason, stop_sequence)


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
    stop_sequence: str | None = None


class _Error(msgspec.Struct):
    type: str = ""
    message: str = ""


class _Answer(msgspec.Struct):
    """A whole message: the non-streaming answer, or message_start's `message`."""

    type: str = ""
    content: list[_Block] | None = None
    stop_reason: str | None = None
    stop_sequence: str | None = None
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


class _Count(msgspec.Struct):
    input_tokens: int | None = None
    type: str = ""
    error: _Error | None = None


_decode_count = msgspec.json.Decoder(_Count).decode


def parse_count(body: bytes | bytearray) -> int:
    """The `input_tokens` of a count_tokens answer; its error raised as an upstream error."""
    count = decode_answer(_decode_count, body)
    if count.type == "error" or count.error is not None:
        raise _error(count.error or _Error())
    if count.input_tokens is None:
        raise UpstreamError("upstream count has no input_tokens", retryable=True)
    return count.input_tokens


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
            delta = event.delta
            if delta is not None and delta.stop_reason and not self.finished:
                self.finished = True
                return [_finish(delta.stop_reason, delta.stop_sequence)]
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
    answer = decode_answer(_decode_answer, body)
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
    pieces.append(_finish(reason, answer.stop_sequence))
    if answer.usage is not None:
        usage = answer.usage
        pieces.append(
            Usage(_prompt_tokens(usage), usage.output_tokens or 0, usage.cache_read_input_tokens)
        )
    return pieces
