"""`ResponsesEncoder` fed pieces, without I/O (docs/protocol.md §1): the events it writes are
checked by the `openai` SDK's own stream state (the one `responses.stream()` runs, which
raises on an event out of order), and against the API's rules: one `sequence_number` more
each time, items opened and closed in order, one final event."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai import omit
from openai._models import construct_type
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import ResponseStreamEvent

from lean.encoders.responses import ResponsesEncoder
from lean.errors import UpstreamError
from lean.providers.base import (
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

MIXED: list[Piece] = [
    Reasoning("Think"),
    Reasoning("ing."),
    Signature("sig"),
    Text("Hello"),
    Text(" there."),
    Refusal("But no."),
    ToolCall(0, '{"a"', id="call_a", name="f"),
    ToolCall(1, "{", id="call_b", name="g"),
    ToolCall(0, ":1}"),
    ToolCall(1, "}"),
    Verbatim(b"[]", (Text("After."),)),
    Finish("tool_calls"),
    Usage(5, 7, cached_tokens=2),
]


def encoder(**more: Any) -> ResponsesEncoder:
    return ResponsesEncoder(model="m", echo={"store": True}, **more)


def events(data: bytes) -> list[dict[str, Any]]:
    out = []
    for block in data.decode().split("\n\n"):
        if not block or block.startswith(":"):
            continue
        name, _, payload = block.partition("\ndata: ")
        event = json.loads(payload)
        assert name == "event: " + event["type"]
        out.append(event)
    return out


def run(pieces: list[Piece], enc: ResponsesEncoder | None = None) -> list[dict[str, Any]]:
    enc = enc or encoder()
    data = enc.begin() + b"".join(filter(None, map(enc.frame, pieces))) + enc.end()
    return events(data)


def sdk_accepts(stream: list[dict[str, Any]]) -> ResponseStreamState[Any]:
    """The SDK's `responses.stream()` state, fed every event (it raises on a wrong order)."""
    state: ResponseStreamState[Any] = ResponseStreamState(input_tools=omit, text_format=omit)
    for event in stream:
        state.handle_event(construct_type(type_=ResponseStreamEvent, value=event))  # type: ignore[arg-type]
    return state


def test_every_kind_of_piece_in_order() -> None:
    stream = run(MIXED)
    assert [e["sequence_number"] for e in stream] == list(range(len(stream)))
    final = sdk_accepts(stream)._completed_response
    assert final is not None
    kinds = [(item.type, getattr(item, "status", None)) for item in final.output]
    assert kinds == [
        ("reasoning", "completed"),
        ("message", "completed"),
        ("function_call", "completed"),
        ("function_call", "completed"),
        ("message", "completed"),
    ]
    reasoning, message, call_a, call_b, after = final.output
    assert reasoning.summary[0].text == "Thinking."  # type: ignore[union-attr]
    assert [c.type for c in message.content] == ["output_text", "refusal"]  # type: ignore[union-attr]
    assert (call_a.call_id, call_a.arguments, call_b.arguments) == ("call_a", '{"a":1}', "{}")  # type: ignore[union-attr]
    assert after.content[0].text == "After."  # type: ignore[union-attr]
    assert [e["output_index"] for e in stream if e["type"] == "response.output_item.added"] == [
        0,
        1,
        2,
        3,
        4,
    ]
    usage = stream[-1]["response"]["usage"]
    assert usage == {
        "input_tokens": 5,
        "output_tokens": 7,
        "total_tokens": 12,
        "input_tokens_details": {"cached_tokens": 2},
    }


def test_the_refusal_is_the_second_content_part() -> None:
    stream = run([Text("a"), Refusal("no"), Finish("stop")])
    parts = [(e["content_index"], e["part"]["type"]) for e in stream if "part" in e]
    assert parts == [(0, "output_text"), (0, "output_text"), (1, "refusal"), (1, "refusal")]
    sdk_accepts(stream)


@pytest.mark.parametrize(
    ("finish", "reason"), [("length", "max_output_tokens"), ("content_filter", "content_filter")]
)
def test_a_cut_finish_is_incomplete(finish: str, reason: str) -> None:
    stream = run([Text("a"), Finish(finish)])
    last = stream[-1]
    assert last["type"] == "response.incomplete"
    assert last["response"]["incomplete_details"] == {"reason": reason}
    assert last["response"]["output"][0]["status"] == "incomplete"
    sdk_accepts(stream)


def test_a_failure_after_the_commit_is_response_failed_last() -> None:
    enc = encoder()
    data = enc.begin() + (enc.frame(Text("par")) or b"")
    data += enc.error_frame(UpstreamError("the upstream closed the stream"))
    stream = events(data)
    assert [e["type"] for e in stream][-1] == "response.failed"
    assert [e["sequence_number"] for e in stream] == list(range(len(stream)))
    failed = stream[-1]["response"]
    assert failed["error"] == {"code": "server_error", "message": "the upstream closed the stream"}
    assert failed["output"][0]["status"] == "incomplete"
    assert failed["output"][0]["content"][0]["text"] == "par"
    state = sdk_accepts(stream)
    assert state._completed_response is None  # get_final_response() raises for it


def test_whole_has_the_streams_output() -> None:
    stream_output = run(MIXED)[-1]["response"]["output"]
    whole = json.loads(encoder().whole(MIXED).body)  # type: ignore[arg-type]
    assert whole["status"] == "completed" and whole["object"] == "response"

    def without_ids(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in item.items() if k != "id"} for item in items]

    assert without_ids(whole["output"]) == without_ids(stream_output)


def test_on_end_is_called_once_for_an_answer_that_ended() -> None:
    ended: list[str] = []
    enc = encoder(on_end=lambda e: ended.append(e.status))
    run([Text("a"), Finish("stop")], enc)
    assert ended == ["completed"]
    cut = encoder(on_end=lambda e: ended.append(e.status))
    cut.begin()
    cut.error_frame(UpstreamError("x"))
    assert ended == ["completed"]  # a failed response is not saved
