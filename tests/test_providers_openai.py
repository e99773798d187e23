"""The OpenAI-compatible stream translator, fed real wire bytes through lean's SSE parser."""

from __future__ import annotations

import json

import pytest

from lean.errors import LeanError, Overloaded, RateLimited, UpstreamError
from lean.providers.base import Finish, Piece, Reasoning, Refusal, Text, ToolCall, Usage, Verbatim
from lean.providers.openai import StreamTranslator, build_request, parse_completion
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


def data(obj: object) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def chunk(delta: dict[str, object], finish: str | None = None, **extra: object) -> bytes:
    return data({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra})


DONE = b"data: [DONE]\n\n"
USAGE = data({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}})
TEXT_STREAM = (
    chunk({"role": "assistant", "content": ""})
    + chunk({"content": "Hel"})
    + chunk({"content": "lo"})
    + chunk({}, "stop")
    + USAGE
    + DONE
)


def test_text_finish_and_usage_chunk() -> None:
    assert translate(TEXT_STREAM) == [Text("Hel"), Text("lo"), Finish("stop"), Usage(7, 3)]


@pytest.mark.parametrize("split", [1, 2, 3, 7, 64])
def test_any_chunking_gives_the_same_pieces(split: int) -> None:
    assert translate(TEXT_STREAM, split=split) == translate(TEXT_STREAM)


def test_azure_first_chunk_with_empty_choices_is_skipped() -> None:
    wire = data({"choices": [], "prompt_filter_results": []}) + chunk({"content": "x"}, "stop")
    assert translate(wire + DONE) == [Text("x"), Finish("stop")]


def test_openrouter_comments_are_not_content() -> None:
    wire = b": OPENROUTER PROCESSING\n\n" + chunk({"content": "a"}) + b": ping\n\n"
    assert translate(wire + chunk({}, "stop") + DONE) == [Text("a"), Finish("stop")]


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_reasoning_in_either_field(field: str) -> None:
    wire = chunk({field: "think"}) + chunk({"content": "ok"}, "stop") + DONE
    assert translate(wire) == [Reasoning("think"), Text("ok"), Finish("stop")]


def test_tool_call_fragments_by_index() -> None:
    first = {
        "index": 0,
        "id": "call_a",
        "type": "function",
        "function": {"name": "f", "arguments": ""},
    }
    second = {"index": 1, "id": "call_b", "type": "function", "function": {"name": "g"}}
    wire = (
        chunk({"tool_calls": [first]})
        + chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]})
        + chunk({"tool_calls": [second]})
        + chunk({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]})
        + chunk({}, "tool_calls")
        + DONE
    )
    assert translate(wire) == [
        ToolCall(0, "", "call_a", "f"),
        ToolCall(0, '{"a":'),
        ToolCall(1, "", "call_b", "g"),
        ToolCall(0, "1}"),
        Finish("tool_calls"),
    ]


def test_usage_on_the_finish_chunk() -> None:
    wire = chunk({"content": "a"}, "stop", usage={"prompt_tokens": 2, "completion_tokens": 1})
    assert translate(wire + DONE) == [Text("a"), Finish("stop"), Usage(2, 1)]


def test_done_without_finish_reason_finishes_with_stop() -> None:
    assert translate(chunk({"content": "a"}) + DONE) == [Text("a"), Finish("stop")]


def test_finish_reason_without_done_is_complete() -> None:
    assert translate(chunk({"content": "a"}, "length")) == [Text("a"), Finish("length")]


def test_truncated_stream_raises_never_finishes() -> None:
    with pytest.raises(UpstreamError, match="truncated"):
        translate(chunk({"content": "a"}) + chunk({"content": "b"}))


def test_unterminated_last_event_is_truncation() -> None:
    with pytest.raises(UpstreamError, match="truncated"):
        translate(
            chunk({"content": "a"})
            + b'data: {"choices":[{"index":0,"delta":{}, "finish_reason":"stop"}]}'
        )


def test_unparseable_chunk_is_an_upstream_error() -> None:
    with pytest.raises(UpstreamError, match="unparseable"):
        translate(b"data: {not json\n\n")


