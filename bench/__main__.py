"""`python -m bench` (`make bench`): the load bench of issue 5.

    python -m bench soak [--minutes 30] [--users N] ...   (the long soak: bench/soak.py)
    python -m bench [--scenarios a,b] [--targets direct,relay,lean] [--wires openai,scene-sse,...]
                    [--budget-mb N] [--quick] [--retries N] [--output PATH]

Runs each scenario against each target in separate processes (mock provider, target,
load generator; see bench/harness/), prints one row per scenario and target, writes
them to bench/RESULTS.md, and exits 1 when a peak RSS passes the budget or a normal
stream fails. The micro-benches stay runnable on their own (python -m bench.bench_sse).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path

from bench.harness.runner import main
from bench.harness.scenarios import SCENARIOS
from bench.harness.targets import TARGETS
from bench.harness.wires import WIRES

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def _names(value: str, known: Mapping[str, object], what: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {', '.join(unknown) or '(none)'}; known: {', '.join(known)}"
        )
    return names


def cli(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["soak"]:
        from bench import soak

        return soak.cli(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--scenarios",
        type=lambda v: _names(v, SCENARIOS, "scenario"),
        default=list(SCENARIOS),
        help=f"comma-separated, from {','.join(SCENARIOS)} (default: all)",
    )
    parser.add_argument(
        "--targets",
        type=lambda v: _names(v, TARGETS, "target"),
        default=list(TARGETS),
        help=f"comma-separated, from {','.join(TARGETS)} (default: all; direct first gives "
        "the added time to first chunk)",
    )
    parser.add_argument(
        "--wires",
        type=lambda v: _names(v, WIRES, "wire"),
        default=None,
        help=f"client kinds for lean's streams, from {','.join(WIRES)} (default: all; openai "
        "with --quick); lean gets one row per wire, the reference targets speak openai",
    )
    parser.add_argument("--budget-mb", type=int, default=384, help="peak RSS budget (384)")
    parser.add_argument(
        "--quick", action="store_true", help="~10x smaller, OpenAI wire: a smoke run < 60 s"
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=None,
        help="runs disturbed by other processes (> 10%% of a core) are run again, up to N "
        "times (default 2, 0 with --quick)",
    )
    parser.add_argument(
        "--output", default=str(RESULTS), help="where to write the results ('-': nowhere)"
    )
    args = parser.parse_args(argv)
    return main(
        args.scenarios,
        args.targets,
        budget_mb=args.budget_mb,
        quick=args.quick,
        output=args.output,
        retries=args.retries if args.retries is not None else (0 if args.quick else 2),
        wires=args.wires or (["openai"] if args.quick else list(WIRES)),
    )


if __name__ == "__main__":
    sys.exit(cli())
