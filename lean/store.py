"""Conversations and messages (and saved Responses answers) in SQLite or PostgreSQL, never
blocking the event loop (docs/protocol.md §1, §2, §7).

What it guarantees, whichever the database (`lean.store_sqlite`, `lean.store_pg`):
- The loop never waits on the database. One writer thread owns the only write connection
  and takes ops from a bounded queue; it drains what is queued (up to
  `batch_max`) and commits it as ONE transaction. A write nobody waits for (a save, a new
  conversation's first turn) waits up to `LINGER` for company, so busy streams share
  commits and the writer wakes (and takes the GIL from the loop) a few times per `LINGER`,
  not twice per run; an op someone awaits ends the wait at once. Reads use a separate
  connection on their own thread.
- A read sees every write queued before it: it first waits for those to be committed.
- Turns never race: `begin_turn` allocates the turn on the writer thread, in queue order
  (the highest turn of the conversation + 1: its user row is written in the same step; on
  PostgreSQL under a lock on the conversation that every instance takes), and returns once
  that row is committed. A conversation exists once it has a message.
- A run writes its answer's row with status `streaming` as it starts (`save_assistant`,
  not awaited); `save_progress` rewrites running answers' text (one op for every answer
  that grew, so one statement per answer per flush interval, never per token);
  `save_assistant` writes the answer for good (an upsert keyed on messageId) and, awaited,
  returns once it is committed: a run tells its client the truth about the save. Rows carry
  the `instance` that wrote them: at `open` (or `end_streaming`, from a live instance once
  it is dead) that instance's rows still `streaming` become `incomplete` with the flushed text.
- A failing write is logged and reported, as `StoreWriteError` whichever the database: to
  the awaiting `begin_turn` or `save_assistant`, or, for a write nobody awaits, to the next
  `flush`; `on_failure` counts each op that failed. The writer thread keeps serving.
- What a batch means (one transaction, health, retries) is `lean.store_batches`; a database's
  connections, SQL and schema are its backend's; this module owns the threads, the queue and
  the loop.
- Health: a batch that cannot be committed (a full disk, a file that became read-only, a
  database that went away) clears `writable`; while it is clear the writer tries a real
  write every `PROBE_INTERVAL`, and the next commit that succeeds sets it again. The final
  saves of a failed batch (answers whose `done` said `saved: false`) and its first turns are
  kept, up to `RETRY_MAX`, and written with that next commit. `open` fails on a database it
  cannot write to or whose schema is newer than this lean's (`StoreError`). A read that
  fails is `StoreReadError`.
- A process that is killed (not stopped) may lose the writes nobody awaited in its last
  `LINGER`, and the text a running answer received since its last progress flush.
- `close` commits every write accepted before it; writes after it raise `StoreClosed`.
  SQLite's synchronous=NORMAL may lose the last commits on power loss, never on a process
  crash: a chat log can afford that; an fsync per batch would cost far more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from lean.messages import (
    MessageRecord,
    row,
    utc_now,
)
from lean.store_batches import (
    ENDED,
    FLUSH,
    PROGRESS,
    RESPONSE,
    SAVE,
    STOP,
    TURN,
    Backend,
    Batches,
    Future,
    Op,
    Outcome,
    Reader,
    Settled,
    StoreError,
    StoreReadError,
    StoreWriteError,
)
from lean.store_reads import StoreReads
from lean.store_sqlite import SqliteBackend

__all__ = [
    "LINGER",
    "PROBE_INTERVAL",
    "Store",
    "StoreClosed",
    "StoreError",
    "StoreReadError",
    "StoreWriteError",
    "backend_for",
]

_log = logging.getLogger("lean.store")
_T = TypeVar("_T")


class StoreClosed(RuntimeError):
    """A write or read was attempted after `Store.close()`."""


# Seconds a write nobody waits for may wait for others to share its commit. At 80 runs/s
# (400 streams of 5 s) 20 ms puts ~3 runs' rows in one transaction and spares the loop ~2
# thread wake-ups per run; what a kill (not a stop) can lose is this much of saving.
LINGER = 0.02

# Seconds between write probes while the store cannot write: /readyz turns ready again within
# this after space returns, for one small write per second on a store that is failing anyway.
PROBE_INTERVAL = 1.0


def backend_for(where: str) -> Backend:
    """A PostgreSQL URL's backend (the driver imported only then), else a SQLite file's."""
    if where.startswith(("postgresql://", "postgres://")):
        try:
            from lean.store_pg import PgBackend
        except ImportError as exc:
            hint = "pip install 'lean[postgres]'"
            raise StoreError(f"the PostgreSQL driver is missing: {hint} ({exc})") from None
        return PgBackend(where)
    return SqliteBackend(where)


class Store(StoreReads):
    def __init__(
        self,
        where: str | Backend,
        *,
        instance: str | None = None,
        queue_max: int = 10_000,
        batch_max: int = 512,
        on_failure: Callable[[str, int], None] | None = None,
    ) -> None:
        if queue_max < 1 or batch_max < 1:
            raise ValueError("queue_max and batch_max must be at least 1")
        # A file path or a postgresql:// URL ([store] path or url), or a backend.
        self.backend = backend_for(where) if isinstance(where, str) else where
        # [cluster] instance: written on its answers' rows, whose `streaming` rows `open` ends.
        self.instance = instance
        # Called on the loop with (op kind, how many failed): "turn", "save" or "progress".
        self._on_failure = on_failure
        # Loop side: False from a failed commit until a write succeeds (see _run); why: `error`.
        self.writable = True
        self.error: str | None = None
        self._batches = Batches()  # the writer thread's: its health, its writes to retry
        # queue_max bounds ops waiting for the writer: 10k saves is ~0.15 s of writing at the
        # measured ~65k rows/s, so a burst of that many finished runs is absorbed without anyone
        # waiting; past it save_assistant waits for space instead of growing memory (a queued
        # row is ~1-2 KB) or dropping a message.
        self._queue: queue.Queue[Op] = queue.Queue(queue_max)
        # batch_max bounds one transaction: a commit never waits behind a long backlog.
        self._batch_max = batch_max
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer: threading.Thread | None = None  # set once it serves the queue
        self._reader: ThreadPoolExecutor | None = None
        self._rconn: Reader | None = None  # used on the reader thread only
        self._urgent = threading.Event()  # an op someone awaits is queued: commit now
        self._closed = False
        self._closing: asyncio.Task[None] | None = None
        # Backpressure: producers that found the queue full wait, in order, for the writer
        # to say it drained (see _put and _run).
        self._blocked = 0
        self._put_lock = asyncio.Lock()
        self._space = asyncio.Event()
        self._space_wanted = False

    async def open(self) -> None:
        if self._closed:
            raise StoreClosed("the store is closed")
        if self._loop is not None:
            raise RuntimeError("Store.open() may be called only once")
        loop = self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        writer = threading.Thread(target=self._run, args=(ready,), name="lean-store-writer")
        writer.daemon = True  # close() is what saves the data; never hang interpreter exit
        writer.start()
        try:
            await ready
            self._writer = writer
            # One reader thread: a connection serves one thread, and a read is ~1 ms.
            self._reader = ThreadPoolExecutor(1, thread_name_prefix="lean-store-read")
            await loop.run_in_executor(self._reader, self._open_reader)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._closing is None:
            self._closed = True
            self._closing = asyncio.ensure_future(self._shutdown())
        await asyncio.shield(self._closing)

    async def _shutdown(self) -> None:
        loop = asyncio.get_running_loop()
        if self._reader is not None:  # first, so the writer's close checkpoints the WAL away
            if self._rconn is not None:  # after the reads already submitted
                await loop.run_in_executor(self._reader, self._rconn.close)
            self._reader.shutdown(wait=True)
        if self._writer is not None:
            stopped: asyncio.Future[None] = loop.create_future()
            await self._put((STOP, None, stopped))  # behind every write accepted before close
            await stopped
            self._writer.join()  # returns at once: the thread has only `return` left

    async def begin_turn(
        self,
        *,
        conversation_id: str,
        scene: str,
        user_content: str,
        prompt: str | None = None,
        created_at: str | None = None,
        client: str | None = None,
    ) -> int:
        """Save the user message of the next turn: `user_content` as typed, `prompt` the
        filled template the model sees (None: the same). 0, saving nothing, when the
        conversation belongs to another client than `client` (None: the default client)."""
        loop = self._check_open()
        turn: asyncio.Future[int] = loop.create_future()
        args = (conversation_id, scene, user_content, created_at or utc_now(), prompt, client)
        await self._put((TURN, args, turn))
        return await turn

    async def begin_first_turn(
        self,
        *,
        conversation_id: str,
        scene: str,
        user_content: str,
        prompt: str | None = None,
        client: str | None = None,
    ) -> int:
        """`begin_turn` for a conversation lean has just named: its turn is 1, so the caller
        does not wait for the commit (the writer logs a failure)."""
        self._check_open()
        args = (conversation_id, scene, user_content, utc_now(), prompt, client)
        await self._put((TURN, args, None))
        return 1

    async def save_assistant(
        self, record: MessageRecord, *, wait: bool = True, client: str | None = None
    ) -> None:
        """Write `record`, owned by `client` (None: the default client); with `wait`, return
        once it is committed (raise if it failed), without, once it is queued (a failure is
        reported to the next `flush`)."""
        loop = self._check_open()
        # Encoded here, so a tool call that is not JSON fails the caller, not a later flush.
        values = row(record, client, self.instance)
        if not wait:
            await self._put((SAVE, values, None))
            return
        saved: asyncio.Future[None] = loop.create_future()
        await self._put((SAVE, values, saved))
        await saved

    async def save_progress(self, rows: list[tuple[str, str, str]]) -> None:
        """Running answers' text so far, as (content, reasoning, message_id): one op, one
        statement per row, nobody waiting. A row no longer `streaming` is left alone."""
        self._check_open()
        if rows:
            await self._put((PROGRESS, rows, None))

    async def save_response(self, row: tuple[Any, ...]) -> None:
        """Queue a Responses answer's row (`saved_responses.row`); nobody waits for it, and
        a read queued after it sees it."""
        self._check_open()
        await self._put((RESPONSE, row, None))

    async def end_streaming(self, instance: str) -> None:
        """`instance` is dead: its `streaming` rows become `incomplete` (idempotent)."""
        done: asyncio.Future[None] = self._check_open().create_future()
        await self._put((ENDED, instance, done))
        await done

    async def flush(self, *, report: bool = True) -> None:
        """Wait until everything queued before the call is committed. With `report`, raise
        the first error among saves that failed since the previous flush; without, raise
        nothing: a barrier for a read that must see what a client was already told about
        (a new conversation's first turn is not awaited by its run)."""
        if self._closed:  # close() commits everything; wait for it rather than fail
            if self._closing is not None:
                await asyncio.shield(self._closing)
            return
        loop = self._check_open()
        done: asyncio.Future[None] = loop.create_future()
        await self._put((FLUSH, report, done))
        if report:
            await done
        else:
            with contextlib.suppress(Exception):
                await done

    def _check_open(self) -> asyncio.AbstractEventLoop:
        if self._closed:
            raise StoreClosed("the store is closed")
        if self._loop is None:
            raise RuntimeError("Store.open() has not been awaited")
        return self._loop

    async def _put(self, op: Op) -> None:
        if self._blocked == 0:
            try:
                self._queue.put_nowait(op)
                if op[2] is not None:
                    self._urgent.set()
                return
            except queue.Full:
                pass
        self._blocked += 1  # later callers queue behind us, so order (and close) holds
        try:
            async with self._put_lock:  # FIFO among blocked producers
                while True:
                    self._space.clear()
                    self._space_wanted = True  # set BEFORE trying, so the writer cannot miss it
                    try:
                        self._queue.put_nowait(op)
                        if op[2] is not None:
                            self._urgent.set()
                        return
                    except queue.Full:
                        await self._space.wait()
        finally:
            self._blocked -= 1

    async def _query(self, sql: str, args: tuple[Any, ...], convert: Callable[[Any], _T]) -> _T:
        """Run one SELECT on the reader thread, after the writes queued before it; `convert`
        its rows there too. A failure is `StoreReadError`, whichever the database."""
        loop = self._check_open()
        await self.flush(report=False)

        def run() -> _T:
            assert self._rconn is not None
            return convert(self._rconn.query(sql, args))

        try:
            return await loop.run_in_executor(self._reader, run)
        except self.backend.errors as exc:  # a database that went away, not a bad query
            raise StoreReadError(str(exc).partition("\n")[0]) from exc

    def _open_reader(self) -> None:
        self._rconn = self.backend.connect_reader()

    def _run(self, ready: asyncio.Future[None]) -> None:
        try:
            conn = self.backend.connect_writer(self.instance)
        except Exception as exc:
            self._settle([(ready, None, exc)])
            return
        self._settle([(ready, None, None)])
        batches = self._batches
        stopped: Future = None
        try:
            while stopped is None:
                try:  # while unhealthy, probe between ops: recovery needs no traffic
                    wait = None if batches.healthy else PROBE_INTERVAL
                    ops = [self._queue.get(timeout=wait)]
                except queue.Empty:
                    self._report(batches.probe(conn))
                    continue
                if ops[0][2] is None:  # nobody waits for it: let others share the commit
                    self._urgent.wait(LINGER)
                self._urgent.clear()  # before draining: an op queued after is seen next time
                while len(ops) < self._batch_max:
                    try:
                        ops.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                if self._space_wanted:  # read after draining: see _put
                    self._space_wanted = False
                    self._call(self._space.set)
                outcome = batches.write(conn, ops)
                self._report(outcome)
                stopped = outcome.stop
        finally:
            if batches.retry:
                _log.error("store: closed with %d messages it could not write", len(batches.retry))
            conn.close()
            self._settle([(stopped, None, None)])

    def _report(self, outcome: Outcome) -> None:
        """Writer thread: hand what a batch or probe did to the loop."""
        if outcome.health_changed:
            self._call(self._health_changed, outcome.error is None, outcome.error)
        if self._on_failure is not None and outcome.failed:
            self._call(_report_failures, self._on_failure, outcome.failed)
        self._settle(outcome.settled)

    def _health_changed(self, healthy: bool, error: str | None) -> None:
        self.writable, self.error = healthy, error

    def _settle(self, settled: Settled) -> None:
        settled = [item for item in settled if item[0] is not None]  # a first turn: nobody waits
        if settled:
            self._call(_settle_all, settled)

    def _call(self, fn: Callable[..., object], *args: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            self._loop.call_soon_threadsafe(fn, *args)


def _report_failures(on_failure: Callable[[str, int], None], failed: dict[str, int]) -> None:
    for name, count in failed.items():
        on_failure(name, count)


def _settle_all(settled: Settled) -> None:
    for fut, result, exc in settled:
        if fut is None or fut.done():  # no one waits, or its awaiter was cancelled
            continue
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)
