"""OpenAI Responses in (lean.dialects.responses): the official `openai` SDK's own request
bodies, captured on a real socket, translated to lean's chat body, and sent on by each
provider adapter; every refusal a 400 naming its field, in OpenAI's error shape."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import openai
import pytest

from lean.config import ModelConfig, ProviderConfig
from lean.dialects.estimate import estimate_tokens
from lean.dialects.responses import CUSTOM_PARAMETERS, parse_request
from lean.errors import BadRequest, NotFound, openai_error_body
from lean.providers import anthropic, gemini
from lean.providers import openai as openai_provider
from tests.capture import Capture, capturing

pytestmark = pytest.mark.timeout(20)

WEATHER: Any = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}
WEATHER_CHAT = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": WEATHER["parameters"],
        "description": "Weather in a city",
        "strict": True,
    },
}
DATA_URL = "data:image/png;base64,iVBORw0KGgo="
# A second turn the way Codex CLI sends it: the whole conversation again, reasoning included.
TOOL_TURNS: Any = [
    {"type": "message", "role": "developer", "content": "You run in a sandbox."},
    {
        "type": "message",
        "role": "user",
        "content": [
            {"type": "input_text", "text": "Weather in Paris? See:"},
            {"type": "input_image", "image_url": DATA_URL, "detail": "low"},
        ],
    },
    {
        "type": "reasoning",
        "id": "rs_1",
        "summary": [{"type": "summary_text", "text": "Call the tool."}],
        "encrypted_content": "gAAAA",
    },
    {
        "type": "message",
        "role": "assistant",
        "id": "msg_1",
        "status": "completed",
        "content": [{"type": "output_text", "text": "Let me look.", "annotations": []}],
    },
    {
        "type": "function_call",
        "id": "fc_1",
        "call_id": "call_1",
        "name": "get_weather",
        "arguments": '{"city":"Paris"}',
    },
    {
        "type": "function_call",
        "call_id": "call_2",
        "name": "get_weather",
        "arguments": '{"city":"Nice"}',
    },
    {"type": "function_call_output", "call_id": "call_1", "output": "18C"},
    {
        "type": "function_call_output",
        "call_id": "call_2",
        "output": [{"type": "input_text", "text": "21C"}, {"type": "input_text", "text": "sunny"}],
    },
    {"role": "user", "content": "And tomorrow?"},
]


def sdk(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=10)


async def captured(call: Callable[[openai.AsyncOpenAI], Awaitable[Any]]) -> Capture:
    """What the SDK sends for `call`; the server answers 400, so the SDK raises after it."""
    async with capturing(400, openai_error_body(BadRequest("captured"))) as capture:
        async with sdk(capture.url) as client:
            with pytest.raises(openai.BadRequestError):
                await call(client)
    return capture


def provider(kind: str) -> ProviderConfig:
    return ProviderConfig(name=kind, kind=kind, base_url="http://127.0.0.1:9/v1")  # type: ignore[arg-type]


MODEL = ModelConfig(alias="gpt", provider="p", upstream_model="gpt-upstream")


async def test_sdk_simple_request() -> None:
    sent = (
        await captured(
            lambda c: c.responses.create(
                model="gpt",
                input="Hi",
                instructions="Be terse.",
                max_output_tokens=50,
                reasoning={"effort": "low", "summary": "auto"},
                store=False,
                temperature=0.2,
                top_p=0.9,
                tools=[WEATHER],
                tool_choice={"type": "function", "name": "get_weather"},
                parallel_tool_calls=False,
                text={"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}}},
                safety_identifier="u-1",  # OpenAI's own: not sent on
                prompt_cache_key="conv-1",
            )
        )
    ).last
    assert sent.path == "/v1/responses"
    request = parse_request(sent.raw)
    assert (request.model, request.stream, request.store) == ("gpt", False, False)
    assert request.previous_response_id is None and request.untranslated == []
    assert request.body == {
        "model": "gpt",
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "Hi"},
        ],
        "tools": [WEATHER_CHAT],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "max_tokens": 50,
        "reasoning_effort": "low",
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "w", "schema": {"type": "object"}},
        },
        "temperature": 0.2,
        "top_p": 0.9,
        "parallel_tool_calls": False,
    }


async def test_sdk_two_turn_tool_conversation() -> None:
    async def stream(c: openai.AsyncOpenAI) -> None:
        async with c.responses.stream(
            model="gpt", input=TOOL_TURNS, tools=[WEATHER], previous_response_id="resp_123"
        ) as events:
            await events.get_final_response()

    sent = (await captured(stream)).last
    assert sent.body["stream"] is True
    request = parse_request(sent.raw)
    assert request.stream is True and request.store is True
    assert request.previous_response_id == "resp_123"  # the route continues from it
    assert request.body["messages"] == [
        {"role": "system", "content": "You run in a sandbox."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Weather in Paris? See:"},
                {"type": "image_url", "image_url": {"url": DATA_URL, "detail": "low"}},
            ],
        },
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                },
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Nice"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "21C\nsunny"},
        {"role": "user", "content": "And tomorrow?"},
    ]
    body = request.body
    upstream = json.loads(
        openai_provider.build_request(provider("openai"), MODEL, body, stream=True).body
    )
    assert upstream["messages"] == body["messages"] and upstream["model"] == "gpt-upstream"
    upstream = json.loads(
        anthropic.build_request(provider("anthropic"), MODEL, body, stream=True).body
    )
    assert upstream["system"] == "You run in a sandbox."
    assert [m["role"] for m in upstream["messages"]] == ["user", "assistant", "user"]
    assert upstream["messages"][1]["content"][1] == {
        "type": "tool_use",
        "id": "call_1",
        "name": "get_weather",
        "input": {"city": "Paris"},
    }
    upstream = json.loads(gemini.build_request(provider("gemini"), MODEL, body, stream=True).body)
    assert upstream["contents"][2]["parts"][0]["functionResponse"]["name"] == "get_weather"
    assert estimate_tokens(body) > 1600  # the image alone counts 1,600


async def test_custom_and_hosted_tools() -> None:
    sent = (
        await captured(
            lambda c: c.responses.create(
                model="gpt",
                input=[
                    {"role": "user", "content": "patch it"},
                    {
                        "type": "custom_tool_call",
                        "call_id": "c1",
                        "name": "apply_patch",
                        "input": "*** Begin",
                    },
                    {"type": "custom_tool_call_output", "call_id": "c1", "output": "done"},
                ],
                tools=[
                    {"type": "custom", "name": "apply_patch", "description": "Edit files"},
                    {"type": "web_search"},
                    WEATHER,
                ],
                tool_choice="required",
            )
        )
    ).last
    request = parse_request(sent.raw)
    assert request.custom_tools == frozenset({"apply_patch"})
    assert request.untranslated == ["$.tools[1]"]
    assert request.body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "apply_patch",
                "parameters": CUSTOM_PARAMETERS,
                "description": "Edit files",
            },
        },
        WEATHER_CHAT,
    ]
    assert request.body["tool_choice"] == "required"
    assert request.body["messages"][1:] == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "apply_patch", "arguments": '{"input":"*** Begin"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "done"},
    ]


def request_with(**fields: Any) -> bytes:
    body: dict[str, Any] = {"model": "gpt", "input": "Hi"}
    body.update(fields)
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    ("fields", "said"),
    [
        ({"input": None}, "`$.input`"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "lean keeps no items"),
        ({"input": [{"type": "web_search_call", "id": "ws_1"}]}, "`$.input[0].type`"),
        (
            {"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]},
            "`call_id` - at `$.input[0]`",
        ),
        ({"input": [{"role": "tool", "content": "x"}]}, "`$.input[0].role`"),
        (
            {"input": ["Hi", {"role": "user", "content": [{"type": "input_audio"}]}]},
            "`$.input[0]`",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_audio"}]}]},
            "`$.input[0].content[0].type`",
        ),
        (
            {
                "input": [
                    {"role": "user", "content": [{"type": "input_image", "file_id": "file_1"}]}
                ]
            },
            "lean keeps no files: send the image as `image_url` - at `$.input[0].content[0]`",
        ),
        (
            {
                "input": [
                    {
                        "type": "function_call_output",
                        "call_id": "c",
                        "output": [{"type": "input_image"}],
                    }
                ]
            },
            "`$.input[0].output[0].type`",
        ),
        ({"tools": [{"type": "function"}]}, "`name` - at `$.tools[0]`"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "`$.tool_choice`"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function"}}, "`$.tool_choice`"),
        ({"max_output_tokens": 0}, "`$.max_output_tokens`"),
        ({"previous_response_id": "has space"}, "`$.previous_response_id`"),
        ({"background": True}, "`$.background`"),
        ({"conversation": "conv_1"}, "`$.conversation`"),
        ({"text": {"format": {"type": "grammar"}}}, "`$.text.format.type`"),
    ],
)
def test_a_bad_request_names_the_field(fields: dict[str, Any], said: str) -> None:
    with pytest.raises(BadRequest) as raised:
        parse_request(request_with(**fields))
    assert said in raised.value.message
    body = json.loads(openai_error_body(raised.value))
    assert body["error"]["type"] == "invalid_request_error" and said in body["error"]["message"]


def test_deep_nesting_is_a_400() -> None:
    with pytest.raises(BadRequest, match="nested too deeply"):
        parse_request(b'{"model":"gpt","input":"Hi","client_metadata":' + b"[" * 100_000)


def test_messages_of_each_role_and_part() -> None:
    body = parse_request(
        request_with(
            input=[
                {"role": "system", "content": [{"type": "input_text", "text": "S"}]},
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "input_file",
                            "file_data": "data:application/pdf;base64,JVBE",
                            "filename": "a.pdf",
                        }
                    ],
                },
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "refusal", "refusal": "I can't."}],
                },
                {"type": "reasoning", "id": "rs_1", "summary": []},
            ]
        )
    ).body
    assert body["messages"] == [
        {"role": "system", "content": "S"},
        {
            "role": "user",
            "content": [
                {
                    "type": "file",
                    "file": {"file_data": "data:application/pdf;base64,JVBE", "filename": "a.pdf"},
                }
            ],
        },
        {"role": "assistant", "content": "", "refusal": "I can't."},
    ]
    body = parse_request(
        request_with(
            tools=[WEATHER], tool_choice={"type": "allowed_tools", "mode": "auto", "tools": []}
        )
    )
    assert body.body["tool_choice"] == "auto" and body.untranslated == ["$.tool_choice.tools"]
    # no tools: no tool_choice nor parallel_tool_calls (an upstream refuses them alone)
    alone = parse_request(request_with(tool_choice="none", parallel_tool_calls=True)).body
    assert "tool_choice" not in alone and "parallel_tool_calls" not in alone


async def test_an_unknown_previous_response_is_the_sdks_not_found() -> None:
    error = NotFound("previous response 'resp_x' not found")
    async with capturing(404, openai_error_body(error)) as capture:
        async with sdk(capture.url) as client:
            with pytest.raises(openai.NotFoundError) as caught:
                await client.responses.create(
                    model="gpt", input="Hi", previous_response_id="resp_x"
                )
    assert caught.value.status_code == 404
    assert "resp_x" in caught.value.message
