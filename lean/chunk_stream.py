"""A dialect's stream on its way to the client: frames, commit, coalescing.

`ChunkStream` frames each upstream read's pieces with the request's `Encoder` (OpenAI
chunks, Anthropic or Responses events) and writes them in one transport write. Two things
decide when bytes go out:
- the commit: the response (its `200` and headers) starts at the first piece, at the
  first heartbeat, or `[server] commit_wait` seconds in, whichever comes first, so a
  failure before it can still be an HTTP status (docs/protocol.md §1);
- the client: once a write says it is behind, what follows is held and goes out after the
  drain with its text joined (`coalesce`), so a client that is behind gets fewer, larger
  chunks, never a longer queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Protocol

from aiohttp import web

from lean.client_io import BodyWriter, ClientGone
from lean.encoders import Encoder
from lean.guard import Guard
from lean.providers.base import Piece, Reasoning, Text

__all__ = ["ChunkStream", "Tally", "coalesce"]


class Tally(Protocol):
    """What a stream counts for its log line and metrics."""

    frames: int
    first_token: float | None


def coalesce(pieces: list[Piece]) -> list[Piece]:
    """`pieces` with each run of text (or of reasoning) joined into one piece."""
    out: list[Piece] = []
    run: list[str] = []
    kind: type[Text] | type[Reasoning] | None = None
    for piece in pieces:
        if type(piece) is not kind and run:
            assert kind is not None
            out.append(kind("".join(run)))
            run = []
        if isinstance(piece, Text | Reasoning):
            kind = type(piece)
            run.append(piece.text)
        else:
            kind = None
            out.append(piece)
    if run:
        assert kind is not None
        out.append(kind("".join(run)))
    return out


class _Unstarted:
    """The body of a response whose headers have not gone out: nothing is written to it
    (`ChunkStream` holds what arrives until it starts)."""

    def behind(self) -> bool:
        return False

    def write(self, frame: bytes) -> bool:
        raise RuntimeError("a chat stream wrote before its response started")

    async def drain(self) -> None:
        raise RuntimeError("a chat stream drained before its response started")


_UNSTARTED = _Unstarted()


class ChunkStream:
    """One stream's pieces to the client as its encoder's frames.

    Once a write says the client is behind, the pieces that follow are held and go out
    after the drain with their text joined: a client that is behind gets fewer, larger
    chunks. What is held is bounded by what arrives before the drain (a read or two,
    `arrivals.Arrivals`).

    The response starts (its `200` and headers go out: the commit) at the first piece,
    at the first heartbeat, or `[server] commit_wait` seconds in, whichever comes
    first; until then the first pieces are held as for a client that is behind, and the
    drain that follows starts the response. A failure before the commit is the
    handler's to send as an HTTP status."""

    def __init__(
        self,
        request: web.Request,
        response: web.StreamResponse,
        encoder: Encoder,
        guard: Guard,
        outcome: Tally,
    ) -> None:
        self._request = request
        self._response = response
        self._body: BodyWriter | _Unstarted = _UNSTARTED
        self._frame = encoder.frame
        self._encoder = encoder
        self._guard = guard
        self._outcome = outcome
        # A list while the client is behind, or while the response has not started.
        self._held: list[Piece] | None = []
        self._lock = asyncio.Lock()  # one start, whoever asks first (the stream, a ping)
        self._timer: asyncio.TimerHandle | None = None
        self._waited: asyncio.Task[None] | None = None  # the start commit_wait made

    @property
    def started(self) -> bool:
        return self._body is not _UNSTARTED

    async def start(self) -> None:
        """Start the response (send its status and headers) unless it has."""
        async with self._lock:
            if self._body is _UNSTARTED:
                self.disarm()
                body = await BodyWriter.start(self._request, self._response)
                self._body = body
                begin = self._encoder.begin()  # the dialect's opening (a message's start)
                if begin:
                    body.write(begin)  # if the client is behind, the next write waits

    def arm(self, wait: float) -> None:
        """Start the response `wait` seconds from now, with a heartbeat, if nothing did."""
        self._timer = asyncio.get_running_loop().call_later(wait, self._wait_passed)

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _wait_passed(self) -> None:
        self._timer = None
        if not self.started:
            self._waited = asyncio.get_running_loop().create_task(self._start_waited())

    async def _start_waited(self) -> None:
        with contextlib.suppress(ClientGone):  # the stream's own writes will say it
            await self.start()
            if self._body.write(self._encoder.ping):  # proxies see bytes now, not only headers
                return  # behind already: the stream's next write waits for it
            self._guard.wrote()

    async def settle(self) -> bool:
        """No start after this but the caller's; True when the response has started."""
        self.disarm()
        if self._waited is not None:
            with contextlib.suppress(ClientGone):
                await self._waited
        return self.started

    async def ping(self) -> None:
        """The guard's heartbeat; the first one starts the response."""
        if not self.started:
            await self.start()
        await self._response.write(self._encoder.ping)

    def push(self, batch: list[Piece]) -> bool:
        """The frames of one upstream read in one write: back-to-back chunks cost one
        syscall, not one each. True when the client is behind: `drain()`."""
        if self._held is not None:
            self._held += batch
            return True
        if len(batch) > 1 and self._body.behind():  # a read that piled up while it was
            batch = coalesce(batch)
        if self._write(batch):
            self._held = []
            return True
        return False

    def _write(self, batch: list[Piece]) -> bool:
        if len(batch) == 1:
            data = self._frame(batch[0])
            if data is None:
                return False
            self._outcome.frames += 1
        else:
            frames = [data for piece in batch if (data := self._frame(piece))]
            if not frames:
                return False
            self._outcome.frames += len(frames)
            data = b"".join(frames)
        if self._outcome.first_token is None:
            self._outcome.first_token = time.monotonic()
        if self._body.write(data):
            return True
        self._guard.wrote()
        return False

    async def write_end(self) -> None:
        if not self.started:  # an answer without a piece: nothing started the response
            await self.drain()
        if self._body.write(self._encoder.end()):
            await self.drain()
        else:
            self._guard.wrote()

    async def drain(self) -> None:
        """The client is behind: wait for it, under the slow-client limit; then what was
        held meanwhile."""
        self._guard.writing()
        if self.started:
            await self._body.drain()
        else:  # the first piece (or the end): the commit; what it held goes out as it came
            await self.start()
            held, self._held = self._held, None
            if held and self._write(held):
                self._held = []
                await self._body.drain()
        while self._held:
            held, self._held = coalesce(self._held), None
            if self._write(held):
                self._held = []
                self._guard.writing()
                await self._body.drain()
        self._held = None
        self._guard.wrote()

    def release(self) -> None:
        """Write what is held without waiting: the stream ends (an error frame follows).
        The response has started."""
        held, self._held = self._held, None
        if held:
            with contextlib.suppress(ClientGone):
                self._write(coalesce(held))
