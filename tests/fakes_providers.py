"""Real, scriptable fakes of the Anthropic and Gemini APIs, for lean's integration tests.

Both are `tests.fakes.FakeOpenAI` with other routes: the same aiohttp server on 127.0.0.1,
the same scripting (`push` a `Stream`, `Reply` or `Stall`; FIFO; `default` when the queue
is empty), the same `requests: list[Recorded]`, `wait_request` and `wait_disconnect`. The
routes are served through FakeOpenAI's catch-all handler, so tests/fakes.py stays as it is.
`urls` records each request's path with its query string (`Recorded.path` has no query), so
tests can check that no key travels in a URL.

- `FakeAnthropic`: `POST {base_url}/messages`, base_url `http://127.0.0.1:PORT/v1`. The
  default answer streams when the body says `"stream": true`.
- `FakeGemini`: `POST {base_url}/models/{model}:streamGenerateContent?alt=sse` and
  `:generateContent`, base_url `http://127.0.0.1:PORT/v1beta`. The default answer streams
  on the streaming method.

Wire helpers write what the providers send, byte for byte in form: Anthropic named events
(`event: X\\ndata: {...}\\n\\n`) ending with `message_stop`; Gemini `data: {...}\\r\\n\\r\\n`
events (CRLF, as Google's servers send them) with no end marker but a `finishReason`.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from tests.fakes import (
    DEFAULT_TEXT,
    PROMPT_TOKENS,
    Behaviour,
    FakeOpenAI,
    Recorded,
    Reply,
    Stream,
    _dumps,
    _fragments,
    _words,
)

THINKING_SIGNATURE = "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds"
GEMINI_SIGNATURE = "CiQB0e2Kb7Q0Zp8xFAKEthoughtSignature0123456789"

# --- Anthropic wire ----------------------------------------------------------------------


def anthropic_event(obj: dict[str, Any]) -> bytes:
    return b"event: " + obj["type"].encode() + b"\ndata: " + _dumps(obj) + b"\n\n"


def anthropic_error_event(type: str = "overloaded_error", message: str = "Overloaded") -> bytes:
    return anthropic_event({"type": "error", "error": {"type": type, "message": message}})


def _message_start(model: str) -> bytes:
    message = {
        "id": "msg_fake",
        "type": "message",
        "role": "assistant",
        "content": [],
        "model": model,
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": PROMPT_TOKENS, "output_tokens": 1},
    }
    return anthropic_event({"type": "message_start", "message": message})


def _block(index: int, block: dict[str, Any], deltas: list[dict[str, Any]]) -> list[bytes]:
    events = [
        anthropic_event({"type": "content_block_start", "index": index, "content_block": block})
    ]
    for delta in deltas:
        events.append(
            anthropic_event({"type": "content_block_delta", "index": index, "delta": delta})
        )
    events.append(anthropic_event({"type": "content_block_stop", "index": index}))
    return events


def _message_end(stop_reason: str, output_tokens: int) -> list[bytes]:
    delta = {"stop_reason": stop_reason, "stop_sequence": None}
    usage = {"output_tokens": output_tokens}
    return [
        anthropic_event({"type": "message_delta", "delta": delta, "usage": usage}),
        anthropic_event({"type": "message_stop"}),
    ]


def anthropic_text_stream(
    text: str = DEFAULT_TEXT,
    *,
    reasoning: str | None = None,
    signature: str = THINKING_SIGNATURE,
    stop_reason: str = "end_turn",
    model: str = "fake-model",
) -> Stream:
    """message_start, ping, [a thinking block with its signature], a text block, the end."""
    events = [_message_start(model), anthropic_event({"type": "ping"})]
    index = 0
    if reasoning is not None:
        deltas = [{"type": "thinking_delta", "thinking": w} for w in _words(reasoning)]
        deltas.append({"type": "signature_delta", "signature": signature})
        events += _block(index, {"type": "thinking", "thinking": ""}, deltas)
        index += 1
    words = _words(text)
    deltas = [{"type": "text_delta", "text": w} for w in words]
    events += _block(index, {"type": "text", "text": ""}, deltas)
    events += _message_end(stop_reason, len(words))
    return Stream(events)


def anthropic_tool_stream(
    calls: list[tuple[str, str, str]], *, text: str | None = None, model: str = "fake-model"
) -> Stream:
    """`calls` are (id, name, arguments JSON); arguments arrive as input_json_delta fragments."""
    events = [_message_start(model)]
    index = 0
    if text:
        deltas = [{"type": "text_delta", "text": w} for w in _words(text)]
        events += _block(index, {"type": "text", "text": ""}, deltas)
        index += 1
    for call_id, name, arguments in calls:
        block = {"type": "tool_use", "id": call_id, "name": name, "input": {}}
        deltas = [{"type": "input_json_delta", "partial_json": ""}]
        deltas += [{"type": "input_json_delta", "partial_json": f} for f in _fragments(arguments)]
        events += _block(index, block, deltas)
        index += 1
    events += _message_end("tool_use", 10 * len(calls))
    return Stream(events)


def anthropic_message(
    text: str = DEFAULT_TEXT,
    *,
    tool_calls: list[tuple[str, str, dict[str, Any]]] | None = None,
    reasoning: str | None = None,
    stop_reason: str | None = None,
    model: str = "fake-model",
) -> dict[str, Any]:
    """A non-streaming Messages answer; `tool_calls` are (id, name, input)."""
    content: list[dict[str, Any]] = []
    if reasoning is not None:
        content.append({"type": "thinking", "thinking": reasoning, "signature": THINKING_SIGNATURE})
    if text:
        content.append({"type": "text", "text": text})
    for call_id, name, arguments in tool_calls or ():
        content.append({"type": "tool_use", "id": call_id, "name": name, "input": arguments})
    return {
        "id": "msg_fake",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason or ("tool_use" if tool_calls else "end_turn"),
        "stop_sequence": None,
        "usage": {"input_tokens": PROMPT_TOKENS, "output_tokens": len(_words(text)) or 1},
    }


# --- Gemini wire -------------------------------------------------------------------------


def gemini_event(obj: dict[str, Any]) -> bytes:
    return b"data: " + _dumps(obj) + b"\r\n\r\n"


def gemini_chunk(
    parts: list[dict[str, Any]],
    *,
    finish_reason: str | None = None,
    output_tokens: int = 1,
    thoughts_tokens: int = 0,
    model: str = "fake-model",
) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}, "index": 0}
    if finish_reason is not None:
        candidate["finishReason"] = finish_reason
    usage = {
        "promptTokenCount": PROMPT_TOKENS,
        "candidatesTokenCount": output_tokens,
        "totalTokenCount": PROMPT_TOKENS + output_tokens + thoughts_tokens,
    }
    if thoughts_tokens:
        usage["thoughtsTokenCount"] = thoughts_tokens
    return {
        "candidates": [candidate],
        "usageMetadata": usage,
        "modelVersion": model,
        "responseId": "fake-response",
    }


def gemini_text_stream(
    text: str = DEFAULT_TEXT,
    *,
    reasoning: str | None = None,
    signature: str | None = None,
    finish_reason: str = "STOP",
    model: str = "fake-model",
) -> Stream:
    """Thought parts (if any), then a text part per word; the last chunk has finishReason
    (and the `thoughtSignature`, if given, as Gemini puts it on the answer's last part)."""
    thoughts = _words(reasoning) if reasoning else []
    words = _words(text) or [""]
    events = [
        gemini_event(gemini_chunk([{"text": t, "thought": True}], thoughts_tokens=n + 1))
        for n, t in enumerate(thoughts)
    ]
    for n, word in enumerate(words):
        last = n == len(words) - 1
        part: dict[str, Any] = {"text": word}
        if last and signature:
            part["thoughtSignature"] = signature
        chunk = gemini_chunk(
            [part],
            finish_reason=finish_reason if last else None,
            output_tokens=n + 1,
            thoughts_tokens=len(thoughts),
            model=model,
        )
        events.append(gemini_event(chunk))
    return Stream(events)


def gemini_tool_stream(
    calls: list[tuple[str, dict[str, Any]]],
    *,
    signature: str | None = GEMINI_SIGNATURE,
    model: str = "fake-model",
) -> Stream:
    """`calls` are (name, args); all in one chunk, the first carrying a thoughtSignature."""
    parts: list[dict[str, Any]] = []
    for n, (name, args) in enumerate(calls):
        part: dict[str, Any] = {"functionCall": {"name": name, "args": args}}
        if n == 0 and signature:
            part["thoughtSignature"] = signature
        parts.append(part)
    chunk = gemini_chunk(parts, finish_reason="STOP", output_tokens=10 * len(calls), model=model)
    return Stream([gemini_event(chunk)])


def gemini_response(
    text: str = DEFAULT_TEXT,
    *,
    tool_calls: list[tuple[str, dict[str, Any]]] | None = None,
    reasoning: str | None = None,
    finish_reason: str = "STOP",
    model: str = "fake-model",
) -> dict[str, Any]:
    """A non-streaming GenerateContentResponse; `tool_calls` are (name, args)."""
    parts: list[dict[str, Any]] = []
    if reasoning is not None:
        parts.append({"text": reasoning, "thought": True})
    if text:
        parts.append({"text": text})
    parts += [{"functionCall": {"name": n, "args": a}} for n, a in tool_calls or ()]
    tokens = len(_words(text)) or 1
    return gemini_chunk(parts, finish_reason=finish_reason, output_tokens=tokens, model=model)


# --- the servers -------------------------------------------------------------------------


class _NativeFake(FakeOpenAI):
    """FakeOpenAI whose catch-all route also serves one provider's own endpoints."""

    def __init__(self, *, model: str = "fake-model") -> None:
        super().__init__(model=model)
        self.urls: list[str] = []  # path and query of every request, in order

    def _route(self, request: web.Request) -> bool:
        raise NotImplementedError

    async def _not_found(self, request: web.Request) -> web.StreamResponse:
        if request.method == "POST" and self._route(request):
            self.urls.append(str(request.rel_url))
            return await self._serve(request, self._next)
        return await super()._not_found(request)


class FakeAnthropic(_NativeFake):
    def _route(self, request: web.Request) -> bool:
        return request.path in ("/v1/messages", "/v1/messages/count_tokens")

    def _default(self, body: Any) -> Behaviour:
        if isinstance(body, dict) and body.get("stream") is True:
            return anthropic_text_stream(model=self.model)
        return Reply(body=anthropic_message(model=self.model))


class FakeGemini(_NativeFake):
    def _route(self, request: web.Request) -> bool:
        path = request.path
        return path.startswith("/v1beta/models/") and path.endswith(
            (":streamGenerateContent", ":generateContent")
        )

    @property
    def base_url(self) -> str:
        return super().base_url.removesuffix("/v1") + "/v1beta"

    def _next(self, rec: Recorded) -> Behaviour:
        if self._queue or self.default != self._default:
            return super()._next(rec)
        if rec.path.endswith(":streamGenerateContent"):  # the body does not say; the URL does
            return gemini_text_stream(model=self.model)
        return Reply(body=gemini_response(model=self.model))
