# Unified scene events (docs/protocol.md §2, §3): Structs, the one shared encoder, transport framing
# and the per-run order machine. Pure code, no I/O.
#
# Order (§2), enforced by RunEvents: one `start`; any number of delta / tool_start / tool_end /
# waiting; exactly one of done / error; nothing after. A violation is a bug in lean and raises
# RuntimeError, never a LeanError.
#
# Encode once: `encode(event)` gives immutable bytes, one line of JSON beginning `{"type":"<name>"`
# (msgspec writes the tag field first). Each transport wraps those same bytes into one new bytes
# object, written once (never a reused bytearray: see notes/measured-facts.md):
#   SSE     `event: <name>\nid: <seq>\ndata: <payload>\n\n`
#   NDJSON  payload[:-1] + `,"seq":<seq>}\n` (the payload already carries "type")
#   WS      `{"runId":<id>,` + payload[1:-1] + `,"seq":<seq>}`. Safe because payload[1:] starts
#           with `"type"`, and only Start has a runId key, so the result is one JSON object
#           without duplicate keys; Start keeps its own runId. An error frame about a client
#           frame (no run's event) has no seq.
# `seq` is the event's cursor (docs/protocol.md §6): the SSE `id:`, a field elsewhere.
# One line really means one line for every reader: msgspec escapes control characters, and
# `encode` also escapes U+0085, U+2028 and U+2029, which it leaves raw and which str.splitlines()
# (httpx's iter_lines, for one) treats as line ends. The escape runs only on non-ASCII payloads.
# Lone surrogates (from a tool or a Python-decoded string; msgspec rejects them when decoding)
# make UTF-8 encoding fail: `encode` then replaces them with U+FFFD on a slow path, so model or
# tool text never kills a stream and the normal path pays nothing.
# NDJSON_PING is `{"type":"ping"}\n`, not a blank line: JSON-per-line parsers never choke on it,
# and clients ignore unknown types (`decode` raises msgspec.ValidationError on it: skip it first).
from __future__ import annotations

from typing import Final, Literal, TypeAlias

import msgspec


class Usage(msgspec.Struct, frozen=True, rename="camel"):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Only when the upstream said (UNSET is never encoded): of the prompt, read from the
    # provider's cache; of the completion, spent reasoning.
    cached_tokens: int | msgspec.UnsetType = msgspec.UNSET
    reasoning_tokens: int | msgspec.UnsetType = msgspec.UNSET


# Subclasses repeat frozen=True so mypy's dataclass_transform sees it; msgspec inherits it anyway.
# gc=False: events hold only str/int/bool/float and a frozen Usage, so they cannot form cycles.
class _Event(
    msgspec.Struct,
    frozen=True,
    rename="camel",
    tag_field="type",
    array_like=False,
    omit_defaults=False,
    gc=False,
):
    pass


class Start(_Event, tag="start", frozen=True):
    run_id: str
    message_id: str
    scene: str
    model: str
    conversation_id: str


class Delta(_Event, tag="delta", frozen=True):
    message_id: str
    text: str
    part: Literal["content", "thinking", "refusal"] = "content"


class ToolStart(_Event, tag="tool_start", frozen=True):
    message_id: str
    tool_call_id: str
    name: str
    arguments: str


class ToolEnd(_Event, tag="tool_end", frozen=True):
    message_id: str
    tool_call_id: str
    name: str
    result: str
    duration_ms: float
    is_error: bool


class Waiting(_Event, tag="waiting", frozen=True):
    message_id: str
    tool_call_id: str
    name: str
    arguments: str


class Done(_Event, tag="done", frozen=True):
    message_id: str
    finish_reason: str
    usage: Usage
    text: str
    fallback: bool = False
    saved: bool = True  # False: the answer could not be saved (the store cannot write)


class Error(_Event, tag="error", frozen=True):
    message_id: str
    code: str
    message: str
    retryable: bool = False
    # Seconds to wait before trying again, as HTTP's Retry-After, where lean knows them (a
    # WebSocket run refused by a client's limits); UNSET is never encoded.
    retry_after: int | msgspec.UnsetType = msgspec.UNSET


Event: TypeAlias = Start | Delta | ToolStart | ToolEnd | Waiting | Done | Error

_encoder: Final = msgspec.json.Encoder()
_decoder: Final[msgspec.json.Decoder[Event]] = msgspec.json.Decoder(Event)

_NAMES: Final[dict[type[_Event], str]] = {
    cls: str(cls.__struct_config__.tag)
    for cls in (Start, Delta, ToolStart, ToolEnd, Waiting, Done, Error)
}
_NAME_BYTES: Final[dict[str, bytes]] = {n: n.encode() for n in _NAMES.values()}
_START_PREFIX: Final = b'{"type":"start",'

