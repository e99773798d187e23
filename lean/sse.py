"""Incremental server-sent events parser: bytes in, messages out, no I/O.

Follows WHATWG HTML, "Server-sent events" §9.2.6 (interpreting an event stream):
LF, CR and CRLF end a line, also when a CRLF is split across two reads; one leading
UTF-8 BOM is dropped; `:` lines are comments; one space after the colon is removed;
`id` containing NUL is ignored; `retry` counts only if all ASCII digits; a blank line
dispatches, but only if some `data` line was seen; bytes are decoded as UTF-8 with
replacement. An unterminated last event is dropped on close().

Guarantees: the messages do not depend on how the bytes were split into feeds; total
work is O(n) in the bytes fed, even one byte at a time (each byte is searched once);
memory is bounded by max_event_bytes (SSEProtocolError past it).

Deliberately absent: reconnection. lean reads provider POST streams, and re-sending a
POST after the stream ends bills a second generation; so `retry` is only reported.

Bytes are split on LF in C (`bytes.split`) after CR and CRLF are rewritten to LF;
decoding per line equals decoding the stream because CR and LF never occur inside a
UTF-8 sequence.
"""

from __future__ import annotations

from typing import NoReturn

import msgspec

__all__ = ["MAX_EVENT_BYTES", "SSEMessage", "SSEParser", "SSEProtocolError"]

# One event (its data lines plus the line being received) may hold at most 1 MiB.
# Chat deltas are well under 10 KiB and a final whole message or tool-call arguments
# stay far below 1 MiB, while a peer that never sends a blank line cannot grow memory.
# aiohttp's readline() gives up at 512 KiB (2 x read_bufsize); streams carrying whole
# images in one event (base64) need a larger max_event_bytes.
MAX_EVENT_BYTES = 1 << 20

_BOM = b"\xef\xbb\xbf"


class SSEMessage(msgspec.Struct, frozen=True, gc=False):
    """One dispatched event. `event` "" means the default type "message"."""

    data: str
    event: str = ""
    id: str | None = None
    retry: int | None = None


class SSEProtocolError(ValueError):
    """The stream broke a bound; the caller abandons the connection."""


class SSEParser:
    __slots__ = (
        "_at_start",
        "_closed",
        "_comments",
        "_data",
        "_event",
        "_head",
        "_id",
        "_max",
        "_retry",
        "_size",
        "_skip_lf",
        "_tail",
    )

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        if max_event_bytes <= 0:
            raise ValueError(f"max_event_bytes must be positive, got {max_event_bytes}")
        self._max = max_event_bytes
        self._at_start = True  # no decision yet about a leading BOM
        self._head = b""  # first bytes while they may still be a split BOM
        self._skip_lf = False  # last feed ended in CR: an LF next is the same line end
        self._tail = bytearray()  # the incomplete line; only new bytes are searched
        self._data: list[bytes] = []  # data lines of the pending event
        self._size = 0  # bytes in self._data
        self._event = ""
        self._id: str | None = None
        self._retry: int | None = None
        self._comments = 0
        self._closed = False

    def comments(self) -> int:
        """Comment lines seen so far (providers send them as keep-alives)."""
        return self._comments

    def close(self) -> None:
        """End of stream: drop an unterminated event (WHATWG). Idempotent."""
        self._closed = True
        self._head = b""
        self._tail = bytearray()
        self._data = []
        self._size = 0

    def feed(self, data: bytes) -> list[SSEMessage]:
        """Take the next bytes of the stream; return the messages they complete."""
        size = len(data)
        if (
            not self._tail
            and not self._data
            and data.startswith(b"data: ")
            and data.find(0x0A) == size - 2  # the first LF ...
            and data[-1] == 0x0A  # ... and the last are the event's end
            and 0x0D not in data  # (an int: memchr; a bytes needle is 8x slower)
            and size - 7 <= self._max
            and not (self._at_start or self._skip_lf or self._closed)
        ):
            # The usual read: one whole event of one `data: ` line. Same result as below.
            message = SSEMessage(
                data[6:-2].decode("utf-8", "replace"), self._event, self._id, self._retry
            )
            self._event = ""
            self._retry = None
            return [message]
        if self._closed:
            raise RuntimeError("SSEParser.feed() called after close()")
        if self._at_start:
            data = self._head + data
            if len(data) < len(_BOM) and _BOM.startswith(data):
                self._head = data
                return []
            self._at_start = False
            self._head = b""
            if data.startswith(_BOM):
                data = data[len(_BOM) :]
        if not data:
            return []
        if self._skip_lf:
            self._skip_lf = False
            if data[0] == 0x0A:
                data = data[1:]
        if 0x0D in data:
            self._skip_lf = data.endswith(b"\r")
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        tail = self._tail
        if tail:
            if b"\n" not in data:
                tail += data
                self._check_size(len(tail))
                return []
            tail += data
            data = bytes(tail)
            self._tail = bytearray()
        lines = data.split(b"\n")
        rest = lines.pop()
        messages = self._lines(lines) if lines else []
        if rest:
            self._tail += rest
            self._check_size(len(rest))
        return messages

    def _lines(self, lines: list[bytes]) -> list[SSEMessage]:
        messages: list[SSEMessage] = []
        parts = self._data
        size = self._size
        limit = self._max
        for line in lines:
            if not line:
                if parts:
                    messages.append(
                        SSEMessage(
                            b"\n".join(parts).decode("utf-8", "replace"),
                            self._event,
                            self._id,
                            self._retry,
                        )
                    )
                    parts = self._data = []
                    size = 0
                self._event = ""
                self._retry = None
                continue
            if line.startswith(b"data: "):
                value = line[6:]
            elif line[0] == 0x3A:  # ":"
                self._comments += 1
                continue
            else:
                name, colon, value = line.partition(b":")
                if colon and value.startswith(b" "):
                    value = value[1:]
                if name == b"event":
                    self._event = value.decode("utf-8", "replace")
                    continue
                if name == b"id":
                    if b"\x00" not in value:
                        self._id = value.decode("utf-8", "replace")
                    continue
                if name == b"retry":
                    if value.isdigit():  # bytes.isdigit(): ASCII digits only
                        self._retry = int(value)
                    continue
                if name != b"data":
                    continue
            parts.append(value)
            size += len(value) + 1
            if size > limit:
                self._size = size
                self._fail()
        self._size = size
        return messages

    def _check_size(self, tail_size: int) -> None:
        if self._size + tail_size > self._max:
            self._fail(tail_size)

    def _fail(self, tail_size: int = 0) -> NoReturn:
        size = self._size + tail_size
        self.close()
        raise SSEProtocolError(
            f"SSE event exceeds max_event_bytes={self._max}: {size} bytes "
            "received without the blank line that ends it"
        )
