"""Peak RSS of one lean holding half the `crowd` (issue 5's 10,000 connections): what each of
two instances on a 2-vCPU VPS holds, for their `MemoryMax` (docs/deploy.md).

    python -m bench.cores_memory [--wires ws,scene-sse] [--output -]

Runs the load bench's `crowd` scenario (bench/harness/scenarios.py) and `crowd-half`, the
same shape with half of every group (500 streams x 80 chunks at 4/s from a TLS upstream +
4,500 idle WebSockets), against lean, through the same runner as `python -m bench`. With
reuse_port the kernel splits the connections evenly (at 5,000 per instance the binomial
spread is under 1%), nginx's `least_conn` or `ip_hash` about as well, so one lean holding
half is one instance of two.
"""

from __future__ import annotations

import argparse
import dataclasses

from bench.harness import scenarios
from bench.harness.runner import main as run
from bench.harness.scenarios import Scenario


def crowd_half(quick: bool) -> Scenario:
    crowd = scenarios.crowd(quick)
    groups = tuple(dataclasses.replace(g, count=g.count // 2) for g in crowd.groups)
    streams = sum(g.count for g in groups if g.role != "idle")
    idle = sum(g.count for g in groups if g.role == "idle")
    return dataclasses.replace(
        crowd,
        name="crowd-half",
        groups=groups,
        summary=f"{streams + idle:,} connections: the crowd halved, one instance of two",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cores_memory", description=__doc__)
    parser.add_argument("--wires", default="ws", help="lean's stream wires (default: ws)")
    parser.add_argument("--output", default="-", help="a results file ('-': nowhere)")
    args = parser.parse_args(argv)
    scenarios.SCENARIOS["crowd-half"] = crowd_half  # the runner looks scenarios up here
    return run(
        ["crowd-half", "crowd"],
        ["lean"],
        budget_mb=384,
        quick=False,
        output=args.output,
        retries=1,
        wires=args.wires.split(","),
    )


if __name__ == "__main__":
    raise SystemExit(main())
