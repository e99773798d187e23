"""Anthropic Messages API (`anthropic-version: 2023-06-01`): request builder and translators.

Follows docs.anthropic.com "Messages" (request shape, tool use, extended thinking) and
"Streaming Messages" (event flow). The OpenAI body is mapped as Anthropic requires:
system/developer text goes top level, `max_tokens` is always sent, roles strictly
alternate (consecutive same-role messages are merged, tool results become `tool_result`
blocks of a user turn), tool calls become `tool_use` blocks.

Answers (streamed or whole) are read in `lean.providers.anthropic_answer`; this module
builds requests and re-exports its translators, so it is the whole adapter.

A body that came in as an Anthropic request (`/v1/messages`) carries that request as a
`Native` under `NATIVE`: it is sent as the client wrote it, so nothing is lost in a round
trip through the OpenAI shape (see `Native`).
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

from lean.config import ModelConfig, ProviderConfig
from lean.providers.anthropic_answer import (
    StreamTranslator,
    parse_completion,
    parse_count,
)
from lean.providers.base import (
    NATIVE,
    HttpRequest,
)

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "VERSION",
    "Native",
    "StreamTranslator",
    "build_count_request",
    "build_request",
    "parse_completion",
    "parse_count",
]

VERSION = "2023-06-01"
# Anthropic requires max_tokens; this is used when neither the client nor the model sets it.
DEFAULT_MAX_TOKENS = 4096

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
