"""lean.encoders.anthropic fed pieces, without a socket: the Messages events are in the order
Anthropic's stream rules say, the official SDK's own accumulator makes of them the message
`whole` answers with, and the stop reasons, usage and errors are Anthropic's."""

from __future__ import annotations

import json
from typing import Any

import pytest
from anthropic.lib.streaming._messages import accumulate_event

from lean.encoders.anthropic import MessagesEncoder, stop_reason, usage_body
from lean.errors import Overloaded, RateLimited, UpstreamError
from lean.providers.base import (
    Extras,
    Finish,
    Piece,
    Reasoning,
    Refusal,
    Signature,
    Text,
    ToolCall,
    Usage,
    Verbatim,
)

SIGNED: list[Piece] = [
    Reasoning("Let me "),
    Reasoning("think."),
    Signature("sig-1"),
    Reasoning("More."),
    Signature("sig-2"),
    Signature("opaque", "anthropic_redacted"),
    Text("Hello "),
    Text("there."),
    ToolCall(0, "", "toolu_1", "get_weather"),
    ToolCall(0, '{"city":'),
    ToolCall(0, '"Paris"}'),
    ToolCall(1, "{}", "toolu_2", "clock"),
    Finish("tool_calls"),
    Usage(20, 7, cached_tokens=5),
]
SEQUENCES: dict[str, list[Piece]] = {
    "signed thinking, redacted, text, tools": SIGNED,
    "reasoning without a signature (OpenAI's)": [Reasoning("Hm."), Text("Hi."), Finish("stop")],
    "a signature alone": [Signature("sig"), Text("Hi"), Finish("stop")],
    "a refusal": [Refusal("I can't "), Refusal("help."), Finish("stop")],
    "verbatim chunks": [
        Verbatim(b"[]", (Text("Hi "),)),
        Verbatim(b"[]", (Text("you"), Finish("stop"))),
        Extras(),
    ],
    "interleaved calls": [
        ToolCall(0, '{"a":', "toolu_1", "one"),
        ToolCall(1, '{"b":2}', "toolu_2", "two"),
        ToolCall(0, "1}"),
        Finish("tool_calls"),
    ],
    "a gemini signature": [Text("Hi"), Signature("g", "gemini"), Finish("stop")],
    "nothing": [],
}


def events_of(data: bytes) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for block in data.decode().split("\n\n"):
        if not block:
            continue
        event, body = block.split("\n")
        assert event.startswith("event: ") and body.startswith("data: ")
        out.append((event[7:], json.loads(body[6:])))
    return out


def stream(pieces: list[Piece]) -> tuple[MessagesEncoder, list[tuple[str, dict[str, Any]]]]:
    encoder = MessagesEncoder(model="alias", input_tokens=42)
    frames = [encoder.begin()]
    frames += [frame for piece in pieces if (frame := encoder.frame(piece))]
    frames.append(encoder.end())
    return encoder, events_of(b"".join(frames))


def check_order(events: list[tuple[str, dict[str, Any]]]) -> None:
    """Anthropic's order: message_start; each block start, deltas, stop, numbered 0, 1, ...
    (one open at a time); message_delta; message_stop. Each event's name is its type."""
    names = [name for name, _ in events]
    assert all(name == body["type"] for name, body in events)
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    opened: int | None = None
    started = 0
    for name, body in events[1:-2]:
        if name == "content_block_start":
            assert opened is None and body["index"] == started
            opened = body["index"]
            started += 1
        elif name == "content_block_stop":
            assert body["index"] == opened
            opened = None
        else:
            assert name == "content_block_delta" and body["index"] < started
    assert opened is None


