"""The store on PostgreSQL (`[store] url`), for instances that share one database
(docs/protocol.md §7).

- psycopg 3, synchronous, on the store's writer and reader threads: the same front, queue and
  batches as SQLite, so the same guarantees; the event loop does no database work at all.
  bench/store_pg.py chose it over asyncpg and psycopg's async mode (docs/decisions.md).
- `connect_writer` makes the schema current inside ONE transaction that first takes a
  transaction-level advisory lock (`MIGRATION_LOCK`): instances starting together on an empty
  database wait for each other and the later ones find the schema current. The version lives
  in the table `lean_schema`; a newer one is refused before anything is written. The steps
  are messages.MIGRATIONS, the same SQL as SQLite's, with REAL read as DOUBLE PRECISION (8
  bytes, as SQLite's REAL). Answers this instance left `streaming` (it was killed) become
  `incomplete`, in the same transaction under the same lock; other instances' rows are
  theirs (messages.END_STREAMING). The transaction always writes, so a database lean cannot
  write to stops start-up.
- Turns: every conversation that gets a turn in a batch is locked first (an advisory lock per
  conversation, taken in one fixed order, so two instances' batches never deadlock): two
  instances never give one conversation the same turn.
- A failed statement aborts a PostgreSQL transaction, where SQLite undoes the statement
  alone; so the batch is written again with a savepoint around each op (`Replay`), which
  costs round trips only when an op fails.
- A connection that broke (a server restart, a network cut) fails its batch; the next batch
  or probe connects again. Reads reconnect and retry once.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import pq

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
from lean.store_batches import Replay, Rows, StoreError

__all__ = ["PgBackend", "redacted"]

_T = TypeVar("_T")

# Advisory lock keys (two 32-bit ints: lean's namespace, then the lock).
NAMESPACE = 0x6C65616E  # "lean"
MIGRATION_LOCK = 1
TURN_LOCKS = 0x6C65616F  # with hashtext(conversation_id): one lock per conversation

# A statement may wait this long for a lock held by another session before it fails (and its
# batch with it): a stuck peer shows as a store that cannot write, not as a silent queue.
LOCK_TIMEOUT_MS = 10_000
# Seconds a connection attempt may take: a database that is down fails start-up, or the probe.
CONNECT_TIMEOUT = 5
# TCP keepalives, so a database host that vanished without a reset (a network cut) fails the
# statement waiting on it within ~25 s, instead of holding the writer thread for the kernel's
# two hours; the store then reports it cannot write, and reconnects.
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
              "keepalives_count": 3}  # fmt: skip

# What a bad op alone raises (a CHECK, a NOT NULL, a value out of range): the op fails, the
# rest of its batch commits. Any other error of the server (a lock timeout, a full disk, a
# read-only server) fails the batch, so the store reports it cannot write and retries.
OP_ERRORS = (psycopg.errors.IntegrityError, psycopg.errors.DataError)

SCHEMA_TABLE = "CREATE TABLE IF NOT EXISTS lean_schema (version INTEGER NOT NULL)"
TOUCH = "UPDATE lean_schema SET version = version"
LOCK_TURNS = (
    f"SELECT count(pg_advisory_xact_lock({TURN_LOCKS}, k)) FROM"
    " (SELECT DISTINCT hashtext(c) AS k FROM unnest(%s::text[]) AS c ORDER BY k) AS keys"
)


def placeholders(sql: str) -> str:
    """messages.py's `?` placeholders as psycopg's `%s`."""
    if "%" in sql:
        raise RuntimeError(f"a literal % in store SQL needs escaping for psycopg: {sql}")
    return sql.replace("?", "%s")


def migration(sql: str) -> str:
    """A plain-SQL schema step as PostgreSQL runs it: REAL is 4 bytes there, 8 in SQLite."""
    return re.sub(r"\bREAL\b", "DOUBLE PRECISION", sql)


def redacted(url: str) -> str:
    """The URL without its password, for logs and errors."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = netloc.replace(":" + parts.password + "@", ":***@", 1)
    query = re.sub(r"(?i)(password=)[^&]*", r"\1***", parts.query)
    return urlunsplit(parts._replace(netloc=netloc, query=query))


