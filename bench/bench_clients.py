"""What a request pays for clients' limits (lean.clients): one admission and its end, for
the default client (metrics only) and for a client with every limit (MemoryLimiter), and
the auth middleware's token comparison as the number of tokens grows. Per request, never
per chunk.

Run: .venv/bin/python -m bench.bench_clients   (~5 s)
"""

from __future__ import annotations

import hmac
import statistics
import time

import uvloop

from lean.clients import DEFAULT, Clients
from lean.config import parse_config
from lean.metrics import Metrics
from lean.providers.base import Usage

N = 200_000
REPEATS = 5
CONFIG = """
[provider.demo]
kind = demo
[model.default]
provider = demo
upstream_model = lean-demo
[client.app]
token_env = APP
max_streams = 1000000
requests_per_minute = 1000000000
tokens_per_day = 1000000000000
"""


async def admissions(clients: Clients, limited: bool) -> float:
    """µs per admit + end."""
    client = next(c for _, c in clients.tokens if c.name == "app") if limited else DEFAULT
    usage = Usage(10, 20)
    start = time.perf_counter()
    for _ in range(N):
        (await clients.admit(client)).end(usage)
    return (time.perf_counter() - start) / N * 1e6


def comparisons(tokens: int) -> float:
    """µs for the auth middleware's loop over `tokens` tokens (lean.app.auth_middleware)."""
    table = [(f"token-{i:04d}-abcdefghijklmnop".encode(), DEFAULT) for i in range(tokens)]
    given = bytes(bytearray(table[-1][0]))  # equal, not the same object: as a request's
    rounds = N // 10
    start = time.perf_counter()
    for _ in range(rounds):
        found = None
        for token, client in table:
            found = (found, client)[hmac.compare_digest(given, token)]
    return (time.perf_counter() - start) / rounds * 1e6


async def main() -> None:
    config = parse_config(CONFIG, environ={"APP": "app-token"})
    clients = Clients(config, Metrics())
    default = statistics.median([await admissions(clients, False) for _ in range(REPEATS)])
    limited = statistics.median([await admissions(clients, True) for _ in range(REPEATS)])
    print(f"admit + end, median of {REPEATS} x {N:,}")
    print(f"  default client (metrics only)       {default:8.2f} µs")
    print(f"  client with every limit (in memory) {limited:8.2f} µs")
    print("auth middleware, compare with every token")
    for tokens in (1, 10, 100):
        print(f"  {tokens:4d} tokens                          {comparisons(tokens):8.2f} µs")


if __name__ == "__main__":
    uvloop.run(main())
