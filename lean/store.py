"""Conversations and messages in SQLite, never blocking the event loop (docs/protocol.md §1, §2).

What it guarantees:
- The loop never waits on SQLite. One writer thread owns the only write connection (WAL,
  synchronous=NORMAL) and takes ops from a bounded queue; it drains what is queued (up to
  `batch_max`) and commits it as ONE transaction. A write nobody waits for (a save, a new
  conversation's first turn) waits up to `LINGER` for company, so busy streams share
  commits and the writer wakes (and takes the GIL from the loop) a few times per `LINGER`,
  not twice per run; an op someone awaits ends the wait at once. Reads use a separate
  read-only connection on their own thread.
- A read sees every write queued before it: it first waits for those to be committed.
- Turns never race: `begin_turn` allocates the turn on the writer thread, in queue order
  (the highest turn of the conversation + 1: its user row is written in the same step), and
  returns once that row is committed. A conversation exists once it has a message.
- A run writes its answer's row with status `streaming` as it starts (`save_assistant`,
  not awaited); `save_progress` rewrites running answers' text (one op for every answer
  that grew, so one statement per answer per flush interval, never per token);
  `save_assistant` writes the answer for good (`INSERT OR REPLACE` keyed on messageId)
  and, awaited, returns once it is committed: a run tells its client the truth about the
  save. At `open`, rows still `streaming` (their lean was killed) become `incomplete`,
  keeping the flushed text.
- A failing write is logged and reported: to the awaiting `begin_turn` or `save_assistant`,
  or, for a write nobody awaits, to the next `flush`; `on_failure` counts each op that
  failed. The writer thread keeps serving.
- Health: a batch that cannot be committed (a full disk, a file that became read-only)
  clears `writable`; while it is clear the writer tries a real write (a header update) every
  `PROBE_INTERVAL`, and the next commit that succeeds sets it again. The final saves of a
  failed batch (answers whose `done` said `saved: false`) and its first turns are kept, up
  to `RETRY_MAX`, and written with that next commit. `open` fails on a file
  it cannot write to or whose schema is newer than this lean's (`StoreError`).
- A process that is killed (not stopped) may lose the writes nobody awaited in its last
  `LINGER`, and the text a running answer received since its last progress flush.
- `close` commits every write accepted before it; writes after it raise `StoreClosed`.
  synchronous=NORMAL may lose the last commits on power loss, never on a process crash: a chat
  log can afford that; an fsync per batch would cost far more.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from lean.messages import (
    END_STREAMING,
    INSERT_MESSAGE,
    MIGRATIONS,
    SCHEMA_VERSION,
    SELECT_EXISTS,
    SELECT_HISTORY,
    SELECT_MESSAGES,
    UPDATE_STREAMING,
    MessageRecord,
    begin_turn,
    history,
    records,
    row,
    utc_now,
)

_log = logging.getLogger("lean.store")
_T = TypeVar("_T")


class StoreClosed(RuntimeError):
    """A write or read was attempted after `Store.close()`."""


class StoreError(Exception):
    """The database file cannot be used by this lean (a newer schema, WAL refused)."""


# Ops travel as (kind, args, future); the future is None when nobody waits for the op.
_SAVE, _TURN, _PROGRESS, _FLUSH, _STOP = range(5)
# What `on_failure` is told failed, by op kind.
_OP_NAMES = {_SAVE: "save", _TURN: "turn", _PROGRESS: "progress"}
_Future = asyncio.Future[Any] | None
_Op = tuple[int, Any, _Future]
_Settled = list[tuple[_Future, Any, BaseException | None]]

# Seconds a write nobody waits for may wait for others to share its commit. At 80 runs/s
# (400 streams of 5 s) 20 ms puts ~3 runs' rows in one transaction and spares the loop ~2
# thread wake-ups per run; what a kill (not a stop) can lose is this much of saving.
LINGER = 0.02

# Seconds between write probes while the store cannot write: /readyz turns ready again within
# this after space returns, for one small write per second on a store that is failing anyway.
PROBE_INTERVAL = 1.0

# Writes kept for another try after their batch could not be committed (a full disk): final
# saves (their `done` said `saved: false`) and new conversations' first turns (their run had
# already started). Each holds one message (a few KB), so 1,000 is a few MB at most; past it
# the oldest is dropped, as it was reported. Written first in the next commit.
RETRY_MAX = 1000


class Store:
    def __init__(
        self,
        path: str,
        *,
        queue_max: int = 10_000,
        batch_max: int = 512,
        on_failure: Callable[[str, int], None] | None = None,
    ) -> None:
        if queue_max < 1 or batch_max < 1:
            raise ValueError("queue_max and batch_max must be at least 1")
        self._path = path
        # Called on the loop with (op kind, how many failed): "turn", "save" or "progress".
        self._on_failure = on_failure
        # Loop side: False from a failed commit until a write succeeds (see _run); `error`
        # says why, for /readyz.
        self.writable = True
        self.error: str | None = None
        self._healthy = True  # the writer thread's own view, which it reports to the loop
        self._retry: collections.deque[tuple[int, Any]] = collections.deque(maxlen=RETRY_MAX)
        # queue_max bounds ops waiting for the writer: 10k saves is ~0.15 s of writing at the
        # measured ~65k rows/s, so a burst of that many finished runs is absorbed without anyone
        # waiting; past it save_assistant waits for space instead of growing memory (a queued
        # row is ~1-2 KB) or dropping a message.
        self._queue: queue.Queue[_Op] = queue.Queue(queue_max)
        # batch_max bounds one transaction, so a commit (and the futures it resolves) never
        # waits behind an arbitrarily long backlog.
        self._batch_max = batch_max
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer: threading.Thread | None = None  # set once it serves the queue
        self._reader: ThreadPoolExecutor | None = None
        self._rconn: sqlite3.Connection | None = None  # used on the reader thread only
        # Writer thread only: the first save that failed since a flush, and how many more.
        self._failed: Exception | None = None
        self._failed_more = 0
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
            # One reader thread: sqlite3 connections are per thread, and a read is ~1 ms.
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
            await self._put((_STOP, None, stopped))  # behind every write accepted before close
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
    ) -> int:
        """Save the user message of the next turn: `user_content` as typed, `prompt` the
        filled template the model sees (None: the same)."""
        loop = self._check_open()
        turn: asyncio.Future[int] = loop.create_future()
        args = (conversation_id, scene, user_content, created_at or utc_now(), prompt)
        await self._put((_TURN, args, turn))
        return await turn

    async def begin_first_turn(
        self, *, conversation_id: str, scene: str, user_content: str, prompt: str | None = None
    ) -> int:
        """`begin_turn` for a conversation lean has just named: its turn is 1, so the caller
        does not wait for the commit (the writer logs a failure)."""
        self._check_open()
        args = (conversation_id, scene, user_content, utc_now(), prompt)
        await self._put((_TURN, args, None))
        return 1

    async def save_assistant(self, record: MessageRecord, *, wait: bool = True) -> None:
        """Write `record`; with `wait`, return once it is committed (raise if it failed),
        without, once it is queued (a failure is reported to the next `flush`)."""
        loop = self._check_open()
        # Encoded here, so a tool call that is not JSON fails the caller, not a later flush.
        values = row(record)
        if not wait:
            await self._put((_SAVE, values, None))
            return
        saved: asyncio.Future[None] = loop.create_future()
        await self._put((_SAVE, values, saved))
        await saved

    async def save_progress(self, rows: list[tuple[str, str, str]]) -> None:
        """Running answers' text so far, as (content, reasoning, message_id): one op, one
        statement per row, nobody waiting. A row no longer `streaming` is left alone."""
        self._check_open()
        if rows:
            await self._put((_PROGRESS, rows, None))

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
        await self._put((_FLUSH, report, done))
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

    async def _put(self, op: _Op) -> None:
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

    async def messages(self, conversation_id: str, *, limit: int = 1000) -> list[MessageRecord]:
        """The latest `limit` messages, oldest first (by turn, user before assistant)."""
        if limit <= 0:
            return []
        return await self._query(SELECT_MESSAGES, (conversation_id, limit), records)

    async def history(self, conversation_id: str, turns: int) -> list[tuple[str, str]]:
        """The last `turns` answered turns as [(role, content)], oldest first.

        A turn counts when its assistant message has text, whatever its status (an
        `incomplete` or `cancelled` answer keeps the text the user saw). A turn without one
        (an empty error, or still running) is left out whole, user message included, so the
        result always alternates user/assistant as providers require.
        """
        if turns <= 0:
            return []
        return await self._query(SELECT_HISTORY, (conversation_id, turns), history)

    async def conversation_exists(self, conversation_id: str) -> bool:
        return await self._query(SELECT_EXISTS, (conversation_id,), bool)

    async def _query(self, sql: str, args: tuple[Any, ...], convert: Callable[[Any], _T]) -> _T:
        """Run one SELECT on the reader thread, after the writes queued before it; `convert`
        its rows there too."""
        loop = self._check_open()
        await self.flush(report=False)

        def run() -> _T:
            assert self._rconn is not None
            return convert(self._rconn.execute(sql, args).fetchall())

        return await loop.run_in_executor(self._reader, run)

    def _open_reader(self) -> None:
        uri = Path(self._path).resolve().as_uri() + "?mode=ro"
        self._rconn = sqlite3.connect(uri, uri=True)

    def _run(self, ready: asyncio.Future[None]) -> None:
        try:
            conn = self._connect_writer()
        except Exception as exc:
            self._settle([(ready, None, exc)])
            return
        self._settle([(ready, None, None)])
        stopped: _Future = None
        try:
            while stopped is None:
                try:  # while unhealthy, probe between ops: recovery needs no traffic
                    ops = [self._queue.get(timeout=None if self._healthy else PROBE_INTERVAL)]
                except queue.Empty:
                    self._probe(conn)
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
                stopped = self._write_batch(conn, ops)
        finally:
            if self._retry:
                _log.error("store: closed with %d messages it could not write", len(self._retry))
            conn.close()
            self._settle([(stopped, None, None)])

    def _connect_writer(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, isolation_level=None)  # explicit BEGIN/COMMIT
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:  # before anything writes to a newer lean's file
                raise StoreError(
                    f"{self._path} has schema version {version}, from a newer lean; "
                    f"this one knows up to {SCHEMA_VERSION}"
                )
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":  # reads beside writes need WAL
                raise StoreError(f"{self._path}: journal_mode WAL refused ({mode})")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=5000")
            schema = MIGRATIONS[version]
            # Always a real write (the header's user_version), so a file lean cannot write
            # to stops start-up here rather than failing the first answer.
            conn.executescript(
                f"BEGIN IMMEDIATE; {schema} {END_STREAMING};"
                f" PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
            )
        except BaseException:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            conn.close()
            raise
        return conn

    def _probe(self, conn: sqlite3.Connection) -> None:
        """One real write, to see whether the store can write again (writer thread)."""
        try:
            conn.execute("BEGIN IMMEDIATE")
            self._write_retries(conn)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except sqlite3.Error:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            return
        self._retry.clear()
        self._set_health(None)

    def _write_retries(self, conn: sqlite3.Connection) -> None:
        """Final saves that failed with their batch, first in the next transaction; they
        are forgotten once it commits."""
        for kind, args in self._retry:
            if kind == _SAVE:
                conn.execute(INSERT_MESSAGE, args)
            else:
                begin_turn(conn, *args)

    def _set_health(self, exc: Exception | None) -> None:
        """Writer thread: tell the loop when the store starts or stops being writable."""
        healthy = exc is None
        if healthy == self._healthy:
            return
        self._healthy = healthy
        if healthy:
            _log.warning("store: writing again; /readyz is ready")
        else:
            _log.error("store: cannot write (%s); /readyz fails until a write succeeds", exc)
        self._call(self._health_changed, healthy, None if exc is None else str(exc))

    def _health_changed(self, healthy: bool, error: str | None) -> None:
        self.writable, self.error = healthy, error

    def _count_failures(self, failed: dict[str, int]) -> None:
        if self._on_failure is not None and failed:
            self._call(_report_failures, self._on_failure, failed)

    def _write_batch(self, conn: sqlite3.Connection, ops: list[_Op]) -> _Future:
        """Write `ops` in one transaction; return the STOP op's future if there was one."""
        settled: _Settled = []
        stop: _Future = None
        failed: dict[str, int] = {}
        writes = False
        try:
            conn.execute("BEGIN IMMEDIATE")
            self._write_retries(conn)
            for kind, args, fut in ops:
                if kind == _SAVE:
                    writes = True
                    try:
                        conn.execute(INSERT_MESSAGE, args)
                        settled.append((fut, None, None))
                    except Exception as exc:
                        self._op_failed(conn, exc, f"saving message {args[0]!r}")
                        failed["save"] = failed.get("save", 0) + 1
                        if fut is None:
                            self._save_failed(exc)
                        else:
                            settled.append((fut, None, exc))
                elif kind == _TURN:
                    writes = True
                    try:
                        settled.append((fut, begin_turn(conn, *args), None))
                    except Exception as exc:
                        self._op_failed(conn, exc, f"begin_turn in {args[0]!r}")
                        failed["turn"] = failed.get("turn", 0) + 1
                        settled.append((fut, None, exc))
                elif kind == _PROGRESS:
                    writes = True
                    try:
                        conn.executemany(UPDATE_STREAMING, args)
                    except Exception as exc:
                        self._op_failed(conn, exc, f"saving the progress of {len(args)} answers")
                        failed["progress"] = failed.get("progress", 0) + len(args)
                elif kind == _FLUSH:
                    settled.append((fut, None, self._take_failures() if args else None))
                else:
                    stop = fut
            conn.execute("COMMIT")
            if writes:
                self._set_health(None)
            self._retry.clear()
        except Exception as exc:  # nothing of the batch was written
            if isinstance(exc, sqlite3.Error):  # a full disk, a read-only file: no traceback
                _log.error("store: a batch of %d writes failed: %s", len(ops), exc)
            else:
                _log.exception("store: a batch of %d writes failed", len(ops))
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            self._set_health(exc)
            settled, unreported, failed = [], False, {}
            for kind, op_args, fut in ops:
                if kind == _STOP:
                    stop = fut
                    continue
                if kind in _OP_NAMES:
                    name = _OP_NAMES[kind]
                    failed[name] = failed.get(name, 0) + (len(op_args) if kind == _PROGRESS else 1)
                if (kind == _SAVE and fut is not None) or (kind == _TURN and fut is None):
                    self._retry.append((kind, op_args))  # see RETRY_MAX
                if kind in (_SAVE, _PROGRESS) and fut is None:
                    unreported = unreported or kind == _SAVE
                else:
                    settled.append((fut, None, exc))
                    if kind == _FLUSH and op_args:  # a reporting flush told of it
                        self._failed, self._failed_more = None, 0
                        unreported = False
            if unreported:  # saves after the batch's last flush: tell the next one
                self._save_failed(exc)
        self._count_failures(failed)
        self._settle(settled)
        return stop

    @staticmethod
    def _op_failed(conn: sqlite3.Connection, exc: Exception, what: str) -> None:
        if not conn.in_transaction:  # SQLite rolled the whole transaction back
            raise exc
        _log.error("store: %s failed: %s", what, exc)  # only this statement was undone

    def _save_failed(self, exc: Exception) -> None:
        # The first failure and a count: saves that fail while nobody flushes hold no memory.
        if self._failed is None:
            self._failed = exc
        else:
            self._failed_more += 1

    def _take_failures(self) -> Exception | None:
        first, more = self._failed, self._failed_more
        if first is None:
            return None
        self._failed, self._failed_more = None, 0
        if more:
            first.add_note(f"and {more} more saves failed since the previous flush")
        return first

    def _settle(self, settled: _Settled) -> None:
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


def _settle_all(settled: _Settled) -> None:
    for fut, result, exc in settled:
        if fut is None or fut.done():  # no one waits, or its awaiter was cancelled
            continue
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)
