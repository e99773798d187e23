"""`python -m bench soak [--minutes 30]`: does lean's memory stay flat under a long mixed load?

One lean (pinned to the target core) in front of the bench's mock provider; on the
other core, this process plays `--users` people who come and go for `--minutes`:

- most ask a scene (SSE) within one of `--conversations` conversations, which they
  continue turn after turn (the scene's `history_turns` keeps the prompt bounded);
- some ask the OpenAI endpoint; some leave mid-answer (close after a few chunks);
- some use the WebSocket: two runs on one socket, sometimes leaving mid-run;
- some stall: a small receive buffer, a big answer, then no reading past lean's
  `slow_client_timeout` (lean must cut them), then they leave.

Every connection is new (a client joining). lean's RSS is read from /proc every
`--sample` seconds. After `--warmup` minutes, the slope of a least-squares line
through the samples, over the rest of the run, is compared with the level at the
end of the warm-up (target: the drift over the run is within 5% of that level).
The result is printed and written as the "Soak" section of bench/RESULTS.md (other
sections are kept).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import msgspec
import uvloop

from bench.harness.procs import Child, cores, free_port, pin_self, python, raise_nofile, wait_http
from bench.harness.sampler import core_busy, cpu_seconds, memory_kb

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## Soak"
SCENE = "soak"
MODEL = "mock"
SLOW_CLIENT_TIMEOUT = 5.0  # lean's: a stalled client is cut after this long
HISTORY_TURNS = 4  # each turn sends at most this many earlier turns: the prompt stays bounded
TARGET_PCT = 5.0  # the target: drift after warm-up within 5% of the post-warm-up level
# (weight, kind) of what a user does next.
MIX = (
    (50, "scene"),
    (15, "openai"),
    (12, "leave"),
    (13, "ws"),
    (5, "stall"),
)
_encode = msgspec.json.Encoder().encode


def marker(chunks: int, interval: float, size: int) -> str:
    """How a request asks the mock for its answer (bench/harness/mock.py)."""
    return f"[bench chunks={chunks} interval={interval:g} size={size}]"


def lean_config(port: int, mock_port: int, db: Path) -> str:
    return f"""\
# written by python -m bench soak
[server]
host = 127.0.0.1
port = {port}
drain_timeout = 2

[auth]
tokens_env = LEAN_BENCH_NO_TOKENS

[store]
path = {db}

[limits]
slow_client_timeout = {SLOW_CLIENT_TIMEOUT:g}

[provider.mock]
kind = openai
base_url = http://127.0.0.1:{mock_port}/v1

[model.{MODEL}]
provider = mock
upstream_model = mock-model

