"""lean.sse: one test per WHATWG corner case, and recorded streams split every way."""

from __future__ import annotations

import random
import re

import msgspec
import pytest

from lean.sse import MAX_EVENT_BYTES, SSEMessage, SSEParser, SSEProtocolError


def parse(*chunks: bytes) -> list[SSEMessage]:
    parser = SSEParser()
    messages: list[SSEMessage] = []
    for chunk in chunks:
        messages += parser.feed(chunk)
    parser.close()
    return messages


def datas(*chunks: bytes) -> list[str]:
    return [m.data for m in parse(*chunks)]


def bytewise(stream: bytes) -> list[SSEMessage]:
    return parse(*(stream[i : i + 1] for i in range(len(stream))))


# -- The spec's examples (WHATWG HTML §9.2.6) ------------------------------------------


def test_spec_multiline_data() -> None:
    assert parse(b"data: YHOO\ndata: +2\ndata: 10\n\n") == [SSEMessage("YHOO\n+2\n10")]


def test_spec_comment_ids_and_leading_space() -> None:
    stream = (
        b": test stream\n\n"
        b"data: first event\nid: 1\n\n"
        b"data:second event\nid\n\n"
        b"data:  third event\n\n"
    )
    assert parse(stream) == [
        SSEMessage("first event", id="1"),
        SSEMessage("second event", id=""),
        SSEMessage(" third event", id=""),
    ]


def test_spec_empty_data_and_newline_data() -> None:
    # "data" alone fires "", two of them fire "\n"; the last block has no blank line.
    assert datas(b"data\n\ndata\ndata\n\ndata:") == ["", "\n"]


def test_spec_space_after_colon_is_optional() -> None:
    assert datas(b"data:test\n\ndata: test\n\n") == ["test", "test"]


def test_spec_event_types() -> None:
    stream = (
        b"event: add\ndata: 73857293\n\nevent: remove\ndata: 2153\n\nevent: add\ndata: 113411\n\n"
    )
    assert [(m.event, m.data) for m in parse(stream)] == [
        ("add", "73857293"),
        ("remove", "2153"),
        ("add", "113411"),
    ]


def test_block_without_data_dispatches_nothing_and_resets_type() -> None:
    assert parse(b"event: ping\nid: 7\n\ndata: x\n\n") == [SSEMessage("x", id="7")]


def test_event_type_resets_after_dispatch() -> None:
    assert [m.event for m in parse(b"event: a\ndata: 1\n\ndata: 2\n\n")] == ["a", ""]


# -- Line ends --------------------------------------------------------------------------


def test_lone_cr() -> None:
    assert datas(b"data: a\r\rdata: b\rdata: c\r\r") == ["a", "b\nc"]


def test_crlf() -> None:
    assert datas(b"data: a\r\n\r\ndata: b\r\ndata: c\r\n\r\n") == ["a", "b\nc"]


def test_mixed_line_ends() -> None:
    assert datas(b"data: a\r\ndata: b\rdata: c\n\r\ndata: d\r\r\n") == ["a\nb\nc", "d"]


def test_cr_cr_lf_is_two_line_ends() -> None:
    assert datas(b"data: a\r\r\n") == ["a"]


def test_crlf_split_across_feeds() -> None:
    assert datas(b"data: a\r", b"\n\r", b"\ndata: b\r", b"\n", b"\r\n") == ["a", "b"]


def test_crlf_split_with_empty_feed_between() -> None:
    assert datas(b"data: a\r", b"", b"\n", b"\r\n") == ["a"]


def test_cr_at_end_of_feed_then_cr() -> None:
    assert datas(b"data: a\r", b"\rdata: b\r\r") == ["a", "b"]


def test_unicode_line_separators_are_not_line_ends() -> None:
    value = "a\u2028b\u2029c\x85d\x0be\x0cf"
    assert datas(b"data: %b\n\n" % value.encode()) == [value]


# -- Byte order mark --------------------------------------------------------------------


