"""Which PostgreSQL driver fits lean's store: asyncpg vs psycopg 3 (async on the loop, or
sync on a writer thread as lean's SQLite store runs), on lean's write pattern.

The pattern is what `lean.store` sends in one batch, each step one transaction:
- starts: RUNS runs begin at once: per run, the conversation's turn allocated (a lock on the
  conversation, its max turn, the user row) and the answer's `streaming` row;
- progress: one flush of every running answer's text so far (one UPDATE per row, batched);
- finals: every answer's final save (an upsert per row, batched).
Figures: rows/s of each step (median of REPEATS), CPU of the event-loop thread per row (what
the loop pays: 0 for the thread design), and the RSS a connection costs (CONNS connections
opened, RSS before and after, per connection; the driver's import on its own line).

Then the chosen one through lean.store.Store, beside SQLite (the same front): rows/s of
batched saves, a begin_turn's round trip, and what `done` waits for (an awaited final save),
with the server's default synchronous_commit (on: each commit waits for the WAL's fsync).

Needs PostgreSQL on 127.0.0.1:5432 with trust auth (databases are created and dropped).
Run: .venv/bin/python -m bench.store_pg   (~1 min)
"""

from __future__ import annotations

import asyncio
import gc
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import uvloop

ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
RUNS = 500  # runs starting/streaming/ending together: a batch_max-sized batch
REPEATS = 5
CONNS = 20
TEXT = "The quick brown fox jumps over the lazy dog. " * 10  # ~450 chars
TABLE = """
CREATE TABLE messages (
    message_id TEXT PRIMARY KEY, conversation_id TEXT NOT NULL, turn INTEGER NOT NULL,
    role TEXT NOT NULL, content TEXT NOT NULL, status TEXT NOT NULL, created_at TEXT NOT NULL,
    scene TEXT NOT NULL, model TEXT NOT NULL, reasoning TEXT NOT NULL, tool_calls TEXT NOT NULL,
    finish_reason TEXT, error_code TEXT, prompt_tokens INTEGER, completion_tokens INTEGER,
    first_token_ms DOUBLE PRECISION, duration_ms DOUBLE PRECISION, run_id TEXT, prompt TEXT);
CREATE INDEX messages_by_turn ON messages (conversation_id, turn);
"""
COLUMNS = (
    "message_id, conversation_id, turn, role, content, status, created_at, scene, model,"
    " reasoning, tool_calls, finish_reason, error_code, prompt_tokens, completion_tokens,"
    " first_token_ms, duration_ms, run_id, prompt"
)
UPSERT = (
    f"INSERT INTO messages ({COLUMNS}) VALUES ({', '.join(['%s'] * 19)})"
    " ON CONFLICT (message_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in COLUMNS.split(", ")[1:])
)
LOCK = "SELECT pg_advisory_xact_lock(7, hashtext(%s))"
LAST = "SELECT coalesce(max(turn), 0) FROM messages WHERE conversation_id = %s"
PROGRESS = (
    "UPDATE messages SET content = %s, reasoning = %s WHERE message_id = %s"
    " AND status = 'streaming'"
)


def dollar(sql: str) -> str:
    """psycopg's %s placeholders as asyncpg's $n."""
    parts = sql.split("%s")
    return "".join(p + (f"${i}" if i < len(parts) else "") for i, p in enumerate(parts, 1))


def row(i: int, status: str, content: str) -> tuple[Any, ...]:
    at = "2026-11-21T16:40:00.123Z"
    ids = (f"chat:c{i}:1", f"c{i}", 1)
    return (*ids, "assistant", content, status, at, "chat", "default", "", "[]", "stop", None,
            120, 90, 80.0, 900.0, f"run_{i}", None)  # fmt: skip


def user(i: int) -> tuple[Any, ...]:
    at = "2026-11-21T16:40:00.123Z"
    return (f"chat:c{i}:1:user", f"c{i}", 1, "user", "hi", "complete", at,
            "chat", "", "", "[]", None, None, None, None, None, None, None, None)  # fmt: skip


def rss_kb() -> int:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


# -- the three ways, each a (connect, starts, progress, finals, close) over one connection ----


class PsycopgSync:
    name = "psycopg 3 sync, writer thread"

    def __init__(self, url: str) -> None:
        import psycopg

        self.conn = psycopg.connect(url, autocommit=True)

    def starts(self, base: int) -> None:
        with self.conn.transaction(), self.conn.cursor() as cur:
            for i in range(base, base + RUNS):
                cur.execute(LOCK, (f"c{i}",))
                cur.execute(LAST, (f"c{i}",))
                cur.fetchone()
                cur.execute(UPSERT, user(i))
                cur.execute(UPSERT, row(i, "streaming", ""))

    def progress(self, base: int) -> None:
        rows = [(TEXT, "", f"chat:c{i}:1") for i in range(base, base + RUNS)]
        with self.conn.transaction(), self.conn.cursor() as cur:
            cur.executemany(PROGRESS, rows)

    def finals(self, base: int) -> None:
        rows = [row(i, "complete", TEXT * 2) for i in range(base, base + RUNS)]
        with self.conn.transaction(), self.conn.cursor() as cur:
            cur.executemany(UPSERT, rows)

    def close(self) -> None:
        self.conn.close()


