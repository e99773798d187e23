"""`POST /v1/responses` as the official `openai` SDK sees it (docs/protocol.md §1): lean on a
real socket, the SDK's `responses.create` and `responses.stream()` as the clients, the fake
OpenAI-compatible upstream behind. Each async test runs on asyncio and on uvloop."""

from __future__ import annotations

import asyncio
import gc
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from lean.encoders.responses import ResponsesEncoder
from lean.encoders.responses_body import Item
from tests.fakes import (
    DEFAULT_TEXT,
    DONE,
    PROMPT_TOKENS,
    FakeOpenAI,
    Reply,
    Stall,
    Stream,
    chunk,
    error_body,
    sse,
    text_stream,
    tool_call_stream,
    usage_chunk,
)
from tests.fakes_providers import (
    FakeAnthropic,
    FakeGemini,
    anthropic_text_stream,
    anthropic_tool_stream,
    gemini_text_stream,
    gemini_tool_stream,
)
from tests.support import lean_config, running

pytestmark = pytest.mark.timeout(20)

DEFAULT_WORDS = len(DEFAULT_TEXT.split())  # the fake counts one completion token per word
WEATHER: Any = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}
CALLS = [
    ("call_1", "get_weather", '{"city":"Paris"}'),
    ("call_2", "get_weather", '{"city":"Nice"}'),
]


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as f:
        yield f


def sdk(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=10)


@pytest.fixture
async def lean_url(fake: FakeOpenAI) -> AsyncIterator[str]:
    async with running(lean_config(fake.base_url, model="retries = 0")) as server:
        yield server.url


