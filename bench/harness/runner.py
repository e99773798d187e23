"""Runs the scenarios against the targets, one fresh target process per run.

Per scenario: a mock (with a certificate made now when the scenario is TLS). Per
target: start it, one warm-up stream, idle RSS, then the load generator with the
sampler watching; peak RSS (VmHWM) at the end; stop it; read its log. Every child
is stopped in `finally`, also on Ctrl-C, SIGTERM or an error.
"""

from __future__ import annotations

import http.client
import os
import re
import shlex
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from types import FrameType

import msgspec

from bench.harness import tls
from bench.harness.loadgen import Group, Plan, Result
from bench.harness.procs import (
    Child,
    cores,
    free_port,
    nofile_of,
    pin_self,
    python,
    raise_nofile,
    wait_http,
)
from bench.harness.report import Row, failures, markdown, table
from bench.harness.sampler import Sampler, core_busy, memory_kb
from bench.harness.scenarios import SCENARIOS, Scenario
from bench.harness.targets import TARGETS, Endpoint, Mock, Target

NOISY = 10.0  # % of a core used by processes outside the bench during a run: run it again
_STATUS = re.compile(r" status=(\S+)(?: code=(\S+))?")


class Bench:
    def __init__(
        self, workdir: Path, target_core: int | None, harness_core: int | None, patience: float
    ) -> None:
        self.workdir = workdir
        self.patience = patience
        self.look = 0.25 if patience < 30 else 0.5  # seconds of /proc/stat per quiet check
        self.target_core = target_core
        self.harness_core = harness_core
        self.children: list[Child] = []

    def spawn(
        self,
        name: str,
        argv: list[str],
        *,
        core: int | None,
        log: str,
        env: dict[str, str] | None = None,
    ) -> Child:
        child = Child(name, argv, core=core, log=self.workdir / log, env=env)
        self.children.append(child)
        return child

    def stop_all(self, keep: Child | None = None) -> None:
        for child in reversed(self.children):
            if child is not keep:
                child.stop(grace=5)
        self.children = [keep] if keep is not None and keep in self.children else []

    def start_mock(self, scenario: Scenario) -> Mock:
        port = free_port()
        argv = python("bench.harness.mock", "--port", str(port))
        cert: Path | None = None
        tls_port = 0
        if scenario.tls:
            cert, key = tls.make_cert(self.workdir)
            tls_port = free_port()
            argv += ["--tls-port", str(tls_port), "--cert", str(cert), "--key", str(key)]
        if scenario.mock_sndbuf:
            argv += ["--sndbuf", str(scenario.mock_sndbuf)]
        child = self.spawn("mock", argv, core=self.harness_core, log=f"mock-{scenario.name}.log")
        wait_http(child, port)
        return Mock(child, port, tls_port, cert)

    def start_target(self, target: Target, scenario: Scenario, mock: Mock, label: str) -> Endpoint:
        endpoint = target.start(scenario, mock, self.workdir, self.target_core, label)
        if endpoint.child is not None:
            self.children.append(endpoint.child)
        return endpoint

    def plan(
        self, scenario: Scenario, target: Target, endpoint: Endpoint, mock: Mock, wire: str
    ) -> Plan:
        groups = []
        for spec in scenario.groups:
            idle = spec.role == "idle"
            groups.append(
                Group(
                    name=spec.name,
                    role=spec.role,
                    wire=target.client_for(spec.wire if idle else wire),
                    port=endpoint.idle_port if idle else endpoint.port,
                    tls=False if idle else endpoint.tls,
                    count=spec.count,
                    repeat=spec.repeat,
                    ramp=spec.ramp,
                    chunks=spec.chunks,
                    interval=spec.interval,
                    size=spec.size,
                    stall_after=spec.stall_after,
                    stall_for=spec.stall_for,
                    check_for=spec.check_for,
                    rcvbuf=spec.rcvbuf,
                    mss=spec.mss,
                )
            )
        cafile = str(mock.cert) if mock.cert else ""
        return Plan(groups=groups, deadline=scenario.deadline, cafile=cafile)

    def run(self, scenario: Scenario, target: Target, mock: Mock, wire: str) -> Row:
        name = target.name if wire == "openai" else f"{target.name} {wire}"
        row = Row(scenario=scenario.name, target=name, measured=target.measured)
        row.connections = scenario.connections
        stem = f"{scenario.name}-{name.replace(' ', '-')}"
        endpoint = self.start_target(target, scenario, mock, stem)
        child = endpoint.child
        if child is not None:
            warm_up(endpoint.port)
            time.sleep(0.3)
            row.idle_kb = memory_kb(child.pid).get("VmRSS")
            row.nofile = nofile_of(child.pid)
        self.wait_quiet()
        cores = {c for c in (self.target_core, self.harness_core) if c is not None}
        sampler = Sampler(cores)
        sampler.watch("runner", os.getpid())
        sampler.watch("mock", mock.child.pid)
        if child is not None:
            sampler.watch("target", child.pid)
        sampler.start()
        cut_before = mock.stats()["cut"]
        plan_path = self.workdir / f"plan-{stem}.json"
        result_path = self.workdir / f"result-{stem}.json"
        plan_path.write_bytes(
            msgspec.json.encode(self.plan(scenario, target, endpoint, mock, wire))
        )
        load = self.spawn(
            "loadgen",
            python("bench.harness.loadgen", str(plan_path), str(result_path)),
            core=self.harness_core,
            log=f"loadgen-{stem}.log",
        )
        sampler.watch("loadgen", load.pid)
        limit = time.monotonic() + scenario.deadline + 90  # idle phases, connects, stragglers
        while load.alive() and time.monotonic() < limit:
            if child is not None:
                child.check()
            time.sleep(0.1)
        if child is not None:
            row.peak_kb = memory_kb(child.pid).get("VmHWM")
        sampler.stop()
        (self.workdir / f"samples-{stem}.json").write_bytes(msgspec.json.encode(sampler.dump()))
        if load.alive():
            row.problems.append("the load generator overran its time limit and was killed")
        load.stop(grace=2)
        self.children.remove(load)
        if not result_path.exists():
            row.problems.append(f"the load generator wrote no result:\n{load.tail()}")
            row.failed = 1
        else:
            self.fill(row, msgspec.json.decode(result_path.read_bytes(), type=Result), sampler)
        try:
            row.mock_cut = mock.stats()["cut"] - cut_before
        except OSError:
            row.problems.append("the mock did not answer /stats after the run")
        if child is not None:
            child.check()
            if child.crashed is not None:
                row.problems.append(
                    f"crashed: {child.name} exited with {child.crashed} during the run:\n"
                    + child.tail()
                )
            code = child.stop()
            self.children.remove(child)
            if child.crashed is None and code not in (0, -signal.SIGTERM):
                row.problems.append(f"{child.name} exited with {code} on SIGTERM")
            if target.name == "lean":
                self.read_lean_log(child, row)
        return row

    def wait_quiet(self, threshold: float = 0.15) -> None:
        """Wait (up to `patience` s) while other processes keep a core > `threshold` busy."""
        cores = {c for c in (self.target_core, self.harness_core) if c is not None}
        if not cores:
            return
        deadline = time.monotonic() + self.patience
        told = False
        while True:
            before = core_busy(cores)
            time.sleep(self.look)
            after = core_busy(cores)
            busy = max(after[c] - before[c] for c in cores) / self.look
            if busy <= threshold or time.monotonic() > deadline:
                if told:
                    print(f" (busy {100 * busy:.0f}%, going on)", end="", flush=True)
                return
            if not told:
                print(
                    f" [waiting: other processes keep a core {100 * busy:.0f}% busy]",
                    end="",
                    flush=True,
                )
                told = True

    def run_quietest(
        self, scenario: Scenario, target: Target, mock: Mock, wire: str, retries: int
    ) -> Row:
        """Run; while other processes disturbed it (> NOISY % of a core), run again, up to
        `retries` times, and keep the least disturbed row."""
        best: Row | None = None
        for attempt in range(1 + retries):
            label = target.name if wire == "openai" else f"{target.name} {wire}"
            print(f"  {scenario.name} / {label} ...", end="", flush=True)
            began = time.monotonic()
            try:
                row = self.run(scenario, target, mock, wire)
            except (RuntimeError, OSError, http.client.HTTPException, msgspec.DecodeError) as exc:
                row = Row(scenario.name, label, target.measured, failed=1)
                row.problems.append(f"crashed: the run could not complete: {exc}")
                self.stop_all(keep=mock.child)
            noise = max(row.other_target_pct or 0.0, row.other_harness_pct or 0.0)
            print(
                f" {row.ok} ok, {row.failed} failed, {row.chunks_per_s:,.0f} chunks/s, "
                f"{row.window:.1f} s of load, {time.monotonic() - began:.1f} s in all"
                + (f"; other processes took {noise:.0f}% of a core" if noise > NOISY else ""),
                flush=True,
            )
            if best is None or noise < max(
                best.other_target_pct or 0.0, best.other_harness_pct or 0.0
            ):
                best = row
            if noise <= NOISY or row.problems or attempt == retries:
                break
        assert best is not None
        return best

    def fill(self, row: Row, result: Result, sampler: Sampler) -> None:
        row.window = max(0.0, result.t_end - result.t_start)
        for group in result.groups:
            if group.role == "stalled":
                row.stalled += group.count
                row.evicted += group.evicted
                row.chunks += group.chunks
                if group.failed:  # a stalled stream that failed before stalling
                    row.reasons.update({f"stalled: {k}": v for k, v in group.reasons.items()})
                continue
            row.ok += group.ok
            row.failed += group.failed
            row.reasons.update({f"{group.name}: {k}": v for k, v in group.reasons.items()})
            if group.role == "normal":
                row.chunks += group.chunks
                if not row.ttfc_ms:
                    row.ttfc_ms, row.gap_ms = group.ttfc_ms, group.gap_ms
                row.pauses += pauses(group.late, group.count)
        series = sampler.series
        if "target" in series:
            row.cpu_s = series["target"].cpu_between(result.t_start, result.t_end)
        start, end = result.t_start, result.t_end

        def cpu(name: str) -> float:
            return (series[name].cpu_between(start, end) or 0.0) if name in series else 0.0

        row.harness_cpu_s = cpu("mock") + cpu("loadgen")
        if self.target_core is not None and row.window > 0:
            ours = cpu("target")
            row.other_target_pct = 100 * (cpu(f"core{self.target_core}") - ours) / row.window
            ours = row.harness_cpu_s + cpu("runner")
            row.other_harness_pct = 100 * (cpu(f"core{self.harness_core}") - ours) / row.window

    def read_lean_log(self, child: Child, row: Row) -> None:
        statuses: Counter[str] = Counter()
        trouble: list[str] = []
        try:
            text = child.log.read_text(errors="replace")
        except OSError:
            return
        for line in text.splitlines():
            if "msg=run " in line and (m := _STATUS.search(line)):
                statuses[m.group(1) + (f" ({m.group(2)})" if m.group(2) else "")] += 1
            elif re.search(r"(?i)level=(warn|error|critical)|traceback", line):
                trouble.append(line)
        row.log_status = dict(statuses)
        if trouble:
            shown = "\n  ".join(line[:300] for line in trouble[:5])
            row.problems.append(
                f"lean logged {len(trouble)} warnings/errors ({child.log}), first:\n  {shown}"
            )


