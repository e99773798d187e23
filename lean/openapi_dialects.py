"""The OpenAPI paths of the routes that speak another API's dialect (docs/protocol.md §1):
Anthropic's Messages and its token count, OpenAI's Responses. `lean.openapi` puts them
among lean's own routes; their bodies are the other API's, so they are described loosely
(an object; the dialect's module checks the fields and names the bad one).
"""

from __future__ import annotations

from typing import Any

from lean.openapi_schemas import JSON, POST_AUTH, SSE, error_refs, ref

__all__ = ["dialect_paths"]

_COUNT = {
    "type": "object",
    "properties": {"input_tokens": {"type": "integer", "minimum": 1}},
    "required": ["input_tokens"],
}
_ANTHROPIC_AUTH: list[dict[str, list[str]]] = [{"bearer": []}, {"apiKey": []}]
_OBJECT = {"type": "object"}
_ANTHROPIC_ERROR = {
    "description": "an error in Anthropic's shape (529: overloaded; Retry-After on 429)",
    "content": {JSON: {"schema": ref("AnthropicErrorBody")}},
}


def _anthropic_errors(*statuses: str) -> dict[str, Any]:
    return {s: _ANTHROPIC_ERROR for s in ("401", "403", *statuses)}


# The Responses request's main fields; the rest is lean.dialects.responses's to check.
_RESPONSES_REQUEST: dict[str, Any] = {
    "type": "object",
    "required": ["model", "input"],
    "properties": {
        "model": {"type": "string", "description": "a model alias of the config"},
        "input": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]},
        "instructions": {"type": "string"},
        "tools": {"type": "array", "items": {"type": "object"}},
        "stream": {"type": "boolean"},
        "store": {"type": "boolean", "description": "false: lean saves nothing"},
        "previous_response_id": {"type": "string"},
        "max_output_tokens": {"type": "integer", "minimum": 1},
    },
}
# Beside lean's 404s: a `previous_response_id` lean did not save for this client.
_PREVIOUS_NOT_FOUND = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"const": "invalid_request_error"},
                "param": {"const": "previous_response_id"},
                "code": {"const": "previous_response_not_found"},
            },
            "required": ["message", "type", "param", "code"],
        }
    },
    "required": ["error"],
}
_RESPONSES_404 = {
    "description": "an unknown model alias, or one the client may not use (not_found); or a"
    " `previous_response_id` lean did not save for this client (previous_response_not_found;"
    " docs/protocol.md §1, §8)",
    "content": {JSON: {"schema": {"oneOf": [ref("ErrorBody"), _PREVIOUS_NOT_FOUND]}}},
}


def dialect_paths() -> dict[str, Any]:
    return {
        "/v1/messages": {
            "post": {
                "summary": "Anthropic Messages, streamed or whole (docs/protocol.md §1)",
                "security": _ANTHROPIC_AUTH,
                "requestBody": {"required": True, "content": {JSON: {"schema": _OBJECT}}},
                "responses": {
                    "200": {
                        "description": "a `message`, or with `stream` its events: message_start,"
                        " content blocks, message_delta, message_stop (an error after the"
                        " first byte: one `event: error`, no message_stop)",
                        "content": {JSON: {"schema": _OBJECT}, SSE: {"schema": {"type": "string"}}},
                    },
                    **_anthropic_errors("400", "404", "413", "429", "500", "502", "504", "529"),
                },
            }
        },
        "/v1/messages/count_tokens": {
            "post": {
                "summary": "a Messages request's input tokens: an Anthropic upstream's count,"
                " else lean's estimate",
                "security": _ANTHROPIC_AUTH,
                "requestBody": {"required": True, "content": {JSON: {"schema": _OBJECT}}},
                "responses": {
                    "200": {
                        "description": "the count",
                        "content": {JSON: {"schema": _COUNT}},
                    },
                    **_anthropic_errors("400", "404", "413"),
                },
            }
        },
        "/v1/responses": {
            "post": {
                "summary": "OpenAI Responses, streamed or whole (docs/protocol.md §1)",
                "security": POST_AUTH,
                "requestBody": {
                    "required": True,
                    "content": {JSON: {"schema": _RESPONSES_REQUEST}},
                },
                "responses": {
                    "200": {
                        "description": "a `response` object, or with `stream` its events"
                        " (`event:` + `data:`), the last one `response.completed`,"
                        " `response.incomplete` or `response.failed`",
                        "content": {
                            JSON: {"schema": {"type": "object"}},
                            SSE: {"schema": {"type": "string"}},
                        },
                    },
                    **error_refs("400", "413", "415", "503"),
                    "404": _RESPONSES_404,
                    "429": {"$ref": "#/components/responses/Upstream"},
                    "502": {"$ref": "#/components/responses/Upstream"},
                    "504": {"$ref": "#/components/responses/Upstream"},
                },
            }
        },
    }
