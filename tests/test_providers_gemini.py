"""The Gemini adapter: request translation, and recorded streamGenerateContent?alt=sse
streams fed through lean's SSE parser whole, split at every byte offset, and one byte at
a time."""

# Recorded events stay one line each, byte for byte as the provider sends them.
# ruff: noqa: E501

from __future__ import annotations

import json
from typing import Any

import pytest

from lean.errors import LeanError, Overloaded, RateLimited, UpstreamError, UpstreamTimeout
from lean.providers import adapter, gemini
from lean.providers.base import (
    Finish,
    Piece,
    Reasoning,
    Signature,
    Text,
    ToolCall,
    Usage,
)
from lean.providers.gemini import (
    REPLAY_SIGNATURE,
    StreamTranslator,
    build_request,
    parse_completion,
)
from lean.sse import SSEParser
from tests.support import SECRET, lean_config

NONCE = "n0"


def translate(wire: bytes, *, split: int | None = None) -> list[Piece]:
    parser, translator = SSEParser(), StreamTranslator(nonce=NONCE)
    pieces: list[Piece] = []
    step = split or len(wire) or 1
    for start in range(0, len(wire), step):
        for message in parser.feed(wire[start : start + step]):
            pieces.extend(translator.feed(message))
    parser.close()
    translator.close()
    return pieces


def translate_cut_at(wire: bytes, cut: int) -> list[Piece]:
    parser, translator = SSEParser(), StreamTranslator(nonce=NONCE)
    pieces: list[Piece] = []
    for part in (wire[:cut], wire[cut:]):
        for message in parser.feed(part):
            pieces.extend(translator.feed(message))
    translator.close()
    return pieces


# As Google's servers send them: one compact-ish JSON object per event, CRLF line ends,
# usageMetadata on every chunk (cumulative), no end marker after the finishReason chunk.
TEXT_STREAM = (
    b'data: {"candidates": [{"content": {"parts": [{"text": "The"}],"role": "model"},"index": 0}],'
    b'"usageMetadata": {"promptTokenCount": 8,"candidatesTokenCount": 1,"totalTokenCount": 9},'
    b'"modelVersion": "gemini-2.5-flash","responseId": "r1"}\r\n\r\n'
    b'data: {"candidates": [{"content": {"parts": [{"text": " opposite of hot is cold \xe2\x80\x94 fr\xc3\xa8s froid."}],"role": "model"},"index": 0}],'
    b'"usageMetadata": {"promptTokenCount": 8,"candidatesTokenCount": 9,"totalTokenCount": 17},'
    b'"modelVersion": "gemini-2.5-flash","responseId": "r1"}\r\n\r\n'
    b'data: {"candidates": [{"content": {"parts": [{"text": ""}],"role": "model"},"finishReason": "STOP","index": 0}],'
    b'"usageMetadata": {"promptTokenCount": 8,"candidatesTokenCount": 10,"totalTokenCount": 18},'
    b'"modelVersion": "gemini-2.5-flash","responseId": "r1"}\r\n\r\n'
)

THOUGHT_STREAM = (
    b'data: {"candidates": [{"content": {"parts": [{"text": "**Weighing options**\\n\\nThe user wants", "thought": true}],"role": "model"},"index": 0}],'
    b'"usageMetadata": {"promptTokenCount": 12,"totalTokenCount": 40,"thoughtsTokenCount": 28},'
    b'"modelVersion": "gemini-2.5-pro"}\r\n\r\n'
    b'data: {"candidates": [{"content": {"parts": [{"text": "Cold.", "thoughtSignature": "CiIBVKhc7ok3s0WxQSUaKQ=="}],"role": "model"},"finishReason": "STOP","index": 0}],'
    b'"usageMetadata": {"promptTokenCount": 12,"candidatesTokenCount": 2,"totalTokenCount": 42,"thoughtsTokenCount": 28},'
    b'"modelVersion": "gemini-2.5-pro"}\r\n\r\n'
)