[scene.{SCENE}]
model = {MODEL}
template = {{message}}
history_turns = {HISTORY_TURNS}
"""


@dataclass
class Tally:
    done: Counter[str] = field(default_factory=Counter)  # kind -> requests that went as planned
    failed: Counter[str] = field(default_factory=Counter)  # "kind: reason" -> count


class Load:
    def __init__(self, port: int, conversations: int, deadline: float) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.port = port
        self.conversations = conversations
        self.deadline = deadline
        self.tally = Tally()
        self.turns: Counter[str] = Counter()
        self.session: aiohttp.ClientSession | None = None

    def _session(self) -> aiohttp.ClientSession:
        assert self.session is not None
        return self.session

    def _conversation(self) -> str:
        return f"c{random.randrange(self.conversations)}"

    async def user(self) -> None:
        kinds = [k for _, k in MIX]
        weights = [w for w, _ in MIX]
        while time.monotonic() < self.deadline:
            kind = random.choices(kinds, weights)[0]
            try:
                async with asyncio.timeout(60):
                    ok = await getattr(self, kind)()
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                self.tally.failed[f"{kind}: {type(exc).__name__}"] += 1
            else:
                if ok is True:
                    self.tally.done[kind] += 1
                else:
                    self.tally.failed[f"{kind}: {ok}"] += 1
            await asyncio.sleep(random.uniform(0.1, 1.0))  # the user reads, then asks again

    async def scene(self, *, leave_after: int = 0) -> bool | str:
        cid = self._conversation()
        chunks = random.randint(20, 60)
        body = {"message": marker(chunks, 0.03, 32) + " Go on.", "conversationId": cid}
        url = f"{self.base}/v1/scenes/{SCENE}/stream"
        async with self._session().post(url, json=body) as resp:
            if resp.status != 200:
                return f"HTTP {resp.status}"
            deltas = 0
            async for block in resp.content.iter_chunks():
                data = block[0]
                deltas += data.count(b"event: delta")
                if b"event: error" in data:
                    return "error event"
                if leave_after and deltas >= leave_after:
                    resp.close()  # the client leaves mid-answer
                    return True
                if b"event: done" in data:
                    self.turns[cid] += 1
                    return deltas == chunks or f"{deltas} of {chunks} deltas"
        return "no done event"

    async def openai(self, *, leave_after: int = 0) -> bool | str:
        chunks = random.randint(20, 60)
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": marker(chunks, 0.03, 32) + " Hi."}],
            "stream": True,
        }
        async with self._session().post(f"{self.base}/v1/chat/completions", json=body) as resp:
            if resp.status != 200:
                return f"HTTP {resp.status}"
            seen = 0
            async for block in resp.content.iter_chunks():
                data = block[0]
                seen += data.count(b'"content":')
                if leave_after and seen >= leave_after:
                    resp.close()
                    return True
                if b"data: [DONE]" in data:
                    return True
        return "no [DONE]"

    async def leave(self) -> bool | str:
        after = random.randint(2, 10)
        if random.random() < 0.5:
            return await self.scene(leave_after=after)
        return await self.openai(leave_after=after)

    async def ws(self) -> bool | str:
        cid = self._conversation()
        async with self._session().ws_connect(f"{self.base}/v1/ws", autoping=True) as sock:
            for n in range(2):
                chunks = random.randint(20, 60)
                run = {
                    "type": "run",
                    "runId": f"r{n}",
                    "scene": SCENE,
                    "message": marker(chunks, 0.03, 32) + " More.",
                    "conversationId": cid,
                }
                await sock.send_str(_encode(run).decode())
                leave_at = random.randint(2, 10) if n == 1 and random.random() < 0.3 else 0
                deltas = 0
                while True:
                    msg = await sock.receive()
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        return f"socket ended ({msg.type.name})"
                    frame = msgspec.json.decode(msg.data)
                    kind = frame.get("type")
                    if kind == "delta":
                        deltas += 1
                        if leave_at and deltas >= leave_at:
                            return True  # leaving mid-run: the socket closes under it
                    elif kind == "error":
                        return f"error frame {frame.get('code')}"
                    elif kind == "done":
                        self.turns[cid] += 1
                        break
        return True

    async def stall(self) -> bool | str:
        """A reader that stops: lean must cut it within slow_client_timeout."""
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_connect(sock, ("127.0.0.1", self.port))
            body = _encode(
                {
                    "model": MODEL,
                    "messages": [{"role": "user", "content": marker(100, 0.05, 16384)}],
                    "stream": True,
                }
            )
            head = (
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                % (self.port, len(body))
            )
            await loop.sock_sendall(sock, head + body)
            await loop.sock_recv(sock, 1024)
            await asyncio.sleep(SLOW_CLIENT_TIMEOUT + 4)  # no reading: lean should cut it
            # Drain what is left: a cut stream ends without [DONE] (the connection closes).
            got = b""
            try:
                async with asyncio.timeout(20):
                    while chunk := await loop.sock_recv(sock, 65536):
                        got = (got + chunk)[-64:]
            except ConnectionResetError:
                return True  # lean aborted the connection: cut, as it should be
            return True if b"[DONE]" not in got else "not cut"
        finally:
            sock.close()


async def _load(port: int, users: int, conversations: int, seconds: float) -> Load:
    load = Load(port, conversations, time.monotonic() + seconds)
    # force_close: every request is a new connection, a client joining.
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        load.session = session

        async def staggered(i: int) -> None:
            await asyncio.sleep(i * min(0.05, 10 / users))  # users arrive over a few seconds
            await load.user()

        await asyncio.gather(*(staggered(i) for i in range(users)))
    return load


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (minutes, MB) points, in MB per minute."""
    xs = [x for x, _ in points]
    ys = [y for _, y in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in points) / den if den else 0.0


