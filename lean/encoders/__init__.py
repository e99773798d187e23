"""Per-dialect encoders: a run's pieces to one client dialect's bytes, without I/O.

The driver (`lean.driver`) owns a request's I/O: the upstream (through `Relay`), the guard,
the client writes and when the response commits, the log line and metrics. What the client
sees is its dialect's: an `Encoder` made per request turns pieces into frames, and failures
into the dialect's error body (before the commit, as an HTTP status) or error frame (after).
A new dialect is one encoder and one route (docs/protocol.md §1, §5).
"""

from __future__ import annotations

from typing import Protocol

from aiohttp import web

from lean.errors import LeanError
from lean.providers.base import Piece, Usage

__all__ = ["Encoder"]


class Encoder(Protocol):
    """One request's pieces in one dialect. Streams: `begin` once when the response
    starts (the commit), `frame` per piece, then `end` for an answer that completed or
    `error_frame` for one cut after the commit; `ping` keeps proxies open while lean
    waits. Whole answers: `whole`. Failures before the commit: `error_response`."""

    endpoint: str  # the log line's and metrics' name of the route, e.g. "chat.completions"
    ping: bytes
    # The upstream's usage once a stream's pieces carried it: its client's tokens (lean.clients).
    usage: Usage | None

    def begin(self) -> bytes: ...

    def frame(self, piece: Piece) -> bytes | None: ...

    def end(self) -> bytes: ...

    def error_frame(self, error: LeanError) -> bytes: ...

    def error_response(self, error: LeanError) -> web.Response: ...

    def whole(self, pieces: list[Piece]) -> web.Response: ...
