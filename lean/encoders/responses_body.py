"""The objects of OpenAI's Responses API that lean writes whole (docs/protocol.md §1): the
`response` object (in `response.created`, the final event and a non-streaming answer),
its output items, `usage` and `error`; and an answer's output as the Chat Completions
assistant message lean saves for `previous_response_id`.

An output item is an `Item` while its answer streams (its text still in pieces); `body`
is its JSON object, as the API's `output` array holds it.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import msgspec

from lean.errors import LeanError
from lean.messages import TextBuffer
from lean.providers.base import Usage

__all__ = ["Item", "error_object", "new_id", "response_object", "usage_object"]

_decode_arguments = msgspec.json.Decoder(dict[str, Any]).decode

# lean's error codes as the Responses API's `error.code` (its set is closed): what a client
# such as Codex acts on (a rate limit waits, the rest may retry); the message says lean's.
_ERROR_CODES = {"rate_limited": "rate_limit_exceeded"}


def new_id(prefix: str) -> str:
    """An id in the API's form: `resp_...`, `msg_...`, `rs_...`, `fc_...`, `ctc_...`."""
    return f"{prefix}_{uuid.uuid4().hex[:24]}"  # 96 random bits, as chat completion ids


class Item:
    """One output item: a `message` (its `output_text` and `refusal` parts), a `reasoning`
    item (its summary text), a `function_call` or a `custom_tool_call`."""

    __slots__ = ("call_id", "id", "index", "kind", "name", "namespace", "parts", "status")

    def __init__(
        self, kind: str, index: int, *, call_id: str = "", name: str = "", prefix: str = ""
    ) -> None:
        self.kind = kind
        self.id = new_id(prefix)
        self.index = index  # its output_index
        self.status = "in_progress"
        self.call_id = call_id
        self.name = name
        self.namespace: str | None = None  # a function of a `namespace` tool group: its name
        # message: [(part type, text)]; reasoning: [("summary_text", text)]; calls: one part,
        # the arguments (a custom tool's: the JSON `{"input": ...}` lean asked the model for)
        self.parts: list[tuple[str, TextBuffer]] = []

    def part(self, kind: str) -> TextBuffer:
        buffer = TextBuffer()
        self.parts.append((kind, buffer))
        return buffer

    def text(self, kind: str = "output_text") -> str:
        return "".join(buffer.text() for part, buffer in self.parts if part == kind)

    def custom_input(self) -> str:
        """A custom tool's free-form input: the string its function form carried."""
        arguments = self.text("arguments")
        try:
            value = _decode_arguments(arguments).get("input")
        except (msgspec.DecodeError, ValueError):
            return arguments
        return value if isinstance(value, str) else arguments

    def body(self) -> dict[str, Any]:
        if self.kind == "message":
            content = [part_object(kind, buffer.text()) for kind, buffer in self.parts]
            return {
                "id": self.id,
                "type": "message",
                "status": self.status,
                "role": "assistant",
                "content": content,
            }
        if self.kind == "reasoning":
            summary = [{"type": "summary_text", "text": buffer.text()} for _, buffer in self.parts]
            return {"id": self.id, "type": "reasoning", "status": self.status, "summary": summary}
        call: dict[str, Any] = {
            "id": self.id,
            "type": self.kind,
            "status": self.status,
            "call_id": self.call_id,
            "name": self.name,
        }
        if self.kind == "custom_tool_call":
            call["input"] = self.custom_input() if self.parts else ""
        else:
            call["arguments"] = self.text("arguments")
        if self.namespace is not None:
            call["namespace"] = self.namespace
        return call


def part_object(kind: str, text: str) -> dict[str, Any]:
    if kind == "refusal":
        return {"type": "refusal", "refusal": text}
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def usage_object(usage: Usage) -> dict[str, Any]:
    """The upstream's counts in the API's words; a detail it did not give is left out
    (unknown, never 0), its total is kept (it need not be the sum)."""
    body: dict[str, Any] = {
        "input_tokens": usage.prompt_tokens,
        "output_tokens": usage.completion_tokens,
        "total_tokens": usage.total,
    }
    if usage.cached_tokens is not None:
        body["input_tokens_details"] = {"cached_tokens": usage.cached_tokens}
    if usage.reasoning_tokens is not None:
        body["output_tokens_details"] = {"reasoning_tokens": usage.reasoning_tokens}
    return body


def error_object(error: LeanError) -> dict[str, str]:
    """A failed response's `error`: the API's code for lean's, lean's message."""
    return {"code": _ERROR_CODES.get(error.code, "server_error"), "message": error.message}


def response_object(
    response_id: str,
    created_at: int,
    model: str,
    echo: dict[str, Any],
    *,
    status: str,
    output: list[dict[str, Any]],
    usage: Usage | None = None,
    error: LeanError | None = None,
    incomplete: str | None = None,
) -> dict[str, Any]:
    """The `response` object; `echo` holds the request's settings it repeats."""
    body: dict[str, Any] = {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "model": model,
        "output": output,
        "error": None if error is None else error_object(error),
        "incomplete_details": None if incomplete is None else {"reason": incomplete},
        "usage": None if usage is None else usage_object(usage),
        **echo,
    }
    if status in ("completed", "incomplete", "failed"):
        body["completed_at"] = int(time.time()) if status == "completed" else None
    return body


def chat_message(items: list[Item]) -> dict[str, Any]:
    """An answer's output as the Chat Completions assistant message lean saves (reasoning
    left out: no Chat Completions upstream takes it back)."""
    text = "".join(item.text() for item in items if item.kind == "message")
    refusal = "".join(item.text("refusal") for item in items if item.kind == "message")
    calls = [
        {
            "id": item.call_id,
            "type": "function",
            "function": {"name": item.name, "arguments": item.text("arguments")},
        }
        for item in items
        if item.kind in ("function_call", "custom_tool_call")
    ]
    message: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
    if refusal:
        message["refusal"] = refusal
    if calls:
        message["tool_calls"] = calls
    return message
