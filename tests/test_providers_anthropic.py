"""The Anthropic adapter: request translation, and recorded Messages streams fed through
lean's SSE parser whole, split at every byte offset, and one byte at a time."""

# Recorded events stay one line each, byte for byte as the provider sends them.
# ruff: noqa: E501

from __future__ import annotations

import json
from typing import Any

import pytest

from lean.errors import LeanError, Overloaded, RateLimited, UpstreamError, UpstreamTimeout
from lean.providers import adapter, anthropic
from lean.providers.anthropic import StreamTranslator, build_request, parse_completion
from lean.providers.base import (
    Finish,
    Piece,
    Reasoning,
    Signature,
    Text,
    ToolCall,
    Usage,
)
from lean.sse import SSEParser
from tests.support import SECRET, lean_config


def translate(wire: bytes, *, split: int | None = None) -> list[Piece]:
    parser, translator = SSEParser(), StreamTranslator()
    pieces: list[Piece] = []
    step = split or len(wire) or 1
    for start in range(0, len(wire), step):
        for message in parser.feed(wire[start : start + step]):
            pieces.extend(translator.feed(message))
    parser.close()
    translator.close()
    return pieces


def translate_cut_at(wire: bytes, cut: int) -> list[Piece]:
    """Two reads, split at byte `cut`."""
    parser, translator = SSEParser(), StreamTranslator()
    pieces: list[Piece] = []
    for part in (wire[:cut], wire[cut:]):
        for message in parser.feed(part):
            pieces.extend(translator.feed(message))
    translator.close()
    return pieces


# Recorded the way the API sends them (docs.anthropic.com, "Streaming Messages"): named
# events, JSON with spaces after separators, a ping after the first block starts.
TEXT_STREAM = b"""event: message_start
data: {"type": "message_start", "message": {"id": "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY", "type": "message", "role": "assistant", "content": [], "model": "claude-sonnet-4-5", "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 25, "output_tokens": 1}}}

event: content_block_start
data: {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}

event: ping
data: {"type": "ping"}

event: content_block_delta
data: {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}}

event: content_block_delta
data: {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "! \xc3\xa9\xe2\x82\xac"}}

event: content_block_stop
data: {"type": "content_block_stop", "index": 0}

event: message_delta
data: {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence":null}, "usage": {"output_tokens": 15}}

event: message_stop
data: {"type": "message_stop"}

"""

TOOL_STREAM = b"""event: message_start
data: {"type":"message_start","message":{"id":"msg_014p7gG3wDgGV9EUtLvnow3U","type":"message","role":"assistant","model":"claude-sonnet-4-5","stop_sequence":null,"usage":{"input_tokens":472,"output_tokens":2},"content":[],"stop_reason":null}}

event: content_block_start
data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}

event: ping
data: {"type": "ping"}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Okay, let me check."}}

event: content_block_stop
data: {"type":"content_block_stop","index":0}

event: content_block_start
data: {"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_01T1x1fJ34qAmk2tNTrN7Up6","name":"get_weather","input":{}}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":""}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\\"location\\":"}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":" \\"San Francisc"}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"o, CA\\"}"}}

event: content_block_stop
data: {"type":"content_block_stop","index":1}

event: content_block_start
data: {"type":"content_block_start","index":2,"content_block":{"type":"tool_use","id":"toolu_02","name":"clock","input":{}}}

event: content_block_delta
data: {"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":""}}

event: content_block_stop
data: {"type":"content_block_stop","index":2}

event: message_delta
data: {"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":89}}

event: message_stop
data: {"type":"message_stop"}

"""

