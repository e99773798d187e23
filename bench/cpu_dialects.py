"""CPU per chunk and KB per stream of one lean's client dialects, in alternating rounds.

    python -m bench.cpu_dialects [--wires openai,responses] [--rounds 8] [--streams 400]
                                 [--chunks 200] [--interval 0.025]

One mock and one lean (pinned to the target core) run side by side, and the load
alternates between the wires in ABBA order, as `bench.cpu_ab` does for two revisions: the
same answer (`--chunks` content chunks from the mock's Chat Completions stream) asked for
through `/v1/chat/completions` (`openai`) and through another dialect's route. Both
figures divide by the upstream's content chunks (`--streams` x `--chunks`), so a dialect
that writes more events per chunk pays for them. Prints every round and, per wire, the
median against the first wire (the target of issue 11 is <= 1.05x).
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

from bench.cpu_pair import WIRES, targets_of
from bench.harness.procs import Child, cores, free_port, pin_self, python, wait_http
from bench.harness.sampler import cpu_seconds
from bench.harness.scenarios import SCENARIOS
from bench.harness.targets import Lean, Mock


async def load(url: str, body: bytes, accept: str, streams: int) -> int:
    """Run `streams` streams to their end at once; the body bytes received."""
    received = 0

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal received
        headers = {"Content-Type": "application/json", "Accept": accept}
        async with session.post(url, data=body, headers=headers) as resp:
            resp.raise_for_status()
            async for data in resp.content.iter_any():
                received += len(data)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(one(session) for _ in range(streams)))
    return received


def measure(
    pid: int, target: tuple[str, bytes, str], streams: int, chunks: int
) -> tuple[float, float]:
    """(CPU µs of `pid` per upstream chunk, KB per stream) while `streams` streams run."""
    before = cpu_seconds(pid) or 0.0
    received = uvloop.run(load(*target, streams))
    cpu = (cpu_seconds(pid) or 0.0) - before
    return cpu * 1e6 / (streams * chunks), received / streams / 1024


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_dialects", description=__doc__)
    parser.add_argument("--wires", default="openai,responses", help="the reference wire first")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--streams", type=int, default=400)
    parser.add_argument("--chunks", type=int, default=200)
    parser.add_argument("--interval", type=float, default=0.025)
    args = parser.parse_args()
    wires = args.wires.split(",")
    if len(wires) < 2 or any(wire not in WIRES or wire.startswith("scene-ws") for wire in wires):
        parser.error(f"--wires: two or more of {', '.join(WIRES[:-1])}")
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
    try:
        wait_http(mock, mock_port, "/stats")
        wait_http(lean, lean_port)
        targets = {wire: targets_of(wire, lean_port) for wire in wires}
        for target in targets.values():
            uvloop.run(load(*target, 4))  # warm up
        cpu: dict[str, list[float]] = {wire: [] for wire in wires}
        kb: dict[str, list[float]] = {wire: [] for wire in wires}
        for round_number in range(1, args.rounds + 1):
            order = wires if round_number % 4 in (1, 0) else wires[::-1]  # ABBA
            for wire in order:
                us, size = measure(lean.pid, targets[wire], args.streams, args.chunks)
                cpu[wire].append(us)
                kb[wire].append(size)
            print(
                f"round {round_number}: "
                + ", ".join(f"{w} {cpu[w][-1]:.1f} µs/chunk {kb[w][-1]:.1f} KB" for w in wires),
                flush=True,
            )
        base = wires[0]
        for wire in wires[1:]:
            ratios = [a / b for a, b in zip(cpu[wire], cpu[base], strict=True)]
            print(
                f"median ({args.streams} streams x {args.chunks} chunks): {base} "
                f"{statistics.median(cpu[base]):.1f} µs/chunk {statistics.median(kb[base]):.1f}"
                f" KB/stream, {wire} {statistics.median(cpu[wire]):.1f} µs/chunk "
                f"{statistics.median(kb[wire]):.1f} KB/stream; CPU {wire}/{base} "
                f"{statistics.median(ratios):.3f} (rounds {min(ratios):.3f}-{max(ratios):.3f}), "
                f"KB {statistics.median(kb[wire]) / statistics.median(kb[base]):.3f}"
            )
    finally:
        lean.stop()
        mock.stop()


if __name__ == "__main__":
    main()
