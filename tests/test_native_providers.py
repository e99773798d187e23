"""`kind = anthropic` and `kind = gemini` end to end: an OpenAI client, lean, and a real
fake of each provider's own API on 127.0.0.1. The client sees OpenAI's format whatever
the provider; the provider receives its native format and its own key header."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest

from lean.app import Server
from tests.fakes import FakeOpenAI, Reply, Stream, completion, text_stream
from tests.fakes_providers import (
    GEMINI_SIGNATURE,
    THINKING_SIGNATURE,
    FakeAnthropic,
    FakeGemini,
    anthropic_error_event,
    anthropic_message,
    anthropic_text_stream,
    anthropic_tool_stream,
    gemini_chunk,
    gemini_event,
    gemini_response,
    gemini_text_stream,
    gemini_tool_stream,
)
from tests.support import (
    SECRET,
    chat_body,
    chunks_of,
    content_of,
    lean_config,
    read_sse_data,
    running,
)

TEXT = "The quick brown fox jumps over the lazy dog."
THOUGHTS = "Foxes are quick; dogs, here, are lazy."
URL = "/v1/chat/completions"
KINDS = ["anthropic", "gemini"]

Fake = FakeAnthropic | FakeGemini


@asynccontextmanager
async def gateway(kind: str, **config: Any) -> AsyncIterator[tuple[Fake, Server]]:
    fake: Fake = FakeAnthropic() if kind == "anthropic" else FakeGemini()
    async with fake:
        provider = f"kind = {kind}\nbase_url = {fake.base_url}"
        async with running(lean_config(provider=provider, **config)) as lean:
            yield fake, lean


async def chat(lean: Server, body: dict[str, Any]) -> list[str]:
    async with aiohttp.ClientSession() as http, http.post(lean.url + URL, json=body) as resp:
        assert resp.status == 200
        return await read_sse_data(resp)


async def chat_whole(lean: Server, body: dict[str, Any]) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.post(lean.url + URL, json=body) as resp:
        assert resp.status == 200
        answer: dict[str, Any] = await resp.json()
        return answer


def text_answer(kind: str, text: str = TEXT, **more: Any) -> Stream:
    return (
        anthropic_text_stream(text, **more)
        if kind == "anthropic"
        else gemini_text_stream(text, **more)
    )


def whole_answer(kind: str, text: str = TEXT) -> Reply:
    return Reply(body=anthropic_message(text) if kind == "anthropic" else gemini_response(text))


def finishes(data: list[str]) -> list[str]:
    return [
        c["choices"][0]["finish_reason"]
        for c in chunks_of(data)
        if c.get("choices") and c["choices"][0]["finish_reason"]
    ]


def reasoning_of(data: list[str]) -> str:
    return "".join(
        c["choices"][0]["delta"].get("reasoning_content") or ""
        for c in chunks_of(data)
        if c.get("choices")
    )


def assembled_calls(data: list[str]) -> list[tuple[str, str, str]]:
    calls: dict[int, dict[str, str]] = {}
    for c in chunks_of(data):
        for call in (c.get("choices") or [{}])[0].get("delta", {}).get("tool_calls") or ():
            entry = calls.setdefault(call["index"], {"id": "", "name": "", "arguments": ""})
            if "id" in call:
                assert not entry["id"] and not entry["arguments"], "id and name come first, once"
                entry["id"], entry["name"] = call["id"], call["function"]["name"]
            entry["arguments"] += call["function"].get("arguments", "")
    return [(e["id"], e["name"], e["arguments"]) for _, e in sorted(calls.items())]


# --- streaming ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_text_streams_in_openai_chunks(kind: str) -> None:
    async with gateway(kind) as (fake, lean):
        fake.push(text_answer(kind))
        data = await chat(lean, chat_body())
    assert content_of(data) == TEXT
    assert data[-1] == "[DONE]"
    assert finishes(data) == ["stop"]
    chunks = chunks_of(data)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["model"] == "default" for c in chunks)
    assert len(fake.requests) == 1


async def test_anthropic_receives_its_native_request_and_key_header() -> None:
    body = chat_body(
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    )
    async with gateway("anthropic") as (fake, lean):
        await chat(lean, body)
    sent = fake.requests[0]
    assert sent.path == "/v1/messages"
    assert sent.headers["x-api-key"] == SECRET
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert "Authorization" not in sent.headers
    assert sent.body == {
        "model": "fake-model",
        "max_tokens": 4096,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        "system": "Be brief.",
        "stream": True,
    }
    assert all(SECRET not in url for url in fake.urls)


async def test_gemini_receives_its_native_request_and_key_header() -> None:
    body = chat_body(
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        max_tokens=50,
    )
    async with gateway("gemini") as (fake, lean):
        await chat(lean, body)
    sent = fake.requests[0]
    assert fake.urls == ["/v1beta/models/fake-model:streamGenerateContent?alt=sse"]
    assert sent.headers["x-goog-api-key"] == SECRET
    assert "Authorization" not in sent.headers
    assert sent.body == {
        "contents": [{"role": "user", "parts": [{"text": "Hi"}]}],
        "systemInstruction": {"parts": [{"text": "Be brief."}]},
        "generationConfig": {"maxOutputTokens": 50},
    }
    assert all(SECRET not in url and "key=" not in url for url in fake.urls)


@pytest.mark.parametrize("kind", KINDS)
async def test_reasoning_streams_as_reasoning_content_and_signatures_never_leave(kind: str) -> None:
    async with gateway(kind) as (fake, lean):
        if kind == "anthropic":
            fake.push(anthropic_text_stream(TEXT, reasoning=THOUGHTS))
        else:
            fake.push(gemini_text_stream(TEXT, reasoning=THOUGHTS, signature=GEMINI_SIGNATURE))
        async with (
            aiohttp.ClientSession() as http,
            http.post(lean.url + URL, json=chat_body()) as resp,
        ):
            raw = await resp.read()
    data = [line[6:] for line in raw.decode().split("\n") if line.startswith("data: ")]
    assert reasoning_of(data) == THOUGHTS
    assert content_of(data) == TEXT
    assert THINKING_SIGNATURE.encode() not in raw and GEMINI_SIGNATURE.encode() not in raw


async def test_anthropic_tool_call_deltas_by_index_with_id_and_name_first() -> None:
    calls = [("toolu_1", "get_weather", '{"city": "Paris"}'), ("toolu_2", "clock", "{}")]
    async with gateway("anthropic") as (fake, lean):
        fake.push(anthropic_tool_stream(calls, text="Let me check."))
        data = await chat(lean, chat_body())
    assert content_of(data) == "Let me check."
    assert assembled_calls(data) == calls
    assert finishes(data) == ["tool_calls"]


async def test_gemini_tool_calls_arrive_whole_with_generated_ids() -> None:
    async with gateway("gemini") as (fake, lean):
        fake.push(gemini_tool_stream([("get_weather", {"city": "Paris"}), ("clock", {})]))
        data = await chat(lean, chat_body())
    calls = assembled_calls(data)
    assert [(name, args) for _, name, args in calls] == [
        ("get_weather", '{"city":"Paris"}'),
        ("clock", "{}"),
    ]
    ids = [call_id for call_id, _, _ in calls]
    assert all(i.startswith("call_") for i in ids) and len(set(ids)) == 2
    assert finishes(data) == ["tool_calls"]


@pytest.mark.parametrize("kind", KINDS)
async def test_include_usage_gives_the_providers_counts(kind: str) -> None:
    async with gateway(kind) as (fake, lean):
        fake.push(text_answer(kind, reasoning=THOUGHTS) if kind == "gemini" else text_answer(kind))
        data = await chat(lean, chat_body(stream_options={"include_usage": True}))
    usage = chunks_of(data)[-1]
    assert usage["choices"] == []
    words = len(TEXT.split())
    thoughts = len(THOUGHTS.split()) if kind == "gemini" else 0
    assert usage["usage"] == {
        "prompt_tokens": 8,
        "completion_tokens": words + thoughts,
        "total_tokens": 8 + words + thoughts,
    }


@pytest.mark.parametrize(
    ("kind", "native", "finish"),
    [
        ("anthropic", "max_tokens", "length"),
        ("anthropic", "refusal", "content_filter"),
        ("anthropic", "stop_sequence", "stop"),
        ("gemini", "MAX_TOKENS", "length"),
        ("gemini", "SAFETY", "content_filter"),
        ("gemini", "OTHER", "stop"),
    ],
)
async def test_finish_reasons_are_mapped(kind: str, native: str, finish: str) -> None:
    async with gateway(kind) as (fake, lean):
        if kind == "anthropic":
            fake.push(anthropic_text_stream(TEXT, stop_reason=native))
        else:
            fake.push(gemini_text_stream(TEXT, finish_reason=native))
        data = await chat(lean, chat_body())
    assert finishes(data) == [finish]
    assert data[-1] == "[DONE]"


# --- non-streaming ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("provider_streams", [True, False])
async def test_non_stream_answer(kind: str, provider_streams: bool) -> None:
    async with gateway(kind, stream=provider_streams) as (fake, lean):
        fake.push(text_answer(kind) if provider_streams else whole_answer(kind))
        answer = await chat_whole(lean, chat_body(stream=False))
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": TEXT}
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert answer["usage"]["prompt_tokens"] == 8
    if provider_streams:
        return
    # `stream = false`: the provider's own non-streaming method
    if kind == "anthropic":
        assert fake.urls == ["/v1/messages"] and "stream" not in fake.requests[0].body
    else:
        assert fake.urls == ["/v1beta/models/fake-model:generateContent"]


@pytest.mark.parametrize("kind", KINDS)
async def test_non_stream_tool_calls(kind: str) -> None:
    async with gateway(kind, stream=False) as (fake, lean):
        if kind == "anthropic":
            body = anthropic_message("", tool_calls=[("toolu_1", "clock", {"tz": "UTC"})])
        else:
            body = gemini_response("", tool_calls=[("clock", {"tz": "UTC"})])
        fake.push(Reply(body=body))
        answer = await chat_whole(lean, chat_body(stream=False))
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    [call] = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "clock", "arguments": '{"tz":"UTC"}'}
    assert call["id"] == "toolu_1" if kind == "anthropic" else call["id"].startswith("call_")


# --- failures -----------------------------------------------------------------------------------


def truncated_before_content(kind: str) -> Stream:
    """A clean end of the bytes before any content and without the end marker/finishReason."""
    if kind == "anthropic":
        return Stream(text_answer(kind).events[:2])  # message_start, ping
    return Stream([gemini_event(gemini_chunk([{"text": ""}]))])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("how", ["clean_end", "cut"])
async def test_truncated_before_content_falls_back_to_the_whole_answer(kind: str, how: str) -> None:
    async with gateway(kind) as (fake, lean):
        stream = truncated_before_content(kind)
        if how == "cut":
            stream = text_answer(kind)
            stream.cut_after = 1 if kind == "anthropic" else 0  # before the first text
        fake.push(stream, whole_answer(kind))
        data = await chat(lean, chat_body())
    assert content_of(data) == TEXT
    assert finishes(data) == ["stop"]
    assert data[-1] == "[DONE]"
    if kind == "anthropic":
        assert [r.body.get("stream") for r in fake.requests] == [True, None]
    else:
        assert [u.rsplit(":", 1)[1] for u in fake.urls] == [
            "streamGenerateContent?alt=sse",
            "generateContent",
        ]


async def test_anthropic_overloaded_event_before_content_falls_back() -> None:
    async with gateway("anthropic") as (fake, lean):
        events = anthropic_text_stream(TEXT).events
        fake.push(
            Stream([events[0], anthropic_error_event("overloaded_error")]),
            whole_answer("anthropic"),
        )
        data = await chat(lean, chat_body())
    assert content_of(data) == TEXT
    assert data[-1] == "[DONE]"
    assert len(fake.requests) == 2


async def test_anthropic_overloaded_event_after_content_is_an_inband_error() -> None:
    async with gateway("anthropic") as (fake, lean):
        events = anthropic_text_stream(TEXT).events
        # message_start, ping, content_block_start, two text deltas, then the error
        fake.push(Stream([*events[:5], anthropic_error_event("overloaded_error", "Overloaded")]))
        data = await chat(lean, chat_body())
    assert content_of(data) == "The quick "
    assert "[DONE]" not in data
    errors = [json.loads(d)["error"] for d in data if d.startswith('{"error"')]
    assert errors[-1]["code"] == "overloaded"
    assert finishes(data) == []
    assert len(fake.requests) == 1  # no fallback after the commit point


async def test_gemini_rate_limit_after_content_is_an_inband_error() -> None:
    error = {
        "error": {"code": 429, "message": "Resource exhausted", "status": "RESOURCE_EXHAUSTED"}
    }
    async with gateway("gemini") as (fake, lean):
        fake.push(Stream([gemini_event(gemini_chunk([{"text": "Partial "}])), gemini_event(error)]))
        data = await chat(lean, chat_body())
    assert content_of(data) == "Partial "
    assert [json.loads(d)["error"]["code"] for d in data if d.startswith('{"error"')] == [
        "rate_limited"
    ]


@pytest.mark.parametrize("kind", KINDS)
async def test_http_error_keeps_its_meaning(kind: str) -> None:
    if kind == "anthropic":
        body = {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}
    else:
        body = {"error": {"code": 429, "message": "slow down", "status": "RESOURCE_EXHAUSTED"}}
    async with gateway(kind) as (fake, lean):
        fake.push(Reply(status=429, body=body), Reply(status=429, body=body))  # and the fallback
        async with aiohttp.ClientSession() as http:
            async with http.post(lean.url + URL, json=chat_body(stream=False)) as resp:
                assert resp.status == 429
                error = (await resp.json())["error"]
    assert error["code"] == "rate_limited" and "slow down" in error["message"]


# --- one conversation with tools, through each provider ----------------------------------------

CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "You can call tools."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_w1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_w1", "content": '{"temp": 21}'},
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
NATIVE: dict[str, dict[str, Any]] = {
    "openai": {"messages": CONVERSATION, "tools": TOOLS, "tool_choice": "auto"},
    "anthropic": {
        "system": "You can call tools.",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
            {
                "role": "assistant",
                "content": [
                    {
                        "type": "tool_use",
                        "id": "call_w1",
                        "name": "get_weather",
                        "input": {"city": "Paris"},
                    }
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "call_w1", "content": '{"temp": 21}'}
                ],
            },
        ],
        "tools": [
            {
                "name": "get_weather",
                "description": "Weather for a city",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
            }
        ],
        "tool_choice": {"type": "auto"},
    },
    "gemini": {
        "systemInstruction": {"parts": [{"text": "You can call tools."}]},
        "contents": [
            {"role": "user", "parts": [{"text": "Weather in Paris?"}]},
            {
                "role": "model",
                "parts": [
                    {
                        "functionCall": {"name": "get_weather", "args": {"city": "Paris"}},
                        "thoughtSignature": "skip_thought_signature_validator",
                    }
                ],
            },
            {
                "role": "user",
                "parts": [
                    {
                        "functionResponse": {
                            "name": "get_weather",
                            "response": {"result": {"temp": 21}},
                        }
                    }
                ],
            },
        ],
        "tools": [
            {
                "functionDeclarations": [
                    {
                        "name": "get_weather",
                        "description": "Weather for a city",
                        "parameters": {
                            "type": "object",
                            "properties": {"city": {"type": "string"}},
                        },
                    }
                ]
            }
        ],
        "toolConfig": {"functionCallingConfig": {"mode": "AUTO"}},
    },
}


@asynccontextmanager
async def any_gateway(kind: str) -> AsyncIterator[tuple[FakeOpenAI, Server]]:
    if kind != "openai":
        async with gateway(kind) as (fake, lean):
            yield fake, lean
        return
    async with FakeOpenAI() as openai_fake, running(lean_config(openai_fake.base_url)) as lean:
        yield openai_fake, lean


@pytest.mark.parametrize("kind", ["openai", *KINDS])
async def test_one_tool_conversation_reaches_each_provider_in_its_own_format(kind: str) -> None:
    answers = {
        "openai": text_stream("It is 21 degrees."),
        "anthropic": anthropic_text_stream("It is 21 degrees."),
        "gemini": gemini_text_stream("It is 21 degrees."),
    }
    async with any_gateway(kind) as (fake, lean):
        fake.push(answers[kind])
        body = chat_body(messages=CONVERSATION, tools=TOOLS, tool_choice="auto")
        data = await chat(lean, body)
    assert content_of(data) == "It is 21 degrees."
    sent = fake.requests[0].body
    assert {key: sent[key] for key in NATIVE[kind]} == NATIVE[kind]


async def test_openai_kind_is_unchanged_by_the_native_adapters() -> None:
    async with any_gateway("openai") as (fake, lean):
        fake.push(Reply(body=completion(TEXT)))
        answer = await chat_whole(lean, chat_body(stream=False))
    assert answer["choices"][0]["message"]["content"] == TEXT


# --- the same scene conversation with a tool, through each provider ---------------------------

TOOL_SCENE = """
[tool.add]
kind = python
function = tests.toolbox:add
description = Add two numbers
parameters = {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}

