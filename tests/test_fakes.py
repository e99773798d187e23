"""The fake provider itself, proven with aiohttp's client and raw sockets (each async test
runs on asyncio and on uvloop, see conftest.py)."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
import uvloop

from tests.fakes import (
    DEFAULT_TEXT,
    DONE,
    FakeOpenAI,
    Reply,
    Stall,
    Stream,
    chunk,
    completion,
    error_body,
    free_port,
    sse,
    text_stream,
    tool_call_stream,
)

pytestmark = pytest.mark.timeout(20)

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
STREAM_CHAT = {**CHAT, "stream": True}

# The default stream written out by hand, so the helpers are checked, not trusted.
_HEAD = (
    b'data: {"id":"chatcmpl-fake","object":"chat.completion.chunk","created":1700000000,'
    b'"model":"fake-model","choices":'
)
DEFAULT_STREAM_BYTES = (
    _HEAD + b'[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n'
    b"" + _HEAD + b'[{"index":0,"delta":{"content":"Hello "},"finish_reason":null}]}\n\n'
    b"" + _HEAD + b'[{"index":0,"delta":{"content":"from "},"finish_reason":null}]}\n\n'
    b"" + _HEAD + b'[{"index":0,"delta":{"content":"the "},"finish_reason":null}]}\n\n'
    b"" + _HEAD + b'[{"index":0,"delta":{"content":"fake "},"finish_reason":null}]}\n\n'
    b"" + _HEAD + b'[{"index":0,"delta":{"content":"upstream."},"finish_reason":null}]}\n\n'
    b"" + _HEAD + b'[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
    b"" + _HEAD + b'[],"usage":{"prompt_tokens":8,"completion_tokens":5,"total_tokens":13}}\n\n'
    b"data: [DONE]\n\n"
)


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as f:
        yield f


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
        yield s


async def raw_exchange(fake: FakeOpenAI, body: dict[str, Any]) -> bytes:
    """POST over a bare socket and read until the server closes: the exact wire bytes."""
    port = int(fake.base_url.split(":")[2].split("/")[0])
    payload = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
            % (len(payload), payload)
        )
        async with asyncio.timeout(5):
            return await reader.read(-1)
    finally:
        writer.close()
        await writer.wait_closed()


async def test_running_loop_matches_param(request: pytest.FixtureRequest) -> None:
    """Guard for the claims below: the [uvloop] runs really are on uvloop."""
    loop = asyncio.get_running_loop()
    assert isinstance(loop, uvloop.Loop) == request.node.name.endswith("[uvloop]")


# --- wire format -------------------------------------------------------------------------


async def test_default_stream_bytes_exact(fake: FakeOpenAI, session: aiohttp.ClientSession) -> None:
    async with session.post(fake.base_url + "/chat/completions", json=STREAM_CHAT) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        assert resp.headers["Transfer-Encoding"] == "chunked"
        assert await resp.read() == DEFAULT_STREAM_BYTES
    rec = fake.requests[0]
    assert rec.finished is not None and rec.disconnected is None


async def test_default_stream_on_the_wire_ends_with_chunked_terminator(fake: FakeOpenAI) -> None:
    wire = await raw_exchange(fake, {**STREAM_CHAT})
    head, _, body = wire.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert body.endswith(b"\r\n0\r\n\r\n")


async def test_default_non_stream_is_a_completion(
    fake: FakeOpenAI, session: aiohttp.ClientSession
) -> None:
    async with session.post(fake.base_url + "/chat/completions", json=CHAT) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        assert await resp.json() == {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": 1700000000,
            "model": "fake-model",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": DEFAULT_TEXT},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 8, "completion_tokens": 5, "total_tokens": 13},
        }


async def test_split_one_sends_byte_by_byte_and_reassembles(
    fake: FakeOpenAI, session: aiohttp.ClientSession
) -> None:
    events = text_stream("héllo wörld ✓ — ok", reasoning="thinking…").events
    expected = b"".join(events)
    fake.push(Stream(events, split=1))
    async with session.post(fake.base_url + "/chat/completions", json=STREAM_CHAT) as resp:
        got = b""
        http_chunks = 0
        async for data, end_of_http_chunk in resp.content.iter_chunks():
            got += data
            http_chunks += end_of_http_chunk and data != b""  # not the final 0-size chunk
    assert got == expected
    assert http_chunks == len(expected)  # one HTTP chunk per byte: each piece its own write


async def test_split_larger_than_one(fake: FakeOpenAI, session: aiohttp.ClientSession) -> None:
    events = text_stream(DEFAULT_TEXT).events
    fake.push(Stream(events, split=7))
    async with session.post(fake.base_url + "/chat/completions", json=STREAM_CHAT) as resp:
        assert await resp.read() == DEFAULT_STREAM_BYTES


async def test_cut_after_fails_the_client_read(
    fake: FakeOpenAI, session: aiohttp.ClientSession
) -> None:
    events = text_stream(DEFAULT_TEXT).events
    fake.push(Stream(events, cut_after=2))
    got = b""
    async with session.post(fake.base_url + "/chat/completions", json=STREAM_CHAT) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            async for data in resp.content.iter_any():
                got += data
    assert got == events[0] + events[1]
    rec = fake.requests[0]
    assert rec.finished is None and rec.disconnected is None  # the fake left, not the client


async def test_cut_after_on_the_wire_has_no_chunked_terminator(fake: FakeOpenAI) -> None:
    events = text_stream(DEFAULT_TEXT).events
    fake.push(Stream(events, cut_after=3))
    wire = await raw_exchange(fake, STREAM_CHAT)
    _, _, body = wire.partition(b"\r\n\r\n")
    assert events[2] in body and events[3] not in body
    assert not body.endswith(b"0\r\n\r\n")


async def test_cut_after_zero_sends_headers_then_cuts(
    fake: FakeOpenAI, session: aiohttp.ClientSession
) -> None:
    fake.push(Stream([DONE], cut_after=0))
    async with session.post(fake.base_url + "/chat/completions", json=STREAM_CHAT) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


async def test_stream_status_and_headers(fake: FakeOpenAI, session: aiohttp.ClientSession) -> None:
    fake.push(Stream([sse({"x": 1})], status=202, headers={"X-Request-Id": "r1"}))
    async with session.post(fake.base_url + "/chat/completions", json=STREAM_CHAT) as resp:
        assert resp.status == 202
        assert resp.headers["X-Request-Id"] == "r1"
        assert await resp.read() == b'data: {"x":1}\n\n'


async def test_first_byte_delay_and_delay(fake: FakeOpenAI, session: aiohttp.ClientSession) -> None:
    fake.push(Stream([sse(1), sse(2), DONE], first_byte_delay=0.2, delay=0.1))
    t0 = time.monotonic()
    async with session.post(fake.base_url + "/chat/completions", json=STREAM_CHAT) as resp:
        assert time.monotonic() - t0 >= 0.19
        assert await resp.read() == b"data: 1\n\ndata: 2\n\ndata: [DONE]\n\n"
    assert time.monotonic() - t0 >= 0.39


# --- plain replies -----------------------------------------------------------------------


async def test_reply_429_with_retry_after(fake: FakeOpenAI, session: aiohttp.ClientSession) -> None:
    body = error_body("Rate limit reached", type="rate_limit_error", code="rate_limit_exceeded")
    fake.push(Reply(status=429, body=body, headers={"Retry-After": "2"}))
    async with session.post(fake.base_url + "/chat/completions", json=STREAM_CHAT) as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "2"
        assert resp.content_type == "application/json"
        assert await resp.read() == (
            b'{"error":{"message":"Rate limit reached","type":"rate_limit_error",'
            b'"param":null,"code":"rate_limit_exceeded"}}'
        )
    assert fake.requests[0].finished is not None


async def test_reply_raw_bytes(fake: FakeOpenAI, session: aiohttp.ClientSession) -> None:
    fake.push(
        Reply(status=502, raw=b"<html>bad gateway</html>", headers={"Content-Type": "text/html"})
    )
    async with session.post(fake.base_url + "/chat/completions", json=CHAT) as resp:
        assert resp.status == 502
        assert resp.content_type == "text/html"
        assert await resp.read() == b"<html>bad gateway</html>"


async def test_queued_behaviours_fifo_then_default(
    fake: FakeOpenAI, session: aiohttp.ClientSession
) -> None:
    fake.push(Reply(body={"n": 1}), Reply(body={"n": 2}))
    fake.push(Stream([sse({"n": 3}), DONE]))
    url = fake.base_url + "/chat/completions"
    seen: list[bytes] = []
    for _ in range(4):
        async with session.post(url, json=STREAM_CHAT) as resp:
            seen.append(await resp.read())
    assert seen == [
        b'{"n":1}',
        b'{"n":2}',
        b'data: {"n":3}\n\ndata: [DONE]\n\n',
        DEFAULT_STREAM_BYTES,
    ]


async def test_default_is_replaceable(fake: FakeOpenAI, session: aiohttp.ClientSession) -> None:
    fake.default = lambda body: Reply(status=500, body=error_body("boom", type="server_error"))
    async with session.post(fake.base_url + "/chat/completions", json=CHAT) as resp:
        assert resp.status == 500


async def test_requests_recorded(fake: FakeOpenAI, session: aiohttp.ClientSession) -> None:
    t0 = time.monotonic()
    async with session.post(
        fake.base_url + "/chat/completions",
        json=CHAT,
        headers={"Authorization": "Bearer sk-test", "X-Trace": "abc"},
    ) as resp:
        await resp.read()
    async with session.get(fake.base_url + "/models") as resp:
        assert await resp.json() == {
            "object": "list",
            "data": [{"id": "fake-model", "object": "model"}],
        }
    async with session.post(fake.base_url + "/embeddings", data=b"not json") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "not_found"

    chat, models, missing = fake.requests
    assert (chat.method, chat.path) == ("POST", "/v1/chat/completions")
    assert chat.body == CHAT
    assert json.loads(chat.raw) == CHAT
    assert chat.headers["Authorization"] == "Bearer sk-test"
    assert chat.headers["authorization"] == "Bearer sk-test"
    assert "x-trace" in chat.headers and chat.headers.get("X-TRACE") == "abc"
    assert chat.headers["Content-Type"] == "application/json"
    assert chat.finished is not None
    assert t0 <= chat.started <= chat.finished <= models.started
    assert (models.method, models.path, models.body, models.raw) == ("GET", "/v1/models", None, b"")
    assert (missing.path, missing.body, missing.raw) == ("/v1/embeddings", None, b"not json")


# --- disconnect detection ----------------------------------------------------------------

FIRST = text_stream(DEFAULT_TEXT).events[0]

# Behaviours during which the fake is silent: only handler cancellation can notice the
# client leaving within 1 s (the next write is 30 s away). bool: the client reads the
# first event before leaving; otherwise it gives up waiting for the headers after 0.3 s.
SILENT: dict[str, tuple[Callable[[], Stream | Reply | Stall], bool]] = {
    "stall": (Stall, False),
    "reply_delay": (lambda: Reply(body={"late": True}, delay=30), False),
    "first_byte_delay": (lambda: Stream([FIRST, DONE], first_byte_delay=30), False),
    "stream_delay": (lambda: Stream(text_stream(DEFAULT_TEXT).events, delay=30), True),
    "stall_after": (lambda: Stream(text_stream(DEFAULT_TEXT).events, stall_after=1), True),
}


@pytest.mark.parametrize("case", SILENT)
async def test_client_leaving_a_silent_fake_is_noticed_within_1s(
    fake: FakeOpenAI, session: aiohttp.ClientSession, case: str
) -> None:
    make, read_first = SILENT[case]
    fake.push(make())
    url = fake.base_url + "/chat/completions"
    t0 = time.monotonic()
    if read_first:
        async with session.post(url, json=STREAM_CHAT) as resp:
            assert await resp.content.readuntil(b"\n\n") == FIRST
            left = time.monotonic()
    else:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await session.post(url, json=STREAM_CHAT)
        left = time.monotonic()
    at = await fake.wait_disconnect(timeout=2)
    rec = fake.requests[0]
    assert at - left < 1.0
    assert at >= (rec.started if read_first else t0 + 0.29)  # not recorded before leaving
    assert rec.finished is None


async def test_client_leaving_a_fast_stream_is_noticed(fake: FakeOpenAI) -> None:
    """No delays: the fake is busy writing when the client goes.

    The client's receive buffer is kept small (Linux 6.8+ lets a loopback socket
    autotune to 32 MB, which would swallow the whole answer), and the answer is
    larger than what the fake's send buffer (4 MB at most) can hold.
    """
    events = [sse({"pad": "x" * 1000, "i": i}) for i in range(12000)]
    fake.push(Stream(events))
    port = int(fake.base_url.split(":")[2].split("/")[0])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    body = json.dumps(STREAM_CHAT).encode()
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
    )
    await reader.readuntil(b"\r\n\r\n")  # headers
    await reader.readuntil(b"\n\n")  # the first event
    writer.close()
    left = time.monotonic()
    at = await fake.wait_disconnect(timeout=2)
    assert at - left < 1.0
    assert fake.requests[0].finished is None


async def test_raw_socket_close_during_stall_is_noticed(fake: FakeOpenAI) -> None:
    """A client that just closes its socket (FIN, no RST) while the fake holds."""
    fake.push(Stall())
    port = int(fake.base_url.split(":")[2].split("/")[0])
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
    await fake.wait_request()
    writer.close()
    await writer.wait_closed()
    left = time.monotonic()
    assert await fake.wait_disconnect(timeout=2) - left < 1.0


async def test_wait_disconnect_times_out_and_fails_fast_on_finished(
    fake: FakeOpenAI, session: aiohttp.ClientSession
) -> None:
    with pytest.raises(TimeoutError, match="not disconnected"):
        await fake.wait_disconnect(timeout=0.05)
    async with session.post(fake.base_url + "/chat/completions", json=CHAT) as resp:
        await resp.read()
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="finished normally"):
        await fake.wait_disconnect(timeout=5)
    assert time.monotonic() - t0 < 0.5


async def test_stall_expiry_aborts_the_connection(
    fake: FakeOpenAI, session: aiohttp.ClientSession
) -> None:
    fake.push(Stall(seconds=0.1))
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await session.post(fake.base_url + "/chat/completions", json=CHAT)
    rec = fake.requests[0]
    assert rec.disconnected is None and rec.finished is None


# --- lifecycle ---------------------------------------------------------------------------


HELD: dict[str, Callable[[], Stream | Reply | Stall]] = {
    "stall": Stall,
    "stall_after": lambda: Stream([FIRST, DONE], stall_after=1),
    "reply_delay": lambda: Reply(body={}, delay=60),
}


@pytest.mark.parametrize("behaviour", HELD)
async def test_close_does_not_hang_with_a_held_handler(
    session: aiohttp.ClientSession, behaviour: str
) -> None:
    fake = FakeOpenAI()
    await fake.start()
    try:
        fake.push(HELD[behaviour]())

        async def call() -> bytes:
            url = fake.base_url + "/chat/completions"
            async with session.post(url, json=STREAM_CHAT) as resp:
                return await resp.read()

        task = asyncio.create_task(call())
        await fake.wait_request()
        await asyncio.sleep(0.05)  # let the handler reach its wait
        t0 = time.monotonic()
        async with asyncio.timeout(2):
            await fake.close()
        assert time.monotonic() - t0 < 1.0
        with pytest.raises(aiohttp.ClientError):
            await task
        assert fake.requests[0].disconnected is None  # the fake left, not the client
        async with asyncio.timeout(1):
            await fake.close()  # idempotent
    finally:
        await fake.close()


async def test_close_before_start_and_restart_refused() -> None:
    fake = FakeOpenAI()
    await fake.close()
    with pytest.raises(RuntimeError):
        await fake.start()
    with pytest.raises(RuntimeError):
        _ = fake.base_url


async def test_free_port_refuses_connections(session: aiohttp.ClientSession) -> None:
    with pytest.raises(aiohttp.ClientConnectorError):
        await session.get(f"http://127.0.0.1:{free_port()}/v1/models")


# --- helpers -----------------------------------------------------------------------------


def deltas(stream: Stream) -> list[dict[str, Any]]:
    assert stream.events[-1] == DONE
    out = []
    for event in stream.events[:-1]:
        assert event.startswith(b"data: ") and event.endswith(b"\n\n")
        out.append(json.loads(event[6:-2]))
    return out


def test_text_stream_words_reassemble() -> None:
    text = "  Two  spaces,\nnewline and ünïcode ✓ "
    objs = deltas(text_stream(text, reasoning="Let me think."))
    content = [o["choices"][0]["delta"].get("content") for o in objs[1:-2]]
    reasoning = [o["choices"][0]["delta"].get("reasoning_content") for o in objs[1:-2]]
    assert "".join(c for c in content if c) == text
    assert "".join(r for r in reasoning if r) == "Let me think."
    assert reasoning.index("Let ") < content.index("  Two  ")  # reasoning comes first
    assert objs[-2]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}
    assert objs[-1]["choices"] == [] and objs[-1]["usage"]["completion_tokens"] == 9
    assert "ü".encode() in b"".join(text_stream(text).events)  # UTF-8 on the wire, not \\u


def test_text_stream_options() -> None:
    objs = deltas(text_stream("a b c", words=False, usage=False, finish_reason="length"))
    assert [o["choices"][0]["delta"] for o in objs] == [
        {"role": "assistant", "content": ""},
        {"content": "a b c"},
        {},
    ]
    assert objs[-1]["choices"][0]["finish_reason"] == "length"
    assert len(deltas(text_stream(""))) == 3  # role, finish, usage


def test_tool_call_stream_shape() -> None:
    calls = [("call_1", "get_weather", '{"city":"Paris"}'), ("call_2", "now", "{}")]
    objs = deltas(tool_call_stream(calls))
    first = objs[0]["choices"][0]["delta"]
    assert first == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "index": 0,
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": ""},
            }
        ],
    }
    args: dict[int, str] = {}
    fragments: dict[int, int] = {}
    for o in objs[1:-2]:
        (call,) = o["choices"][0]["delta"]["tool_calls"]
        if "id" not in call:
            args[call["index"]] = args.get(call["index"], "") + call["function"]["arguments"]
            fragments[call["index"]] = fragments.get(call["index"], 0) + 1
    assert args == {0: '{"city":"Paris"}', 1: "{}"}
    assert fragments == {0: 3, 1: 2}
    assert objs[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert objs[-1]["choices"] == [] and "usage" in objs[-1]


def test_completion_and_chunk_shapes() -> None:
    c = completion("", tool_calls=[("call_1", "f", "{}")], finish_reason="tool_calls")
    assert c["choices"][0]["message"] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        ],
    }
    c = completion("hi", reasoning="hmm", usage={"prompt_tokens": 1})
    assert c["choices"][0]["message"]["reasoning_content"] == "hmm"
    assert c["usage"] == {"prompt_tokens": 1}
    assert chunk({"content": "x"}, model="m", id="i", usage={"total_tokens": 1}) == {
        "id": "i",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}],
        "usage": {"total_tokens": 1},
    }
    assert sse({"a": [1, 2]}) == b'data: {"a":[1,2]}\n\n'
    assert error_body("m") == {
        "error": {"message": "m", "type": "invalid_request_error", "param": None, "code": None}
    }
