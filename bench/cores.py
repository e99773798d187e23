"""Two lean instances on two cores against one on one core: chunks/s at saturation and CPU
per chunk (issue 13, "Every core of one VPS").

    python -m bench.cores [--rounds 3] [--streams 128] [--chunks 4000] [--wire scene-sse|openai]
                          [--upstream c|python]

The same load each time: `--streams` streams of `--chunks` content chunks sent back to back
by a fake upstream, all started at once and read to the end. Three targets, started once and
loaded in turn, round after round (ABC ABC ...):

- `one`: one lean pinned to core 1; the upstream and the load generator on core 0.
- `two, reuse_port`: two leans sharing one port (`[server] reuse_port`), pinned to cores 0
  and 1; the kernel places each connection; the harness floats over both cores.
- `two, a port each`: the same two-core layout, one port per instance, the load generator
  sends half of the streams to each (what nginx in front does, without nginx's own CPU).

The machine has 2 cores, so with two instances the harness competes with lean for them: to
keep that cost small the load generator is curl (C, `--parallel`, each body to a file in
tmpfs) rather than the Python one of `python -m bench`, and the upstream is
bench/cores_upstream.c (the Python mock's exact bytes, built once per stream length and
written 64 KB at a time; `--upstream python` uses the mock itself, which writes 16 chunks
at a time). What the harness and every other process on the machine took is
printed beside each figure. CPU per chunk counts lean's processes only (utime + stime of
each, all threads, from /proc), so the harness cannot inflate it. Scene runs save their
answers: two instances commit to one SQLite file (WAL).

Each stream's body is kept (tmpfs) and checked: HTTP 200 and the end of a finished stream,
so a chunk counts only when its whole stream arrived.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness.procs import Child, free_port, python, wait_http
from bench.harness.sampler import core_busy, cpu_seconds, memory_kb
from bench.harness.wires import BENCH_MODEL, BENCH_SCENE

WIRES = ("scene-sse", "openai")


@dataclass
class Target:
    name: str
    leans: list[Child]
    ports: list[int]  # the streams are split evenly over these
    harness_cores: set[int]  # where the mock and curl may run during its loads
    rounds: list[dict[str, float]] = field(default_factory=list)


def config(port: int, mock_port: int, db: Path, *, reuse_port: bool, instance: str) -> str:
    return f"""\
# written by python -m bench.cores
[server]
host = 127.0.0.1
port = {port}
reuse_port = {"true" if reuse_port else "false"}
drain_timeout = 2
max_connections = 25000

[auth]
tokens_env = LEAN_BENCH_NO_TOKENS

[store]
path = {db}

[cluster]
instance = {instance}

[limits]
max_streams = 20000

[provider.mock]
kind = openai
base_url = http://127.0.0.1:{mock_port}/v1

[model.{BENCH_MODEL}]
provider = mock
upstream_model = mock-model

