"""ns per event for lean.events: encode, each framing, encode + frame.

Run: .venv/bin/python -m bench.bench_events   (median of repeats, a few seconds in all)
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import msgspec

from lean.events import Delta, Done, Start, Usage, encode, ndjson_frame, sse_frame, ws_frame

REPEATS = 9
TARGET_S = 0.03  # per repeat


def ns_per_call(fn: Callable[[], object]) -> float:
    number = 1000
    while True:  # grow the loop until one repeat takes TARGET_S
        t0 = time.perf_counter_ns()
        for _ in range(number):
            fn()
        if time.perf_counter_ns() - t0 > TARGET_S * 1e9 / 4:
            break
        number *= 4
    runs = []
    for _ in range(REPEATS):
        t0 = time.perf_counter_ns()
        for _ in range(number):
            fn()
        runs.append((time.perf_counter_ns() - t0) / number)
    return statistics.median(runs)


def main() -> None:
    m = "chat:5f0c2a:3"
    ascii_delta = Delta(m, " the quick")
    cjk_delta = Delta(m, "你好，世界")
    sep_delta = Delta(m, "line\u2028sep")
    done = Done(m, "stop", Usage(12, 800), "你好，世界 and some english words. " * 100)
    start = Start("r-5f0c2a", m, "chat", "default", "5f0c2a")
    payload = encode(ascii_delta)
    head = b"event: delta\nid: "
    raw = msgspec.json.Encoder().encode

    overhead = ns_per_call(lambda: None)
    cases: list[tuple[str, Callable[[], object]]] = [
        ("msgspec Encoder.encode(Delta), raw", lambda: raw(ascii_delta)),
        ("msgspec Encoder.encode(Delta) CJK, raw", lambda: raw(cjk_delta)),
        ("encode(Delta) ascii text", lambda: encode(ascii_delta)),
        ("encode(Delta) CJK text (2 memchr checks)", lambda: encode(cjk_delta)),
        ("encode(Delta) with U+2028 (replace passes)", lambda: encode(sep_delta)),
        ("encode(Start)", lambda: encode(start)),
        (f"encode(Done) {len(encode(done))} bytes, mixed text", lambda: encode(done)),
        ("sse_frame (as shipped: one %-format)", lambda: sse_frame("delta", 42, payload)),
        (
            "  same %-format inline, no call",
            lambda: b"event: %b\nid: %d\ndata: %b\n\n" % (b"delta", 42, payload),
        ),
        (
            "  alt inline: pre-built head + %-format",
            lambda: b"%b%d\ndata: %b\n\n" % (head, 42, payload),
        ),
        (
            "  alt inline: join",
            lambda: b"".join((head, b"%d" % 42, b"\ndata: ", payload, b"\n\n")),
        ),
        ("ndjson_frame", lambda: ndjson_frame(payload, 7)),
        ("ws_frame (as shipped, %-format)", lambda: ws_frame("r-5f0c2a", payload, 7)),
        (
            "  alt inline: concat",
            lambda: b'{"runId":' + raw("r-5f0c2a") + b"," + payload[1:],
        ),
        ("encode + sse_frame", lambda: sse_frame("delta", 42, encode(ascii_delta))),
        ("encode + ndjson_frame", lambda: ndjson_frame(encode(ascii_delta), 7)),
        ("encode + ws_frame", lambda: ws_frame("r-5f0c2a", encode(ascii_delta), 7)),
    ]
    print(f"$ {sys.executable} -m bench.bench_events")
    print(f"python {sys.version.split()[0]}, msgspec {msgspec.__version__}; ns per call,")
    print(f"median of {REPEATS} repeats, loop overhead ({overhead:.0f} ns) subtracted")
    print(f"payload: {len(payload)} bytes {payload!r}")
    for label, fn in cases:
        print(f"{label:<42} {ns_per_call(fn) - overhead:7.0f}")


if __name__ == "__main__":
    main()
