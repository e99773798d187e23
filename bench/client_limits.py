"""What counting clients' limits in Redis costs a request (lean.client_limits), next to
counting them in memory (lean.clients.MemoryLimiter): µs per request (admission + end),
Redis commands sent and awaited round trips per request. Nothing is per chunk: a
request's limits are taken once at admission and given back once at its end.

Run: .venv/bin/python -m bench.client_limits   (~15 s; needs redis-server)

A `redis-server` of its own on a free port (nothing saved), so its INFO commandstats count
lean's commands only; uvloop, like lean. A `lean.cluster.Cluster` joins it as an instance
does; `Clients` admits and ends requests of one client, one after another (each admission
waits for its round trip) and 64 at a time (admissions in flight together on the one
connection, as a busy instance has them).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter

import uvloop

from bench.cluster import commands, redis_server
from lean.client_limits import RedisLimiter
from lean.clients import Client, Clients
from lean.cluster import Cluster
from lean.config import ClusterConfig, parse_config
from lean.metrics import Metrics
from lean.providers.base import Usage
from lean.redis_client import RedisConnection, parse_redis_url
from lean.resp import Reply

N = 4_096  # a multiple of AT_ONCE
REPEATS = 5
AT_ONCE = 64
LIMITS = {
    "every limit": "max_streams = 1000000\nrequests_per_minute = 1000000000\n"
    "tokens_per_day = 1000000000000",
    "requests_per_minute only": "requests_per_minute = 1000000000",
    "no limit": "",
}


def config(limits: str) -> str:
    return (
        "[provider.demo]\nkind = demo\n[model.default]\nprovider = demo\n"
        f"upstream_model = lean-demo\n[client.app]\ntoken_env = APP\n{limits}\n"
    )


async def requests(clients: Clients, client: Client, at_once: int) -> tuple[float, float]:
    """(wall µs, CPU µs) per request: N admissions and ends, `at_once` in flight."""
    usage = Usage(10, 20)

    async def some(n: int) -> None:
        for _ in range(n):
            (await clients.admit(client)).end(usage)

    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(some(N // at_once) for _ in range(at_once)))
    return (time.perf_counter() - wall) / N * 1e6, (time.process_time() - cpu) / N * 1e6


async def measure(
    limits: str, cluster: Cluster | None, probe: RedisConnection | None, at_once: int
) -> tuple[float, float, float, float, float, float]:
    """Median (wall µs, CPU µs) per request; per request: awaited round trips, commands
    written without waiting and the writes that carried them, commands run in Redis (the
    script's own included)."""
    parsed = parse_config(config(limits), environ={"APP": "app-token"})
    limiter = RedisLimiter(cluster, parsed.clients.values()) if cluster is not None else None
    clients = Clients(parsed, Metrics(), limiter)
    client = next(c for _, c in clients.tokens if c.name == "app")
    sent: Counter[str] = Counter()
    if cluster is not None:  # count what the limiter asks of the cluster's connection
        call, send = cluster.call, cluster.send

        async def counted_call(script: str, *args: str | bytes) -> Reply:
            sent["awaited"] += 1
            return await call(script, *args)

        def counted_send(*commands: tuple[str | int | bytes, ...]) -> None:
            sent["written"] += len(commands)
            sent["writes"] += 1 if commands else 0
            send(*commands)

        cluster.call, cluster.send = counted_call, counted_send  # type: ignore[method-assign]
    before = await commands(probe) if probe else {}
    walls, cpus = [], []
    for _ in range(REPEATS):
        wall, cpu = await requests(clients, client, at_once)
        walls.append(wall)
        cpus.append(cpu)
    total = N * REPEATS
    ran = 0.0
    if cluster is not None and probe is not None:
        del cluster.call, cluster.send  # the class's again
        await asyncio.sleep(0.2)  # the ends' writes were not awaited
        after = await commands(probe)
        ran = sum(v - before.get(k, 0) for k, v in after.items() if k != "info") / total
    return (
        statistics.median(walls),
        statistics.median(cpus),
        sent["awaited"] / total,
        sent["written"] / total,
        sent["writes"] / total,
        ran,
    )


async def main(port: int) -> None:
    url = f"redis://127.0.0.1:{port}/0"
    cluster = Cluster(
        ClusterConfig(instance="bench", redis_url=url, lease=10.0),
        max_streams=0,
        streams=lambda: 0,
        runs=lambda: [],
    )
    cluster.deliver = lambda request: (404, b"{}")
    cluster.start()
    while True:
        if cluster.up:
            break
        await asyncio.sleep(0.01)
    probe = await RedisConnection.open(parse_redis_url(url), timeout=1.0)
    print(f"admission + end per request, median of {REPEATS} x {N:,} (uvloop)")
    print(
        f"{'client':26} {'limiter':7} {'at once':>7} {'wall µs':>9} {'CPU µs':>8} "
        f"{'awaited':>8} {'written':>8} {'writes':>7} {'in Redis':>8}   (per request)"
    )
    for name, limits in LIMITS.items():
        for at_once in (1, AT_ONCE):
            rows = [
                ("memory", await measure(limits, None, None, at_once)),
                ("redis", await measure(limits, cluster, probe, at_once)),
            ]
            for kind, (wall, cpu, awaited, written, writes, ran) in rows:
                print(
                    f"{name:26} {kind:7} {at_once:7d} {wall:9.2f} {cpu:8.2f} "
                    f"{awaited:8.2f} {written:8.2f} {writes:7.2f} {ran:8.2f}"
                )
    probe.close()
    await cluster.close()


if __name__ == "__main__":
    with redis_server() as port:
        uvloop.run(main(port))
