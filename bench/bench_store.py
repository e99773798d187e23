"""Rows/s for batched saves through lean.store.Store, and what the event loop pays.

Run: .venv/bin/python -m bench.bench_store   (a few seconds; each repeat uses a fresh file)
"""

from __future__ import annotations

import asyncio
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import uvloop

from lean.messages import MessageRecord
from lean.store import Store

ROWS = 10_000
REPEATS = 5
TEXT = "The quick brown fox jumps over the lazy dog. " * 10  # ~450 chars, a short answer
TOOL = {"id": "t1", "name": "clock", "arguments": "{}", "result": "16:40", "isError": False}


def record(i: int) -> MessageRecord:
    cid = f"c{i // 10}"  # ten turns per conversation
    return MessageRecord(
        message_id=f"chat:{cid}:{i % 10 + 1}",
        conversation_id=cid,
        role="assistant",
        content=TEXT,
        status="complete",
        created_at="2026-11-21T16:40:00.123Z",
        turn=i % 10 + 1,
        scene="chat",
        model="default",
        tool_calls=[TOOL],
        finish_reason="stop",
        prompt_tokens=120,
        completion_tokens=90,
        first_token_ms=80.0,
        duration_ms=900.0,
    )


async def saves(path: str) -> tuple[float, float]:
    """(rows/s from the first save to the flush, loop µs per save_assistant call)."""
    records = [record(i) for i in range(ROWS)]
    store = Store(path)
    await store.open()
    t0 = time.perf_counter()
    for r in records:
        await store.save_assistant(r)
    t1 = time.perf_counter()
    await store.flush()
    t2 = time.perf_counter()
    await store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM messages").fetchone()[0] == ROWS
    conn.close()
    return ROWS / (t2 - t0), (t1 - t0) / ROWS * 1e6


async def turns(path: str, n: int = 1000) -> tuple[float, float]:
    """(µs per begin_turn awaited one by one, µs per begin_turn with n concurrent)."""
    store = Store(path)
    await store.open()
    t0 = time.perf_counter()
    for _ in range(n):
        await store.begin_turn(conversation_id="one", scene="chat", user_content="hi")
    t1 = time.perf_counter()
    await asyncio.gather(
        *(
            store.begin_turn(conversation_id=f"c{i}", scene="chat", user_content="hi")
            for i in range(n)
        )
    )
    t2 = time.perf_counter()
    await store.close()
    return (t1 - t0) / n * 1e6, (t2 - t1) / n * 1e6


def main() -> None:
    print(f"$ {sys.executable} -m bench.bench_store")
    print(f"python {sys.version.split()[0]}, SQLite {sqlite3.sqlite_version}, uvloop")
    with tempfile.TemporaryDirectory() as tmp:
        runs = [uvloop.run(saves(str(Path(tmp) / f"save{i}.db"))) for i in range(REPEATS)]
        rate = statistics.median(r[0] for r in runs)
        loop_us = statistics.median(r[1] for r in runs)
        one, many = uvloop.run(turns(str(Path(tmp) / "turns.db")))
    print(f"save_assistant, {ROWS} rows (~0.7 KB each), batched: median of {REPEATS}")
    print(f"  rows/s (first save -> flush committed)  {rate:10,.0f}")
    low, high = min(r[0] for r in runs), max(r[0] for r in runs)
    print(f"  min / max rows/s                        {low:10,.0f} / {high:,.0f}")
    print(f"  loop µs per save_assistant call         {loop_us:10.1f}")
    print("begin_turn (round trip through the writer, committed)")
    print(f"  µs each, awaited one by one             {one:10.1f}")
    print(f"  µs each, 1000 concurrent                {many:10.1f}")


if __name__ == "__main__":
    main()
