"""A run's state without I/O: provider pieces in, dialect-neutral events out, how it ended.

A `RunCore` is fed the pieces of each upstream read (`push`) and keeps the answer they
make: its text and reasoning, the tool calls of every model call (`calls`) and of the
current one (`round`), the finish reason, and the usage summed over every upstream call
of the run (each call's last `Usage` piece counts: providers that repeat it within a
call repeat a running total). It never awaits, writes or opens anything.

Events out, in arrival order, are calls on the run's `Out` (the dialect's side, which
encodes and writes or holds them): `text`, `reasoning` and `refusal` for each visible
delta. A refusal's words join the answer's text (they are what the user is shown, and what
is saved), and a call that refused and then stopped ends with finish reason "refusal". Tool
calls go out per model call (`round_calls`, after the call ended: a call's arguments
come in fragments); the finish reason and usage when the run ends.

How the run ended is decided here only, once, as an `Ending`: `complete()`,
`cancelled()` or `failed(error)`. A second decision is a bug in lean and raises.
"""

from __future__ import annotations

import enum
import time
from typing import Any, Protocol

from lean.errors import Cancelled, LeanError, ShuttingDown
from lean.messages import TextBuffer
from lean.providers.base import (
    Finish,
    Piece,
    Reasoning,
    Refusal,
    Text,
    ToolCall,
    Usage,
    Verbatim,
)
from lean.tool_round import Call

__all__ = ["Ending", "Out", "RunCore"]


class Ending(enum.StrEnum):
    """Where a run is: running, or how it ended (the status saved with its answer, and the
    `status` of its log line and metrics)."""

    RUNNING = "running"
    COMPLETE = "complete"  # the upstream finished the answer and the client had it all
    CANCELLED = "cancelled"  # the client cancelled, or left and took the run with it
    INCOMPLETE = "incomplete"  # cut after part of the answer (kept), or by lean's shutdown
    ERROR = "error"  # failed before any of the answer

    @staticmethod
    def after(error: LeanError, *, kept: bool) -> Ending:
        """How a run that failed with `error` ended; `kept`: part of its answer is kept
        (went out to the client, or is saved)."""
        if isinstance(error, Cancelled):
            return Ending.CANCELLED
        if kept or isinstance(error, ShuttingDown):
            return Ending.INCOMPLETE
        return Ending.ERROR


class Out(Protocol):
    """The dialect's side of a run: each visible delta, with whether the client is behind
    (then the dialect holds it); each returns whether the client is behind now."""

    def text(self, text: str, behind: bool) -> bool: ...

    def reasoning(self, text: str, behind: bool) -> bool: ...

    def refusal(self, text: str, behind: bool) -> bool: ...


_NO_USAGE = Usage()


class RunCore:
    __slots__ = (
        "_call_usage",
        "_usage_before",
        "calls",
        "ending",
        "error",
        "finish",
        "first_token",
        "reasoning",
        "refused",
        "round",
        "round_start",
        "started",
        "text",
    )

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.first_token: float | None = None  # time.monotonic() of the first visible delta
        self.text = TextBuffer()
        self.reasoning = TextBuffer()
        self.calls: list[Call] = []  # every finished model call's, for the saved answer
        self.round: dict[int, Call] = {}  # the current model call's, by index
        self.round_start = 0  # where the current model call's text begins
        self.finish = "stop"
        self.refused = False  # the current model call refused (OpenAI's `refusal`)
        self._usage_before = Usage()  # the finished model calls', summed
        self._call_usage = Usage()  # the current call's last
        self.ending = Ending.RUNNING
        self.error: LeanError | None = None

    # --- pieces in ---

    def push(self, batch: list[Piece], out: Out, behind: bool) -> bool:
        """One upstream read's pieces; the visible ones to `out`. Whether the client is
        behind after them (`behind`: it was before them)."""
        text = self.text
        for piece in batch:
            if isinstance(piece, Text):  # most pieces: handled here, one call less each
                if self.first_token is None:
                    self.first_token = time.monotonic()
                text.add(piece.text)
                behind = out.text(piece.text, behind)
            elif isinstance(piece, Reasoning):
                if self.first_token is None:
                    self.first_token = time.monotonic()
                self.reasoning.add(piece.text)
                behind = out.reasoning(piece.text, behind)
            elif isinstance(piece, Refusal):
                if self.first_token is None:
                    self.first_token = time.monotonic()
                self.refused = True
                text.add(piece.text)
                behind = out.refusal(piece.text, behind)
            elif isinstance(piece, ToolCall):
                call = self.round.get(piece.index)
                if call is None:
                    call = self.round[piece.index] = Call(piece.index, piece.id, piece.name)
                call.arguments += piece.arguments
            elif isinstance(piece, Finish):
                # OpenAI ends a refusal with "stop": the run says what it was.
                refusal = self.refused and piece.reason == "stop"
                self.finish = "refusal" if refusal else piece.reason
            elif isinstance(piece, Usage):
                self._call_usage = piece
            elif isinstance(piece, Verbatim):  # what lean does not model stays on the chunk
                behind = self.push(list(piece.pieces), out, behind)
        return behind

    def next_call(self) -> None:
        """Another upstream call of the run begins (a tool round's answer)."""
        self._usage_before = self._usage_before.plus(self._call_usage)
        self._call_usage = Usage()
        self.refused = False
        self.round = {}
        self.round_start = self.text.size

    # --- what the pieces made ---

    @property
    def usage(self) -> Usage:
        """Summed over every upstream call of the run so far."""
        before, call = self._usage_before, self._call_usage
        if before == _NO_USAGE:
            return call
        return before.plus(call)

    @property
    def first_token_ms(self) -> float | None:
        return None if self.first_token is None else (self.first_token - self.started) * 1000

    def round_calls(self) -> list[Call]:
        """The tool calls the current model call asked for, now whole; kept for the
        saved answer."""
        calls = list(self.round.values())
        self.calls.extend(calls)
        return calls

    def tool_turn(self, calls: list[Call]) -> list[dict[str, Any]]:
        """The messages that give the model its calls' results (OpenAI's shape)."""
        turn: list[dict[str, Any]] = [
            {
                "role": "assistant",
                "content": self.text.text()[self.round_start :] or None,
                "tool_calls": [call.openai() for call in calls],
            }
        ]
        turn.extend(
            {"role": "tool", "tool_call_id": call.id, "content": call.result} for call in calls
        )
        return turn

    # --- how it ended: once ---

    def complete(self) -> None:
        self._end(Ending.COMPLETE)

    def cancelled(self) -> None:
        """Cancelled with no reason given (the task's own cancellation)."""
        self._end(Ending.CANCELLED)

    def failed(self, error: LeanError) -> None:
        # Kept without its traceback, which holds the run's frames: a cycle (bench/bursts.py).
        self.error = error.with_traceback(None)
        self._end(Ending.after(error, kept=self.text.size > 0))

    def _end(self, ending: Ending) -> None:
        if self.ending is not Ending.RUNNING:
            raise RuntimeError(f"the run ended twice: {self.ending}, then {ending}")
        self.ending = ending

    @property
    def saved_status(self) -> Ending:
        """The status to save: a run that never ended (its task was torn down) is cut."""
        return Ending.INCOMPLETE if self.ending is Ending.RUNNING else self.ending
