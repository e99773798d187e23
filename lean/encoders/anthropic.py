"""Anthropic Messages out (docs/protocol.md §1, "The Anthropic dialect"): stream events,
whole `message` objects and Anthropic's error bodies, from any upstream's pieces.

A stream is `message_start`, then content blocks, each `content_block_start`, its
deltas, `content_block_stop`, numbered 0, 1, ... in the order they open (the SDKs
index their message's `content` by it); then `message_delta` (stop reason, usage) and
`message_stop`. Blocks by piece:
- text (and a refusal's words: Anthropic has no refusal block; the stop reason says it):
  a `text` block, `text_delta`s;
- reasoning: a `thinking` block, `thinking_delta`s, and an Anthropic upstream's signature
  as its `signature_delta` (the next reasoning after a signature opens a new block, as
  the upstream's blocks were); a `redacted_thinking` block whole, in its start event;
- a tool call: one `tool_use` block per call index, its arguments as `input_json_delta`s.
A block closes when a block of another kind (or another call) opens, or at the end.

`message_start` says `usage.input_tokens` before the upstream has said anything: lean's
estimate (`lean.dialects.estimate`); `message_delta`'s usage is cumulative and the
upstream's (its input tokens replace the estimate in the SDK's final message), with what
the upstream did not report left out, never 0. A stream cut after the commit ends with
one `event: error` and no `message_stop`: an answer is never finished on an upstream's
behalf. `event: ping` is the heartbeat, as Anthropic's own.
"""

from __future__ import annotations

import uuid
from typing import Any

import msgspec
from aiohttp import web

from lean.dialects.anthropic import error_body, error_event, error_status
from lean.errors import LeanError
from lean.providers.base import (
    Finish,
    Piece,
    Reasoning,
    Refusal,
    Signature,
    Text,
    ToolCall,
    Usage,
    Verbatim,
)

__all__ = ["MessagesEncoder", "error_response", "stop_reason"]

_encode = msgspec.json.Encoder().encode

# lean's finish reasons (OpenAI's words) as Anthropic's `stop_reason`. A finish with an
# Anthropic upstream's own word (`Finish.native`: stop_sequence, pause_turn, ...) keeps it.
STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
    "refusal": "refusal",
}

_TEXT, _THINKING, _TOOL = 1, 2, 3  # the kind of the open block


def stop_reason(finish: Finish | None, refused: bool) -> str:
    """Anthropic's stop reason for a finish (none seen: `end_turn`); an answer that
    refused and then stopped is a `refusal`."""
    if finish is None:
        return "refusal" if refused else "end_turn"
    if finish.native is not None:
        return finish.native
    if refused and finish.reason == "stop":
        return "refusal"
    return STOP_REASONS.get(finish.reason, "end_turn")


def usage_body(usage: Usage | None, estimate: int | None) -> dict[str, int]:
    """Anthropic's usage: `input_tokens` exclude cache reads (OpenAI's prompt tokens
    include them); `estimate` stands for input tokens the upstream did not report."""
    if usage is None:
        return {} if estimate is None else {"input_tokens": estimate}
    body = {"input_tokens": usage.prompt_tokens - (usage.cached_tokens or 0)}
    if usage.cached_tokens is not None:
        body["cache_read_input_tokens"] = usage.cached_tokens
    body["output_tokens"] = usage.completion_tokens
    return body


def error_response(error: LeanError) -> web.Response:
    """`error` as an HTTP status with Anthropic's body (and its `Retry-After`, if any)."""
    return web.Response(
        status=error_status(error),
        body=error_body(error),
        content_type="application/json",
        headers=error.headers(),
    )


def _event(kind: bytes, body: dict[str, Any]) -> bytes:
    return b"event: %b\ndata: %b\n\n" % (kind, _encode(body))


def _delta_head(index: int, kind: bytes) -> bytes:
    return (
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
        b'"delta":{"type":"%b","%b":' % (index, kind + b"_delta", kind)
    )


_TEXT_START = b'"content_block":{"type":"text","text":""}}\n\n'
_THINKING_START = b'"content_block":{"type":"thinking","thinking":"","signature":""}}\n\n'
_CLOSE_DELTA = b"}}\n\n"
_JSON_DELTA = (
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
    b'"delta":{"type":"input_json_delta","partial_json":%b}}\n\n'
)


