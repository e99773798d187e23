"""OpenAI Responses out (docs/protocol.md §1): a run's pieces as Responses stream events,
a whole answer as the `response` object, failures in OpenAI's error body.

The order the API promises, and this encoder keeps (the `openai` SDK's `responses.stream()`
checks it; Codex CLI fails a turn that does not end in `response.completed`):
- `response.created`, `response.in_progress` when the response starts (the commit);
- per output item, `response.output_item.added`, its content, `response.output_item.done`:
  a `message` (`content_part.added`, `output_text.delta`... `output_text.done`,
  `content_part.done` per part; a refusal is a `refusal` part with `refusal.delta/done`),
  a `reasoning` item (`reasoning_summary_part.added`, `reasoning_summary_text.delta`...
  `.done`, `reasoning_summary_part.done`), a `function_call` per tool call index
  (`function_call_arguments.delta`... `.done`), or a `custom_tool_call` for a custom tool
  (`custom_tool_call_input.delta/done`, whole at its end: its input travels as a JSON
  string inside the function form lean asked the upstream for);
- last, exactly one of `response.completed` (with the upstream's usage), `response.incomplete`
  (finish `length`: `max_output_tokens`; `content_filter`) or, for a stream cut after
  the commit, `response.failed` with an `error` object: never `completed` for a cut stream.
Every event has a `sequence_number`, from 0, one more each time. An item closes when a
piece of another kind comes (tool calls stay open side by side until then).

Text deltas are the hot path: their bytes around the number and the text are made once
per content part, so a delta costs one string encode and one format.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import msgspec
from aiohttp import web

from lean.encoders.chat import error_response
from lean.encoders.responses_body import Item, new_id, part_object, response_object
from lean.errors import LeanError
from lean.messages import TextBuffer
from lean.providers.base import (
    Finish,
    Piece,
    Reasoning,
    Refusal,
    Text,
    ToolCall,
    Usage,
    Verbatim,
)

__all__ = ["ResponsesEncoder"]

_encode = msgspec.json.Encoder().encode

# Deltas of the open part kept as they came before they are joined: a fold per 16 deltas
# costs little, and what a running answer holds stays near its text's size.
FOLD = 16
_NO_BUFFER = TextBuffer()  # no part is open (nothing is ever added to it)

# A finish reason that leaves the response `incomplete`, and the reason it gives.
INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


class ResponsesEncoder:
    """One response's events. `on_end(encoder)` is called as the last event of an answer
    that ended (completed or incomplete) is made: the route saves it then, before the
    client can ask for it as `previous_response_id`."""

    endpoint = "responses"
    ping = b": ping\n\n"

    def __init__(
        self,
        *,
        model: str,
        echo: dict[str, Any],
        custom_tools: frozenset[str] = frozenset(),
        namespaces: dict[str, str] | None = None,
        on_end: Callable[[ResponsesEncoder], None] | None = None,
    ) -> None:
        self.id = new_id("resp")
        self.created_at = int(time.time())
        self._model = model
        self._echo = echo
        self._custom = custom_tools
        self._namespaces = namespaces or {}
        self._on_end = on_end
        self._seq = 0
        self.items: list[Item] = []
        self._message: Item | None = None  # the open message or reasoning item
        self._calls: dict[int, Item] = {}  # open tool calls, by the upstream's index
        self._part: type[Piece] | None = None  # the piece kind the open part takes
        # The open part's text: its latest deltas (`_recent`), folded into `_buffer` every
        # `FOLD` (a 4-character delta kept as a str of its own costs ~60 bytes).
        self._recent: list[str] = []
        self._buffer = _NO_BUFFER
        self._delta_head = b""
        self.finish = "stop"
        self.usage: Usage | None = None
        self.status = "in_progress"

    # --- events -----------------------------------------------------------------------

    def _event(self, kind: str, body: dict[str, Any]) -> bytes:
        body = {"type": kind, "sequence_number": self._seq, **body}
        self._seq += 1
        return b"event: %b\ndata: %b\n\n" % (kind.encode(), _encode(body))

    def _delta(self, text: str) -> bytes:
        recent = self._recent
        recent.append(text)
        if len(recent) >= FOLD:
            self._fold()
        seq = self._seq
        self._seq = seq + 1
        return b'%b%d,"delta":%b}\n\n' % (self._delta_head, seq, _encode(text))

    def _fold(self) -> None:
        self._buffer.add("".join(self._recent))
        self._recent.clear()

    def _head(self, kind: str, item: Item, **where: int) -> None:
        """The bytes of a `kind` delta event of `item` before its sequence number."""
        fields = {"type": kind, "item_id": item.id, "output_index": item.index, **where}
        if kind == "response.output_text.delta":
            fields["logprobs"] = []
        self._delta_head = b"event: %b\ndata: %b" % (kind.encode(), _encode(fields)[:-1])
        self._delta_head += b',"sequence_number":'

    def _response(self, status: str, **more: Any) -> dict[str, Any]:
        output = [item.body() for item in self.items]
        return response_object(
            self.id, self.created_at, self._model, self._echo, status=status, output=output, **more
        )

    def _lifecycle(self, kind: str, response: bytes) -> bytes:
        """A `response.*` event around the `response` object, encoded once."""
        seq = self._seq
        self._seq = seq + 1
        return b'event: %b\ndata: {"type":"%b","sequence_number":%d,"response":%b}\n\n' % (
            kind.encode(),
            kind.encode(),
            seq,
            response,
        )

    def begin(self) -> bytes:
        response = _encode(self._response("in_progress"))
        return self._lifecycle("response.created", response) + self._lifecycle(
            "response.in_progress", response
        )

    # --- pieces -----------------------------------------------------------------------

    def frame(self, piece: Piece) -> bytes | None:
        if type(piece) is self._part:  # the usual delta: the open part takes it (inlined)
            text: str = piece.text  # type: ignore[union-attr]  # _part is a kind with text
            recent = self._recent
            recent.append(text)
            if len(recent) >= FOLD:
                self._fold()
            seq = self._seq
            self._seq = seq + 1
            return b'%b%d,"delta":%b}\n\n' % (self._delta_head, seq, _encode(text))
        if isinstance(piece, Text | Refusal | Reasoning):
            return self._open(type(piece)) + self._delta(piece.text)
        if isinstance(piece, ToolCall):
            return self._tool_call(piece) or None
        if isinstance(piece, Finish):
            self.finish = piece.reason
        elif isinstance(piece, Usage):
            self.usage = piece  # a call's last usage is its total
        elif isinstance(piece, Verbatim):
            frames = [data for carried in piece.pieces if (data := self.frame(carried))]
            return b"".join(frames) or None
        return None  # signatures and extras have no Responses form

    def _open(self, kind: type[Text] | type[Refusal] | type[Reasoning]) -> bytes:
        """Close what `kind` does not continue; open its item and part."""
        out = [self._close_calls()]
        item = self._message
        wanted = "reasoning" if kind is Reasoning else "message"
        if item is not None and item.kind != wanted:
            out.append(self._close_message())
            item = None
        elif item is not None:
            out.append(self._close_part(item))
        if item is None:
            item = self._message = self._new_item(wanted, "rs" if kind is Reasoning else "msg")
            out.append(self._added(item))
        index = len(item.parts)
        if kind is Reasoning:
            self._buffer = item.part("summary_text")
            part = {"type": "summary_text", "text": ""}
            where = {"item_id": item.id, "output_index": item.index, "summary_index": index}
            added = {**where, "part": part}
            out.append(self._event("response.reasoning_summary_part.added", added))
            self._head("response.reasoning_summary_text.delta", item, summary_index=index)
        else:
            part_kind = "refusal" if kind is Refusal else "output_text"
            self._buffer = item.part(part_kind)
            where = {"item_id": item.id, "output_index": item.index, "content_index": index}
            part = part_object(part_kind, "")
            out.append(self._event("response.content_part.added", {**where, "part": part}))
            delta = "response.refusal.delta" if kind is Refusal else "response.output_text.delta"
            self._head(delta, item, content_index=index)
        self._part = kind
        return b"".join(out)

    def _new_item(self, kind: str, prefix: str, **call: str) -> Item:
        item = Item(kind, len(self.items), prefix=prefix, **call)
        self.items.append(item)
        return item

    def _added(self, item: Item) -> bytes:
        return self._event(
            "response.output_item.added", {"output_index": item.index, "item": item.body()}
        )

    def _tool_call(self, piece: ToolCall) -> bytes:
        out = [self._close_message()]
        item = self._calls.get(piece.index)
        if item is None:
            name = piece.name or ""
            custom = name in self._custom
            item = self._new_item(
                "custom_tool_call" if custom else "function_call",
                "ctc" if custom else "fc",
                call_id=piece.id or new_id("call"),
                name=name,
            )
            item.namespace = self._namespaces.get(name)
            item.part("arguments")
            self._calls[piece.index] = item
            out.append(self._added(item))
        if piece.arguments:
            item.parts[0][1].add(piece.arguments)
            if item.kind == "function_call":  # a custom tool's input goes out whole at its end
                where = {"item_id": item.id, "output_index": item.index, "delta": piece.arguments}
                out.append(self._event("response.function_call_arguments.delta", where))
        return b"".join(out)

    # --- closing ----------------------------------------------------------------------

    def _close_part(self, item: Item) -> bytes:
        kind = self._part
        if kind is None:
            return b""
        self._fold()
        self._part, self._buffer = None, _NO_BUFFER
        index = len(item.parts) - 1
        text = item.parts[index][1].text()
        where = {"item_id": item.id, "output_index": item.index}
        if kind is Reasoning:
            where["summary_index"] = index
            part = {"type": "summary_text", "text": text}
            return self._event(
                "response.reasoning_summary_text.done", {**where, "text": text}
            ) + self._event("response.reasoning_summary_part.done", {**where, "part": part})
        where["content_index"] = index
        if kind is Refusal:
            done = self._event("response.refusal.done", {**where, "refusal": text})
        else:
            done = self._event("response.output_text.done", {**where, "text": text, "logprobs": []})
        part = part_object("refusal" if kind is Refusal else "output_text", text)
        return done + self._event("response.content_part.done", {**where, "part": part})

    def _close_message(self, status: str = "completed") -> bytes:
        item = self._message
        if item is None:
            return b""
        self._message = None
        closed = self._close_part(item)
        item.status = status
        return closed + self._done(item)

    def _close_calls(self, status: str = "completed") -> bytes:
        if not self._calls:
            return b""
        out = []
        for item in self._calls.values():
            where = {"item_id": item.id, "output_index": item.index}
            if item.kind == "custom_tool_call":
                text = item.custom_input()
                if text:
                    delta = {**where, "delta": text}
                    out.append(self._event("response.custom_tool_call_input.delta", delta))
                done = {**where, "input": text}
                out.append(self._event("response.custom_tool_call_input.done", done))
            else:
                arguments = {**where, "arguments": item.text("arguments")}
                out.append(self._event("response.function_call_arguments.done", arguments))
            item.status = status
            out.append(self._done(item))
        self._calls = {}
        return b"".join(out)

    def _done(self, item: Item) -> bytes:
        return self._event(
            "response.output_item.done", {"output_index": item.index, "item": item.body()}
        )

    def end(self) -> bytes:
        """Close what is open; then `response.completed` or `response.incomplete`."""
        incomplete = INCOMPLETE.get(self.finish)
        status = "completed" if incomplete is None else "incomplete"
        closed = self._close_message(status) + self._close_calls(status)
        self.status = status
        response = self._response(status, usage=self.usage, incomplete=incomplete)
        last = self._lifecycle(f"response.{status}", _encode(response))
        if self._on_end is not None:
            self._on_end(self)
        return closed + last

    def error_frame(self, error: LeanError) -> bytes:
        """A stream cut after the commit: `response.failed`, its output as far as it got."""
        self._fold()  # the open part's latest deltas join its text
        for item in self.items:
            if item.status == "in_progress":
                item.status = "incomplete"
        self.status = "failed"
        response = self._response("failed", usage=self.usage, error=error)
        return self._lifecycle("response.failed", _encode(response))

    def error_response(self, error: LeanError) -> web.Response:
        return error_response(error)

    def whole(self, pieces: list[Piece]) -> web.Response:
        """The `response` object of a whole answer: the pieces go through the stream's
        states (their events unsent), so both forms have the same items."""
        for piece in pieces:
            self.frame(piece)
        self.end()
        incomplete = INCOMPLETE.get(self.finish)
        body = self._response(self.status, usage=self.usage, incomplete=incomplete)
        return web.Response(body=_encode(body), content_type="application/json")
