"""OpenAI-compatible providers (OpenAI, DeepSeek, OpenRouter, vLLM, Ollama, llama.cpp).

Request builder and translators, no I/O. The stream translator follows the
Chat Completions streaming format and the dialects seen in the wild:
- a first chunk with empty `choices` (Azure content-filter results), skipped;
- a refusal as `delta.refusal` (`message.refusal` in a whole answer);
- reasoning as `delta.reasoning_content` (DeepSeek, vLLM) or `delta.reasoning`
  (OpenRouter, Ollama);
- tool calls as fragments keyed by `index`, `id` and `function.name` on the first;
- usage on a chunk with empty `choices` (`stream_options.include_usage`) or on
  the finish chunk (some servers);
- `logprobs`, `delta.annotations` (web-search citations) and any field of a choice or a
  delta lean does not know (OpenRouter's `reasoning_details`, `native_finish_reason`, a
  server's own): such a chunk's choices go on as the upstream sent them (a `Verbatim`
  piece), decoded a second time only then. The choice and delta Structs forbid unknown
  fields, so a chunk without any costs nothing more; the chunk's own fields (`id`,
  `model`, `system_fingerprint`, ...) are lean's stream's, not passed on;
- an in-band `{"error": ...}` object, raised as the matching upstream error;
- comment lines (OpenRouter's `: OPENROUTER PROCESSING`) never reach a translator.
A stream is finished by `[DONE]` or by a finish reason; one that ends with
neither was truncated and raises, so no finish is ever fabricated.
"""

from __future__ import annotations

from typing import Any

import msgspec

from lean.config import ModelConfig, ProviderConfig
from lean.errors import LeanError, Overloaded, RateLimited, UpstreamError
from lean.providers.base import (
    NATIVE,
    Extras,
    Finish,
    HttpRequest,
    Piece,
    Reasoning,
    Refusal,
    Text,
    ToolCall,
    Usage,
    Verbatim,
    decode_answer,
)
from lean.sse import SSEMessage


class _Function(msgspec.Struct, gc=False):
    name: str | None = None
    arguments: str | None = None


class _ToolCallDelta(msgspec.Struct, gc=False):
    index: int = 0
    id: str | None = None
    function: _Function | None = None


class _Delta(msgspec.Struct, gc=False, forbid_unknown_fields=True):
    role: msgspec.Raw = msgspec.Raw()  # "assistant": the client's stream says it itself
    content: str | None = None
    refusal: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[_ToolCallDelta] | None = None
    annotations: msgspec.Raw = msgspec.Raw()  # kept as bytes, never decoded: see _given


class _Choice(msgspec.Struct, gc=False, forbid_unknown_fields=True):
    index: int = 0
    delta: _Delta | None = None
    finish_reason: str | None = None
    logprobs: msgspec.Raw = msgspec.Raw()  # OpenAI sends `"logprobs":null` on every chunk


# The same, taking fields lean does not know: a chunk that has some is decoded again with
# these, and its choices go on verbatim.
class _AnyDelta(_Delta, forbid_unknown_fields=False):
    pass


class _AnyChoice(_Choice, forbid_unknown_fields=False):
    delta: _AnyDelta | None = None


class _RawChoices(msgspec.Struct, gc=False):
    choices: msgspec.Raw = msgspec.Raw()


class _PromptDetails(msgspec.Struct, gc=False):
    cached_tokens: int | None = None


class _CompletionDetails(msgspec.Struct, gc=False):
    reasoning_tokens: int | None = None


class _Usage(msgspec.Struct, gc=False):
    prompt_tokens: int | None = 0
    completion_tokens: int | None = 0
    total_tokens: int | None = None
    prompt_tokens_details: _PromptDetails | None = None
    completion_tokens_details: _CompletionDetails | None = None


class _Error(msgspec.Struct, gc=False):
    message: str = ""
    type: str | None = None
    code: str | int | None = None


class _Chunk(msgspec.Struct, gc=False):
    choices: list[_Choice] | None = None
    usage: _Usage | None = None
    error: _Error | str | None = None


class _AnyChunk(_Chunk):
    choices: list[_AnyChoice] | None = None  # type: ignore[assignment]


class _ToolCallFull(msgspec.Struct, gc=False):
    id: str = ""
    function: _Function | None = None


class _Message(msgspec.Struct, gc=False):
    content: str | None = None
    refusal: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[_ToolCallFull] | None = None
    annotations: msgspec.Raw = msgspec.Raw()


class _CompletionChoice(msgspec.Struct, gc=False):
    message: _Message | None = None
    finish_reason: str | None = None
    logprobs: msgspec.Raw = msgspec.Raw()


class _Completion(msgspec.Struct, gc=False):
    choices: list[_CompletionChoice] | None = None
    usage: _Usage | None = None
    error: _Error | str | None = None


_decode_chunk = msgspec.json.Decoder(_Chunk).decode
_decode_any_chunk = msgspec.json.Decoder(_AnyChunk).decode
_decode_completion = msgspec.json.Decoder(_Completion).decode
_decode_raw_choices = msgspec.json.Decoder(_RawChoices).decode


def _given(raw: msgspec.Raw) -> bool:
    """A value the upstream gave: more than absent (empty), `null`, `{}` or `[]`. Nothing
    else is 4 bytes or fewer, so the common `"logprobs":null` costs one len()."""
    return len(raw) > 4


_encode = msgspec.json.Encoder().encode