_INSERT = placeholders(INSERT_MESSAGE)
_LAST_TURN = placeholders(LAST_TURN)
_UPDATE_STREAMING = placeholders(UPDATE_STREAMING)
_INSERT_RESPONSE = placeholders(INSERT_RESPONSE)
_END_STREAMING = placeholders(END_STREAMING)


class PgWriter:
    errors: tuple[type[Exception], ...] = (psycopg.Error,)

    def __init__(self, backend: PgBackend, conn: psycopg.Connection[Any]) -> None:
        self._backend = backend
        self.conn = conn
        self._isolate = False
        # Saves not yet sent, written with one executemany (pipelined: one round trip, not
        # one each, which under a busy loop also means one wait for the GIL, not one each)
        # before the batch's next statement. Only outside `isolate`.
        self._saves: list[list[Any]] = []

    def begin(self, *, isolate: bool = False) -> None:
        if self.conn.closed or self.conn.broken:
            self.conn.close()
            self.conn = self._backend.connect()  # fails this batch if it cannot
        self._isolate = isolate
        self._saves.clear()
        self.conn.execute("BEGIN")

    def commit(self) -> None:
        self._send_saves()
        self.conn.execute("COMMIT")

    def rollback(self) -> None:
        self._saves.clear()
        if self.conn.broken or self.conn.closed:
            return
        if self.conn.info.transaction_status != pq.TransactionStatus.IDLE:
            try:
                self.conn.execute("ROLLBACK")
            except psycopg.Error:
                self.conn.close()  # the next batch connects again

    def lock_turns(self, cids: list[str]) -> None:
        if cids:
            self.conn.execute(LOCK_TURNS, (cids,))

    def save(self, row: list[Any]) -> None:
        if not self._isolate:
            self._saves.append(row)
            return

        def write() -> None:
            self.conn.execute(_INSERT, row)

        self._op(write)

    def _send_saves(self) -> None:
        if not self._saves:
            return
        rows, self._saves = self._saves, []
        try:
            with self.conn.cursor() as cur:
                cur.executemany(_INSERT, rows)
        except OP_ERRORS as exc:  # which save it was, the replay finds out
            raise Replay from exc

    def turn(
        self, cid: str, scene: str, content: str, at: str, prompt: str | None, client: str | None
    ) -> int:
        self._send_saves()

        def write() -> int:
            turn = next_turn(self.conn.execute(_LAST_TURN, (cid,)).fetchone(), client)
            if turn:
                row = user_row(cid, scene, content, at, prompt, turn, client)
                self.conn.execute(_INSERT, row)
            return turn

        return self._op(write)

    def progress(self, rows: list[tuple[str, str, str]]) -> None:
        self._send_saves()

        def write() -> None:
            with self.conn.cursor() as cur:
                cur.executemany(_UPDATE_STREAMING, rows)  # pipelined: one round trip

        self._op(write)

    def response(self, row: tuple[Any, ...]) -> None:
        self._send_saves()

        def write() -> None:
            self.conn.execute(_INSERT_RESPONSE, row)

        self._op(write)

    def end_streaming(self, instance: str) -> None:
        self._send_saves()
        self._op(lambda: self.conn.execute(_END_STREAMING, (instance,)))

    def touch(self) -> None:
        self._send_saves()
        self.conn.execute(TOUCH)

    def op_failed(self, exc: Exception) -> None:
        if isinstance(exc, Replay):
            raise exc
        status = self.conn.info.transaction_status
        if self.conn.broken or status == pq.TransactionStatus.UNKNOWN:
            raise exc  # the connection is gone: so is the batch
        if isinstance(exc, psycopg.Error) and not isinstance(exc, OP_ERRORS):
            raise exc  # the database cannot write (see OP_ERRORS), whatever the op
        if status == pq.TransactionStatus.INERROR:
            if self._isolate:  # its savepoint could not be rolled back to
                raise exc
            raise Replay from exc

    def _op(self, write: Callable[[], _T]) -> _T:
        if not self._isolate:
            return write()
        self.conn.execute("SAVEPOINT op")
        try:
            result = write()
        except Exception:
            if not self.conn.broken:
                self.conn.execute("ROLLBACK TO SAVEPOINT op")
            raise
        self.conn.execute("RELEASE SAVEPOINT op")
        return result

    def close(self) -> None:
        self.conn.close()


