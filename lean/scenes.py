"""Scenes: a model alias, a system prompt and a template bound under one name.

A scene request is `{"inputs": {...}, "message": "...", "conversationId": "..."}`
(POST body) or the same as query parameters (`inputs.NAME=`, `message=`,
`conversationId=`) for a browser `EventSource`. Everything the template needs is
checked here, before any provider is called; a missing input is a 400 naming it.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from typing import Any

import msgspec

from lean.config import Config, SceneConfig
from lean.errors import BadRequest, NotFound, clip
from lean.inbound import decode

Scalar = str | int | float | bool

# Conversation ids go into message ids (`{scene}:{conversationId}:{turn}`): no colons.
_CONVERSATION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class SceneRequest(msgspec.Struct, rename="camel", forbid_unknown_fields=True):
    inputs: dict[str, Scalar] = {}
    message: str = ""
    conversation_id: str | None = None


_decode = msgspec.json.Decoder(SceneRequest)


def find_scene(config: Config, name: str) -> SceneConfig:
    scene = config.scenes.get(name)
    if scene is None:
        raise NotFound(f"scene '{clip(name)}' does not exist")
    return scene


def parse_body(body: bytes) -> SceneRequest:
    if not body.strip():
        return SceneRequest()
    return validated(decode(_decode, body))


def parse_query(query: Mapping[str, str]) -> SceneRequest:
    inputs: dict[str, Scalar] = {}
    for key, value in query.items():
        if key.startswith("inputs."):
            inputs[key[len("inputs.") :]] = value
        elif key not in ("message", "conversationId", "access_token"):
            raise BadRequest(
                f"invalid request: unknown query parameter '{clip(key)}' "
                "(expected inputs.NAME, message, conversationId)"
            )
    return validated(
        SceneRequest(
            inputs=inputs,
            message=query.get("message", ""),
            conversation_id=query.get("conversationId") or None,
        )
    )


def is_conversation_id(value: str) -> bool:
    return _CONVERSATION_ID.fullmatch(value) is not None


def validated(request: SceneRequest) -> SceneRequest:
    """The request, once its conversation id is known to be usable."""
    cid = request.conversation_id
    if cid is not None and not is_conversation_id(cid):
        raise BadRequest(
            "invalid request: conversationId must be 1-64 characters of A-Z, a-z, 0-9, _ or -"
        )
    return request


def new_conversation_id() -> str:
    return "c" + uuid.uuid4().hex[:20]


def render(scene: SceneConfig, request: SceneRequest) -> str:
    """The user message the template makes of the request; 400 naming what is missing."""
    for name in scene.inputs:
        if name not in request.inputs:
            raise BadRequest(
                f"scene '{scene.name}' needs input '{name}' (send it as inputs.{name})"
            )
    if scene.uses_message and not request.message:
        raise BadRequest(f"scene '{scene.name}' needs a message")
    values: dict[str, Any] = {name: _text(request.inputs[name]) for name in scene.inputs}
    values["message"] = request.message
    return scene.template.format_map(values)


def typed(scene: SceneConfig, request: SceneRequest) -> str:
    """What the user typed, saved as the user message's `content` (the filled template is
    saved beside it as `prompt`): the message; for a scene whose template takes no
    `{message}`, its inputs as `name: value` lines; for a fixed template, the template."""
    if scene.uses_message:
        return request.message
    if scene.inputs:
        return "\n".join(f"{name}: {_text(request.inputs[name])}" for name in scene.inputs)
    return scene.template


def _text(value: Scalar) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def chat_body(
    scene: SceneConfig, history: list[tuple[str, str]], user_content: str
) -> dict[str, Any]:
    """The OpenAI Chat Completions body a scene run sends through its model alias."""
    messages: list[dict[str, Any]] = []
    if scene.system:
        messages.append({"role": "system", "content": scene.system})
    messages.extend({"role": role, "content": content} for role, content in history)
    messages.append({"role": "user", "content": user_content})
    return {"model": scene.model, "messages": messages}
