"""The stream watchdog (`lean.guard`) follows who lean waits for (issue 10, items 1 and 2).

lean runs for real (tests.support.running) behind FakeOpenAI; clients are real: aiohttp
for SSE and the WebSocket, and a raw socket with a small receive buffer for a client that
reads slowly but steadily. The upstream's silence limit (`read_timeout`) applies only
while lean waits for the upstream: a tool round waits for its tools
(`tool_timeout` past the tool's own timeout) or for the client's answer
(`client_tool_timeout`). A client is slow when it takes nothing for
`slow_client_timeout`, however long a large batch takes it to read; a client that is
behind gets the text that piled up meanwhile in fewer, larger deltas.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from typing import Any

import aiohttp
import pytest

from lean import guard as lean_guard
from lean.config import Config
from lean.errors import SlowClient
from lean.guard import Guard
from lean.handlers import services_key
from tests.fakes import DONE, FakeOpenAI, Stream, sse, text_stream, tool_call_stream
from tests.support import chat_body, lean_config, running

pytestmark = pytest.mark.timeout(30)

READ_TIMEOUT = 0.3  # the upstream's silence limit; every wait below is several times longer
DOZE = 1.0  # seconds the `doze` tool sleeps: > READ_TIMEOUT, < its own timeout
ANSWER = "Oslo it is."
ASK = ("call_ask", "ask_user", '{"question": "Which city?"}')
TOOLS = """
[tool.ask_user]
kind = client

[tool.doze]
kind = python
function = tests.test_guard:doze
timeout = 3

[tool.stubborn]
kind = python
function = tests.test_guard:stubborn
timeout = 0.3

[scene.assistant]
model = default
template = {message}
tools = ask_user, doze, stubborn

[scene.plain]
model = default
template = {message}
"""


async def doze() -> str:
    """A python tool slower than the upstream's silence limit, within its own timeout."""
    await asyncio.sleep(DOZE)
    return "rested"


async def stubborn() -> str:
    """A python tool that does not stop when its timeout cancels it (for a while)."""
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        await asyncio.sleep(5)  # cancelled again when the run ends: nothing is left behind
    return "too late"


def config(fake: FakeOpenAI, *, limits: str = "client_tool_timeout = 3") -> Config:
    return lean_config(
        fake.base_url,
        provider=f"read_timeout = {READ_TIMEOUT}",
        limits=limits,
        server="ping_interval = 0.2",
        extra=TOOLS,
    )


