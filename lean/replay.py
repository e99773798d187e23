"""One run's recent events, bounded: what a resume reads (docs/protocol.md §2,
"Resuming a run"). `lean.resume` serves them to readers; `lean.run` feeds them.

Bounds (style rule 5)
- The most recent events whose size (a delta's characters, another event's payload
  bytes, plus `ENTRY_BYTES` each) stays under `[limits] resume_buffer_kb`; older ones are
  dropped, a quarter of them at a time so a trim is not paid per event. Two exceptions,
  both bounded elsewhere: `start` is kept aside (every restart needs it; ~150 bytes), and
  the newest event is never dropped (one tool result may be larger than the bound:
  `max_response_bytes`; `done` carries the whole answer). So a finished run holds at most
  max(bound, its `done`) and the stretch of text its kept deltas need.
- A delta costs one 8-byte entry: where it ends in the answer's text (or reasoning). The
  text itself is the run's own (`core.RunCore` keeps the whole answer anyway); a replay
  cuts the delta out of it and encodes it again: the same bytes the first reader got
  (`events.encode` is deterministic). When the run ends, the stretch its kept deltas need
  is copied out. A run costs ~2 KB for 200 chunks while it runs (`python -m bench.resume`).

The hot path (`Replay.add`, once per event) adds, appends one integer and compares; it
wakes waiting readers only when there are some. Nothing here does I/O.
"""

from __future__ import annotations

import asyncio
import time
from array import array
from typing import TYPE_CHECKING, Final, Literal, Protocol

from lean import events

if TYPE_CHECKING:
    from lean.tool_round import ToolRound

__all__ = ["ENTRY_BYTES", "Item", "Live", "Replay"]

Item = tuple[int, str, bytes]  # (seq, event name, payload: one line of JSON)

# Stored kinds: the three delta parts, then the other events in their order.
CONTENT, THINKING, REFUSAL, START, TOOL_START, TOOL_END, WAITING, DONE, ERROR = range(9)
_NAMES: Final = ("delta",) * 3 + ("start", "tool_start", "tool_end", "waiting", "done", "error")
_KIND: Final[dict[type, int]] = {
    events.Start: START,
    events.ToolStart: TOOL_START,
    events.ToolEnd: TOOL_END,
    events.Waiting: WAITING,
    events.Done: DONE,
    events.Error: ERROR,
}
# A stored event: 8 bytes, `text_end << 34 | thought_end << 4 | kind`, where the ends count
# the characters of the answer's text (content and refusal deltas) and of its reasoning
# (thinking deltas) written up to and with it; 30 bits each (a billion characters).
ENTRY_BYTES = 8
_TEXT_SHIFT = 34
_THOUGHT_SHIFT = 4
_COUNT_MASK = (1 << 30) - 1
_KIND_MASK = (1 << _THOUGHT_SHIFT) - 1
_PARTS: Final = ("content", "thinking", "refusal")

_Delta: Final = events.Delta


class Live(Protocol):
    """The running run behind a buffer (`lean.run.Run`)."""

    tools: ToolRound  # answers its `waiting` events

    def texts(self) -> tuple[str, str]:
        """The answer's text (content and refusals) and its reasoning as the run has them:
        what its deltas wrote so far, then any text held back for a client that is behind."""
        ...

    def text_slice(self, thinking: bool, begin: int, end: int) -> str:
        """`texts()[thinking][begin:end]`, without joining the whole text for it."""
        ...

    def readers_changed(self) -> None:
        """A subscription came or went (`Replay.readers`)."""
        ...

    def cancel(self) -> None: ...


