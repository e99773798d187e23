"""What sharing Redis costs a run (docs/protocol.md §7), and lean's RESP client against
redis-py's asyncio client for lean's few commands.

Run: .venv/bin/python -m bench.cluster   (~30 s; needs redis-server; redis-py for part 1:
     pip install -e '.[bench]')

Each part starts a `redis-server` of its own on a free port (nothing saved), so commands
are counted with INFO commandstats without anyone else's, and runs on uvloop like lean.

1. Clients: an awaited EVALSHA of lean's admission script, and a command written without
   waiting (what a run's start and end do), per command: wall µs and CPU µs.
2. `lean.cluster.Cluster` as a run uses it, without HTTP: Redis commands per run, awaited
   round trips per run, and wall/CPU µs per run; with and without cluster_max_streams.
3. Whole scene runs over HTTP against a lean in this process (demo provider, no delay):
   wall and CPU µs per run alone, and in a cluster with and without the bound.
4. What importing each client adds (time, RSS).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import uvloop

from lean.app import Server
from lean.cluster import PREFIX, Cluster
from lean.cluster_wire import ADMIT, SHA
from lean.config import ClusterConfig, parse_config
from lean.redis_client import RedisConnection, parse_redis_url
from lean.resp import Reply

CALLS = 5_000
RUNS = 5_000
HTTP_RUNS = 2400
HTTP_REPEATS = 12
REPEATS = 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def redis_server() -> Iterator[int]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed")
    port = _free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                break
            time.sleep(0.01)
        yield port
    finally:
        proc.kill()
        proc.wait()


async def commands(conn: RedisConnection) -> dict[str, int]:
    """Calls per command so far (INFO commandstats), INFO's own call left out."""
    reply = await conn.call("INFO", "commandstats")
    assert isinstance(reply, bytes)
    counts: dict[str, int] = {}
    for line in reply.decode().splitlines():
        if line.startswith("cmdstat_"):
            name, _, fields = line[len("cmdstat_") :].partition(":")
            counts[name] = int(fields.split(",")[0].partition("=")[2])
    counts["info"] = counts.get("info", 0) - 1
    return counts


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


async def timed(n: int, body: Callable[[], Awaitable[None]]) -> tuple[float, float]:
    """(wall µs, CPU µs of this process) per unit, median of REPEATS, for `n` units."""
    walls, cpus = [], []
    for _ in range(REPEATS):
        wall, cpu = time.perf_counter(), time.process_time()
        await body()
        walls.append((time.perf_counter() - wall) / n * 1e6)
        cpus.append((time.process_time() - cpu) / n * 1e6)
    return statistics.median(walls), statistics.median(cpus)


# --- 1. clients -------------------------------------------------------------------------


async def clients(port: int) -> None:
    print(f"1. clients, per command ({CALLS:,} commands, median of {REPEATS}):")
    address = parse_redis_url(f"redis://127.0.0.1:{port}/0")
    conn = await RedisConnection.open(address, timeout=2)
    await conn.call("SCRIPT", "LOAD", ADMIT)
    args = (SHA[ADMIT], 0, PREFIX, "bench", "1000000000")

    async def lean_awaited() -> None:
        for _ in range(CALLS):
            await conn.call("EVALSHA", *args)

    async def lean_sent() -> None:
        for i in range(CALLS):
            conn.send("SADD", "bench:runs", i)
        await conn.call("PING")

    rows = [
        ("lean.redis_client, awaited EVALSHA", await timed(CALLS, lean_awaited)),
        ("lean.redis_client, send (no await)", await timed(CALLS, lean_sent)),
    ]
    conn.close()
    try:
        import redis.asyncio as aioredis
    except ImportError:
        print("   redis-py is not installed (pip install -e '.[bench]'): lean's client only")
    else:
        r = aioredis.Redis(host="127.0.0.1", port=port)

        async def redispy_awaited() -> None:
            for _ in range(CALLS):
                await r.evalsha(*args)

        async def redispy_sent() -> None:
            # redis-py has no fire-and-forget: a run's sync `finally` would need a task, and
            # each command in flight takes a connection of the pool of its own (no
            # pipelining across tasks): 50 at once here, as 50 runs ending together.
            for start in range(0, CALLS, 50):
                await asyncio.gather(*(r.sadd("bench:runs", i) for i in range(start, start + 50)))

        rows.append(("redis-py asyncio, awaited EVALSHA", await timed(CALLS, redispy_awaited)))
        rows.append(("redis-py asyncio, 50 concurrent awaits", await timed(CALLS, redispy_sent)))
        await r.aclose()
    for name, (wall, cpu) in rows:
        print(f"   {name:<40} {wall:7.1f} µs wall {cpu:7.1f} µs CPU")


def imports() -> None:
    """What each client adds to a process that already runs lean's own imports."""
    print("4. imports, into a process that already holds asyncio, aiohttp, msgspec, uvloop:")
    base = "import asyncio, aiohttp, msgspec, uvloop"
    for module in ("lean.redis_client", "redis.asyncio"):
        code = f"{base}; import time; from lean.metrics import resident_bytes as rss; "
        code += f"r, t = rss(), time.perf_counter(); import {module}; "
        code += "print(round((time.perf_counter() - t) * 1000, 1), (rss() - r) / 2**20)"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if out.returncode == 0:
            ms, mb = out.stdout.split()
            print(f"   import {module:<20} {float(ms):6.1f} ms, +{float(mb):.1f} MB RSS")


# --- 2. the cluster as a run uses it ----------------------------------------------------


