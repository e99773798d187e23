"""The schemas of lean's OpenAPI description, made from the Structs lean decodes and encodes
(the scene events, a scene's body, a tool result, a saved message) and from its error tree,
so the shapes cannot drift from the code. `lean.openapi` writes the routes around them.
"""

from __future__ import annotations

from typing import Any

import msgspec

from lean.dialects.anthropic import ERROR_TYPES as ANTHROPIC_TYPES
from lean.errors import LeanError
from lean.events import Event
from lean.messages import MessageRecord
from lean.scene_handlers import ToolResult
from lean.scenes import SceneRequest
from lean.ui_stream import UIChat, UIMessage

__all__ = ["JSON", "NDJSON", "POST_AUTH", "SSE", "error_codes", "error_refs", "ref", "schemas"]

REF = "#/components/schemas/{name}"
JSON = "application/json"
SSE = "text/event-stream"
NDJSON = "application/x-ndjson"
POST_AUTH: list[dict[str, list[str]]] = [{"bearer": []}]


def ref(name: str) -> dict[str, str]:
    return {"$ref": REF.format(name=name)}


def error_refs(*statuses: str) -> dict[str, Any]:
    """lean's error responses (components E401...; `lean.openapi` writes them) for a route."""
    return {s: {"$ref": f"#/components/responses/E{s}"} for s in ("401", "403", *statuses)}


def error_codes() -> list[str]:
    """Every wire error code: one per LeanError class (docs/protocol.md §5)."""
    codes: list[str] = []
    todo: list[type[LeanError]] = [LeanError]
    while todo:
        cls = todo.pop(0)
        if cls.code not in codes:
            codes.append(cls.code)
        todo.extend(cls.__subclasses__())
    return codes


def _ecma(schema: Any) -> Any:
    """Python's `\\A`/`\\Z` anchors (msgspec copies patterns as written) as JSON Schema's
    ECMA-262 `^`/`$`; and every property of an encoded Struct as required (lean's encoders
    write defaults too)."""
    if isinstance(schema, dict):
        out = {key: _ecma(value) for key, value in schema.items()}
        pattern = out.get("pattern")
        if isinstance(pattern, str):
            out["pattern"] = pattern.replace("\\A", "^").replace("\\Z", "$")
        return out
    if isinstance(schema, list):
        return [_ecma(value) for value in schema]
    return schema


def schemas() -> dict[str, Any]:
    (event, *_), components = msgspec.json.schema_components(
        (Event, SceneRequest, ToolResult, MessageRecord, UIChat, UIMessage), ref_template=REF
    )
    schemas: dict[str, Any] = _ecma(components)
    # Sent, never received: every field is always there (no omitted defaults).
    for name in ("Start", "Delta", "ToolStart", "ToolEnd", "Waiting", "Done", "Error", "Usage"):
        schemas[name]["required"] = list(schemas[name]["properties"])
    schemas["Error"]["required"].remove("retryAfter")  # only where lean knows it
    schemas["MessageRecord"]["required"] = list(schemas["MessageRecord"]["properties"])
    schemas["MessageRecord"]["description"] = (
        "A saved message. user: `content` is what the user typed (a scene without"
        " `{message}`: its inputs as `name: value` lines), `prompt` the filled template the"
        " model saw; assistant: `content` the answer, `prompt` null."
    )
    schemas["UIChat"]["properties"]["messages"]["items"] = ref("UIMessage")
    schemas["UIChat"]["description"] = (
        "`useChat`'s body (AI SDK 5+): `id` is the conversation, the last message must be"
        " the user's and its text parts are the run's message; other fields are ignored."
    )
    schemas["SceneEvent"] = {
        "description": "A scene event (docs/protocol.md §2); on the WebSocket with `runId`.",
        "oneOf": event["anyOf"],
        "discriminator": event["discriminator"],
    }
    schemas["ErrorBody"] = {
        "type": "object",
        "properties": {
            "error": {
                "type": "object",
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "code": {"enum": error_codes()},
                },
                "required": ["message", "type", "code"],
            }
        },
        "required": ["error"],
    }
    schemas["AnthropicErrorBody"] = {
        "type": "object",
        "description": "Anthropic's error body, on /v1/messages (docs/protocol.md §1)",
        "properties": {
            "type": {"const": "error"},
            "error": {
                "type": "object",
                "properties": {
                    "type": {"enum": sorted(set(ANTHROPIC_TYPES.values()))},
                    "message": {"type": "string"},
                },
                "required": ["type", "message"],
            },
        },
        "required": ["type", "error"],
    }
    schemas["ChatCompletionRequest"] = {
        "type": "object",
        "description": "OpenAI Chat Completions; unknown fields pass through to an"
        " OpenAI-compatible upstream.",
        "properties": {
            "model": {"type": "string", "description": "a model alias of the config"},
            "messages": {"type": "array", "items": {"type": "object"}, "minItems": 1},
            "stream": {"type": "boolean", "default": False},
            "stream_options": {
                "type": "object",
                "properties": {"include_usage": {"type": "boolean"}},
            },
            "tools": {"type": "array", "items": {"type": "object"}},
            "tool_choice": {},
            "max_tokens": {"type": "integer"},
            "max_completion_tokens": {"type": "integer"},
            "temperature": {"type": "number"},
            "n": {"type": "integer", "const": 1, "description": "more than 1 is a 400"},
        },
        "required": ["model", "messages"],
        "additionalProperties": True,
    }
    schemas["Messages"] = {
        "type": "object",
        "properties": {
            "conversationId": {"type": "string"},
            "messages": {"type": "array", "items": ref("MessageRecord")},
        },
        "required": ["conversationId", "messages"],
    }
    schemas["Scenes"] = {
        "type": "object",
        "properties": {
            "scenes": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "model": {"type": "string"},
                        "inputs": {"type": "array", "items": {"type": "string"}},
                        "tools": {"type": "array", "items": {"type": "string"}},
                        "needsMessage": {"type": "boolean"},
                    },
                    "required": ["name", "model", "inputs", "tools", "needsMessage"],
                },
            }
        },
        "required": ["scenes"],
    }
    schemas["Status"] = {
        "type": "object",
        "properties": {"status": {"type": "string"}, "error": {"type": "string"}},
        "required": ["status"],
    }
    return schemas


# The error answers a route can give (docs/protocol.md §5), by status.
