"""The scenarios of issue 5, each bounded in time and count, loopback only.

A scenario is target-independent: groups of connections (normal streams, stalled
streams, idle connections), what the mock is asked to stream, and the lean settings
it needs. `--quick` builds the same shapes ~10x smaller (a smoke run under a minute).
To add one: write a function returning a `Scenario` and list it in `SCENARIOS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from bench.harness.loadgen import Role


@dataclass(frozen=True)
class GroupSpec:
    name: str
    count: int
    role: Role = "normal"
    # The client kind: streams one of clients.WIRES (replaced by --wires), idle ones one of
    # clients.IDLE_WIRES; a target that does not speak it falls back (targets.client_for).
    wire: str = "openai"
    repeat: int = 1
    ramp: float = 0.0
    chunks: int = 0
    interval: float = 0.0
    size: int = 4
    stall_after: int = 0
    stall_for: float = 0.0
    check_for: float = 3.0
    rcvbuf: int = 0
    mss: int = 0


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    groups: tuple[GroupSpec, ...]
    deadline: float  # seconds for the stream phase
    tls: bool = False  # the mock (the upstream) over HTTPS
    slow_client_timeout: float = 30.0  # lean's [limits] slow_client_timeout
    mock_sndbuf: int = 0  # SO_SNDBUF of the mock's streams, 0 = the OS's
    notes: tuple[str, ...] = field(default=())
    # Rounds of every target in turn; each row is its target's median-CPU round. A target
    # measured once, minutes from the relay, moved ±15% in CPU per chunk on this VM.
    rounds: int = 1

    @property
    def connections(self) -> int:
        """Client connections held at once (KB per stream divides by this)."""
        return sum(g.count for g in self.groups)


def throughput(quick: bool) -> Scenario:
    streams, chunks = (16, 1000) if quick else (64, 2000)
    return Scenario(
        name="throughput",
        summary=f"{streams} streams x {chunks} chunks, back to back",
        groups=(GroupSpec("streams", streams, chunks=chunks),),
        deadline=120,
    )


def realistic(quick: bool) -> Scenario:
    streams, chunks, ramp = (40, 60, 0.5) if quick else (400, 200, 1.0)
    return Scenario(
        name="realistic",
        summary=f"{streams} streams x {chunks} chunks at 25 ms",
        # Starts spread out so the streams' 25 ms ticks are out of phase, as in life.
        groups=(GroupSpec("streams", streams, chunks=chunks, interval=0.025, ramp=ramp),),
        deadline=60,
        rounds=1 if quick else 3,
        notes=(
            "realistic: 3 rounds, every target in turn in each; a row is its target's round "
            "with the median CPU per chunk, and lean's CPU ratio is the median of the rounds' "
            "lean/relay ratios (rounds a few seconds apart; a relay measured once moved "
            "±15% from one run to the next).",
        ),
    )


def crowd(quick: bool) -> Scenario:
    streams, idle, chunks, ramp = (100, 900, 12, 0.5) if quick else (1000, 9000, 80, 2.0)
    return Scenario(
        name="crowd",
        summary=(
            f"{streams + idle:,} connections: {streams:,} streams x {chunks} chunks at 4/s "
            f"from a TLS upstream + {idle:,} idle WebSockets"
        ),
        groups=(
            GroupSpec("idle", idle, role="idle", wire="idle-ws"),
            GroupSpec("streams", streams, chunks=chunks, interval=0.25, ramp=ramp),
        ),
        deadline=90,
        tls=True,
        notes=(
            "crowd: lean's idle connections are WebSockets on GET /v1/ws (upgrade, idle while "
            "answering lean's heartbeat pings, then a ping at the end that must be answered); "
            "relay and direct, which have no WebSocket endpoint, hold idle keep-alive HTTP "
            "connections instead (GET /healthz, idle, GET /healthz again at the end).",
        ),
    )


def slow_clients(quick: bool) -> Scenario:
    # A stalled client must hold more than the kernel buffers before a writer blocks at all.
    # Over loopback (MSS ~64 KB) a socket's send buffer autotunes to ~4 MB; the stalled
    # clients set an internet-like MSS (1448) and a small receive buffer, which keep what the
    # kernel absorbs near ~0.65 MB, and ask for 1.6 MB in 16 KB chunks at 10/s (~0.75 MB go
    # through before the stall bites, after ~5 s). Big chunks keep the byte volume within
    # what one core relays beside the normal streams. The mock's send buffer is set small so
    # the bytes queued behind a stalled proxy stay bounded.
    if quick:
        n, timeout, normal, interval, stall_for, check_for = 20, 1.0, 160, 0.025, 4.0, 1.5
    else:
        n, timeout, normal, interval, stall_for, check_for = 200, 5.0, 640, 0.1, 14.0, 3.0
    return Scenario(
        name="slow-clients",
        summary=(
            f"{n} clients stop reading after 5 chunks of 1.6 MB streams beside {n} normal ones "
            f"x {normal} chunks at 25 ms; slow_client_timeout {timeout:g} s"
        ),
        groups=(
            GroupSpec("streams", n, chunks=normal, interval=0.025, ramp=1.0),
            GroupSpec(
                "stalled",
                n,
                role="stalled",
                chunks=100,
                size=16384,
                interval=interval,
                stall_after=5,
                stall_for=stall_for,
                check_for=check_for,
                mss=1448,
                rcvbuf=4096,
            ),
        ),
        deadline=90,
        slow_client_timeout=timeout,
        mock_sndbuf=131072,
        notes=(
            "slow-clients: a stalled client reads 5 chunks, stops reading for the stall, then "
            "reads again; evicted = its stream ended without [DONE] by then (the target cut it), "
            "not evicted = still flowing or complete. CPU per chunk includes the stalled "
            "streams' 16 KB chunks. Over loopback's 64 KB MSS a socket absorbs ~4 MB before a "
            "writer blocks, so a stalled client of an ordinary chat answer (tens of KB) never "
            "blocks a writer at all; the stalled clients here use MSS 1448 and a 4 KB receive "
            "buffer (~0.65 MB).",
        ),
    )


def ttfb(quick: bool) -> Scenario:
    # 3,000 first chunks put 30 in the p99 tail: with 1,000 (10 in the tail) the same target's
    # p99 moved by up to 3 ms from one run to the next on this VM.
    streams, repeat = (20, 3) if quick else (100, 30)
    return Scenario(
        name="ttfb",
        summary=f"{streams} streams x 20 chunks at 25 ms, {repeat} in a row each",
        groups=(GroupSpec("streams", streams, chunks=20, interval=0.025, repeat=repeat, ramp=0.5),),
        deadline=90,
        notes=(
            "ttfb: target for lean: added time to first chunk p99 <= 5 ms vs direct.",
            "time to first chunk: from the request (HTTP wires) or the `run` frame (ws, each "
            "run on a fresh socket: the upgrade before it is not counted, as a WebSocket "
            "client upgrades once for many runs) to the first content chunk.",
        ),
    )


SCENARIOS: dict[str, Callable[[bool], Scenario]] = {
    "throughput": throughput,
    "realistic": realistic,
    "crowd": crowd,
    "slow-clients": slow_clients,
    "ttfb": ttfb,
}
