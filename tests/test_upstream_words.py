"""Nothing the upstream said lost or invented (docs/protocol.md §5): refusals and usage, as
the official `openai` SDK and a scene client see them, against a real fake upstream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from openai.types.chat import ChatCompletionChunk

from lean.app import Server
from tests.fakes import DONE, FakeOpenAI, Reply, Stream, chunk, completion, sse, usage_chunk
from tests.support import lean_config, running
from tests.test_scenes import SCENES, parse_sse, saved_answer

pytestmark = pytest.mark.timeout(20)

MESSAGES: list[Any] = [{"role": "user", "content": "How do I pick a lock?"}]
REFUSAL = ["I'm sorry, ", "I can't help ", "with that."]
# xAI-like: the total is not the sum, and the details are the upstream's to give.
DETAILED_USAGE = {
    "prompt_tokens": 40,
    "completion_tokens": 12,
    "total_tokens": 61,
    "prompt_tokens_details": {"cached_tokens": 32},
    "completion_tokens_details": {"reasoning_tokens": 9},
}


def refusal_stream(*, usage: dict[str, Any] | None = DETAILED_USAGE) -> Stream:
    """OpenAI's form of a refusal: `delta.refusal` fragments, then finish_reason "stop"."""
    events = [sse(chunk({"role": "assistant", "content": None, "refusal": ""}))]
    events += [sse(chunk({"refusal": part})) for part in REFUSAL]
    events.append(sse(chunk({}, finish_reason="stop")))
    if usage is not None:
        events.append(sse(usage_chunk(usage)))
    events.append(DONE)
    return Stream(events)


def text_only_stream() -> Stream:
    """An upstream that ignores `stream_options.include_usage`: no usage anywhere."""
    return Stream(
        [
            sse(chunk({"role": "assistant", "content": "Hi"})),
            sse(chunk({}, finish_reason="stop")),
            DONE,
        ]
    )


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as f:
        yield f


@pytest.fixture
async def lean(fake: FakeOpenAI) -> AsyncIterator[Server]:
    async with running(lean_config(fake.base_url, extra=SCENES)) as server:
        yield server


@pytest.fixture
async def client(lean: Server) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=lean.url + "/v1", api_key="unused", max_retries=0, timeout=10
    ) as c:
        yield c