THINKING_STREAM = b"""event: message_start
data: {"type": "message_start", "message": {"id": "msg_01", "type": "message", "role": "assistant", "content": [], "model": "claude-sonnet-4-5", "stop_reason": null, "stop_sequence": null}}

event: content_block_start
data: {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}}

event: content_block_delta
data: {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "I need to find the GCD of 1071 and 462.\\n\\n1071 = 2 \xc3\x97 462 + 147"}}

event: content_block_delta
data: {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "\\n462 = 3 \xc3\x97 147 + 21"}}

event: content_block_delta
data: {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds..."}}

event: content_block_stop
data: {"type": "content_block_stop", "index": 0}

event: content_block_start
data: {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}}

event: content_block_delta
data: {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "The GCD is **21**."}}

event: content_block_stop
data: {"type": "content_block_stop", "index": 1}

event: message_delta
data: {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}}

event: message_stop
data: {"type": "message_stop"}

"""

ERROR_AFTER_START = b"""event: message_start
data: {"type": "message_start", "message": {"id": "msg_02", "type": "message", "role": "assistant", "content": [], "model": "claude-sonnet-4-5", "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 10, "output_tokens": 1}}}

event: error
data: {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}

"""

STREAMS = {"text": TEXT_STREAM, "tool": TOOL_STREAM, "thinking": THINKING_STREAM}


def test_text_stream() -> None:
    assert translate(TEXT_STREAM) == [
        Text("Hello"),
        Text("! é€"),
        Finish("stop"),
        Usage(25, 15),
    ]


def test_tool_use_fragments_numbered_from_zero_with_id_and_name_first() -> None:
    assert translate(TOOL_STREAM) == [
        Text("Okay, let me check."),
        ToolCall(0, "", "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "get_weather"),
        ToolCall(0, '{"location":'),
        ToolCall(0, ' "San Francisc'),
        ToolCall(0, 'o, CA"}'),
        ToolCall(1, "", "toolu_02", "clock"),
        ToolCall(1, "{}"),  # no input fragments: the arguments are still a JSON object
        Finish("tool_calls"),
        Usage(472, 89),
    ]


def test_thinking_is_reasoning_and_the_signature_stays_opaque() -> None:
    pieces = translate(THINKING_STREAM)
    assert pieces == [
        Reasoning("I need to find the GCD of 1071 and 462.\n\n1071 = 2 × 462 + 147"),
        Reasoning("\n462 = 3 × 147 + 21"),
        Signature("EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds...", "anthropic"),
        Text("The GCD is **21**."),
        Finish("stop"),
        Usage(0, 0),  # this recording carries no usage
    ]
    shown = "".join(p.text for p in pieces if isinstance(p, Text | Reasoning))
    assert "EqQB" not in shown


@pytest.mark.parametrize("name", list(STREAMS))
def test_every_split_point_gives_the_same_pieces(name: str) -> None:
    wire = STREAMS[name]
    whole = translate(wire)
    for cut in range(1, len(wire)):
        assert translate_cut_at(wire, cut) == whole, f"cut at byte {cut}"


@pytest.mark.parametrize("name", list(STREAMS))
def test_byte_by_byte_gives_the_same_pieces(name: str) -> None:
    assert translate(STREAMS[name], split=1) == translate(STREAMS[name])


def test_crlf_line_ends_give_the_same_pieces() -> None:
    assert translate(TEXT_STREAM.replace(b"\n", b"\r\n")) == translate(TEXT_STREAM)


@pytest.mark.parametrize("name", list(STREAMS))
def test_no_message_stop_is_truncated_even_after_a_finish(name: str) -> None:
    wire = STREAMS[name]
    cut = wire.index(b"event: message_stop")
    with pytest.raises(UpstreamError, match="truncated") as caught:
        translate(wire[:cut])
    assert caught.value.retryable


def test_truncated_mid_block_raises() -> None:
    cut = TOOL_STREAM.index(
        b'event: content_block_stop\ndata: {"type":"content_block_stop","index":1}'
    )
    with pytest.raises(UpstreamError, match="truncated"):
        translate(TOOL_STREAM[:cut])


def test_unterminated_message_stop_is_truncation() -> None:
    with pytest.raises(UpstreamError, match="truncated"):
        translate(TEXT_STREAM.rstrip(b"\n"))


@pytest.mark.parametrize(
    ("kind", "error"),
    [
        ("overloaded_error", Overloaded),
        ("rate_limit_error", RateLimited),
        ("timeout_error", UpstreamTimeout),
        ("api_error", UpstreamError),
        ("invalid_request_error", UpstreamError),
    ],
)
def test_error_event_after_message_start(kind: str, error: type[LeanError]) -> None:
    wire = ERROR_AFTER_START.replace(b"overloaded_error", kind.encode())
    with pytest.raises(error) as caught:
        translate(wire)
    assert caught.value.retryable == (kind != "invalid_request_error")
    assert "Overloaded" in caught.value.message


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("pause_turn", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("something_new", "stop"),
    ],
)
def test_finish_mapping(stop_reason: str, finish: str) -> None:
    # A reason OpenAI's words lose is kept as it was, for a Messages client.
    said = stop_reason in ("end_turn", "max_tokens", "tool_use")
    expected = Finish(finish) if said else Finish(finish, stop_reason)
    wire = TEXT_STREAM.replace(b'"end_turn"', json.dumps(stop_reason).encode())
    assert [p for p in translate(wire) if isinstance(p, Finish)] == [expected]
    body = json.dumps({"content": [], "stop_reason": stop_reason}).encode()
    assert [p for p in parse_completion(body) if isinstance(p, Finish)] == [expected]