@pytest.mark.parametrize("name", list(SEQUENCES))
def test_the_sdk_accumulates_the_stream_into_the_whole_message(name: str) -> None:
    pieces = SEQUENCES[name]
    _, events = stream(pieces)
    check_order(events)
    snapshot = None
    buffers: dict[int, bytes] = {}
    for _, body in events:
        snapshot = accumulate_event(event=body, current_snapshot=snapshot, json_bufs=buffers)
    assert snapshot is not None
    whole = MessagesEncoder(model="alias", input_tokens=42).message(pieces)
    streamed = snapshot.to_dict()
    for message in (streamed, whole):
        message.pop("id")
        for block in message["content"]:
            if block["type"] == "tool_use":
                block.pop("id")
    assert streamed["content"] == whole["content"]
    assert streamed["stop_reason"] == whole["stop_reason"]
    known = {key: value for key, value in streamed["usage"].items() if value is not None}
    assert known == whole["usage"]  # what the upstream did not say is None to the SDK


def test_the_blocks_of_signed_thinking_redacted_text_and_tools() -> None:
    message = MessagesEncoder(model="alias", input_tokens=42).message(SIGNED)
    assert message["content"] == [
        {"type": "thinking", "thinking": "Let me think.", "signature": "sig-1"},
        {"type": "thinking", "thinking": "More.", "signature": "sig-2"},
        {"type": "redacted_thinking", "data": "opaque"},
        {"type": "text", "text": "Hello there."},
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "toolu_2", "name": "clock", "input": {}},
    ]
    assert message["stop_reason"] == "tool_use"
    assert message["model"] == "alias"
    # Anthropic's input tokens leave out cache reads; OpenAI's prompt tokens include them.
    assert message["usage"] == {
        "input_tokens": 15,
        "cache_read_input_tokens": 5,
        "output_tokens": 7,
    }


def test_the_start_says_the_estimate_and_the_end_only_what_the_upstream_said() -> None:
    _, events = stream([Text("Hi"), Finish("stop")])
    assert events[0][1]["message"]["usage"] == {"input_tokens": 42, "output_tokens": 0}
    assert events[-2][1]["usage"] == {}  # no usage from the upstream: nothing invented
    whole = MessagesEncoder(model="alias", input_tokens=42).message([Text("Hi")])
    assert whole["usage"] == {"input_tokens": 42}  # the estimate, as message_start says it


def test_a_tool_call_fragment_that_is_not_json_is_kept() -> None:
    message = MessagesEncoder(model="a", input_tokens=1).message([ToolCall(0, "oops", "t", "f")])
    assert message["content"][0]["input"] == {"arguments": "oops"}


@pytest.mark.parametrize(
    ("finish", "refused", "expected"),
    [
        (Finish("stop"), False, "end_turn"),
        (Finish("length"), False, "max_tokens"),
        (Finish("tool_calls"), False, "tool_use"),
        (Finish("content_filter"), False, "refusal"),
        (Finish("refusal"), False, "refusal"),
        (Finish("stop"), True, "refusal"),
        (Finish("stop", "stop_sequence", "END"), False, "stop_sequence"),
        (Finish("stop", "pause_turn"), False, "pause_turn"),
        (Finish("something_new"), False, "end_turn"),
        (None, False, "end_turn"),
    ],
)
def test_stop_reasons(finish: Finish | None, refused: bool, expected: str) -> None:
    assert stop_reason(finish, refused) == expected


def test_the_stop_sequence_that_matched() -> None:
    _, events = stream([Text("Hi"), Finish("stop", "stop_sequence", "END")])
    assert events[-2][1]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "END"}


def test_usage_without_details() -> None:
    assert usage_body(Usage(10, 3), None) == {"input_tokens": 10, "output_tokens": 3}
    assert usage_body(None, None) == {}


def test_errors_before_and_after_the_commit() -> None:
    encoder = MessagesEncoder(model="a", input_tokens=1)
    limited = encoder.error_response(RateLimited("slow down", retry_after=3))
    assert (limited.status, limited.headers["Retry-After"]) == (429, "3")
    assert json.loads(limited.body) == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "slow down"},
    }
    assert encoder.error_response(Overloaded("busy")).status == 529
    [(name, body)] = events_of(encoder.error_frame(UpstreamError("cut")))
    assert (name, body["error"]["type"]) == ("error", "api_error")


def test_ping_is_anthropics_event() -> None:
    assert events_of(MessagesEncoder.ping) == [("ping", {"type": "ping"})]