def pauses(late: list[tuple[float, float]], streams: int) -> list[tuple[float, int, float]]:
    """Half-second windows in which at least half of the streams had a late gap."""
    windows: dict[float, list[float]] = {}
    for t, gap in late:
        windows.setdefault(int(t * 2) / 2, []).append(gap)
    return [
        (t, len(gaps), max(gaps))
        for t, gaps in sorted(windows.items())
        if len(gaps) >= max(2, streams // 2)
    ]


def median_round(rounds: list[Row]) -> Row:
    """The round with the median CPU per chunk, carrying every round's figure."""
    if len(rounds) == 1:
        return rounds[0]
    measured = sorted((r for r in rounds if r.cpu_us is not None), key=lambda r: r.cpu_us or 0)
    row = measured[(len(measured) - 1) // 2] if measured else rounds[0]
    worst = max(rounds, key=lambda r: r.failed + len(r.problems))
    if worst.failed or worst.problems:  # a round that failed is the one shown
        row = worst
    row.cpu_rounds = [r.cpu_us for r in rounds if r.cpu_us is not None]
    return row


def warm_up(port: int) -> None:
    """One short stream, so lazily built paths (upstream connection, TLS) count as idle."""
    body = msgspec.json.encode(
        {
            "model": "mock",
            "messages": [{"role": "user", "content": "warm up"}],
            "stream": True,
            "bench_chunks": 3,
            "bench_interval": 0,
        }
    )
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        if response.status != 200 or b"[DONE]" not in data:
            raise RuntimeError(f"warm-up stream failed: HTTP {response.status} {data[:300]!r}")
    finally:
        conn.close()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(
    scenario_names: list[str],
    target_names: list[str],
    *,
    budget_mb: int,
    quick: bool,
    output: str,
    retries: int = 2,
    wires: list[str] | None = None,
) -> int:
    wires = wires or ["openai"]
    target_core, harness_core = cores()
    pin_self(harness_core)
    nofile = raise_nofile()
    if target_core is None:
        pinning = "not pinned (fewer than 2 cores or no taskset)"
    else:
        pinning = (
            f"target on core {target_core}, mock + load generator on core {harness_core} "
            f"(taskset); RLIMIT_NOFILE {nofile}"
        )
    workdir = Path(tempfile.mkdtemp(prefix="lean-bench-"))
    command = ("python -m bench " + shlex.join(sys.argv[1:])).strip()
    print(f"lean bench: {pinning}; logs in {workdir}", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)  # also when started in the background (SIG_IGN)
    bench = Bench(workdir, target_core, harness_core, patience=5.0 if quick else 60.0)
    rows: list[Row] = []
    scenario_lines: list[str] = []
    started = time.monotonic()
    interrupted = False
    try:
        for name in scenario_names:
            scenario = SCENARIOS[name](quick)
            scenario_lines.append(f"`{scenario.name}`: {scenario.summary}")
            scenario_lines.extend(scenario.notes)
            mock = bench.start_mock(scenario)
            try:
                runs: list[list[Row]] = []  # per target and wire, one row per round
                for round_number in range(scenario.rounds):
                    if scenario.rounds > 1:
                        print(f"  round {round_number + 1} of {scenario.rounds}", flush=True)
                    done = 0
                    for target_name in target_names:
                        target = TARGETS[target_name]
                        # lean runs once per wire; reference targets speak only the OpenAI wire
                        for wire in wires if target.name == "lean" else ["openai"]:
                            row = bench.run_quietest(scenario, target, mock, wire, retries)
                            if round_number == 0:
                                runs.append([])
                            runs[done].append(row)
                            done += 1
                rows.extend(median_round(rounds) for rounds in runs)
            finally:
                mock.child.stop(grace=3)
                bench.children.remove(mock.child)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: stopping every child process", flush=True)
    finally:
        bench.stop_all()
    elapsed = time.monotonic() - started
    if not rows:
        return 130 if interrupted else 1
    text = markdown(
        rows,
        command=command,
        budget_mb=budget_mb,
        pinning=pinning,
        scenario_lines=scenario_lines,
        workdir=str(workdir),
        elapsed=elapsed,
    )
    print()
    print(table(rows))
    print()
    print(text.split("## Scenarios", 1)[1].split("Logs of this run", 1)[0].strip())
    if output != "-" and not interrupted:
        from bench.soak import kept_section  # the soak's section outlives a bench run

        Path(output).write_text(text + kept_section(Path(output)))
        print(f"\nwritten to {output}")
    if interrupted:
        return 130
    return 1 if failures(rows, budget_mb) else 0