class Replay:
    """One run's recent events (see the module's docstring for the bounds)."""

    __slots__ = (
        "_ends",
        "_others",
        "_others_bytes",
        "_size",
        "_start",
        "_text",
        "_text_base",
        "_text_end",
        "_thought",
        "_thought_base",
        "_thought_end",
        "_waiters",
        "bound",
        "ended_at",
        "final",
        "last",
        "message_id",
        "owner",
        "readers",
        "run",
        "run_id",
    )

    def __init__(
        self, run_id: str, message_id: str, bound: int, run: Live | None, owner: str = "default"
    ) -> None:
        self.run_id = run_id
        self.message_id = message_id
        self.owner = owner  # the name of the client whose run it is: only it may resume it
        self.run = run  # None once the run ended
        self.bound = bound
        self.readers = 0  # open subscriptions while the run runs
        self.last = 0  # the newest event's seq
        self.final = False  # the last event (done/error) is in
        self.ended_at: float | None = None  # time.monotonic() of the run's end
        self._start: bytes | None = None
        self._ends = array("Q")  # one entry per event kept but start, oldest first
        self._others: dict[int, bytes] = {}  # the payloads of the events not deltas, by seq
        self._others_bytes = 0
        self._size = 0  # what the bound counts: characters, payload bytes, entries
        self._text_end = self._thought_end = 0  # characters written as deltas so far
        self._text_base = self._thought_base = 0  # ...before the oldest event kept
        # Once the run ended: the stretch of its text and reasoning the events kept need.
        self._text = self._thought = ""
        self._waiters: list[asyncio.Future[None]] = []

    @property
    def size(self) -> int:
        """Bytes held, as the bound counts them (a character as a byte), start included."""
        return self._size + len(self._start or b"")

    # --- the run's side: once per event ---

    def add(self, event: events.Event, seq: int, payload: bytes) -> None:
        """The run wrote `event` as its `seq`-th, encoded as `payload`. A delta costs its
        entry alone: its text is in the run's own text, which the run keeps anyway."""
        if type(event) is _Delta:
            size = len(event.text)
            part = event.part
            if part == "content":
                kind = CONTENT
                self._text_end += size
            elif part == "thinking":
                kind = THINKING
                self._thought_end += size
            else:
                kind = REFUSAL
                self._text_end += size
        else:
            kind = _KIND[type(event)]
            if kind == START:
                self._start = payload
                self.last = seq
                if self._waiters:
                    self._wake()
                return
            self._others[seq] = payload
            size = len(payload)
            self._others_bytes += size
            self.final = kind >= DONE
        self._ends.append(
            self._text_end << _TEXT_SHIFT | self._thought_end << _THOUGHT_SHIFT | kind
        )
        self.last = seq
        self._size += size + ENTRY_BYTES
        if self._size > self.bound:
            self._trim()
        if self._waiters:
            self._wake()

    def _trim(self) -> None:
        """Drop the oldest quarter of the events until back under the bound, keeping the
        newest: a few operations per trim, whatever the events' sizes."""
        ends, others = self._ends, self._others
        while self._size > self.bound and len(ends) > 1:
            drop = max(1, (len(ends) - 1) // 4)
            kept_from = self.last - len(ends) + 1 + drop  # the seq of the oldest kept
            entry = ends[drop - 1]
            self._text_base = entry >> _TEXT_SHIFT
            self._thought_base = entry >> _THOUGHT_SHIFT & _COUNT_MASK
            del ends[:drop]
            while others and (oldest := next(iter(others))) < kept_from:
                self._others_bytes -= len(others.pop(oldest))
            self._size = (
                self._text_end
                - self._text_base
                + self._thought_end
                - self._thought_base
                + self._others_bytes
                + ENTRY_BYTES * len(ends)
            )

    def end(self) -> None:
        """The run is over: no more events; its readers learn it now. The stretch of the
        run's text its events need is copied out (the run is about to be freed)."""
        run, self.run = self.run, None
        if run is not None:
            text, thought = run.texts()
            self._text = text[self._text_base : self._text_end]
            self._thought = thought[self._thought_base : self._thought_end]
        self.ended_at = time.monotonic()
        self._ends = array("Q", self._ends)  # exact size: appending left spare room
        self._wake()

    def _wake(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    # --- the readers' side ---

    @property
    def ended(self) -> bool:
        return self.ended_at is not None

    def _piece(self, thinking: bool, begin: int, end: int) -> str:
        """A delta's text: from the running run's own, or from the stretch copied out."""
        run = self.run
        if run is not None:
            return run.text_slice(thinking, begin, end)
        if thinking:
            return self._thought[begin - self._thought_base : end - self._thought_base]
        return self._text[begin - self._text_base : end - self._text_base]

    def shown_text(self) -> str:
        """The answer's text written as deltas so far, while the run runs (a restart)."""
        run = self.run
        return "" if run is None else run.texts()[0][: self._text_end]

    def after(self, cursor: int) -> Item | Literal[False] | None:
        """The event after `cursor`; None: not written yet; False: no longer buffered."""
        if cursor >= self.last:
            return None
        if cursor == 0:
            return self.start_event()
        ends = self._ends
        first = self.last - len(ends) + 1
        if cursor < first - 1:
            return False
        seq = cursor + 1
        index = seq - first
        entry = ends[index]
        kind = entry & _KIND_MASK
        if kind > REFUSAL:
            return (seq, _NAMES[kind], self._others[seq])
        before = (
            ends[index - 1]
            if index
            else self._text_base << _TEXT_SHIFT | self._thought_base << _THOUGHT_SHIFT
        )
        if kind == THINKING:
            begin = before >> _THOUGHT_SHIFT & _COUNT_MASK
            piece = self._piece(True, begin, entry >> _THOUGHT_SHIFT & _COUNT_MASK)
        else:
            piece = self._piece(False, before >> _TEXT_SHIFT, entry >> _TEXT_SHIFT)
        delta = events.Delta(message_id=self.message_id, text=piece, part=_PARTS[kind])
        return (seq, "delta", events.encode(delta))

    def start_event(self) -> Item:
        assert self._start is not None, "start is the first event"
        return (1, "start", self._start)

    async def wait(self) -> None:
        """Until the run writes another event or ends."""
        if self.ended:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter
