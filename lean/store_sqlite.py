"""The store on SQLite, lean's embedded default: one file, nothing else to run.

- The writer's connection runs in WAL mode (reads beside writes) with synchronous=NORMAL: it
  may lose the last commits on power loss, never on a process crash. Readers open the file
  read-only on their own connection.
- `connect_writer` refuses a newer lean's schema before writing anything, runs the
  migration steps the file lacks (messages.MIGRATIONS), marks answers left `streaming` by a
  killed lean `incomplete`, and always makes one real write (the header's user_version), so
  a file lean cannot write to stops start-up rather than failing the first answer. All of it
  is one transaction.
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
        pass  # one writer per file: turns are allocated in queue order

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

    def connect_writer(self) -> SqliteWriter:
        return SqliteWriter(self._connect())

    def connect_reader(self) -> SqliteReader:
        return SqliteReader(self.path)

    def _connect(self) -> sqlite3.Connection:
        path = self.path
        conn = sqlite3.connect(path, isolation_level=None)  # explicit BEGIN/COMMIT
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:  # before anything writes to a newer lean's file
                raise StoreError(
                    f"{path} has schema version {version}, from a newer lean; "
                    f"this one knows up to {SCHEMA_VERSION}"
                )
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":  # reads beside writes need WAL
                raise StoreError(f"{path}: journal_mode WAL refused ({mode})")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            steps = "".join(MIGRATIONS[version:])
            # Always a real write (the header's user_version), so a file lean cannot write
            # to stops start-up here rather than failing the first answer.
            conn.executescript(
                f"BEGIN IMMEDIATE; {steps} {END_STREAMING};"
                f" PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
            )
        except BaseException:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            conn.close()
            raise
        return conn
