"""Admission control and the registry of running streams.

`max_streams` bounds how many answers lean relays at once (streaming or not):
past it a request is refused at once with 503 and `Retry-After`, before any
upstream is touched, so an overload costs lean one small response, not memory.
The registry is also how shutdown reaches every running stream.

With `[limits] cluster_max_streams`, `admit` also takes one of the cluster's slots in
Redis (`lean.cluster`) before a stream's response starts; `add` and `discard` keep the
cluster's count of this instance's streams.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from lean.errors import LeanError, Overloaded, ShuttingDown
from lean.guard import Guard
from lean.metrics import Metrics

if TYPE_CHECKING:
    from lean.cluster import Cluster


class Streams:
    def __init__(self, max_streams: int, metrics: Metrics, cluster: Cluster) -> None:
        self.max_streams = max_streams
        self._cluster = cluster
        self.draining = False
        self._metrics = metrics
        self._active: set[Guard] = set()
        self._empty = asyncio.Event()
        self._empty.set()

    def __len__(self) -> int:
        return len(self._active)

    def check(self) -> None:
        """Raise unless one more stream may start now."""
        if self.draining:
            self._metrics.rejections[("shutting_down",)] += 1
            raise ShuttingDown("lean is shutting down", retry_after=1)
        if len(self._active) >= self.max_streams:
            self._metrics.rejections[("overloaded",)] += 1
            raise Overloaded(
                f"lean is relaying its limit of {self.max_streams} streams; retry shortly",
                retry_after=1,
            )

    async def admit(self) -> None:
        """`check`, then a slot of the cluster's (a round trip to Redis, only with
        cluster_max_streams): raises past either bound."""
        self.check()
        try:
            await self._cluster.admit()
        except Overloaded:
            self._metrics.rejections[("cluster_overloaded",)] += 1
            raise

    def add(self, guard: Guard) -> None:
        self.check()
        self._active.add(guard)
        self._empty.clear()
        self._cluster.stream_started()

    def discard(self, guard: Guard) -> None:
        if guard not in self._active:
            return
        self._active.discard(guard)
        self._cluster.stream_ended()
        if not self._active:
            self._empty.set()

    async def drain(self, seconds: float) -> bool:
        """Wait up to `seconds` for running streams to end; True when none is left."""
        self.draining = True
        try:
            async with asyncio.timeout(seconds):
                await self._empty.wait()
        except TimeoutError:
            return False
        return True

    def interrupt_all(self, reason: LeanError) -> None:
        for guard in list(self._active):
            guard.interrupt(reason)
