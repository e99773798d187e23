"""One row per scenario and target, the issue's targets checked, RESULTS.md written."""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import os
import platform
import statistics
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Row:
    scenario: str
    target: str
    measured: bool
    ok: int = 0  # normal streams and idle connections that did what they should
    failed: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    chunks: int = 0  # content chunks the clients received
    window: float = 0.0  # seconds from the first request to the last stream's end
    cpu_s: float | None = None  # the target's CPU seconds in the window
    ttfc_ms: list[float] = field(default_factory=list)  # normal streams: p50, p99, max
    gap_ms: list[float] = field(default_factory=list)
    idle_kb: int | None = None
    peak_kb: int | None = None
    connections: int = 0
    stalled: int = 0
    evicted: int = 0
    harness_cpu_s: float | None = None  # mock + load generator in the window
    other_target_pct: float | None = None  # other processes' CPU on the target's core
    other_harness_pct: float | None = None  # ... and on the harness core
    mock_cut: int = 0  # upstream streams the mock saw cut by its client
    log_status: dict[str, int] = field(default_factory=dict)
    # half-second windows with late gaps from at least half the streams (the target stalled
    # as a whole): (s after the load began, late gaps, worst gap ms)
    pauses: list[tuple[float, int, float]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    nofile: str = ""
    cpu_rounds: list[float] = field(default_factory=list)  # µs per chunk of every round

    @property
    def chunks_per_s(self) -> float:
        return self.chunks / self.window if self.window > 0 else 0.0

    @property
    def cpu_us(self) -> float | None:
        if self.cpu_s is None or not self.chunks:
            return None
        return self.cpu_s / self.chunks * 1e6

    @property
    def kb_per_stream(self) -> float | None:
        if self.peak_kb is None or self.idle_kb is None or not self.connections:
            return None
        return (self.peak_kb - self.idle_kb) / self.connections

    @property
    def harness_pct(self) -> float | None:
        if self.harness_cpu_s is None or self.window <= 0:
            return None
        return 100 * self.harness_cpu_s / self.window


def _f(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _pair(values: list[float], base: list[float] | None = None) -> str:
    if not values:
        return "—"
    if base is not None:
        if not base:
            return "—"
        return f"{values[0] - base[0]:+.1f} / {values[1] - base[1]:+.1f}"
    return f"{values[0]:.1f} / {values[1]:.1f}"


def _mb(kb: int | None) -> str:
    return "—" if kb is None else f"{kb / 1024:.1f}"


HEADER = (
    "| scenario | target | ok / failed | chunks/s | CPU µs/chunk | TTFC p50/p99 ms "
    "| added TTFC p50/p99 ms | gap p50/p99 ms | idle MB | peak MB | KB/stream "
    "| evictions | harness core | others t/h |\n"
    "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def _others(r: Row) -> str:
    if r.other_target_pct is None or r.other_harness_pct is None:
        return "—"
    return f"{max(0.0, r.other_target_pct):.0f}% / {max(0.0, r.other_harness_pct):.0f}%"


def table(rows: list[Row]) -> str:
    direct = {r.scenario: r.ttfc_ms for r in rows if r.target == "direct"}
    lines = [HEADER]
    for r in rows:
        added = "—" if r.target == "direct" or r.scenario not in direct else None
        lines.append(
            "| "
            + " | ".join(
                [
                    r.scenario,
                    r.target,
                    f"{r.ok:,} / {r.failed:,}",
                    f"{r.chunks_per_s:,.0f}",
                    _f(r.cpu_us),
                    _pair(r.ttfc_ms),
                    added if added is not None else _pair(r.ttfc_ms, direct[r.scenario]),
                    _pair(r.gap_ms),
                    _mb(r.idle_kb),
                    _mb(r.peak_kb),
                    _f(r.kb_per_stream),
                    f"{r.evicted}/{r.stalled}" if r.stalled else "—",
                    "—" if r.harness_pct is None else f"{r.harness_pct:.0f}%",
                    _others(r),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def checks(rows: list[Row], budget_mb: int) -> list[str]:
    """The issue's targets, each with its verdict, for every lean row (one per wire) whose
    scenario ran; `info` lines are figures the issue names without a scenario to judge."""
    by = {(r.scenario, r.target): r for r in rows}
    leans = list(dict.fromkeys(r.target for r in rows if r.target.split()[0] == "lean"))
    out: list[str] = []

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    relay = by.get(("realistic", "relay"))
    for name in leans:
        lean = by.get(("realistic", name))
        if lean and relay and lean.cpu_us and relay.cpu_us:
            rounds = list(zip(lean.cpu_rounds, relay.cpu_rounds, strict=False))
            if len(rounds) > 1:  # paired rounds: the median of their ratios
                ratios = sorted(mine / theirs for mine, theirs in rounds)
                ratio = statistics.median(ratios)
                how = f"median of {len(ratios)} rounds, {ratios[0]:.2f}-{ratios[-1]:.2f}x; "
            else:
                ratio, how = lean.cpu_us / relay.cpu_us, ""
            out.append(
                f"{verdict(ratio <= 1.25)} realistic: {name} CPU per chunk {lean.cpu_us:.1f} µs "
                f"vs the minimal relay's {relay.cpu_us:.1f} µs: {ratio:.2f}x ({how}"
                "target <= 1.25x)"
            )
    for name in leans:
        row = by.get(("realistic", name))  # every stream active at once, plain-HTTP upstream
        if row and row.kb_per_stream is not None:
            out.append(
                f"{verdict(row.kb_per_stream <= 40)} realistic: {name} "
                f"{row.kb_per_stream:.1f} KB RSS per active stream (target <= 40 KB)"
            )
        row = by.get(("ttfb", name))
        if row and row.kb_per_stream is not None:
            out.append(
                f"info ttfb: {name} {row.kb_per_stream:.1f} KB RSS per active stream, where "
                f"{row.ok:,} runs pass through the streams in turn: for scene runs this includes "
                "what saving their answers adds to the process (SQLite's caches, the store "
                "threads' heap)"
            )
        row = by.get(("throughput", name))
        if row and row.kb_per_stream is not None:
            out.append(
                f"info throughput: {name} {row.kb_per_stream:.1f} KB RSS per stream while "
                "chunks arrive faster than it relays them (read buffers full; varies run to run)"
            )
    idles = [r.idle_kb for r in rows if r.target in leans and r.idle_kb is not None]
    if idles:
        out.append(
            f"{verdict(max(idles) <= 50 * 1024)} lean idle RSS {min(idles) / 1024:.1f}–"
            f"{max(idles) / 1024:.1f} MB (target <= 50 MB)"
        )
    for name in leans:
        row = by.get(("crowd", name))
        if row:
            peak = (row.peak_kb or 0) / 1024
            out.append(
                f"{verdict(row.failed == 0 and peak <= budget_mb)} crowd: {name} {row.failed} "
                f"failed of {row.ok + row.failed:,}, peak RSS {peak:.1f} MB "
                f"(target: none failed, <= {budget_mb} MB)"
            )
    for name in leans:
        row = by.get(("slow-clients", name))
        if row:
            out.append(
                f"{verdict(row.failed == 0 and row.evicted == row.stalled)} slow-clients: {name} "
                f"normal streams {row.ok} ok / {row.failed} failed (gap p99 "
                f"{_pair(row.gap_ms).split(' / ')[-1]} ms); {row.evicted} of {row.stalled} "
                "stalled clients evicted (target: normal unaffected, every stalled one evicted)"
            )
    direct = by.get(("ttfb", "direct"))
    for name in leans:
        row = by.get(("ttfb", name))
        if row and direct and row.ttfc_ms and direct.ttfc_ms:
            added = row.ttfc_ms[1] - direct.ttfc_ms[1]
            out.append(
                f"{verdict(added <= 5)} ttfb: {name} adds {added:+.1f} ms to time to first chunk "
                f"at p99 ({row.ttfc_ms[1]:.1f} vs direct {direct.ttfc_ms[1]:.1f}; target <= 5 ms)"
            )
    return out


def failures(rows: list[Row], budget_mb: int) -> list[str]:
    """Why `python -m bench` exits non-zero: budgets broken, normal streams failed, crashes."""
    out: list[str] = []
    for r in rows:
        where = f"{r.scenario}/{r.target}"
        if r.failed:
            out.append(f"{where}: {r.failed} normal streams or connections failed")
        if r.peak_kb is not None and r.peak_kb > budget_mb * 1024:
            out.append(f"{where}: peak RSS {r.peak_kb / 1024:.1f} MB > budget {budget_mb} MB")
        out.extend(f"{where}: {p}" for p in r.problems if p.startswith("crashed"))
    return out


def notes(rows: list[Row]) -> list[str]:
    out: list[str] = []
    for r in rows:
        where = f"{r.scenario}/{r.target}"
        if r.reasons:
            reasons = "; ".join(f"{n} x {why}" for why, n in r.reasons.items())
            out.append(f"{where} failures: {reasons}")
        if r.log_status:
            statuses = ", ".join(f"{k}={v}" for k, v in sorted(r.log_status.items()))
            out.append(f"{where} lean log, runs by status: {statuses}")
        if r.pauses:
            shown = ", ".join(f"{t:.1f} s ({n} late, worst {g:.0f} ms)" for t, n, g in r.pauses[:6])
            out.append(
                f"{where}: {len(r.pauses)} half-second windows where the target stalled as a "
                f"whole (late gaps > 2 intervals from at least half the streams), after the load "
                f"began: {shown}"
            )
        if r.stalled and r.peak_kb is not None and r.idle_kb is not None:
            out.append(
                f"{where}: (peak − idle) RSS per stalled stream "
                f"{(r.peak_kb - r.idle_kb) / r.stalled:,.0f} KB"
            )
        if len(r.cpu_rounds) > 1:
            figures = ", ".join(f"{us:.1f}" for us in r.cpu_rounds)
            out.append(f"{where}: CPU µs per chunk by round: {figures}")
        if r.mock_cut:
            out.append(f"{where}: the mock saw {r.mock_cut} upstream streams cut by their client")
        out.extend(f"{where}: {p}" for p in r.problems)
    return out


def versions() -> str:
    names = ("aiohttp", "msgspec", "uvloop")
    parts = [f"python {platform.python_version()}"]
    for name in names:
        try:
            parts.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{name} missing")
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        parts.append(f"lean {importlib.metadata.version('lean')}")
    return ", ".join(parts)


def machine(pinning: str) -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 1024 / 1024:.1f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    cpu = f" ({model})" if model else ""
    return f"{os.cpu_count()} cores{cpu}{mem}, Linux {platform.release()}; {pinning}"


LEGEND = """\
- **ok / failed**: normal streams read to `[DONE]` with every content chunk (and, in crowd,
  idle connections that answered again at the end) / the rest; stalled streams are not counted.
- **chunks/s**: content chunks the clients received / the load window (first request sent →
  last stream ended). **CPU µs/chunk**: the target's utime+stime in the window / those chunks.
- **TTFC**: request sent → first content chunk; **added**: minus `direct`'s in the same scenario.
  **gap**: between consecutive content chunks of a stream (0 when they arrived in one read).
- **idle MB**: VmRSS after start-up and one warm-up stream; **peak MB**: VmHWM after the load;
  **KB/stream**: (peak − idle) / client connections held at once.
- **evictions**: stalled streams the target cut / stalled streams.
- **harness core**: CPU of the mock + load generator (pinned together on the other core) over the
  window; well under 100% means the harness was not the bottleneck.
- **others t/h**: CPU of processes outside the bench on the target's core / the harness core
  during the window (from /proc/stat). Above a few % the row's timings are disturbed; the bench
  waits up to 60 s (5 s with --quick) for quiet cores before each run.
"""


def markdown(
    rows: list[Row],
    *,
    command: str,
    budget_mb: int,
    pinning: str,
    scenario_lines: list[str],
    workdir: str,
    elapsed: float,
) -> str:
    failed = failures(rows, budget_mb)
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    parts = [
        "# lean load bench results",
        "",
        f"- date: {now} ({elapsed:.0f} s)",
        f"- command: `{command}`",
        f"- versions: {versions()}",
        f"- machine: {machine(pinning)}",
        f"- budget: peak RSS <= {budget_mb} MB; verdict: "
        + ("**FAIL**" if failed else "**pass** (no budget broken, no normal stream failed)"),
        "",
        table(rows),
        "",
        LEGEND,
        "## Scenarios",
        "",
        *[f"- {line}" for line in scenario_lines],
        "",
    ]
    checked = checks(rows, budget_mb)
    if checked:
        parts += ["## Targets of issue 5", "", *[f"- {c}" for c in checked], ""]
    if failed:
        parts += ["## Failures (exit status 1)", "", *[f"- {f}" for f in failed], ""]
    extra = notes(rows)
    if extra:
        parts += ["## Notes", "", *[f"- {n}" for n in extra], ""]
    parts += [f"Logs of this run (lean's stderr, configs): `{workdir}`", ""]
    parts += [
        "What changed in the hot path, before and after each change, with the commands that "
        "measured it: `docs/performance.md` (this file is rewritten by every run).",
        "",
    ]
    return "\n".join(parts)
