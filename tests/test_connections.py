"""Client connections stay bounded whatever peers do (issue 10, item 6): a head sent too
slowly, an idle keep-alive connection, more connections than `max_connections`.

Raw asyncio sockets to lean on 127.0.0.1, small numbers and short deadlines; a socket
"is closed" when lean's end reads as EOF (or a reset) within a bounded wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from lean.app import Server
from tests.support import lean_config, running

pytestmark = pytest.mark.timeout(30)

HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
WAIT = 5.0  # the longest any socket here may take to be closed, or to answer


async def connect(lean: Server) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", lean.port)


async def closed_by_lean(reader: asyncio.StreamReader, timeout: float = WAIT) -> bool:  # noqa: ASYNC109
    """True when lean closes the connection within `timeout` (what it sent before is skipped)."""
    try:
        async with asyncio.timeout(timeout):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    return True


async def answer(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> bytes:
    """One request on an open connection: the response's status line and headers."""
    writer.write(request)
    async with asyncio.timeout(WAIT):
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
    return head


async def metrics(lean: Server) -> str:
    async with aiohttp.ClientSession() as http, http.get(lean.url + "/metrics") as resp:
        return await resp.text()


@contextlib.asynccontextmanager
async def sockets(
    lean: Server, n: int
) -> AsyncIterator[list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]:
    opened = [await connect(lean) for _ in range(n)]
    try:
        yield opened
    finally:
        for _, writer in opened:
            writer.close()


async def test_a_head_sent_too_slowly_is_closed_after_header_timeout() -> None:
    cfg = lean_config(server="header_timeout = 0.3\nkeepalive_timeout = 20")
    async with running(cfg) as lean:
        # slowloris: a head that never ends, one header line at a time
        reader, writer = await connect(lean)
        started = time.monotonic()
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")

        async def trickle() -> None:
            for i in range(100):
                await asyncio.sleep(0.1)
                writer.write(b"X-Slow-%d: 1\r\n" % i)

        trickling = asyncio.create_task(trickle())
        try:
            assert await closed_by_lean(reader)
        finally:
            trickling.cancel()
            writer.close()
        assert time.monotonic() - started >= 0.2  # closed by the head's deadline, not before

        # On a kept-alive connection the next head has its own deadline from its first byte,
        # far shorter than the keep-alive one.
        reader, writer = await connect(lean)
        assert b" 200 " in await answer(reader, writer, HEALTHZ)
        writer.write(b"GET /healthz HTTP/1.1\r\n")
        assert await closed_by_lean(reader)
        writer.close()
        assert 'lean_admission_rejections_total{reason="header_timeout"} 2' in await metrics(lean)


async def test_an_idle_keep_alive_connection_is_closed_after_keepalive_timeout() -> None:
    cfg = lean_config(server="header_timeout = 20\nkeepalive_timeout = 0.3")
    async with running(cfg) as lean:
        reader, writer = await connect(lean)
        assert b" 200 " in await answer(reader, writer, HEALTHZ)
        started = time.monotonic()
        assert await closed_by_lean(reader)
        assert time.monotonic() - started >= 0.2
        writer.close()
        # A connection in use is not idle: a stream longer than keepalive_timeout goes on.
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(lean.url + "/v1/ws") as ws:
                await asyncio.sleep(0.7)  # twice keepalive_timeout, and more
                await ws.send_json({"type": "cancel", "runId": "none"})
                frame = await ws.receive_json(timeout=WAIT)
                assert frame["code"] == "not_found"


async def test_at_max_connections_the_longest_idle_gives_way_to_a_new_client() -> None:
    cfg = lean_config(server="max_connections = 20\nheader_timeout = 20\nkeepalive_timeout = 20")
    async with running(cfg) as lean, sockets(lean, 20) as idle:
        for _ in range(int(WAIT / 0.01)):  # until lean has accepted them all
            if len(lean.connections) == 20:
                break
            await asyncio.sleep(0.01)
        assert len(lean.connections) == 20
        reader, writer = await connect(lean)
        try:
            assert b" 200 " in await answer(reader, writer, HEALTHZ)
        finally:
            writer.close()
        assert await closed_by_lean(idle[0][0])  # the oldest idle socket made room
        for later, _ in idle[1:]:
            assert not later.at_eof()


async def test_at_max_connections_busy_ones_stay_new_ones_are_refused_and_healthz_answers() -> None:
    cfg = lean_config(server="max_connections = 20\nheader_timeout = 20\nkeepalive_timeout = 20")
    async with running(cfg) as lean, aiohttp.ClientSession() as http:
        sockets_ = [await http.ws_connect(lean.url + "/v1/ws") for _ in range(20)]
        try:
            # Every connection runs a request: a new one gets only the health probes.
            reader, writer = await connect(lean)
            head = await answer(
                reader, writer, b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            )
            assert b" 503 " in head
            assert await closed_by_lean(reader)
            writer.close()
            await asyncio.sleep(0.1)  # lean has seen it go
            async with sockets(lean, 8) as probes:
                for reader, writer in probes:
                    assert b" 200 " in await answer(reader, writer, HEALTHZ)
                # past the reserved ones: closed at once, answered nothing
                reader, writer = await connect(lean)
                writer.write(HEALTHZ)
                with contextlib.suppress(ConnectionError):  # a reset: closed, unread
                    assert await asyncio.wait_for(reader.read(65536), WAIT) == b""
                writer.close()
            for ws in sockets_:
                assert not ws.closed
        finally:
            for ws in sockets_:
                await ws.close()
        # the 503 on a reserved place, and the one closed at once past them
        assert 'lean_admission_rejections_total{reason="max_connections"} 2' in await metrics(lean)