[scene.calc]
model = default
template = {message}
tools = add
"""


def _round_one(kind: str) -> Stream:
    if kind == "anthropic":
        return anthropic_tool_stream([("toolu_1", "add", '{"a": 2, "b": 3}')])
    if kind == "gemini":
        return gemini_tool_stream([("add", {"a": 2, "b": 3})])
    from tests.fakes import tool_call_stream

    return tool_call_stream([("call_1", "add", '{"a": 2, "b": 3}')])


def _round_two(kind: str) -> Stream:
    answer = "The sum is 5."
    if kind == "anthropic":
        return anthropic_text_stream(answer)
    if kind == "gemini":
        return gemini_text_stream(answer)
    return text_stream(answer)


def _tool_result_sent(kind: str, body: dict[str, Any]) -> Any:
    """Where each provider's second request carries the tool's result."""
    if kind == "anthropic":
        block = body["messages"][-1]["content"][0]
        assert block["type"] == "tool_result" and block["tool_use_id"] == "toolu_1"
        return block["content"]
    if kind == "gemini":
        part = body["contents"][-1]["parts"][0]["functionResponse"]
        assert part["name"] == "add"
        return part["response"]["result"]
    message = body["messages"][-1]
    assert message["role"] == "tool" and message["tool_call_id"] == "call_1"
    return message["content"]


@pytest.mark.parametrize("kind", ["openai", "anthropic", "gemini"])
async def test_a_scene_with_a_tool_gives_the_same_events_through_each_provider(kind: str) -> None:
    fake: Fake | FakeOpenAI = (
        FakeAnthropic()
        if kind == "anthropic"
        else FakeGemini()
        if kind == "gemini"
        else FakeOpenAI()
    )
    async with fake:
        provider = f"kind = {kind}\nbase_url = {fake.base_url}"
        async with running(lean_config(provider=provider, extra=TOOL_SCENE)) as lean:
            fake.push(_round_one(kind), _round_two(kind))
            async with aiohttp.ClientSession() as http:
                async with http.post(
                    f"{lean.url}/v1/scenes/calc/stream", json={"message": "2 + 3?"}
                ) as resp:
                    raw = await resp.text()
    events = [json.loads(line[6:]) for line in raw.split("\n") if line.startswith("data: ")]
    types = [e["type"] for e in events]
    assert types[:3] == ["start", "tool_start", "tool_end"]
    assert types[-1] == "done" and set(types[3:-1]) == {"delta"}
    tool_start, tool_end, done = events[1], events[2], events[-1]
    assert tool_start["name"] == "add" and json.loads(tool_start["arguments"]) == {"a": 2, "b": 3}
    assert tool_end["toolCallId"] == tool_start["toolCallId"]
    assert json.loads(tool_end["result"]) == {"sum": 5} and tool_end["isError"] is False
    assert done["text"] == "The sum is 5." and done["finishReason"] == "stop"
    first, second = fake.requests[0].body, fake.requests[1].body
    sent = _tool_result_sent(kind, second)
    assert (json.loads(sent) if isinstance(sent, str) else sent) == {"sum": 5}
    declared = {
        "anthropic": lambda: first["tools"][0]["name"],
        "gemini": lambda: first["tools"][0]["functionDeclarations"][0]["name"],
        "openai": lambda: first["tools"][0]["function"]["name"],
    }[kind]()
    assert declared == "add"
