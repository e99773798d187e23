"""Peak RSS of issue 5's crowd with 1,000 finished runs still in their resume buffers
(issue 12, "Performance and memory").

    python -m bench.crowd_resume [--rounds 2] [--finished 1000] [--chunks 200]
                                 [--wire scene-sse] [--output -]

Three variants of the load bench's `crowd` scenario (bench/harness/scenarios.py: 9,000
idle WebSockets + 1,000 streams x 80 chunks at 4/s from a TLS upstream), each on a fresh
lean through the load bench's own runner (`bench.harness.runner.Bench.run`):
- **crowd**: the crowd alone (lean's defaults: `[limits] resume_buffer_kb = 64`,
  `resume_ttl = 120`).
- **crowd-resume**: first `--finished` scene runs of `--chunks` chunks (4 characters each,
  SSE, `--concurrency` at once, read to `done`), so each sits finished in its buffer; lean's
  /metrics must show them (`lean_resume_buffers`, `lean_resume_finished_bytes`) before the
  crowd starts and still after it ends, or the row says so. Then the crowd.
- **crowd-resume-off**: the same runs first, with `resume_buffer_kb = 0`: what those runs
  leave in lean besides their buffers (the store's caches, the allocator's arenas).
The crowd's streams are `--wire` (scene-sse by default: resumable runs, so the crowd's own
runs have buffers too where the variant keeps them). The order of the variants alternates
from round to round (ABC, CBA, ...): the machine is shared and its load drifts.
A finished run's buffer lives `resume_ttl` (120 s); the runs go first, then at most
`--patience` s waiting for quiet cores, then the crowd (~35 s), so they are all still held
when it peaks: checked, not assumed.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

import msgspec
import uvloop

from bench.cpu_pair import load
from bench.harness import scenarios
from bench.harness.loadgen import Result
from bench.harness.procs import cores, pin_self, raise_nofile
from bench.harness.report import Row
from bench.harness.runner import Bench, _interrupt
from bench.harness.sampler import Sampler, memory_kb
from bench.harness.scenarios import Scenario
from bench.harness.targets import Endpoint, Lean, Mock, Target
from bench.harness.wires import WIRES, Ask

METRICS = ("lean_resume_buffers", "lean_resume_finished_bytes")


def metrics(port: int) -> dict[str, float]:
    """lean's resume gauges from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    found = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in METRICS:
            found[name] = float(value)
    return found


class ResumeLean(Lean):
    """lean with `resume_buffer_kb` set, which first runs `finished` scene runs to their
    end (when `finished` > 0) and notes the RSS and the resume gauges before and after."""

    def __init__(self, buffer_kb: int, finished: int, ask: Ask, concurrency: int) -> None:
        self.buffer_kb = buffer_kb
        self.finished = finished
        self.ask = ask
        self.concurrency = concurrency
        self.notes: dict[str, float] = {}

    def config(self, scenario: Scenario, mock: Mock, port: int, workdir: Path, label: str) -> str:
        text = super().config(scenario, mock, port, workdir, label)
        return text.replace("[limits]\n", f"[limits]\nresume_buffer_kb = {self.buffer_kb}\n")

    def start(
        self, scenario: Scenario, mock: Mock, workdir: Path, core: int | None, label: str
    ) -> Endpoint:
        endpoint = super().start(scenario, mock, workdir, core, label)
        assert endpoint.child is not None
        self.notes = {"fresh_kb": memory_kb(endpoint.child.pid).get("VmRSS", 0)}
        if self.finished:
            url = f"http://127.0.0.1:{endpoint.port}/v1/scenes/bench/stream"
            body = msgspec.json.encode({"message": self.ask.marker() + " Tell me a story."})
            began, left, received = time.monotonic(), self.finished, 0
            while left > 0:
                batch = min(left, self.concurrency)
                received += uvloop.run(load(url, body, "text/event-stream", batch))
                left -= batch
            self.notes["runs_s"] = time.monotonic() - began
            self.notes["deltas"] = received
            time.sleep(1.5)  # the upkeep's trim after a busy spell (lean.upkeep)
            self.notes["runs_kb"] = memory_kb(endpoint.child.pid).get("VmRSS", 0)
            self.notes.update({f"before {k}": v for k, v in metrics(endpoint.port).items()})
        self.notes["ran_at"] = time.monotonic()
        return endpoint


class ResumeBench(Bench):
    """The runner's Bench, reading the resume gauges once the crowd has ended (before
    the runner stops lean)."""

    endpoint: Endpoint | None = None
    after: dict[str, float] = {}  # noqa: RUF012 (set per run)
    ended_at = 0.0

    def start_target(self, target: Target, scenario: Scenario, mock: Mock, label: str) -> Endpoint:
        self.endpoint = super().start_target(target, scenario, mock, label)
        return self.endpoint

    def fill(self, row: Row, result: Result, sampler: Sampler) -> None:
        super().fill(row, result, sampler)
        if self.endpoint is not None:
            self.after = metrics(self.endpoint.port)
            self.ended_at = time.monotonic()


