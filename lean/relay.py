"""One answer from one model alias, streamed, with fallback before the commit point.

The commit point is the first visible piece (text, reasoning or a tool call)
handed to the caller. Before it, a failed streaming attempt (connect error,
HTTP error, unparseable or truncated stream, silence) is retried once on the
provider's non-streaming path, so the client still gets the whole answer. After
it, a failure is raised to the caller, who ends the stream with a typed error:
an answer is never finished on a provider's behalf.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from lean.config import ModelConfig
from lean.errors import LeanError
from lean.guard import Guard
from lean.providers.base import VISIBLE, Piece
from lean.upstream import Upstream

log = logging.getLogger("lean.relay")


class Relay:
    def __init__(
        self, upstream: Upstream, model: ModelConfig, body: dict[str, Any], guard: Guard
    ) -> None:
        self._upstream = upstream
        self._model = model
        self._body = body
        self._guard = guard
        self.committed = False
        self.fallback = False  # the answer came from the non-streaming path

    async def pieces(self) -> AsyncGenerator[Piece, None]:
        if self._upstream.provider(self._model).stream:
            try:
                async with aclosing(
                    self._upstream.stream(self._model, self._body, self._guard)
                ) as stream:
                    async for piece in stream:
                        if not self.committed and isinstance(piece, VISIBLE):
                            self.committed = True
                        yield piece
                return
            except LeanError as exc:
                if self.committed:
                    raise
                log.warning(
                    "stream failed before any content, using the non-streaming path "
                    "model=%s code=%s error=%s",
                    self._model.alias,
                    exc.code,
                    exc.message,
                )
        self.fallback = True
        for piece in await self._upstream.complete(self._model, self._body, self._guard):
            if isinstance(piece, VISIBLE):
                self.committed = True
            yield piece