class PsycopgAsync:
    name = "psycopg 3 async, on the loop"

    async def open(self, url: str) -> None:
        import psycopg

        self.conn = await psycopg.AsyncConnection.connect(url, autocommit=True)

    async def starts(self, base: int) -> None:
        async with self.conn.transaction(), self.conn.cursor() as cur:
            for i in range(base, base + RUNS):
                await cur.execute(LOCK, (f"c{i}",))
                await cur.execute(LAST, (f"c{i}",))
                await cur.fetchone()
                await cur.execute(UPSERT, user(i))
                await cur.execute(UPSERT, row(i, "streaming", ""))

    async def progress(self, base: int) -> None:
        rows = [(TEXT, "", f"chat:c{i}:1") for i in range(base, base + RUNS)]
        async with self.conn.transaction(), self.conn.cursor() as cur:
            await cur.executemany(PROGRESS, rows)

    async def finals(self, base: int) -> None:
        rows = [row(i, "complete", TEXT * 2) for i in range(base, base + RUNS)]
        async with self.conn.transaction(), self.conn.cursor() as cur:
            await cur.executemany(UPSERT, rows)

    async def close(self) -> None:
        await self.conn.close()


class Asyncpg:
    name = "asyncpg, on the loop"

    async def open(self, url: str) -> None:
        import asyncpg

        self.conn = await asyncpg.connect(url)

    async def starts(self, base: int) -> None:
        async with self.conn.transaction():
            for i in range(base, base + RUNS):
                await self.conn.execute(dollar(LOCK), f"c{i}")
                await self.conn.fetchval(dollar(LAST), f"c{i}")
                await self.conn.execute(dollar(UPSERT), *user(i))
                await self.conn.execute(dollar(UPSERT), *row(i, "streaming", ""))

    async def progress(self, base: int) -> None:
        rows = [(TEXT, "", f"chat:c{i}:1") for i in range(base, base + RUNS)]
        async with self.conn.transaction():
            await self.conn.executemany(dollar(PROGRESS), rows)

    async def finals(self, base: int) -> None:
        rows = [row(i, "complete", TEXT * 2) for i in range(base, base + RUNS)]
        async with self.conn.transaction():
            await self.conn.executemany(dollar(UPSERT), rows)

    async def close(self) -> None:
        await self.conn.close()


# step -> [(seconds, loop-thread CPU seconds, process CPU seconds)]
Steps = dict[str, list[tuple[float, float, float]]]


async def measure_async(driver: Any, url: str) -> Steps:
    await driver.open(url)
    steps: Steps = {"starts": [], "progress": [], "finals": []}
    for r in range(REPEATS):
        base = r * RUNS
        for step in steps:
            fn: Callable[[int], Awaitable[None]] = getattr(driver, step)
            t0, c0, p0 = time.perf_counter(), time.thread_time(), time.process_time()
            await fn(base)
            steps[step].append(
                (time.perf_counter() - t0, time.thread_time() - c0, time.process_time() - p0)
            )
    await driver.close()
    return steps


async def measure_thread(url: str) -> Steps:
    """The sync driver on its own thread; the loop awaits each step as lean's store does."""
    loop = asyncio.get_running_loop()
    driver = PsycopgSync(url)
    steps: Steps = {"starts": [], "progress": [], "finals": []}
    for r in range(REPEATS):
        base = r * RUNS
        for step in steps:
            done = loop.create_future()
            fn = getattr(driver, step)

            def work(
                fn: Callable[[int], None] = fn, done: asyncio.Future[None] = done, base: int = base
            ) -> None:
                fn(base)
                loop.call_soon_threadsafe(done.set_result, None)

            t0, c0, p0 = time.perf_counter(), time.thread_time(), time.process_time()
            threading.Thread(target=work).start()
            await done
            steps[step].append(
                (time.perf_counter() - t0, time.thread_time() - c0, time.process_time() - p0)
            )
    driver.close()
    return steps


def fresh_db(name: str) -> str:
    psql(f"CREATE DATABASE {name}")
    psql(TABLE, db=name)
    return f"postgresql://postgres@127.0.0.1:5432/{name}"


def psql(sql: str, db: str = "postgres") -> None:
    cmd = ["psql", "-q", "-h", "127.0.0.1", "-U", "postgres", "-d", db, "-c", sql]
    subprocess.run(cmd, check=True, capture_output=True)


