"""CPU per chunk of lean at two revisions, measured in alternating rounds: did a change pay?

    python -m bench.cpu_ab [--base HEAD] [--wire openai|scene-sse|scene-ndjson|scene-ws]
                           [--rounds 6] [--streams 400] [--chunks 200] [--interval 0.025]

`--base` (a git revision, checked out in a temporary worktree) and the working tree run
side by side on the target core, on the load bench's config for `realistic`, and the
load alternates between them (ABBA order), as `bench.cpu_pair` does for lean and the
relay. Separate runs of one lean differ by up to ±15% on this VM; paired rounds show a
change of a few percent. Prints every round and the median new/base ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

import uvloop

from bench.cpu_pair import WIRES, cpu_per_chunk, load, paired_rounds, targets_of
from bench.harness.procs import ROOT, Child, cores, free_port, pin_self, python, wait_http
from bench.harness.scenarios import SCENARIOS
from bench.harness.targets import Lean, Mock


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_ab", description=__doc__)
    parser.add_argument("--base", default="HEAD", help="git revision to compare against")
    parser.add_argument("--wire", choices=WIRES, default="scene-sse")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--streams", type=int, default=400)
    parser.add_argument("--chunks", type=int, default=200)
    parser.add_argument("--interval", type=float, default=0.025)
    args = parser.parse_args()
    target_core, harness_core = cores()
    pin_self(harness_core)
    workdir = Path(tempfile.mkdtemp(prefix="lean-cpu-ab-"))
    base_tree = workdir / "base"
    git = ["git", "-C", str(ROOT)]
    worktree = [*git, "worktree", "add", "--detach", "-q", str(base_tree), args.base]
    subprocess.run(worktree, check=True)
    mock_port = free_port()
    mock_args = ["--port", str(mock_port), "--chunks", str(args.chunks)]
    mock_args += ["--interval", str(args.interval)]
    mock = Child("mock", python("bench.harness.mock", *mock_args), core=harness_core,
                 log=workdir / "mock.log")  # fmt: skip
    leans: dict[str, tuple[Child, int]] = {}
    try:
        for name, tree in (("base", base_tree), ("new", ROOT)):
            port = free_port()
            (workdir / f"{name}-data").mkdir()
            config = Lean().config(
                SCENARIOS["realistic"](False), Mock(mock, mock_port, 0, None), port,
                workdir / f"{name}-data", "cpu-ab",
            )  # fmt: skip
            (workdir / f"{name}.ini").write_text(config)
            argv = python("lean", "serve", "--config", str(workdir / f"{name}.ini"))
            env = dict(os.environ, PYTHONPATH=str(tree))
            child = Child(name, argv, core=target_core, log=workdir / f"{name}.log", env=env,
                          cwd=tree)  # fmt: skip
            leans[name] = (child, port)
        wait_http(mock, mock_port, "/stats")
        for child, port in leans.values():
            wait_http(child, port)
            uvloop.run(load(*targets_of(args.wire, port), 4))  # warm up

        def measure(name: str) -> float:
            child, port = leans[name]
            return cpu_per_chunk(child.pid, targets_of(args.wire, port), args.streams)

        per_chunk, ratios = paired_rounds(args.rounds, ("base", "new"), measure)
        print(
            f"median ({args.wire}, {args.streams} streams x {args.chunks} chunks): base "
            f"{args.base} {statistics.median(per_chunk['base']):.1f} µs/chunk, new "
            f"{statistics.median(per_chunk['new']):.1f} µs/chunk; new/base "
            f"{statistics.median(ratios):.3f} (rounds {min(ratios):.3f}-{max(ratios):.3f})"
        )
    finally:
        for child, _ in leans.values():
            child.stop()
        mock.stop()
        subprocess.run([*git, "worktree", "remove", "--force", str(base_tree)], check=False)


if __name__ == "__main__":
    main()
