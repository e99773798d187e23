"""One watchdog per client stream: whoever lean waits for has a limit, and heartbeats.

Why one task per stream rather than a timer per chunk: `asyncio.timeout()` around
each read or write allocates a timer and touches the loop's heap per event, and a
timeout scope must not span the `yield` of an async generator. Instead the hot
path only records which phase the stream is in and since when (`loop.time()`),
and one task wakes every `resolution` seconds to compare those stamps with the
limits. Deadlines are therefore enforced within `resolution` (a quarter of the
smallest limit, clamped to 50 ms-5 s).

Phases follow who lean waits for, each with its own limit and error:
- UPSTREAM: the upstream's next bytes; its silence limit (`read_timeout`), then
  `upstream_timeout`.
- TOOL: a round's server tools; each has its own timeout, which makes an overrun an
  error result the model sees, and the guard ends the run (`tool_timeout`) only
  past the longest of them plus `TOOL_GRACE`.
- CLIENT: the client's answer to a client tool; `client_tool_timeout`, then
  `tool_timeout`.
- WRITING: the client taking bytes. A client is slow when it takes nothing for
  `slow_client_timeout`, however long a large batch takes it: while WRITING, each
  tick samples what the client has not taken yet (`pending`, the sink's buffer and
  the kernel's) and any decrease restarts the clock. Then `slow_client`.
- IDLE: nobody (a retry's backoff, a call with its own deadline): heartbeats only.
Heartbeats go out in every phase but WRITING.

When a limit passes, the guard interrupts the stream's task with a reason (a
`LeanError`): the task is cancelled, and the code that catches the
`CancelledError` asks `take()` whether it was this guard, as `asyncio.timeout`
does. Shutdown and run cancellation use the same `interrupt()`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from lean.errors import LeanError, SlowClient, UpstreamTimeout
from lean.metrics import Metrics

IDLE, UPSTREAM, WRITING, TOOL, CLIENT = 0, 1, 2, 3, 4
# A write that took longer than this waited for the client: counted as backpressure.
BACKPRESSURE_WAIT = 0.005
# Seconds past a server tool's own timeout before the guard ends the run: the tool's
# timeout answers the model with an error result; the guard is there for a tool that
# does not stop when cancelled, and must not race the tool's own limit.
TOOL_GRACE = 1.0


class Guard:
    def __init__(
        self,
        *,
        ping_interval: float,
        slow_client_timeout: float,
        ping: Callable[[], Awaitable[None]] | None = None,
        on_slow_client: Callable[[], None] | None = None,
        pending: Callable[[], int] | None = None,
        task: asyncio.Task[Any] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._metrics = metrics or Metrics()
        self._loop = asyncio.get_running_loop()
        task = task or asyncio.current_task()
        if task is None:
            raise RuntimeError("Guard needs the stream's task")
        self.task = task
        self.ping_interval = ping_interval
        self.slow_client_timeout = slow_client_timeout
        self._ping = ping
        self._on_slow_client = on_slow_client
        # Bytes written that the client has not taken yet; None: a drain's length counts.
        self._pending = pending
        self._unsent = -1  # its last sample while WRITING; -1: none yet in this wait
        self.reason: LeanError | None = None
        self.evicted = False
        self.phase = IDLE
        self.since = self._loop.time()
        self.last_write = self.since
        self.upstream_limit = 0.0
        self._tool_limit = 0.0
        self._tool_expiry: LeanError | None = None
        self._resolution = self._resolution_for(slow_client_timeout, 5.0)
        self._watch = self._loop.create_task(self._run())

    def _resolution_for(self, limit: float, current: float) -> float:
        return min(current, max(0.05, min(limit, self.ping_interval) / 4))

    def _set_resolution(self, limit: float) -> None:
        resolution = self._resolution_for(limit, self._resolution)
        if resolution < self._resolution:
            # The watch sleeps on the old interval: restart it on the new one. This
            # happens at most a couple of times per stream (first byte, then silence).
            self._resolution = resolution
            if not self._watch.done():
                self._watch.cancel()
                self._watch = self._loop.create_task(self._run())

    # The hot path: plain attribute writes, no timers.
    def waiting(self, limit: float) -> None:
        """Lean waits for the upstream, silent for at most `limit` s from now."""
        if limit != self.upstream_limit:
            self.upstream_limit = limit
            self._set_resolution(limit)
        self.phase = UPSTREAM
        self.since = self._loop.time()

    def writing(self) -> None:
        self.phase = WRITING
        self._unsent = -1
        self.since = self._loop.time()

    def wrote(self) -> None:
        """A write ended. Only one that waited (`writing()` first) leaves the WRITING
        phase; a write that did not wait leaves the phase (and its clock) as it was."""
        now = self.last_write = self._loop.time()
        if self.phase == WRITING:
            if now - self.since > BACKPRESSURE_WAIT:
                self._metrics.backpressure_waits += 1
            self.phase = IDLE
            self.since = now

    def idle(self) -> None:
        """Neither side is waited for (a retry's backoff, a call with its own deadline):
        no limit applies, heartbeats go on."""
        self.phase = IDLE
        self.since = self._loop.time()

    def tools(self, *, client: bool, since: float, limit: float, expiry: LeanError) -> None:
        """Lean waits for a round's tools (`client`: for the client's answer), started at
        `since` (`loop.time()`); past `limit` s the stream ends with `expiry`. Called
        again after each write of the round: a write that waited leaves its phase."""
        self._set_resolution(limit)
        self._tool_limit = limit
        self._tool_expiry = expiry
        self.phase = CLIENT if client else TOOL
        self.since = since

    def interrupt(self, reason: LeanError) -> None:
        """End the stream with `reason`; the first reason wins."""
        if self.reason is None and not self.task.done():
            self.reason = reason
            self.task.cancel()

    def take(self) -> LeanError | None:
        """Called on `CancelledError`: the reason if this guard caused it (and absorb it)."""
        reason, self.reason = self.reason, None
        if reason is not None and self.task.cancelling():
            self.task.uncancel()
        return reason

    def take_timeout(self) -> UpstreamTimeout | None:
        """Like `take`, but only for an upstream timeout; other reasons stay pending."""
        if isinstance(self.reason, UpstreamTimeout):
            reason = self.reason
            self.reason = None
            if self.task.cancelling():
                self.task.uncancel()
            return reason
        return None

    async def close(self) -> None:
        # The callbacks are usually its owner's methods, and the owner holds the guard:
        # dropped here, the pair is freed by reference counting, not left to the GC.
        self._ping = self._on_slow_client = self._pending = None
        self._tool_expiry = None
        self._watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._watch

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._resolution)
            now = self._loop.time()
            phase = self.phase
            if phase == WRITING:
                if self._pending is not None:
                    unsent = self._pending()
                    if 0 <= unsent < self._unsent:  # the client took bytes since the last tick
                        self.since = now
                    self._unsent = unsent
                if now - self.since >= self.slow_client_timeout:
                    self._evict()
                continue
            if phase == UPSTREAM and now - self.since >= self.upstream_limit:
                self.interrupt(
                    UpstreamTimeout(f"the upstream sent nothing for {self.upstream_limit:g} s")
                )
            elif phase >= TOOL and now - self.since >= self._tool_limit:
                assert self._tool_expiry is not None
                self.interrupt(self._tool_expiry)
            if self._ping is not None and now - self.last_write >= self.ping_interval:
                await self._send_ping()

    def _evict(self) -> None:
        # The watch goes on without heartbeats: a run that finishes without its client
        # (on_disconnect = finish) still needs its upstream silence limit.
        self.evicted = True
        self._metrics.evictions += 1
        if self.phase == WRITING:  # the write that never finished waited too
            self._metrics.backpressure_waits += 1
        self._ping = None
        self.phase = IDLE
        self.interrupt(SlowClient("the client stopped reading"))
        if self._on_slow_client is not None:
            self._on_slow_client()

    async def _send_ping(self) -> None:
        assert self._ping is not None
        phase, since = self.phase, self.since
        self.phase = WRITING
        stamp = self.since = self._loop.time()
        try:
            async with asyncio.timeout(self.slow_client_timeout):
                await self._ping()
        except (TimeoutError, ConnectionError):
            self._evict()
            return
        self.last_write = self._loop.time()
        if self.phase == WRITING and self.since == stamp:
            # Nothing else happened meanwhile: a heartbeat does not reset another clock.
            self.phase, self.since = phase, since
