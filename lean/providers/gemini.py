"""Google Gemini API (v1beta `generateContent` / `streamGenerateContent?alt=sse`).

Follows ai.google.dev/api "Generating content" (GenerateContentRequest, Content, Part,
GenerationConfig, GenerateContentResponse, FinishReason, UsageMetadata), "Function
calling" and "Thought signatures". The key goes in the `x-goog-api-key` header, never
in the URL, so it cannot reach an access log.

The OpenAI body is mapped as Gemini wants it: system text becomes `systemInstruction`,
assistant turns are role "model", tool calls are `functionCall` parts, tool results are
`functionResponse` parts of a user turn named after the call they answer (found by
`tool_call_id`); consecutive same-role turns are merged.

A stream is `data: {GenerateContentResponse}` events and has NO end marker: it is
complete only once a candidate brought a `finishReason` (or the prompt was blocked).
Bytes that end before that were truncated and raise; no finish is fabricated. Each
`functionCall` arrives whole and becomes one tool-call piece with a generated id.
`usageMetadata` is cumulative: the last one counts, and a `Usage` goes out with the
finish and again with any later usage. `thoughtSignature`s become opaque `Signature`s.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

import msgspec

from lean.config import ModelConfig, ProviderConfig
from lean.errors import LeanError, Overloaded, RateLimited, UpstreamError, UpstreamTimeout
from lean.providers.base import (
    Finish,
    HttpRequest,
    Piece,
    Reasoning,
    Signature,
    Text,
    ToolCall,
    Usage,
    decode_answer,
)
from lean.sse import SSEMessage

# Gemini 3 refuses a replayed functionCall without its thoughtSignature. OpenAI clients
# cannot send it back, so history gets the value the "Thought signatures" page documents
# for turns whose signature is not available.
REPLAY_SIGNATURE = "skip_thought_signature_validator"

FILTERED = frozenset(
    {
        "SAFETY",
        "RECITATION",
        "BLOCKLIST",
        "PROHIBITED_CONTENT",
        "SPII",
        "IMAGE_SAFETY",
        "IMAGE_PROHIBITED_CONTENT",
        "IMAGE_RECITATION",
    }
)


class _FunctionCall(msgspec.Struct):
    name: str = ""
    args: Any = None
    id: str | None = None


class _Part(msgspec.Struct, rename="camel"):
    text: str | None = None
    thought: bool = False
    thought_signature: str | None = None
    function_call: _FunctionCall | None = None


class _Content(msgspec.Struct):
    parts: list[_Part] | None = None


class _Candidate(msgspec.Struct, rename="camel"):
    content: _Content | None = None
    finish_reason: str | None = None
    index: int = 0


class _UsageMetadata(msgspec.Struct, rename="camel"):
    prompt_token_count: int = 0
    candidates_token_count: int = 0
    thoughts_token_count: int = 0


class _PromptFeedback(msgspec.Struct, rename="camel"):
    block_reason: str | None = None


class _Error(msgspec.Struct):
    code: int | None = None
    message: str = ""
    status: str = ""


class _Response(msgspec.Struct, rename="camel"):
    candidates: list[_Candidate] | None = None
    usage_metadata: _UsageMetadata | None = None
    prompt_feedback: _PromptFeedback | None = None
    error: _Error | None = None


_decode = msgspec.json.Decoder(_Response).decode
_encode = msgspec.json.Encoder().encode


# --- request -----------------------------------------------------------------------------


def build_request(
    provider: ProviderConfig, model: ModelConfig, body: dict[str, Any], *, stream: bool
) -> HttpRequest:
    system, contents = _contents(body.get("messages") or [])
    payload: dict[str, Any] = {"contents": contents}
    if system:
        payload["systemInstruction"] = {"parts": [{"text": system}]}
    tools = [t for t in body.get("tools") or () if t.get("type", "function") == "function"]
    if tools:
        payload["tools"] = [{"functionDeclarations": [_declaration(t) for t in tools]}]
        config = _tool_config(body.get("tool_choice"))
        if config is not None:
            payload["toolConfig"] = {"functionCallingConfig": config}
    generation: dict[str, Any] = {}
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or model.max_tokens
    if max_tokens:
        generation["maxOutputTokens"] = max_tokens
    temperature = body.get("temperature", model.temperature)
    if temperature is not None:
        generation["temperature"] = temperature
    if body.get("top_p") is not None:
        generation["topP"] = body["top_p"]
    stop = body.get("stop")
    if stop:
        generation["stopSequences"] = [stop] if isinstance(stop, str) else list(stop)
    if generation:
        payload["generationConfig"] = generation
    name = model.upstream_model.removeprefix("models/")
    method = ":streamGenerateContent?alt=sse" if stream else ":generateContent"
    headers = {
        "Content-Type": "application/json",
        "Accept": "text/event-stream" if stream else "application/json",
    }
    if provider.api_key is not None:
        headers["x-goog-api-key"] = provider.api_key.reveal()
    headers.update(provider.headers)
    return HttpRequest(f"{provider.base_url}/models/{name}{method}", headers, _encode(payload))


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content if p.get("type") == "text")
    return ""


def _parts(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"text": content}] if content else []
    parts: list[dict[str, Any]] = []
    for part in content if isinstance(content, list) else ():
        if part.get("type") == "text" and part.get("text"):
            parts.append({"text": part["text"]})
        elif part.get("type") == "image_url":
            url = (part.get("image_url") or {}).get("url", "")
            if url.startswith("data:") and ";base64," in url:
                mime, _, data = url[5:].partition(";base64,")
                parts.append({"inlineData": {"mimeType": mime, "data": data}})
            else:
                parts.append({"fileData": {"fileUri": url}})
    return parts


def _json(text: Any) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def _contents(messages: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    system: list[str] = []
    out: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool_call_id -> function name, from earlier assistant turns
    for message in messages:
        role = message.get("role")
        content = message.get("content")
        if role in ("system", "developer"):
            if text := _text_of(content):
                system.append(text)
            continue
        if role == "assistant":
            role = "model"
            parts = _parts(content)
            for n, call in enumerate(message.get("tool_calls") or ()):
                function = call.get("function") or {}
                name = function.get("name") or ""
                names[call.get("id") or ""] = name
                args = _json(function.get("arguments") or "{}")
                part: dict[str, Any] = {
                    "functionCall": {
                        "name": name,
                        "args": args if isinstance(args, dict) else {"arguments": args},
                    }
                }
                if n == 0:
                    part["thoughtSignature"] = REPLAY_SIGNATURE
                parts.append(part)
        elif role == "tool":
            role = "user"
            call_id = message.get("tool_call_id") or ""
            name = names.get(call_id) or message.get("name") or call_id
            result = _json(_text_of(content))
            parts = [{"functionResponse": {"name": name, "response": {"result": result}}}]
        else:
            role = "user"
            parts = _parts(content)
        if not parts:
            continue
        if out and out[-1]["role"] == role:
            out[-1]["parts"].extend(parts)
        else:
            out.append({"role": role, "parts": parts})
    return "\n\n".join(system), out


def _declaration(tool: dict[str, Any]) -> dict[str, Any]:
    function = tool.get("function") or {}
    out: dict[str, Any] = {"name": function.get("name", "")}
    if function.get("description"):
        out["description"] = function["description"]
    parameters = function.get("parameters")
    # Gemini rejects an OBJECT schema with no properties; a tool without arguments omits it.
    if parameters and parameters.get("properties"):
        out["parameters"] = parameters
    return out


def _tool_config(choice: Any) -> dict[str, Any] | None:
    if choice in ("auto", "required", "none"):
        return {"mode": {"auto": "AUTO", "required": "ANY", "none": "NONE"}[choice]}
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name", "")
        return {"mode": "ANY", "allowedFunctionNames": [name]}
    return None


# --- answers -----------------------------------------------------------------------------


def _error(error: _Error) -> LeanError:
    message = f"upstream error: {error.message or error.status or error.code or 'unknown'}"
    if error.status == "RESOURCE_EXHAUSTED" or error.code == 429:
        return RateLimited(message)
    if error.status == "UNAVAILABLE" or error.code == 503:
        return Overloaded(message)
    if error.status == "DEADLINE_EXCEEDED" or error.code == 504:
        return UpstreamTimeout(message)
    return UpstreamError(message, retryable=error.status == "INTERNAL" or error.code == 500)


def _finish(reason: str, calls: int) -> str:
    if reason == "MAX_TOKENS":
        return "length"
    if reason in FILTERED:
        return "content_filter"
    return "tool_calls" if calls else "stop"


def _usage(meta: _UsageMetadata) -> Usage:
    return Usage(meta.prompt_token_count, meta.candidates_token_count + meta.thoughts_token_count)


class StreamTranslator:
    def __init__(self, *, nonce: str | None = None) -> None:
        self.finished = False
        self.calls = 0  # functionCall parts seen
        self._nonce = nonce if nonce is not None else secrets.token_hex(4)
        self._usage: _UsageMetadata | None = None

    def feed(self, message: SSEMessage) -> list[Piece]:
        if not message.data:
            return []
        try:
            response = _decode(message.data)
        except (msgspec.DecodeError, ValueError) as exc:
            raise UpstreamError(f"unparseable upstream chunk: {exc}", retryable=True) from None
        return self.translate(response)

    def translate(self, response: _Response) -> list[Piece]:
        if response.error is not None:
            raise _error(response.error)
        pieces: list[Piece] = []
        finish: str | None = None
        candidate = next((c for c in response.candidates or () if c.index == 0), None)
        if candidate is not None:
            parts = candidate.content.parts if candidate.content is not None else None
            for part in parts or ():
                self._part(part, pieces)
            if candidate.finish_reason:
                finish = _finish(candidate.finish_reason, self.calls)
        elif response.prompt_feedback and response.prompt_feedback.block_reason:
            finish = "content_filter"  # the prompt itself was blocked: no candidates at all
        was_finished = self.finished
        if finish is not None and not self.finished:
            self.finished = True
            pieces.append(Finish(finish))
        if response.usage_metadata is not None:
            self._usage = response.usage_metadata
        # Usage goes out with the finish, and again if a later chunk updates it.
        fresh = not was_finished or response.usage_metadata is not None
        if self._usage is not None and self.finished and fresh:
            pieces.append(_usage(self._usage))
        return pieces

    def _part(self, part: _Part, pieces: list[Piece]) -> None:
        if part.function_call is not None:
            call = part.function_call
            index = self.calls
            self.calls += 1
            args = _encode(call.args if call.args is not None else {}).decode()
            call_id = call.id or f"call_{index}_{self._nonce}"
            pieces.append(ToolCall(index, args, call_id, call.name))
        elif part.text:
            pieces.append(Reasoning(part.text) if part.thought else Text(part.text))
        if part.thought_signature:
            pieces.append(Signature(part.thought_signature, "gemini"))

    def close(self) -> None:
        if not self.finished:
            raise UpstreamError(
                "upstream stream ended before a finishReason (truncated)", retryable=True
            )


def parse_completion(body: bytes | bytearray, *, nonce: str | None = None) -> list[Piece]:
    """A non-streaming GenerateContentResponse, as the pieces a stream would have carried."""
    response = decode_answer(_decode, body)
    translator = StreamTranslator(nonce=nonce)
    pieces = translator.translate(response)
    if not translator.finished:
        if not response.candidates:
            raise UpstreamError("upstream answer has no candidates", retryable=True)
        # A whole answer is complete by definition; a missing reason is a natural stop.
        pieces.append(Finish("tool_calls" if translator.calls else "stop"))
        if response.usage_metadata is not None:
            pieces.append(_usage(response.usage_metadata))
    return pieces