def test_the_stop_sequence_that_matched_is_kept() -> None:
    wire = TEXT_STREAM.replace(
        b'"stop_reason": "end_turn", "stop_sequence":null',
        b'"stop_reason": "stop_sequence", "stop_sequence": "END"',
    )
    assert [p for p in translate(wire) if isinstance(p, Finish)] == [
        Finish("stop", "stop_sequence", "END")
    ]


def test_cache_tokens_count_as_prompt_tokens() -> None:
    usage = b'"usage": {"input_tokens": 25, "cache_creation_input_tokens": 100, "cache_read_input_tokens": 1000, "output_tokens": 1}'
    wire = TEXT_STREAM.replace(b'"usage": {"input_tokens": 25, "output_tokens": 1}', usage)
    assert translate(wire)[-1] == Usage(1125, 15, cached_tokens=1000)  # cache reads


def test_unknown_events_and_deltas_are_ignored() -> None:
    extra = (
        b'event: content_block_delta\ndata: {"type": "content_block_delta", "index": 0, '
        b'"delta": {"type": "citations_delta", "citation": {}}}\n\n'
        b'event: brand_new\ndata: {"type": "brand_new", "x": 1}\n\n'
    )
    cut = TEXT_STREAM.index(b"event: content_block_stop")
    wire = TEXT_STREAM[:cut] + extra + TEXT_STREAM[cut:]
    assert translate(wire) == translate(TEXT_STREAM)


def test_redacted_thinking_is_a_signature_not_text() -> None:
    block = (
        b'event: content_block_start\ndata: {"type": "content_block_start", "index": 0, '
        b'"content_block": {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix"}}\n\n'
        b'event: content_block_stop\ndata: {"type": "content_block_stop", "index": 0}\n\n'
    )
    cut = TEXT_STREAM.index(b"event: content_block_start")
    pieces = translate(
        TEXT_STREAM[:cut] + block + TEXT_STREAM[cut:].replace(b'"index": 0', b'"index": 1')
    )
    assert pieces[0] == Signature("EmwKAhgBEgy3va3pzix", "anthropic_redacted")
    assert pieces[1:] == translate(TEXT_STREAM)


def test_unparseable_event_is_a_retryable_upstream_error() -> None:
    with pytest.raises(UpstreamError, match="unparseable") as caught:
        translate(b"event: message_start\ndata: {not json\n\n")
    assert caught.value.retryable


# --- non-streaming -----------------------------------------------------------------------