[scene.{BENCH_SCENE}]
model = {BENCH_MODEL}
template = {{message}}
history_turns = 0
"""


def request(wire: str, port: int, chunks: int) -> tuple[str, bytes, str]:
    """(url, body, Accept) of one stream."""
    ask = f"[bench chunks={chunks} interval=0 size=4]"
    if wire == "openai":
        body = {
            "model": BENCH_MODEL,
            "stream": True,
            "bench_chunks": chunks,
            "bench_interval": 0,
            "messages": [{"role": "user", "content": "Hi"}],
        }
        return f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(), "*/*"
    url = f"http://127.0.0.1:{port}/v1/scenes/{BENCH_SCENE}/stream"
    return url, json.dumps({"message": f"Hi {ask}"}).encode(), "text/event-stream"


def curl(
    wire: str, ports: list[int], streams: int, chunks: int, workdir: Path, out: Path
) -> list[str]:
    """The curl command that runs `streams` streams at once, split evenly over `ports`,
    each body to a file of its own in `out` (checked afterwards: `complete`)."""
    argv = ["curl", "-sS", "--no-progress-meter", "--parallel", "--parallel-immediate"]
    argv += ["--parallel-max", str(streams)]
    n = 0
    for i, port in enumerate(ports):
        url, body, accept = request(wire, port, chunks)
        path = workdir / f"body-{port}.json"
        path.write_bytes(body)
        if i:
            argv.append("--next")
        argv += ["-H", "Content-Type: application/json", "-H", f"Accept: {accept}"]
        argv += ["-f", "--data-binary", f"@{path}"]
        share = streams // len(ports) + (1 if i < streams % len(ports) else 0)
        for _ in range(share):
            argv += ["-o", str(out / f"{n}.body"), url]
            n += 1
    return argv


# How a stream read to its end ends, by wire. lean joins the text of several chunks into
# one event for a client that is behind, so a complete body's size varies: what counts is
# that it ends as a finished stream does (a scene run's `done` event also carries the text).
ENDS = {"scene-sse": b"\nevent: done\n", "openai": b"data: [DONE]\n\n"}
STOP = {"scene-sse": b'"finishReason":"stop"', "openai": b'"finish_reason":"stop"'}


def complete(out: Path, wire: str) -> tuple[int, int]:
    """(streams read to their end, others) among the bodies in `out`; empties `out`."""
    ok = bad = 0
    for body in out.iterdir():
        data = body.read_bytes()
        end = data.rfind(ENDS[wire])
        if end >= 0 and data.endswith(b"\n\n") and data.rfind(STOP[wire]) >= end - 4096:
            ok += 1
        else:
            bad += 1
        body.unlink()
    return ok, bad


def run_load(argv: list[str], cores: set[int]) -> tuple[float, float]:
    """(wall seconds, curl's CPU seconds)."""
    pinned = ["taskset", "-c", ",".join(map(str, sorted(cores))), *argv]
    _children_cpu_delta()
    started = time.monotonic()
    subprocess.run(pinned, stdout=subprocess.DEVNULL, timeout=600, check=False)
    wall = time.monotonic() - started
    return wall, _children_cpu_delta()


_last_children = 0.0


def _children_cpu_delta() -> float:
    """CPU of reaped children (curl) since the previous call."""
    global _last_children
    times = os.times()
    total = times.children_user + times.children_system
    delta, _last_children = total - _last_children, total
    return delta


def wait_quiet(ours: list[Child], limit: float, most: float) -> float:
    """Wait up to `limit` s for a second in which other processes use under `most` cores
    (ours idle between loads); the other processes' cores in the last second sampled."""
    deadline = time.monotonic() + limit
    while True:
        busy0 = sum(core_busy({0, 1}).values())
        cpu0 = sum(cpu_seconds(c.pid) or 0.0 for c in ours)
        time.sleep(1.0)
        others = sum(core_busy({0, 1}).values()) - busy0
        others -= sum(cpu_seconds(c.pid) or 0.0 for c in ours) - cpu0
        if others < most or time.monotonic() > deadline:
            return others
        print(f"  waiting for quiet cores: others use {others:.2f}")


def measure(target: Target, mock: Child, argv: list[str], out: Path, wire: str) -> dict[str, float]:
    os.sched_setaffinity(mock.pid, target.harness_cores)
    cpu0 = [cpu_seconds(c.pid) or 0.0 for c in target.leans]
    mock0 = cpu_seconds(mock.pid) or 0.0
    busy0 = core_busy({0, 1})
    wall, curl_cpu = run_load(argv, target.harness_cores)
    busy = sum(core_busy({0, 1}).values()) - sum(busy0.values())
    lean_cpu = [(cpu_seconds(c.pid) or 0.0) - c0 for c, c0 in zip(target.leans, cpu0, strict=True)]
    mock_cpu = (cpu_seconds(mock.pid) or 0.0) - mock0
    ok, failed = complete(out, wire)
    return {
        "wall": wall,
        "complete": ok,
        "failed": failed,
        "lean_cpu": sum(lean_cpu),
        "lean_share": max(lean_cpu) / sum(lean_cpu) if sum(lean_cpu) else 0.0,
        "harness_cpu": mock_cpu + curl_cpu,
        "mock_cpu": mock_cpu,
        "others_cpu": max(0.0, busy - sum(lean_cpu) - mock_cpu - curl_cpu),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cores", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams", type=int, default=128)
    parser.add_argument("--chunks", type=int, default=4000)
    parser.add_argument("--wire", choices=WIRES, default="scene-sse")
    parser.add_argument(
        "--upstream",
        choices=("c", "python"),
        default="c",
        help="the fake upstream: bench/cores_upstream.c (built with cc) or bench/harness/mock.py",
    )
    parser.add_argument(
        "--quiet", type=float, default=0.3, help="cores other processes may use before a load"
    )
    parser.add_argument("--quiet-wait", type=float, default=120.0, help="seconds to wait for it")
    args = parser.parse_args(argv)
    if len(os.sched_getaffinity(0)) < 2 or not shutil.which("curl"):
        print("python -m bench.cores needs 2 cores and curl")
        return 2
    if args.upstream == "c" and not shutil.which("cc"):
        print("no C compiler (cc): use --upstream python")
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="lean-bench-cores-"))
    # Bodies in memory (tmpfs when there is one): writing them costs curl a copy, no disk.
    shm = Path("/dev/shm")
    out = Path(tempfile.mkdtemp(prefix="lean-bench-cores-", dir=shm if shm.is_dir() else None))
    children: list[Child] = []
    env = {k: v for k, v in os.environ.items() if k != "LEAN_BENCH_NO_TOKENS"}

    def lean(name: str, port: int, core: int, *, reuse_port: bool, db: str) -> Child:
        path = workdir / f"{name}.ini"
        path.write_text(config(port, mock_port, workdir / db, reuse_port=reuse_port, instance=name))
        child = Child(
            name,
            python("lean", "serve", "--config", str(path)),
            core=core,
            log=workdir / f"{name}.log",
            env=env,
        )
        children.append(child)
        return child

    try:
        mock_port = free_port()
        command = python("bench.harness.mock", "--port", str(mock_port))
        if args.upstream == "c":
            binary = workdir / "cores_upstream"
            source = Path(__file__).with_name("cores_upstream.c")
            subprocess.run(["cc", "-O2", "-o", str(binary), str(source)], check=True)
            command = [str(binary), str(mock_port)]
        mock = Child("mock", command, core=0, log=workdir / "mock.log")
        children.append(mock)
        wait_http(mock, mock_port)
        one_port, shared_port, port_a, port_b = (free_port() for _ in range(4))
        targets = [
            Target("one", [lean("one", one_port, 1, reuse_port=False, db="one.db")],
                   [one_port], {0}),
            Target("two, reuse_port",
                   [lean("rp-0", shared_port, 0, reuse_port=True, db="rp.db"),
                    lean("rp-1", shared_port, 1, reuse_port=True, db="rp.db")],
                   [shared_port], {0, 1}),
            Target("two, a port each",
                   [lean("pe-0", port_a, 0, reuse_port=False, db="pe.db"),
                    lean("pe-1", port_b, 1, reuse_port=False, db="pe.db")],
                   [port_a, port_b], {0, 1}),
        ]  # fmt: skip
        for target in targets:
            for child, port in zip(target.leans, target.ports * 2, strict=False):
                wait_http(child, port)
        idle_kb = {c.name: memory_kb(c.pid).get("VmRSS", 0) for c in children[1:]}
        for target in targets:  # warm-up: every instance's first runs, not measured
            run_load(curl(args.wire, target.ports, 16, 200, workdir, out), target.harness_cores)
            complete(out, args.wire)
        for round_ in range(args.rounds):
            for target in targets:
                argv_ = curl(args.wire, target.ports, args.streams, args.chunks, workdir, out)
                wait_quiet(children, args.quiet_wait, args.quiet)
                result = measure(target, mock, argv_, out, args.wire)
                target.rounds.append(result)
                print(f"round {round_ + 1} {target.name}: {_line(result, args.chunks)}")
        _report(targets, args, idle_kb, children)
    finally:
        for child in reversed(children):
            child.stop()
        shutil.rmtree(out, ignore_errors=True)
    print(f"logs and configs: {workdir}")
    return 0