async def collect(client: openai.AsyncOpenAI) -> list[ChatCompletionChunk]:
    async with asyncio.timeout(10):
        stream = await client.chat.completions.create(
            model="default",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        async with stream:
            return [c async for c in stream]


# --- /v1/chat/completions ----------------------------------------------------------------


async def test_stream_refusal_and_usage_details_reach_the_sdk(
    client: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    fake.push(refusal_stream())
    chunks = await collect(client)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.refusal or "" for d in deltas) == "".join(REFUSAL)
    assert all(not d.content for d in deltas)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (40, 12, 61)
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 32
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 9


async def test_non_stream_refusal_and_usage_details_reach_the_sdk(
    client: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    body = completion("", usage=DETAILED_USAGE)
    message = body["choices"][0]["message"]
    message["content"], message["refusal"] = None, "".join(REFUSAL)
    fake.push(Reply(body=body))
    answer = await client.chat.completions.create(model="default", messages=MESSAGES)
    assert answer.choices[0].message.refusal == "".join(REFUSAL)
    assert answer.choices[0].message.content is None
    assert answer.usage is not None and answer.usage.total_tokens == 61
    assert answer.usage.prompt_tokens_details is not None
    assert answer.usage.prompt_tokens_details.cached_tokens == 32
    assert answer.usage.completion_tokens_details is not None
    assert answer.usage.completion_tokens_details.reasoning_tokens == 9


async def test_no_usage_from_the_upstream_is_no_usage_never_zeros(
    client: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    fake.push(text_only_stream())
    chunks = await collect(client)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hi"
    assert all(c.usage is None and c.choices for c in chunks)
    body = completion("Hi")
    del body["usage"]
    fake.push(Reply(body=body))
    answer = await client.chat.completions.create(model="default", messages=MESSAGES)
    assert answer.choices[0].message.content == "Hi"
    assert answer.usage is None


# --- scenes --------------------------------------------------------------------------------


async def test_scene_refusal_is_its_own_part_ends_refusal_and_is_saved(
    lean: Server, fake: FakeOpenAI
) -> None:
    fake.push(refusal_stream())
    async with aiohttp.ClientSession() as http:
        url = f"{lean.url}/v1/scenes/chat/stream"
        async with http.post(url, json={"message": "x", "conversationId": "ref"}) as resp:
            evs = parse_sse(await resp.text())
    deltas = [d for name, _, d in evs if name == "delta"]
    assert {d["part"] for d in deltas} == {"refusal"}
    assert "".join(d["text"] for d in deltas) == "".join(REFUSAL)
    name, _, done = evs[-1]
    assert name == "done" and done["finishReason"] == "refusal"
    assert done["text"] == "".join(REFUSAL)
    assert done["usage"] == {
        "promptTokens": 40,
        "completionTokens": 12,
        "cachedTokens": 32,
        "reasoningTokens": 9,
    }
    answer = (await saved_answer(lean, "ref"))[-1]
    assert answer["status"] == "complete" and answer["finishReason"] == "refusal"
    assert answer["content"] == "".join(REFUSAL)


async def test_scene_usage_details_are_absent_when_the_upstream_gave_none(
    lean: Server, fake: FakeOpenAI
) -> None:
    fake.push(refusal_stream(usage={"prompt_tokens": 5, "completion_tokens": 3}))
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{lean.url}/v1/scenes/chat/stream", json={"message": "x"}) as resp:
            evs = parse_sse(await resp.text())
    done = evs[-1][2]
    assert done["finishReason"] == "refusal"  # fails on lean before refusals were kept
    assert done["usage"] == {"promptTokens": 5, "completionTokens": 3}


# --- what lean does not model: logprobs, annotations -------------------------------------

LOGPROBS = [
    {"content": [{"token": w, "logprob": -0.25 * i, "bytes": list(w.encode()), "top_logprobs": []}]}
    for i, w in enumerate(["Paris", " is", " lovely."])
]
ANNOTATIONS = [
    {
        "type": "url_citation",
        "url_citation": {"url": "https://example.org/paris", "title": "Paris", "start_index": 0},
    }
]


def logprobs_stream() -> Stream:
    """Logprobs on each content chunk; web-search citations on a delta of their own."""
    events = [sse(chunk({"role": "assistant", "content": ""}))]
    for logprobs in LOGPROBS:
        part = chunk({"content": logprobs["content"][0]["token"]})
        part["choices"][0]["logprobs"] = logprobs
        events.append(sse(part))
    events.append(sse(chunk({"annotations": ANNOTATIONS, "content": ""})))
    events.append(sse(chunk({}, finish_reason="stop")))
    events.append(sse(usage_chunk({"prompt_tokens": 3, "completion_tokens": 3})))
    events.append(DONE)
    return Stream(events)


async def test_stream_logprobs_and_annotations_reach_the_sdk_unchanged(
    client: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    fake.push(logprobs_stream())
    chunks = await collect(client)
    choices = [c.choices[0] for c in chunks if c.choices]
    assert "".join(c.delta.content or "" for c in choices) == "Paris is lovely."
    got = [c.logprobs.model_dump() for c in choices if c.logprobs is not None]
    assert [g["content"] for g in got] == [lp["content"] for lp in LOGPROBS]
    annotations = [c.delta.model_extra.get("annotations") for c in choices if c.delta.model_extra]
    assert annotations == [ANNOTATIONS]
    assert {c.id for c in chunks} == {chunks[0].id} and {c.model for c in chunks} == {"default"}


async def test_stream_fields_lean_does_not_know_reach_the_sdk_unchanged(
    client: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    details = [{"type": "reasoning.summary", "summary": "Thinking of Paris.", "index": 0}]
    part = chunk({"content": "Paris", "reasoning_details": details})
    part["choices"][0]["native_finish_reason"] = None
    last = chunk({}, finish_reason="stop")
    last["choices"][0]["native_finish_reason"] = "end_turn"
    fake.push(Stream([sse(part), sse(last), DONE]))
    chunks = await collect(client)
    choices = [c.choices[0] for c in chunks if c.choices]
    assert "".join(c.delta.content or "" for c in choices) == "Paris"
    extra = [c.delta.model_extra for c in choices if c.delta.model_extra]
    assert extra == [{"reasoning_details": details}]
    finish = [c for c in choices if c.finish_reason]
    assert len(finish) == 1 and finish[0].finish_reason == "stop"
    assert finish[0].model_extra == {"native_finish_reason": "end_turn"}


async def test_non_stream_logprobs_and_annotations_reach_the_sdk_unchanged(
    client: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    body = completion("Paris is lovely.")
    body["choices"][0]["logprobs"] = {"content": LOGPROBS[0]["content"]}
    body["choices"][0]["message"]["annotations"] = ANNOTATIONS
    fake.push(Reply(body=body))
    answer = await client.chat.completions.create(model="default", messages=MESSAGES)
    choice = answer.choices[0]
    assert choice.logprobs is not None
    assert choice.logprobs.model_dump()["content"] == LOGPROBS[0]["content"]
    annotations = choice.message.annotations or []
    assert [(a.type, a.url_citation.url, a.url_citation.title) for a in annotations] == [
        ("url_citation", "https://example.org/paris", "Paris")
    ]


async def test_scene_text_arrives_whole_from_chunks_with_logprobs(
    lean: Server, fake: FakeOpenAI
) -> None:
    fake.push(logprobs_stream())
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{lean.url}/v1/scenes/chat/stream", json={"message": "x"}) as resp:
            evs = parse_sse(await resp.text())
    content = "".join(d["text"] for n, _, d in evs if n == "delta")
    assert content == "Paris is lovely." == evs[-1][2]["text"]
    assert evs[-1][2]["usage"] == {"promptTokens": 3, "completionTokens": 3}
