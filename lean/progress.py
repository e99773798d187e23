"""Running answers saved as they grow, so a kill -9 loses at most `[store] flush_interval`.

One task per process, not one per run: every `interval` it collects the answers whose text
grew since their last flush and hands them to the store as ONE op (one row update each, in
one commit). Nothing is done per token: a run only registers its text buffers when it
starts and leaves when it ends (its final save then replaces the row).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from lean.messages import TextBuffer
from lean.store import Store

log = logging.getLogger("lean.store")


class _Answer:
    __slots__ = ("reasoning", "reasoning_flushed", "text", "text_flushed")

    def __init__(self, text: TextBuffer, reasoning: TextBuffer) -> None:
        self.text, self.reasoning = text, reasoning
        self.text_flushed = self.reasoning_flushed = 0  # sizes at the last flush


class Progress:
    def __init__(self, store: Store, interval: float) -> None:
        self._store = store
        self.interval = interval  # 0: off
        self._answers: dict[str, _Answer] = {}  # by message id; bounded by the runs running
        self._task: asyncio.Task[None] | None = None

    def add(self, message_id: str, text: TextBuffer, reasoning: TextBuffer) -> None:
        if self.interval:
            self._answers[message_id] = _Answer(text, reasoning)

    def discard(self, message_id: str) -> None:
        self._answers.pop(message_id, None)

    def start(self) -> None:
        if self.interval and self._task is None:
            self._task = asyncio.create_task(self._flush_every(), name="lean-store-progress")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def rows(self) -> list[tuple[str, str, str]]:
        """(content, reasoning, message_id) of every answer that grew since its last flush."""
        rows = []
        for message_id, answer in self._answers.items():
            text, reasoning = answer.text, answer.reasoning
            if text.size == answer.text_flushed and reasoning.size == answer.reasoning_flushed:
                continue
            answer.text_flushed, answer.reasoning_flushed = text.size, reasoning.size
            rows.append((text.text(), reasoning.text(), message_id))
        return rows

    async def _flush_every(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self._store.save_progress(self.rows())
            except Exception:  # a closed store at shutdown; the writer reports write failures
                log.debug("store: progress not queued", exc_info=True)