class MessagesEncoder:
    """One request's pieces as Anthropic Messages events (no I/O)."""

    endpoint = "messages"
    ping = b'event: ping\ndata: {"type":"ping"}\n\n'

    def __init__(self, *, model: str, input_tokens: int) -> None:
        self._id = "msg_" + uuid.uuid4().hex[:24]
        self._model = model
        self._estimate = input_tokens
        self._blocks = 0  # blocks opened
        self._open = 0  # the open block's kind, 0 when none is
        self._signed = False  # the open thinking block has its signature
        self._text_head = b""  # the open text or thinking block's delta, up to its text
        self._calls: dict[int, int] = {}  # tool-call index -> its block's index
        self._finish: Finish | None = None
        self._refused = False
        self.usage: Usage | None = None

    def begin(self) -> bytes:
        message: dict[str, Any] = {
            "id": self._id,
            "type": "message",
            "role": "assistant",
            "model": self._model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": self._estimate, "output_tokens": 0},
        }
        return _event(b"message_start", {"type": "message_start", "message": message})

    def frame(self, piece: Piece) -> bytes | None:
        if isinstance(piece, Text):
            if self._open == _TEXT:  # the usual event: one format, no dict
                return b"%b%b%b" % (self._text_head, _encode(piece.text), _CLOSE_DELTA)
            return self._text(piece.text)
        if isinstance(piece, Reasoning):
            if self._open == _THINKING and not self._signed:
                return b"%b%b%b" % (self._text_head, _encode(piece.text), _CLOSE_DELTA)
            return self._opened(_THINKING) + self._text_head + _encode(piece.text) + _CLOSE_DELTA
        if isinstance(piece, ToolCall):
            return self._tool_call(piece)
        if isinstance(piece, Signature):
            return self._signature(piece)
        if isinstance(piece, Refusal):
            self._refused = True
            return self.frame(Text(piece.text)) if piece.text else None
        if isinstance(piece, Finish):
            self._finish = piece
        elif isinstance(piece, Usage):
            self.usage = piece
        elif isinstance(piece, Verbatim):
            frames = [data for carried in piece.pieces if (data := self.frame(carried))]
            return b"".join(frames) or None
        return None  # the end says the finish and usage; Extras are Chat Completions'

    def _text(self, text: str) -> bytes:
        return self._opened(_TEXT) + self._text_head + _encode(text) + _CLOSE_DELTA

    def _opened(self, kind: int) -> bytes:
        """Close the open block and open one of `kind` (text or thinking)."""
        index = self._blocks
        out = self._close() + b'event: content_block_start\ndata: {"type":"content_block_start",'
        out += b'"index":%d,%b' % (index, _TEXT_START if kind == _TEXT else _THINKING_START)
        self._blocks += 1
        self._open = kind
        self._signed = False
        self._text_head = _delta_head(index, b"text" if kind == _TEXT else b"thinking")
        return out

    def _close(self) -> bytes:
        if not self._open:
            return b""
        self._open = 0
        return _event(
            b"content_block_stop", {"type": "content_block_stop", "index": self._blocks - 1}
        )

    def _signature(self, piece: Signature) -> bytes | None:
        if piece.kind == "anthropic_redacted":
            out = self._close()
            index = self._blocks
            self._blocks += 1
            block = {"type": "redacted_thinking", "data": piece.value}
            start = {"type": "content_block_start", "index": index, "content_block": block}
            stop = {"type": "content_block_stop", "index": index}
            return out + _event(b"content_block_start", start) + _event(b"content_block_stop", stop)
        if piece.kind != "anthropic":
            return None  # another provider's (Gemini's): no Anthropic client can use it
        out = b"" if self._open == _THINKING and not self._signed else self._opened(_THINKING)
        self._signed = True
        delta = {"type": "signature_delta", "signature": piece.value}
        body = {"type": "content_block_delta", "index": self._blocks - 1, "delta": delta}
        return out + _event(b"content_block_delta", body)

    def _tool_call(self, piece: ToolCall) -> bytes | None:
        out = b""
        index = self._calls.get(piece.index)
        if index is None:
            out = self._close()
            index = self._calls[piece.index] = self._blocks
            self._blocks += 1
            self._open = _TOOL
            block = {
                "type": "tool_use",
                "id": piece.id or "toolu_" + uuid.uuid4().hex[:24],
                "name": piece.name or "",
                "input": {},
            }
            start = {"type": "content_block_start", "index": index, "content_block": block}
            out += _event(b"content_block_start", start)
        if piece.arguments:
            # A fragment of a call whose block closed (an upstream that interleaves calls)
            # still names its block: the SDKs add it to that block's input.
            out += _JSON_DELTA % (index, _encode(piece.arguments))
        return out or None

    def end(self) -> bytes:
        delta = {
            "type": "message_delta",
            "delta": {
                "stop_reason": stop_reason(self._finish, self._refused),
                "stop_sequence": self._finish and self._finish.stop_sequence,
            },
            "usage": usage_body(self.usage, None),
        }
        return (
            self._close()
            + _event(b"message_delta", delta)
            + b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
        )

    def error_frame(self, error: LeanError) -> bytes:
        """After the first byte an error travels in band: one `event: error`."""
        return error_event(error)

    def error_response(self, error: LeanError) -> web.Response:
        return error_response(error)

    def whole(self, pieces: list[Piece]) -> web.Response:
        return web.Response(body=_encode(self.message(pieces)), content_type="application/json")

    def message(self, pieces: list[Piece]) -> dict[str, Any]:
        """A whole `message` object from an answer's pieces."""
        answer = _Whole()
        for piece in pieces:
            answer.add(piece)
        finish = answer.finish
        return {
            "id": self._id,
            "type": "message",
            "role": "assistant",
            "model": self._model,
            "content": answer.blocks(),
            "stop_reason": stop_reason(finish, answer.refused),
            "stop_sequence": finish and finish.stop_sequence,
            "usage": usage_body(answer.usage, self._estimate),
        }


