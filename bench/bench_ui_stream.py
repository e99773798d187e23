"""ns per delta on the UI message stream (`lean.ui_stream`) against lean's own SSE framing.

A run encodes each event once (`events.encode`); the SSE sink wraps those bytes, the UI sink
decodes them and encodes the AI SDK part. This measures what that costs per delta, the hot
path of a `useChat` stream. The two are measured in turn, round after round (this machine
is shared: a figure taken minutes apart from the other moves by 2x); the extra ns per delta
is the median of the rounds' differences.

Run: .venv/bin/python -m bench.bench_ui_stream   (a few seconds)
"""

from __future__ import annotations

import statistics

from bench.bench_events import ns_per_call
from lean import events
from lean.ui_stream import UIParts

M = "chat:5f0c2a:3"
ROUNDS = 7


def main() -> None:
    for label, text in (("ascii", " the quick"), ("CJK", "你好，世界")):
        delta = events.Delta(M, text)
        parts = UIParts()
        parts.feed("start", events.encode(events.Start("r-5f0c2a", M, "chat", "default", "c")))
        parts.feed("delta", events.encode(delta))  # the text part is open: then only deltas

        def sse(delta: events.Delta = delta) -> bytes:
            return events.sse_frame("delta", 42, events.encode(delta))

        def ui(delta: events.Delta = delta, parts: UIParts = parts) -> bytes:
            return parts.feed("delta", events.encode(delta))

        rounds = [(ns_per_call(sse), ns_per_call(ui)) for _ in range(ROUNDS)]
        sse_ns = statistics.median(s for s, _ in rounds)
        ui_ns = statistics.median(u for _, u in rounds)
        extra = statistics.median(u - s for s, u in rounds)
        print(
            f"{label:5} delta: SSE sink {sse_ns:6.0f} ns, UI sink {ui_ns:6.0f} ns, "
            f"+{extra:.0f} ns per delta (median of {ROUNDS} rounds)"
        )


if __name__ == "__main__":
    main()