TOOL_STREAM = (
    b'data: {"candidates": [{"content": {"parts": [{"text": "Checking."}],"role": "model"},"index": 0}],'
    b'"usageMetadata": {"promptTokenCount": 30,"candidatesTokenCount": 2,"totalTokenCount": 32},'
    b'"modelVersion": "gemini-3-pro-preview"}\r\n\r\n'
    b'data: {"candidates": [{"content": {"parts": [{"functionCall": {"name": "get_weather","args": {"city": "Paris","units": ["c"]}},'
    b'"thoughtSignature": "EpoFCpcFAdHtim9"},{"functionCall": {"name": "clock","args": {}}}],"role": "model"},'
    b'"finishReason": "STOP","index": 0}],'
    b'"usageMetadata": {"promptTokenCount": 30,"candidatesTokenCount": 20,"totalTokenCount": 50},'
    b'"modelVersion": "gemini-3-pro-preview"}\r\n\r\n'
)

STREAMS = {"text": TEXT_STREAM, "thought": THOUGHT_STREAM, "tool": TOOL_STREAM}


def test_text_stream() -> None:
    assert translate(TEXT_STREAM) == [
        Text("The"),
        Text(" opposite of hot is cold — frès froid."),
        Finish("stop"),
        Usage(8, 10),
    ]


def test_thought_parts_are_reasoning_and_signatures_stay_opaque() -> None:
    pieces = translate(THOUGHT_STREAM)
    assert pieces == [
        Reasoning("**Weighing options**\n\nThe user wants"),
        Text("Cold."),
        Signature("CiIBVKhc7ok3s0WxQSUaKQ==", "gemini"),
        Finish("stop"),
        Usage(12, 30),  # completion = candidates + thoughts
    ]
    shown = "".join(p.text for p in pieces if isinstance(p, Text | Reasoning))
    assert "CiIB" not in shown


def test_function_calls_are_whole_tool_calls_and_finish_as_tool_calls() -> None:
    assert translate(TOOL_STREAM) == [
        Text("Checking."),
        ToolCall(0, '{"city":"Paris","units":["c"]}', "call_0_n0", "get_weather"),
        Signature("EpoFCpcFAdHtim9", "gemini"),
        ToolCall(1, "{}", "call_1_n0", "clock"),
        Finish("tool_calls"),
        Usage(30, 20),
    ]


def test_generated_call_ids_differ_between_answers() -> None:
    first = StreamTranslator().translate(gemini._decode(TOOL_STREAM.split(b"\r\n\r\n")[1][6:]))
    second = StreamTranslator().translate(gemini._decode(TOOL_STREAM.split(b"\r\n\r\n")[1][6:]))
    ids = [p.id for p in first + second if isinstance(p, ToolCall)]
    assert all(i and i.startswith("call_") for i in ids)
    assert len(set(ids)) == 4


def test_a_function_call_id_from_gemini_is_kept() -> None:
    wire = TOOL_STREAM.replace(
        b'{"name": "clock","args": {}}', b'{"id": "fc_9","name": "clock","args": {}}'
    )
    assert ToolCall(1, "{}", "fc_9", "clock") in translate(wire)


@pytest.mark.parametrize("name", list(STREAMS))
def test_every_split_point_gives_the_same_pieces(name: str) -> None:
    wire = STREAMS[name]
    whole = translate(wire)
    for cut in range(1, len(wire)):
        assert translate_cut_at(wire, cut) == whole, f"cut at byte {cut}"


@pytest.mark.parametrize("name", list(STREAMS))
def test_byte_by_byte_gives_the_same_pieces(name: str) -> None:
    assert translate(STREAMS[name], split=1) == translate(STREAMS[name])


def test_lf_line_ends_give_the_same_pieces() -> None:
    assert translate(TEXT_STREAM.replace(b"\r\n", b"\n")) == translate(TEXT_STREAM)


@pytest.mark.parametrize("name", list(STREAMS))
def test_no_finish_reason_is_truncated(name: str) -> None:
    wire = STREAMS[name]
    last = wire.rindex(b"data: ")
    with pytest.raises(UpstreamError, match="truncated") as caught:
        translate(wire[:last])
    assert caught.value.retryable