class _Whole:
    """The content blocks of a whole answer, as a stream would have opened them."""

    def __init__(self) -> None:
        self.content: list[dict[str, Any]] = []
        self.calls: dict[int, dict[str, Any]] = {}
        self.arguments: dict[int, list[str]] = {}
        self.finish: Finish | None = None
        self.usage: Usage | None = None
        self.refused = False
        self._signed = False

    def _last(self, kind: str) -> dict[str, Any] | None:
        last = self.content[-1] if self.content else None
        return last if last is not None and last["type"] == kind else None

    def add(self, piece: Piece) -> None:
        if isinstance(piece, Text | Refusal):
            self.refused |= isinstance(piece, Refusal)
            if (block := self._last("text")) is None:
                self.content.append(block := {"type": "text", "text": ""})
            block["text"] += piece.text
        elif isinstance(piece, Reasoning):
            block = self._last("thinking")
            if block is None or self._signed:
                self.content.append(block := {"type": "thinking", "thinking": "", "signature": ""})
                self._signed = False
            block["thinking"] += piece.text
        elif isinstance(piece, Signature):
            if piece.kind == "anthropic_redacted":
                self.content.append({"type": "redacted_thinking", "data": piece.value})
            elif piece.kind == "anthropic":
                block = self._last("thinking")
                if block is None or self._signed:
                    self.content.append(block := {"type": "thinking", "thinking": ""})
                block["signature"] = piece.value
                self._signed = True
        elif isinstance(piece, ToolCall):
            self._tool_call(piece)
        elif isinstance(piece, Finish):
            self.finish = piece
        elif isinstance(piece, Usage):
            self.usage = piece
        elif isinstance(piece, Verbatim):
            for carried in piece.pieces:
                self.add(carried)

    def _tool_call(self, piece: ToolCall) -> None:
        block = self.calls.get(piece.index)
        if block is None:
            block = self.calls[piece.index] = {
                "type": "tool_use",
                "id": piece.id or "toolu_" + uuid.uuid4().hex[:24],
                "name": piece.name or "",
                "input": {},
            }
            self.content.append(block)
            self.arguments[piece.index] = []
        self.arguments[piece.index].append(piece.arguments)

    def blocks(self) -> list[dict[str, Any]]:
        """The content, each call's fragments joined into its `input`."""
        for index, block in self.calls.items():
            block["input"] = _input("".join(self.arguments[index]))
        return self.content


def _input(arguments: str) -> Any:
    """A call's arguments as the object Anthropic's `input` is; a string that is not
    JSON (a model's mistake) is kept as the `arguments` of an object, not lost."""
    if not arguments:
        return {}
    try:
        value = msgspec.json.decode(arguments)
    except msgspec.DecodeError:
        return {"arguments": arguments}
    return value if isinstance(value, dict) else {"arguments": value}
