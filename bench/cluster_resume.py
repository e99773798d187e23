"""What resuming a run on another instance costs (docs/protocol.md §7, "Resuming on another
instance"), and that a run nobody resumes elsewhere sends Redis nothing per event.

Run: .venv/bin/python -m bench.cluster_resume   (~30 s; needs redis-server)

Two lean instances (A, B) in this process on uvloop share a `redis-server` of this bench's
own (so INFO commandstats counts only theirs) and one SQLite file; the demo provider
streams its ~50-word answer with `demo_delay`, so that every resume lands while the run
runs. Cases, RUNS runs each, 8 at once, in turn, median of REPEATS:
- `one reader`: a run on A read by its client on A.
- `+ a reader on A`: the same, plus a resume (after=0) on A: a local second reader.
- `+ a reader on B`: the same, plus the resume on B, fed by A through Redis.
CPU is this process's (both instances, Redis client, the HTTP clients); per event = the
extra CPU of the second reader / its events. The remote reader's own cost is the third
case minus the second. Redis: commands per run and per event, from INFO commandstats.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import uvloop

from bench.cluster import _delta, commands, redis_server
from lean.app import Server
from lean.config import parse_config
from lean.redis_client import RedisConnection, parse_redis_url

RUNS = 48
REPEATS = 7
CONFIG = """
[server]
host = 127.0.0.1
[store]
path = {path}
[provider.demo]
kind = demo
demo_delay = 0.004
[model.default]
provider = demo
upstream_model = lean-demo
[scene.chat]
model = default
[cluster]
redis_url = {url}
instance = {name}
"""
NDJSON = {"Accept": "application/x-ndjson"}


async def one(http: aiohttp.ClientSession, a: Server, reader: Server | None) -> int:
    """A run on A read to its end, and a second reader on `reader` (None: none): the second
    reader's event count (it must equal the first's)."""
    async with http.post(
        a.url + "/v1/scenes/chat/stream", json={"message": "hi"}, headers=NDJSON
    ) as r:
        assert r.status == 200, await r.text()
        first = await r.content.readline()
        run_id = first.split(b'"runId":"', 1)[1].split(b'"', 1)[0].decode()
        if reader is None:
            rest = await r.read()
            return 0
        url = f"{reader.url}/v1/runs/{run_id}/stream?after=0"
        async with http.get(url, headers=NDJSON) as second:
            assert second.status == 200, await second.text()
            rest, got = await asyncio.gather(r.read(), second.read())
    events = [line for line in (first + rest).split(b"\n") if line]
    seconds = [line for line in got.split(b"\n") if line]
    assert seconds == events, (len(seconds), len(events))  # nothing twice, nothing missing
    return len(seconds)


async def main(port: int) -> None:
    print(f"python {sys.version.split()[0]}, uvloop, {os.cpu_count()} CPUs (shared)")
    url = f"redis://127.0.0.1:{port}/0"
    probe = await RedisConnection.open(parse_redis_url(url), timeout=1.0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shared.db"
        a, b = (
            Server(parse_config(CONFIG.format(path=path, url=url, name=name), environ={}), port=0)
            for name in ("bench-a", "bench-b")
        )
        await a.start()
        await b.start()
        await asyncio.sleep(0.5)  # both joined
        cases = {"one reader": None, "+ a reader on A": a, "+ a reader on B": b}
        cpu: dict[str, list[float]] = {label: [] for label in cases}
        sent: dict[str, dict[str, int]] = {label: {} for label in cases}
        events: dict[str, int] = dict.fromkeys(cases, 0)
        try:
            async with aiohttp.ClientSession() as http:
                for reader in cases.values():  # warm-up
                    await asyncio.gather(*(one(http, a, reader) for _ in range(8)))
                for _ in range(REPEATS):
                    for label, reader in cases.items():
                        before = await commands(probe)
                        started = time.process_time()
                        for _ in range(RUNS // 8):
                            counts = await asyncio.gather(*(one(http, a, reader) for _ in range(8)))
                            events[label] += sum(counts)
                        cpu[label].append((time.process_time() - started) / RUNS * 1e6)
                        for name, n in _delta(await commands(probe), before).items():
                            sent[label][name] = sent[label].get(name, 0) + n
        finally:
            await b.stop()
            await a.stop()
            probe.close()
    runs = RUNS * REPEATS
    per_run = {label: statistics.median(rows) for label, rows in cpu.items()}
    n = events["+ a reader on B"] / runs
    print(f"{RUNS} runs x {REPEATS}, ~{n:.0f} events per run (demo answer), 8 runs at once")
    for label in cases:
        shown = ", ".join(
            f"{k} {v / runs:.2f}" for k, v in sorted(sent[label].items()) if k != "info"
        )
        print(f"  {label:<18} {per_run[label]:7.0f} µs CPU per run; Redis per run: {shown or '-'}")
    local = (per_run["+ a reader on A"] - per_run["one reader"]) / n
    remote = (per_run["+ a reader on B"] - per_run["one reader"]) / n
    publish = sent["+ a reader on B"].get("publish", 0) / events["+ a reader on B"]
    print(f"  a second reader on A: {local:.1f} µs CPU per event")
    print(f"  a reader on B:        {remote:.1f} µs CPU per event ({remote / local:.2f}x)")
    print(f"  Redis per event with a reader on B: {publish:.3f} PUBLISH (awaited by A)")
    print(f"  PUBLISH per run with no remote reader: {sent['one reader'].get('publish', 0) / runs}")


if __name__ == "__main__":
    with redis_server() as redis_port:
        uvloop.run(main(redis_port))
