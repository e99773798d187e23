"""An OpenAPI 3.1 description of lean's own routes (docs/protocol.md §1-§6), served at
`GET /openapi.json`.

Built once, when the app is made. Its schemas come from the Structs lean decodes and
encodes and from the error tree (`lean.openapi_schemas`), so the shapes cannot drift from
the code; the routes and their prose are written here (those of the other APIs' dialects
in `lean.openapi_dialects`), and tests/test_openapi.py checks that they are exactly the
routes `lean.app` registers.

The document is the same for every lean: it names no model, scene, token or address of
this one (`GET /v1/models` and `GET /v1/scenes` say those), so it is served without a
token, like `/lean.js`. Streams are described by their content types; the events of a
scene stream are one schema (`SceneEvent`, a `oneOf` with `type` as discriminator) that
each SSE `data:` line, NDJSON line and WebSocket frame carries.
"""

from __future__ import annotations

from typing import Any

import msgspec

from lean import __version__
from lean.openapi_dialects import dialect_paths
from lean.openapi_resume import resume_path
from lean.openapi_schemas import JSON, NDJSON, POST_AUTH, SSE, error_refs, ref, schemas

__all__ = ["document", "encoded"]


_ERRORS = {
    "400": "a bad body, field, input or query parameter",
    "401": "missing or wrong client token (only when lean has tokens)",
    "403": "a foreign Origin or Host (docs/protocol.md §6)",
    "404": "unknown model, scene, run or conversation; or one the client may not use or does"
    " not own (docs/protocol.md §8)",
    "409": "an answer of the chat is running and lean keeps no events to replay it"
    " (still_running: [limits] resume_buffer_kb = 0)",
    "413": "body larger than [server] max_body_bytes",
    "415": "a body that is not JSON",
    "429": "a client's limit (docs/protocol.md §8): rate_limited, or quota_exceeded; Retry-After",
    "503": "overloaded, shutting down or store unavailable (Retry-After)",
}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _path(name: str, description: str, pattern: str | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string", "minLength": 1}
    if pattern:
        schema["pattern"] = pattern
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": schema,
    }


_SCENE = _path("scene", "a scene name of the config ([scene.NAME])")
_RUN = _path("runId", "the run's id, from its `start` event", "^[!-~]{1,128}$")
_CONVERSATION = _path("conversationId", "a conversation id", "^[A-Za-z0-9_-]{1,64}$")
_PUBLIC: list[dict[str, list[str]]] = []  # no token, no Origin check (docs/protocol.md §6)
_GET_AUTH: list[dict[str, list[str]]] = [{"bearer": []}, {"accessToken": []}]


def _file(summary: str, content_type: str) -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "security": _PUBLIC,
            "responses": {
                "200": {
                    "description": "the file (gzip with Accept-Encoding: gzip; a strong ETag)",
                    "content": {content_type: {"schema": {"type": "string"}}},
                },
                "304": {"description": "not modified (If-None-Match)"},
            },
        }
    }