def test_empty_stream_is_truncated() -> None:
    with pytest.raises(UpstreamError, match="truncated"):
        translate(b"")


def test_unterminated_finish_chunk_is_truncation() -> None:
    with pytest.raises(UpstreamError, match="truncated"):
        translate(TEXT_STREAM.rstrip(b"\r\n"))


def test_usage_after_the_finish_chunk_is_sent_again_and_counts() -> None:
    late = b'data: {"usageMetadata": {"promptTokenCount": 8,"candidatesTokenCount": 11}}\r\n\r\n'
    pieces = translate(TEXT_STREAM + late)
    assert pieces[-3:] == [Finish("stop"), Usage(8, 10), Usage(8, 11)]


def test_finish_chunk_without_usage_sends_the_last_usage_seen() -> None:
    wire = TEXT_STREAM.replace(
        b',"usageMetadata": {"promptTokenCount": 8,"candidatesTokenCount": 10,"totalTokenCount": 18}',
        b"",
    )
    assert translate(wire)[-2:] == [Finish("stop"), Usage(8, 9)]


@pytest.mark.parametrize(
    ("reason", "finish"),
    [
        ("STOP", "stop"),
        ("MAX_TOKENS", "length"),
        ("SAFETY", "content_filter"),
        ("RECITATION", "content_filter"),
        ("BLOCKLIST", "content_filter"),
        ("PROHIBITED_CONTENT", "content_filter"),
        ("SPII", "content_filter"),
        ("IMAGE_SAFETY", "content_filter"),
        ("OTHER", "stop"),
        ("MALFORMED_FUNCTION_CALL", "stop"),
        ("LANGUAGE", "stop"),
    ],
)
def test_finish_mapping(reason: str, finish: str) -> None:
    wire = TEXT_STREAM.replace(b'"finishReason": "STOP"', b'"finishReason": "%s"' % reason.encode())
    assert [p for p in translate(wire) if isinstance(p, Finish)] == [Finish(finish)]
    body = json.dumps({"candidates": [{"content": {"parts": []}, "finishReason": reason}]})
    assert [p for p in parse_completion(body.encode()) if isinstance(p, Finish)] == [Finish(finish)]


def test_max_tokens_with_a_function_call_stays_length() -> None:
    wire = TOOL_STREAM.replace(b'"finishReason": "STOP"', b'"finishReason": "MAX_TOKENS"')
    assert Finish("length") in translate(wire)


def test_blocked_prompt_is_a_content_filter_finish() -> None:
    wire = (
        b'data: {"promptFeedback": {"blockReason": "SAFETY","safetyRatings": []},'
        b'"usageMetadata": {"promptTokenCount": 5,"totalTokenCount": 5}}\r\n\r\n'
    )
    assert translate(wire) == [Finish("content_filter"), Usage(5, 0)]


