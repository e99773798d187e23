"""One answer from a model alias, streamed, with retries and failover before the commit point.

The commit point is the first visible piece (text, reasoning or a tool call)
handed to the caller. Before it, a failed attempt (connect error, HTTP error,
an unparseable or truncated stream, an in-band error after the preamble,
silence) is not the client's problem; after it, a failure is raised to the
caller, who ends the stream with a typed error: an answer is never finished on
a provider's behalf.

The plan for each alias, in order (`[model.X] fallback = a, b`):
1. the streaming path, tried `1 + retries` times while the failure is retryable
   (connect error, 429, 5xx, overloaded, timeout), waiting between tries with
   exponential backoff and full jitter, or the upstream's `Retry-After` when it
   is at most `MAX_RETRY_AFTER`;
2. the provider's non-streaming path, once (a provider with `stream = false`
   starts here); its whole answer is charged to the shared budget of whole answers
   (`lean.budget`) until it was handed on, and refused (retryable `overloaded`)
   when that budget is spent;
3. then the next alias. The last failure is raised when every alias failed.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

from lean.arrivals import Handed, Receiver
from lean.budget import BudgetExhausted
from lean.config import ModelConfig
from lean.errors import LeanError
from lean.guard import Guard
from lean.services import Services

log = logging.getLogger("lean.relay")

BACKOFF_BASE = 0.2  # seconds: the first retry waits up to this, then doubling
BACKOFF_CAP = 4.0
# A longer Retry-After is not waited out: the client would rather have the next alias.
MAX_RETRY_AFTER = 10.0


def backoff(attempt: int, error: LeanError) -> float | None:
    """Seconds to wait before retry `attempt` (1-based), or None to stop retrying."""
    if error.retry_after is not None:
        return error.retry_after if error.retry_after <= MAX_RETRY_AFTER else None
    return random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (attempt - 1)))


def _kept(error: LeanError) -> LeanError:
    """`error` without its traceback, to be raised later if nothing answers. Kept with it,
    the traceback holds this frame, whose `last` holds the error: a cycle that kept the
    request (and a fallback's whole answer) alive until a full collection, which lean
    serve runs rarely (measured with bench/bursts.py; tests/test_bounds.py checks it)."""
    return error.with_traceback(None)


class Relay:
    def __init__(
        self, services: Services, model: ModelConfig, body: dict[str, Any], guard: Guard
    ) -> None:
        self._upstream = services.upstream
        self._metrics = services.metrics
        self._models = [model, *(services.config.models[alias] for alias in model.fallback)]
        self._body = body
        self._guard = guard
        self._handed = Handed()
        self.fallback = False  # the answer came from a non-streaming path

    @property
    def committed(self) -> bool:
        return self._handed.visible

    async def run(self, receiver: Receiver) -> None:
        """Hand the answer to `receiver`, in the batches its upstream reads delivered."""
        last: LeanError | None = None
        handed = self._handed
        for model in self._models:
            throttled = False  # this alias asked for a pause longer than lean waits
            if self._upstream.provider(model).stream:
                for attempt in range(1 + model.retries):
                    if attempt:
                        assert last is not None
                        wait = backoff(attempt, last)
                        if wait is None:
                            break
                        self._guard.idle()  # heartbeats go on while lean waits
                        await asyncio.sleep(wait)
                    try:
                        await self._upstream.stream(
                            model, self._body, self._guard, receiver, handed
                        )
                        return
                    except LeanError as exc:  # the upstream's (a client's is `ClientGone`)
                        self._count(model, exc)
                        if self.committed:
                            raise
                        last = _kept(exc)
                        throttled = (exc.retry_after or 0) > MAX_RETRY_AFTER
                        self._log(model, "stream", exc)
                        if not exc.retryable:
                            break
            if throttled:
                continue  # the provider asked for a pause longer than lean waits
            with self._upstream.budget.lease() as lease:  # held until the pieces went out
                try:
                    pieces = await self._upstream.complete(model, self._body, self._guard, lease)
                except LeanError as exc:
                    self._count(model, exc)
                    last = _kept(exc)
                    self._log(model, "non-stream", exc)
                    continue
                self.fallback = True
                self._metrics.fallbacks += 1
                await handed.deliver(receiver, pieces)
                return
        assert last is not None
        try:
            raise last
        finally:
            del last  # its traceback holds this frame: without it in the frame, no cycle

    def _count(self, model: ModelConfig, error: LeanError) -> None:
        if isinstance(error, BudgetExhausted):  # lean's own limit, not the provider's fault
            self._metrics.rejections[("fallback_budget",)] += 1
            return
        self._metrics.upstream_errors[(model.provider, error.code)] += 1

    def _log(self, model: ModelConfig, path: str, error: LeanError) -> None:
        log.warning(
            "attempt failed before any content model=%s path=%s code=%s error=%s",
            model.alias,
            path,
            error.code,
            error.message,
        )
