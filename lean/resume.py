"""Resumable runs (docs/protocol.md §2): each run's recent events, bounded, and the readers
that resume it from a cursor.

What a reader gets
- A run's events are numbered from 1 (`seq`, the SSE `id:`, the cursor). A subscription
  after cursor N yields N+1, N+2, ... up to the run's last event (`done` or `error`), each
  once and in order: first those still buffered, then the live ones as the run writes them,
  then it ends. A run that ended with no last event (its task torn down) ends its readers
  as below, from the saved answer.
- A cursor lean cannot honour (its next events left the buffer, or the run is only in the
  store) restarts the answer: `start` again (seq 1), one `delta` with the answer's text so
  far, then the rest. Live, that delta's seq is the newest event it stands for and the
  live events follow; from the store (a run no longer buffered, or a finished run whose
  buffer lost the cursor's next events) it is `start`, the saved text, and a `done` or
  `error` made from the saved status. The thinking and tool events of the skipped stretch
  are not replayed (the saved message keeps them). A client that sees `start` again
  clears what it showed for the run.

Bounds (style rule 5)
- Per run: the most recent events whose stored bytes (plus `ENTRY_BYTES` each) stay under
  `[limits] resume_buffer_kb`; older ones are dropped, a quarter of them at a time so a
  trim is not paid per event. Two exceptions, both bounded elsewhere: `start` is kept
  aside (every restart needs it; ~150 bytes), and the newest event is never dropped (one
  tool result may be larger than the bound: `max_response_bytes`; `done` carries the
  whole answer). So a finished run holds at most max(bound, its `done`).
- Finished runs stay `[limits] resume_ttl` seconds, and together at most
  `FINISHED_BYTES`; past either the oldest go first.
- A delta is stored as its JSON-escaped text alone (~5 bytes a token instead of its
  ~80-byte payload), cut out of the payload the run encoded, and put back between the
  run's fixed head and the part's tail when replayed: a resumed reader gets the same bytes
  the first one got, and a run costs a few KB for hundreds of chunks
  (`python -m bench.resume`).

The hot path (`Replay.add`, once per event) slices, appends and compares lengths; it wakes
waiting readers only when there are some. Nothing here does I/O but the store lookup of a
run no longer buffered.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import time
from array import array
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final, Literal, Protocol

import msgspec

from lean import events
from lean.errors import BadRequest, NotFound, clip
from lean.messages import MessageRecord

if TYPE_CHECKING:
    from lean.tool_round import ToolRound

__all__ = ["FINISHED_BYTES", "Live", "Replay", "Replays", "Subscription", "saved_events"]

Item = tuple[int, str, bytes]  # (seq, event name, payload: one line of JSON)

# Stored kinds: the three delta parts, then the other events in their order.
CONTENT, THINKING, REFUSAL, START, TOOL_START, TOOL_END, WAITING, DONE, ERROR = range(9)
_NAMES: Final = ("delta",) * 3 + ("start", "tool_start", "tool_end", "waiting", "done", "error")
_PART: Final = {"content": CONTENT, "thinking": THINKING, "refusal": REFUSAL}
_KIND: Final[dict[type, int]] = {
    events.Start: START,
    events.ToolStart: TOOL_START,
    events.ToolEnd: TOOL_END,
    events.Waiting: WAITING,
    events.Done: DONE,
    events.Error: ERROR,
}
# What follows a delta's text in its payload (msgspec writes the fields in order).
_TAILS: Final = tuple(b'","part":"%b"}' % part.encode() for part in _PART)
# A stored event's bookkeeping: where its bytes end and its kind, in one 8-byte integer.
ENTRY_BYTES = 8
_KIND_BITS = 4
# All finished runs' buffers together: 1,000 runs of a 64 KiB buffer, well inside
# systemd/lean.service's MemoryMax=384M beside 2,000 running streams. Most runs hold far
# less (a 200-chunk answer: ~3 KB), so this binds only under a flood of long answers.
FINISHED_BYTES = 64 * 1024 * 1024


_Delta: Final = events.Delta


@functools.cache
def _text_slices(head: int) -> tuple[slice, ...]:
    """Where a delta payload's escaped text is, by part, after a head of `head` bytes."""
    return tuple(slice(head, -len(tail)) for tail in _TAILS)


class Live(Protocol):
    """The running run behind a buffer (`lean.run.Run`)."""

    tools: ToolRound  # answers its `waiting` events

    def shown_text(self) -> str:
        """The answer's text the run has written as events so far."""
        ...

    def readers_changed(self) -> None:
        """A subscription came or went (`Replay.readers`)."""
        ...

    def cancel(self) -> None: ...