SSE_PING: Final = b": ping\n\n"
NDJSON_PING: Final = b'{"type":"ping"}\n'


def event_name(event: Event) -> str:
    return _NAMES[type(event)]


def encode(event: Event) -> bytes:
    try:
        data = _encoder.encode(event)
    except UnicodeEncodeError:
        data = _encoder.encode(_replace_surrogates(event))
    # U+2028/U+2029 are E2 80 A8/A9 and U+0085 is C2 85: without a 0x80 or 0x85 byte there is
    # nothing to escape, so most non-ASCII text skips the replace passes. `int in bytes` is one
    # memchr (~20 ns); `b"\x80" in bytes` measured ~170 ns.
    if data.isascii() or (0x80 not in data and 0x85 not in data):
        return data
    # In valid UTF-8 these byte runs can only be these code points, and outside strings JSON is
    # ASCII, so each replacement swaps a raw character for its escape inside a string.
    return (
        data.replace(b"\xe2\x80\xa8", b"\\u2028")
        .replace(b"\xe2\x80\xa9", b"\\u2029")
        .replace(b"\xc2\x85", b"\\u0085")
    )


def _replace_surrogates(event: Event) -> Event:
    # UTF-16 with surrogatepass re-joins split pairs; what is left alone becomes U+FFFD.
    changes = {}
    for field in event.__struct_fields__:
        value = getattr(event, field)
        if isinstance(value, str):
            utf16 = value.encode("utf-16-le", "surrogatepass")
            changes[field] = utf16.decode("utf-16-le", "replace")
    return msgspec.structs.replace(event, **changes)


def decode(data: bytes | str) -> Event:
    return _decoder.decode(data)


def sse_frame(name: str, seq: int, payload: bytes) -> bytes:
    # One %-format: ~135 ns inline, a join ~150 ns, a pre-built "event: <name>\nid: " head no
    # faster (bench/bench_events.py).
    name_bytes = _NAME_BYTES.get(name)
    if name_bytes is None:
        if "\n" in name or "\r" in name:
            raise RuntimeError(f"SSE event name {name!r} contains a line end")
        name_bytes = name.encode()
    return b"event: %b\nid: %d\ndata: %b\n\n" % (name_bytes, seq, payload)


def ndjson_frame(payload: bytes, seq: int) -> bytes:
    return b'%b,"seq":%d}\n' % (payload[:-1], seq)


def ws_frame(run_id: str | None, payload: bytes, seq: int | None = None) -> bytes:
    """`run_id` None gives `"runId":null`, for an error about a frame that named no run (§3);
    `seq` None (such an error) leaves the cursor out."""
    if payload.startswith(_START_PREFIX):
        return payload if seq is None else b'%b,"seq":%d}' % (payload[:-1], seq)
    if seq is None:
        return b'{"runId":%b,%b' % (_encoder.encode(run_id), payload[1:])
    return b'{"runId":%b,%b,"seq":%d}' % (_encoder.encode(run_id), payload[1:-1], seq)


class RunEvents:
    """The event-order rules of §2 in one place: one `start`; any number of delta/tool_start/
    tool_end/waiting; exactly one of done/error last; nothing after."""

    __slots__ = ("_finished", "_open_tools", "_seq")

    def __init__(self) -> None:
        self._seq = 0
        self._finished = False
        self._open_tools: set[str] = set()

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def seq(self) -> int:
        return self._seq

    def check(self, event: Event) -> int:
        """Validate `event` as the run's next one; return its sequence number (start is 1)."""
        kind = type(event)
        if kind is Delta and self._seq and not self._finished:  # most events: nothing to track
            self._seq += 1
            return self._seq
        if self._finished:
            raise RuntimeError(f"{_NAMES[kind]} event after the run finished")
        if (kind is Start) != (self._seq == 0):
            raise RuntimeError(
                "second start event" if kind is Start else f"{_NAMES[kind]} event before start"
            )
        if isinstance(event, ToolStart):
            if event.tool_call_id in self._open_tools:
                raise RuntimeError(f"tool_start for already open tool call {event.tool_call_id!r}")
            self._open_tools.add(event.tool_call_id)
        elif isinstance(event, ToolEnd):
            if event.tool_call_id not in self._open_tools:
                raise RuntimeError(f"tool_end for unknown tool call {event.tool_call_id!r}")
            self._open_tools.discard(event.tool_call_id)
        elif isinstance(event, Waiting):
            # May follow its tool_start or stand alone (a client tool); either way the call is
            # now open, so the tool_end that answers it is accepted.
            self._open_tools.add(event.tool_call_id)
        elif kind is Done or kind is Error:
            self._finished = True
        self._seq += 1
        return self._seq
