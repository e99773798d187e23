"""Micro-bench: provider-side SSE parsing and JSON, the figures behind docs/decisions.md.

Run: python -m bench.bench_sse    (about 30 s; prints medians of several repeats)

1. lean.sse on an OpenAI stream held in memory: ~4 KiB reads, one event per feed.
2. Over loopback (server in a child process serving the same bytes): aiohttp's read path
   alone, lean.sse over resp.content.iter_any(), aiohttp-sse-client's EventSource.
3. JSON: one OpenAI chunk decoded into msgspec Structs, by orjson, by json.
4. Framing one SSE event, and decode + transform + encode + frame with msgspec / orjson.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.metadata
import json
import multiprocessing
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection

import aiohttp
import msgspec
import orjson
import uvloop
from aiohttp import web
from aiohttp_sse_client import client as sse_client  # type: ignore[import-untyped]  # no stubs

from lean.sse import SSEParser

EVENTS = 20_000  # ~5 MB of OpenAI chunks: long enough to time, short enough to repeat
REPEAT = 7
WORDS = ["Hello", " world", ",", " this", " is", " a", " streamed", " reply", ".", " Ça", " va?"]


def openai_events(n: int = EVENTS) -> list[bytes]:
    """An OpenAI Chat Completions stream as it arrives: one `data:` event per token."""
    head = {
        "id": "chatcmpl-AWx3pSJ0bTOi4vQdDUJpeRqR2hYkp",
        "object": "chat.completion.chunk",
        "created": 1732201234,
        "model": "gpt-4o-mini-2024-07-18",
        "system_fingerprint": "fp_0ba0d124f1",
    }
    events = []
    for i in range(n - 2):
        delta = {"role": "assistant", "content": ""} if i == 0 else {"content": WORDS[i % 11]}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
        events.append(b"data: %b\n\n" % json.dumps({**head, "choices": [choice]}).encode())
    stop = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    events.append(b"data: %b\n\n" % json.dumps({**head, "choices": [stop]}).encode())
    events.append(b"data: [DONE]\n\n")
    return events


def median_ns(run: Callable[[], int], repeat: int = REPEAT) -> float:
    """Median over `repeat` runs of elapsed ns / the count `run` returns."""
    samples = []
    for _ in range(repeat):
        start = time.perf_counter_ns()
        count = run()
        samples.append((time.perf_counter_ns() - start) / count)
    return statistics.median(samples)


def per_call_ns(fn: Callable[[], object], n: int = 200_000) -> float:
    def run() -> int:
        for _ in range(n):
            fn()
        return n

    return median_ns(run)


# -- 1. Parser alone --------------------------------------------------------------------


def parse_all(pieces: list[bytes]) -> int:
    parser = SSEParser()
    count = 0
    for piece in pieces:
        count += len(parser.feed(piece))
    parser.close()
    return count


def bench_parser(events: list[bytes]) -> list[tuple[str, float]]:
    blob = b"".join(events)
    reads = [blob[i : i + 4096] for i in range(0, len(blob), 4096)]
    crlf = blob.replace(b"\n", b"\r\n")
    crlf_reads = [crlf[i : i + 4096] for i in range(0, len(crlf), 4096)]
    assert parse_all(reads) == parse_all(events) == parse_all(crlf_reads) == len(events)
    rows = []
    for name, pieces in [
        ("lean.sse, 4 KiB reads", reads),
        ("lean.sse, one event per feed", events),
        ("lean.sse, 4 KiB reads, CRLF line ends", crlf_reads),
    ]:
        rows.append((name, median_ns(functools.partial(parse_all, pieces))))
    return rows


# -- 2. Over loopback -------------------------------------------------------------------


def serve(blob: bytes, conn: Connection) -> None:
    """Child process: serve `blob` as text/event-stream on every POST /, in 16 KiB writes."""

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(0, len(blob), 16384):
            await resp.write(blob[i : i + 16384])
        await resp.write_eof()
        return resp

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/", stream)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        conn.send(runner.addresses[0][1])
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # wait for "stop"
        await runner.cleanup()

    asyncio.Runner(loop_factory=uvloop.new_event_loop).run(main())


async def read_only(session: aiohttp.ClientSession, url: str, expected: int) -> int:
    async with session.post(url) as resp:
        async for _ in resp.content.iter_any():
            pass
    return expected


async def lean_over_iter_any(session: aiohttp.ClientSession, url: str, expected: int) -> int:
    parser = SSEParser()
    count = 0
    async with session.post(url) as resp:
        async for chunk in resp.content.iter_any():
            count += len(parser.feed(chunk))
    parser.close()
    return count


async def sse_client_event_source(session: aiohttp.ClientSession, url: str, expected: int) -> int:
    count = 0
    async with sse_client.EventSource(url, option={"method": "POST"}, session=session) as source:
        async for _ in source:
            count += 1
            if count == expected:  # stop before its reconnect-after-EOF kicks in
                break
    return count


Client = Callable[[aiohttp.ClientSession, str, int], Awaitable[int]]


async def bench_loopback_async(url: str, expected: int) -> list[tuple[str, float]]:
    rows = []
    clients: list[tuple[str, Client]] = [
        ("aiohttp iter_any, no parsing (read path alone)", read_only),
        ("lean.sse over resp.content.iter_any()", lean_over_iter_any),
        ("aiohttp-sse-client 0.2.1 EventSource", sse_client_event_source),
    ]
    async with aiohttp.ClientSession() as session:
        for name, client in clients:
            assert await client(session, url, expected) == expected  # warm up, check count
            samples = []
            for _ in range(REPEAT):
                start = time.perf_counter_ns()
                count = await client(session, url, expected)
                samples.append((time.perf_counter_ns() - start) / count)
            rows.append((name, statistics.median(samples)))
    return rows


def bench_loopback(events: list[bytes]) -> list[tuple[str, float]]:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    server = ctx.Process(target=serve, args=(b"".join(events), child), daemon=True)
    server.start()
    try:
        port = parent.recv()
        url = f"http://127.0.0.1:{port}/"
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(bench_loopback_async(url, len(events)))
    finally:
        parent.send("stop")
        server.join(10)
        if server.is_alive():
            server.kill()


# -- 3 and 4. JSON and framing ----------------------------------------------------------


class Delta(msgspec.Struct):
    content: str | None = None
    role: str | None = None


class Choice(msgspec.Struct):
    index: int
    delta: Delta
    finish_reason: str | None = None


class Chunk(msgspec.Struct):
    id: str
    object: str
    created: int
    model: str
    choices: list[Choice]


class TextDelta(msgspec.Struct, tag="delta"):
    """The shape of a small unified event lean re-encodes for its clients."""

    run: str
    seq: int
    text: str


CHUNK = (
    b'{"id":"chatcmpl-AWx3pSJ0bTOi4vQdDUJpeRqR2hYkp","object":"chat.completion.chunk",'
    b'"created":1732201234,"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,'
    b'"delta":{"content":"Hello"},"finish_reason":null}]}'
)


def bench_json() -> list[tuple[str, float]]:
    decoder = msgspec.json.Decoder(Chunk)
    encoder = msgspec.json.Encoder()
    event = TextDelta("run_01JD8X3Q", 12, "Hello")
    payload = encoder.encode(event)
    assert (
        decoder.decode(CHUNK).choices[0].delta.content
        == orjson.loads(CHUNK)["choices"][0]["delta"]["content"]
    )

    def msgspec_pipeline() -> bytes:
        chunk = decoder.decode(CHUNK)
        text = chunk.choices[0].delta.content or ""
        return b"data: %b\n\n" % encoder.encode(TextDelta("run_01JD8X3Q", 12, text))

    def orjson_pipeline() -> bytes:
        chunk = orjson.loads(CHUNK)
        text = chunk["choices"][0]["delta"].get("content") or ""
        body = {"type": "delta", "run": "run_01JD8X3Q", "seq": 12, "text": text}
        return b"data: %b\n\n" % orjson.dumps(body)

    assert msgspec_pipeline() == orjson_pipeline()
    empty = per_call_ns(lambda: None)
    rows = [
        ("decode chunk -> msgspec Structs", per_call_ns(lambda: decoder.decode(CHUNK))),
        ("decode chunk -> orjson.loads dict", per_call_ns(lambda: orjson.loads(CHUNK))),
        ("decode chunk -> json.loads dict", per_call_ns(lambda: json.loads(CHUNK))),
        (
            'frame bytes: b"data: %b\\n\\n" % payload',
            per_call_ns(lambda: b"data: %b\n\n" % payload),
        ),
        (
            "msgspec encode small Struct + frame",
            per_call_ns(lambda: b"data: %b\n\n" % encoder.encode(event)),
        ),
        ("decode+transform+encode+frame, msgspec", per_call_ns(msgspec_pipeline)),
        ("decode+transform+encode+frame, orjson", per_call_ns(orjson_pipeline)),
    ]
    return [(name, ns - empty) for name, ns in rows] + [("(empty call, subtracted)", empty)]


# -- Report -----------------------------------------------------------------------------


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def header() -> None:
    print(f"$ {shlex.join(sys.orig_argv)}    (cwd {os.getcwd()})")
    print(
        f"Python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs; "
        + ", ".join(
            f"{d} {version(d)}"
            for d in ("aiohttp", "msgspec", "orjson", "uvloop", "aiohttp-sse-client")
        )
    )
    print(f"median of {REPEAT} repeats; loop: uvloop; stream: OpenAI chunks")


def table(title: str, rows: list[tuple[str, float]], rate: bool) -> None:
    print(f"\n{title}")
    for name, ns in rows:
        if rate:
            print(f"  {name:<50} {1e9 / ns:>12,.0f} events/s  {ns / 1000:>7.2f} µs/event")
        else:
            print(f"  {name:<50} {ns:>8,.0f} ns")


def main() -> None:
    header()
    events = openai_events()
    size = sum(map(len, events))
    print(f"{len(events):,} events, {size:,} bytes ({size / len(events):.0f} bytes/event)")
    started = time.perf_counter()
    table("1. lean.sse, bytes in memory", bench_parser(events), rate=True)
    table("2. Over loopback (server in a child process, same bytes)", bench_loopback(events), True)
    table("3-4. JSON and framing, per call", bench_json(), rate=False)
    print(f"\ntotal {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
