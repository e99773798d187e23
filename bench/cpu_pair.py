"""CPU per chunk of lean and of the minimal relay, measured in alternating rounds.

    python -m bench.cpu_pair [--rounds 6] [--streams 400] [--chunks 200] [--interval 0.025]
                             [--wire openai|messages|responses|scene-sse|scene-ndjson|scene-ws]

The load bench (`python -m bench`) runs the relay and lean minutes apart, and on this VM
the same relay has measured 27-52 µs per chunk from one run to the next; a ratio of two
such figures moves with the machine. Here one mock, one relay and one lean run side by
side (both pinned to the target core, each idle while the other is measured) and the
load alternates between them, so each round's ratio compares two loads a few seconds
apart. Prints every round and the median ratio; the target of issue 5 is <= 1.25x.
The load: `--streams` concurrent streams of `--chunks` chunks `--interval` s apart,
read to the end by aiohttp clients on the harness core.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import aiohttp
import uvloop

from bench.harness.procs import Child, cores, free_port, pin_self, python, wait_http
from bench.harness.sampler import cpu_seconds
from bench.harness.scenarios import SCENARIOS
from bench.harness.targets import Lean, Mock
from bench.harness.wires import BENCH_MODEL, BENCH_SCENE

WIRES = ("openai", "messages", "responses", "scene-sse", "scene-ndjson", "scene-ws")
_OPENAI_BODY = b'{"model":"%s","stream":true,"messages":[{"role":"user","content":"Hi"}]}'
_MESSAGES_BODY = (
    b'{"model":"%s","max_tokens":1024,"stream":true,"messages":[{"role":"user","content":"Hi"}]}'
)
_RESPONSES_BODY = b'{"model":"%s","stream":true,"input":"Hi"}'
# The first line of a content event, per wire (an Anthropic or a Responses event is two lines).
CONTENT_LINES = (
    b'data: {"id"',
    b"event: content_block_delta",
    b"event: response.output_text.delta",
    b"event: delta",
    b'{"type":"delta"',
)


def targets_of(wire: str, port: int) -> tuple[str, bytes, str]:
    """(url, body, Accept) of one stream of `wire` on lean at `port`."""
    base = f"127.0.0.1:{port}/v1"
    if wire == "openai":
        return f"http://{base}/chat/completions", _OPENAI_BODY % BENCH_MODEL.encode(), "*/*"
    if wire == "messages":
        return f"http://{base}/messages", _MESSAGES_BODY % BENCH_MODEL.encode(), "*/*"
    if wire == "responses":
        return f"http://{base}/responses", _RESPONSES_BODY % BENCH_MODEL.encode(), "*/*"
    if wire == "scene-ws":
        run = b'{"type":"run","runId":"r1","scene":"%s","message":"Hi"}' % BENCH_SCENE.encode()
        return f"ws://{base}/ws", run, ""
    accept = "application/x-ndjson" if wire == "scene-ndjson" else "text/event-stream"
    return f"http://{base}/scenes/{BENCH_SCENE}/stream", b'{"message":"Hi"}', accept


async def load(url: str, body: bytes, accept: str, streams: int) -> int:
    """Run `streams` streams to their end at once; the content events received.
    A `ws://` url runs each stream as one run on a WebSocket of its own."""
    received = 0

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal received
        headers = {"Content-Type": "application/json", "Accept": accept}
        async with session.post(url, data=body, headers=headers) as resp:
            resp.raise_for_status()
            async for line in resp.content:
                if line.startswith(CONTENT_LINES):
                    received += 1

    async def one_ws(session: aiohttp.ClientSession) -> None:
        nonlocal received
        async with session.ws_connect(url) as ws:
            await ws.send_bytes(body)
            async for message in ws:
                if '"type":"delta"' in message.data[:40]:
                    received += 1
                elif '"type":"done"' in message.data[:40]:
                    break

    run = one_ws if url.startswith("ws") else one
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(run(session) for _ in range(streams)))
    return received


def cpu_per_chunk(pid: int, target: tuple[str, bytes, str], streams: int) -> float:
    """CPU µs of process `pid` per content event while `streams` streams run to their end."""
    before = cpu_seconds(pid) or 0.0
    received = uvloop.run(load(*target, streams))
    return ((cpu_seconds(pid) or 0.0) - before) * 1e6 / max(1, received)


def paired_rounds(
    rounds: int, names: tuple[str, str], measure: Callable[[str], float]
) -> tuple[dict[str, list[float]], list[float]]:
    """`measure(name)` (CPU µs per chunk) of both `names`, `rounds` times, in ABBA order so
    that a drift of the machine weighs on both alike; each round printed. The figures by
    name, and each round's ratio of the second to the first."""
    first, second = names
    per_chunk: dict[str, list[float]] = {first: [], second: []}
    for round_number in range(1, rounds + 1):
        for name in names if round_number % 4 in (1, 0) else names[::-1]:
            per_chunk[name].append(measure(name))
        a, b = per_chunk[first][-1], per_chunk[second][-1]
        print(
            f"round {round_number}: {first} {a:.1f} µs/chunk, {second} {b:.1f} µs/chunk,"
            f" {second}/{first} {b / a:.3f}",
            flush=True,
        )
    ratios = [b / a for a, b in zip(per_chunk[first], per_chunk[second], strict=True)]
    return per_chunk, ratios


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_pair", description=__doc__)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--streams", type=int, default=400)
    parser.add_argument("--chunks", type=int, default=200)
    parser.add_argument("--interval", type=float, default=0.025)
    parser.add_argument("--wire", choices=WIRES, default="openai")
    args = parser.parse_args()
    target_core, harness_core = cores()
    pin_self(harness_core)
    workdir = Path(tempfile.mkdtemp(prefix="lean-cpu-pair-"))
    mock_port, relay_port, lean_port = free_port(), free_port(), free_port()
    mock_args = ["--port", str(mock_port), "--chunks", str(args.chunks)]
    mock_args += ["--interval", str(args.interval)]
    relay_args = ["--port", str(relay_port), "--upstream", f"http://127.0.0.1:{mock_port}/v1"]
    children = [
        Child("mock", python("bench.harness.mock", *mock_args), core=harness_core,
              log=workdir / "mock.log"),
        Child("relay", python("bench.harness.relay", *relay_args), core=target_core,
              log=workdir / "relay.log"),
    ]  # fmt: skip
    # lean on the load bench's own config for this scenario (what `make bench` measures).
    config = Lean().config(
        SCENARIOS["realistic"](False),
        Mock(children[0], mock_port, 0, None),
        lean_port,
        workdir,
        "cpu-pair",
    )
    (workdir / "lean.ini").write_text(config)
    children.append(
        Child(
            "lean",
            python("lean", "serve", "--config", str(workdir / "lean.ini")),
            core=target_core,
            log=workdir / "lean.log",
            env=dict(os.environ),
        )
    )
    mock, relay, lean = children
    try:
        wait_http(mock, mock_port, "/stats")
        wait_http(relay, relay_port)
        wait_http(lean, lean_port)
        relay_url = f"http://127.0.0.1:{relay_port}/v1/chat/completions"
        targets = {
            "relay": (relay, (relay_url, _OPENAI_BODY % BENCH_MODEL.encode(), "*/*")),
            "lean": (lean, targets_of(args.wire, lean_port)),
        }
        for _, target in targets.values():
            uvloop.run(load(*target, 4))  # warm up

        def measure(name: str) -> float:
            child, target = targets[name]
            return cpu_per_chunk(child.pid, target, args.streams)

        per_chunk, ratios = paired_rounds(args.rounds, ("relay", "lean"), measure)
        print(
            f"median: relay {statistics.median(per_chunk['relay']):.1f} µs/chunk, lean "
            f"{statistics.median(per_chunk['lean']):.1f} µs/chunk; lean/relay "
            f"{statistics.median(ratios):.2f}x (rounds {min(ratios):.2f}-{max(ratios):.2f}x; "
            "target <= 1.25x)"
        )
    finally:
        for child in children:
            child.stop()


if __name__ == "__main__":
    main()
