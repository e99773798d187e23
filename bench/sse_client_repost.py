"""Reproduce aiohttp-sse-client 0.2.1's defects against a local server (loopback only).

Run: python -m bench.sse_client_repost    (stops by itself after ~15 s)

Each scenario POSTs once with EventSource(option={"method": "POST"}) and reads for a
bounded time. The server counts the POSTs it receives: every one past the first is a new,
billed generation upstream. The same bytes fed to lean.sse show what the spec gives.
"""

from __future__ import annotations

import asyncio
import collections
import importlib.metadata
import shlex
import sys
import time
from dataclasses import dataclass
from datetime import timedelta

import aiohttp
from aiohttp import web
from aiohttp_sse_client import client as sse_client  # type: ignore[import-untyped]  # no stubs

from lean.sse import SSEParser

WATCH_S = 15.0  # how long the re-POST scenarios run
QUIRK_S = 4.0  # how long the parsing scenarios run (they re-POST too)

# Gemini-style: ends cleanly, with no end marker the consumer could stop on.
CLEAN = b"".join(
    b'data: {"candidates":[{"content":{"parts":[{"text":"%b"}]}}]}\n\n' % word
    for word in (b"Hello", b" there", b"!")
)


@dataclass(frozen=True)
class Scenario:
    path: str
    title: str
    body: bytes
    seconds: float
    reconnection_time: timedelta = sse_client.DEFAULT_RECONNECTION_TIME
    spec: str = ""  # what the spec says should happen


SCENARIOS = [
    Scenario(
        "/clean",
        "clean end of stream, default reconnection_time (5 s)",
        CLEAN,
        WATCH_S,
        spec="1 POST, 3 event(s)",
    ),
    Scenario(
        "/clean-fast",
        "clean end of stream, reconnection_time=250 ms",
        CLEAN,
        WATCH_S,
        timedelta(milliseconds=250),
        spec="1 POST, 3 event(s)",
    ),
    Scenario("/lone-cr", "lone CR line ends", b"data: a\r\rdata: b\r\r", QUIRK_S),
    Scenario(
        "/bom", "BOM-prefixed stream", b"\xef\xbb\xbfdata: first\n\ndata: second\n\n", QUIRK_S
    ),
    Scenario(
        "/two-spaces", '"data:  two spaces" (spec strips one)', b"data:  two spaces\n\n", QUIRK_S
    ),
    Scenario(
        "/long-line",
        "one 600 KiB data line",
        b"data: " + b"x" * (600 << 10) + b"\n\n",
        QUIRK_S,
    ),
]


def lean_reading(body: bytes) -> list[str]:
    parser = SSEParser()
    messages = parser.feed(body)
    parser.close()
    return [m.data for m in messages]


def short(datas: list[str]) -> str:
    shown = [d if len(d) <= 24 else f"{d[:12]}...{d[-9:]} ({len(d):,} chars)" for d in datas[:3]]
    more = f" +{len(datas) - 3} more" if len(datas) > 3 else ""
    return f"{len(datas)} event(s) {shown!r}{more}"


async def read_with_sse_client(url: str, scenario: Scenario) -> tuple[list[str], str]:
    """Read for scenario.seconds; return the data delivered and how reading ended."""
    datas: list[str] = []
    ended = "no error; stopped by the bench's timeout"
    try:
        async with (
            asyncio.timeout(scenario.seconds),
            sse_client.EventSource(
                url, option={"method": "POST"}, reconnection_time=scenario.reconnection_time
            ) as source,
        ):
            async for event in source:
                datas.append(event.data)
    except TimeoutError:
        pass
    except Exception as exc:  # the defect under study: report it, don't die
        ended = f"raised {type(exc).__name__}: {' '.join(str(exc).split())[:70]}"
    return datas, ended


async def main() -> None:
    print(f"$ {shlex.join(sys.orig_argv)}")
    print(f"aiohttp-sse-client {importlib.metadata.version('aiohttp-sse-client')}, ", end="")
    print(f"aiohttp {aiohttp.__version__}, Python {sys.version.split()[0]}; 127.0.0.1 only\n")
    posts: collections.Counter[str] = collections.Counter()

    async def stream(request: web.Request) -> web.StreamResponse:
        posts[request.path] += 1
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(BODIES[request.path])
        await resp.write_eof()
        return resp

    BODIES = {s.path: s.body for s in SCENARIOS}
    app = web.Application()
    for s in SCENARIOS:
        app.router.add_post(s.path, stream)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    started = time.monotonic()
    try:
        results = await asyncio.gather(
            *(read_with_sse_client(f"http://127.0.0.1:{port}{s.path}", s) for s in SCENARIOS)
        )
    finally:
        await runner.cleanup()

    for s, (datas, ended) in zip(SCENARIOS, results, strict=True):
        print(f"* {s.title}")
        print(f"    server received {posts[s.path]} POST(s) in {s.seconds:.0f} s; {ended}")
        print(f"    aiohttp-sse-client delivered: {short(datas)}")
        spec = s.spec or short(lean_reading(s.body))
        print(f"    spec (lean.sse on the same bytes): {spec}")
    print(f"\ndone in {time.monotonic() - started:.1f} s")
    clean = posts["/clean"], posts["/clean-fast"]
    print(
        f"Summary: a stream that ended cleanly was POSTed again {clean[0] - 1} time(s) with the"
        f" default settings and {clean[1] - 1} times with reconnection_time=250 ms within"
        f" {WATCH_S:.0f} s; each repeat is a second generation. Lone CR dispatches nothing,"
        " a BOM loses the first event, every leading space is stripped."
    )


if __name__ == "__main__":
    asyncio.run(main())
