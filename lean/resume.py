"""Resumable runs (docs/protocol.md §2, "Resuming a run"): the readers that resume a run
from a cursor, and the registry of the runs' buffers (`lean.replay`).

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
- A run is its client's (docs/protocol.md §8): to another client it does not exist, in
  the buffers as in the store (`404`).
- Finished runs' buffers stay `[limits] resume_ttl` seconds, and together at most
  `FINISHED_BYTES`; past either the oldest go first.

Nothing here does I/O but the store lookup of a run no longer buffered.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Awaitable, Callable

from lean import events
from lean.clients import Client
from lean.errors import BadRequest, NotFound, clip
from lean.messages import MessageRecord
from lean.replay import Item, Live, Replay

__all__ = ["FINISHED_BYTES", "Replays", "Subscription", "saved_events"]

# All finished runs' buffers together: 1,000 runs of a 64 KiB buffer, well inside
# systemd/lean.service's MemoryMax=384M beside 2,000 running streams. Most runs hold far
# less (a 200-chunk answer: ~3 KB), so this binds only under a flood of long answers.
FINISHED_BYTES = 64 * 1024 * 1024


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
        text = replay.shown_text()
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
    `ttl` (and `FINISHED_BYTES`). `find(run_id, owner)` looks a run up in the store once it
    is gone: its saved answer when `owner` (`Client.owner`) owns it, else None."""

    def __init__(
        self,
        *,
        buffer_bytes: int,
        ttl: float,
        find: Callable[[str, str | None], Awaitable[MessageRecord | None]],
    ) -> None:
        self.buffer_bytes = buffer_bytes  # 0: no run is resumable
        self.ttl = ttl
        self._find = find
        self._live: dict[str, Replay] = {}
        self._finished: collections.OrderedDict[str, Replay] = collections.OrderedDict()
        self.finished_bytes = 0
        # Set with [cluster] redis_url (lean.resume_remote): a run not here, asked of the
        # instance that owns it; args: run id, cursor, client, its saved row if any.
        self.remote: (
            Callable[[str, int, Client, MessageRecord | None], Awaitable[Subscription]] | None
        ) = None

    def __len__(self) -> int:
        return len(self._live) + len(self._finished)

    def open(self, run_id: str, message_id: str, run: Live, client: Client) -> Replay | None:
        """A buffer for `client`'s run starting now; None when resuming is off or another
        running run holds the id (a WebSocket's runs are named by their clients)."""
        if not self.buffer_bytes or run_id in self._live:
            return None
        self._forget(run_id)  # a finished run of that id: the new one takes the name
        replay = Replay(run_id, message_id, self.buffer_bytes, run, client.name)
        self._live[run_id] = replay
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

    def running(self, run_id: str, client: Client | str) -> Live | None:
        """`client`'s (or the client of that name's) running run of that id, if it is
        resumable."""
        name = client if isinstance(client, str) else client.name
        replay = self._live.get(run_id)
        return None if replay is None or replay.owner != name else replay.run

    def is_running(self, run_id: str) -> bool:
        """Whether a resumable run of that id runs here, whoever started it."""
        return run_id in self._live

    def here(self, run_id: str, after: int, name: str, owner: str | None) -> Subscription | None:
        """The client named `name`'s (store owner `owner`) run's events after `after`, if
        its buffer is here; else None. Raises `BadRequest` for a cursor past a running run's
        newest event."""
        replay = self.get(run_id)
        if replay is None or replay.owner != name:
            return None  # another client's: not there for this one (the store may have its own)
        if after > replay.last and not replay.ended:
            raise BadRequest(f"after: {after} is past the run's newest event ({replay.last})")
        return Subscription(replay, after, self._saved(run_id, owner))

    def _saved(self, run_id: str, owner: str | None) -> Callable[[], Awaitable[list[Item]]]:
        async def saved() -> list[Item]:
            record = await self._find(run_id, owner)
            if record is None or record.status == "streaming":
                return []  # gone meanwhile: the reader just ends
            return saved_events(record)

        return saved

    async def subscribe(self, run_id: str, after: int, client: Client) -> Subscription:
        """`client`'s run's events after cursor `after`, then the live ones. Raises
        `NotFound` for a run lean neither buffers nor has saved for that client, and
        `BadRequest` for a cursor past a running run's newest event. A run neither
        buffered here nor finished in the store is asked of the other instances
        (`remote`, with `[cluster] redis_url`)."""
        subscription = self.here(run_id, after, client.name, client.owner)
        if subscription is not None:
            return subscription
        record = await self._find(run_id, client.owner)
        if record is not None and record.status != "streaming":
            return Subscription(
                None, after, self._saved(run_id, client.owner), saved_events(record)
            )
        if self.remote is not None and not self.is_running(run_id):
            return await self.remote(run_id, after, client, record)
        if record is None:
            raise NotFound(f"run '{clip(run_id)}' does not exist")
        raise NotFound(f"run '{clip(run_id)}' is running but cannot be resumed here")