class Replay:
    """One run's recent events (see the module's docstring for the bounds)."""

    __slots__ = (
        "_data",
        "_ends",
        "_head",
        "_shift",
        "_slices",
        "_start",
        "_waiters",
        "bound",
        "ended_at",
        "final",
        "last",
        "message_id",
        "readers",
        "run",
        "run_id",
    )

    def __init__(self, run_id: str, message_id: str, bound: int, run: Live | None) -> None:
        self.run_id = run_id
        self.message_id = message_id
        self.run = run  # None once the run ended
        self.bound = bound
        self.readers = 0  # open subscriptions while the run runs
        self.last = 0  # the newest event's seq
        self.final = False  # the last event (done/error) is in
        self.ended_at: float | None = None  # time.monotonic() of the run's end
        self._head = b'{"type":"delta","messageId":%b,"text":"' % msgspec.json.encode(message_id)
        self._slices = _text_slices(len(self._head))  # a delta payload's text, by part
        self._start: bytes | None = None
        # Per event: (end << _KIND_BITS) | kind, its end in _data counted from the first
        # byte ever stored (so a trim renumbers nothing).
        self._ends = array("Q")
        self._data = bytearray()  # deleting at the front is O(1) for a bytearray
        self._shift = 0  # bytes dropped from the front of _data so far
        self._waiters: list[asyncio.Future[None]] = []

    @property
    def size(self) -> int:
        """Bytes held, as the bound counts them."""
        return len(self._data) + ENTRY_BYTES * len(self._ends) + len(self._start or b"")

    # --- the run's side: once per event ---

    def add(self, event: events.Event, seq: int, payload: bytes) -> None:
        """The run wrote `event` as its `seq`-th, encoded as `payload`."""
        data = self._data
        if type(event) is _Delta:
            kind = _PART[event.part]
            data += payload[self._slices[kind]]
        else:
            kind = _KIND[type(event)]
            if kind == START:
                self._start = payload
                self.last = seq
                if self._waiters:
                    self._wake()
                return
            data += payload
            self.final = kind >= DONE
        ends = self._ends
        ends.append((self._shift + len(data)) << _KIND_BITS | kind)
        self.last = seq
        if len(data) + ENTRY_BYTES * len(ends) > self.bound:
            self._trim()
        if self._waiters:
            self._wake()

    def _trim(self) -> None:
        """Drop the oldest quarter of the events until back under the bound, keeping the
        newest: a few operations per trim, whatever the events' sizes."""
        data, ends = self._data, self._ends
        while len(data) + ENTRY_BYTES * len(ends) > self.bound and len(ends) > 1:
            drop = max(1, (len(ends) - 1) // 4)
            cut = (ends[drop - 1] >> _KIND_BITS) - self._shift
            del data[:cut]  # O(1): a bytearray moves its start
            del ends[:drop]
            self._shift += cut

    def end(self) -> None:
        """The run is over: no more events; its readers learn it now."""
        self.run = None
        self.ended_at = time.monotonic()
        # Exact-size copies: an appended-to bytearray keeps spare room and dropped space.
        self._data = bytearray(self._data)
        self._ends = array("Q", self._ends)
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

    def after(self, cursor: int) -> Item | Literal[False] | None:
        """The event after `cursor`; None: not written yet; False: no longer buffered."""
        if cursor >= self.last:
            return None
        if cursor == 0:
            assert self._start is not None, "start is the first event"
            return (1, "start", self._start)
        first = self.last - len(self._ends) + 1
        if cursor < first - 1:
            return False
        index = cursor + 1 - first
        entry = self._ends[index]
        kind = entry & (1 << _KIND_BITS) - 1
        begin = (self._ends[index - 1] >> _KIND_BITS if index else self._shift) - self._shift
        data = self._data[begin : (entry >> _KIND_BITS) - self._shift]
        payload = self._head + data + _TAILS[kind] if kind <= REFUSAL else bytes(data)
        return (cursor + 1, _NAMES[kind], payload)

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


class Subscription:
    """An async iterator of `Item`s: the events after a cursor, then the live ones, ending
    after the run's last event (see the module's docstring). `close()` when done with it,
    whether or not it was read to the end: while open it counts as a reader of the run.
    `empty`: the cursor was at a finished run's last event; nothing will come."""

    def __init__(
        self,
        replay: Replay | None,
        after: int,
        saved: Callable[[], Awaitable[list[Item]]],
        items: list[Item] | None = None,
    ) -> None:
        self._replay = replay
        self._cursor = after
        self._saved = saved  # the answer from the store, for a restart after the run's end
        self._items = collections.deque(items or ())
        self._reading = False
        self.empty = replay is not None and replay.ended and after >= replay.last
        if replay is not None and replay.run is not None:
            self._reading = True
            replay.readers += 1
            replay.run.readers_changed()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Item:
        while not self._items:
            replay = self._replay
            if replay is None:
                raise StopAsyncIteration
            item = replay.after(self._cursor)
            if item is False or (item is None and replay.ended and not replay.final):
                await self._restart(replay)
            elif item is None:
                if replay.ended:
                    self.close()
                    raise StopAsyncIteration
                await replay.wait()
            else:
                assert isinstance(item, tuple)
                self._cursor = item[0]
                if item[0] == replay.last and replay.final:
                    self.close()  # the last event: nothing after it
                return item
        return self._items.popleft()

    async def _restart(self, replay: Replay) -> None:
        """The cursor's next events are gone: the answer again, from its start."""
        run = replay.run
        if run is None:  # ended: the store has the whole answer and how it ended
            self.close()
            self._items.extend(await self._saved())
            return
        self._items.append(replay.start_event())
        text = run.shown_text()
        if text:
            delta = events.Delta(message_id=replay.message_id, text=text)
            self._items.append((replay.last, "delta", events.encode(delta)))
        self._cursor = replay.last

    def close(self) -> None:
        replay, self._replay = self._replay, None
        if replay is not None and self._reading:
            self._reading = False
            replay.readers -= 1
            if replay.run is not None:
                replay.run.readers_changed()


def saved_events(record: MessageRecord) -> list[Item]:
    """A saved answer as a run's events: `start`, one `delta` with its text, and a `done`
    (status complete) or an `error` (any other) made from what was saved."""
    message_id = record.message_id
    start = events.Start(
        run_id=record.run_id or "",
        message_id=message_id,
        scene=record.scene,
        model=record.model,
        conversation_id=record.conversation_id,
    )
    out: list[Item] = [(1, "start", events.encode(start))]
    if record.content:
        delta = events.Delta(message_id=message_id, text=record.content)
        out.append((2, "delta", events.encode(delta)))
    final: events.Event
    if record.status == "complete":
        usage = events.Usage(record.prompt_tokens or 0, record.completion_tokens or 0)
        final = events.Done(
            message_id=message_id,
            finish_reason=record.finish_reason or "stop",
            usage=usage,
            text=record.content,
        )
    else:
        code = record.error_code or ("cancelled" if record.status == "cancelled" else "internal")
        final = events.Error(
            message_id=message_id, code=code, message=f"the answer ended {record.status}"
        )
    out.append((len(out) + 1, events.event_name(final), events.encode(final)))
    return out


class Replays:
    """Every resumable run's buffer by run id: running ones, and finished ones until
    `ttl` (and `FINISHED_BYTES`). `find` looks a run up in the store once it is gone."""

    def __init__(
        self,
        *,
        buffer_bytes: int,
        ttl: float,
        find: Callable[[str], Awaitable[MessageRecord | None]],
    ) -> None:
        self.buffer_bytes = buffer_bytes  # 0: no run is resumable
        self.ttl = ttl
        self._find = find
        self._live: dict[str, Replay] = {}
        self._finished: collections.OrderedDict[str, Replay] = collections.OrderedDict()
        self.finished_bytes = 0

    def __len__(self) -> int:
        return len(self._live) + len(self._finished)

    def open(self, run_id: str, message_id: str, run: Live) -> Replay | None:
        """A buffer for a run starting now; None when resuming is off or another running
        run holds the id (a WebSocket's runs are named by their clients)."""
        if not self.buffer_bytes or run_id in self._live:
            return None
        self._forget(run_id)  # a finished run of that id: the new one takes the name
        replay = self._live[run_id] = Replay(run_id, message_id, self.buffer_bytes, run)
        return replay

    def ended(self, replay: Replay) -> None:
        """The run of `replay` ended: kept `ttl` seconds from now."""
        replay.end()
        if self._live.get(replay.run_id) is replay:
            del self._live[replay.run_id]
            if self.ttl > 0:
                self._finished[replay.run_id] = replay
                self.finished_bytes += replay.size
        self.sweep()

    def sweep(self) -> None:
        """Drop the finished buffers past their ttl, and the oldest past FINISHED_BYTES."""
        finished = self._finished
        deadline = time.monotonic() - self.ttl
        while finished:
            replay = next(iter(finished.values()))
            assert replay.ended_at is not None
            if replay.ended_at > deadline and self.finished_bytes <= FINISHED_BYTES:
                break
            self._forget(replay.run_id)

    def _forget(self, run_id: str) -> None:
        replay = self._finished.pop(run_id, None)
        if replay is not None:
            self.finished_bytes -= replay.size

    def get(self, run_id: str) -> Replay | None:
        self.sweep()
        return self._live.get(run_id) or self._finished.get(run_id)

    def running(self, run_id: str) -> Live | None:
        """The running run of that id, if it is resumable."""
        replay = self._live.get(run_id)
        return None if replay is None else replay.run

    async def subscribe(self, run_id: str, after: int) -> Subscription:
        """The run's events after cursor `after`, then the live ones. Raises `NotFound`
        for a run lean neither buffers nor has saved, and `BadRequest` for a cursor past
        a running run's newest event."""
        replay = self.get(run_id)

        async def saved() -> list[Item]:
            record = await self._find(run_id)
            if record is None or record.status == "streaming":
                return []  # gone meanwhile: the reader just ends
            return saved_events(record)

        if replay is not None:
            if after > replay.last and not replay.ended:
                raise BadRequest(f"after: {after} is past the run's newest event ({replay.last})")
            return Subscription(replay, after, saved)
        record = await self._find(run_id)
        if record is None:
            raise NotFound(f"run '{clip(run_id)}' does not exist")
        if record.status == "streaming":
            raise NotFound(f"run '{clip(run_id)}' is running but cannot be resumed here")
        return Subscription(None, after, saved, saved_events(record))