def test_bom_stripped() -> None:
    assert datas(b"\xef\xbb\xbfdata: first\n\ndata: second\n\n") == ["first", "second"]


def test_bom_split_across_feeds() -> None:
    assert datas(b"\xef", b"\xbb", b"\xbfdata: first\n\n") == ["first"]


def test_bom_only_at_start() -> None:
    # A second BOM is part of the first line: field "\ufeffdata" is unknown.
    assert datas(b"\xef\xbb\xbf\xef\xbb\xbfdata: a\n\ndata: b\n\n") == ["b"]
    assert datas(b"data: a\n\n\xef\xbb\xbfdata: b\n\ndata: c\n\n") == ["a", "c"]
    assert datas(b"data: \xef\xbb\xbfa\n\n") == ["\ufeffa"]


def test_bom_prefix_that_is_not_a_bom_is_kept() -> None:
    assert datas(b"\xef", b"\xbbdata: a\n\ndata: b\n\n") == ["b"]
    assert datas(b"\xef\xbb", b"x\n\ndata: b\n\n") == ["b"]


# -- Fields -----------------------------------------------------------------------------


def test_only_one_space_removed() -> None:
    assert datas(b"data:  two spaces\n\n") == [" two spaces"]
    assert datas(b"data:\ttab\n\n") == ["\ttab"]


def test_line_without_colon_is_field_with_empty_value() -> None:
    assert parse(b"event: x\nevent\ndata\n\n") == [SSEMessage("")]


def test_colon_in_value_kept() -> None:
    assert datas(b'data: {"a":"b: c"}\n\n') == ['{"a":"b: c"}']


def test_field_names_are_case_sensitive() -> None:
    assert datas(b"Data: x\nDATA: y\ndata: z\n\n") == ["z"]


def test_unknown_field_ignored() -> None:
    assert parse(b"foo: bar\ndata: x\nbaz\n\n") == [SSEMessage("x")]


def test_comments_ignored_and_counted() -> None:
    parser = SSEParser()
    assert parser.feed(b": one\ndata: a\n:two\n\n:\n\n") == [SSEMessage("a")]
    assert parser.comments() == 3


def test_id_none_when_never_set() -> None:
    assert parse(b"data: a\n\n")[0].id is None


def test_id_with_nul_ignored() -> None:
    assert [m.id for m in parse(b"id: 1\ndata: a\n\nid: 2\x003\ndata: b\n\n")] == ["1", "1"]


def test_id_persists_across_events_and_empty_id_resets() -> None:
    stream = b"id: 1\ndata: a\n\ndata: b\n\nid\ndata: c\n\nid: 2\n\ndata: d\n\n"
    assert [m.id for m in parse(stream)] == ["1", "1", "", "2"]


def test_retry_digits_only() -> None:
    stream = (
        b"retry: 3000\ndata: a\n\n"
        b"retry: 30s\ndata: b\n\n"
        b"retry: -1\ndata: c\n\n"
        b"retry:\ndata: d\n\n"
        b"retry: \xd9\xa1\xd9\xa2\ndata: e\n\n"  # Arabic-Indic digits are not ASCII
        b"retry: 1.5\ndata: f\n\n"
    )
    assert [m.retry for m in parse(stream)] == [3000, None, None, None, None, None]


def test_retry_belongs_to_its_block() -> None:
    stream = b"retry: 10\n\ndata: a\n\nretry: 20\nretry: x\ndata: b\n\ndata: c\n\n"
    assert [m.retry for m in parse(stream)] == [None, 20, None]


def test_invalid_utf8_replaced() -> None:
    assert parse(b"event: \xff\ndata: a\xe2\x82\ndata: \xc3\n\n") == [
        SSEMessage("a\ufffd\n\ufffd", event="\ufffd")
    ]


def test_multibyte_split_across_feeds() -> None:
    raw = "data: “héllo” 🌍\n\n".encode()
    assert datas(raw[:9], raw[9:18], raw[18:]) == ["“héllo” 🌍"]