async def _active_streams(http: aiohttp.ClientSession, port: int) -> int:
    """lean's own count of streams in progress (its /metrics), -1 if it did not answer."""
    try:
        async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
            text = await resp.text()
    except (aiohttp.ClientError, OSError):
        return -1
    for line in text.splitlines():
        if line.startswith("lean_active_streams "):
            return int(float(line.split()[1]))
    return -1


@dataclass
class Context:
    streams: int  # lean_active_streams
    cpu_pct: float  # lean's CPU since the last sample, % of a core
    others_pct: float  # other processes on lean's core, % of it


def report(
    samples: list[tuple[float, float]],
    context: list[Context],
    idle_after: float | None,
    load: Load,
    args: argparse.Namespace,
    command: str,
) -> str:
    warm = args.warmup
    after = [(t, mb) for t, mb in samples if t >= warm]
    level = statistics.fmean(mb for t, mb in after if t < warm + 1) if after else 0.0
    slope = slope_per_minute(after) if len(after) > 2 else 0.0
    span = (after[-1][0] - after[0][0]) if len(after) > 1 else 0.0
    drift = slope * span
    pct = 100 * drift / level if level else 0.0
    verdict = "PASS" if abs(pct) <= TARGET_PCT else "FAIL"
    lines = [
        SECTION,
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; command: `{command}`",
        f"- {args.users} users for {args.minutes:g} min over {args.conversations} conversations "
        f"(scene history_turns = {HISTORY_TURNS}); mix: "
        + ", ".join(f"{k} {w}%" for w, k in MIX)
        + f"; slow_client_timeout {SLOW_CLIENT_TIMEOUT:g} s; every request on a new connection",
        f"- as planned: {sum(load.tally.done.values()):,} ("
        + ", ".join(f"{k} {v:,}" for k, v in sorted(load.tally.done.items()))
        + f"); not as planned: {sum(load.tally.failed.values()):,}"
        + (
            " (" + ", ".join(f"{k} {v}" for k, v in load.tally.failed.most_common(6)) + ")"
            if load.tally.failed
            else ""
        ),
        f"- longest conversation: {max(load.turns.values(), default=0)} turns",
        f"- **{verdict}**: RSS {level:.1f} MB after {warm:g} min of warm-up; least-squares slope "
        f"after it {slope * 10:+.2f} MB per 10 min, a drift of {drift:+.1f} MB ({pct:+.1f}%) "
        f"over {span:.1f} min (target: within {TARGET_PCT:g}%)",
        f"- peak RSS {max(mb for _, mb in samples):.1f} MB; "
        + (f"RSS 10 s after the load stopped: {idle_after:.1f} MB" if idle_after else ""),
        "",
        "RSS is the mean of the minute's samples; streams (lean_active_streams) and CPU are "
        "the most seen in the minute; *others* is CPU used by other processes on lean's core "
        "(the machine is shared: a busy neighbour slows lean, more streams overlap, and the "
        "allocator keeps the larger heap).",
        "",
        "| minute | RSS MB | streams max | lean CPU % max | others on lean's core % max |",
        "|---:|---:|---:|---:|---:|",
    ]
    by_minute: dict[int, list[tuple[float, Context]]] = {}
    for (t, mb), ctx in zip(samples, context, strict=True):
        by_minute.setdefault(int(t), []).append((mb, ctx))
    for minute, values in sorted(by_minute.items()):
        rss = statistics.fmean(mb for mb, _ in values)
        streams = max(c.streams for _, c in values)
        cpu = max(c.cpu_pct for _, c in values)
        others = max(c.others_pct for _, c in values)
        lines.append(f"| {minute} | {rss:.1f} | {streams} | {cpu:.0f} | {others:.0f} |")
    return "\n".join(lines) + "\n"


def write_section(path: Path, text: str) -> None:
    """Replace (or append) the soak section of RESULTS.md, keeping every other section."""
    old = path.read_text() if path.exists() else ""
    head, found, rest = old.partition(SECTION)
    tail = ""
    if found:
        nxt = rest.find("\n## ")
        tail = rest[nxt + 1 :] if nxt >= 0 else ""
    path.write_text(head.rstrip("\n") + "\n\n" + text + ("\n" + tail if tail else ""))


