"""The reference target: what Python, aiohttp and uvloop alone cost to relay a stream.

    python -m bench.harness.relay --port P --upstream http://127.0.0.1:Q/v1

One task per stream, upstream bytes written to the client untouched as they arrive;
no parsing, no limits, no deadline (a stalled client blocks its task for as long as
it stalls). HTTPS upstreams are trusted through SSL_CERT_FILE, as for lean.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import aiohttp
import uvloop
from aiohttp import web

session_key = web.AppKey("session", aiohttp.ClientSession)
upstream_key = web.AppKey("upstream", str)


async def chat(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    headers = {"Content-Type": "application/json"}
    url = request.app[upstream_key] + "/chat/completions"
    async with request.app[session_key].post(url, data=body, headers=headers) as upstream:
        response = web.StreamResponse(
            status=upstream.status,
            headers={"Content-Type": upstream.content_type, "Cache-Control": "no-cache"},
        )
        await response.prepare(request)
        async for data in upstream.content.iter_any():
            await response.write(data)
        await response.write_eof()
    return response


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def serve(port: int, upstream: str) -> None:
    app = web.Application()
    app[upstream_key] = upstream.rstrip("/")
    app[session_key] = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None)
    )
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    await app[session_key].close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.harness.relay")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:9/v1")
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args.port, args.upstream))


if __name__ == "__main__":
    main()
