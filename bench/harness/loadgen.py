"""The load generator: one process, uvloop, up to 10,000 connections at once.

    python -m bench.harness.loadgen PLAN.json RESULT.json

Order: idle groups connect first and ask once; then every stream group starts
(the load window opens at the first request sent); when the last stream ends (the
window closes) every idle connection asks again, proving it was held open all along.
Everything is bounded: connects by `connect_timeout`, the stream phase by `deadline`
(what is still open then is cut and counted failed).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import sys
import time
from collections.abc import Iterable
from typing import Literal

import msgspec
import uvloop

from bench.harness.clients import GroupStats, HTTPStream, IdleConnection, Judge
from bench.harness.procs import raise_nofile
from bench.harness.websocket import IdleWebSocket, WSStream
from bench.harness.wires import WIRES, Ask, WebSocketWire

Role = Literal["normal", "stalled", "idle"]
Idle = IdleConnection | IdleWebSocket


class Group(msgspec.Struct, kw_only=True):
    name: str
    role: Role = "normal"
    wire: str = "openai"  # streams: a key of clients.WIRES; idle: one of clients.IDLE_WIRES
    host: str = "127.0.0.1"
    port: int
    tls: bool = False
    count: int  # connections at once
    repeat: int = 1  # streams per connection slot, one after another, each on a new connection
    ramp: float = 0.0  # seconds over which the slots start
    chunks: int = 0  # asked of the mock (body fields bench_*), and the content events expected
    interval: float = 0.0
    size: int = 4
    stall_after: int = 0  # stalled: content events read before the client stops reading
    stall_for: float = 0.0
    check_for: float = 3.0
    rcvbuf: int = 0  # SO_RCVBUF of each connection, 0 = the OS's
    mss: int = 0  # TCP_MAXSEG of each connection, 0 = loopback's ~64 KB


class Plan(msgspec.Struct, kw_only=True):
    groups: list[Group]
    deadline: float  # seconds for the stream phase
    cafile: str = ""
    connect_concurrency: int = 256  # connects in flight; lean's listen backlog is 1024
    connect_timeout: float = 15.0


class GroupResult(msgspec.Struct, kw_only=True):
    name: str
    role: Role
    count: int  # attempts: connections for idle groups, streams otherwise
    ok: int
    failed: int
    evicted: int
    not_evicted: int
    reasons: dict[str, int]
    chunks: int
    ttfc_ms: list[float]  # p50, p99, max
    ttfc_raw: list[tuple[float, float]]  # (request sent, s after the load began; TTFC ms)
    late: list[tuple[float, float]]  # (s after the load began, gap ms) of gaps > 2 intervals
    gap_ms: list[float]  # p50, p99, max
    max_open: int


class Result(msgspec.Struct, kw_only=True):
    t_start: float  # time.monotonic() of the first stream request, shared with the runner
    t_end: float
    groups: list[GroupResult]
    nofile: int


def percentiles(values: Iterable[float], scale: float = 1000.0) -> list[float]:
    data = sorted(values)
    if not data:
        return []
    last = len(data) - 1
    return [data[int(last * q + 0.5)] * scale for q in (0.5, 0.99, 1.0)]


class Runner:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.loop = asyncio.get_running_loop()
        self.sem = asyncio.Semaphore(plan.connect_concurrency)
        self.ssl: ssl.SSLContext | None = None
        if any(g.tls for g in plan.groups):
            self.ssl = ssl.create_default_context(cafile=plan.cafile or None)
        self.stats = {g.name: GroupStats() for g in plan.groups}
        self.deadline = 0.0
        self.t_start = 0.0

    async def connect(self, group: Group, factory: asyncio.Protocol) -> None:
        async with self.sem:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                if group.rcvbuf:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, group.rcvbuf)
                if group.mss:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, group.mss)
                sock.setblocking(False)
                async with asyncio.timeout(self.plan.connect_timeout):
                    await self.loop.sock_connect(sock, (group.host, group.port))
                    await self.loop.create_connection(
                        lambda: factory,
                        sock=sock,
                        ssl=self.ssl if group.tls else None,
                        server_hostname=group.host if group.tls else None,
                    )
            except BaseException:
                sock.close()
                raise

    async def stream_slot(self, group: Group, index: int) -> None:
        stats = self.stats[group.name]
        wire = WIRES[group.wire]
        ask = Ask(group.chunks, group.interval, group.size)
        request = wire.request(group.host, group.port, ask)
        judge = Judge(
            expect=group.chunks,
            stall_after=group.stall_after,
            stall_for=group.stall_for,
            check_for=group.check_for,
            # a gap of 2 intervals is "late"; back-to-back streams: 50 ms
            late_gap=max(2 * group.interval, 0.05),
        )
        if group.ramp:
            await asyncio.sleep(group.ramp * index / group.count)
        for _ in range(group.repeat):
            left = self.deadline - time.monotonic()
            if left <= 0:
                stats.fail("not started before the deadline")
                continue
            proto: HTTPStream
            if isinstance(wire, WebSocketWire):
                proto = WSStream(request, wire.run_frame(ask), wire.reader(), stats, judge)
            else:
                proto = HTTPStream(request, wire.reader(), stats, judge)
            try:
                await self.connect(group, proto)
            except (OSError, TimeoutError, ssl.SSLError) as exc:
                stats.fail(f"connect: {type(exc).__name__}")
                continue
            try:
                async with asyncio.timeout(max(0.0, self.deadline - time.monotonic())):
                    await asyncio.shield(proto.finished)
            except TimeoutError:
                proto.cut(f"still open at the deadline after {proto.count} chunks")

    async def idle_slot(self, group: Group, conns: list[Idle]) -> None:
        stats = self.stats[group.name]
        conn: Idle
        if group.wire == "idle-ws":
            conn = IdleWebSocket(group.host, group.port, stats)
        else:
            conn = IdleConnection(group.host, group.port, stats)
        try:
            await self.connect(group, conn)
            async with asyncio.timeout(self.plan.connect_timeout):
                status = await conn.answered
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            stats.fail(f"first request: {type(exc).__name__}")
            return
        if status != 200:
            stats.fail(f"first request: HTTP {status}")
            return
        conns.append(conn)

    async def run(self) -> Result:
        idle_groups = [g for g in self.plan.groups if g.role == "idle"]
        stream_groups = [g for g in self.plan.groups if g.role != "idle"]
        held: dict[str, list[Idle]] = {g.name: [] for g in idle_groups}
        await asyncio.gather(
            *(self.idle_slot(g, held[g.name]) for g in idle_groups for _ in range(g.count))
        )
        t_start = time.monotonic()
        self.deadline = t_start + self.plan.deadline
        await asyncio.gather(
            *(self.stream_slot(g, i) for g in stream_groups for i in range(g.count))
        )
        t_end = max([self.stats[g.name].last_done for g in stream_groups] + [t_start])
        starts = [
            self.stats[g.name].first_sent for g in stream_groups if self.stats[g.name].first_sent
        ]
        if starts:
            t_start = min(starts)
        for group in idle_groups:
            await self.check_idle(group, held[group.name])
        self.t_start = t_start
        return Result(
            t_start=t_start,
            t_end=t_end,
            groups=[self.result(g) for g in self.plan.groups],
            nofile=raise_nofile(),
        )

    async def check_idle(self, group: Group, conns: list[Idle]) -> None:
        stats = self.stats[group.name]

        async def ask(conn: Idle) -> None:
            try:
                async with asyncio.timeout(self.plan.connect_timeout):
                    status = await conn.ask_again()
            except (OSError, TimeoutError) as exc:
                stats.fail(f"second request after idling: {exc or type(exc).__name__}")
                return
            if status == 200:
                stats.ok += 1
            else:
                stats.fail(f"second request after idling: HTTP {status}")

        await asyncio.gather(*(ask(c) for c in conns))
        for conn in conns:
            if conn.transport is not None:
                conn.transport.close()

    def result(self, group: Group) -> GroupResult:
        s = self.stats[group.name]
        return GroupResult(
            name=group.name,
            role=group.role,
            count=group.count * (1 if group.role == "idle" else group.repeat),
            ok=s.ok,
            failed=s.failed,
            evicted=s.evicted,
            not_evicted=s.not_evicted,
            reasons=dict(s.reasons.most_common(8)),
            chunks=s.chunks,
            ttfc_ms=percentiles(s.ttfc),
            ttfc_raw=[
                (round(sent - self.t_start, 4), round(t * 1000, 3))
                for sent, t in zip(s.ttfc_sent, s.ttfc, strict=True)
            ],
            late=[(round(t - self.t_start, 3), round(g * 1000, 1)) for t, g in s.late],
            gap_ms=percentiles(s.gaps),
            max_open=s.max_open,
        )


async def main(plan_path: str, result_path: str) -> None:
    plan = msgspec.json.decode(open(plan_path, "rb").read(), type=Plan)  # noqa: ASYNC230, SIM115
    result = await Runner(plan).run()
    with open(result_path, "wb") as f:  # noqa: ASYNC230 - once, after the load
        f.write(msgspec.json.encode(result))


if __name__ == "__main__":
    raise_nofile()
    with (
        contextlib.suppress(KeyboardInterrupt),
        asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner,
    ):
        runner.run(main(sys.argv[1], sys.argv[2]))