def test_invalid_utf8_is_replaced_not_fatal() -> None:
    wire = (
        b'data: {"choices":[{"index":0,"delta":{"content":"a\xffb"},"finish_reason":"stop"}]}\n\n'
    )
    assert translate(wire + DONE) == [Text("a\ufffdb"), Finish("stop")]


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        ({"message": "slow down", "type": "rate_limit_exceeded"}, RateLimited),
        ({"message": "busy", "type": "overloaded_error"}, Overloaded),
        ({"message": "boom", "type": "server_error"}, UpstreamError),
        ("plain string error", UpstreamError),
    ],
)
def test_inband_error_object(error: object, kind: type[LeanError]) -> None:
    with pytest.raises(kind):
        translate(chunk({"content": "a"}) + data({"error": error}))


def test_parse_completion_text_reasoning_tools_usage() -> None:
    body = {
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "hi",
                    "reasoning_content": "hmm",
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{}"},
                        }
                    ],
                },
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {"prompt_tokens": 4, "completion_tokens": 2},
    }
    assert parse_completion(json.dumps(body).encode()) == [
        Reasoning("hmm"),
        Text("hi"),
        ToolCall(0, "{}", "c1", "f"),
        Finish("tool_calls"),
        Usage(4, 2),
    ]


def test_parse_completion_without_choices_raises() -> None:
    with pytest.raises(UpstreamError):
        parse_completion(b'{"choices": []}')


def test_build_request_aims_at_the_upstream_model_and_asks_for_usage() -> None:
    config = lean_config("http://127.0.0.1:1/v1", model="max_tokens = 99")
    model = config.models["default"]
    body = {"model": "default", "messages": [], "seed": 7}
    req = build_request(config.providers["up"], model, body, stream=True)
    sent = json.loads(req.body)
    assert req.url == "http://127.0.0.1:1/v1/chat/completions"
    assert sent["model"] == "fake-model"
    assert sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}
    assert sent["seed"] == 7 and sent["max_tokens"] == 99
    assert req.headers["Authorization"] == f"Bearer {SECRET}"
    plain = json.loads(build_request(config.providers["up"], model, body, stream=False).body)
    assert plain["stream"] is False and "stream_options" not in plain
    assert body == {"model": "default", "messages": [], "seed": 7}  # the caller's dict untouched


def test_logprobs_keep_the_chunk_verbatim_and_a_null_one_does_not() -> None:
    logprobs = {"content": [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105]}]}
    wire = (
        data({"choices": [{"index": 0, "delta": {"content": "a"}, "logprobs": None}]})
        + data({"choices": [{"index": 0, "delta": {"content": "Hi"}, "logprobs": logprobs}]})
        + data({"choices": [{"index": 0, "delta": {"annotations": []}, "finish_reason": "stop"}]})
        + b"data: [DONE]\n\n"
    )
    plain, kept, finish = translate(wire)
    assert plain == Text("a") and finish == Finish("stop")  # null and [] are nothing to keep
    assert isinstance(kept, Verbatim) and kept.pieces == (Text("Hi"),)
    assert json.loads(kept.choices)[0]["logprobs"] == logprobs


def test_fields_lean_does_not_know_keep_the_chunk_verbatim() -> None:
    details = [{"type": "reasoning.encrypted", "data": "gAAA", "index": 0}]
    wire = (
        data({"choices": [{"index": 0, "delta": {"role": "assistant", "content": "a"}}]})
        + data({"choices": [{"index": 0, "delta": {"content": "b", "reasoning_details": details}}]})
        + data(
            {
                "choices": [
                    {
                        "index": 0,
                        "delta": {},
                        "finish_reason": "stop",
                        "native_finish_reason": "end_turn",
                    }
                ]
            }
        )
        + b"data: [DONE]\n\n"
    )
    plain, kept, last = translate(wire)
    assert plain == Text("a")  # `role` is known: the usual chunk
    assert isinstance(kept, Verbatim) and kept.pieces == (Text("b"),)
    assert json.loads(kept.choices)[0]["delta"]["reasoning_details"] == details
    assert isinstance(last, Verbatim) and last.pieces == (Finish("stop"),)
    assert json.loads(last.choices)[0]["native_finish_reason"] == "end_turn"


def test_a_refusal_is_its_own_piece() -> None:
    wire = data({"choices": [{"index": 0, "delta": {"refusal": "No."}, "finish_reason": "stop"}]})
    assert translate(wire) == [Refusal("No."), Finish("stop")]