def build_request(
    provider: ProviderConfig, model: ModelConfig, body: dict[str, Any], *, stream: bool
) -> HttpRequest:
    """The client's Chat Completions body, aimed at the upstream model.

    Unknown parameters pass through untouched; lean asks for usage itself so the
    final answer always has token counts.
    """
    payload = dict(body)
    payload.pop(NATIVE, None)  # another API's request, kept for its own upstream kind
    payload["model"] = model.upstream_model
    payload["stream"] = stream
    if stream:
        payload["stream_options"] = {"include_usage": True}
    else:
        payload.pop("stream_options", None)
    if model.max_tokens is not None and not (
        "max_tokens" in payload or "max_completion_tokens" in payload
    ):
        payload["max_tokens"] = model.max_tokens
    if model.temperature is not None and "temperature" not in payload:
        payload["temperature"] = model.temperature
    headers = {
        "Content-Type": "application/json",
        "Accept": "text/event-stream" if stream else "application/json",
    }
    if provider.api_key is not None:
        headers["Authorization"] = "Bearer " + provider.api_key.reveal()
    headers.update(provider.headers)
    return HttpRequest(provider.base_url + "/chat/completions", headers, _encode(payload))


def inband_error(error: _Error | str) -> LeanError:
    if isinstance(error, str):
        return UpstreamError(f"upstream error: {error}")
    kind = f"{error.type or ''} {error.code or ''}".lower()
    message = f"upstream error: {error.message or kind.strip() or 'unknown'}"
    if "rate" in kind or kind.strip() == "429":
        return RateLimited(message)
    if "overloaded" in kind or "529" in kind:
        return Overloaded(message)
    return UpstreamError(message, retryable="server" in kind or "timeout" in kind)


class StreamTranslator:
    def __init__(self) -> None:
        self.finished = False
        self._done = False

    def feed(self, message: SSEMessage) -> list[Piece]:
        data = message.data
        if data == "[DONE]":
            self._done = True
            return [] if self.finished else self._finish("stop")
        if not data:
            return []
        unknown = False  # a choice or delta has fields lean does not know: sent verbatim
        try:
            chunk = _decode_chunk(data)
        except msgspec.ValidationError:
            try:
                chunk = _decode_any_chunk(data)
            except (msgspec.DecodeError, ValueError) as exc:
                raise UpstreamError(f"unparseable upstream chunk: {exc}", retryable=True) from None
            unknown = True
        except (msgspec.DecodeError, ValueError) as exc:
            raise UpstreamError(f"unparseable upstream chunk: {exc}", retryable=True) from None
        if chunk.error is not None:
            raise inband_error(chunk.error)
        pieces: list[Piece] = []
        for choice in chunk.choices or ():
            if choice.index != 0:
                continue
            delta = choice.delta
            start = len(pieces)
            if delta is not None:
                reasoning = delta.reasoning_content or delta.reasoning
                if reasoning:
                    pieces.append(Reasoning(reasoning))
                if delta.content:
                    pieces.append(Text(delta.content))
                if delta.refusal:
                    pieces.append(Refusal(delta.refusal))
                for call in delta.tool_calls or ():
                    function = call.function or _Function()
                    pieces.append(
                        ToolCall(call.index, function.arguments or "", call.id, function.name)
                    )
            if choice.finish_reason and not self.finished:
                pieces.extend(self._finish(choice.finish_reason))
            if (
                unknown
                or _given(choice.logprobs)
                or (delta is not None and _given(delta.annotations))
            ):
                carried = tuple(pieces[start:])
                del pieces[start:]
                pieces.append(Verbatim(bytes(_decode_raw_choices(data).choices), carried))
        if chunk.usage is not None:
            pieces.append(_usage(chunk.usage))
        return pieces

    def _finish(self, reason: str) -> list[Piece]:
        self.finished = True
        return [Finish(reason)]

    def close(self) -> None:
        if not (self._done or self.finished):
            raise UpstreamError(
                "upstream stream ended before its end marker (truncated)", retryable=True
            )


def parse_completion(body: bytes | bytearray) -> list[Piece]:
    """A non-streaming answer, as the pieces a stream would have carried."""
    completion = decode_answer(_decode_completion, body)
    if completion.error is not None:
        raise inband_error(completion.error)
    if not completion.choices or completion.choices[0].message is None:
        raise UpstreamError("upstream answer has no choices", retryable=True)
    choice = completion.choices[0]
    message = choice.message or _Message()
    pieces: list[Piece] = []
    reasoning = message.reasoning_content or message.reasoning
    if reasoning:
        pieces.append(Reasoning(reasoning))
    if message.content:
        pieces.append(Text(message.content))
    if message.refusal:
        pieces.append(Refusal(message.refusal))
    for index, call in enumerate(message.tool_calls or ()):
        function = call.function or _Function()
        pieces.append(ToolCall(index, function.arguments or "", call.id, function.name or ""))
    pieces.append(Finish(choice.finish_reason or ("tool_calls" if message.tool_calls else "stop")))
    if _given(choice.logprobs) or _given(message.annotations):
        pieces.append(
            Extras(
                choice.logprobs if _given(choice.logprobs) else None,
                message.annotations if _given(message.annotations) else None,
            )
        )
    if completion.usage is not None:
        pieces.append(_usage(completion.usage))
    return pieces


def _usage(usage: _Usage) -> Usage:
    prompt, completion = usage.prompt_tokens_details, usage.completion_tokens_details
    return Usage(
        usage.prompt_tokens or 0,
        usage.completion_tokens or 0,
        None if prompt is None else prompt.cached_tokens,
        None if completion is None else completion.reasoning_tokens,
        usage.total_tokens,
    )
