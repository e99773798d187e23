"""Two lean stores in two processes writing one SQLite file, against one: rows/s and what an
awaited final save (what `done` waits for) costs while the other process writes.

    python -m bench.store_writers [--rows 10000] [--repeats 3]

Each process opens `lean.store.Store` on the same file (WAL) with an instance name of its
own, as two `lean serve` on one host do, and saves `--rows` answers of ~0.5 KB without
waiting (batched commits, as finished runs are saved) and, meanwhile, `AWAITED` answers one
at a time, each awaited as a run awaits its final save before `done`. SQLite lets one writer
commit at a time: the second waits on the file's lock (busy_timeout), so what matters is
how much the total moves and how long an awaited save waits.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path

import msgspec
import uvloop

from bench.bench_store import record
from lean.messages import MessageRecord
from lean.store import Store

AWAITED = 500


async def _write(path: str, name: str, rows: int, start: float) -> tuple[float, list[float]]:
    """(seconds for `rows` batched saves, ms of each awaited save made meanwhile)."""
    store = Store(path, instance=name)
    await store.open()
    records = [_named(record(i), name) for i in range(rows + AWAITED)]
    await asyncio.sleep(max(0.0, start - time.time()))  # every process begins together

    async def batched() -> float:
        t0 = time.perf_counter()
        for r in records[:rows]:
            await store.save_assistant(r, wait=False)
        await store.flush()
        return time.perf_counter() - t0

    async def awaited() -> list[float]:
        waits = []
        for r in records[rows:]:
            t = time.perf_counter()
            await store.save_assistant(r)
            waits.append((time.perf_counter() - t) * 1000)
            await asyncio.sleep(0.001)  # one run ending at a time, beside the batched saves
        return waits

    seconds, waits = await asyncio.gather(batched(), awaited())
    await store.close()
    return seconds, waits


def _named(r: MessageRecord, name: str) -> MessageRecord:
    """`r` as written by instance `name`: ids of its own, so the writers never collide."""
    return msgspec.structs.replace(
        r, message_id=f"{name}-{r.message_id}", conversation_id=f"{name}-{r.conversation_id}"
    )


def _process(path: str, name: str, rows: int, start: float, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        out.put(runner.run(_write(path, name, rows, start)))


def run(writers: int, rows: int) -> tuple[float, float, float]:
    """(rows/s of all writers' batched saves, awaited save p50 and p99 ms)."""
    path = str(Path(tempfile.mkdtemp(prefix="lean-bench-writers-")) / "lean.db")
    ctx = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue = ctx.Queue()  # type: ignore[type-arg]
    start = time.time() + 2.0  # after every process has started and opened the store
    procs = [
        ctx.Process(target=_process, args=(path, f"w{i}", rows, start, out)) for i in range(writers)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(30)
    slowest = max(seconds for seconds, _ in results)
    waits = sorted(w for _, ws in results for w in ws)
    p99 = waits[int(len(waits) * 0.99) - 1]
    return writers * rows / slowest, statistics.median(waits), p99


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.store_writers", description=__doc__)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    for writers in (1, 2):
        figures = [run(writers, args.rows) for _ in range(args.repeats)]
        rate = statistics.median(f[0] for f in figures)
        p50 = statistics.median(f[1] for f in figures)
        p99 = statistics.median(f[2] for f in figures)
        print(
            f"{writers} writer process(es): {rate:,.0f} rows/s in all (batched saves);"
            f" awaited save p50 {p50:.2f} ms, p99 {p99:.2f} ms"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
