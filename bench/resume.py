"""What resumable runs cost: lean with its resume buffer against the same lean without.

    python -m bench.resume [--rounds 6] [--streams 400] [--chunks 200] [--interval 0.025]
                           [--finished 1000] [--wire scene-sse|scene-ndjson] [--same] [--on-first]

Three figures (issue 12's targets in brackets), and the buffer's own CPU per chunk measured
in-process (what the paired rounds' difference should be, give or take the machine):
- **Memory per stream** of the buffer, measured in-process with tracemalloc: a buffer fed
  a `--chunks`-chunk answer of the mock's chunks (4 characters each), from its start to
  its end [<= 8 KB more per active stream at 200 chunks].
- **CPU per chunk**, paired: one mock and two `lean serve` of this tree side by side on the
  target core, `[limits] resume_buffer_kb` 64 (on) and 0 (off), the load alternating in
  ABBA order as `bench.cpu_ab` does (separate runs of one lean differ by up to ±15% on this
  VM; paired rounds show a few percent) [<= 1.05x].
  The "on" lean drops a run's buffer at its end (`resume_ttl = 0`), so the peak RSS
  (VmHWM) of both after the rounds compares running streams only.
- **RSS with `--finished` finished runs buffered**: a third lean with the defaults
  (`resume_ttl = 120`) and the "off" one run that many more streams (in batches of
  `--streams`); their RSS is read once the streams ended, the buffers still held.
`--same` starts "on" without a buffer too: the ratio it prints is the method's own bias
and spread on this machine (an A/A check); `--on-first` starts "on" before "off" (the
leans otherwise start off, on, kept). The load is `--wire`: scene runs, the
resumable ones (not `scene-ws`: the load names every socket's run `r1`, and only one
running run can hold an id).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import uvloop

from bench.cpu_pair import cpu_per_chunk, load, paired_rounds, targets_of
from bench.harness.procs import Child, cores, free_port, pin_self, python, wait_http
from bench.harness.sampler import memory_kb
from bench.harness.scenarios import SCENARIOS
from bench.harness.targets import Lean, Mock
from lean import events
from lean.replay import Replay

WIRES = ("scene-sse", "scene-ndjson")


class _Run:
    """The text a run keeps anyway (`lean.replay.Live`): not the buffer's."""

    tools: Any = None

    def __init__(self, text: str) -> None:
        self.text = text

    def texts(self) -> tuple[str, str]:
        return self.text, ""

    def text_slice(self, thinking: bool, begin: int, end: int) -> str:
        return "" if thinking else self.text[begin:end]

    def readers_changed(self) -> None: ...

    def cancel(self) -> None: ...


def buffer_bytes(chunks: int) -> tuple[int, int]:
    """Bytes a buffer holds (running: after the last delta; finished: after `done`).

    Payloads are encoded before measuring, as lean encodes them for the client anyway; a
    delta's payload is not kept, `start`'s and `done`'s are: they count at their full size,
    and so does the copy of the answer's text a finished buffer keeps."""
    message_id = "bench:c_6f1d2e3a4b5c6d7e8f90:1"
    text = "lore"  # the mock's 4-character chunks
    start = events.Start("run_0123456789abcdef0123", message_id, "bench", "mock", "c_6f")
    delta = events.Delta(message_id=message_id, text=text)
    done = events.Done(message_id, "stop", events.Usage(8, chunks), text * chunks)
    start_payload = events.encode(start)
    delta_payload = events.encode(delta)
    done_payload = events.encode(done)
    run = _Run(text * chunks)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    replay = Replay(start.run_id, message_id, 64 * 1024, run)
    replay.add(start, 1, start_payload)
    for seq in range(2, chunks + 2):
        replay.add(delta, seq, delta_payload)
    running = tracemalloc.get_traced_memory()[0] - before + sys.getsizeof(start_payload)
    replay.add(done, chunks + 2, done_payload)
    replay.end()
    held = tracemalloc.get_traced_memory()[0] - before + sys.getsizeof(start_payload)
    tracemalloc.stop()
    return running, held + sys.getsizeof(done_payload)


def buffer_cpu(chunks: int, runs: int = 2000) -> float:
    """CPU µs per chunk of a buffer's own work, in-process: `runs` buffers each fed a
    `chunks`-chunk answer as `buffer_bytes` feeds one (start, deltas, done, end). What the
    paired rounds below see of the buffer, without the rest of lean around it."""
    message_id = "bench:c_6f1d2e3a4b5c6d7e8f90:1"
    start = events.Start("run_0123456789abcdef0123", message_id, "bench", "mock", "c_6f")
    delta = events.Delta(message_id=message_id, text="lore")
    done = events.Done(message_id, "stop", events.Usage(8, chunks), "lore" * chunks)
    payloads = [events.encode(e) for e in (start, delta, done)]
    run = _Run("lore" * chunks)
    began = time.process_time()
    for _ in range(runs):
        replay = Replay(start.run_id, message_id, 64 * 1024, run)
        replay.add(start, 1, payloads[0])
        for seq in range(2, chunks + 2):
            replay.add(delta, seq, payloads[1])
        replay.add(done, chunks + 2, payloads[2])
        replay.end()
    return (time.process_time() - began) * 1e6 / (runs * chunks)


