"""/v1/chat/completions end to end: lean between a real client and a real fake upstream."""

from __future__ import annotations

import io
import json

import aiohttp
import pytest

from tests.fakes import FakeOpenAI, Stream, text_stream, tool_call_stream
from tests.support import (
    chat_body,
    chunks_of,
    content_of,
    lean_config,
    read_sse_data,
    running,
)

TEXT = "The quick brown fox jumps over the lazy dog."


async def test_stream_relays_every_word_then_done() -> None:
    async with FakeOpenAI() as fake, running(lean_config(fake.base_url)) as lean:
        fake.push(text_stream(TEXT))
        async with aiohttp.ClientSession() as http:
            async with http.post(lean.url + "/v1/chat/completions", json=chat_body()) as resp:
                assert resp.status == 200
                data = await read_sse_data(resp)
    assert content_of(data) == TEXT
    assert data[-1] == "[DONE]"
    chunks = chunks_of(data)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["finish_reason"] for c in chunks].count("stop") == 1
    assert all(c["model"] == "default" for c in chunks)  # the alias, not the upstream's name
    assert len({c["id"] for c in chunks}) == 1


@pytest.mark.parametrize("split", [1, 5])
async def test_events_split_at_any_byte_reassemble(split: int) -> None:
    async with FakeOpenAI() as fake, running(lean_config(fake.base_url)) as lean:
        stream = text_stream(TEXT, reasoning="Thinking it over")
        stream.split = split
        fake.push(stream)
        async with aiohttp.ClientSession() as http:
            async with http.post(lean.url + "/v1/chat/completions", json=chat_body()) as resp:
                data = await read_sse_data(resp)
    assert content_of(data) == TEXT
    thinking = "".join(
        c["choices"][0]["delta"].get("reasoning_content") or "" for c in chunks_of(data)
    )
    assert thinking == "Thinking it over"


async def test_upstream_receives_the_mapped_request_with_the_key() -> None:
    async with FakeOpenAI() as fake, running(lean_config(fake.base_url)) as lean:
        body = chat_body(
            seed=42, top_p=0.5, tools=[{"type": "function", "function": {"name": "f"}}]
        )
        body["tool_choice"] = "auto"
        async with aiohttp.ClientSession() as http:
            async with http.post(lean.url + "/v1/chat/completions", json=body) as resp:
                await resp.read()
    sent = fake.requests[0]
    assert sent.body["model"] == "fake-model"
    assert sent.body["stream"] is True
    assert sent.body["stream_options"] == {"include_usage": True}
    assert sent.body["seed"] == 42 and sent.body["top_p"] == 0.5
    assert sent.body["tools"] == body["tools"] and sent.body["tool_choice"] == "auto"
    assert sent.headers["Authorization"].startswith("Bearer sk-test-")


async def test_include_usage_gives_a_final_usage_chunk() -> None:
    async with FakeOpenAI() as fake, running(lean_config(fake.base_url)) as lean:
        fake.push(text_stream(TEXT))
        body = chat_body(stream_options={"include_usage": True})
        async with aiohttp.ClientSession() as http:
            async with http.post(lean.url + "/v1/chat/completions", json=body) as resp:
                data = await read_sse_data(resp)
    usage_chunk = chunks_of(data)[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] > 0
    assert usage_chunk["usage"]["total_tokens"] == (
        usage_chunk["usage"]["prompt_tokens"] + usage_chunk["usage"]["completion_tokens"]
    )


async def test_without_include_usage_no_usage_chunk() -> None:
    async with FakeOpenAI() as fake, running(lean_config(fake.base_url)) as lean:
        async with aiohttp.ClientSession() as http:
            async with http.post(lean.url + "/v1/chat/completions", json=chat_body()) as resp:
                data = await read_sse_data(resp)
    assert all(c["choices"] for c in chunks_of(data))


async def test_tool_call_deltas_in_openai_form() -> None:
    calls = [("call_1", "get_weather", '{"city": "Paris"}'), ("call_2", "clock", "{}")]
    async with FakeOpenAI() as fake, running(lean_config(fake.base_url)) as lean:
        fake.push(tool_call_stream(calls))
        async with aiohttp.ClientSession() as http:
            async with http.post(lean.url + "/v1/chat/completions", json=chat_body()) as resp:
                data = await read_sse_data(resp)
    assembled: dict[int, dict[str, str]] = {}
    for c in chunks_of(data):
        for call in c["choices"][0]["delta"].get("tool_calls") or ():
            entry = assembled.setdefault(call["index"], {"id": "", "name": "", "arguments": ""})
            if "id" in call:
                assert not entry["id"], "id only on a call's first delta"
                entry["id"] = call["id"]
                entry["name"] = call["function"]["name"]
            entry["arguments"] += call["function"].get("arguments", "")
    assert [(e["id"], e["name"], e["arguments"]) for _, e in sorted(assembled.items())] == calls
    assert chunks_of(data)[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_non_stream_answer() -> None:
    async with FakeOpenAI() as fake, running(lean_config(fake.base_url)) as lean:
        fake.push(text_stream(TEXT))
        async with (
            aiohttp.ClientSession() as http,
            http.post(lean.url + "/v1/chat/completions", json=chat_body(stream=False)) as resp,
        ):
            assert resp.status == 200
            body = await resp.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": TEXT}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] > 0


async def test_models_lists_the_aliases() -> None:
    config = lean_config(extra="[model.other]\nprovider = up\nupstream_model = x\n")
    async with running(config) as lean, aiohttp.ClientSession() as http:
        async with http.get(lean.url + "/v1/models") as resp:
            body = await resp.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["default", "other"]


BAD = [
    (b"{oops", 400, "not valid JSON"),
    (json.dumps({"model": "default"}).encode(), 400, "messages"),
    (json.dumps({"model": "default", "messages": "hi"}).encode(), 400, "$.messages"),
    (json.dumps({"model": "default", "messages": [{"role": 1}]}).encode(), 400, "role"),
    (json.dumps(chat_body() | {"model": "nope"}).encode(), 404, "nope"),
    (json.dumps(chat_body("x" * 2_000_000)).encode(), 413, "limit"),
]


@pytest.mark.parametrize(("raw", "status", "named"), BAD)
async def test_bad_input_is_refused_before_the_upstream(
    raw: bytes, status: int, named: str
) -> None:
    async with FakeOpenAI() as fake, running(lean_config(fake.base_url)) as lean:
        async with aiohttp.ClientSession() as http:
            async with http.post(
                lean.url + "/v1/chat/completions",
                data=io.BytesIO(raw),
                headers={"Content-Type": "application/json"},
            ) as resp:
                assert resp.status == status
                body = await resp.json()
    assert set(body["error"]) == {"message", "type", "code"}
    assert named in body["error"]["message"]
    assert fake.requests == []


async def test_empty_answer_still_finishes() -> None:
    async with FakeOpenAI() as fake, running(lean_config(fake.base_url)) as lean:
        fake.push(
            Stream(
                events=[
                    b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n',
                    b"data: [DONE]\n\n",
                ]
            )
        )
        async with aiohttp.ClientSession() as http:
            async with http.post(lean.url + "/v1/chat/completions", json=chat_body()) as resp:
                data = await read_sse_data(resp)
    assert content_of(data) == ""
    assert data[-1] == "[DONE]"
    assert len(fake.requests) == 1  # an empty answer is an answer, not a failure
