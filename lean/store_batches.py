"""What the store's writer thread does to the database: open it, write batches, probe.

`lean.store` owns the threads, the queue and the loop; this module owns the write
connection's work, with no asyncio in it: a batch of ops goes in, and out come the futures
to settle (with their results or errors), the failures to count and, when it changed,
whether the store can write. It runs on the writer thread only.

- `connect` opens the write connection: it refuses a newer lean's schema before writing
  anything, migrates an older one, marks answers left `streaming` by a killed lean
  `incomplete`, and always makes one real write, so a file lean cannot write to stops
  start-up rather than failing the first answer. The sweep touches only the rows of the
  instance opening the file (and rows from before instances were recorded): other lean
  processes sharing the file keep their running answers. Those processes each write through
  their own connection; SQLite serialises the commits (BEGIN IMMEDIATE, `BUSY_TIMEOUT_MS`).
- `Batches.write` commits a batch as ONE transaction. A statement that fails alone is
  undone alone (its op fails, the rest commit); a batch that cannot commit (a full disk, a
  file that became read-only) writes nothing, clears `healthy`, and keeps its final saves
  and first turns (`RETRY_MAX`) for the next commit that succeeds. `Batches.probe` is that
  commit when no traffic comes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import sqlite3
from typing import Any

from lean.messages import (
    END_STREAMING,
    INSERT_MESSAGE,
    MIGRATIONS,
    SCHEMA_VERSION,
    UPDATE_STREAMING,
    begin_turn,
)

_log = logging.getLogger("lean.store")

# Ops travel as (kind, args, future); the future is None when nobody waits for the op.
SAVE, TURN, PROGRESS, FLUSH, STOP = range(5)
# What the store's `on_failure` is told failed, by op kind.
OP_NAMES = {SAVE: "save", TURN: "turn", PROGRESS: "progress"}
Future = asyncio.Future[Any] | None
Op = tuple[int, Any, Future]
Settled = list[tuple[Future, Any, BaseException | None]]

# Writes kept for another try after their batch could not be committed (a full disk): final
# saves (their `done` said `saved: false`) and new conversations' first turns (their run had
# already started). Each holds one message (a few KB), so 1,000 is a few MB at most; past it
# the oldest is dropped, as it was reported. Written first in the next commit.
RETRY_MAX = 1000


class StoreError(Exception):
    """The database file cannot be used by this lean (a newer schema, WAL refused)."""


# How long a commit waits for another process's write transaction on the same file (lean
# instances sharing it) before failing: a batch commits in well under a millisecond, so
# only a stuck writer (a long `sqlite3` shell transaction) gets anywhere near it.
BUSY_TIMEOUT_MS = 5000


def connect(path: str, instance: str | None = None) -> sqlite3.Connection:
    """The write connection, the schema made current and `instance`'s `streaming` rows
    ended (see the module's docstring)."""
    conn = sqlite3.connect(path, isolation_level=None)  # explicit BEGIN/COMMIT
    try:
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        _check_version(conn, path)  # before anything writes to a newer lean's file
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":  # reads beside writes need WAL
            raise StoreError(f"{path}: journal_mode WAL refused ({mode})")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("BEGIN IMMEDIATE")
        # Read again under the write lock: instances starting at once on one file migrate
        # it once, the first; the others find it current.
        version = _check_version(conn, path)
        # Statement by statement, not executescript (which would commit first): the
        # migration, the sweep and the version are one transaction.
        for statement in MIGRATIONS[version].split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute(END_STREAMING, (instance,))
        # Always a real write (the header's user_version), so a file lean cannot write
        # to stops start-up here rather than failing the first answer.
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        conn.close()
        raise
    return conn


def _check_version(conn: sqlite3.Connection, path: str) -> int:
    version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{path} has schema version {version}, from a newer lean; "
            f"this one knows up to {SCHEMA_VERSION}"
        )
    return version


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
        self._failed: Exception | None = None
        self._failed_more = 0

    def probe(self, conn: sqlite3.Connection) -> Outcome:
        """One real write, to see whether the store can write again."""
        outcome = Outcome()
        try:
            conn.execute("BEGIN IMMEDIATE")
            self._write_retries(conn)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except sqlite3.Error:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            return outcome
        self.retry.clear()
        self._set_health(outcome, None)
        return outcome

    def write(self, conn: sqlite3.Connection, ops: list[Op]) -> Outcome:
        """Write `ops` in one transaction."""
        outcome = Outcome()
        settled, failed = outcome.settled, outcome.failed
        writes = False
        try:
            conn.execute("BEGIN IMMEDIATE")
            self._write_retries(conn)
            for kind, args, fut in ops:
                if kind == SAVE:
                    writes = True
                    try:
                        conn.execute(INSERT_MESSAGE, args)
                        settled.append((fut, None, None))
                    except Exception as exc:
                        _op_failed(conn, exc, f"saving message {args[0]!r}")
                        failed["save"] = failed.get("save", 0) + 1
                        if fut is None:
                            self._save_failed(exc)
                        else:
                            settled.append((fut, None, exc))
                elif kind == TURN:
                    writes = True
                    try:
                        settled.append((fut, begin_turn(conn, *args), None))
                    except Exception as exc:
                        _op_failed(conn, exc, f"begin_turn in {args[0]!r}")
                        failed["turn"] = failed.get("turn", 0) + 1
                        settled.append((fut, None, exc))
                elif kind == PROGRESS:
                    writes = True
                    try:
                        conn.executemany(UPDATE_STREAMING, args)
                    except Exception as exc:
                        _op_failed(conn, exc, f"saving the progress of {len(args)} answers")
                        failed["progress"] = failed.get("progress", 0) + len(args)
                elif kind == FLUSH:
                    settled.append((fut, None, self._take_failures() if args else None))
                else:
                    outcome.stop = fut
            conn.execute("COMMIT")
            if writes:
                self._set_health(outcome, None)
            self.retry.clear()
        except Exception as exc:  # nothing of the batch was written
            self._batch_failed(conn, ops, exc, outcome)
        return outcome

    def _batch_failed(
        self, conn: sqlite3.Connection, ops: list[Op], exc: Exception, outcome: Outcome
    ) -> None:
        if isinstance(exc, sqlite3.Error):  # a full disk, a read-only file: no traceback
            _log.error("store: a batch of %d writes failed: %s", len(ops), exc)
        else:
            _log.exception("store: a batch of %d writes failed", len(ops))
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        self._set_health(outcome, exc)
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
                settled.append((fut, None, exc))
                if kind == FLUSH and op_args:  # a reporting flush told of it
                    self._failed, self._failed_more = None, 0
                    unreported = False
        if unreported:  # saves after the batch's last flush: tell the next one
            self._save_failed(exc)

    def _write_retries(self, conn: sqlite3.Connection) -> None:
        """Final saves that failed with their batch, first in the next transaction; they
        are forgotten once it commits."""
        for kind, args in self.retry:
            if kind == SAVE:
                conn.execute(INSERT_MESSAGE, args)
            else:
                begin_turn(conn, *args)

    def _set_health(self, outcome: Outcome, exc: Exception | None) -> None:
        healthy = exc is None
        if healthy == self.healthy:
            return
        self.healthy = healthy
        if healthy:
            _log.warning("store: writing again; /readyz is ready")
        else:
            _log.error("store: cannot write (%s); /readyz fails until a write succeeds", exc)
        outcome.health_changed = True
        outcome.error = None if exc is None else str(exc)

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


def _op_failed(conn: sqlite3.Connection, exc: Exception, what: str) -> None:
    if not conn.in_transaction:  # SQLite rolled the whole transaction back
        raise exc
    _log.error("store: %s failed: %s", what, exc)  # only this statement was undone
