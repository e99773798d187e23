"""`POST /v1/messages` and `/v1/messages/count_tokens` as the official `anthropic` SDK sees
them (docs/protocol.md §1, "The Anthropic dialect"): the SDK as the client, lean on a real
socket, and real fakes of an OpenAI-compatible, an Anthropic and a Gemini upstream."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import anthropic
import pytest

from lean.app import Server
from lean.dialects.anthropic import parse_request
from lean.dialects.estimate import estimate_tokens
from tests.fakes import (
    PROMPT_TOKENS,
    FakeOpenAI,
    Reply,
    Stream,
    chunk,
    completion,
    error_body,
    sse,
    text_stream,
    tool_call_stream,
    usage_chunk,
)
from tests.fakes_providers import (
    THINKING_SIGNATURE,
    FakeAnthropic,
    FakeGemini,
    anthropic_event,
    anthropic_message,
    anthropic_text_stream,
    anthropic_tool_stream,
    gemini_text_stream,
    gemini_tool_stream,
)
from tests.support import SECRET, lean_config, running

pytestmark = pytest.mark.timeout(20)

TEXT = "The quick brown fox jumps over the lazy dog."
HI: list[Any] = [{"role": "user", "content": "Hi"}]
KINDS = ["openai", "anthropic", "gemini"]
TOKEN = "lean-client-token-0123456789"
WEATHER: dict[str, Any] = {
    "name": "get_weather",
    "description": "Weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}

Fake = FakeOpenAI | FakeAnthropic | FakeGemini


@asynccontextmanager
async def gateway(
    kind: str, *, model: str = "", server: str = "", extra: str = ""
) -> AsyncIterator[tuple[Fake, Server]]:
    fake: Fake = {"openai": FakeOpenAI, "anthropic": FakeAnthropic, "gemini": FakeGemini}[kind]()
    async with fake:
        provider = f"kind = {kind}\nbase_url = {fake.base_url}"
        config = lean_config(provider=provider, model=model, server=server, extra=extra)
        async with running(config) as lean:
            yield fake, lean


def sdk(lean: Server, **auth: str) -> anthropic.AsyncAnthropic:
    if not auth:
        auth = {"api_key": "unused"}
    return anthropic.AsyncAnthropic(base_url=lean.url, max_retries=0, timeout=10, **auth)


def text_answer(kind: str, text: str = TEXT) -> Stream:
    if kind == "openai":
        return text_stream(text)
    return anthropic_text_stream(text) if kind == "anthropic" else gemini_text_stream(text)


async def raw_events(lean: Server, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(event, data) of every SSE message of a /v1/messages stream, read by hand."""
    headers = {"anthropic-version": "2023-06-01"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(lean.url + "/v1/messages", json=body, headers=headers) as resp,
    ):
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        raw = (await resp.read()).decode()
    events = []
    for block in raw.split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n") if ": " in line)
        if "event" in lines:
            events.append((lines["event"], json.loads(lines["data"])))
    return events


# --- text, streamed and whole ----------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_stream_and_create_from_every_kind(kind: str) -> None:
    async with gateway(kind) as (fake, lean), sdk(lean) as client:
        fake.push(text_answer(kind))
        async with client.messages.stream(model="default", max_tokens=64, messages=HI) as stream:
            text = "".join([t async for t in stream.text_stream])
            final = await stream.get_final_message()
        fake.push(text_answer(kind, "Whole."))
        whole = await client.messages.create(model="default", max_tokens=64, messages=HI)
    assert text == TEXT
    assert [block.type for block in final.content] == ["text"]
    assert final.model == "default"  # the alias, not the upstream's name
    assert final.stop_reason == "end_turn"
    assert final.usage.input_tokens == PROMPT_TOKENS  # the upstream's, replacing the estimate
    assert final.usage.output_tokens > 0
    assert whole.content[0].text == "Whole."
    assert whole.stop_reason == "end_turn"
    assert whole.usage.input_tokens == PROMPT_TOKENS
    assert whole.id.startswith("msg_")


async def test_the_event_order_and_the_estimate_in_message_start() -> None:
    async with gateway("openai") as (fake, lean):
        fake.push(text_stream(TEXT, reasoning="Think first."))
        body = {"model": "default", "max_tokens": 64, "messages": HI, "stream": True}
        events = await raw_events(lean, body)
    names = [name for name, _ in events]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    start = events[0][1]["message"]
    estimate = estimate_tokens(parse_request(json.dumps(body).encode()).body)
    assert start["usage"]["input_tokens"] == estimate > 0  # known before the upstream spoke
    blocks = [(data["index"], data["content_block"]["type"]) for name, data in events if
              name == "content_block_start"]  # fmt: skip
    assert blocks == [(0, "thinking"), (1, "text")]
    stops = [data["index"] for name, data in events if name == "content_block_stop"]
    assert stops == [0, 1]
    deltas = {data["delta"]["type"] for name, data in events if name == "content_block_delta"}
    assert deltas == {"thinking_delta", "text_delta"}
    usage = events[-2][1]["usage"]
    assert usage["input_tokens"] == PROMPT_TOKENS and usage["output_tokens"] > 0