# -- End of stream and bounds -----------------------------------------------------------


def test_unterminated_last_event_dropped_on_close() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\n\ndata: b\n") == [SSEMessage("a")]
    parser.close()
    parser.close()  # idempotent
    with pytest.raises(RuntimeError):
        parser.feed(b"\n")


def test_event_bound_exceeded_raises() -> None:
    parser = SSEParser(max_event_bytes=100)
    with pytest.raises(SSEProtocolError, match="max_event_bytes=100"):
        parser.feed(b"data: xxxxxxxxxx\n" * 20)


def test_incomplete_line_over_bound_raises() -> None:
    parser = SSEParser(max_event_bytes=100)
    parser.feed(b"data: ")
    with pytest.raises(SSEProtocolError):
        for _ in range(200):
            parser.feed(b"x")
    with pytest.raises(RuntimeError):  # the parser is closed once it has failed
        parser.feed(b"\n\n")


def test_bound_counts_data_and_the_pending_line() -> None:
    parser = SSEParser(max_event_bytes=100)
    parser.feed(b"data: " + b"x" * 60 + b"\n")
    with pytest.raises(SSEProtocolError):
        parser.feed(b"data: " + b"y" * 50)


def test_bound_resets_per_event_and_ignores_comments() -> None:
    parser = SSEParser(max_event_bytes=100)
    for _ in range(50):
        assert parser.feed(b"data: " + b"x" * 80 + b"\n\n") == [SSEMessage("x" * 80)]
        assert parser.feed(b": keep-alive without blank line\n") == []


def test_large_but_allowed_event() -> None:
    payload = b"x" * (MAX_EVENT_BYTES - 16)
    parser = SSEParser()
    messages = []
    for i in range(0, len(payload), 65536):
        messages += parser.feed(b"data: " + payload[i : i + 65536] + b"\n")
    messages += parser.feed(b"\n")
    assert len(messages) == 1
    assert messages[0].data.replace("\n", "") == payload.decode()


def test_large_line_fed_byte_by_byte_is_linear() -> None:
    payload = b"data: " + b"x" * 200_000 + b"\n\n"
    assert bytewise(payload) == [SSEMessage("x" * 200_000)]


def test_max_event_bytes_must_be_positive() -> None:
    with pytest.raises(ValueError):
        SSEParser(max_event_bytes=0)


# -- Recorded provider streams, split at every offset -----------------------------------

# OpenRouter relaying OpenAI Chat Completions: keep-alive comments, then chunks, [DONE].
OPENAI = (
    b": OPENROUTER PROCESSING\n\n"
    b": OPENROUTER PROCESSING\n\n"
    b'data: {"id":"gen-1732201234-q5GmEaKxYc2Z","provider":"OpenAI","model":"openai/gpt-4o-mini",'
    b'"object":"chat.completion.chunk","created":1732201234,"choices":[{"index":0,"delta":'
    b'{"role":"assistant","content":""},"finish_reason":null,"native_finish_reason":null,'
    b'"logprobs":null}],"system_fingerprint":"fp_0ba0d124f1"}\n\n'
    b'data: {"id":"gen-1732201234-q5GmEaKxYc2Z","provider":"OpenAI","model":"openai/gpt-4o-mini",'
    b'"object":"chat.completion.chunk","created":1732201234,"choices":[{"index":0,"delta":'
    b'{"role":"assistant","content":"Hello"},"finish_reason":null,"native_finish_reason":null,'
    b'"logprobs":null}],"system_fingerprint":"fp_0ba0d124f1"}\n\n'
    b": OPENROUTER PROCESSING\n\n"
    b'data: {"id":"gen-1732201234-q5GmEaKxYc2Z","provider":"OpenAI","model":"openai/gpt-4o-mini",'
    b'"object":"chat.completion.chunk","created":1732201234,"choices":[{"index":0,"delta":'
    b'{"role":"assistant","content":" \xe2\x80\x94 \xe2\x80\x9cworld\xe2\x80\x9d \xe2\x9c\x93"},'
    b'"finish_reason":null,"native_finish_reason":null,"logprobs":null}],'
    b'"system_fingerprint":"fp_0ba0d124f1"}\n\n'
    b'data: {"id":"gen-1732201234-q5GmEaKxYc2Z","provider":"OpenAI","model":"openai/gpt-4o-mini",'
    b'"object":"chat.completion.chunk","created":1732201234,"choices":[{"index":0,"delta":'
    b'{"role":"assistant","content":""},"finish_reason":"stop","native_finish_reason":"stop",'
    b'"logprobs":null}],"system_fingerprint":"fp_0ba0d124f1"}\n\n'
    b'data: {"id":"gen-1732201234-q5GmEaKxYc2Z","provider":"OpenAI","model":"openai/gpt-4o-mini",'
    b'"object":"chat.completion.chunk","created":1732201234,"choices":[{"index":0,"delta":'
    b'{"role":"assistant","content":""},"finish_reason":null,"native_finish_reason":null,'
    b'"logprobs":null}],"usage":{"prompt_tokens":12,"completion_tokens":6,"total_tokens":18}}\n\n'
    b"data: [DONE]\n\n"
)