def test_parse_completion_blocks_in_order() -> None:
    body = {
        "id": "msg_01",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5",
        "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "sig=="},
            {"type": "text", "text": "Let me look."},
            {
                "type": "tool_use",
                "id": "toolu_1",
                "name": "get_weather",
                "input": {"city": "Paris"},
            },
            {"type": "tool_use", "id": "toolu_2", "name": "clock", "input": {}},
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {"input_tokens": 12, "output_tokens": 34},
    }
    assert parse_completion(json.dumps(body).encode()) == [
        Reasoning("hmm"),
        Signature("sig==", "anthropic"),
        Text("Let me look."),
        ToolCall(0, '{"city":"Paris"}', "toolu_1", "get_weather"),
        ToolCall(1, "{}", "toolu_2", "clock"),
        Finish("tool_calls"),
        Usage(12, 34),
    ]


def test_parse_completion_error_body_raises_its_type() -> None:
    body = b'{"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}'
    with pytest.raises(Overloaded):
        parse_completion(body)


@pytest.mark.parametrize("body", [b"{oops", b'{"type": "message"}'])
def test_parse_completion_unusable_body_is_retryable(body: bytes) -> None:
    with pytest.raises(UpstreamError) as caught:
        parse_completion(body)
    assert caught.value.retryable


# --- requests ------------------------------------------------------------------------------

CONFIG = lean_config(
    provider="kind = anthropic\nbase_url = https://api.anthropic.com/v1",
    model="upstream_model = claude-sonnet-4-5",
)


def build(body: dict[str, Any], *, stream: bool = True, config: Any = CONFIG) -> dict[str, Any]:
    request = build_request(config.providers["up"], config.models["default"], body, stream=stream)
    sent: dict[str, Any] = json.loads(request.body)
    return sent


def test_registered_for_its_kind() -> None:
    assert adapter("anthropic") is anthropic


def test_url_headers_and_key() -> None:
    body = {"model": "default", "messages": [{"role": "user", "content": "Hi"}]}
    req = build_request(CONFIG.providers["up"], CONFIG.models["default"], body, stream=True)
    assert req.url == "https://api.anthropic.com/v1/messages"
    assert req.headers["x-api-key"] == SECRET
    assert req.headers["anthropic-version"] == "2023-06-01"
    assert req.headers["Content-Type"] == "application/json"
    assert "Authorization" not in req.headers
    assert SECRET not in req.url and SECRET.encode() not in req.body
    sent = json.loads(req.body)
    assert sent == {
        "model": "claude-sonnet-4-5",
        "max_tokens": 4096,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        "stream": True,
    }
    assert "stream" not in build(body, stream=False)


def test_no_key_no_header() -> None:
    config = lean_config(provider="kind = anthropic\napi_key_env =")
    body = {"messages": [{"role": "user", "content": "Hi"}]}
    req = build_request(config.providers["up"], config.models["default"], body, stream=True)
    assert "x-api-key" not in req.headers


@pytest.mark.parametrize(
    ("body", "model", "expected"),
    [
        ({}, "", 4096),
        ({}, "max_tokens = 99", 99),
        ({"max_tokens": 7}, "max_tokens = 99", 7),
        ({"max_completion_tokens": 5, "max_tokens": 7}, "", 5),
    ],
)
def test_max_tokens_is_always_sent(body: dict[str, Any], model: str, expected: int) -> None:
    config = lean_config(provider="kind = anthropic", model=model)
    body = {"messages": [{"role": "user", "content": "Hi"}], **body}
    assert build(body, config=config)["max_tokens"] == expected


def test_system_and_developer_messages_go_top_level() -> None:
    body = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Use French."}]},
            {"role": "user", "content": "Hi"},
        ]
    }
    sent = build(body)
    assert sent["system"] == "Be brief.\n\nUse French."
    assert [m["role"] for m in sent["messages"]] == ["user"]


