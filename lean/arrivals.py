"""Where an answer's pieces go, and an upstream body handled where its bytes arrive.

A `Receiver` (an OpenAI-compatible stream, a scene run, a collector) takes the pieces of
one upstream read at a time and writes them at once; `Handed` records what went out, the
relay's commit point. `Arrivals` drives a receiver from aiohttp's data callback instead
of from a task woken per read (see its docstring and docs/decisions.md, "Push, not
generators").
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import aiohttp

from lean import aiohttp_internals as internals
from lean.errors import LeanError
from lean.guard import Guard
from lean.providers.base import VISIBLE, Piece
from lean.sse import SSEParser

# Upstream bytes are parsed this much at a time. A slice's events are parsed at once and
# held until the client takes them, so this bounds what a stalled client makes lean hold
# beyond aiohttp's own buffer (which pauses the socket past 2 x 64 KiB).
READ_BYTES = 64 * 1024


class Receiver(Protocol):
    """Where an answer's pieces go: a batch per upstream read."""

    def push(self, batch: list[Piece]) -> bool:
        """Write `batch` to the client now, without waiting; True when the client is
        behind: `drain()` before the next batch."""
        ...

    async def drain(self) -> None:
        """Wait until the client takes writes again (under its slow-client limit)."""
        ...


class Handed:
    """What the streams of one answer handed to their receiver: the relay's commit point.
    A receiver whose client failed raises `client_io.ClientGone`, which the upstream
    boundary passes through untouched."""

    __slots__ = ("visible",)

    def __init__(self) -> None:
        self.visible = False  # a piece the user sees went out: no more retries

    async def deliver(self, receiver: Receiver, batch: list[Piece]) -> None:
        """For the rare paths (a whole answer, the demo); the read loop inlines this."""
        if not self.visible and any(isinstance(piece, VISIBLE) for piece in batch):
            self.visible = True
        if receiver.push(batch):
            await receiver.drain()


class Arrivals:
    """An upstream body handled where its bytes arrive.

    aiohttp's response parser hands each read to the response's `StreamReader`, which
    buffers it and wakes the task that awaits `readany()`. `take()` turns that reader
    into a callback instead: each read is parsed, translated and written to the client
    inside aiohttp's data callback, and the stream's task only waits for the end, a
    failure, or a client that is behind (then the upstream stops being read until the
    client drains). The buffer, the wake-up and the `readany()` per read were 21-22% of
    lean's CPU per chunk (docs/performance.md). A failure inside the callback is kept and
    raised by the task (a client's failure as `ClientGone`, its type). The aiohttp
    internals this takes (a reader's class swapped, the socket paused) are in
    `lean.aiohttp_internals`, items 1 and 2.
    """

    __slots__ = (
        "_guard",
        "_handed",
        "_parser",
        "_paused",
        "_protocol",
        "_read_timeout",
        "_reads",
        "_receiver",
        "_translator",
        "_wake",
        "behind",
        "ended",
        "failure",
    )

    def __init__(
        self,
        parser: SSEParser,
        translator: Any,
        receiver: Receiver,
        handed: Handed,
        guard: Guard,
        read_timeout: float,
    ) -> None:
        self._parser = parser
        self._translator = translator
        self._receiver = receiver
        self._handed = handed
        self._guard = guard
        self._read_timeout = read_timeout
        self._wake: asyncio.Future[None] | None = None
        self._protocol: Any = None  # the upstream connection's, while `take()` runs
        self._paused = False
        self._reads = 0  # handled in the data callback: `aiohttp_internals.READS`
        self.behind = False  # the client is behind: drain before reading more
        self.ended = False
        self.failure: BaseException | None = None

    def feed(self, data: bytes) -> bool:
        """Parse one read and write what it completes; True when the client is behind."""
        if self.failure is not None:
            return self.behind
        handed = self._handed
        try:
            # Parsed a slice at a time: what a stalled client makes lean hold stays
            # within READ_BYTES of parsed events.
            for part in (data,) if len(data) <= READ_BYTES else _slices(data):
                batch: list[Piece] = []
                failed: LeanError | None = None
                for message in self._parser.feed(part):
                    try:
                        batch += self._translator.feed(message)
                    except LeanError as exc:  # what came before it goes out first
                        failed = exc
                        break
                if batch:
                    if not handed.visible and any(isinstance(p, VISIBLE) for p in batch):
                        handed.visible = True
                    if self._receiver.push(batch):
                        self.behind = True
                if failed is not None:
                    raise failed
            self._guard.waiting(self._read_timeout)
        except Exception as exc:  # raised by the task, in `take()`
            self.failure = exc
        return self.behind

    async def take(self, content: aiohttp.StreamReader, protocol: Any) -> None:
        """Handle `content` as it arrives, until its end; raise what failed."""
        leftover = internals.hand_over(content, self)
        self._protocol = protocol
        try:
            if leftover:
                self.feed(leftover)
            if (error := content.exception()) is not None:
                self.fail(error)
            elif content.is_eof():
                self.ended = True
            loop = asyncio.get_running_loop()
            while True:
                if self.failure is not None:
                    raise self.failure
                if self.behind:  # nothing more is read from the upstream until it drains
                    self._pause()
                    await self._drain()
                    self._resume()
                    continue
                if self.ended:
                    return
                self._wake = loop.create_future()
                await self._wake
        finally:
            internals.take_back(content)
            internals.READS.fast += self._reads
            self._wake = None
            self._protocol = None

    async def read(self, content: aiohttp.StreamReader) -> None:
        """The usual way, for a reader `take()` does not handle: a task woken per read."""
        reads = 0
        try:
            while data := await content.readany():
                reads += 1
                if self.feed(data):
                    await self._drain()
                if self.failure is not None:
                    raise self.failure
        finally:
            internals.READS.fallback += reads

    async def _drain(self) -> None:
        """Wait for the client (its failure: `ClientGone`). Then lean waits for the upstream
        again: its silence limit starts over."""
        await self._receiver.drain()
        self.behind = False
        self._guard.waiting(self._read_timeout)

    def arrived(self, data: bytes) -> None:
        self._reads += 1
        if self.feed(data):
            self._pause()  # at once: what else arrives before the task runs is one read
            self._wake_up()
        elif self.failure is not None:
            self._wake_up()

    # The upstream socket is paused, not aiohttp's protocol (`aiohttp_internals`, 2). The
    # rest of the read in hand is still parsed and handed over; the receiver holds it
    # until the client drains.
    def _pause(self) -> None:
        if not self._paused and self._protocol is not None:
            self._paused = True
            internals.pause_socket(self._protocol)

    def _resume(self) -> None:
        self._paused = False
        if self._protocol is not None:
            internals.resume_socket(self._protocol)

    def end(self) -> None:
        self.ended = True
        self._wake_up()

    def fail(self, exc: BaseException) -> None:
        if self.failure is None:
            self.failure = exc
        self._wake_up()

    def _wake_up(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)


def _slices(data: bytes) -> list[bytes]:
    return [data[start : start + READ_BYTES] for start in range(0, len(data), READ_BYTES)]