def _rates(result: dict[str, float], chunks: int) -> tuple[float, float]:
    """(chunks/s, lean CPU µs per chunk)."""
    received = result["complete"] * chunks
    return received / result["wall"], result["lean_cpu"] * 1e6 / max(received, 1)


def _line(result: dict[str, float], chunks: int) -> str:
    rate, cpu = _rates(result, chunks)
    wall = result["wall"]
    return (
        f"{rate:,.0f} chunks/s, {cpu:.2f} µs lean CPU/chunk, lean {result['lean_cpu'] / wall:.2f}"
        f" cores (busiest instance {result['lean_share']:.0%} of it), harness"
        f" {result['harness_cpu'] / wall:.2f} (mock {result['mock_cpu'] / wall:.2f}),"
        f" others {result['others_cpu'] / wall:.2f};"
        f" {result['complete']:.0f} ok / {result['failed']:.0f} failed"
    )


def _report(
    targets: list[Target], args: argparse.Namespace, idle_kb: dict[str, int], children: list[Child]
) -> None:
    """Per round, each target against `one` in the same round (seconds apart); the medians
    over the quiet rounds: those where other processes took under `--quiet` cores during
    all three loads (every round when none was quiet)."""
    one = targets[0]
    rounds = range(len(one.rounds))
    quiet = [
        i
        for i in rounds
        if all(t.rounds[i]["others_cpu"] / t.rounds[i]["wall"] < args.quiet for t in targets)
    ]
    chosen = quiet or list(rounds)
    print(
        f"\n{args.streams} streams x {args.chunks} chunks, wire {args.wire}, upstream"
        f" {args.upstream}; medians of {len(chosen)} {'quiet ' if quiet else ''}rounds of"
        f" {len(one.rounds)} (rounds {', '.join(str(i + 1) for i in chosen)}):"
    )
    print("| target | chunks/s | vs one | lean CPU µs/chunk | vs one | harness cores |")
    for target in targets:
        rate = [_rates(target.rounds[i], args.chunks)[0] for i in chosen]
        cpu = [_rates(target.rounds[i], args.chunks)[1] for i in chosen]
        base_rate = [_rates(one.rounds[i], args.chunks)[0] for i in chosen]
        base_cpu = [_rates(one.rounds[i], args.chunks)[1] for i in chosen]
        rate_x = [r / b for r, b in zip(rate, base_rate, strict=True)]
        cpu_x = [c / b for c, b in zip(cpu, base_cpu, strict=True)]
        harness = [target.rounds[i]["harness_cpu"] / target.rounds[i]["wall"] for i in chosen]
        print(
            f"| {target.name} | {statistics.median(rate):,.0f} |"
            f" {statistics.median(rate_x):.2f}x ({min(rate_x):.2f}-{max(rate_x):.2f}) |"
            f" {statistics.median(cpu):.2f} |"
            f" {statistics.median(cpu_x):.2f}x ({min(cpu_x):.2f}-{max(cpu_x):.2f}) |"
            f" {statistics.median(harness):.2f} |"
        )
    for child in children[1:]:
        kb = memory_kb(child.pid)
        print(
            f"{child.name}: RSS idle {idle_kb.get(child.name, 0) / 1024:.1f} MB,"
            f" peak {kb.get('VmHWM', 0) / 1024:.1f} MB"
        )


if __name__ == "__main__":
    raise SystemExit(main())
