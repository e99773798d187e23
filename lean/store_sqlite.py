"""The store on SQLite, lean's embedded default: one file, nothing else to run.

- The writer's connection runs in WAL mode (reads beside writes) with synchronous=NORMAL: it
  may lose the last commits on power loss, never on a process crash. Readers open the file
  read-only on their own connection.
- `connect_writer` refuses a newer lean's schema before writing anything, runs the
  migration steps the file lacks (messages.MIGRATIONS), marks answers left `streaming` by
  this instance when it was killed `incomplete`, and always makes one real write (the
  header's user_version), so a file lean cannot write to stops start-up rather than failing
  the first answer. All of it is one transaction, under the file's write lock with the
  version read again inside it: instances starting together on one file migrate it once.
- Several lean processes may share the file (docs/deploy.md "More than one instance"): each
  writes through its own connection, SQLite serialises the commits (BEGIN IMMEDIATE,
  `BUSY_TIMEOUT_MS`), and the sweep at open touches only the opening instance's rows (and
  rows from before instances were recorded), never another's running answers.
- A statement that fails alone (a CHECK) is undone alone by SQLite; the transaction goes on.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any

from lean.messages import (
    END_STREAMING,
    INSERT_MESSAGE,
    LAST_TURN,
    MIGRATIONS,
    SCHEMA_VERSION,
    UPDATE_STREAMING,
    next_turn,
    user_row,
)
from lean.saved_responses import INSERT_RESPONSE
from lean.store_batches import Rows, StoreError

__all__ = ["SqliteBackend"]

# Milliseconds a write waits for another process's lock on the file before it fails.
BUSY_TIMEOUT_MS = 5000


class SqliteWriter:
    errors: tuple[type[Exception], ...] = (sqlite3.Error,)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def begin(self, *, isolate: bool = False) -> None:
        self.conn.execute("BEGIN IMMEDIATE")  # SQLite undoes a failed statement alone anyway

    def commit(self) -> None:
        self.conn.execute("COMMIT")

    def rollback(self) -> None:
        if self.conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("ROLLBACK")

    def lock_turns(self, cids: list[str]) -> None:
        pass  # BEGIN IMMEDIATE took the file's write lock: one writer allocates at a time

    def save(self, row: list[Any]) -> None:
        self.conn.execute(INSERT_MESSAGE, row)

    def turn(
        self, cid: str, scene: str, content: str, at: str, prompt: str | None, client: str | None
    ) -> int:
        turn = next_turn(self.conn.execute(LAST_TURN, (cid,)).fetchone(), client)
        if turn:
            row = user_row(cid, scene, content, at, prompt, turn, client)
            self.conn.execute(INSERT_MESSAGE, row)
        return turn

    def progress(self, rows: list[tuple[str, str, str]]) -> None:
        self.conn.executemany(UPDATE_STREAMING, rows)

    def response(self, row: tuple[Any, ...]) -> None:
        self.conn.execute(INSERT_RESPONSE, row)

    def end_streaming(self, instance: str) -> None:
        self.conn.execute(END_STREAMING, (instance,))

    def touch(self) -> None:
        self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def op_failed(self, exc: Exception) -> None:
        if not self.conn.in_transaction:  # SQLite rolled the whole transaction back
            raise exc

    def close(self) -> None:
        self.conn.close()


class SqliteReader:
    def __init__(self, path: str) -> None:
        uri = Path(path).resolve().as_uri() + "?mode=ro"
        self.conn = sqlite3.connect(uri, uri=True)

    def query(self, sql: str, args: tuple[Any, ...]) -> Rows:
        return self.conn.execute(sql, args).fetchall()

    def close(self) -> None:
        self.conn.close()


class SqliteBackend:
    errors: tuple[type[Exception], ...] = (sqlite3.Error,)
    key = "path"
    expected = "a writable SQLite file"

    def __init__(self, path: str) -> None:
        self.path = self.shown = path

    def connect_writer(self, instance: str | None = None) -> SqliteWriter:
        return SqliteWriter(self._connect(instance))

    def connect_reader(self) -> SqliteReader:
        return SqliteReader(self.path)

    def _connect(self, instance: str | None) -> sqlite3.Connection:
        path = self.path
        conn = sqlite3.connect(path, isolation_level=None)  # explicit BEGIN/COMMIT
        try:
            # First: instances sharing the file wait for each other's locks from here on.
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            self._version(conn)  # before anything writes to a newer lean's file
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":  # reads beside writes need WAL
                raise StoreError(f"{path}: journal_mode WAL refused ({mode})")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("BEGIN IMMEDIATE")
            # Read again under the write lock: instances starting at once on one file
            # migrate it once, the first; the others find it current.
            version = self._version(conn)
            # Statement by statement, not executescript (which commits first, and takes no
            # parameters): the steps, the sweep and the version are one transaction.
            for statement in statements(MIGRATIONS[version:]):
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

    def _version(self, conn: sqlite3.Connection) -> int:
        version: int = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema version {version}, from a newer lean; "
                f"this one knows up to {SCHEMA_VERSION}"
            )
        return version


def statements(steps: list[str]) -> list[str]:
    """Migration steps as single statements: split at `;`, which a step uses only to end one
    (messages.MIGRATIONS: plain DDL, no string or trigger holding a `;`)."""
    return [part for step in steps for part in step.split(";") if part.strip()]
