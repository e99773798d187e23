"""Mock OpenAI-compatible provider: streams pre-encoded Chat Completions chunks.

    python -m bench.harness.mock --port P [--tls-port Q --cert C --key K] [--sndbuf B]

`POST /v1/chat/completions` answers with `chunks` content chunks `interval` seconds
apart (the first one after one interval, like a model thinking), a finish chunk, a
usage chunk when the request asks for it (`stream_options.include_usage`, as lean
does), and `data: [DONE]`. The defaults come from the command line; a request may
override them with the body fields `bench_chunks`, `bench_interval` and
`bench_size` (content characters per chunk), which lean passes through untouched
on its OpenAI endpoint, or else with `[bench chunks=N interval=S size=B]` in the
last message, which is how a scene run or a WebSocket run (whose bodies lean
builds itself) says what it wants.

To stay far from being the bottleneck, every frame is encoded once per size, and
with `interval` 0 the chunks go out `BURST` per write, as back-to-back tokens reach a
proxy anyway (coalesced into ~4 KB reads). `GET /stats` counts the streams started,
completed and cut by the peer (how lean's evictions reach the provider).

For lean's non-streaming fallback (bench/bursts.py): with `[bench whole]` in the
last message a streaming request gets HTTP 500 and a non-streaming one gets the
whole answer (`chunks` x `size` characters) as one chat.completion.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import signal
import socket
import ssl
from functools import lru_cache

import msgspec
import uvloop
from aiohttp import web

BURST = 16  # chunks per write when streaming back to back: ~2.6 KB of small chunks
HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


class _StreamOptions(msgspec.Struct):
    include_usage: bool = False


class _Message(msgspec.Struct):
    content: str | list[dict[str, object]] | None = None


class _Request(msgspec.Struct):
    messages: list[_Message] = []
    stream: bool = False
    stream_options: _StreamOptions | None = None
    bench_chunks: int | None = None
    bench_interval: float | None = None
    bench_size: int | None = None


_decode = msgspec.json.Decoder(_Request).decode
_ASK = re.compile(r"\[bench chunks=(\d+) interval=([0-9.]+) size=(\d+)\]")
_WHOLE = "[bench whole]"
_encode = msgspec.json.Encoder().encode


class Frames(msgspec.Struct, frozen=True):
    first: bytes  # carries the role, like OpenAI's first chunk
    middle: bytes
    burst: bytes  # BURST middles in one write
    finish: bytes
    usage: bytes
    done: bytes


@lru_cache(maxsize=64)
def frames(size: int) -> Frames:
    head = {"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1700000000}
    head["model"] = "mock-model"
    text = ("lorem ipsum dolor sit amet " * (size // 27 + 1))[:size]

    def chunk(delta: dict[str, str], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return b"data: " + _encode({**head, "choices": [choice]}) + b"\n\n"

    usage = {"prompt_tokens": 12, "completion_tokens": 200, "total_tokens": 212}
    middle = chunk({"content": text})
    return Frames(
        first=chunk({"role": "assistant", "content": text}),
        middle=middle,
        burst=middle * BURST,
        finish=chunk({}, "stop"),
        usage=b"data: " + _encode({**head, "choices": [], "usage": usage}) + b"\n\n",
        done=b"data: [DONE]\n\n",
    )


class Stats:
    def __init__(self) -> None:
        self.started = 0
        self.completed = 0
        self.cut = 0  # the peer left before the end: lean evicted or cancelled


stats_key = web.AppKey("stats", Stats)
defaults_key = web.AppKey("defaults", argparse.Namespace)


async def chat(request: web.Request) -> web.StreamResponse:
    options = request.app[defaults_key]
    spec = _decode(await request.read())
    chunks, interval, size = options.chunks, options.interval, options.size
    last = spec.messages[-1].content if spec.messages else None
    if isinstance(last, str) and (ask := _ASK.search(last)):
        chunks, interval, size = int(ask[1]), float(ask[2]), int(ask[3])
    if spec.bench_chunks is not None:
        chunks = spec.bench_chunks
    if spec.bench_interval is not None:
        interval = spec.bench_interval
    if isinstance(last, str) and _WHOLE in last:
        return whole(spec.stream, chunks * size)
    f = frames(size if spec.bench_size is None else spec.bench_size)
    usage = bool(spec.stream_options and spec.stream_options.include_usage)
    stats = request.app[stats_key]
    if options.sndbuf and request.transport is not None:
        sock = request.transport.get_extra_info("socket")
        if sock is not None:
            # Bounds what sits in the kernel behind a stalled proxy (it stops reading).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, options.sndbuf)
    response = web.StreamResponse(headers=HEADERS)
    await response.prepare(request)
    stats.started += 1
    loop = asyncio.get_running_loop()
    try:
        if interval > 0:
            due = loop.time()
            for i in range(chunks):
                due += interval
                await asyncio.sleep(due - loop.time())
                await response.write(f.first if i == 0 else f.middle)
        elif chunks > 0:
            await response.write(f.first)
            left = chunks - 1
            while left >= BURST:
                await response.write(f.burst)
                left -= BURST
            if left:
                await response.write(f.middle * left)
        await response.write(f.finish + (f.usage if usage else b"") + f.done)
        await response.write_eof()
    except asyncio.CancelledError:
        stats.cut += 1
        raise
    except ConnectionError:  # the proxy closed the upstream (an eviction, a client that left)
        stats.cut += 1
        return response
    stats.completed += 1
    return response


@lru_cache(maxsize=4)
def _completion(chars: int) -> bytes:
    message = {"role": "assistant", "content": "w" * chars}
    choice = {"index": 0, "message": message, "finish_reason": "stop"}
    return _encode({"id": "chatcmpl-mock", "object": "chat.completion", "choices": [choice]})


def whole(stream: bool, chars: int) -> web.Response:
    """The streaming path fails before its first byte; the non-streaming one answers whole."""
    if stream:
        body = _encode({"error": {"message": "mock: the stream is down", "type": "server_error"}})
        return web.Response(status=500, body=body, content_type="application/json")
    return web.Response(body=_completion(chars), content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def stats(request: web.Request) -> web.Response:
    s = request.app[stats_key]
    body = {"started": s.started, "completed": s.completed, "cut": s.cut}
    return web.Response(body=_encode(body), content_type="application/json")


async def serve(options: argparse.Namespace) -> None:
    app = web.Application()
    app[stats_key] = Stats()
    app[defaults_key] = options
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/stats", stats)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", options.port, backlog=4096).start()
    if options.tls_port:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(options.cert, options.key)
        site = web.TCPSite(runner, "127.0.0.1", options.tls_port, ssl_context=context, backlog=4096)
        await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    with contextlib.suppress(Exception):
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.harness.mock")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tls-port", type=int, default=0)
    parser.add_argument("--cert", default="")
    parser.add_argument("--key", default="")
    parser.add_argument("--chunks", type=int, default=200)
    parser.add_argument("--interval", type=float, default=0.025)
    parser.add_argument("--size", type=int, default=4, help="content characters per chunk")
    parser.add_argument("--sndbuf", type=int, default=0, help="SO_SNDBUF of each stream, 0 = OS")
    options = parser.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(options))


if __name__ == "__main__":
    main()
