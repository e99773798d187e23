"""CPU per chunk and KB per stream of one dialect against Chat Completions, on one lean.

    python -m bench.cpu_dialects [--wire messages|responses] [--rounds 6] [--streams 400]
                                 [--chunks 200] [--interval 0.025]

One mock and one lean (pinned to the target core, on the load bench's config for
`realistic`); the load alternates between `/v1/chat/completions` streams and `--wire`
streams in ABBA order, as `bench.cpu_ab` alternates revisions, so each round's ratio
compares two loads a few seconds apart. The same upstream stream (the mock's chunks)
behind both: what differs is only the dialect lean writes. Prints every round and the
median ratios (target of issue 11: <= 1.05x CPU per chunk).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
from pathlib import Path

import aiohttp
import uvloop

from bench.cpu_pair import CONTENT_LINES, WIRES, paired_rounds, targets_of
from bench.harness.procs import Child, cores, free_port, pin_self, python, wait_http
from bench.harness.sampler import cpu_seconds
from bench.harness.scenarios import SCENARIOS
from bench.harness.targets import Lean, Mock


async def load(url: str, body: bytes, accept: str, streams: int) -> tuple[int, int]:
    """Run `streams` streams to their end at once: (content events, body bytes) received."""
    received = 0
    size = 0

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal received, size
        headers = {"Content-Type": "application/json", "Accept": accept}
        async with session.post(url, data=body, headers=headers) as resp:
            resp.raise_for_status()
            async for line in resp.content:
                size += len(line)
                if line.startswith(CONTENT_LINES):
                    received += 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(one(session) for _ in range(streams)))
    return received, size


def measure(pid: int, target: tuple[str, bytes, str], streams: int) -> tuple[float, float]:
    """(CPU µs of `pid` per content event, KB per stream) while `streams` streams run."""
    before = cpu_seconds(pid) or 0.0
    received, size = uvloop.run(load(*target, streams))
    cpu = ((cpu_seconds(pid) or 0.0) - before) * 1e6 / max(1, received)
    return cpu, size / 1000 / streams


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_dialects", description=__doc__)
    parser.add_argument("--wire", choices=[w for w in WIRES if w != "openai"], default="messages")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--streams", type=int, default=400)
    parser.add_argument("--chunks", type=int, default=200)
    parser.add_argument("--interval", type=float, default=0.025)
    args = parser.parse_args()
    target_core, harness_core = cores()
    pin_self(harness_core)
    workdir = Path(tempfile.mkdtemp(prefix="lean-cpu-dialects-"))
    mock_port, lean_port = free_port(), free_port()
    mock_args = ["--port", str(mock_port), "--chunks", str(args.chunks)]
    mock_args += ["--interval", str(args.interval)]
    mock = Child("mock", python("bench.harness.mock", *mock_args), core=harness_core,
                 log=workdir / "mock.log")  # fmt: skip
    config = Lean().config(
        SCENARIOS["realistic"](False), Mock(mock, mock_port, 0, None), lean_port, workdir,
        "cpu-dialects",
    )  # fmt: skip
    (workdir / "lean.ini").write_text(config)
    lean = Child("lean", python("lean", "serve", "--config", str(workdir / "lean.ini")),
                 core=target_core, log=workdir / "lean.log", env=dict(os.environ))  # fmt: skip
    wires = ("openai", args.wire)
    try:
        wait_http(mock, mock_port, "/stats")
        wait_http(lean, lean_port)
        for wire in wires:
            uvloop.run(load(*targets_of(wire, lean_port), 4))  # warm up
        kb: dict[str, list[float]] = {wire: [] for wire in wires}

        def cpu_of(wire: str) -> float:
            us, size = measure(lean.pid, targets_of(wire, lean_port), args.streams)
            kb[wire].append(size)
            return us

        cpu, ratios = paired_rounds(args.rounds, wires, cpu_of)
        kb_ratio = statistics.median(kb[args.wire]) / statistics.median(kb["openai"])
        print(
            f"median ({args.streams} streams x {args.chunks} chunks): openai "
            f"{statistics.median(cpu['openai']):.1f} µs/chunk, {args.wire} "
            f"{statistics.median(cpu[args.wire]):.1f} µs/chunk; {args.wire}/openai CPU "
            f"{statistics.median(ratios):.3f} (rounds {min(ratios):.3f}-{max(ratios):.3f}); "
            f"KB/stream {statistics.median(kb['openai']):.1f} vs "
            f"{statistics.median(kb[args.wire]):.1f} ({kb_ratio:.3f}x); target <= 1.05x"
        )
    finally:
        lean.stop()
        mock.stop()


if __name__ == "__main__":
    main()
