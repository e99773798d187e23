"""Samples processes from /proc: CPU ticks (utime + stime, all threads) and RSS.

A thread in the runner reads /proc/PID/stat and /proc/PID/status every `PERIOD`
seconds, stamped with time.monotonic() (the clock the load generator stamps its
load window with), so CPU seconds inside a window are interpolated between samples.
Peak RSS is the kernel's own high-water mark (VmHWM), read at the end.
"""

from __future__ import annotations

import bisect
import os
import threading
import time

PERIOD = 0.02
TICK = 1.0 / os.sysconf("SC_CLK_TCK")  # /proc/PID/stat counts CPU time in these


def cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) * TICK  # fields 14 and 15: utime, stime


def core_busy(cores: set[int]) -> dict[int, float]:
    """Busy seconds of each core since boot (all but idle and iowait), from /proc/stat."""
    out: dict[int, float] = {}
    with open("/proc/stat", "rb") as f:
        for line in f:
            if not line.startswith(b"cpu") or line[3:4] == b" ":
                continue
            name, *ticks = line.split()
            core = int(name[3:])
            if core in cores:
                values = [
                    int(t) for t in ticks[:8]
                ]  # user nice system idle iowait irq softirq steal
                out[core] = (sum(values) - values[3] - values[4]) * TICK
    return out


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM in KiB (empty if the process is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith((b"VmRSS:", b"VmHWM:")):
                    name, value = line.split(b":", 1)
                    out[name.decode()] = int(value.split()[0])
    except OSError:
        pass
    return out


class Series:
    def __init__(self) -> None:
        self.times: list[float] = []
        self.cpu: list[float] = []
        self.rss_kb: list[int] = []

    def cpu_at(self, t: float) -> float | None:
        """CPU seconds at time `t`, interpolated between the samples around it."""
        if not self.times:
            return None
        i = bisect.bisect_left(self.times, t)
        if i == 0:
            return self.cpu[0]
        if i >= len(self.times):
            return self.cpu[-1]
        t0, t1 = self.times[i - 1], self.times[i]
        c0, c1 = self.cpu[i - 1], self.cpu[i]
        return c0 + (c1 - c0) * (t - t0) / (t1 - t0) if t1 > t0 else c1

    def cpu_between(self, start: float, end: float) -> float | None:
        a, b = self.cpu_at(start), self.cpu_at(end)
        return None if a is None or b is None else b - a


class Sampler:
    def __init__(self, cores: set[int] | None = None) -> None:
        self.cores = cores or set()  # also sample these cores' busy time (others' load)
        self.pids: dict[str, int] = {}
        self.series: dict[str, Series] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._lock = threading.Lock()
        for core in self.cores:
            self.series[f"core{core}"] = Series()

    def watch(self, name: str, pid: int) -> None:
        with self._lock:
            self.pids[name] = pid
            self.series.setdefault(name, Series())

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _sample(self) -> None:
        now = time.monotonic()
        with self._lock:
            watched = list(self.pids.items())
        for name, pid in watched:
            cpu = cpu_seconds(pid)
            if cpu is None:
                continue
            series = self.series[name]
            series.times.append(now)
            series.cpu.append(cpu)
            series.rss_kb.append(memory_kb(pid).get("VmRSS", 0))
        if self.cores:
            for core, busy in core_busy(self.cores).items():
                series = self.series[f"core{core}"]
                series.times.append(now)
                series.cpu.append(busy)
                series.rss_kb.append(0)

    def dump(self) -> dict[str, dict[str, list[float]]]:
        """The samples, for a look after the run (written next to the logs)."""
        return {
            name: {"t": s.times, "cpu_s": s.cpu, "rss_kb": [float(v) for v in s.rss_kb]}
            for name, s in self.series.items()
        }

    def _run(self) -> None:
        while not self._stop.wait(PERIOD):
            self._sample()
