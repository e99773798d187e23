"""Anthropic Messages in (lean.dialects.anthropic): the official `anthropic` SDK's own request
bodies, captured on a real socket, translated to lean's chat body; the request as sent on to
an Anthropic upstream (nothing lost) and to the other kinds; error bodies the SDK raises its
own typed exceptions for; the model list as the SDK reads it."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import anthropic
import msgspec
import pytest

from lean.config import ModelConfig, ProviderConfig
from lean.dialects.anthropic import (
    error_body,
    error_event,
    error_status,
    models_body,
    parse_request,
)
from lean.dialects.estimate import estimate_tokens
from lean.errors import (
    BadRequest,
    Cancelled,
    Forbidden,
    Internal,
    LeanError,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    RateLimited,
    ShuttingDown,
    Unauthorized,
    UpstreamError,
    UpstreamTimeout,
)
from lean.providers import anthropic as anthropic_provider
from lean.providers import gemini, openai
from lean.providers.base import NATIVE
from tests.capture import Capture, capturing

pytestmark = pytest.mark.timeout(20)

PNG = (  # a 1x1 PNG
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
WEATHER = {
    "name": "get_weather",
    "description": "Weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
    "cache_control": {"type": "ephemeral"},
}
SYSTEM: list[Any] = [
    {"type": "text", "text": "You are terse."},
    {"type": "text", "text": "Answer in French.", "cache_control": {"type": "ephemeral"}},
]
# A two-turn tool conversation with extended thinking, as Claude Code sends it back.
TOOL_TURNS: list[Any] = [
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "Weather in Paris? See:"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}},
        ],
    },
    {
        "role": "assistant",
        "content": [
            {
                "type": "thinking",
                "thinking": "I should call the tool.",
                "signature": "c2lnbmF0dXJl",
            },
            {"type": "redacted_thinking", "data": "ZW5jcnlwdGVk"},
            {"type": "text", "text": "Let me look."},
            {
                "type": "tool_use",
                "id": "toolu_01",
                "name": "get_weather",
                "input": {"city": "Paris"},
            },
        ],
    },
    {
        "role": "user",
        "content": [
            {
                "type": "tool_result",
                "tool_use_id": "toolu_01",
                "content": [{"type": "text", "text": "18C"}, {"type": "text", "text": "sunny"}],
                "cache_control": {"type": "ephemeral"},
            },
            {"type": "text", "text": "And tomorrow?"},
        ],
    },
]


def sdk(url: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=url, api_key="sk-ant-test", max_retries=0, timeout=10)


async def captured(call: Callable[[anthropic.AsyncAnthropic], Awaitable[Any]]) -> Capture:
    """What the SDK sends for `call`; the server answers 400, so the SDK raises after it."""
    async with capturing(400, error_body(BadRequest("captured"))) as capture:
        async with sdk(capture.url) as client:
            with pytest.raises(anthropic.BadRequestError):
                await call(client)
    return capture


def provider(kind: str, **extra: Any) -> ProviderConfig:
    return ProviderConfig(name=kind, kind=kind, base_url="http://127.0.0.1:9/v1", **extra)  # type: ignore[arg-type]


MODEL = ModelConfig(alias="claude", provider="p", upstream_model="claude-upstream")


# --- the SDK's request shapes -------------------------------------------------------------


async def test_sdk_tool_turns_with_thinking_become_a_chat_body() -> None:
    capture = await captured(
        lambda c: c.messages.create(
            model="claude",
            max_tokens=2048,
            system=SYSTEM,
            messages=TOOL_TURNS,
            tools=[WEATHER],
            tool_choice={"type": "any", "disable_parallel_tool_use": True},
            thinking={"type": "enabled", "budget_tokens": 1024},
            metadata={"user_id": "u-42"},
            stop_sequences=["END"],
            # sampling parameters are no longer arguments of the SDK: sent as extra fields
            extra_body={"top_p": 0.9, "top_k": 40, "context_management": {"edits": []}},
        )
    )
    sent = capture.last
    assert sent.path == "/v1/messages"
    request = parse_request(sent.raw, version=sent.headers["anthropic-version"])
    assert request.model == "claude" and request.stream is False
    assert request.untranslated == []
    body = {k: v for k, v in request.body.items() if k != NATIVE}
    assert body == {
        "model": "claude",
        "max_tokens": 2048,
        "messages": [
            {"role": "system", "content": "You are terse.\n\nAnswer in French."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Weather in Paris? See:"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                ],
            },
            {
                "role": "assistant",
                "content": "Let me look.",
                "tool_calls": [
                    {
                        "id": "toolu_01",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "toolu_01", "content": "18C\nsunny"},
            {"role": "user", "content": "And tomorrow?"},
        ],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "parameters": WEATHER["input_schema"],
                    "description": "Weather in a city",
                },
            }
        ],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "stop": ["END"],
        "top_p": 0.9,
    }


async def test_an_anthropic_upstream_gets_the_request_unchanged() -> None:
    """cache_control, thinking signatures, redacted_thinking, top_k, thinking, metadata and
    a field lean does not know: all reach an Anthropic upstream as the client sent them."""
    capture = await captured(
        lambda c: c.messages.create(
            model="claude",
            max_tokens=2048,
            system=SYSTEM,
            messages=TOOL_TURNS,
            tools=[WEATHER, {"type": "web_search_20250305", "name": "web_search"}],
            thinking={"type": "enabled", "budget_tokens": 1024},
            metadata={"user_id": "u-42"},
            cache_control={"type": "ephemeral"},
            extra_body={"top_k": 40, "context_management": {"edits": []}},
            extra_headers={"anthropic-beta": "context-management-2025-06-27"},
        )
    )
    sent = capture.last
    request = parse_request(
        sent.raw, version=sent.headers["anthropic-version"], beta=sent.headers["anthropic-beta"]
    )
    assert request.untranslated == ["$.tools[1]"]  # a server tool: only Anthropic runs it
    temperature = ModelConfig(
        alias="claude", provider="p", upstream_model="claude-upstream", temperature=0.5
    )
    for stream in (False, True):
        http = anthropic_provider.build_request(
            provider("anthropic"), temperature, request.body, stream=stream
        )
        upstream = json.loads(http.body)
        expected = dict(sent.body, model="claude-upstream")
        if stream:
            expected["stream"] = True
        assert upstream == expected  # no temperature added: Anthropic refuses it with thinking
        assert http.headers["anthropic-version"] == sent.headers["anthropic-version"]
        assert http.headers["anthropic-beta"] == "context-management-2025-06-27"
        assert http.url == "http://127.0.0.1:9/v1/messages"


async def test_sdk_stream_and_count_tokens_bodies() -> None:
    async def stream(c: anthropic.AsyncAnthropic) -> None:
        async with c.messages.stream(
            model="claude", max_tokens=64, messages=[{"role": "user", "content": "Hi"}]
        ) as s:
            await s.get_final_message()

    sent = (await captured(stream)).last
    assert sent.body["stream"] is True
    request = parse_request(sent.raw)
    assert request.stream is True
    assert "stream" not in request.body and "stream" not in request.body[NATIVE].body
    assert request.body["messages"] == [{"role": "user", "content": "Hi"}]

    counted = (
        await captured(
            lambda c: c.messages.count_tokens(
                model="claude", system=SYSTEM, messages=TOOL_TURNS, tools=[WEATHER]
            )
        )
    ).last
    assert counted.path == "/v1/messages/count_tokens"
    assert "max_tokens" not in counted.body
    with pytest.raises(BadRequest, match="`max_tokens`"):
        parse_request(counted.raw)  # a Messages request must say it
    counting = parse_request(
        counted.raw, version=counted.headers["anthropic-version"], counting=True
    )
    assert "max_tokens" not in counting.body
    # An Anthropic upstream counts with its own count_tokens, on the body as the client sent it.
    http = anthropic_provider.build_count_request(
        provider("anthropic"), MODEL, counting.body[NATIVE]
    )
    assert http.url == "http://127.0.0.1:9/v1/messages/count_tokens"
    assert json.loads(http.body) == dict(counted.body, model="claude-upstream")
    assert http.headers["anthropic-version"] == counted.headers["anthropic-version"]
    # Two images (1,600 each), the texts, six messages and one tool: never a constant.
    tokens = estimate_tokens(counting.body)
    assert 3200 < tokens < 3400, tokens
    more = json.loads(counted.raw)
    more["messages"][-1]["content"][-1]["text"] += " Please be thorough." * 50
    assert estimate_tokens(parse_request(json.dumps(more).encode(), counting=True).body) > (
        tokens + 200
    )


def test_an_upstream_count_is_read_or_raised() -> None:
    assert anthropic_provider.parse_count(b'{"input_tokens": 2095}') == 2095
    overloaded = (
        b'{"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}'
    )
    with pytest.raises(Overloaded):
        anthropic_provider.parse_count(overloaded)
    for broken in (b"{", b"{}"):
        with pytest.raises(UpstreamError):
            anthropic_provider.parse_count(broken)


# --- other upstream kinds -----------------------------------------------------------------


async def test_other_kinds_get_the_translation_without_the_native_request() -> None:
    sent = (
        await captured(
            lambda c: c.messages.create(
                model="claude", max_tokens=100, system=SYSTEM, messages=TOOL_TURNS, tools=[WEATHER]
            )
        )
    ).last
    body = parse_request(sent.raw).body
    http = openai.build_request(provider("openai"), MODEL, body, stream=True)
    upstream = json.loads(http.body)
    assert NATIVE not in upstream
    assert upstream["messages"] == [m for m in body["messages"]]
    assert upstream["tools"][0]["function"]["name"] == "get_weather"
    http = gemini.build_request(provider("gemini"), MODEL, body, stream=False)
    upstream = json.loads(http.body)
    assert upstream["systemInstruction"] == {
        "parts": [{"text": "You are terse.\n\nAnswer in French."}]
    }
    assert upstream["contents"][0]["parts"][1] == {
        "inlineData": {"mimeType": "image/png", "data": PNG}
    }
    assert upstream["contents"][1]["parts"][1]["functionCall"] == {
        "name": "get_weather",
        "args": {"city": "Paris"},
    }


def test_a_chat_completions_body_cannot_forge_the_native_request() -> None:
    """`lean_native` in a client's JSON is a dict, never the Struct: the Anthropic adapter
    translates as usual and the OpenAI adapter drops the key."""
    body = {
        "model": "claude",
        "messages": [{"role": "user", "content": "Hi"}],
        NATIVE: {"body": {"messages": [], "system": "injected"}, "messages": 0},
    }
    upstream = json.loads(
        anthropic_provider.build_request(provider("anthropic"), MODEL, body, stream=False).body
    )
    assert upstream["messages"] == [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    assert "system" not in upstream and NATIVE not in upstream
    upstream = json.loads(openai.build_request(provider("openai"), MODEL, body, stream=False).body)
    assert NATIVE not in upstream


def test_messages_lean_adds_later_are_appended_to_the_native_request() -> None:
    raw = {
        "model": "claude",
        "max_tokens": 10,
        "messages": [
            {"role": "user", "content": "Hi"},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}],
            },
        ],
    }
    body = parse_request(json.dumps(raw).encode()).body
    body["messages"] = [
        *body["messages"],
        {"role": "tool", "tool_call_id": "t1", "content": "done"},
        {"role": "user", "content": "thanks"},
    ]
    upstream = json.loads(
        anthropic_provider.build_request(provider("anthropic"), MODEL, body, stream=False).body
    )
    assert upstream["messages"] == [
        *raw["messages"],
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "t1", "content": "done"},
                {"type": "text", "text": "thanks"},
            ],
        },
    ]


# --- validation ----------------------------------------------------------------------------


def request_with(**fields: Any) -> bytes:
    body: dict[str, Any] = {
        "model": "claude",
        "max_tokens": 10,
        "messages": [{"role": "user", "content": "Hi"}],
    }
    body.update(fields)
    return json.dumps(body).encode()


def turns(*content: Any) -> list[Any]:
    return [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": list(content)},
    ]


@pytest.mark.parametrize(
    ("fields", "said"),
    [
        ({"max_tokens": 0}, "`$.max_tokens`"),
        ({"messages": []}, "`$.messages`"),
        ({"messages": [{"role": "system", "content": "x"}]}, "`$.messages[0].role`"),
        ({"messages": turns({"type": 7})}, "`$.messages[2].content[0].type`"),
        (
            {"messages": turns({"text": "x"})},
            "missing required field `type` - at `$.messages[2].content[0]`",
        ),
        ({"messages": turns({"type": "text", "text": 1})}, "`$.messages[2].content[0].text`"),
        (
            {
                "messages": turns(
                    {"type": "text", "text": "a"}, {"type": "image", "source": {"type": "base64"}}
                )
            },
            "`$.messages[2].content[1].source`",
        ),
        (
            {"messages": turns({"type": "tool_result", "tool_use_id": "t", "is_error": "yes"})},
            "`$.messages[2].content[0].is_error`",
        ),
        (
            {"messages": turns({"type": "tool_use", "id": "t", "name": "f", "input": {}})},
            "belongs in an assistant message - at `$.messages[2].content[0].type`",
        ),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "content": [{"type": "tool_use", "id": "t", "name": "f", "input": []}],
                    }
                ]
            },
            "`$.messages[0].content[0].input`",
        ),
        ({"system": [{"type": "image"}]}, "`$.system[0].type`"),
        ({"temperature": 1.5}, "`$.temperature`"),
        ({"stop_sequences": "END"}, "`$.stop_sequences`"),
        ({"tools": [{"name": "f"}]}, "`input_schema` - at `$.tools[0]`"),
        ({"tools": [WEATHER], "tool_choice": {"type": "tool"}}, "`$.tool_choice`"),
        ({"tool_choice": {"type": "sometimes"}}, "`$.tool_choice.type`"),
        ({"thinking": {"type": "enabled", "budget_tokens": 0}}, "`$.thinking.budget_tokens`"),
        ({"metadata": {"user_id": 5}}, "`$.metadata.user_id`"),
    ],
)
def test_a_bad_request_names_the_field(fields: dict[str, Any], said: str) -> None:
    with pytest.raises(BadRequest) as raised:
        parse_request(request_with(**fields))
    assert said in raised.value.message
    assert raised.value.status == 400


def test_missing_max_tokens_deep_nesting_and_not_json_are_400s() -> None:
    body = json.dumps({"model": "claude", "messages": [{"role": "user", "content": "Hi"}]})
    with pytest.raises(BadRequest, match="missing required field `max_tokens`"):
        parse_request(body.encode())
    with pytest.raises(BadRequest, match="nested too deeply"):
        parse_request(b'{"messages":' + b"[" * 100_000)
    with pytest.raises(BadRequest, match="not valid JSON"):
        parse_request(b"{")


def test_blocks_lean_cannot_translate_are_listed_for_the_route() -> None:
    document = {
        "type": "document",
        "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"},
    }
    file_image = {"type": "image", "source": {"type": "file", "file_id": "file_1"}}
    request = parse_request(
        request_with(
            messages=turns({"type": "text", "text": "read"}, document, file_image),
            tools=[WEATHER, {"type": "bash_20250124", "name": "bash"}],
        )
    )
    assert request.untranslated == [
        "$.messages[2].content[1]",
        "$.messages[2].content[2]",
        "$.tools[1]",
    ]
    assert request.body["messages"][-1] == {"role": "user", "content": "read"}
    native = request.body[NATIVE].body
    assert native["messages"][2]["content"][1] == document  # an Anthropic upstream reads it


def test_tool_choices_and_is_error() -> None:
    for given, expected in [
        ({"type": "auto"}, "auto"),
        ({"type": "any"}, "required"),
        ({"type": "none"}, "none"),
        (
            {"type": "tool", "name": "get_weather"},
            {"type": "function", "function": {"name": "get_weather"}},
        ),
    ]:
        body = parse_request(request_with(tools=[WEATHER], tool_choice=given)).body
        assert body["tool_choice"] == expected
        assert "parallel_tool_calls" not in body
    body = parse_request(
        request_with(
            messages=[
                {
                    "role": "assistant",
                    "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}],
                },
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "t",
                            "content": "boom",
                            "is_error": True,
                        },
                        {
                            "type": "tool_result",
                            "tool_use_id": "u",
                            "content": [
                                {
                                    "type": "image",
                                    "source": {"type": "url", "url": "https://e.x/p.png"},
                                }
                            ],
                        },
                    ],
                },
            ]
        )
    ).body
    assert body["messages"][1:] == [
        {"role": "tool", "tool_call_id": "t", "content": "boom"},
        {"role": "tool", "tool_call_id": "u", "content": ""},
        # a tool message holds text only: a result's image follows in a user turn
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "https://e.x/p.png"}}],
        },
    ]
    assert body[NATIVE].body["messages"][1]["content"][0]["is_error"] is True


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "status", "kind", "raised"),
    [
        (BadRequest("bad"), 400, "invalid_request_error", anthropic.BadRequestError),
        (Unauthorized("who"), 401, "authentication_error", anthropic.AuthenticationError),
        (Forbidden("no"), 403, "permission_error", anthropic.PermissionDeniedError),
        (NotFound("where"), 404, "not_found_error", anthropic.NotFoundError),
        (PayloadTooLarge("big"), 413, "request_too_large", anthropic.RequestTooLargeError),
        (RateLimited("slow", retry_after=3), 429, "rate_limit_error", anthropic.RateLimitError),
        (Overloaded("full", retry_after=1), 529, "overloaded_error", anthropic.OverloadedError),
        (ShuttingDown("bye"), 529, "overloaded_error", anthropic.OverloadedError),
        (Internal("oops"), 500, "api_error", anthropic.InternalServerError),
        (UpstreamError("upstream"), 502, "api_error", anthropic.InternalServerError),
        (UpstreamTimeout("late"), 504, "timeout_error", anthropic.InternalServerError),
        (Cancelled("gone"), 499, "invalid_request_error", anthropic.APIStatusError),
    ],
)
async def test_the_sdk_raises_its_own_error_for_each(
    error: LeanError, status: int, kind: str, raised: type[Exception]
) -> None:
    assert error_status(error) == status
    body = error_body(error)
    assert json.loads(body) == {"type": "error", "error": {"type": kind, "message": error.message}}
    async with capturing(status, body) as capture:
        capture.headers = error.headers()
        async with sdk(capture.url) as client:
            with pytest.raises(raised) as caught:
                await client.messages.create(
                    model="claude", max_tokens=5, messages=[{"role": "user", "content": "Hi"}]
                )
    assert isinstance(caught.value, anthropic.APIStatusError)
    assert caught.value.status_code == status
    assert caught.value.body == {"type": "error", "error": {"type": kind, "message": error.message}}


def test_the_error_event_of_a_started_stream() -> None:
    event = error_event(Overloaded("full"))
    assert event.startswith(b"event: error\ndata: ") and event.endswith(b"\n\n")
    assert json.loads(event.split(b"data: ", 1)[1]) == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "full"},
    }


# --- the model list ------------------------------------------------------------------------


async def test_the_sdk_reads_the_model_list() -> None:
    body = models_body(["claude", "gpt", "gemini"], created=1_700_000_000)
    assert msgspec.json.decode(body) == {
        "data": [
            {
                "type": "model",
                "id": alias,
                "display_name": alias,
                "created_at": "2023-11-14T22:13:20Z",
            }
            for alias in ("claude", "gpt", "gemini")
        ],
        "has_more": False,
        "first_id": "claude",
        "last_id": "gemini",
    }
    async with capturing(200, body) as capture:
        async with sdk(capture.url) as client:
            page = await client.models.list()
    assert [model.id for model in page.data] == ["claude", "gpt", "gemini"]
    assert page.data[0].created_at.year == 2023
    assert capture.last.path == "/v1/models"
    assert capture.last.headers["anthropic-version"]  # what the route tells dialects apart by
    empty = msgspec.json.decode(models_body([]))
    assert empty == {"data": [], "has_more": False, "first_id": None, "last_id": None}
