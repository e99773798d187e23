"""lean's housekeeping: one timer, a few times a second, nothing per event or per stream.

- **A blocked event loop.** Every stream shares one thread; code that blocks it (an
  `async def` tool calling time.sleep or sync I/O, most often) freezes them all.
  Each tick measures how late it woke: later than `STALL` means the loop was held,
  which is logged (a warning naming the likely cause) and counted
  (`lean_loop_stalls_total`).
- **Memory back to the OS after a burst.** See `Upkeep.trim`.
- **Chores**: cheap checks others hand in (`chores`), e.g. dropping the resume buffers of
  runs past their ttl (`lean.resume`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
from collections.abc import Callable

from lean.metrics import Metrics

log = logging.getLogger("lean.upkeep")

TICK = 0.25  # seconds between checks: a stall of STALL is seen within STALL + TICK
STALL = 0.5  # seconds late: far above a busy loop's normal jitter (ms), well below a freeze
# Quiet ticks (no stream running) after a busy spell before the heap is trimmed once.
TRIM_AFTER_QUIET = 4  # one second


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None elsewhere (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    return trim


class Upkeep:
    def __init__(self, metrics: Metrics, active: Callable[[], int]) -> None:
        self._metrics = metrics
        self._active = active  # streams and runs in progress
        self._task: asyncio.Task[None] | None = None
        self._malloc_trim = _malloc_trim()
        self._busy = False  # streams ran since the last trim
        self._quiet = 0  # ticks in a row without a stream
        self.trims = 0
        self.auto_trim = True  # bench/bursts.py turns it off to measure what it gives
        self.chores: list[Callable[[], None]] = []  # run every tick: must be cheap

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="lean-upkeep")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + TICK
            await asyncio.sleep(TICK)
            late = loop.time() - due
            if late > STALL:
                self._metrics.loop_stalls += 1
                log.warning(
                    "the event loop was held for %.2f s: every stream waited. An async tool "
                    "that blocks (time.sleep, sync I/O) does this (make it a plain def, so it "
                    "runs on a tool thread); so does a burst of connections opening or "
                    "closing at once, or a machine short of CPU",
                    late,
                )
            for chore in self.chores:
                chore()
            self.trim()

    def trim(self) -> None:
        """Give freed heap back to the OS once lean goes quiet after a busy spell.

        CPython's small objects live in arenas that are freed when empty, but larger
        buffers come from glibc's heap, which keeps freed memory at its top and in
        per-thread arenas (the store's and the tools' threads) until told otherwise:
        after a burst the RSS stays high though nothing is held (docs/decisions.md,
        "Known limits", has the figures). malloc_trim(0) returns those pages; it costs
        a few ms on a large heap, so it runs once per quiet spell, not per tick.
        """
        if self._active():
            self._busy = True
            self._quiet = 0
            return
        if not self._busy or self._malloc_trim is None or not self.auto_trim:
            return
        self._quiet += 1
        if self._quiet >= TRIM_AFTER_QUIET:
            self._malloc_trim(0)
            self.trims += 1
            self._busy = False