@pytest.fixture
async def client(lean_url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with sdk(lean_url) as c:
        yield c


async def events_of(client: openai.AsyncOpenAI, **params: Any) -> list[Any]:
    params.setdefault("input", "Hi")
    async with asyncio.timeout(10):
        stream = await client.responses.create(model="default", stream=True, **params)
        async with stream:
            return [event async for event in stream]


def types(events: list[Any]) -> list[str]:
    return [event.type for event in events]


# --- streams --------------------------------------------------------------------------


async def test_a_text_stream_in_the_apis_order(client: openai.AsyncOpenAI) -> None:
    events = await events_of(client)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    words = DEFAULT_WORDS
    assert types(events) == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * words,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    created, done, completed = events[0].response, events[-2].item, events[-1].response
    assert created.status == "in_progress" and created.id.startswith("resp_")
    assert completed.id == created.id and completed.model == "default"
    assert done.id.startswith("msg_") and done.status == "completed"
    assert done.content[0].text == DEFAULT_TEXT == events[-4].text
    assert {e.item_id for e in events[3:-2]} == {done.id}
    assert completed.status == "completed" and completed.output_text == DEFAULT_TEXT
    usage = completed.usage
    assert (usage.input_tokens, usage.output_tokens) == (PROMPT_TOKENS, words)
    assert usage.total_tokens == PROMPT_TOKENS + words


async def test_the_stream_helper_builds_the_final_response(client: openai.AsyncOpenAI) -> None:
    async with asyncio.timeout(10):
        async with client.responses.stream(
            model="default", input="Hi", instructions="Be terse."
        ) as stream:
            texts = [e.delta async for e in stream if e.type == "response.output_text.delta"]
            final = await stream.get_final_response()
    assert "".join(texts) == DEFAULT_TEXT == final.output_text
    assert final.status == "completed" and final.instructions == "Be terse."


async def test_a_whole_response(client: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    response = await client.responses.create(model="default", input="Hi", max_output_tokens=20)
    assert response.object == "response" and response.status == "completed"
    assert response.output_text == DEFAULT_TEXT
    assert response.usage is not None and response.usage.input_tokens == PROMPT_TOKENS
    assert response.max_output_tokens == 20
    sent = fake.requests[-1].body
    assert sent["max_tokens"] == 20 and sent["messages"] == [{"role": "user", "content": "Hi"}]


async def test_usage_details_as_the_upstream_gave_them(
    client: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    usage = {
        "prompt_tokens": 100,
        "completion_tokens": 30,
        "total_tokens": 133,  # not the sum: passed on as it is
        "prompt_tokens_details": {"cached_tokens": 64},
        "completion_tokens_details": {"reasoning_tokens": 20},
    }
    fake.push(
        Stream(
            [
                sse(chunk({"role": "assistant", "content": "ok"})),
                sse(chunk({}, finish_reason="stop")),
                sse(usage_chunk(usage)),
                DONE,
            ]
        )
    )
    completed = (await events_of(client))[-1].response.usage
    assert (completed.input_tokens, completed.output_tokens, completed.total_tokens) == (
        100,
        30,
        133,
    )
    assert completed.input_tokens_details.cached_tokens == 64
    assert completed.output_tokens_details.reasoning_tokens == 20
    fake.push(text_stream("ok", usage=False))  # none given: none invented
    assert (await events_of(client))[-1].response.usage is None


async def test_reasoning_content_is_a_reasoning_summary(
    client: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    fake.push(text_stream("Four.", reasoning="Two and two make four."))
    events = await events_of(client)
    kinds = types(events)
    assert kinds[2:5] == [
        "response.output_item.added",
        "response.reasoning_summary_part.added",
        "response.reasoning_summary_text.delta",
    ]
    first = kinds.index("response.output_item.done")
    assert kinds[first - 2 : first] == [
        "response.reasoning_summary_text.done",
        "response.reasoning_summary_part.done",
    ]
    reasoning, message = events[-1].response.output
    assert reasoning.type == "reasoning" and reasoning.id.startswith("rs_")
    assert reasoning.summary[0].text == "Two and two make four."
    assert message.type == "message" and message.content[0].text == "Four."
    assert events[first + 1].output_index == 1  # the message's item comes second


async def test_a_refusal_is_a_refusal_part(client: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    fake.push(
        Stream(
            [
                sse(chunk({"role": "assistant", "refusal": ""})),
                sse(chunk({"refusal": "I can't help "})),
                sse(chunk({"refusal": "with that."})),
                sse(chunk({}, finish_reason="stop")),
                DONE,
            ]
        )
    )
    events = await events_of(client)
    assert "response.refusal.delta" in types(events)
    assert [e.refusal for e in events if e.type == "response.refusal.done"] == [
        "I can't help with that."
    ]
    final = events[-1].response
    assert final.status == "completed" and final.output_text == ""
    assert final.output[0].content[0].type == "refusal"
    assert final.output[0].content[0].refusal == "I can't help with that."


async def test_a_length_finish_is_incomplete(client: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    fake.push(text_stream("Once upon", finish_reason="length"))
    events = await events_of(client, max_output_tokens=2)
    assert types(events)[-1] == "response.incomplete"
    assert "response.completed" not in types(events)
    final = events[-1].response
    assert final.status == "incomplete" and final.incomplete_details.reason == "max_output_tokens"
    assert final.output[0].content[0].text == "Once upon"


# --- tools and conversations ------------------------------------------------------------


async def test_tool_calls_are_function_call_items(
    client: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    fake.push(tool_call_stream(CALLS))
    async with client.responses.stream(model="default", input="Weather?", tools=[WEATHER]) as s:
        final = await s.get_final_response()
    calls = final.output
    assert [(c.type, c.call_id, c.name, c.arguments) for c in calls] == [
        ("function_call", call_id, name, arguments) for call_id, name, arguments in CALLS
    ]
    assert [c.id[:3] for c in calls] == ["fc_", "fc_"]
    assert fake.requests[-1].body["tools"][0]["function"]["name"] == "get_weather"


async def two_turns(
    client: openai.AsyncOpenAI, fake: FakeOpenAI, *, continued: bool
) -> list[dict[str, Any]]:
    """A tool call, then its output; the second turn sends everything again as items, or
    only the output with `previous_response_id`. What the upstream got in turn 2."""
    fake.push(tool_call_stream(CALLS[:1]), text_stream("18C in Paris."))
    first_input: Any = [{"role": "user", "content": "Weather in Paris?"}]
    async with client.responses.stream(
        model="default", input=first_input, tools=[WEATHER], instructions="Be brief."
    ) as stream:
        first = await stream.get_final_response()
    call = first.output[0]
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "18C"}
    if continued:
        second_input: Any = [result]
        more: dict[str, Any] = {"previous_response_id": first.id}
    else:
        second_input = [*first_input, call.model_dump(exclude_none=True), result]
        more = {}
    async with client.responses.stream(
        model="default", input=second_input, tools=[WEATHER], instructions="Be brief.", **more
    ) as stream:
        second = await stream.get_final_response()
    assert second.output_text == "18C in Paris."
    sent: list[dict[str, Any]] = fake.requests[-1].body["messages"]
    return sent


@pytest.mark.parametrize("continued", [False, True], ids=["items", "previous_response_id"])
async def test_a_two_turn_tool_conversation(
    client: openai.AsyncOpenAI, fake: FakeOpenAI, continued: bool
) -> None:
    sent = await two_turns(client, fake, continued=continued)
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
    }
    assert sent == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
    ]


async def test_previous_response_id_chains_and_leaves_instructions_behind(
    client: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    fake.push(text_stream("One."), text_stream("Two."), text_stream("Three."))
    first = await client.responses.create(model="default", input="1?", instructions="Old rules.")
    second = await client.responses.create(
        model="default", input="2?", previous_response_id=first.id, stream=False
    )
    async with client.responses.stream(
        model="default", input="3?", previous_response_id=second.id, instructions="New rules."
    ) as stream:
        await stream.get_final_response()
    assert fake.requests[-1].body["messages"] == [
        {"role": "system", "content": "New rules."},
        {"role": "user", "content": "1?"},
        {"role": "assistant", "content": "One."},
        {"role": "user", "content": "2?"},
        {"role": "assistant", "content": "Two."},
        {"role": "user", "content": "3?"},
    ]


async def test_an_unknown_previous_response_is_a_404(
    client: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await client.responses.create(model="default", input="Hi", previous_response_id="resp_x")
    assert caught.value.code == "previous_response_not_found"
    assert caught.value.param == "previous_response_id"
    assert caught.value.type == "invalid_request_error"
    unsaved = await client.responses.create(model="default", input="Hi", store=False)
    assert unsaved.output_text == DEFAULT_TEXT
    with pytest.raises(openai.NotFoundError):
        await client.responses.create(
            model="default", input="Hi", previous_response_id=unsaved.id, stream=True
        )
    assert len(fake.requests) == 1  # neither 404 reached the upstream


async def test_a_custom_tool_call_answers_in_kind(
    client: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    patch = "*** Begin Patch\n*** End Patch\n"
    fake.push(tool_call_stream([("call_9", "apply_patch", json.dumps({"input": patch}))]))
    events = await events_of(client, tools=[{"type": "custom", "name": "apply_patch"}])
    assert "response.function_call_arguments.delta" not in types(events)
    assert [e.input for e in events if e.type == "response.custom_tool_call_input.done"] == [patch]
    item = events[-1].response.output[0]
    assert (item.type, item.call_id, item.name, item.input) == (
        "custom_tool_call",
        "call_9",
        "apply_patch",
        patch,
    )


async def test_a_namespaced_function_call_names_its_namespace(
    client: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    """A `namespace` tool group's functions reach the upstream as functions; a call of one
    comes back with its `namespace` (Codex routes its sub-agent tools by it). A name a
    top-level function has already is left out of the group."""
    close: Any = {"type": "function", "name": "close_agent", "parameters": {"type": "object"}}
    group: Any = {"type": "namespace", "name": "agents", "tools": [close, WEATHER]}
    fake.push(tool_call_stream([("call_1", "close_agent", '{"target":"a1"}')]))
    events = await events_of(client, tools=[WEATHER, group])
    sent = [t["function"]["name"] for t in fake.requests[-1].body["tools"]]
    assert sent == ["get_weather", "close_agent"]
    call = events[-1].response.output[0]
    assert (call.type, call.name, call.namespace) == ("function_call", "close_agent", "agents")
    assert [e.item.namespace for e in events if e.type == "response.output_item.added"] == [
        "agents"
    ]


# --- failures -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "raised", "status"),
    [
        (
            Reply(status=429, body=error_body("slow", type="rate_limit_error")),
            openai.RateLimitError,
            429,
        ),
        (Reply(status=500, body=error_body("boom")), openai.InternalServerError, 502),
    ],
)
async def test_a_failure_before_the_first_byte_is_a_status(
    client: openai.AsyncOpenAI,
    fake: FakeOpenAI,
    reply: Reply,
    raised: type[openai.APIStatusError],
    status: int,
) -> None:
    fake.default = lambda body: reply
    with pytest.raises(raised) as caught:
        await events_of(client)
    assert caught.value.status_code == status
    assert isinstance(caught.value.body, dict) and caught.value.body["message"]
    with pytest.raises(raised):  # and the whole answer's path the same
        await client.responses.create(model="default", input="Hi")


async def test_requests_lean_refuses_are_the_sdks_typed_errors(
    client: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    with pytest.raises(openai.NotFoundError) as unknown:
        await client.responses.create(model="nope", input="Hi", stream=True)
    assert "nope" in unknown.value.message
    with pytest.raises(openai.BadRequestError) as bad:
        await client.responses.create(
            model="default", input=[{"type": "item_reference", "id": "msg_1"}]
        )
    assert "$.input[0].type" in bad.value.message
    with pytest.raises(openai.BadRequestError) as background:
        await client.responses.create(model="default", input="Hi", background=True)
    assert "$.background" in background.value.message
    assert fake.requests == []


async def test_a_cut_stream_ends_with_response_failed(
    client: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    fake.push(Stream(text_stream(DEFAULT_TEXT).events, cut_after=3))
    events = await events_of(client)
    assert types(events)[-1] == "response.failed"
    assert "response.completed" not in types(events)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    failed = events[-1].response
    assert failed.status == "failed" and failed.error.code == "server_error"
    assert failed.output[0].status == "incomplete" and failed.output[0].content[0].text
    fake.push(Stream(text_stream(DEFAULT_TEXT).events, cut_after=3))
    async with client.responses.stream(model="default", input="Hi") as stream:
        with pytest.raises(RuntimeError, match=r"response\.completed"):
            await stream.get_final_response()


async def test_a_failure_after_commit_wait_is_response_failed(fake: FakeOpenAI) -> None:
    """The upstream is silent past commit_wait: the response starts (created, in_progress)
    and the timeout that follows ends it in band, as `response.failed`."""
    fake.default = lambda body: Stall(seconds=3)
    config = lean_config(
        fake.base_url,
        server="commit_wait = 0.1\nping_interval = 30",
        provider="first_byte_timeout = 0.4",
        model="retries = 0",
    )
    async with running(config) as lean, sdk(lean.url) as client:
        events = await events_of(client)
    assert types(events) == ["response.created", "response.in_progress", "response.failed"]
    failed = events[-1].response
    assert failed.output == [] and failed.error.code == "server_error"
    assert "upstream" in failed.error.message


async def test_a_client_that_leaves_closes_the_upstream(
    client: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    fake.push(Stream(text_stream("word " * 200).events, delay=0.02))
    stream = await client.responses.create(model="default", input="Hi", stream=True)
    seen = 0
    async for event in stream:
        seen += event.type == "response.output_text.delta"
        if seen == 3:
            break
    await stream.close()
    left = time.monotonic()
    gone = await fake.wait_disconnect(timeout=3)
    assert gone - left < 1.0


@pytest.mark.parametrize("stream", [True, False])
async def test_a_response_is_freed_by_reference_counting(
    client: openai.AsyncOpenAI, stream: bool
) -> None:
    """An answer's encoder and items (its text), saved or not, go when it ends: lean serve
    runs the cycle collector rarely (docs/decisions.md)."""
    await client.responses.create(model="default", input="warm up")
    gc.collect()
    gc.disable()
    try:
        if stream:
            await events_of(client)
        else:
            await client.responses.create(model="default", input="Hi")
        for _ in range(100):  # the request's tasks (and its save) end just after its last byte
            left = [o for o in gc.get_objects() if isinstance(o, ResponsesEncoder | Item)]
            if not left:
                break
            await asyncio.sleep(0.01)
    finally:
        gc.enable()
    assert left == []


# --- what Codex CLI sends -----------------------------------------------------------------

# The body Codex CLI 0.169.0 sent for `codex exec "Say hi"` with a custom provider
# (wire_api = "responses"), captured, its long texts cut short.
CODEX_REQUEST = Path(__file__).with_name("codex_request.json")
# What its next request adds after a tool round: the call, its output, and a reasoning
# item with the opaque `encrypted_content` Codex asks for with `include`.
CODEX_ROUND: list[Any] = [
    {
        "type": "reasoning",
        "id": "rs_1",
        "summary": [{"type": "summary_text", "text": "List files."}],
        "content": None,
        "encrypted_content": "gAAAAB-opaque",
    },
    {
        "type": "function_call",
        "id": "fc_1",
        "name": "exec_command",
        "arguments": '{"cmd":"ls"}',
        "call_id": "call_a",
    },
    {"type": "function_call_output", "call_id": "call_a", "output": "README.md"},
]


async def test_a_codex_cli_request_is_served(lean_url: str, fake: FakeOpenAI) -> None:
    body = json.loads(CODEX_REQUEST.read_text())
    body["input"] += CODEX_ROUND
    async with aiohttp.ClientSession() as http:
        async with http.post(
            lean_url + "/v1/responses",
            json=body,
            headers={"Authorization": "Bearer x", "Accept": "text/event-stream"},
        ) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            raw = (await resp.read()).decode()
    blocks = [b for b in raw.split("\n\n") if b.startswith("event: ")]
    names = [b.split("\n", 1)[0][7:] for b in blocks]
    data = [json.loads(b.split("\ndata: ", 1)[1]) for b in blocks]
    assert names == [d["type"] for d in data]  # the event line names the data's type
    assert names[-1] == "response.completed" and data[-1]["response"]["id"].startswith("resp_")
    sent = fake.requests[-1].body
    roles = [m["role"] for m in sent["messages"]]
    assert roles == ["system", "system", "user", "user", "assistant", "tool"]  # no reasoning
    functions = [t["function"]["name"] for t in sent["tools"]]
    grouped = next(t for t in body["tools"] if t["type"] == "namespace")  # sub-agent tools
    assert functions == [
        *(t["name"] for t in body["tools"] if t["type"] == "function"),
        *(t["name"] for t in grouped["tools"]),
    ]
    assert "web_search" not in functions  # hosted: only OpenAI runs it
    assert sent["parallel_tool_calls"] is True and sent["tool_choice"] == "auto"
    for field in ("include", "prompt_cache_key", "client_metadata", "store", "input"):
        assert field not in sent


# --- other upstream kinds -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["anthropic", "gemini"])
async def test_native_upstreams_behind_responses(kind: str) -> None:
    """Thinking from an Anthropic or Gemini upstream is a reasoning item; its tool calls are
    function_call items the next turn (by previous_response_id) hands back."""
    fake: FakeAnthropic | FakeGemini = FakeAnthropic() if kind == "anthropic" else FakeGemini()
    if isinstance(fake, FakeAnthropic):
        fake.push(
            anthropic_text_stream("Four.", reasoning="Two and two."),
            anthropic_tool_stream([("toolu_1", "get_weather", '{"city":"Paris"}')]),
        )
    else:
        fake.push(
            gemini_text_stream("Four.", reasoning="Two and two."),
            gemini_tool_stream([("get_weather", {"city": "Paris"})]),
        )
    async with fake:
        provider = f"kind = {kind}\nbase_url = {fake.base_url}"
        async with running(lean_config(provider=provider)) as lean, sdk(lean.url) as client:
            async with client.responses.stream(model="default", input="2+2?") as stream:
                first = await stream.get_final_response()
            async with client.responses.stream(
                model="default", input="Weather?", tools=[WEATHER], previous_response_id=first.id
            ) as stream:
                second = await stream.get_final_response()
    reasoning, message = first.output
    assert reasoning.type == "reasoning" and reasoning.summary[0].text == "Two and two."
    assert message.type == "message" and first.output_text == "Four."
    call = second.output[0]
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"}
    history = json.dumps(fake.requests[-1].body)  # the first turn, in the provider's form
    assert "2+2?" in history and "Four." in history and "Weather?" in history