class SceneEvents:
    """A scene run's SSE stream, event by event; `: ping` comments are counted."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.seen: list[tuple[str, dict[str, Any]]] = []
        self.pings = 0

    async def until(self, name: str) -> dict[str, Any]:
        async with asyncio.timeout(10):
            while block := await self._resp.content.readuntil(b"\n\n"):
                if block.startswith(b": ping"):
                    self.pings += 1
                    continue
                fields = dict(line.split(": ", 1) for line in block.decode().split("\n") if line)
                self.seen.append((fields["event"], json.loads(fields["data"])))
                if fields["event"] in (name, "done", "error"):
                    return self.seen[-1][1]
        raise AssertionError(f"the stream ended without {name}")

    def last(self) -> tuple[str, dict[str, Any]]:
        return self.seen[-1]


# --- item 1: a tool round is not the upstream's silence ------------------------------------


async def test_a_client_tool_answered_after_read_timeout_over_http_completes() -> None:
    async with FakeOpenAI() as fake, running(config(fake)) as lean:
        fake.push(tool_call_stream([ASK]), text_stream(ANSWER))
        async with aiohttp.ClientSession() as http:
            url = f"{lean.url}/v1/scenes/assistant/stream"
            async with http.post(url, json={"message": "Where?"}) as resp:
                run = SceneEvents(resp)
                run_id = (await run.until("start"))["runId"]
                await run.until("waiting")
                assert run.last()[0] == "waiting"
                await asyncio.sleep(4 * READ_TIMEOUT)  # the user thinks
                results = f"{lean.url}/v1/runs/{run_id}/tool-results"
                answer = {"toolCallId": "call_ask", "result": "Oslo"}
                async with http.post(results, json=answer) as accepted:
                    assert accepted.status == 200
                done = await run.until("done")
    names = [name for name, _ in run.seen]
    assert names[-1] == "done" and "error" not in names
    assert done["text"] == ANSWER
    assert run.pings >= 2  # heartbeats go on while lean waits for the client
    assert len(fake.requests) == 2


async def test_a_client_tool_answered_after_read_timeout_over_websocket_completes() -> None:
    async with FakeOpenAI() as fake, running(config(fake)) as lean:
        fake.push(tool_call_stream([ASK]), text_stream(ANSWER))
        frames: list[dict[str, Any]] = []
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(f"{lean.url}/v1/ws") as ws,
        ):
            await ws.send_json(
                {"type": "run", "runId": "r1", "scene": "assistant", "message": "Where?"}
            )

            async def until(kind: str) -> dict[str, Any]:
                async with asyncio.timeout(10):
                    while True:
                        frame: dict[str, Any] = json.loads(await ws.receive_str())
                        frames.append(frame)
                        if frame["type"] in (kind, "done", "error"):
                            return frame

            assert (await until("waiting"))["type"] == "waiting"
            with contextlib.suppress(TimeoutError):  # nothing comes while the user thinks
                async with asyncio.timeout(4 * READ_TIMEOUT):
                    await until("done")
            await ws.send_json(
                {"type": "tool_result", "runId": "r1", "toolCallId": "call_ask", "result": "Oslo"}
            )
            final = await until("done")
    assert final["type"] == "done", final
    assert final["text"] == ANSWER


async def test_a_server_tool_slower_than_read_timeout_completes() -> None:
    async with FakeOpenAI() as fake, running(config(fake)) as lean:
        fake.push(tool_call_stream([("call_doze", "doze", "{}")]), text_stream(ANSWER))
        async with aiohttp.ClientSession() as http:
            url = f"{lean.url}/v1/scenes/assistant/stream"
            async with http.post(url, json={"message": "Rest"}) as resp:
                run = SceneEvents(resp)
                final = await run.until("done")
    assert run.last()[0] == "done", final
    end = next(data for name, data in run.seen if name == "tool_end")
    assert end["result"] == "rested" and end["isError"] is False
    # uvloop's timers have 1 ms resolution: a sleep may end up to 1 ms before the wall clock
    assert end["durationMs"] >= DOZE * 1000 - 5
    assert run.pings >= 2


async def test_a_server_tool_that_outlives_its_own_timeout_ends_the_run_as_tool_timeout() -> None:
    async with FakeOpenAI() as fake, running(config(fake)) as lean:
        fake.push(tool_call_stream([("call_stub", "stubborn", "{}")]))
        async with aiohttp.ClientSession() as http:
            url = f"{lean.url}/v1/scenes/assistant/stream"
            async with http.post(url, json={"message": "Try"}) as resp:
                run = SceneEvents(resp)
                await run.until("tool_start")
                started = time.monotonic()
                error = await run.until("error")
                waited = time.monotonic() - started
    assert run.last()[0] == "error"
    assert error["code"] == "tool_timeout" and "stubborn" in error["message"]
    assert waited >= 0.3 + lean_guard.TOOL_GRACE - 0.1  # its own timeout, then the grace
    assert len(fake.requests) == 1


async def test_a_client_that_never_answers_ends_with_the_client_tool_code() -> None:
    limits = "client_tool_timeout = 1"
    async with FakeOpenAI() as fake, running(config(fake, limits=limits)) as lean:
        fake.push(tool_call_stream([ASK]))
        async with aiohttp.ClientSession() as http:
            url = f"{lean.url}/v1/scenes/assistant/stream"
            async with http.post(url, json={"message": "Where?"}) as resp:
                run = SceneEvents(resp)
                await run.until("waiting")
                waiting = time.monotonic()
                error = await run.until("error")
                waited = time.monotonic() - waiting
    assert run.last()[0] == "error"
    assert error["code"] == "tool_timeout" and "ask_user" in error["message"]
    assert waited >= 0.9  # client_tool_timeout, not read_timeout
    assert len(fake.requests) == 1


# --- item 2: a slow but steady reader, and what a client that is behind gets -------------

PIECE = 2000  # characters of each upstream text piece


def numbered(count: int, size: int = PIECE) -> list[str]:
    return [f"{i:06d}" + "z" * (size - 6) for i in range(count)]


def text_events(pieces: list[str]) -> list[bytes]:
    return [sse({"choices": [{"index": 0, "delta": {"content": p}}]}) for p in pieces]


class RawClient:
    """A real HTTP/1.1 client on a raw socket with a small receive buffer, reading at a
    pace it chooses: nothing is read from the kernel but what it asks for."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self.raw = bytearray()

    @classmethod
    async def post(cls, port: int, path: str, body: dict[str, Any]) -> RawClient:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, ("127.0.0.1", port))
        data = json.dumps(body).encode()
        await loop.sock_sendall(
            sock,
            b"POST %b HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%b" % (path.encode(), len(data), data),
        )
        return cls(sock)

    async def read(self, size: int, every: float, *, pause: float = 0.0) -> None:
        """`size` bytes at most every `every` s (after `pause` s) until the body ends."""
        await asyncio.sleep(pause)
        while not self.raw.endswith(b"\r\n0\r\n\r\n"):
            block = await self._loop.sock_recv(self._sock, size)
            if not block:
                break
            self.raw += block
            await asyncio.sleep(every)

    def body(self) -> bytes:
        """The chunked body, de-chunked."""
        head, _, rest = bytes(self.raw).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head[:200]
        out = bytearray()
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            out += rest[:size]
            rest = rest[size + 2 :]
        return bytes(out)

    def close(self) -> None:
        self._sock.close()


def sse_events(body: bytes) -> list[tuple[str, Any]]:
    out = []
    for block in body.decode().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n") if ": " in line)
        if "data" in fields:
            data = fields["data"]
            out.append((fields.get("event", ""), data if data == "[DONE]" else json.loads(data)))
    return out