def conn_rss(which: str, url: str) -> tuple[float, float]:
    """(KB the driver's import costs, KB per open connection), in a fresh interpreter."""
    code = f"""
import asyncio, gc, os, sys
sys.path.insert(0, {os.getcwd()!r})
from bench.store_pg import rss_kb
r0 = rss_kb()
if {which!r} == "asyncpg":
    import asyncpg
else:
    import psycopg
gc.collect(); r1 = rss_kb()
async def many():
    if {which!r} == "asyncpg":
        conns = [await asyncpg.connect({url!r}) for _ in range({CONNS})]
        for c in conns: await c.fetchval("SELECT 1")
    elif {which!r} == "psycopg-async":
        conns = [await psycopg.AsyncConnection.connect({url!r}) for _ in range({CONNS})]
        for c in conns: await (await c.execute("SELECT 1")).fetchone()
    else:
        conns = [psycopg.connect({url!r}) for _ in range({CONNS})]
        for c in conns: c.execute("SELECT 1").fetchone()
    gc.collect()
    print(r1 - r0, (rss_kb() - r1) / {CONNS})
asyncio.run(many())
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    imp, per = out.stdout.split()
    return float(imp), float(per)


async def through_store(where: str, rows: int = 10_000) -> tuple[float, float, float, float]:
    """(rows/s of saves nobody awaits, µs per awaited begin_turn, p50 / p99 ms of an awaited
    final save with 100 runs ending at once) through lean.store.Store."""
    from bench.bench_store import final_saves, record, turns
    from lean.store import Store

    store = Store(where)
    await store.open()
    records = [record(i) for i in range(rows)]
    t0 = time.perf_counter()
    for r in records:
        await store.save_assistant(r, wait=False)
    await store.flush()
    rate = rows / (time.perf_counter() - t0)
    await store.close()
    one, _ = await turns(where, 500)
    _, p50, p99 = await final_saves(where, 500)
    return rate, one, p50, p99


def main() -> None:
    import asyncpg
    import psycopg

    print(f"$ {sys.executable} -m bench.store_pg")
    print(
        f"python {sys.version.split()[0]}, psycopg {psycopg.__version__}"
        f" (libpq {psycopg.pq.version()}), asyncpg {asyncpg.__version__}, uvloop;"
        f" {RUNS} runs per batch, median of {REPEATS}"
    )
    names = [f"lean_bench_{secrets.token_hex(4)}" for _ in range(4)]
    results: dict[str, Steps] = {}
    try:
        results[PsycopgSync.name] = uvloop.run(measure_thread(fresh_db(names[0])))
        results[PsycopgAsync.name] = uvloop.run(measure_async(PsycopgAsync(), fresh_db(names[1])))
        results[Asyncpg.name] = uvloop.run(measure_async(Asyncpg(), fresh_db(names[2])))
        psql(f"CREATE DATABASE {names[3]}")
        pg_url = f"postgresql://postgres@127.0.0.1:5432/{names[3]}"
        store_pg = uvloop.run(through_store(pg_url))
        with tempfile.TemporaryDirectory() as tmp:
            store_sqlite = uvloop.run(through_store(os.path.join(tmp, "lean.db")))
        rss = {
            PsycopgSync.name: conn_rss("psycopg-sync", ADMIN),
            PsycopgAsync.name: conn_rss("psycopg-async", ADMIN),
            Asyncpg.name: conn_rss("asyncpg", ADMIN),
        }
    finally:
        for name in names:
            psql(f"DROP DATABASE IF EXISTS {name}")
    print(f"{'':32} {'rows/s: starts':>15} {'progress':>10} {'finals':>10}"
          f" {'loop µs/row':>12} {'CPU µs/row':>11} {'import KB':>10} {'KB/conn':>8}")  # fmt: skip
    for name, steps in results.items():
        rates = []
        loop_s = cpu_s = rows = 0.0
        for step, runs in steps.items():
            per_run = 2 if step == "starts" else 1  # starts write a user row and an answer row
            rates.append(statistics.median(RUNS * per_run / s for s, _, _ in runs))
            loop_s += sum(c for _, c, _ in runs)
            cpu_s += sum(p for _, _, p in runs)
            rows += RUNS * per_run * len(runs)
        imp, per = rss[name]
        print(
            f"{name:32} {rates[0]:15,.0f} {rates[1]:10,.0f} {rates[2]:10,.0f}"
            f" {loop_s / rows * 1e6:12.1f} {cpu_s / rows * 1e6:11.1f} {imp:10,.0f} {per:8,.0f}"
        )
    print("through lean.store.Store (psycopg 3 sync on the writer thread), beside SQLite:")
    print(f"{'':32} {'saves rows/s':>13} {'turn µs':>8} {'final save p50 / p99 ms':>24}")
    for name, (rate, one, p50, p99) in (("SQLite", store_sqlite), ("PostgreSQL", store_pg)):
        print(f"{name:32} {rate:13,.0f} {one:8.0f} {p50:15.2f} / {p99:.2f}")
    gc.collect()


if __name__ == "__main__":
    main()