def describe(name: str, row: Row, notes: dict[str, float], after: dict[str, float]) -> str:
    mb = 1024
    parts = [
        f"{name}: {row.ok:,} ok / {row.failed:,} failed",
        f"fresh {notes['fresh_kb'] / mb:.1f} MB",
    ]
    if "runs_kb" in notes:
        parts.append(
            f"after the runs {notes['runs_kb'] / mb:.1f} MB ({notes['runs_s']:.1f} s,"
            f" {notes['deltas']:,.0f} deltas; buffers"
            f" {notes.get('before lean_resume_buffers', 0):,.0f},"
            f" {notes.get('before lean_resume_finished_bytes', 0) / 1024:,.0f} KB by lean's count)"
        )
    parts.append(f"idle (before the crowd) {(row.idle_kb or 0) / mb:.1f} MB")
    parts.append(f"peak {(row.peak_kb or 0) / mb:.1f} MB")
    parts.append(
        f"after the crowd: buffers {after.get('lean_resume_buffers', 0):,.0f},"
        f" {after.get('lean_resume_finished_bytes', 0) / 1024:,.0f} KB"
    )
    noise = max(row.other_target_pct or 0.0, row.other_harness_pct or 0.0)
    parts.append(f"others {noise:.0f}% of a core")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.crowd_resume", description=__doc__)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--finished", type=int, default=1000)
    parser.add_argument("--chunks", type=int, default=200)
    parser.add_argument("--interval", type=float, default=0.01)
    parser.add_argument("--concurrency", type=int, default=250)
    parser.add_argument("--wire", choices=sorted(WIRES), default="scene-sse")
    parser.add_argument("--patience", type=float, default=15.0)
    parser.add_argument("--quick", action="store_true", help="the crowd ~10x smaller")
    args = parser.parse_args(argv)

    ask = Ask(chunks=args.chunks, interval=args.interval, size=4)
    variants: dict[str, ResumeLean] = {
        "crowd": ResumeLean(64, 0, ask, args.concurrency),
        "crowd-resume": ResumeLean(64, args.finished, ask, args.concurrency),
        "crowd-resume-off": ResumeLean(0, args.finished, ask, args.concurrency),
    }
    target_core, harness_core = cores()
    pin_self(harness_core)
    raise_nofile()
    workdir = Path(tempfile.mkdtemp(prefix="lean-crowd-resume-"))
    print(f"crowd_resume: logs in {workdir}", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)  # children stopped in `finally`, as the runner does
    signal.signal(signal.SIGINT, _interrupt)
    bench = ResumeBench(workdir, target_core, harness_core, patience=args.patience)
    scenario = scenarios.crowd(args.quick)
    peaks: dict[str, list[float]] = {name: [] for name in variants}
    lines: list[str] = []
    mock = bench.start_mock(scenario)
    try:
        for round_number in range(args.rounds):
            order = list(variants)
            if round_number % 2:
                order.reverse()
            for name in order:
                target = variants[name]
                bench.after = {}
                # A name of its own: the run's files (store, log) are named after it.
                named = dataclasses.replace(scenario, name=f"{name}-{round_number + 1}")
                row = bench.run(named, target, mock, args.wire)
                line = describe(name, row, target.notes, bench.after)
                if target.finished and "runs_s" in target.notes:
                    age = bench.ended_at - target.notes["ran_at"]
                    line += f"; their buffers were {age:.0f} s old when the crowd ended"
                if row.problems:
                    line += "; PROBLEMS: " + " | ".join(p[:300] for p in row.problems)
                print(f"round {round_number + 1}: {line}", flush=True)
                lines.append(line)
                if row.peak_kb:
                    peaks[name].append(row.peak_kb / 1024)
    finally:
        mock.child.stop(grace=3)
        bench.stop_all()
    print()
    for name, values in peaks.items():
        if values:
            print(
                f"{name}: peak RSS {min(values):.1f}-{max(values):.1f} MB"
                f" (median {statistics.median(values):.1f}, {len(values)} runs)"
            )
    for other in ("crowd", "crowd-resume-off"):
        pairs = list(zip(peaks["crowd-resume"], peaks[other], strict=False))
        if pairs:
            diffs = [a - b for a, b in pairs]
            print(
                f"crowd-resume - {other}, same round: "
                + ", ".join(f"{d:+.1f}" for d in diffs)
                + " MB"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
