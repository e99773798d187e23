"""OpenAI Chat Completions in and out: request validation, chunk framing, whole answers.

Validation decodes the body once into a typed Struct, so every error names its
field the way msgspec reports it (`$.messages[0].role`); the body is then passed
upstream as the client sent it, so parameters lean does not know still work.

Chunk framing is pre-built per stream: the bytes around a delta
(`data: {"id":...,"choices":[{"index":0,"delta":` ... `,"finish_reason":null}]}`)
are made once, and each text delta costs one string encode and one join. A chunk that
carries what lean does not model (`logprobs`, `delta.annotations`) goes out with the
upstream's `choices` bytes as they came (`Verbatim`), under this stream's id and model.
Usage is the upstream's (details and `total_tokens` included), and absent when it gave none.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

import msgspec

from lean.inbound import decode
from lean.providers.base import (
    Extras,
    Finish,
    Piece,
    Reasoning,
    Refusal,
    Text,
    ToolCall,
    Usage,
    Verbatim,
)

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class _Message(msgspec.Struct):
    role: Role
    content: str | list[dict[str, Any]] | None = None


class _StreamOptions(msgspec.Struct):
    include_usage: bool = False


class ChatRequest(msgspec.Struct):
    model: str
    messages: Annotated[list[_Message], msgspec.Meta(min_length=1)]
    stream: bool = False
    stream_options: _StreamOptions | None = None
    n: Annotated[int, msgspec.Meta(ge=1, le=1)] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None


_decode_request = msgspec.json.Decoder(ChatRequest)
_decode_any = msgspec.json.Decoder(dict[str, Any])
_encode = msgspec.json.Encoder().encode


def parse_request(body: bytes) -> tuple[ChatRequest, dict[str, Any]]:
    """The validated request and the body to send upstream; `BadRequest` names the field."""
    raw = decode(_decode_any, body)
    request = decode(_decode_request, body)
    raw.pop("stream_options", None)
    raw.pop("stream", None)
    return request, raw


def new_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


_CLOSE_TEXT = b'},"finish_reason":null}]}\n\n'


class ChunkFramer:
    """Pieces to `data: {chat.completion.chunk}` frames for one stream (no I/O)."""

    def __init__(self, *, completion_id: str, model: str, include_usage: bool) -> None:
        head = _encode(
            {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
            }
        )
        self._head = b"data: " + head[:-1]
        self._open = self._head + b',"choices":[{"index":0,"delta":'
        self._open_text = self._open + b'{"content":'
        self._include_usage = include_usage
        self._started_calls: set[int] = set()
        self._sent_role = False
        self.usage: Usage | None = None

    def _delta(self, delta: bytes, finish: bytes = b"null") -> bytes:
        if not self._sent_role:
            self._sent_role = True
            delta = (
                b'{"role":"assistant",' + delta[1:] if delta != b"{}" else b'{"role":"assistant"}'
            )
        return b'%b%b,"finish_reason":%b}]}\n\n' % (self._open, delta, finish)

    def frame(self, piece: Piece) -> bytes | None:
        if isinstance(piece, Text):
            if self._sent_role:  # the usual chunk: one format, no dict, no parse
                return b"%b%b%b" % (self._open_text, _encode(piece.text), _CLOSE_TEXT)
            return self._delta(b'{"content":%b}' % _encode(piece.text))
        if isinstance(piece, Reasoning):
            return self._delta(b'{"reasoning_content":%b}' % _encode(piece.text))
        if isinstance(piece, ToolCall):
            return self._delta(b'{"tool_calls":[%b]}' % self._tool_call(piece))
        if isinstance(piece, Refusal):
            return self._delta(b'{"refusal":%b}' % _encode(piece.text))
        if isinstance(piece, Finish):
            return self._delta(b"{}", _encode(piece.reason))
        if isinstance(piece, Usage):
            self.usage = piece
        elif isinstance(piece, Verbatim):
            return self._verbatim(piece)
        return None  # usage goes out at the end; signatures never do

    def _verbatim(self, piece: Verbatim) -> bytes:
        """The upstream's choices as it sent them (`logprobs`, `annotations` and all), under
        this stream's id and model; what they started counts as started."""
        self._sent_role = True
        for carried in piece.pieces:
            if isinstance(carried, ToolCall) and carried.id is not None:
                self._started_calls.add(carried.index)
        return b'%b,"choices":%b}\n\n' % (self._head, piece.choices)

    def _tool_call(self, piece: ToolCall) -> bytes:
        call: dict[str, Any] = {"index": piece.index}
        function: dict[str, str] = {"arguments": piece.arguments}
        if piece.index not in self._started_calls:
            self._started_calls.add(piece.index)
            call["id"] = piece.id or f"call_{uuid.uuid4().hex[:24]}"
            call["type"] = "function"
            function = {"name": piece.name or "", "arguments": piece.arguments}
        call["function"] = function
        return _encode(call)

    def end(self) -> bytes:
        """The usage chunk (when asked for and the upstream gave usage: never invented
        zeros) and `[DONE]`, in one write."""
        if not self._include_usage or self.usage is None:
            return b"data: [DONE]\n\n"
        return b'%b,"choices":[],"usage":%b}\n\ndata: [DONE]\n\n' % (
            self._head,
            _encode(_usage_body(self.usage)),
        )


