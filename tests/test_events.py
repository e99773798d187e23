"""lean.events: wire shape (§2), framing for SSE / NDJSON / WebSocket (§3), the order machine."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from lean.events import (
    NDJSON_PING,
    SSE_PING,
    Delta,
    Done,
    Error,
    Event,
    RunEvents,
    Start,
    ToolEnd,
    ToolStart,
    Usage,
    Waiting,
    decode,
    encode,
    event_name,
    ndjson_frame,
    sse_frame,
    ws_frame,
)

M = "chat:c1:1"
START = Start(run_id="r1", message_id=M, scene="chat", model="default", conversation_id="c1")
EXAMPLES: list[tuple[Event, str, set[str]]] = [
    (START, "start", {"runId", "messageId", "scene", "model", "conversationId"}),
    (Delta(M, "hi"), "delta", {"messageId", "text", "part"}),
    (Delta(M, "hmm", part="thinking"), "delta", {"messageId", "text", "part"}),
    (
        ToolStart(M, "t1", "clock", "{}"),
        "tool_start",
        {"messageId", "toolCallId", "name", "arguments"},
    ),
    (
        ToolEnd(M, "t1", "clock", "12:00", 1.5, False),
        "tool_end",
        {"messageId", "toolCallId", "name", "result", "durationMs", "isError"},
    ),
    (
        Waiting(M, "t2", "ask_user", '{"q":1}'),
        "waiting",
        {"messageId", "toolCallId", "name", "arguments"},
    ),
    (
        Done(M, "stop", Usage(3, 5), "hi there"),
        "done",
        {"messageId", "finishReason", "usage", "text", "fallback", "saved"},
    ),
    (
        Error(M, "cancelled", "the run was cancelled"),
        "error",
        {"messageId", "code", "message", "retryable"},
    ),
]
TRICKY = [
    "a\nb",
    "a\r\nb\rc",
    "line\u2028sep\u2029para\x85nel",
    "😀 emoji",
    "\x00\x0b\x0c\x1c",
    'q"\\',
]


def no_dup_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    assert len(keys) == len(set(keys)), keys
    return dict(pairs)


def loads(data: bytes) -> dict[str, Any]:
    obj = json.loads(data, object_pairs_hook=no_dup_keys)
    assert isinstance(obj, dict)
    return obj


def sse_fields(frame: bytes) -> list[tuple[str, str]]:
    """Line-based reader by the WHATWG rules: only CR, LF and CRLF end a line."""
    assert frame.endswith(b"\n\n")
    lines = frame[:-2].replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    return [(k.decode(), v.decode()) for k, _, v in (ln.partition(b": ") for ln in lines)]


@pytest.mark.parametrize(("event", "name", "keys"), EXAMPLES)
def test_round_trip_and_wire_keys(event: Event, name: str, keys: set[str]) -> None:
    data = encode(event)
    assert decode(data) == event
    assert decode(data.decode()) == event
    assert data.startswith(b'{"type":"%b",' % name.encode())
    assert b"\n" not in data
    obj = loads(data)
    assert set(obj) == keys | {"type"}
    assert obj["type"] == name == event_name(event)


def test_done_usage_and_defaults_on_the_wire() -> None:
    obj = loads(encode(Done(M, "stop", Usage(prompt_tokens=3, completion_tokens=5), "t")))
    assert obj["usage"] == {"promptTokens": 3, "completionTokens": 5}
    assert obj["fallback"] is False
    assert loads(encode(Done(M, "stop", Usage(), "t", fallback=True)))["fallback"] is True
    assert loads(encode(Error(M, "internal", "x")))["retryable"] is False
    assert loads(encode(Delta(M, "x")))["part"] == "content"


def test_events_are_frozen() -> None:
    with pytest.raises(AttributeError):
        START.run_id = "other"  # type: ignore[misc]


def test_decode_rejects_unknown_type_such_as_the_ndjson_ping() -> None:
    with pytest.raises(msgspec.ValidationError):
        decode(NDJSON_PING)
    assert json.loads(NDJSON_PING) == {"type": "ping"}


@pytest.mark.parametrize("text", TRICKY)
def test_text_stays_on_one_line_for_every_reader(text: str) -> None:
    data = encode(Delta(M, text))
    assert decode(data) == Delta(M, text)
    # str.splitlines() (httpx iter_lines) also splits on \x85, \u2028, \u2029: escaped too.
    assert len(data.decode().splitlines()) == 1
    assert len(data.splitlines()) == 1


def test_every_str_splitlines_break_is_escaped() -> None:
    breaks = "".join(c for c in map(chr, range(0x3000)) if len(f"a{c}b".splitlines()) > 1)
    assert len(breaks) == 10  # \n \v \f \r \x1c \x1d \x1e \x85 \u2028 \u2029
    data = encode(Delta(M, breaks))
    assert data.isascii() and len(data.decode().splitlines()) == 1
    assert decode(data) == Delta(M, breaks)


def test_other_non_ascii_stays_raw_utf8() -> None:
    # "†" (E2 80 A0) and "ɀ" (C9 80) carry a 0x80 byte but are not line breaks: left as they are.
    for text in ["你好，世界", "†ɀ…\x84\x86", "😀"]:
        assert encode(Delta(M, text)) == msgspec.json.encode(Delta(M, text))


def test_lone_surrogates_are_replaced_not_raised() -> None:
    # msgspec raises UnicodeEncodeError on a lone surrogate; encode() retries with U+FFFD.
    with pytest.raises(UnicodeEncodeError):
        msgspec.json.encode(Delta(M, "a\ud800b"))
    assert decode(encode(Delta(M, "a\ud800b\udfff"))) == Delta(M, "a\ufffdb\ufffd")
    # A pair split into two code points is re-joined; other fields are cleaned too.
    event = ToolEnd(M, "t\udc00", "n", "\ud83d\ude00", 0.0, True)
    assert decode(encode(event)) == ToolEnd(M, "t\ufffd", "n", "😀", 0.0, True)


@pytest.mark.parametrize("text", TRICKY)
def test_sse_frame(text: str) -> None:
    payload = encode(Delta(M, text))
    frame = sse_frame("delta", 7, payload)
    assert frame == b"event: delta\nid: 7\ndata: " + payload + b"\n\n"
    fields = sse_fields(frame)
    assert fields[:2] == [("event", "delta"), ("id", "7")]
    assert len(fields) == 3 and fields[2][0] == "data"
    assert decode(fields[2][1]) == Delta(M, text)


def test_sse_frame_other_names_and_ping() -> None:
    assert sse_frame("ping", 1, b"{}") == b"event: ping\nid: 1\ndata: {}\n\n"
    with pytest.raises(RuntimeError):
        sse_frame("bad\nname", 1, b"{}")
    assert SSE_PING == b": ping\n\n"


@pytest.mark.parametrize(("event", "name", "keys"), EXAMPLES)
def test_ndjson_frame(event: Event, name: str, keys: set[str]) -> None:
    line = ndjson_frame(encode(event), 12)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert loads(line) == {**loads(encode(event)), "seq": 12}
    assert loads(line)["type"] == name
    assert NDJSON_PING.endswith(b"\n") and NDJSON_PING.count(b"\n") == 1


@pytest.mark.parametrize(("event", "name", "keys"), EXAMPLES)
def test_ws_frame_adds_run_id_and_seq(event: Event, name: str, keys: set[str]) -> None:
    payload = encode(event)
    frame = ws_frame("r1", payload, 3)
    obj = loads(frame)
    if isinstance(event, Start):  # its own runId, not the frame's
        assert obj == {**loads(payload), "seq": 3}
        assert ws_frame("r1", payload) is payload
    else:
        assert obj == {**loads(payload), "runId": "r1", "seq": 3}
        assert frame == b'{"runId":"r1",' + payload[1:-1] + b',"seq":3}'
        assert loads(ws_frame("r1", payload)) == {**loads(payload), "runId": "r1"}  # no seq


def test_ws_frame_escapes_run_id_and_allows_null() -> None:
    payload = encode(Error(M, "bad_request", "bad frame"))
    assert loads(ws_frame('r"\n', payload))["runId"] == 'r"\n'
    assert loads(ws_frame(None, payload))["runId"] is None


def test_run_events_valid_sequences() -> None:
    run = RunEvents()
    events: list[Event] = [
        START,
        Delta(M, "a"),
        ToolStart(M, "t1", "clock", "{}"),
        ToolEnd(M, "t1", "clock", "x", 1.0, False),
        ToolStart(M, "t2", "ask_user", "{}"),
        Waiting(M, "t2", "ask_user", "{}"),
        ToolEnd(M, "t2", "ask_user", "yes", 9.0, False),
        Waiting(M, "t3", "ask_user", "{}"),  # stand-alone waiting opens the call
        ToolEnd(M, "t3", "ask_user", "no", 9.0, False),
        Delta(M, "b", part="thinking"),
        Done(M, "stop", Usage(), "ab"),
    ]
    assert [run.check(e) for e in events] == list(range(1, len(events) + 1))
    assert run.finished and run.seq == len(events)
    short = RunEvents()
    assert not short.finished and short.seq == 0
    assert [short.check(START), short.check(Error(M, "cancelled", "x"))] == [1, 2]
    assert short.finished


@pytest.mark.parametrize(
    "events",
    [
        [Delta(M, "x")],
        [Done(M, "stop", Usage(), "")],
        [START, START],
        [START, Done(M, "stop", Usage(), ""), Delta(M, "x")],
        [START, Error(M, "internal", "x"), Delta(M, "x")],
        [START, Error(M, "internal", "x"), Done(M, "stop", Usage(), "")],
        [START, Done(M, "stop", Usage(), ""), Error(M, "internal", "x")],
        [START, Done(M, "stop", Usage(), ""), START],
        [START, ToolEnd(M, "nope", "clock", "x", 1.0, False)],
        [
            START,
            ToolStart(M, "t1", "c", "{}"),
            ToolEnd(M, "t1", "c", "", 1, False),
            ToolEnd(M, "t1", "c", "", 1, False),
        ],
        [START, ToolStart(M, "t1", "c", "{}"), ToolStart(M, "t1", "c", "{}")],
    ],
    ids=[
        "delta-before-start",
        "done-before-start",
        "double-start",
        "after-done",
        "after-error",
        "done-after-error",
        "error-after-done",
        "start-after-done",
        "tool-end-unknown-id",
        "tool-end-twice",
        "tool-start-open-id",
    ],
)
def test_run_events_misuse_raises(events: list[Event]) -> None:
    run = RunEvents()
    *good, bad = events
    for e in good:
        run.check(e)
    seq, finished = run.seq, run.finished
    with pytest.raises(RuntimeError):
        run.check(bad)
    assert (run.seq, run.finished) == (seq, finished)  # a rejected event changes nothing