# Anthropic Messages: every event carries an `event:` line.
ANTHROPIC = (
    b"event: message_start\n"
    b'data: {"type":"message_start","message":{"id":"msg_01XFDUDYJgAACzvnptvVoYEL",'
    b'"type":"message","role":"assistant","content":[],"model":"claude-sonnet-4-5-20250929",'
    b'"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":25,'
    b'"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":1}}}\n\n'
    b"event: content_block_start\n"
    b'data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\n\n'
    b"event: ping\n"
    b'data: {"type": "ping"}\n\n'
    b"event: content_block_delta\n"
    b'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta",'
    b'"text":"Hello"}}\n\n'
    b"event: content_block_delta\n"
    b'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta",'
    b'"text":"! \xc3\xa7a va?\\n"}}\n\n'
    b"event: content_block_stop\n"
    b'data: {"type":"content_block_stop","index":0}\n\n'
    b"event: message_delta\n"
    b'data: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},'
    b'"usage":{"output_tokens":15}}\n\n'
    b"event: message_stop\n"
    b'data: {"type":"message_stop"}\n\n'
)

# Gemini streamGenerateContent?alt=sse: CRLF line ends, no end marker.
GEMINI = (
    b'data: {"candidates": [{"content": {"parts": [{"text": "Hello"}],"role": "model"},'
    b'"index": 0}],"usageMetadata": {"promptTokenCount": 4,"totalTokenCount": 4},'
    b'"modelVersion": "gemini-2.0-flash","responseId": "xAY-Z6nJLJ2nmtkPqK7VyQk"}\r\n\r\n'
    b'data: {"candidates": [{"content": {"parts": [{"text": " there! How can I help you'
    b' today?\\n"}],"role": "model"},"index": 0}],"usageMetadata": {"promptTokenCount": 4,'
    b'"totalTokenCount": 4},"modelVersion": "gemini-2.0-flash",'
    b'"responseId": "xAY-Z6nJLJ2nmtkPqK7VyQk"}\r\n\r\n'
    b'data: {"candidates": [{"content": {"parts": [{"text": ""}],"role": "model"},'
    b'"finishReason": "STOP","index": 0}],"usageMetadata": {"promptTokenCount": 4,'
    b'"candidatesTokenCount": 11,"totalTokenCount": 15,"promptTokensDetails": [{"modality": '
    b'"TEXT","tokenCount": 4}]},"modelVersion": "gemini-2.0-flash",'
    b'"responseId": "xAY-Z6nJLJ2nmtkPqK7VyQk"}\r\n\r\n'
)

# A small stream with every line end and a BOM, for splits into three pieces.
TRICKY = b"\xef\xbb\xbfid: 1\rdata: a\r\ndata\r\r:c\n\nevent: e\r\ndata:  b\r\n\rdata: c\n\n"

