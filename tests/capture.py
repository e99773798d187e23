"""A tiny real HTTP server on 127.0.0.1 that records what an official SDK sends and
answers with a canned status and body: the SDK's own request shapes, captured, not
written by hand."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web


class Captured:
    def __init__(self, method: str, path: str, headers: dict[str, str], body: Any) -> None:
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body
        self.raw = json.dumps(body).encode()


class Capture:
    """Records every request; answers each with `status` and `reply` (JSON bytes)."""

    def __init__(self, status: int = 400, reply: bytes = b"{}") -> None:
        self.status = status
        self.reply = reply
        self.headers: dict[str, str] = {}
        self.requests: list[Captured] = []
        self.url = ""

    async def _handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        body = json.loads(raw) if raw else None
        self.requests.append(
            Captured(
                request.method,
                request.path,
                {k.lower(): v for k, v in request.headers.items()},
                body,
            )
        )
        return web.Response(
            status=self.status,
            body=self.reply,
            content_type="application/json",
            headers=self.headers,
        )

    @property
    def last(self) -> Captured:
        return self.requests[-1]


@asynccontextmanager
async def capturing(status: int = 400, reply: bytes = b"{}") -> AsyncIterator[Capture]:
    capture = Capture(status, reply)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", capture._handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    capture.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield capture
    finally:
        await runner.cleanup()