def kept_section(path: Path) -> str:
    """The soak section of an existing RESULTS.md (for the main bench, which rewrites it)."""
    if not path.exists():
        return ""
    _, found, rest = path.read_text().partition(SECTION)
    if not found:
        return ""
    nxt = rest.find("\n## ")
    return "\n" + SECTION + (rest[: nxt + 1] if nxt >= 0 else rest)


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the load (30)")
    parser.add_argument("--warmup", type=float, default=None, help="minutes (default min(5, 1/4))")
    parser.add_argument("--users", type=int, default=80, help="people at once (80)")
    parser.add_argument("--conversations", type=int, default=400, help="conversation ids (400)")
    parser.add_argument("--sample", type=float, default=5.0, help="seconds between RSS reads (5)")
    parser.add_argument("--output", default=str(RESULTS), help="file to update ('-': none)")
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = min(5.0, args.minutes / 4)
    command = ("python -m bench soak " + " ".join(argv)).strip()
    target_core, harness_core = cores()
    pin_self(harness_core)
    raise_nofile()
    workdir = Path(tempfile.mkdtemp(prefix="lean-soak-"))
    print(f"soak: {args.minutes:g} min, logs in {workdir}", flush=True)
    children: list[Child] = []
    try:
        mock_port, port = free_port(), free_port()
        mock = Child(
            "mock", python("bench.harness.mock", "--port", str(mock_port)),
            core=harness_core, log=workdir / "mock.log",
        )  # fmt: skip
        children.append(mock)
        wait_http(mock, mock_port)
        config = workdir / "lean.ini"
        config.write_text(lean_config(port, mock_port, workdir / "soak.db"))
        env = dict(os.environ)
        env.pop("LEAN_BENCH_NO_TOKENS", None)
        lean = Child(
            "lean", python("lean", "serve", "--config", str(config)),
            core=target_core, log=workdir / "lean.log", env=env,
        )  # fmt: skip
        children.append(lean)
        wait_http(lean, port)
        samples: list[tuple[float, float]] = []
        context: list[Context] = []  # per sample, beside the RSS
        started = time.monotonic()

        async def sample() -> None:
            cores = {target_core} if target_core is not None else set()
            busy_before = core_busy(cores) if cores else {}
            cpu_before = cpu_seconds(lean.pid) or 0.0
            clock = time.monotonic()
            async with aiohttp.ClientSession() as http:
                while True:
                    await asyncio.sleep(args.sample)
                    rss = memory_kb(lean.pid).get("VmRSS")
                    now = time.monotonic()
                    streams = await _active_streams(http, port)
                    cpu = cpu_seconds(lean.pid) or cpu_before
                    others = 0.0
                    if cores:
                        busy = core_busy(cores)
                        spent = sum(busy.values()) - sum(busy_before.values())
                        others = max(0.0, 100 * (spent - (cpu - cpu_before)) / (now - clock))
                        busy_before = busy
                    cpu_pct = 100 * (cpu - cpu_before) / (now - clock)
                    cpu_before, clock = cpu, now
                    if rss is not None:
                        samples.append(((now - started) / 60, rss / 1024))
                        context.append(Context(streams, cpu_pct, others))

        async def main() -> tuple[Load, float | None]:
            sampler = asyncio.create_task(sample())
            try:
                load = await _load(port, args.users, args.conversations, args.minutes * 60)
            finally:
                sampler.cancel()
            await asyncio.sleep(10)
            rss = memory_kb(lean.pid).get("VmRSS")
            return load, rss / 1024 if rss else None

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            load, idle_after = runner.run(main())
        lean.check()
        if lean.crashed is not None:
            print(f"lean exited with {lean.crashed}:\n{lean.tail()}", file=sys.stderr)
            return 1
        text = report(samples, context, idle_after, load, args, command)
    finally:
        for child in reversed(children):
            child.stop(grace=5)
    print(text)
    if args.output != "-":
        write_section(Path(args.output), text)
        print(f"written to {args.output}")
    return 0