def chat_text(events: list[tuple[str, Any]]) -> tuple[str, int]:
    """The text of a chat completion stream and how many chunks carried it."""
    parts = [
        c["choices"][0]["delta"]["content"]
        for _, c in events
        if c != "[DONE]" and c.get("choices") and c["choices"][0]["delta"].get("content")
    ]
    return "".join(parts), len(parts)


def scene_text(events: list[tuple[str, Any]]) -> tuple[str, int, str]:
    """The deltas' text of a scene run, how many deltas, and the final event's name."""
    deltas = [data["text"] for name, data in events if name == "delta"]
    return "".join(deltas), len(deltas), events[-1][0]


# A small kernel send buffer on lean's side, so what the client takes shows soon; a slow
# client limit far below the time the whole answer takes to read.
STEADY = "slow_client_timeout = 0.25\nsend_buffer_bytes = 8192"


@pytest.mark.parametrize("endpoint", ["chat", "scene"])
async def test_a_slow_but_steady_reader_is_not_cut_and_gets_every_byte(endpoint: str) -> None:
    pieces = numbered(100)  # 200 KB of text: ~1.3 s at 8 KB every 50 ms (5x the limit)
    async with FakeOpenAI() as fake:
        async with running(config(fake, limits=STEADY)) as lean:
            fake.push(Stream(events=[*text_events(pieces), DONE]))
            path, body = (
                ("/v1/chat/completions", chat_body())
                if endpoint == "chat"
                else ("/v1/scenes/plain/stream", {"message": "Go"})
            )
            client = await RawClient.post(lean.port, path, body)
            try:
                async with asyncio.timeout(15):
                    await client.read(8192, 0.05)
            finally:
                client.close()
            evictions = lean.app[services_key].metrics.evictions
    events = sse_events(client.body())
    if endpoint == "chat":
        assert events[-1][1] == "[DONE]"
        assert chat_text(events)[0] == "".join(pieces)
    else:
        text, _, last = scene_text(events)
        assert last == "done" and text == "".join(pieces)
        assert events[-1][1]["text"] == text
    assert evictions == 0


# A small kernel send buffer: the client is behind soon after its pause begins.
BEHIND = "slow_client_timeout = 5\nsend_buffer_bytes = 8192"


@pytest.mark.parametrize("endpoint", ["chat", "scene"])
async def test_a_client_that_is_behind_gets_fewer_larger_deltas(endpoint: str) -> None:
    pieces = numbered(3000, size=40)  # many small pieces, 100 to each upstream write
    writes = [b"".join(text_events(pieces[i : i + 100])) for i in range(0, len(pieces), 100)]
    async with FakeOpenAI() as fake:
        async with running(config(fake, limits=BEHIND)) as lean:
            fake.push(Stream(events=[*writes, DONE]))
            path, body = (
                ("/v1/chat/completions", chat_body())
                if endpoint == "chat"
                else ("/v1/scenes/plain/stream", {"message": "Go"})
            )
            client = await RawClient.post(lean.port, path, body)
            try:
                async with asyncio.timeout(15):
                    # Behind at first (the answer piles up), then reading as fast as it can.
                    await client.read(65536, 0, pause=0.5)
            finally:
                client.close()
    events = sse_events(client.body())
    if endpoint == "chat":
        text, frames = chat_text(events)
    else:
        text, frames, last = scene_text(events)
        assert last == "done"
    assert text == "".join(pieces)
    assert frames < len(pieces) / 2


async def test_upstream_silence_after_a_client_drained_is_still_noticed() -> None:
    """After lean waited for a client that was behind, it waits for the upstream again,
    under its silence limit."""
    pieces = numbered(300)  # 600 KB, then the upstream goes silent
    async with FakeOpenAI() as fake:
        async with running(config(fake, limits="slow_client_timeout = 5")) as lean:
            fake.push(Stream(events=text_events(pieces), stall_after=len(pieces)))
            client = await RawClient.post(lean.port, "/v1/chat/completions", chat_body())
            try:
                async with asyncio.timeout(10):
                    await client.read(65536, 0, pause=0.3)
            finally:
                client.close()
    events = sse_events(client.body())
    assert chat_text(events)[0] == "".join(pieces)
    assert events[-1][1]["error"]["code"] == "upstream_timeout"


# --- the guard alone, fed by hand -------------------------------------------------------------


async def test_the_guard_times_what_the_client_takes_not_how_long_a_drain_lasts() -> None:
    unsent = 1_000_000
    taking = True

    def pending() -> int:  # sampled once per tick of the watch
        nonlocal unsent
        if taking:
            unsent -= 4096
        return unsent

    stream = asyncio.ensure_future(asyncio.sleep(30))  # the task a slow client is cut from
    guard = Guard(ping_interval=10, slow_client_timeout=0.2, pending=pending, task=stream)
    try:
        guard.writing()
        await asyncio.sleep(0.8)  # four times the limit, the client taking bytes throughout
        assert not guard.evicted and not stream.done()
        taking = False
        async with asyncio.timeout(1):
            with contextlib.suppress(asyncio.CancelledError):
                await stream
        assert guard.evicted and isinstance(guard.take(), SlowClient)
    finally:
        stream.cancel()
        await guard.close()
