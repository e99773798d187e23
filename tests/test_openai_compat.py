"""Chat Completions in and out, without I/O: validation messages and chunk framing."""

from __future__ import annotations

import json

import pytest

from lean.errors import BadRequest
from lean.openai_compat import ChunkFramer, completion_body, parse_request
from lean.providers.base import Finish, Reasoning, Text, ToolCall, Usage


def frame_json(frame: bytes) -> dict[str, object]:
    assert frame.startswith(b"data: ") and frame.endswith(b"\n\n")
    assert frame.count(b"\n") == 2  # one line per frame, whatever the text holds
    result: dict[str, object] = json.loads(frame[6:])
    return result


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"model": "default"}', "`messages`"),
        (b'{"messages": [{"role": "user", "content": "x"}]}', "`model`"),
        (b'{"model": "default", "messages": "hi"}', "$.messages"),
        (b'{"model": "default", "messages": []}', "$.messages"),
        (b'{"model": "default", "messages": [{"role": "bot"}]}', "$.messages[0].role"),
        (b'{"model": 3, "messages": [{"role": "user"}]}', "$.model"),
        (b'{"model": "m", "messages": [{"role": "user"}], "stream": "yes"}', "$.stream"),
        (b'{"model": "m", "messages": [{"role": "user"}], "n": 2}', "$.n"),
        (b'{"model": "m", "messages": [{"role": "user"}], "temperature": 9}', "$.temperature"),
    ],
)
def test_bad_requests_name_the_field(body: bytes, named: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_request(body)
    assert named in info.value.message


def test_unknown_parameters_pass_through() -> None:
    request, raw = parse_request(
        b'{"model":"m","messages":[{"role":"user","content":"x"}],"seed":1,"stream":true,'
        b'"stream_options":{"include_usage":true},"response_format":{"type":"json_object"}}'
    )
    assert request.stream and request.stream_options and request.stream_options.include_usage
    assert raw["seed"] == 1 and raw["response_format"] == {"type": "json_object"}
    assert "stream" not in raw and "stream_options" not in raw  # lean sets these itself


def test_framer_first_delta_carries_the_role() -> None:
    framer = ChunkFramer(completion_id="chatcmpl-1", model="default", include_usage=False)
    first = frame_json(framer.frame(Text("Hi")) or b"")
    second = frame_json(framer.frame(Text(" there\n\u2028")) or b"")
    assert first["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": "Hi"}, "finish_reason": None}
    ]
    assert second["choices"] == [
        {"index": 0, "delta": {"content": " there\n\u2028"}, "finish_reason": None}
    ]
    assert first["id"] == "chatcmpl-1" and first["object"] == "chat.completion.chunk"
    assert first["model"] == "default" and isinstance(first["created"], int)


def test_framer_reasoning_tools_finish_usage_done() -> None:
    framer = ChunkFramer(completion_id="c", model="m", include_usage=True)
    frames = [
        framer.frame(p)
        for p in [
            Reasoning("hmm"),
            ToolCall(0, "", "call_1", "f"),
            ToolCall(0, '{"a":1}'),
            Finish("tool_calls"),
            Usage(5, 2),
        ]
    ]
    assert frames[-1] is None  # usage is held for the end
    reasoning, call_open, call_args, finish = (frame_json(f or b"") for f in frames[:4])
    assert reasoning["choices"][0]["delta"] == {"role": "assistant", "reasoning_content": "hmm"}  # type: ignore[index]
    assert call_open["choices"][0]["delta"] == {  # type: ignore[index]
        "tool_calls": [
            {
                "index": 0,
                "id": "call_1",
                "type": "function",
                "function": {"name": "f", "arguments": ""},
            }
        ]
    }
    assert call_args["choices"][0]["delta"] == {  # type: ignore[index]
        "tool_calls": [{"index": 0, "function": {"arguments": '{"a":1}'}}]
    }
    assert finish["choices"][0]["finish_reason"] == "tool_calls"  # type: ignore[index]
    usage_frame, done = framer.end().split(b"\n\n", 1)
    usage = json.loads(usage_frame[6:])
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    assert done == b"data: [DONE]\n\n"


def test_framer_without_usage_ends_with_done_only() -> None:
    framer = ChunkFramer(completion_id="c", model="m", include_usage=False)
    framer.frame(Usage(1, 1))
    assert framer.end() == b"data: [DONE]\n\n"


def test_completion_body_assembles_the_answer() -> None:
    body = json.loads(
        completion_body(
            [
                Text("a"),
                Text("b"),
                ToolCall(0, '{"x":', "call_1", "f"),
                ToolCall(0, "1}"),
                Finish("tool_calls"),
                Usage(3, 4),
            ],
            completion_id="c",
            model="m",
        )
    )
    message = body["choices"][0]["message"]
    assert message["content"] == "ab"
    assert message["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"x":1}'}}
    ]
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    assert body["usage"]["total_tokens"] == 7
