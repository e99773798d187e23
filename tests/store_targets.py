"""The databases the store tests run on: a SQLite file, and a real PostgreSQL database.

PostgreSQL: one database per test session, made with a random name on the server at
$LEAN_TEST_PG (default postgresql://postgres@127.0.0.1:5432/postgres, trust auth) and
dropped at the end; each test starts from an empty schema. Without a reachable server (or
without psycopg), the PostgreSQL half of the tests skips and says why.

A `Target` lets a test look at the database from the side, as another process would: count
rows, read or set the schema version, and hold a lock that keeps lean from writing.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ADMIN_URL = os.environ.get("LEAN_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
BACKENDS = ("sqlite", "postgresql")


def _pg_url(admin: str, name: str) -> str:
    base, _, _ = admin.rpartition("/")
    return f"{base}/{name}"


class PgServer:
    """The session's database on the test server, or why there is none."""

    def __init__(self) -> None:
        self.url = ""
        self.skip = ""
        self._name = ""
        try:
            import psycopg
        except ImportError:
            self.skip = "psycopg is not installed (pip install -e '.[dev]')"
            return
        try:
            with psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=3) as conn:
                self._name = f"lean_test_{secrets.token_hex(4)}"
                conn.execute(f"CREATE DATABASE {self._name}")
                # Tests do not outlive a server crash; a commit need not wait for the disk.
                conn.execute(f"ALTER DATABASE {self._name} SET synchronous_commit = off")
        except psycopg.Error as exc:
            self.skip = f"PostgreSQL is not reachable at {ADMIN_URL}: {exc}".partition("\n")[0]
            return
        self.url = _pg_url(ADMIN_URL, self._name)

    def clean(self) -> None:
        """An empty schema, as a new database has."""
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute("SET lock_timeout = 5000")
            conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")

    def drop(self) -> None:
        if self._name:
            import psycopg

            with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {self._name} WITH (FORCE)")


class Target:
    """One database as the tests see it; `where` is what `Store()` takes."""

    kind = ""
    where = ""

    def sql(self, statement: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def count_rows(self) -> int:
        return int(self.sql("SELECT count(*) FROM messages")[0][0])

    def version(self) -> int:
        raise NotImplementedError

    def seed(self, script: str, version: int) -> None:
        """Run a plain-SQL script (an old lean's schema and rows) and set the version."""
        raise NotImplementedError

    def locked(self) -> contextlib.AbstractContextManager[None]:
        """Another session holds the lock lean needs to write, until the block ends."""
        raise NotImplementedError

    def quick_lock_timeout(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Make lean give up on a lock after ~20 ms instead of seconds."""
        raise NotImplementedError


class SqliteTarget(Target):
    kind = "sqlite"

    def __init__(self, tmp_path: Path) -> None:
        self.where = str(tmp_path / "lean.db")

    def sql(self, statement: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with contextlib.closing(sqlite3.connect(self.where)) as conn, conn:
            return conn.execute(statement, args).fetchall()

    def version(self) -> int:
        return int(self.sql("PRAGMA user_version")[0][0])

    def seed(self, script: str, version: int) -> None:
        with contextlib.closing(sqlite3.connect(self.where)) as conn:
            conn.executescript(f"{script}; PRAGMA user_version = {version};")

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        other = sqlite3.connect(self.where, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            other.execute("ROLLBACK")
            other.close()

    def quick_lock_timeout(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr("lean.store_sqlite.BUSY_TIMEOUT_MS", 20)


class PgTarget(Target):
    kind = "postgresql"

    def __init__(self, url: str) -> None:
        self.where = url

    def sql(self, statement: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(self.where, autocommit=True) as conn:
            cur = conn.execute(statement.replace("?", "%s"), args)
            return cur.fetchall() if cur.description else []

    def version(self) -> int:
        return int(self.sql("SELECT version FROM lean_schema")[0][0])

    def seed(self, script: str, version: int) -> None:
        import psycopg

        from lean.store_pg import migration

        with psycopg.connect(self.where, autocommit=True) as conn, conn.transaction():
            if script:
                conn.execute(migration(script))
            conn.execute("CREATE TABLE IF NOT EXISTS lean_schema (version INTEGER NOT NULL)")
            conn.execute("DELETE FROM lean_schema")
            conn.execute("INSERT INTO lean_schema VALUES (%s)", (version,))

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        import psycopg

        with psycopg.connect(self.where) as other:  # a transaction until the block ends
            # EXCLUSIVE: reads go on, writes wait
            other.execute("LOCK TABLE messages, lean_schema IN EXCLUSIVE MODE")
            try:
                yield
            finally:
                other.rollback()

    def quick_lock_timeout(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr("lean.store_pg.LOCK_TIMEOUT_MS", 20)
