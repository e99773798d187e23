"""Rows/s for batched saves through lean.store.Store, and what the event loop pays; what
`done` waits for (an awaited final save); what saving running answers costs (lean.progress).

Run: .venv/bin/python -m bench.bench_store   (~30 s; each repeat uses a fresh file)
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

from lean.messages import MessageRecord, TextBuffer
from lean.progress import Progress
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
        await store.save_assistant(r, wait=False)
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


async def final_saves(path: str, n: int = 1000, at_once: int = 100) -> tuple[float, float, float]:
    """What `done` waits for: ms per awaited save one by one (p50), and with `at_once` runs
    ending together (p50, p99 of each save's wait)."""
    store = Store(path)
    await store.open()
    one = []
    for i in range(n):
        t0 = time.perf_counter()
        await store.save_assistant(record(i))
        one.append(time.perf_counter() - t0)

    async def timed(i: int) -> float:
        t0 = time.perf_counter()
        await store.save_assistant(record(i))
        return time.perf_counter() - t0

    together: list[float] = []
    for start in range(n, 2 * n, at_once):
        together += await asyncio.gather(*(timed(i) for i in range(start, start + at_once)))
    await store.close()
    together.sort()
    return (
        statistics.median(one) * 1e3,
        statistics.median(together) * 1e3,
        together[int(len(together) * 0.99)] * 1e3,
    )


# Running answers: ANSWERS streams each taking a token every TICK (20 tokens/s each, 20k/s in
# all), for SECONDS, each answer starting at ~2 KB of text (a row mid-answer).
ANSWERS = 1000
TICK = 0.05
SECONDS = 6.0
TOKEN = "word "


async def progress(path: str, interval: float) -> tuple[float, float, int, int]:
    """(process CPU s, loop-thread CPU s, tokens added, rows flushed) over SECONDS."""
    store = Store(path)
    await store.open()
    flushes = Progress(store, interval)
    buffers = []
    for i in range(ANSWERS):
        text = TextBuffer()
        text.add(TEXT * 4)
        buffers.append(text)
        await store.save_assistant(
            MessageRecord(
                message_id=f"chat:c{i}:1",
                conversation_id=f"c{i}",
                role="assistant",
                content="",
                status="streaming",
                created_at="2026-11-21T16:40:00.123Z",
                turn=1,
            ),
            wait=False,
        )
        flushes.add(f"chat:c{i}:1", text, TextBuffer())
    await store.flush()
    rows = 0
    rows_of = flushes.rows

    def counted() -> list[tuple[str, str, str]]:
        nonlocal rows
        out = rows_of()
        rows += len(out)
        return out

    flushes.rows = counted  # type: ignore[method-assign]  # count what is flushed
    flushes.start()
    tokens = 0
    cpu0, loop0 = time.process_time(), time.thread_time()
    end = time.monotonic() + SECONDS
    while time.monotonic() < end:
        for text in buffers:
            text.add(TOKEN)
        tokens += len(buffers)
        await asyncio.sleep(TICK)
    await flushes.close()
    await store.flush()
    cpu, loop_cpu = time.process_time() - cpu0, time.thread_time() - loop0
    await store.close()
    return cpu, loop_cpu, tokens, rows


def main() -> None:
    print(f"$ {sys.executable} -m bench.bench_store")
    print(f"python {sys.version.split()[0]}, SQLite {sqlite3.sqlite_version}, uvloop")
    with tempfile.TemporaryDirectory() as tmp:
        runs = [uvloop.run(saves(str(Path(tmp) / f"save{i}.db"))) for i in range(REPEATS)]
        rate = statistics.median(r[0] for r in runs)
        loop_us = statistics.median(r[1] for r in runs)
        one, many = uvloop.run(turns(str(Path(tmp) / "turns.db")))
        alone, p50, p99 = uvloop.run(final_saves(str(Path(tmp) / "final.db")))
        runs_off = [uvloop.run(progress(str(Path(tmp) / f"off{i}.db"), 0)) for i in range(3)]
        runs_on = [uvloop.run(progress(str(Path(tmp) / f"on{i}.db"), 1.0)) for i in range(3)]
    print(f"save_assistant, {ROWS} rows (~0.7 KB each), batched: median of {REPEATS}")
    print(f"  rows/s (first save -> flush committed)  {rate:10,.0f}")
    low, high = min(r[0] for r in runs), max(r[0] for r in runs)
    print(f"  min / max rows/s                        {low:10,.0f} / {high:,.0f}")
    print(f"  loop µs per save_assistant call         {loop_us:10.1f}")
    print("begin_turn (round trip through the writer, committed)")
    print(f"  µs each, awaited one by one             {one:10.1f}")
    print(f"  µs each, 1000 concurrent                {many:10.1f}")
    print("save_assistant awaited (what `done` waits for), ms")
    print(f"  one by one, p50                         {alone:10.2f}")
    print(f"  100 runs ending at once, p50 / p99      {p50:10.2f} / {p99:.2f}")
    print(
        f"running answers: {ANSWERS} streams x {1 / TICK:.0f} tokens/s for {SECONDS:.0f} s,"
        " ~2 KB each; median of 3"
    )
    for name, runs in (("flush off", runs_off), ("flush_interval 1.0", runs_on)):
        cpu = statistics.median(r[0] for r in runs) / SECONDS
        loop_cpu = statistics.median(r[1] for r in runs) / SECONDS
        rows = statistics.median(r[3] for r in runs) / SECONDS
        print(
            f"  {name:20} CPU {100 * cpu:5.1f}% of a core (loop {100 * loop_cpu:5.1f}%),"
            f" rows/s {rows:7,.0f}"
        )
    extra = statistics.median(r[0] for r in runs_on) - statistics.median(r[0] for r in runs_off)
    tokens = statistics.median(r[2] for r in runs_on)
    rows = statistics.median(r[3] for r in runs_on)
    print(
        f"  cost of flushing: {extra / SECONDS * 100:+.1f}% of a core,"
        f" {extra / tokens * 1e6:+.2f} µs per token, {extra / max(rows, 1) * 1e6:+.0f} µs per row"
    )


if __name__ == "__main__":
    main()