class PgReader:
    def __init__(self, backend: PgBackend) -> None:
        self._backend = backend
        self.conn = backend.connect()
        self._sql: dict[str, str] = {}

    def query(self, sql: str, args: tuple[Any, ...]) -> Rows:
        pg = self._sql.get(sql)
        if pg is None:
            pg = self._sql[sql] = placeholders(sql)
        try:
            return self.conn.execute(pg, args).fetchall()
        except psycopg.OperationalError:
            if not (self.conn.broken or self.conn.closed):
                raise
        self.conn.close()  # a server restart or a network cut: once more, on a new connection
        self.conn = self._backend.connect()
        return self.conn.execute(pg, args).fetchall()

    def close(self) -> None:
        self.conn.close()


class PgBackend:
    errors: tuple[type[Exception], ...] = (psycopg.Error,)
    key = "url"
    expected = "a PostgreSQL database lean can reach and write to"

    def __init__(self, url: str) -> None:
        self.url = url
        self.shown = redacted(url)
        # KEEPALIVES unless the URL sets its own (a malformed URL fails at open, in one line)
        self._conninfo = url
        with contextlib.suppress(psycopg.Error):
            params = {**KEEPALIVES, **psycopg.conninfo.conninfo_to_dict(url)}
            self._conninfo = psycopg.conninfo.make_conninfo("", **params)

    def connect(self) -> psycopg.Connection[Any]:
        """A connection in autocommit mode: the writer sends its own BEGIN and COMMIT."""
        return psycopg.connect(
            self._conninfo,
            autocommit=True,
            connect_timeout=CONNECT_TIMEOUT,
            application_name="lean",
            options=f"-c lock_timeout={LOCK_TIMEOUT_MS}",
        )

    def connect_writer(self, instance: str | None = None) -> PgWriter:
        conn = self.connect()
        try:
            self._migrate(conn, instance)
        except BaseException:
            conn.close()
            raise
        return PgWriter(self, conn)

    def connect_reader(self) -> PgReader:
        return PgReader(self)

    def _migrate(self, conn: psycopg.Connection[Any], instance: str | None) -> None:
        with conn.transaction():
            conn.execute(f"SELECT pg_advisory_xact_lock({NAMESPACE}, {MIGRATION_LOCK})")
            # Created only when missing: CREATE ... IF NOT EXISTS would need the CREATE
            # privilege on every start, not only on the first.
            if conn.execute("SELECT to_regclass('lean_schema')").fetchone() == (None,):
                conn.execute(SCHEMA_TABLE)
            row = conn.execute("SELECT version FROM lean_schema").fetchone()
            version = 0 if row is None else int(row[0])
            if version > SCHEMA_VERSION:  # nothing was written: the lock and the table only
                raise StoreError(
                    f"{self.shown} has schema version {version}, from a newer lean; "
                    f"this one knows up to {SCHEMA_VERSION}"
                )
            if row is None:
                conn.execute("INSERT INTO lean_schema (version) VALUES (0)")
            for step in MIGRATIONS[version:]:
                conn.execute(migration(step))  # a plain-SQL script: the simple protocol
            # This instance's cut answers only, under the same lock: another instance
            # starting now waits, and its sweep is scoped to its own rows (docs/deploy.md).
            conn.execute(_END_STREAMING, (instance,))
            # Always a real write, so a database lean cannot write to stops start-up.
            conn.execute("UPDATE lean_schema SET version = %s", (SCHEMA_VERSION,))