def _paths() -> dict[str, Any]:
    sse_lines = {
        "schema": {
            "type": "string",
            "description": "`event: <type>`, `id: <n>`, `data: <SceneEvent>`; `: ping`",
        }
    }
    scene_stream: dict[str, Any] = {
        "description": "scene events (docs/protocol.md §2) until one `done` or `error`",
        "content": {
            SSE: sse_lines,
            NDJSON: {
                "schema": {
                    **ref("SceneEvent"),
                    "description": "one SceneEvent per line with `seq` (its cursor) added;"
                    ' `{"type":"ping"}` heartbeats',
                }
            },
        },
    }
    inputs_query = {
        "name": "inputs",
        "in": "query",
        "style": "deepObject",
        "description": "the scene's inputs, each as `inputs.NAME=VALUE`",
        "schema": {"type": "object", "additionalProperties": {"type": "string"}},
    }
    return {
        "/v1/chat/completions": {
            "post": {
                "summary": "OpenAI Chat Completions, streamed or whole",
                "security": POST_AUTH,
                "requestBody": {
                    "required": True,
                    "content": {JSON: {"schema": ref("ChatCompletionRequest")}},
                },
                "responses": {
                    "200": {
                        "description": "a chat.completion, or with `stream` its chunks as"
                        " `data:` lines ending `data: [DONE]` (an error after the first byte:"
                        ' one `data: {"error": {...}}` line, no [DONE])',
                        "content": {
                            JSON: {"schema": {"type": "object"}},
                            SSE: {"schema": {"type": "string"}},
                        },
                    },
                    **error_refs("400", "404", "413", "415", "503"),
                    "429": {"$ref": "#/components/responses/Upstream"},
                    "502": {"$ref": "#/components/responses/Upstream"},
                    "504": {"$ref": "#/components/responses/Upstream"},
                },
            }
        },
        "/v1/models": {
            "get": {
                "summary": "the config's model aliases, in OpenAI's list shape (Anthropic's"
                " when the request carries `anthropic-version`)",
                "security": _GET_AUTH,
                "responses": {
                    "200": _json({"type": "object"}, "an OpenAI model list"),
                    **error_refs(),
                },
            }
        },
        **dialect_paths(),  # /v1/messages*, /v1/responses
        "/v1/scenes": {
            "get": {
                "summary": "the scenes: their model, inputs and tools",
                "security": _GET_AUTH,
                "responses": {"200": _json(ref("Scenes"), "the scenes"), **error_refs()},
            }
        },
        "/v1/scenes/{scene}/stream": {
            "parameters": [_SCENE],
            "post": {
                "summary": "run a scene; SSE, or NDJSON with Accept: application/x-ndjson",
                "security": POST_AUTH,
                "requestBody": {"content": {JSON: {"schema": ref("SceneRequest")}}},
                "responses": {
                    "200": scene_stream,
                    **error_refs("400", "404", "413", "415", "429", "503"),
                },
            },
            "get": {
                "summary": "run a scene for an EventSource: SSE, the body as query parameters",
                "security": _GET_AUTH,
                "parameters": [
                    {"name": "message", "in": "query", "schema": {"type": "string"}},
                    {"name": "conversationId", "in": "query", "schema": {"type": "string"}},
                    inputs_query,
                ],
                "responses": {
                    "200": {
                        "description": scene_stream["description"],
                        "content": {SSE: sse_lines},
                    },
                    "204": {"description": "a reconnect (Last-Event-ID): never a second run"},
                    **error_refs("400", "404", "429", "503"),
                },
            },
        },
        "/v1/scenes/{scene}/ui": {
            "parameters": [_SCENE],
            "post": {
                "summary": "run a scene for AI SDK `useChat`: the UI message stream",
                "description": "Header `x-vercel-ai-ui-message-stream: v1`; parts `start`,"
                " `start-step`, `text-*`, `reasoning-*`, `tool-input-*`, `tool-output-*`,"
                " `finish-step`, `finish`, `message-metadata`, `error`, `abort`, then"
                " `data: [DONE]` (docs/protocol.md §6).",
                "security": POST_AUTH,
                "requestBody": {"required": True, "content": {JSON: {"schema": ref("UIChat")}}},
                "responses": {
                    "200": {
                        "description": "the run as UI message stream parts",
                        "content": {SSE: {"schema": {"type": "string"}}},
                    },
                    **error_refs("400", "404", "413", "415", "429", "503"),
                },
            },
        },
        "/v1/scenes/{scene}/ui/{chatId}/stream": {
            "parameters": [
                _SCENE,
                _path("chatId", "the chat's id (its conversation)", "^[A-Za-z0-9_-]{1,64}$"),
            ],
            "get": {
                "summary": "`useChat`'s resume: the chat's running answer, or 204",
                "security": _GET_AUTH,
                "responses": {
                    "200": {
                        "description": "the running answer's parts from its start, then live",
                        "content": {SSE: {"schema": {"type": "string"}}},
                    },
                    "204": {"description": "no answer of the chat is running"},
                    **error_refs("400", "404", "409"),
                },
            },
        },
        "/v1/runs/{runId}/cancel": {
            "parameters": [_RUN],
            "post": {
                "summary": "stop a run; its stream ends with `error` code `cancelled`",
                "security": POST_AUTH,
                "responses": {
                    "202": _json(
                        {
                            "type": "object",
                            "properties": {
                                "runId": {"type": "string"},
                                "status": {"const": "cancelling"},
                            },
                            "required": ["runId", "status"],
                        },
                        "the run is stopping",
                    ),
                    **error_refs("404", "503"),  # 503: on another instance, out of reach
                },
            },
        },
        "/v1/runs/{runId}/stream": resume_path(_RUN, _GET_AUTH, scene_stream, error_refs),
        "/v1/runs/{runId}/tool-results": {
            "parameters": [_RUN],
            "post": {
                "summary": "answer a `waiting` event",
                "security": POST_AUTH,
                "requestBody": {
                    "required": True,
                    "content": {JSON: {"schema": ref("ToolResult")}},
                },
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "runId": {"type": "string"},
                                "toolCallId": {"type": "string"},
                                "status": {"const": "accepted"},
                            },
                            "required": ["runId", "toolCallId", "status"],
                        },
                        "the answer was handed to the run",
                    ),
                    **error_refs("400", "404", "413", "415", "503"),
                },
            },
        },
        "/v1/conversations/{conversationId}/messages": {
            "parameters": [_CONVERSATION],
            "get": {
                "summary": "a conversation's saved messages, oldest first",
                "security": _GET_AUTH,
                "parameters": [
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": 10000,
                            "default": 1000,
                        },
                    }
                ],
                "responses": {
                    "200": _json(ref("Messages"), "the messages"),
                    **error_refs("400", "404", "503"),  # 503: the database is away
                },
            },
        },
        "/v1/ws": {
            "get": {
                "summary": "a WebSocket carrying many runs (docs/protocol.md §3)",
                "description": "Client frames: `run` (a SceneRequest with `type`, `runId`,"
                " `scene`), `cancel`, `tool_result`, `resume` (`runId`, `after`). Server"
                " frames: SceneEvent with `runId` and `seq`."
                " A browser sends its token as the subprotocol `lean.bearer.<token>` beside"
                " `lean`, or as `access_token`.",
                "security": _GET_AUTH,
                "responses": {
                    "101": {"description": "switching protocols"},
                    **error_refs("400", "503"),
                },
            }
        },
        "/healthz": {
            "get": {
                "summary": "200 while the process serves",
                "security": _PUBLIC,
                "responses": {"200": _json(ref("Status"), "serving")},
            }
        },
        "/readyz": {
            "get": {
                "summary": "200 when lean takes new work",
                "security": _PUBLIC,
                "responses": {
                    "200": _json(ref("Status"), "ready"),
                    "503": _json(ref("Status"), "draining, or the store cannot write"),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus text exposition",
                "security": _GET_AUTH,
                "responses": {
                    "200": {
                        "description": "metrics",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **error_refs(),
                },
            }
        },
        "/openapi.json": _file("this description", JSON),
        "/lean.js": _file("lean's JS client (an ES module)", "text/javascript"),
        "/lean.d.ts": _file("lean.js's types", "application/typescript"),
        "/": _file("the chat page (absent with [server] web_ui = false)", "text/html"),
        "/app.js": _file("the chat page's script (as /)", "text/javascript"),
        "/app.css": _file("the chat page's styles (as /)", "text/css"),
        "/favicon.svg": _file("the chat page's icon (as /)", "image/svg+xml"),
    }


def document() -> dict[str, Any]:
    error = {"content": {JSON: {"schema": ref("ErrorBody")}}}
    responses = {f"E{status}": {"description": text, **error} for status, text in _ERRORS.items()}
    responses["Upstream"] = {
        "description": "the upstream failed (429 rate_limited, 502 upstream_error,"
        " 504 upstream_timeout); Retry-After passed on. A 429 is also a client's limit"
        " (docs/protocol.md §8): rate_limited or quota_exceeded, with Retry-After",
        **error,
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "lean",
            "version": __version__,
            "description": "lean's own routes; the contract in prose is docs/protocol.md."
            " Without client tokens (loopback only) no route asks for one.",
        },
        "security": _GET_AUTH,
        "paths": _paths(),
        "components": {
            "schemas": schemas(),
            "responses": responses,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "a client token"},
                "apiKey": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "x-api-key",
                    "description": "a client token, as Anthropic's SDKs send it",
                },
                "accessToken": {
                    "type": "apiKey",
                    "in": "query",
                    "name": "access_token",
                    "description": "the token on a GET (EventSource, WebSocket), never logged",
                },
            },
        },
    }


def encoded() -> bytes:
    return msgspec.json.format(msgspec.json.encode(document()), indent=1)
