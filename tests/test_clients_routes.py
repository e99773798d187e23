"""Clients' limits and ownership on the routes that came beside chat completions and scenes
(docs/protocol.md §8): `POST /v1/messages` as the official `anthropic` SDK sees it (429 in
Anthropic's shape, which the SDK raises as `RateLimitError`), `count_tokens` (the client's
models, no limit counted), `POST /v1/responses` as the official `openai` SDK sees it (429
in OpenAI's shape; a saved response is its client's), and `useChat`'s UI route and its
resume route. Real lean on a socket, the real fake OpenAI-compatible upstream of
tests/test_clients.py's config."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from lean.app import Server
from tests.fakes import DEFAULT_TEXT, FakeOpenAI, text_stream
from tests.support import running
from tests.test_clients import ALPHA, BETA, GAMMA, LEGACY, config, held, metric, wait_metric
from tests.test_ui_stream import chat_body as ui_body
from tests.test_ui_stream import parse

pytestmark = pytest.mark.timeout(20)

HI: list[Any] = [{"role": "user", "content": "Hi"}]


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as f:
        yield f


@pytest.fixture
async def lean(fake: FakeOpenAI) -> AsyncIterator[Server]:
    async with running(config(fake)) as server:
        yield server


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


SDK = Callable[[dict[str, str]], anthropic.AsyncAnthropic]


@pytest.fixture
async def sdk(lean: Server) -> AsyncIterator[SDK]:
    """The SDK as a client: its token as the api key (sent as `x-api-key`); closed after."""
    made: list[anthropic.AsyncAnthropic] = []

    def make(headers: dict[str, str]) -> anthropic.AsyncAnthropic:
        token = headers["Authorization"].removeprefix("Bearer ")
        made.append(
            anthropic.AsyncAnthropic(base_url=lean.url, api_key=token, max_retries=0, timeout=10)
        )
        return made[-1]

    yield make
    for client in made:
        await client.close()


# --- /v1/messages ----------------------------------------------------------------------------


async def test_a_client_over_its_rate_gets_the_anthropic_sdks_rate_limit_error(
    fake: FakeOpenAI, sdk: SDK
) -> None:
    client = sdk(BETA)  # requests_per_minute = 2
    for _ in range(4):  # not runs: none of the rate is spent on them
        counted = await client.messages.count_tokens(model="default", messages=HI)
        assert counted.input_tokens > 0
    for _ in range(2):
        message = await client.messages.create(model="default", max_tokens=64, messages=HI)
        assert message.content[0].type == "text"
    with pytest.raises(anthropic.RateLimitError) as refused:
        await client.messages.create(model="default", max_tokens=64, messages=HI)
    assert refused.value.status_code == 429
    assert 28 <= int(refused.value.response.headers["retry-after"]) <= 30
    assert refused.value.body == {
        "type": "error",
        "error": {
            "type": "rate_limit_error",
            "message": "client 'beta' made its 2 requests per minute",
        },
    }
    with pytest.raises(anthropic.RateLimitError):  # a stream is refused before it starts
        async with client.messages.stream(model="default", max_tokens=64, messages=HI) as s:
            await s.get_final_message()
    assert len(fake.requests) == 2  # no provider call for the refused ones


async def test_a_model_the_client_may_not_use_does_not_exist_on_the_anthropic_routes(
    fake: FakeOpenAI, sdk: SDK
) -> None:
    client = sdk(BETA)  # models = default
    with pytest.raises(anthropic.NotFoundError) as create:
        await client.messages.create(model="other", max_tokens=64, messages=HI)
    with pytest.raises(anthropic.NotFoundError) as count:
        await client.messages.count_tokens(model="other", messages=HI)
    with pytest.raises(anthropic.NotFoundError) as unknown:
        await client.messages.create(model="nonesuch", max_tokens=64, messages=HI)
    said = "model '{}' does not exist; GET /v1/models lists the aliases"
    assert create.value.body["error"]["message"] == said.format("other")  # type: ignore[index]
    assert count.value.body["error"]["message"] == said.format("other")  # type: ignore[index]
    assert unknown.value.body["error"]["message"] == said.format("nonesuch")  # type: ignore[index]
    assert fake.requests == []
    # the operator's token uses every alias
    assert (await sdk(LEGACY).messages.count_tokens(model="other", messages=HI)).input_tokens


async def test_messages_count_the_upstreams_usage_toward_tokens_per_day(
    fake: FakeOpenAI, lean: Server, http: aiohttp.ClientSession, sdk: SDK
) -> None:
    client = sdk(GAMMA)  # tokens_per_day = 20; the fake's answer uses 13
    await client.messages.create(model="default", max_tokens=64, messages=HI)
    async with client.messages.stream(model="default", max_tokens=64, messages=HI) as stream:
        await stream.get_final_message()  # admitted below the limit: 26 of 20
    with pytest.raises(anthropic.RateLimitError) as refused:
        await client.messages.create(model="default", max_tokens=64, messages=HI)
    assert refused.value.body["error"]["message"] == (  # type: ignore[index]
        "client 'gamma' has used its 20 tokens of today (UTC)"
    )
    midnight = 86400 - time.time() % 86400
    assert abs(int(refused.value.response.headers["retry-after"]) - midnight) <= 5
    tokens = 'lean_client_tokens_total{client="gamma",kind="%s"}'
    assert await metric(http, lean, tokens % "prompt") == 16
    assert await metric(http, lean, tokens % "completion") == 10
    assert await metric(http, lean, 'lean_client_active_streams{client="gamma"}') == 0


async def test_a_held_messages_stream_takes_the_clients_only_slot(
    fake: FakeOpenAI, lean: Server, http: aiohttp.ClientSession, sdk: SDK
) -> None:
    fake.push(held())
    body = {"model": "default", "max_tokens": 64, "messages": HI, "stream": True}
    first = await http.post(f"{lean.url}/v1/messages", json=body, headers=ALPHA)
    assert first.status == 200
    await fake.wait_request(0)
    client = sdk(ALPHA)  # max_streams = 1
    with pytest.raises(anthropic.RateLimitError) as refused:
        await client.messages.create(model="default", max_tokens=64, messages=HI)
    assert refused.value.response.headers["retry-after"] == "1"
    first.close()  # the client leaves: lean closes the upstream and frees the slot
    await fake.wait_disconnect(0)
    await wait_metric(http, lean, 'lean_client_active_streams{client="alpha"}', 0)
    message = await client.messages.create(model="default", max_tokens=64, messages=HI)
    assert message.stop_reason == "end_turn"


# --- /v1/responses ---------------------------------------------------------------------------

OpenAI = Callable[[dict[str, str]], openai.AsyncOpenAI]


@pytest.fixture
async def openai_sdk(lean: Server) -> AsyncIterator[OpenAI]:
    """The openai SDK as a client: its token as the api key (sent as a bearer token)."""
    made: list[openai.AsyncOpenAI] = []

    def make(headers: dict[str, str]) -> openai.AsyncOpenAI:
        token = headers["Authorization"].removeprefix("Bearer ")
        made.append(
            openai.AsyncOpenAI(base_url=lean.url + "/v1", api_key=token, max_retries=0, timeout=10)
        )
        return made[-1]

    yield make
    for client in made:
        await client.close()


async def test_a_client_over_its_rate_gets_the_openai_sdks_rate_limit_error_on_responses(
    fake: FakeOpenAI, openai_sdk: OpenAI
) -> None:
    client = openai_sdk(BETA)  # requests_per_minute = 2
    for _ in range(3):  # refused before admission: none of the rate is spent on them
        with pytest.raises(openai.NotFoundError):
            await client.responses.create(
                model="default", input="Hi", previous_response_id="resp_unknown"
            )
    for _ in range(2):
        response = await client.responses.create(model="default", input="Hi")
        assert response.output_text == DEFAULT_TEXT
    with pytest.raises(openai.RateLimitError) as refused:
        await client.responses.create(model="default", input="Hi")
    assert refused.value.status_code == 429
    assert 28 <= int(refused.value.response.headers["retry-after"]) <= 30
    assert refused.value.body == {
        "message": "client 'beta' made its 2 requests per minute",
        "type": "rate_limit_error",
        "code": "rate_limited",
    }
    with pytest.raises(openai.RateLimitError):  # a stream is refused before it starts
        async with client.responses.stream(model="default", input="Hi") as stream:
            await stream.get_final_response()
    assert len(fake.requests) == 2  # no provider call for the refused ones


async def test_a_model_the_client_may_not_use_does_not_exist_on_responses(
    fake: FakeOpenAI, openai_sdk: OpenAI
) -> None:
    client = openai_sdk(BETA)  # models = default
    with pytest.raises(openai.NotFoundError) as create:
        await client.responses.create(model="other", input="Hi")
    with pytest.raises(openai.NotFoundError) as stream:
        await client.responses.create(model="other", input="Hi", stream=True)
    with pytest.raises(openai.NotFoundError) as unknown:
        await client.responses.create(model="nonesuch", input="Hi")
    said = "model '{}' does not exist; GET /v1/models lists the aliases"
    assert create.value.body["message"] == said.format("other")  # type: ignore[index]
    assert stream.value.body["message"] == said.format("other")  # type: ignore[index]
    assert unknown.value.body["message"] == said.format("nonesuch")  # type: ignore[index]
    assert create.value.code == unknown.value.code
    assert fake.requests == []
    # the operator's token uses every alias
    other = await openai_sdk(LEGACY).responses.create(model="other", input="Hi")
    assert other.output_text == DEFAULT_TEXT


async def test_responses_count_the_upstreams_usage_toward_tokens_per_day(
    fake: FakeOpenAI, lean: Server, http: aiohttp.ClientSession, openai_sdk: OpenAI
) -> None:
    client = openai_sdk(GAMMA)  # tokens_per_day = 20; the fake's answer uses 13
    await client.responses.create(model="default", input="Hi")
    async with client.responses.stream(model="default", input="Hi") as stream:
        await stream.get_final_response()  # admitted below the limit: 26 of 20
    with pytest.raises(openai.RateLimitError) as refused:
        await client.responses.create(model="default", input="Hi")
    assert refused.value.code == "quota_exceeded"
    assert refused.value.type == "insufficient_quota"
    midnight = 86400 - time.time() % 86400
    assert abs(int(refused.value.response.headers["retry-after"]) - midnight) <= 5
    tokens = 'lean_client_tokens_total{client="gamma",kind="%s"}'
    assert await metric(http, lean, tokens % "prompt") == 16
    assert await metric(http, lean, tokens % "completion") == 10
    assert await metric(http, lean, 'lean_client_active_streams{client="gamma"}') == 0


async def test_a_saved_response_is_its_clients_and_others_get_previous_response_not_found(
    fake: FakeOpenAI, openai_sdk: OpenAI
) -> None:
    fake.push(text_stream("One."), text_stream("Two."))
    alpha = openai_sdk(ALPHA)
    first = await alpha.responses.create(model="default", input="1?")
    for other in (openai_sdk(GAMMA), openai_sdk(LEGACY)):  # another client, the operator
        with pytest.raises(openai.NotFoundError) as caught:
            await other.responses.create(
                model="default", input="mine?", previous_response_id=first.id
            )
        assert caught.value.code == "previous_response_not_found"
        assert caught.value.param == "previous_response_id"
        said = f"Previous response with id '{first.id}' not found."
        assert caught.value.body["message"] == said  # type: ignore[index]
        with pytest.raises(openai.NotFoundError):  # streamed: the same 404 before any event
            async with other.responses.stream(
                model="default", input="mine?", previous_response_id=first.id
            ) as stream:
                await stream.get_final_response()
    assert len(fake.requests) == 1  # none of them reached the upstream
    async with alpha.responses.stream(
        model="default", input="2?", previous_response_id=first.id
    ) as stream:
        second = await stream.get_final_response()
    assert second.output_text == "Two."
    assert fake.requests[-1].body["messages"] == [
        {"role": "user", "content": "1?"},
        {"role": "assistant", "content": "One."},
        {"role": "user", "content": "2?"},
    ]
    # a chain alpha made is alpha's to its end
    with pytest.raises(openai.NotFoundError):
        await openai_sdk(GAMMA).responses.create(
            model="default", input="3?", previous_response_id=second.id
        )


# --- useChat's UI route and its resume route ---------------------------------------------------


async def test_the_ui_route_is_limited_and_its_chat_owned_by_its_client(
    fake: FakeOpenAI, lean: Server, http: aiohttp.ClientSession
) -> None:
    fake.push(held())
    ui = f"{lean.url}/v1/scenes/chat/ui"
    first = await http.post(ui, json=ui_body("hi", chat_id="chatOwn1"), headers=ALPHA)
    assert first.status == 200
    await fake.wait_request(0)
    # alpha's max_streams = 1: the UI route counts like the others
    async with http.post(ui, json=ui_body("hi", chat_id="chatOwn2"), headers=ALPHA) as resp:
        assert (resp.status, resp.headers["Retry-After"]) == (429, "1")
        assert (await resp.json())["error"]["code"] == "rate_limited"
    # the running chat is alpha's: resume finds it for alpha only
    resume = f"{lean.url}/v1/scenes/chat/ui/chatOwn1/stream"
    async with http.get(resume, headers=ALPHA) as resp:
        assert resp.status == 200  # replayed from its start (docs/protocol.md §6)
        replayed = parse((await resp.content.readuntil(b"\n\n")).decode())
        assert replayed[0]["messageMetadata"]["conversationId"] == "chatOwn1"
    async with http.get(resume, headers=BETA) as resp:
        assert resp.status == 204  # to beta nothing of that chat runs
    async with http.get(resume, headers=LEGACY) as resp:
        assert resp.status == 204
    # nor can another client continue it, or use a scene it may not
    async with http.post(ui, json=ui_body("mine?", chat_id="chatOwn1"), headers=BETA) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["message"] == "conversation 'chatOwn1' does not exist"
    costly = f"{lean.url}/v1/scenes/costly/ui"
    async with http.post(costly, json=ui_body("hi", chat_id="chatB1"), headers=BETA) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["message"] == "scene 'costly' does not exist"
    async with http.get(f"{lean.url}/v1/scenes/costly/ui/chatB1/stream", headers=BETA) as resp:
        assert resp.status == 404
    assert len(fake.requests) == 1
    first.close()
    await fake.wait_disconnect(0)
    await wait_metric(http, lean, 'lean_client_active_streams{client="alpha"}', 0)
    # once it ended its own client goes on with it
    async with asyncio.timeout(5):
        while True:
            async with http.get(resume, headers=ALPHA) as resp:
                if resp.status == 204:
                    break
            await asyncio.sleep(0.02)
    async with http.post(ui, json=ui_body("again", chat_id="chatOwn1"), headers=ALPHA) as resp:
        assert resp.status == 200
        parts = parse(await resp.text())
    assert parts[0]["messageMetadata"]["conversationId"] == "chatOwn1"
    assert parts[-1] == "[DONE]"