async def test_a_silent_upstream_gets_message_start_then_pings() -> None:
    async with gateway("openai", server="commit_wait = 0.1\nping_interval = 30") as (fake, lean):
        stream = text_stream(TEXT)
        stream.first_byte_delay = 0.4
        fake.push(stream)
        events = await raw_events(
            lean, {"model": "default", "max_tokens": 64, "messages": HI, "stream": True}
        )
    names = [name for name, _ in events]
    assert names[:2] == ["message_start", "ping"]  # the commit: the message, a heartbeat
    assert events[1][1] == {"type": "ping"}
    assert names[-1] == "message_stop"


async def test_usage_the_upstream_did_not_give_is_left_out() -> None:
    async with gateway("openai") as (fake, lean):
        fake.push(text_stream(TEXT, usage=False))
        events = await raw_events(
            lean, {"model": "default", "max_tokens": 64, "messages": HI, "stream": True}
        )
    assert events[-2] == (
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {},  # unknown: never 0
        },
    )


# --- tools over two turns --------------------------------------------------------------------


def tool_answer(kind: str) -> Stream:
    if kind == "openai":
        return tool_call_stream([("call_1", "get_weather", '{"city":"Paris"}')])
    if kind == "anthropic":
        return anthropic_tool_stream([("toolu_1", "get_weather", '{"city":"Paris"}')])
    return gemini_tool_stream([("get_weather", {"city": "Paris"})])


@pytest.mark.parametrize("kind", KINDS)
async def test_tools_over_two_turns(kind: str) -> None:
    async with gateway(kind) as (fake, lean), sdk(lean) as client:
        fake.push(tool_answer(kind))
        async with client.messages.stream(
            model="default", max_tokens=64, messages=HI, tools=[WEATHER]
        ) as stream:
            first = await stream.get_final_message()
        assert first.stop_reason == "tool_use"
        [use] = first.content
        assert use.type == "tool_use"
        assert (use.name, use.input) == ("get_weather", {"city": "Paris"})
        assert use.id
        fake.push(text_answer(kind, "Sunny in Paris."))
        second = await client.messages.create(
            model="default",
            max_tokens=64,
            tools=[WEATHER],
            messages=[
                *HI,
                {"role": "assistant", "content": first.content},
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "Sunny"}],
                },
            ],
        )
        sent = fake.requests[-1].body
    assert second.content[0].text == "Sunny in Paris."
    if kind == "openai":
        assert sent["messages"][-1] == {"role": "tool", "tool_call_id": use.id, "content": "Sunny"}
        assert sent["messages"][-2]["tool_calls"][0]["id"] == use.id
    elif kind == "anthropic":
        assert sent["messages"][-1]["content"][0]["tool_use_id"] == use.id
    else:
        response = sent["contents"][-1]["parts"][0]["functionResponse"]
        assert response["name"] == "get_weather"


# --- thinking, refusals, stop reasons -------------------------------------------------------


def redacted_stream() -> Stream:
    """An Anthropic stream with a signed thinking block, a redacted one, then text."""
    whole = anthropic_text_stream("Done.", reasoning="Let me think.")
    redacted = [
        anthropic_event(
            {
                "type": "content_block_start",
                "index": 1,
                "content_block": {"type": "redacted_thinking", "data": "EmwKAhgBEgy-opaque"},
            }
        ),
        anthropic_event({"type": "content_block_stop", "index": 1}),
    ]
    events = list(whole.events)
    at = next(i for i, e in enumerate(events) if b'"text_delta"' in e) - 1  # the text's start
    renumbered = [e.replace(b'"index":1', b'"index":2') for e in events[at:]]
    return Stream(events[:at] + redacted + renumbered)