def error_frame(body: bytes) -> bytes:
    return b"data: " + body + b"\n\n"


def _usage_body(usage: Usage) -> dict[str, Any]:
    """OpenAI's usage object; the total and the details as the upstream gave them."""
    body: dict[str, Any] = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total,
    }
    if usage.cached_tokens is not None:
        body["prompt_tokens_details"] = {"cached_tokens": usage.cached_tokens}
    if usage.reasoning_tokens is not None:
        body["completion_tokens_details"] = {"reasoning_tokens": usage.reasoning_tokens}
    return body


def completion_body(pieces: list[Piece], *, completion_id: str, model: str) -> bytes:
    """A whole `chat.completion` object from an answer's pieces."""
    text: list[str] = []
    reasoning: list[str] = []
    refusal: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    finish = "stop"
    usage: Usage | None = None
    extras = Extras()
    for piece in _flat(pieces):
        if isinstance(piece, Text):
            text.append(piece.text)
        elif isinstance(piece, Reasoning):
            reasoning.append(piece.text)
        elif isinstance(piece, Refusal):
            refusal.append(piece.text)
        elif isinstance(piece, ToolCall):
            call = calls.setdefault(
                piece.index,
                {
                    "id": piece.id or f"call_{uuid.uuid4().hex[:24]}",
                    "type": "function",
                    "function": {"name": piece.name or "", "arguments": ""},
                },
            )
            call["function"]["arguments"] += piece.arguments
        elif isinstance(piece, Finish):
            finish = piece.reason
        elif isinstance(piece, Usage):
            usage = piece
        elif isinstance(piece, Extras):
            extras = piece
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text) or None}
    if refusal:
        message["refusal"] = "".join(refusal)
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    elif message["content"] is None and not refusal:
        message["content"] = ""
    if extras.annotations is not None:
        message["annotations"] = extras.annotations
    choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": finish}
    if extras.logprobs is not None:
        choice["logprobs"] = extras.logprobs
    completion: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }
    if usage is not None:  # unknown when the upstream gave none: omitted, never 0/0
        completion["usage"] = _usage_body(usage)
    return _encode(completion)


def _flat(pieces: list[Piece]) -> list[Piece]:
    """`pieces` with what each `Verbatim` carries in its place."""
    if not any(isinstance(piece, Verbatim) for piece in pieces):
        return pieces
    out: list[Piece] = []
    for piece in pieces:
        out.extend(piece.pieces if isinstance(piece, Verbatim) else (piece,))
    return out


def models_body(aliases: list[str]) -> bytes:
    created = int(time.time())
    return _encode(
        {
            "object": "list",
            "data": [
                {"id": alias, "object": "model", "created": created, "owned_by": "lean"}
                for alias in aliases
            ],
        }
    )
