"""When a chat completion stream commits (its `200` and headers go out), and what a
failure before that looks like to the official `openai` SDK (docs/protocol.md §1, §5).

The stream commits at its first piece, at its first heartbeat, or `[server] commit_wait`
seconds in. Until then every retry and fallback of the relay may still fail, and the
last failure is an HTTP status with OpenAI's body: the SDK raises its typed error
(`RateLimitError`, `InternalServerError`) and its own retry runs. After the commit a
failure stays in band. Each async test runs on asyncio and on uvloop (conftest.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest

from tests.fakes import DEFAULT_TEXT, FakeOpenAI, Reply, Stall, completion, error_body, text_stream
from tests.support import chat_body, chunks_of, lean_config, read_sse_data, running

pytestmark = pytest.mark.timeout(20)

MESSAGES: list[Any] = [{"role": "user", "content": "Hi"}]


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as f:
        yield f


def sdk(url: str, *, max_retries: int) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=url + "/v1", api_key="unused", max_retries=max_retries, timeout=10
    )


async def collect(client: openai.AsyncOpenAI) -> str:
    async with asyncio.timeout(10):
        stream = await client.chat.completions.create(
            model="default", messages=MESSAGES, stream=True
        )
        async with stream:
            chunks = [c async for c in stream]
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def text_in(data: list[str]) -> str:
    return "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunks_of(data) if c["choices"]
    )


async def test_every_attempt_rate_limited_is_a_429_the_sdk_retries(fake: FakeOpenAI) -> None:
    """Both of lean's attempts (the stream, then the whole answer) get 429 + Retry-After:
    the SDK sees a 429 with that Retry-After, raises `RateLimitError`, and its own retry
    reaches lean (and the upstream) again."""
    limited = Reply(
        status=429,
        body=error_body("slow down", type="rate_limit_error"),
        headers={"Retry-After": "1"},
    )
    fake.default = lambda body: limited
    async with running(lean_config(fake.base_url)) as lean, sdk(lean.url, max_retries=1) as c:
        with pytest.raises(openai.RateLimitError) as info:
            await collect(c)
    assert info.value.status_code == 429
    assert info.value.code == "rate_limited"
    assert info.value.response.headers["Retry-After"] == "1"
    # Two lean requests (the SDK's first and its retry), two upstream calls each.
    assert [r.body["stream"] for r in fake.requests] == [True, False, True, False]


@pytest.mark.parametrize(
    ("answer", "status", "code"),
    [
        (Reply(status=500, body=error_body("boom", type="server_error")), 502, "upstream_error"),
        (Reply(status=529, body=error_body("busy", type="overloaded_error")), 503, "overloaded"),
        (Stall(seconds=3), 504, "upstream_timeout"),
    ],
    ids=["500", "overloaded", "silent"],
)
async def test_every_attempt_failing_is_a_5xx_status(
    fake: FakeOpenAI, answer: Reply | Stall, status: int, code: str
) -> None:
    fake.default = lambda body: answer
    config = lean_config(fake.base_url, provider="first_byte_timeout = 0.3")
    async with running(config) as lean, sdk(lean.url, max_retries=0) as c:
        with pytest.raises(openai.InternalServerError) as info:
            await collect(c)
    assert (info.value.status_code, info.value.code) == (status, code)
    assert len(fake.requests) == 2  # the stream, then the whole answer: both failed


async def test_a_silence_past_commit_wait_commits_and_the_failure_stays_in_band(
    fake: FakeOpenAI,
) -> None:
    """The upstream says nothing for longer than commit_wait: the headers and a heartbeat
    go out then (long before ping_interval), and the timeout that follows is in band."""
    fake.default = lambda body: Stall(seconds=3)
    config = lean_config(
        fake.base_url,
        server="commit_wait = 0.1\nping_interval = 30",
        provider="first_byte_timeout = 0.4",
    )
    async with running(config) as lean, aiohttp.ClientSession() as http:
        url = f"{lean.url}/v1/chat/completions"
        async with http.post(url, json=chat_body()) as resp:
            assert resp.status == 200
            raw = (await resp.read()).decode()
    assert raw.startswith(": ping\n\n")
    data = [line.removeprefix("data: ") for line in raw.split("\n\n") if line.startswith("data:")]
    assert [json.loads(d)["error"]["code"] for d in data] == ["upstream_timeout"]
    assert "[DONE]" not in raw


async def test_a_stream_commits_once_the_upstream_answered(fake: FakeOpenAI) -> None:
    """The headers go out after the upstream's first event, and the answer streams whole."""
    answer = text_stream(DEFAULT_TEXT)
    answer.first_byte_delay = 0.2
    fake.push(answer)
    async with running(lean_config(fake.base_url)) as lean, aiohttp.ClientSession() as http:
        url = f"{lean.url}/v1/chat/completions"
        async with http.post(url, json=chat_body()) as resp:
            assert fake.requests[0].events_sent >= 1  # not before the upstream answered
            assert resp.status == 200
            data = await read_sse_data(resp)
        async with sdk(lean.url, max_retries=0) as c:
            assert await collect(c) == DEFAULT_TEXT
    assert text_in(data) == DEFAULT_TEXT
    # Streamed as it came, a chunk per upstream delta: the pieces held until the commit
    # are not joined.
    deltas = [
        c for c in chunks_of(data) if c["choices"] and c["choices"][0]["delta"].get("content")
    ]
    assert len(deltas) == len(DEFAULT_TEXT.split())
    assert data[-1] == "[DONE]"


@pytest.mark.parametrize("path", ["retry", "whole"])
async def test_an_answer_after_a_failed_first_attempt_streams_whole(
    fake: FakeOpenAI, path: str
) -> None:
    """The first attempt fails (500); the retry's stream (`retries = 1`) or the whole
    answer of the non-streaming path answers. The client gets one 200 stream, committed
    only once that answer arrived, with all of it."""
    broken = Reply(status=500, body=error_body("boom", type="server_error"))
    if path == "retry":
        answer = text_stream(DEFAULT_TEXT)
        answer.first_byte_delay = 0.1
        fake.push(broken, answer)
    else:
        fake.push(broken, Reply(body=completion(DEFAULT_TEXT), delay=0.1))
    config = lean_config(fake.base_url, model="retries = 1" if path == "retry" else "")
    async with running(config) as lean, aiohttp.ClientSession() as http:
        url = f"{lean.url}/v1/chat/completions"
        async with http.post(url, json=chat_body()) as resp:
            assert len(fake.requests) == 2
            second = fake.requests[1]
            assert second.events_sent >= 1 or second.finished is not None
            assert resp.status == 200
            data = await read_sse_data(resp)
    assert text_in(data) == DEFAULT_TEXT
    assert data[-1] == "[DONE]"
    assert [r.body["stream"] for r in fake.requests] == [True, path == "retry"]