STREAMS = {"openai": OPENAI, "anthropic": ANTHROPIC, "gemini": GEMINI, "tricky": TRICKY}


def test_recorded_openai() -> None:
    messages = parse(OPENAI)
    assert len(messages) == 6
    assert messages[-1] == SSEMessage("[DONE]")
    chunks = [msgspec.json.decode(m.data) for m in messages[:-1]]
    contents = [c["choices"][0]["delta"]["content"] for c in chunks]
    assert "".join(contents) == "Hello — “world” ✓"
    assert chunks[-1]["usage"]["total_tokens"] == 18
    parser = SSEParser()
    parser.feed(OPENAI)
    assert parser.comments() == 3


def test_recorded_anthropic() -> None:
    messages = parse(ANTHROPIC)
    assert [m.event for m in messages] == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(msgspec.json.decode(m.data)["type"] == m.event for m in messages)
    assert msgspec.json.decode(messages[4].data)["delta"]["text"] == "! ça va?\n"


def test_recorded_gemini_crlf() -> None:
    messages = parse(GEMINI)
    assert len(messages) == 3
    chunks = [msgspec.json.decode(m.data) for m in messages]
    texts = [c["candidates"][0]["content"]["parts"][0]["text"] for c in chunks]
    assert "".join(texts) == "Hello there! How can I help you today?\n"
    assert parse(GEMINI.replace(b"\r\n", b"\n")) == messages


def test_tricky_stream() -> None:
    assert parse(TRICKY) == [
        SSEMessage("a\n", id="1"),
        SSEMessage(" b", event="e", id="1"),
        SSEMessage("c", id="1"),
    ]


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_split_at_every_offset(name: str) -> None:
    stream = STREAMS[name]
    whole = parse(stream)
    assert whole
    for i in range(len(stream) + 1):
        assert parse(stream[:i], stream[i:]) == whole, f"split at {i}"


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_one_byte_at_a_time(name: str) -> None:
    stream = STREAMS[name]
    assert bytewise(stream) == parse(stream)


def test_tricky_stream_split_into_three_pieces_everywhere() -> None:
    whole = parse(TRICKY)
    n = len(TRICKY)
    for i in range(n + 1):
        for j in range(i, n + 1):
            assert parse(TRICKY[:i], TRICKY[i:j], TRICKY[j:]) == whole, f"split at {i}, {j}"


# -- Against a line-by-line transcription of the spec, on random streams and splits -----


def reference(stream: bytes) -> list[SSEMessage]:
    text = stream.decode("utf-8", "replace").removeprefix("\ufeff")
    lines = re.split(r"\r\n|\r|\n", text)[:-1]  # the unterminated last line is dropped
    out: list[SSEMessage] = []
    data, event, last_id, retry = "", "", None, None
    for line in lines:
        if not line:
            if data:
                out.append(SSEMessage(data.removesuffix("\n"), event, last_id, retry))
            data, event, retry = "", "", None
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data += value + "\n"
        elif name == "event":
            event = value
        elif name == "id" and "\0" not in value:
            last_id = value
        elif name == "retry" and value and all(c in "0123456789" for c in value):
            retry = int(value)
    return out


def test_matches_reference_on_random_streams_and_splits() -> None:
    atoms = [
        *(b"data", b"data:", b"data: ", b"event: ", b"id: ", b"id", b"retry: ", b"foo:"),
        *(b"x", b"12", b" ", b":", b"\r", b"\n", b"\r\n", b"\n\n", b"\x00"),
        *(b"\xef\xbb\xbf", b"\xef", b"\xff", b"\xc3\xa9", b"\xe2\x80\xa8"),
    ]
    rnd = random.Random(20261121)
    for _ in range(3000):
        stream = b"".join(rnd.choice(atoms) for _ in range(rnd.randint(0, 30)))
        cuts = sorted(rnd.randint(0, len(stream)) for _ in range(rnd.randint(0, 6)))
        pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
        assert parse(*pieces) == reference(stream), stream