async def test_thinking_signatures_and_redacted_thinking_round_trip_unchanged() -> None:
    async with gateway("anthropic") as (fake, lean), sdk(lean) as client:
        fake.push(redacted_stream())
        thinking = {"type": "enabled", "budget_tokens": 1024}
        async with client.messages.stream(
            model="default", max_tokens=2048, messages=HI, thinking=thinking
        ) as stream:
            first = await stream.get_final_message()
        assert [block.type for block in first.content] == ["thinking", "redacted_thinking", "text"]
        assert first.content[0].signature == THINKING_SIGNATURE
        assert first.content[0].thinking == "Let me think."
        assert first.content[1].data == "EmwKAhgBEgy-opaque"
        turn = [block.model_dump(exclude_none=True) for block in first.content]
        await client.messages.create(
            model="default",
            max_tokens=2048,
            thinking=thinking,
            messages=[*HI, {"role": "assistant", "content": turn}, *HI],
        )
        sent = fake.requests[-1].body
    assert sent["thinking"] == thinking
    assert sent["messages"][1]["content"][:2] == [
        {"type": "thinking", "thinking": "Let me think.", "signature": THINKING_SIGNATURE},
        {"type": "redacted_thinking", "data": "EmwKAhgBEgy-opaque"},
    ]


async def test_reasoning_content_becomes_thinking_blocks() -> None:
    async with gateway("openai") as (fake, lean), sdk(lean) as client:
        fake.push(text_stream(TEXT, reasoning="Foxes are quick."))
        async with client.messages.stream(model="default", max_tokens=64, messages=HI) as stream:
            final = await stream.get_final_message()
        fake.push(Reply(body=completion("Answer.", reasoning="Thoughts.")))
        whole = await client.messages.create(model="default", max_tokens=64, messages=HI)
    assert [block.type for block in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == "Foxes are quick."
    assert [block.type for block in whole.content] == ["thinking", "text"]


async def test_gemini_thoughts_become_thinking_without_its_signature() -> None:
    async with gateway("gemini") as (fake, lean), sdk(lean) as client:
        fake.push(gemini_text_stream(TEXT, reasoning="Thinking it over.", signature="g-sig"))
        async with client.messages.stream(model="default", max_tokens=64, messages=HI) as stream:
            final = await stream.get_final_message()
    assert [block.type for block in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == "Thinking it over."
    assert final.content[0].signature == ""  # Gemini's is no Anthropic signature
    assert final.usage.input_tokens == PROMPT_TOKENS


async def test_a_whole_anthropic_answer_keeps_its_thinking_signature() -> None:
    async with gateway("anthropic") as (fake, lean), sdk(lean) as client:
        fake.push(Reply(body=anthropic_message("Hi.", reasoning="Hmm.")))
        whole = await client.messages.create(model="default", max_tokens=64, messages=HI)
    assert [block.type for block in whole.content] == ["thinking", "text"]
    assert whole.content[0].signature == THINKING_SIGNATURE


async def test_a_refusal_is_text_with_stop_reason_refusal() -> None:
    refusal = [
        sse(chunk({"role": "assistant", "refusal": ""})),
        sse(chunk({"refusal": "I can't help "})),
        sse(chunk({"refusal": "with that."})),
        sse(chunk({}, finish_reason="stop")),
        sse(usage_chunk({"prompt_tokens": 8, "completion_tokens": 4, "total_tokens": 12})),
        b"data: [DONE]\n\n",
    ]
    async with gateway("openai") as (fake, lean), sdk(lean) as client:
        fake.push(Stream(refusal))
        async with client.messages.stream(model="default", max_tokens=64, messages=HI) as stream:
            final = await stream.get_final_message()
    assert final.stop_reason == "refusal"
    assert final.content[0].text == "I can't help with that."


@pytest.mark.parametrize(
    ("said", "stop_reason", "stop_sequence"),
    [("refusal", "refusal", None), ("stop_sequence", "stop_sequence", "END"),
     ("max_tokens", "max_tokens", None), ("pause_turn", "pause_turn", None)],
)  # fmt: skip
async def test_an_anthropic_upstreams_stop_reason_is_kept(
    said: str, stop_reason: str, stop_sequence: str | None
) -> None:
    stream = anthropic_text_stream("Partial", stop_reason=said)
    stream.events = [
        e.replace(b'"stop_sequence":null}', b'"stop_sequence":"END"}') if said == "stop_sequence"
        else e for e in stream.events
    ]  # fmt: skip
    async with gateway("anthropic") as (fake, lean), sdk(lean) as client:
        fake.push(stream)
        async with client.messages.stream(model="default", max_tokens=64, messages=HI) as s:
            final = await s.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == (stop_reason, stop_sequence)


async def test_finish_length_is_max_tokens_from_an_openai_upstream() -> None:
    async with gateway("openai") as (fake, lean), sdk(lean) as client:
        fake.push(text_stream(TEXT, finish_reason="length"))
        whole = await client.messages.create(model="default", max_tokens=5, messages=HI)
    assert whole.stop_reason == "max_tokens"


# --- errors before and after the first byte -------------------------------------------------


@pytest.mark.parametrize(
    ("status", "headers", "raised", "retry_after"),
    [
        (429, {"Retry-After": "7"}, anthropic.RateLimitError, "7"),
        (500, {}, anthropic.InternalServerError, None),
        (529, {}, anthropic.OverloadedError, None),
    ],
)
async def test_an_error_before_the_first_byte_is_the_sdks_typed_error(
    status: int, headers: dict[str, str], raised: type[anthropic.APIStatusError], retry_after: Any
) -> None:
    async with gateway("openai", model="retries = 0") as (fake, lean), sdk(lean) as client:
        failed = Reply(status=status, body=error_body("no"), headers=headers)
        fake.push(failed, failed)  # the stream, then the whole-answer fallback
        with pytest.raises(raised) as caught:
            async with client.messages.stream(model="default", max_tokens=64, messages=HI) as s:
                await s.get_final_message()
    assert caught.value.response.headers.get("retry-after") == retry_after
    assert caught.value.body["type"] == "error"
    assert SECRET not in caught.value.response.text


async def test_an_error_after_the_first_byte_is_one_error_event() -> None:
    async with gateway("openai", model="retries = 0") as (fake, lean):
        stream = text_stream(TEXT)
        stream.cut_after = 3  # the role, two words: then the connection drops
        fake.push(stream)
        async with sdk(lean) as client:
            with pytest.raises(anthropic.APIStatusError) as caught:
                async with client.messages.stream(model="default", max_tokens=64, messages=HI) as s:
                    await s.get_final_message()
        assert caught.value.body["error"]["type"] == "api_error"
        fake.push(stream)
        events = await raw_events(
            lean, {"model": "default", "max_tokens": 64, "messages": HI, "stream": True}
        )
    assert events[-1][0] == "error"
    assert "message_stop" not in [name for name, _ in events]  # never finished for it


async def test_a_client_that_leaves_closes_the_upstream_within_a_second() -> None:
    async with gateway("openai") as (fake, lean):
        stream = text_stream(TEXT)
        stream.stall_after = 3
        fake.push(stream)
        async with sdk(lean) as client:
            async with client.messages.stream(model="default", max_tokens=64, messages=HI) as s:
                async for text in s.text_stream:
                    assert text
                    break
            left = time.monotonic()  # the fake's clock
        closed = await fake.wait_disconnect(timeout=1.0)
    assert closed - left < 1.0


# --- auth, bad requests, the model list, count_tokens ---------------------------------------


async def test_x_api_key_and_bearer_tokens_and_401s_in_anthropics_shape() -> None:
    server = "host = 127.0.0.1\n"
    auth = "[auth]\ntokens_env = LEAN_TOKENS\n"
    fake = FakeAnthropic()
    async with fake:
        provider = f"kind = anthropic\nbase_url = {fake.base_url}"
        config = lean_config(
            provider=provider, server=server, extra=auth, environ={"LEAN_TOKENS": TOKEN}
        )
        async with running(config) as lean:
            async with sdk(lean, api_key=TOKEN) as client:
                await client.messages.create(model="default", max_tokens=64, messages=HI)
            async with sdk(lean, auth_token=TOKEN) as client:
                await client.messages.create(model="default", max_tokens=64, messages=HI)
            async with sdk(lean, api_key="wrong") as client:
                with pytest.raises(anthropic.AuthenticationError) as caught:
                    await client.messages.create(model="default", max_tokens=64, messages=HI)
                with pytest.raises(anthropic.AuthenticationError) as listing:
                    await client.models.list()
    assert listing.value.body["error"]["type"] == "authentication_error"
    assert caught.value.body["error"]["type"] == "authentication_error"
    assert len(fake.requests) == 2
    for recorded in fake.requests:  # the operator's key upstream, never the client's token
        assert recorded.headers["x-api-key"] == SECRET
        assert TOKEN not in json.dumps(recorded.headers)


async def test_versions_and_betas_reach_an_anthropic_upstream_unchanged() -> None:
    async with gateway("anthropic") as (fake, lean):
        client = anthropic.AsyncAnthropic(
            base_url=lean.url,
            api_key="unused",
            max_retries=0,
            default_headers={"anthropic-beta": "interleaved-thinking-2025-05-14"},
        )
        async with client:
            await client.messages.create(
                model="default",
                max_tokens=64,
                messages=HI,
                extra_headers={"anthropic-version": "2099-01-01"},
            )
    headers = fake.requests[-1].headers
    assert headers["anthropic-beta"] == "interleaved-thinking-2025-05-14"
    assert headers["anthropic-version"] == "2099-01-01"


async def test_the_beta_client_as_claude_code_uses_it() -> None:
    """`client.beta.messages` (Claude Code's): `POST /v1/messages?beta=true`, its betas as
    `anthropic-beta`, the beta stream accumulator."""
    async with gateway("anthropic") as (fake, lean), sdk(lean) as client:
        fake.push(anthropic_tool_stream([("toolu_1", "get_weather", '{"city":"Paris"}')]))
        async with client.beta.messages.stream(
            model="default",
            max_tokens=64,
            messages=HI,
            tools=[WEATHER],
            betas=["interleaved-thinking-2025-05-14", "context-1m-2025-08-07"],
        ) as stream:
            final = await stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert final.content[0].input == {"city": "Paris"}
    sent = fake.requests[-1].headers["anthropic-beta"]
    assert sent == "interleaved-thinking-2025-05-14,context-1m-2025-08-07"


async def test_bad_requests_unknown_models_and_untranslatable_fields() -> None:
    search = {"type": "web_search_20250305", "name": "web_search"}
    async with gateway("openai") as (fake, lean), sdk(lean) as client:
        with pytest.raises(anthropic.NotFoundError) as missing:
            await client.messages.create(model="nope", max_tokens=64, messages=HI)
        with pytest.raises(anthropic.BadRequestError) as bad:
            await client.messages.create(
                model="default",
                max_tokens=64,
                messages=[{"role": "system", "content": "x"}],
            )
        with pytest.raises(anthropic.BadRequestError) as untranslated:
            await client.messages.create(
                model="default",
                max_tokens=64,
                messages=HI,
                tools=[WEATHER, search],
            )
    assert missing.value.body["error"]["type"] == "not_found_error"
    assert "$.messages[0].role" in bad.value.message
    assert "$.tools[1]" in untranslated.value.message
    assert fake.requests == []  # refused before any upstream call


async def test_an_anthropic_upstream_takes_what_others_cannot() -> None:
    search = {"type": "web_search_20250305", "name": "web_search"}
    async with gateway("anthropic") as (fake, lean), sdk(lean) as client:
        await client.messages.create(model="default", max_tokens=64, messages=HI, tools=[search])
    assert fake.requests[-1].body["tools"] == [search]


async def test_the_model_list_in_anthropics_shape_with_anthropic_version() -> None:
    other = "[model.other]\nprovider = up\nupstream_model = m2\n"
    async with gateway("openai", extra=other) as (_, lean):
        async with sdk(lean) as client:
            page = await client.models.list()
        async with aiohttp.ClientSession() as http, http.get(lean.url + "/v1/models") as resp:
            openai_shape = await resp.json()
    assert [model.id for model in page.data] == ["default", "other"]
    assert page.data[0].type == "model"
    assert openai_shape["object"] == "list"  # without the header: OpenAI's


async def test_count_tokens_an_anthropic_upstreams_count_or_the_estimate() -> None:
    request = {"model": "default", "messages": HI, "tools": [WEATHER]}
    async with gateway("anthropic") as (fake, lean), sdk(lean) as client:
        fake.push(Reply(body={"input_tokens": 1234}))
        counted = await client.messages.count_tokens(**request)
        missing = {"type": "error", "error": {"type": "not_found_error", "message": "no"}}
        fake.push(Reply(status=404, body=missing))
        fallback = await client.messages.count_tokens(**request)
        counts = [r for r in fake.requests if r.path.endswith("/count_tokens")]
    assert counted.input_tokens == 1234
    assert counts[0].body["model"] == "fake-model"  # aimed at the upstream model
    assert counts[0].body["tools"][0]["name"] == "get_weather"
    assert counts[0].headers["x-api-key"] == SECRET
    estimate = estimate_tokens(parse_request(json.dumps(request).encode(), counting=True).body)
    assert fallback.input_tokens == estimate > 0  # a compatible upstream without the route
    async with gateway("gemini") as (fake, lean), sdk(lean) as client:
        estimated = await client.messages.count_tokens(**request)
    assert estimated.input_tokens == estimate
    assert fake.requests == []


async def test_the_demo_model_answers_in_messages() -> None:
    config = lean_config(provider="kind = demo\ndemo_delay = 0")
    async with running(config) as lean, sdk(lean) as client:
        async with client.messages.stream(model="default", max_tokens=64, messages=HI) as s:
            text = "".join([t async for t in s.text_stream])
    assert text
