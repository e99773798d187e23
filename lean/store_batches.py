"""What the store's writer thread does to the database: write batches, probe, report.

`lean.store` owns the threads, the queue and the loop; a backend (`lean.store_sqlite`,
`lean.store_pg`) owns a database's connections, SQL and schema, behind the `Writer` and
`Backend` protocols below; this module owns what a batch means, with no asyncio and no
driver in it: a batch of ops goes in, and out come the futures to settle (with their
results or errors), the failures to count and, when it changed, whether the store can write.
It runs on the writer thread only.

- `Batches.write` commits a batch as ONE transaction. A statement that fails alone is
  undone alone (its op fails, the rest commit); a batch that cannot commit (a full disk, a
  file that became read-only, a database that went away) writes nothing, clears `healthy`,
  and keeps its final saves and first turns (`RETRY_MAX`) for the next commit that
  succeeds. `Batches.probe` is that commit when no traffic comes.
- A write's failure reaches its caller as `StoreWriteError` (the driver's error its cause),
  whichever the database.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any, Protocol

_log = logging.getLogger("lean.store")

# Ops travel as (kind, args, future); the future is None when nobody waits for the op.
SAVE, TURN, PROGRESS, FLUSH, STOP, RESPONSE, ENDED = range(7)
# What the store's `on_failure` is told failed, by op kind.
OP_NAMES = {
    SAVE: "save",
    TURN: "turn",
    PROGRESS: "progress",
    RESPONSE: "response",
    ENDED: "ended",
}
Future = asyncio.Future[Any] | None
Op = tuple[int, Any, Future]
Settled = list[tuple[Future, Any, BaseException | None]]
Rows = list[tuple[Any, ...]]

# Writes kept for another try after their batch could not be committed (a full disk): final
# saves (their `done` said `saved: false`) and new conversations' first turns (their run had
# already started). Each holds one message (a few KB), so 1,000 is a few MB at most; past it
# the oldest is dropped, as it was reported. Written first in the next commit.
RETRY_MAX = 1000


class StoreError(Exception):
    """The database cannot be used by this lean (a newer schema, WAL refused, unreachable)."""


class StoreWriteError(Exception):
    """A write failed (its cause is the driver's error); the store goes on serving."""


class StoreReadError(Exception):
    """A read failed (a database that went away); its cause is the driver's error."""


class Replay(Exception):
    """Raised by `Writer.op_failed`: the failed op took the transaction with it; write the
    batch again with each op isolated (`Writer.begin(isolate=True)`)."""


class Writer(Protocol):
    """The writer thread's connection to one database."""

    # The driver's errors: a batch failing with one is logged without a traceback.
    errors: tuple[type[Exception], ...]

    def begin(self, *, isolate: bool = False) -> None:
        """Start the batch's transaction; with `isolate`, each op undoes itself on failure."""

    def commit(self) -> None: ...

    def rollback(self) -> None:
        """End a failed transaction, whatever state it is in; never raises."""

    def lock_turns(self, cids: list[str]) -> None:
        """Before a batch's turns: keep other writers of the database from allocating
        turns in these conversations until the transaction ends (a no-op for one writer)."""

    def save(self, row: list[Any]) -> None:
        """Upsert one message row (messages.INSERT_MESSAGE)."""

    def turn(
        self, cid: str, scene: str, content: str, at: str, prompt: str | None, client: str | None
    ) -> int:
        """Write the user message of the conversation's next turn, owned by `client`; its
        number, or 0, writing nothing, when another client owns the conversation (the check
        and the allocation are one step: no other write comes between them)."""

    def progress(self, rows: list[tuple[str, str, str]]) -> None:
        """Running answers' text, as (content, reasoning, message_id), one batched op."""

    def response(self, row: tuple[Any, ...]) -> None:
        """Insert one saved Responses answer (saved_responses.INSERT_RESPONSE)."""

    def end_streaming(self, instance: str) -> None:
        """A dead instance's answers still `streaming` become `incomplete` (END_STREAMING)."""

    def touch(self) -> None:
        """One real write (the probe's), inside the transaction."""

    def op_failed(self, exc: Exception) -> None:
        """After an op raised `exc`: return when only that op was undone (the batch goes
        on); raise `Replay`, or `exc`, when the transaction is lost."""

    def close(self) -> None: ...


class Reader(Protocol):
    """The reader thread's connection: one SELECT at a time (SQL in messages.py's `?` style)."""

    def query(self, sql: str, args: tuple[Any, ...]) -> Rows: ...

    def close(self) -> None: ...


class Backend(Protocol):
    """One database: opens the writer (schema made current, one real write) and readers."""

    errors: tuple[type[Exception], ...]  # the driver's errors
    key: str  # the [store] key that names it: "path" or "url"
    shown: str  # its name for logs and errors (a URL without its password)
    expected: str  # what that key must name, for the config error when opening fails

    def connect_writer(self, instance: str | None = None) -> Writer:
        """Raise `StoreError` (or the driver's error) when the database cannot be used.
        Answers `instance` left `streaming` (it was killed) are ended at open; other
        instances' are theirs (messages.END_STREAMING)."""

    def connect_reader(self) -> Reader: ...


class Outcome:
    """What one batch or probe did: futures to settle, failures by op name, and the store's
    new health when it changed (`health_changed`; `error` says why it cannot write)."""

    __slots__ = ("error", "failed", "health_changed", "settled", "stop")

    def __init__(self) -> None:
        self.settled: Settled = []
        self.stop: Future = None
        self.failed: dict[str, int] = {}
        self.health_changed = False
        self.error: str | None = None


class Batches:
    def __init__(self) -> None:
        self.healthy = True
        self.retry: collections.deque[tuple[int, Any]] = collections.deque(maxlen=RETRY_MAX)
        # The first save nobody awaited that failed since a reporting flush, and how many more.
        self._failed: StoreWriteError | None = None
        self._failed_more = 0

    def probe(self, conn: Writer) -> Outcome:
        """One real write, to see whether the store can write again."""
        outcome = Outcome()
        try:
            conn.begin()
            conn.lock_turns(sorted({args[0] for kind, args in self.retry if kind == TURN}))
            self._write_retries(conn)
            conn.touch()
            conn.commit()
        except Exception:
            conn.rollback()
            return outcome
        self.retry.clear()
        self._set_health(outcome, None)
        return outcome

    def write(self, conn: Writer, ops: list[Op]) -> Outcome:
        """Write `ops` in one transaction."""
        try:
            return self._write(conn, ops, isolate=False)
        except Replay:  # an op failed and took the transaction with it: again, op by op
            conn.rollback()
            return self._write(conn, ops, isolate=True)

    def _write(self, conn: Writer, ops: list[Op], *, isolate: bool) -> Outcome:
        outcome = Outcome()
        settled, failed = outcome.settled, outcome.failed
        writes = False
        try:
            conn.begin(isolate=isolate)
            turns = {args[0] for kind, args in self.retry if kind == TURN}
            conn.lock_turns(sorted(turns.union(args[0] for kind, args, _ in ops if kind == TURN)))
            self._write_retries(conn)
            for kind, args, fut in ops:
                if kind == SAVE:
                    writes = True
                    try:
                        conn.save(args)
                        settled.append((fut, None, None))
                    except Exception as exc:
                        error = _op_failed(conn, exc, f"saving message {args[0]!r}")
                        failed["save"] = failed.get("save", 0) + 1
                        if fut is None:
                            self._save_failed(error)
                        else:
                            settled.append((fut, None, error))
                elif kind == TURN:
                    writes = True
                    try:
                        settled.append((fut, conn.turn(*args), None))
                    except Exception as exc:
                        error = _op_failed(conn, exc, f"begin_turn in {args[0]!r}")
                        failed["turn"] = failed.get("turn", 0) + 1
                        settled.append((fut, None, error))
                elif kind == PROGRESS:
                    writes = True
                    try:
                        conn.progress(args)
                    except Exception as exc:
                        _op_failed(conn, exc, f"saving the progress of {len(args)} answers")
                        failed["progress"] = failed.get("progress", 0) + len(args)
                elif kind == RESPONSE:  # a saved Responses answer (lean.saved_responses)
                    writes = True
                    try:
                        conn.response(args)
                    except Exception as exc:
                        _op_failed(conn, exc, f"saving response {args[0]!r}")
                        failed["response"] = failed.get("response", 0) + 1
                elif kind == ENDED:  # a dead instance's cut answers (lean.cluster)
                    writes = True
                    try:
                        conn.end_streaming(args)
                        settled.append((fut, None, None))
                    except Exception as exc:
                        error = _op_failed(conn, exc, f"ending the answers of {args!r}")
                        failed["ended"] = failed.get("ended", 0) + 1
                        settled.append((fut, None, error))
                elif kind == FLUSH:
                    settled.append((fut, None, self._take_failures() if args else None))
                else:
                    outcome.stop = fut
            conn.commit()
            if writes:
                self._set_health(outcome, None)
            self.retry.clear()
        except Replay:
            raise
        except Exception as exc:  # nothing of the batch was written
            self._batch_failed(conn, ops, exc, outcome)
        return outcome

    def _batch_failed(self, conn: Writer, ops: list[Op], exc: Exception, outcome: Outcome) -> None:
        if isinstance(exc, conn.errors):  # a full disk, a read-only file: no traceback
            _log.error("store: a batch of %d writes failed: %s", len(ops), _first_line(exc))
        else:
            _log.exception("store: a batch of %d writes failed", len(ops))
        conn.rollback()
        self._set_health(outcome, exc)
        error = _retyped(exc)
        outcome.settled, outcome.failed = [], {}
        settled, failed = outcome.settled, outcome.failed
        unreported = False
        for kind, op_args, fut in ops:
            if kind == STOP:
                outcome.stop = fut
                continue
            if kind in OP_NAMES:
                name = OP_NAMES[kind]
                failed[name] = failed.get(name, 0) + (len(op_args) if kind == PROGRESS else 1)
            if (kind == SAVE and fut is not None) or (kind == TURN and fut is None):
                self.retry.append((kind, op_args))  # see RETRY_MAX
            if kind in (SAVE, PROGRESS) and fut is None:
                unreported = unreported or kind == SAVE
            else:
                settled.append((fut, None, error))
                if kind == FLUSH and op_args:  # a reporting flush told of it
                    self._failed, self._failed_more = None, 0
                    unreported = False
        if unreported:  # saves after the batch's last flush: tell the next one
            self._save_failed(error)

    def _write_retries(self, conn: Writer) -> None:
        """Final saves that failed with their batch, first in the next transaction; they
        are forgotten once it commits."""
        for kind, args in self.retry:
            if kind == SAVE:
                conn.save(args)
            else:
                conn.turn(*args)

    def _set_health(self, outcome: Outcome, exc: Exception | None) -> None:
        healthy = exc is None
        if healthy == self.healthy:
            return
        self.healthy = healthy
        if healthy:
            _log.warning("store: writing again; /readyz is ready")
        else:
            error = _first_line(exc)
            _log.error("store: cannot write (%s); /readyz fails until a write succeeds", error)
        outcome.health_changed = True
        outcome.error = None if exc is None else _first_line(exc)

    def _save_failed(self, exc: StoreWriteError) -> None:
        # The first failure and a count: saves that fail while nobody flushes hold no memory.
        if self._failed is None:
            self._failed = exc
        else:
            self._failed_more += 1

    def _take_failures(self) -> StoreWriteError | None:
        first, more = self._failed, self._failed_more
        if first is None:
            return None
        self._failed, self._failed_more = None, 0
        if more:
            first.add_note(f"and {more} more saves failed since the previous flush")
        return first


def _op_failed(conn: Writer, exc: Exception, what: str) -> StoreWriteError:
    """An op's failure, re-typed for its caller; raises when the transaction went with it."""
    conn.op_failed(exc)  # raises unless only this op was undone
    _log.error("store: %s failed: %s", what, _first_line(exc))
    return _retyped(exc)


def _retyped(exc: Exception) -> StoreWriteError:
    error = StoreWriteError(_first_line(exc))
    error.__cause__ = exc
    return error


def _first_line(exc: BaseException | None) -> str:
    """What went wrong, without PostgreSQL's DETAIL lines (they quote the row: a message's
    text has no place in the log)."""
    return str(exc).partition("\n")[0] or type(exc).__name__