def test_consecutive_same_role_messages_are_merged() -> None:
    body = {
        "messages": [
            {"role": "user", "content": "one"},
            {"role": "user", "content": [{"type": "text", "text": "two"}]},
            {"role": "assistant", "content": "three"},
            {"role": "assistant", "content": ""},
            {"role": "assistant", "content": "four"},
            {"role": "user", "content": "five"},
        ]
    }
    assert build(body)["messages"] == [
        {
            "role": "user",
            "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}],
        },
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "three"}, {"type": "text", "text": "four"}],
        },
        {"role": "user", "content": [{"type": "text", "text": "five"}]},
    ]


CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "You can call tools."},
    {"role": "user", "content": "Weather in Paris and the time?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_a",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {"id": "call_b", "type": "function", "function": {"name": "clock", "arguments": "{}"}},
        ],
    },
    {"role": "tool", "tool_call_id": "call_a", "content": '{"temp": 21}'},
    {"role": "tool", "tool_call_id": "call_b", "content": [{"type": "text", "text": "12:00"}]},
    {"role": "user", "content": "Thanks!"},
]

ANTHROPIC_CONVERSATION: list[dict[str, Any]] = [
    {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and the time?"}]},
    {
        "role": "assistant",
        "content": [
            {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "call_b", "name": "clock", "input": {}},
        ],
    },
    {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "call_a", "content": '{"temp": 21}'},
            {"type": "tool_result", "tool_use_id": "call_b", "content": "12:00"},
            {"type": "text", "text": "Thanks!"},
        ],
    },
]


def test_tool_calls_and_results_round_trip_as_tool_use_and_tool_result() -> None:
    sent = build({"messages": CONVERSATION})
    assert sent["system"] == "You can call tools."
    assert sent["messages"] == ANTHROPIC_CONVERSATION


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    },
    {"type": "function", "function": {"name": "clock"}},
]


def test_tools_become_input_schemas() -> None:
    sent = build({"messages": CONVERSATION, "tools": TOOLS})
    assert sent["tools"] == [
        {
            "name": "get_weather",
            "description": "Weather for a city",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
        {"name": "clock", "input_schema": {"type": "object", "properties": {}}},
    ]
    assert "tool_choice" not in sent


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("auto", {"type": "auto"}),
        ("required", {"type": "any"}),
        ("none", {"type": "none"}),
        ({"type": "function", "function": {"name": "clock"}}, {"type": "tool", "name": "clock"}),
    ],
)
def test_tool_choice(choice: Any, expected: dict[str, Any]) -> None:
    sent = build({"messages": CONVERSATION, "tools": TOOLS, "tool_choice": choice})
    assert sent["tool_choice"] == expected


def test_parallel_tool_calls_false_disables_parallel_tool_use() -> None:
    sent = build({"messages": CONVERSATION, "tools": TOOLS, "parallel_tool_calls": False})
    assert sent["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}


def test_sampling_parameters_and_stop() -> None:
    body = {"messages": CONVERSATION, "temperature": 0.2, "top_p": 0.9, "stop": "END"}
    sent = build(body)
    assert (sent["temperature"], sent["top_p"], sent["stop_sequences"]) == (0.2, 0.9, ["END"])
    assert build({"messages": CONVERSATION, "stop": ["a", "b"]})["stop_sequences"] == ["a", "b"]
    assert build({"messages": CONVERSATION, "temperature": 1.7})["temperature"] == 1.0


def test_images_become_image_blocks() -> None:
    content = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
    ]
    sent = build({"messages": [{"role": "user", "content": content}]})
    assert sent["messages"][0]["content"][1:] == [
        {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
        },
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]


def test_the_callers_body_is_untouched() -> None:
    body = {"messages": json.loads(json.dumps(CONVERSATION)), "tools": TOOLS}
    before = json.dumps(body, sort_keys=True)
    build(body)
    assert json.dumps(body, sort_keys=True) == before


def test_cache_reads_are_the_cached_tokens_of_the_usage() -> None:
    answer = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "content": [{"type": "text", "text": "hi"}],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 5, "cache_read_input_tokens": 100, "output_tokens": 2},
    }
    usage = parse_completion(json.dumps(answer).encode())[-1]
    assert usage == Usage(105, 2, cached_tokens=100)