def scrape(port: int, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.resume", description=__doc__)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--streams", type=int, default=400)
    parser.add_argument("--chunks", type=int, default=200)
    parser.add_argument("--interval", type=float, default=0.025)
    parser.add_argument("--finished", type=int, default=1000)
    parser.add_argument("--wire", choices=WIRES, default="scene-sse")
    parser.add_argument("--on-first", action="store_true", help="start 'on' before 'off'")
    parser.add_argument("--same", action="store_true", help="'on' without a buffer too (A/A)")
    args = parser.parse_args()

    running, held = buffer_bytes(args.chunks)
    print(
        f"buffer of a {args.chunks}-chunk run: {running / 1024:.1f} KB while it runs (before"
        f" done), {held / 1024:.1f} KB once finished (done holds the whole answer); target"
        " <= 8 KB per active stream",
        flush=True,
    )

    target_core, harness_core = cores()
    pin_self(harness_core)
    print(
        f"the buffer's own work, in-process: {buffer_cpu(args.chunks):.2f} µs CPU per chunk"
        " (a run's start, deltas, done and end; compare with the per-chunk figures below)",
        flush=True,
    )
    workdir = Path(tempfile.mkdtemp(prefix="lean-resume-"))
    mock_port = free_port()
    mock_args = ["--port", str(mock_port), "--chunks", str(args.chunks)]
    mock_args += ["--interval", str(args.interval)]
    mock = Child("mock", python("bench.harness.mock", *mock_args), core=harness_core,
                 log=workdir / "mock.log")  # fmt: skip
    leans: dict[str, tuple[Child, int]] = {}
    try:
        # off: no buffer; on: buffers dropped at the run's end (resume_ttl = 0), so its peak
        # RSS is the running streams'; kept: the defaults, finished runs kept 120 s.
        on_kb = 0 if args.same else 64  # --same: an A/A check of the method itself
        setups = [("off", 0, 0), ("on", on_kb, 0), ("kept", 64, 120)]
        if args.on_first:  # start "on" first: is a slot favoured? (see --same)
            setups[:2] = setups[1::-1]
        for name, kb, ttl in setups:
            port = free_port()
            config = Lean().config(
                SCENARIOS["realistic"](False), Mock(mock, mock_port, 0, None), port, workdir,
                f"resume-{name}",
            )  # fmt: skip
            limits = f"[limits]\nresume_buffer_kb = {kb}\nresume_ttl = {ttl}\n"
            config = config.replace("[limits]\n", limits)
            (workdir / f"{name}.ini").write_text(config)
            argv = python("lean", "serve", "--config", str(workdir / f"{name}.ini"))
            child = Child(name, argv, core=target_core, log=workdir / f"{name}.log",
                          env=dict(os.environ))  # fmt: skip
            leans[name] = (child, port)
        wait_http(mock, mock_port, "/stats")
        for child, port in leans.values():
            wait_http(child, port)
            uvloop.run(load(*targets_of(args.wire, port), 4))  # warm up

        def measure(name: str) -> float:
            child, port = leans[name]
            return cpu_per_chunk(child.pid, targets_of(args.wire, port), args.streams)

        per_chunk, ratios = paired_rounds(args.rounds, ("off", "on"), measure)
        print(
            f"median: off {statistics.median(per_chunk['off']):.1f} µs/chunk, on"
            f" {statistics.median(per_chunk['on']):.1f} µs/chunk; on/off"
            f" {statistics.median(ratios):.3f}x (rounds {min(ratios):.3f}-{max(ratios):.3f}x;"
            " target <= 1.05x)",
            flush=True,
        )
        hwm = {name: memory_kb(leans[name][0].pid).get("VmHWM", 0) for name in ("off", "on")}
        print(
            f"peak RSS: off {hwm['off'] / 1024:.1f} MB, on {hwm['on'] / 1024:.1f} MB"
            f" ({(hwm['on'] - hwm['off']) / args.streams:+.1f} KB per stream at"
            f" {args.streams} streams; noisy: the allocator's peak, not the buffers alone)",
            flush=True,
        )

        # RSS once `--finished` runs ended, their buffers still held by `kept`.
        rss: dict[str, int] = {}
        for name in ("off", "kept"):
            child, port = leans[name]
            left = args.finished
            while left > 0:
                batch = min(left, args.streams)
                uvloop.run(load(*targets_of(args.wire, port), batch))
                left -= batch
            time.sleep(1.5)  # the upkeep's trim after a busy spell (lean.upkeep)
            rss[name] = memory_kb(child.pid).get("VmRSS", 0)
        buffers = scrape(leans["kept"][1], "lean_resume_buffers")
        finished_bytes = scrape(leans["kept"][1], "lean_resume_finished_bytes")
        print(
            f"after {args.finished} more runs: RSS off {rss['off'] / 1024:.1f} MB, kept"
            f" {rss['kept'] / 1024:.1f} MB (+{(rss['kept'] - rss['off']) / 1024:.1f} MB,"
            f" {(rss['kept'] - rss['off']) / max(1, args.finished):.1f} KB per finished run);"
            f" kept holds {buffers:.0f} buffers, {finished_bytes / 1024:.0f} KB by its own"
            " count",
            flush=True,
        )
    finally:
        mock.stop()
        for child, _ in leans.values():
            child.stop()


if __name__ == "__main__":
    main()
