"""Prometheus text exposition (format 0.0.4), written by hand.

Measured here: prometheus_client took ~9 ms to render 258 series, blocking the
loop; a hand-written exposition takes ~50 µs. Counters are plain ints in dicts
keyed by label tuples, updated once per run or per failed attempt, never per
chunk: events relayed are added when a stream ends. The only per-write work is
the guard's subtraction that spots a backpressure wait.
"""

from __future__ import annotations

import bisect
import os
from collections import Counter
from collections.abc import Callable, Iterable

# Time to first token: from a fast local model (~50 ms) to a reasoning model (minutes).
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    if not names:
        return ""
    pairs = ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True))
    return "{" + pairs + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def resident_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return 0


class Metrics:
    def __init__(self) -> None:
        self.runs: Counter[tuple[str, str, str]] = Counter()  # route, scene, status
        self.upstream_errors: Counter[tuple[str, str]] = Counter()  # provider, code
        self.rejections: Counter[tuple[str]] = Counter()  # reason
        self.store_failures: Counter[tuple[str]] = Counter()  # op: turn, save, progress, response
        # By client (lean.clients): "default" for [auth] tokens and loopback without tokens.
        self.client_requests: Counter[tuple[str]] = Counter()  # client
        self.client_streams: Counter[tuple[str]] = Counter()  # client: running now (a gauge)
        self.client_rejections: Counter[tuple[str, str]] = Counter()  # client, limit
        self.client_tokens: Counter[tuple[str, str]] = Counter()  # client, kind
        self.events_relayed = 0
        self.evictions = 0
        self.backpressure_waits = 0
        self.fallbacks = 0
        self.tool_overruns = 0  # sync tool calls still running on their thread past the timeout
        self.tool_refusals = 0  # sync tool calls refused: every tool thread was busy
        self.loop_stalls = 0  # times the event loop was seen blocked (lean.upkeep)
        # Gauges read when /metrics is scraped: (name, help, read the value).
        self.gauges: list[tuple[str, str, Callable[[], float]]] = []
        self._ttft_counts = [0] * (len(TTFT_BUCKETS) + 1)
        self._ttft_sum = 0.0

    def run_ended(
        self, route: str, scene: str, status: str, events: int, first_token_s: float | None
    ) -> None:
        self.runs[(route, scene, status)] += 1
        self.events_relayed += events
        if first_token_s is not None:
            self._ttft_counts[bisect.bisect_left(TTFT_BUCKETS, first_token_s)] += 1
            self._ttft_sum += first_token_s

    def store_failed(self, op: str, count: int) -> None:
        self.store_failures[(op,)] += count

    def render(self, gauges: Iterable[tuple[str, str, float]] = ()) -> bytes:
        out: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            out.append(f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n")

        for name, help_text, value in (*gauges, *((n, h, f()) for n, h, f in self.gauges)):
            family(name, "gauge", help_text)
            out.append(f"{name} {value:g}\n")
        family("lean_resident_memory_bytes", "gauge", "Resident memory of the lean process.")
        out.append(f"lean_resident_memory_bytes {resident_bytes()}\n")
        counters: list[
            tuple[str, str, tuple[str, ...], Callable[[], Iterable[tuple[tuple[str, ...], int]]]]
        ] = [
            (
                "lean_runs_total",
                "Streams and runs ended, by route, scene and status.",
                ("route", "scene", "status"),
                lambda: self.runs.items(),
            ),
            (
                "lean_upstream_errors_total",
                "Failed upstream attempts, by provider and code.",
                ("provider", "code"),
                lambda: self.upstream_errors.items(),
            ),
            (
                "lean_admission_rejections_total",
                "Requests refused at admission, by reason.",
                ("reason",),
                lambda: self.rejections.items(),
            ),
            (
                "lean_store_failures_total",
                "Store writes that failed, by op: turn (a user message), save (an answer's"
                " final save), progress (a running answer's text), response (a saved"
                " Responses answer).",
                ("op",),
                lambda: self.store_failures.items(),
            ),
            (
                "lean_client_requests_total",
                "Requests admitted, by client.",
                ("client",),
                lambda: self.client_requests.items(),
            ),
            (
                "lean_client_rejections_total",
                "Requests refused by a client's limits, by client and limit (max_streams,"
                " requests_per_minute, tokens_per_day; scene, model: one it may not use).",
                ("client", "limit"),
                lambda: self.client_rejections.items(),
            ),
            (
                "lean_client_tokens_total",
                "Tokens used, by client and kind: prompt and completion as the upstream"
                " reported them, estimated where it reported none.",
                ("client", "kind"),
                lambda: self.client_tokens.items(),
            ),
        ]
        for name, help_text, names, items in counters:
            family(name, "counter", help_text)
            for values, count in sorted(items()):
                out.append(f"{name}{_labels(names, values)} {count}\n")
        family("lean_client_active_streams", "gauge", "Streams and runs in progress, by client.")
        for values, count in sorted(self.client_streams.items()):
            out.append(f"lean_client_active_streams{_labels(('client',), values)} {count}\n")
        for name, help_text, value in (
            (
                "lean_events_relayed_total",
                "Events and chunks written to clients.",
                self.events_relayed,
            ),
            ("lean_slow_client_evictions_total", "Clients cut for not reading.", self.evictions),
            (
                "lean_backpressure_waits_total",
                "Writes that waited for a slow reader.",
                self.backpressure_waits,
            ),
            (
                "lean_fallbacks_total",
                "Answers that came from a non-streaming path.",
                self.fallbacks,
            ),
            (
                "lean_tool_overruns_total",
                "Sync tool calls that outlived their timeout (their thread stays busy).",
                self.tool_overruns,
            ),
            (
                "lean_tool_refusals_total",
                "Sync tool calls refused because every tool thread was busy.",
                self.tool_refusals,
            ),
            (
                "lean_loop_stalls_total",
                "Times the event loop was found blocked (e.g. an async tool that blocks).",
                self.loop_stalls,
            ),
        ):
            family(name, "counter", help_text)
            out.append(f"{name} {value}\n")
        family("lean_time_to_first_token_seconds", "histogram", "Time to the first visible token.")
        cumulative = 0
        for bound, count in zip((*TTFT_BUCKETS, float("inf")), self._ttft_counts, strict=True):
            cumulative += count
            le = "+Inf" if bound == float("inf") else f"{bound:g}"
            out.append(f'lean_time_to_first_token_seconds_bucket{{le="{le}"}} {cumulative}\n')
        out.append(f"lean_time_to_first_token_seconds_sum {self._ttft_sum:.6f}\n")
        out.append(f"lean_time_to_first_token_seconds_count {cumulative}\n")
        return "".join(out).encode()
