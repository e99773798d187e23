"""OpenAI Chat Completions out: `chat.completion.chunk` frames, whole answers, OpenAI's
error body (docs/protocol.md §1). The framing itself is `openai_compat.ChunkFramer`."""

from __future__ import annotations

from aiohttp import web

from lean.errors import LeanError, openai_error_body
from lean.openai_compat import ChunkFramer, completion_body, error_frame, new_id
from lean.providers.base import Piece

__all__ = ["ChatEncoder", "error_response"]


def error_response(error: LeanError) -> web.Response:
    """`error` as an HTTP status with OpenAI's body (and its `Retry-After`, if any)."""
    return web.Response(
        status=error.status,
        body=openai_error_body(error),
        content_type="application/json",
        headers=error.headers(),
    )


class ChatEncoder(ChunkFramer):
    endpoint = "chat.completions"
    ping = b": ping\n\n"

    def __init__(self, *, model: str, include_usage: bool = False) -> None:
        self._id = new_id()
        self._model = model
        super().__init__(completion_id=self._id, model=model, include_usage=include_usage)

    def begin(self) -> bytes:
        return b""

    def error_frame(self, error: LeanError) -> bytes:
        """After the first byte an error travels in band: one `data: {"error": ...}`."""
        return error_frame(openai_error_body(error))

    def error_response(self, error: LeanError) -> web.Response:
        return error_response(error)

    def whole(self, pieces: list[Piece]) -> web.Response:
        return web.Response(
            body=completion_body(pieces, completion_id=self._id, model=self._model),
            content_type="application/json",
        )