async def per_run(port: int) -> None:
    print(f"2. lean.cluster per run, no HTTP ({RUNS:,} runs one after another):")
    url = f"redis://127.0.0.1:{port}/0"
    sent: Counter[str] = Counter()  # commands lean writes, by name
    send, call = RedisConnection.send, RedisConnection.call

    def counted_send(self: RedisConnection, *args: bytes | str | int) -> None:
        sent[str(args[0]).lower()] += 1
        send(self, *args)

    def counted_call(self: RedisConnection, *args: bytes | str | int) -> asyncio.Future[Reply]:
        sent[str(args[0]).lower()] += 1
        return call(self, *args)

    RedisConnection.send = counted_send  # type: ignore[method-assign]
    RedisConnection.call = counted_call  # type: ignore[method-assign]
    probe = await RedisConnection.open(parse_redis_url(url), timeout=2)
    for bound in (0, 1_000_000):
        await one_bound(url, bound, probe, sent)
    RedisConnection.send, RedisConnection.call = send, call  # type: ignore[method-assign]
    probe.close()


async def one_bound(url: str, bound: int, probe: RedisConnection, sent: Counter[str]) -> None:
    active: list[str] = []
    cluster = Cluster(
        ClusterConfig(instance="bench", redis_url=url, lease=10.0),
        max_streams=bound,
        streams=lambda: len(active),
        runs=lambda: list(active),
    )
    cluster.deliver = lambda request: (404, b"{}")
    cluster.start()
    while True:
        if cluster.up:
            break
        await asyncio.sleep(0.01)

    async def runs() -> None:
        for i in range(RUNS):
            run_id = f"run_{i}"
            await cluster.admit()
            cluster.stream_started()
            cluster.run_owned(run_id)
            cluster.run_ended(run_id)
            cluster.stream_ended()
        await probe.call("PING")  # the last commands are in

    before = await commands(probe)
    sent.clear()
    wall, cpu = await timed(RUNS, runs)
    done = _delta(await commands(probe), before)
    n = RUNS * REPEATS
    by_lean = {k: v for k, v in sent.items() if k not in ("ping", "info")}
    awaited = by_lean.get("evalsha", 0) / n
    shown = ", ".join(f"{k} {v / n:.2f}" for k, v in sorted(by_lean.items()))
    inside = sum(v for k, v in done.items() if k not in ("ping", "info")) / n
    print(f"   cluster_max_streams = {bound}")
    print(f"     sent per run: {sum(by_lean.values()) / n:.2f} ({shown}), {awaited:.2f} awaited")
    print(f"     Redis commands run per run, scripts' own included: {inside:.2f}")
    print(f"     {wall:.1f} µs wall, {cpu:.1f} µs CPU per run (this process)")
    await cluster.close()


# --- 3. whole runs over HTTP -------------------------------------------------------------

CONFIG = """
[server]
host = 127.0.0.1
[store]
path = {path}
flush_interval = 0
[provider.demo]
kind = demo
demo_delay = 0
[model.default]
provider = demo
upstream_model = lean-demo
[scene.chat]
model = default
{cluster}
"""


async def http_runs(port: int) -> None:
    per = HTTP_RUNS // HTTP_REPEATS
    print(f"3. whole scene runs over HTTP, in this process ({per} runs 8 at once, the three")
    print(f"   cases in turn, median of {HTTP_REPEATS}):")
    url = f"redis://127.0.0.1:{port}/0"
    cases = {
        "alone (no [cluster])": "",
        "[cluster] redis_url": f"[cluster]\nredis_url = {url}\ninstance = bench-1\n",
        "... and cluster_max_streams": (
            f"[cluster]\nredis_url = {url}\ninstance = bench-2\n"
            "[limits]\ncluster_max_streams = 100000\n"
        ),
    }
    figures: dict[str, list[tuple[float, float]]] = {label: [] for label in cases}
    with tempfile.TemporaryDirectory() as tmp:
        servers = {}
        for n, (label, cluster) in enumerate(cases.items()):
            path = Path(tmp) / f"lean{n}.db"
            config = parse_config(CONFIG.format(path=path, cluster=cluster), environ={})
            servers[label] = Server(config, port=0)
            await servers[label].start()
        try:
            async with aiohttp.ClientSession() as http:
                headers = {"Accept": "application/x-ndjson"}

                async def one(server: Server) -> None:
                    stream = server.url + "/v1/scenes/chat/stream"
                    async with http.post(stream, json={"message": "hi"}, headers=headers) as r:
                        assert r.status == 200, await r.text()
                        body = await r.read()
                        assert b'"type":"done"' in body, body[-200:]

                async def runs(server: Server) -> tuple[float, float]:
                    wall, cpu = time.perf_counter(), time.process_time()
                    for _ in range(per // 8):
                        await asyncio.gather(*(one(server) for _ in range(8)))
                    return (
                        (time.perf_counter() - wall) / per * 1e6,
                        (time.process_time() - cpu) / per * 1e6,
                    )

                for server in servers.values():
                    await runs(server)  # warm-up
                for _ in range(HTTP_REPEATS):
                    for label, server in servers.items():
                        figures[label].append(await runs(server))
        finally:
            for server in servers.values():
                await server.stop()
    for label, rows in figures.items():
        wall = statistics.median(w for w, _ in rows)
        cpu = statistics.median(c for _, c in rows)
        print(f"   {label:<30} {wall:7.1f} µs wall {cpu:7.1f} µs CPU per run")


async def main(port: int) -> None:
    print(f"python {sys.version.split()[0]}, uvloop, {os.cpu_count()} CPUs (shared)")
    await clients(port)
    await per_run(port)
    await http_runs(port)


if __name__ == "__main__":
    with redis_server() as redis_port:
        uvloop.run(main(redis_port))
        imports()
