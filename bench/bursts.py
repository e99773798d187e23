"""`python -m bench.bursts`: after a burst, is lean's RSS held objects or heap not given back?

lean runs in this process (so its objects can be counted), the mock provider and
the load in child processes. Two bursts, as in issue 10 item 12:

1. `--stalled` readers ask for a 1.6 MB stream and never read: lean cuts them after
   `slow_client_timeout` (2 s here);
2. `--fallbacks` requests at once whose streaming path fails and whose whole
   (non-streaming) answer is 16 MB (`[limits] fallback_budget_mb` = `--budget-mb`).

After each, once lean is idle again: RSS, Python's allocated blocks
(`sys.getallocatedblocks`, the objects held) and `gc.get_objects()` count; then the
same after `gc.collect()`; then after glibc's `malloc_trim(0)`. With `--auto-trim`
lean's own idle trim (lean.upkeep) is left on and the "idle" figures include it.
Run it with `MALLOC_ARENA_MAX=2` in the environment to compare glibc's arenas.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import msgspec
import uvloop

from lean.app import Server
from lean.config import parse_config
from lean.handlers import services_key
from lean.metrics import resident_bytes

MB = 1024 * 1024


def config_text(mock_port: int, db: Path, budget_mb: int) -> str:
    return f"""
[server]
host = 127.0.0.1
port = 8080
[auth]
tokens_env = LEAN_BURSTS_NO_TOKENS
[store]
path = {db}
[limits]
slow_client_timeout = 2
fallback_budget_mb = {budget_mb}
[provider.mock]
kind = openai
base_url = http://127.0.0.1:{mock_port}/v1
[model.mock]
provider = mock
upstream_model = mock-model
"""


# --- the load (a child process) -----------------------------------------------------------


async def stalled(port: int, n: int, hold: float) -> None:
    body = msgspec.json.encode(
        {
            "model": "mock",
            "messages": [{"role": "user", "content": "[bench chunks=400 interval=0 size=4096]"}],
            "stream": True,
        }
    )
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (port, len(body))
    )
    loop = asyncio.get_running_loop()
    socks = []
    for _ in range(n):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, head + body)
        socks.append(sock)
    await asyncio.sleep(hold)  # never read: lean must cut them
    for sock in socks:
        sock.close()


async def fallbacks(port: int, n: int) -> None:
    body = {
        "model": "mock",
        "messages": [
            {"role": "user", "content": "[bench whole] [bench chunks=4000 interval=0 size=4000]"}
        ],
        "stream": False,
    }
    statuses: dict[int, int] = {}

    async def one(http: aiohttp.ClientSession) -> None:
        async with http.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as resp:
            async for _ in resp.content.iter_chunked(MB):
                pass
            statuses[resp.status] = statuses.get(resp.status, 0) + 1

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        await asyncio.gather(*(one(http) for _ in range(n)))
    print(" ".join(f"HTTP {s}: {c}" for s, c in sorted(statuses.items())), flush=True)


# --- lean, measured (this process) ------------------------------------------------------


def figures() -> tuple[float, int, int]:
    return resident_bytes() / MB, sys.getallocatedblocks(), len(gc.get_objects())


def show(label: str, f: tuple[float, int, int]) -> str:
    return f"| {label} | {f[0]:.1f} | {f[1]:,} | {f[2]:,} |"


async def run_load(*args: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.bursts", "--load", *args
    )
    await proc.wait()


async def measure(args: argparse.Namespace) -> list[str]:
    workdir = Path(tempfile.mkdtemp(prefix="lean-bursts-"))
    mock_port = _free_port()
    mock = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.harness.mock", "--port", str(mock_port)
    )
    try:
        await asyncio.sleep(1.5)
        config = parse_config(config_text(mock_port, workdir / "lean.db", args.budget_mb))
        server = Server(config, port=0)
        await server.start()
        services = server.app[services_key]
        services.upkeep.auto_trim = args.auto_trim
        libc = ctypes.CDLL("libc.so.6")
        rows = ["| moment | RSS MB | allocated blocks | gc objects |", "|---|---:|---:|---:|"]
        gc.collect()
        rows.append(show("idle, before", figures()))

        async def after(name: str) -> None:
            while len(services.streams):  # noqa: ASYNC110 - polled, as an operator would
                await asyncio.sleep(0.1)
            await asyncio.sleep(2.0)
            rows.append(show(f"{name}: idle 2 s after", figures()))
            gc.collect()
            rows.append(show(f"{name}: + gc.collect()", figures()))
            began = time.perf_counter()
            libc.malloc_trim(0)
            took = (time.perf_counter() - began) * 1000
            rows.append(show(f"{name}: + malloc_trim(0) ({took:.1f} ms)", figures()))

        if args.stalled:
            await run_load("stalled", str(server.port), str(args.stalled))
            await after(f"{args.stalled} stalled readers")
        if args.fallbacks:
            peak_before = _hwm()
            await run_load("fallbacks", str(server.port), str(args.fallbacks))
            peak = f"peak RSS during the fallbacks: {_hwm():.0f} MB; before: {peak_before:.0f}"
            rows.append(f"| ({peak}) | | | |")
            await after(f"{args.fallbacks} fallbacks of 16 MB")
        await server.stop()
        return rows
    finally:
        mock.terminate()
        await mock.wait()


def _hwm() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    if sys.argv[1:2] == ["--load"]:
        kind, port, n = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            if kind == "stalled":
                runner.run(stalled(port, n, hold=6.0))
            else:
                runner.run(fallbacks(port, n))
        return
    parser = argparse.ArgumentParser(
        prog="python -m bench.bursts", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--stalled", type=int, default=500)
    parser.add_argument("--fallbacks", type=int, default=20)
    parser.add_argument("--budget-mb", type=int, default=48, help="[limits] fallback_budget_mb")
    parser.add_argument("--auto-trim", action="store_true", help="leave lean's idle trim on")
    args = parser.parse_args()
    started = time.monotonic()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        rows = runner.run(measure(args))
    arena = os.environ.get("MALLOC_ARENA_MAX", "glibc default")
    print(
        f"\npython -m bench.bursts {' '.join(sys.argv[1:])}  (MALLOC_ARENA_MAX: {arena}; "
        f"{time.monotonic() - started:.0f} s)"
    )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
