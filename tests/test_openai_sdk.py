"""lean as the official `openai` SDK sees it: a real client nobody here wrote, against lean
on a real socket, against the fake upstream (docs/protocol.md §1, "OpenAI compatibility").
Each async test runs on asyncio and on uvloop (conftest.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionChunk

from tests.fakes import (
    DEFAULT_TEXT,
    PROMPT_TOKENS,
    FakeOpenAI,
    Reply,
    Stream,
    completion,
    text_stream,
    tool_call_stream,
)
from tests.support import SECRET, lean_config, running

pytestmark = pytest.mark.timeout(20)

MESSAGES: list[Any] = [{"role": "user", "content": "Hi"}]
DEFAULT_WORDS = len(DEFAULT_TEXT.split())  # the fake counts one completion token per word
CALLS = [("call_1", "get_weather", '{"city":"Paris"}'), ("call_2", "clock", "{}")]
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {"name": "clock", "parameters": {"type": "object", "properties": {}}},
    },
]


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as f:
        yield f


def sdk(url: str, api_key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=10)


@pytest.fixture
async def client(fake: FakeOpenAI) -> AsyncIterator[openai.AsyncOpenAI]:
    async with running(lean_config(fake.base_url)) as server, sdk(server.url) as c:
        yield c


async def collect(client: openai.AsyncOpenAI, **params: Any) -> list[ChatCompletionChunk]:
    params.setdefault("messages", MESSAGES)
    async with asyncio.timeout(10):
        stream = await client.chat.completions.create(model="default", stream=True, **params)
        async with stream:
            return [c async for c in stream]


def text_of(chunks: list[ChatCompletionChunk]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def finish_reasons(chunks: list[ChatCompletionChunk]) -> list[str]:
    return [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]


# --- streaming ----------------------------------------------------------------------------


async def test_stream_text(client: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    chunks = await collect(client)
    assert text_of(chunks) == DEFAULT_TEXT
    assert finish_reasons(chunks) == ["stop"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {c.id for c in chunks} == {chunks[0].id}  # one completion, one id
    assert {c.model for c in chunks} == {"default"}  # the alias, not the upstream's name
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    # lean asks the upstream for usage itself; a client that did not ask gets none.
    assert all(c.usage is None and c.choices for c in chunks)
    assert fake.requests[-1].body["model"] == "fake-model"


async def test_stream_include_usage_ends_with_a_usage_chunk(client: openai.AsyncOpenAI) -> None:
    chunks = await collect(client, stream_options={"include_usage": True})
    assert text_of(chunks) == DEFAULT_TEXT
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (
        PROMPT_TOKENS,
        DEFAULT_WORDS,
    )
    assert last.usage.total_tokens == PROMPT_TOKENS + DEFAULT_WORDS
    assert all(c.choices for c in chunks[:-1])  # exactly one chunk without choices


async def test_stream_tool_calls_assemble_by_index(
    client: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    fake.push(tool_call_stream(CALLS))
    chunks = await collect(client, tools=TOOLS)
    calls: dict[int, dict[str, str]] = {}
    for c in chunks:
        for call in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            entry = calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
            if call.id:
                assert not entry["id"], "id on more than the first delta of a call"
                entry["id"] = call.id
            if call.function and call.function.name:
                assert not entry["name"], "name on more than the first delta of a call"
                entry["name"] = call.function.name
            if call.function and call.function.arguments:
                entry["arguments"] += call.function.arguments
    assert [(calls[i]["id"], calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)] == (
        CALLS
    )
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}
    assert finish_reasons(chunks) == ["tool_calls"]
    assert text_of(chunks) == ""


async def test_tools_and_tool_choice_reach_the_upstream_unchanged(
    client: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    choice: Any = {"type": "function", "function": {"name": "get_weather"}}
    fake.push(tool_call_stream(CALLS[:1]))
    await collect(client, tools=TOOLS, tool_choice=choice)
    sent = fake.requests[-1]
    assert sent.body["tools"] == TOOLS
    assert sent.body["tool_choice"] == choice
    assert sent.body["messages"] == MESSAGES
    # lean's provider key goes upstream; the client's own key does not.
    assert sent.headers["Authorization"] == "Bearer " + SECRET
    assert "unused" not in sent.raw.decode() + json.dumps(sent.headers)


async def test_stream_reasoning_is_reasoning_content_never_content(
    client: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    fake.push(text_stream(DEFAULT_TEXT, reasoning="Let me think"))
    chunks = await collect(client)
    reasoning = ""
    for c in chunks:
        if c.choices:
            extra = c.choices[0].delta.model_extra or {}
            reasoning += extra.get("reasoning_content") or ""
    assert reasoning == "Let me think"
    assert text_of(chunks) == DEFAULT_TEXT
    assert "think" not in text_of(chunks)
    first_reasoning = next(
        i
        for i, c in enumerate(chunks)
        if (c.choices[0].delta.model_extra or {}).get("reasoning_content")
    )
    first_text = next(i for i, c in enumerate(chunks) if c.choices[0].delta.content)
    assert first_reasoning < first_text


async def test_upstream_failure_after_content_raises_api_error_in_band(
    client: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    events = text_stream(DEFAULT_TEXT).events
    fake.push(Stream(events, cut_after=3))  # role chunk, "Hello ", "from ", then the cut
    seen = ""
    async with asyncio.timeout(10):
        stream = await client.chat.completions.create(
            model="default", messages=MESSAGES, stream=True
        )
        async with stream:
            with pytest.raises(openai.APIError) as info:
                async for c in stream:
                    if c.choices:
                        seen += c.choices[0].delta.content or ""
    # In band: a plain APIError from a `data: {"error": ...}` line, not a transport error.
    assert type(info.value) is openai.APIError
    assert seen == "Hello from "
    body = info.value.body
    assert isinstance(body, dict)
    assert body["code"] == "upstream_error"
    assert body["type"] == "server_error"
    assert body["message"] == info.value.message
    assert SECRET not in info.value.message


# --- non-streaming ------------------------------------------------------------------------


async def test_non_stream_text_and_usage(client: openai.AsyncOpenAI) -> None:
    async with asyncio.timeout(10):
        answer = await client.chat.completions.create(model="default", messages=MESSAGES)
    assert answer.object == "chat.completion"
    assert answer.model == "default"
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == DEFAULT_TEXT
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (
        PROMPT_TOKENS,
        DEFAULT_WORDS,
    )


@pytest.mark.parametrize("upstream_stream", [True, False], ids=["stream-upstream", "plain"])
async def test_non_stream_tool_calls(fake: FakeOpenAI, upstream_stream: bool) -> None:
    # With `stream = true` lean asks for a stream and the fake answers JSON anyway (a
    # server that ignores "stream"); with `stream = false` lean asks for JSON.
    fake.push(Reply(body=completion("", tool_calls=CALLS, finish_reason="tool_calls")))
    config = lean_config(fake.base_url, stream=upstream_stream)
    async with running(config) as server, sdk(server.url) as client, asyncio.timeout(10):
        answer = await client.chat.completions.create(
            model="default", messages=MESSAGES, tools=TOOLS, tool_choice="auto"
        )
    assert fake.requests[-1].body["stream"] is upstream_stream
    assert fake.requests[-1].body["tool_choice"] == "auto"
    message = answer.choices[0].message
    assert message.content is None
    assert message.tool_calls is not None
    assert [
        (c.id, c.type, c.function.name, c.function.arguments)  # type: ignore[union-attr]
        for c in message.tool_calls
    ] == [(i, "function", n, a) for i, n, a in CALLS]
    assert answer.choices[0].finish_reason == "tool_calls"


# --- models and errors --------------------------------------------------------------------


async def test_models_list(client: openai.AsyncOpenAI) -> None:
    async with asyncio.timeout(10):
        page = await client.models.list()
    assert [m.id for m in page.data] == ["default"]
    assert all(m.object == "model" for m in page.data)


@pytest.mark.parametrize("stream", [False, True])
async def test_unknown_model_is_not_found(
    client: openai.AsyncOpenAI, fake: FakeOpenAI, stream: bool
) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        async with asyncio.timeout(10):
            await client.chat.completions.create(model="nope", messages=MESSAGES, stream=stream)
    assert info.value.status_code == 404
    assert info.value.body == {
        "message": "model 'nope' does not exist; GET /v1/models lists the aliases",
        "type": "invalid_request_error",
        "code": "not_found",
    }
    assert fake.requests == []


async def test_sdk_api_key_is_checked_as_a_client_token(fake: FakeOpenAI) -> None:
    config = lean_config(fake.base_url, environ={"LEAN_TOKENS": "tok-a,tok-b"})
    async with running(config) as server:
        async with sdk(server.url, api_key="tok-b") as client, asyncio.timeout(10):
            assert text_of(await collect(client)) == DEFAULT_TEXT
        async with sdk(server.url, api_key="wrong") as client, asyncio.timeout(10):
            with pytest.raises(openai.AuthenticationError) as info:
                await client.models.list()
    assert isinstance(info.value.body, dict)
    assert info.value.body["code"] == "unauthorized"
    assert len(fake.requests) == 1