@pytest.mark.parametrize(
    ("error", "kind", "retryable"),
    [
        (
            {"code": 429, "message": "Quota exceeded", "status": "RESOURCE_EXHAUSTED"},
            RateLimited,
            True,
        ),
        (
            {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"},
            Overloaded,
            True,
        ),
        (
            {"code": 504, "message": "Deadline expired", "status": "DEADLINE_EXCEEDED"},
            UpstreamTimeout,
            True,
        ),
        ({"code": 500, "message": "Internal error", "status": "INTERNAL"}, UpstreamError, True),
        (
            {"code": 400, "message": "Invalid argument", "status": "INVALID_ARGUMENT"},
            UpstreamError,
            False,
        ),
    ],
)
def test_inband_error(error: dict[str, Any], kind: type[LeanError], retryable: bool) -> None:
    first = TEXT_STREAM.split(b"\r\n\r\n")[0] + b"\r\n\r\n"
    wire = first + b"data: " + json.dumps({"error": error}).encode() + b"\r\n\r\n"
    with pytest.raises(kind) as caught:
        translate(wire)
    assert caught.value.retryable is retryable
    assert error["message"] in caught.value.message
    with pytest.raises(kind):
        parse_completion(json.dumps({"error": error}).encode())


def test_unparseable_chunk_is_a_retryable_upstream_error() -> None:
    with pytest.raises(UpstreamError, match="unparseable") as caught:
        translate(b"data: {not json\r\n\r\n")
    assert caught.value.retryable


def test_other_candidates_are_ignored() -> None:
    wire = TEXT_STREAM.replace(
        b'"index": 0}],"usageMetadata": {"promptTokenCount": 8,"candidatesTokenCount": 1,',
        b'"index": 1}],"usageMetadata": {"promptTokenCount": 8,"candidatesTokenCount": 1,',
    )
    assert Text("The") not in translate(wire)


# --- non-streaming -----------------------------------------------------------------------


def test_parse_completion() -> None:
    body = {
        "candidates": [
            {
                "content": {
                    "parts": [
                        {"text": "thinking...", "thought": True},
                        {"text": "Here you go."},
                        {"functionCall": {"name": "clock", "args": {}}, "thoughtSignature": "sig"},
                    ],
                    "role": "model",
                },
                "finishReason": "STOP",
                "index": 0,
            }
        ],
        "usageMetadata": {
            "promptTokenCount": 4,
            "candidatesTokenCount": 5,
            "thoughtsTokenCount": 6,
        },
    }
    assert parse_completion(json.dumps(body).encode(), nonce="x") == [
        Reasoning("thinking..."),
        Text("Here you go."),
        ToolCall(0, "{}", "call_0_x", "clock"),
        Signature("sig", "gemini"),
        Finish("tool_calls"),
        Usage(4, 11),
    ]


def test_parse_completion_without_finish_reason_is_complete() -> None:
    body = {
        "candidates": [{"content": {"parts": [{"text": "hi"}]}}],
        "usageMetadata": {"promptTokenCount": 1, "candidatesTokenCount": 1},
    }
    assert parse_completion(json.dumps(body).encode()) == [Text("hi"), Finish("stop"), Usage(1, 1)]


@pytest.mark.parametrize("body", [b"{oops", b"{}", b'{"candidates": []}'])
def test_parse_completion_unusable_body_is_retryable(body: bytes) -> None:
    with pytest.raises(UpstreamError) as caught:
        parse_completion(body)
    assert caught.value.retryable


# --- requests ------------------------------------------------------------------------------

CONFIG = lean_config(provider="kind = gemini", model="upstream_model = gemini-2.5-flash")


def build(body: dict[str, Any], *, stream: bool = True, config: Any = CONFIG) -> dict[str, Any]:
    request = build_request(config.providers["up"], config.models["default"], body, stream=stream)
    sent: dict[str, Any] = json.loads(request.body)
    return sent


def test_registered_for_its_kind() -> None:
    assert adapter("gemini") is gemini


def test_urls_and_the_key_in_a_header_never_the_url() -> None:
    config = lean_config(
        provider="kind = gemini\nbase_url = https://generativelanguage.googleapis.com/v1beta",
        model="upstream_model = models/gemini-2.5-flash",
    )
    provider, model = config.providers["up"], config.models["default"]
    body = {"messages": [{"role": "user", "content": "Hi"}]}
    streaming = build_request(provider, model, body, stream=True)
    plain = build_request(provider, model, body, stream=False)
    base = "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash"
    assert streaming.url == base + ":streamGenerateContent?alt=sse"
    assert plain.url == base + ":generateContent"
    for req in (streaming, plain):
        assert req.headers["x-goog-api-key"] == SECRET
        assert SECRET not in req.url and "key=" not in req.url
        assert SECRET.encode() not in req.body
    assert json.loads(streaming.body) == {"contents": [{"role": "user", "parts": [{"text": "Hi"}]}]}


def test_system_instruction_roles_and_merging() -> None:
    body = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": "Use French."},
            {"role": "user", "content": "one"},
            {"role": "user", "content": [{"type": "text", "text": "two"}]},
            {"role": "assistant", "content": "three"},
            {"role": "user", "content": "four"},
        ]
    }
    sent = build(body)
    assert sent["systemInstruction"] == {"parts": [{"text": "Be brief.\n\nUse French."}]}
    assert sent["contents"] == [
        {"role": "user", "parts": [{"text": "one"}, {"text": "two"}]},
        {"role": "model", "parts": [{"text": "three"}]},
        {"role": "user", "parts": [{"text": "four"}]},
    ]


CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "You can call tools."},
    {"role": "user", "content": "Weather in Paris and the time?"},
    {
        "role": "assistant",
        "content": "Let me check.",
        "tool_calls": [
            {
                "id": "call_0_ab",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {
                "id": "call_1_ab",
                "type": "function",
                "function": {"name": "clock", "arguments": "{}"},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "call_0_ab", "content": '{"temp": 21}'},
    {"role": "tool", "tool_call_id": "call_1_ab", "content": "12:00"},
]

GEMINI_CONVERSATION: list[dict[str, Any]] = [
    {"role": "user", "parts": [{"text": "Weather in Paris and the time?"}]},
    {
        "role": "model",
        "parts": [
            {"text": "Let me check."},
            {
                "functionCall": {"name": "get_weather", "args": {"city": "Paris"}},
                "thoughtSignature": REPLAY_SIGNATURE,
            },
            {"functionCall": {"name": "clock", "args": {}}},
        ],
    },
    {
        "role": "user",
        "parts": [
            {"functionResponse": {"name": "get_weather", "response": {"result": {"temp": 21}}}},
            {"functionResponse": {"name": "clock", "response": {"result": "12:00"}}},
        ],
    },
]


def test_function_calls_and_responses_round_trip() -> None:
    sent = build({"messages": CONVERSATION})
    assert sent["systemInstruction"] == {"parts": [{"text": "You can call tools."}]}
    assert sent["contents"] == GEMINI_CONVERSATION


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "clock",
            "description": "The time",
            "parameters": {"type": "object", "properties": {}},
        },
    },
]


def test_tools_become_function_declarations() -> None:
    sent = build({"messages": CONVERSATION, "tools": TOOLS})
    assert sent["tools"] == [
        {
            "functionDeclarations": [
                {
                    "name": "get_weather",
                    "description": "Weather for a city",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                },
                {"name": "clock", "description": "The time"},  # no properties: no parameters
            ]
        }
    ]
    assert "toolConfig" not in sent


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("auto", {"mode": "AUTO"}),
        ("required", {"mode": "ANY"}),
        ("none", {"mode": "NONE"}),
        (
            {"type": "function", "function": {"name": "clock"}},
            {"mode": "ANY", "allowedFunctionNames": ["clock"]},
        ),
    ],
)
def test_tool_choice(choice: Any, expected: dict[str, Any]) -> None:
    sent = build({"messages": CONVERSATION, "tools": TOOLS, "tool_choice": choice})
    assert sent["toolConfig"] == {"functionCallingConfig": expected}


def test_generation_config() -> None:
    config = lean_config(provider="kind = gemini", model="max_tokens = 99\ntemperature = 0.3")
    body = {"messages": CONVERSATION, "top_p": 0.9, "stop": "END"}
    assert build(body, config=config)["generationConfig"] == {
        "maxOutputTokens": 99,
        "temperature": 0.3,
        "topP": 0.9,
        "stopSequences": ["END"],
    }
    body = {"messages": CONVERSATION, "max_completion_tokens": 5, "temperature": 1.5}
    assert build(body, config=config)["generationConfig"] == {
        "maxOutputTokens": 5,
        "temperature": 1.5,
    }
    assert "generationConfig" not in build({"messages": CONVERSATION})


def test_images_become_inline_or_file_data() -> None:
    content = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "image_url", "image_url": {"url": "gs://bucket/cat.jpg"}},
    ]
    sent = build({"messages": [{"role": "user", "content": content}]})
    assert sent["contents"][0]["parts"][1:] == [
        {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}},
        {"fileData": {"fileUri": "gs://bucket/cat.jpg"}},
    ]


def test_the_callers_body_is_untouched() -> None:
    body = {"messages": json.loads(json.dumps(CONVERSATION)), "tools": TOOLS}
    before = json.dumps(body, sort_keys=True)
    build(body)
    assert json.dumps(body, sort_keys=True) == before
