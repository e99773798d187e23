"""The load generator's clients: raw asyncio protocols, one connection per stream.

Raw protocols rather than aiohttp's client: no task wake-up per chunk and ~1 µs of
Python per read, so 10,000 connections and ~20k chunks/s fit on the harness core
beside the mock. Each stream is read to its end and judged: ok only with HTTP 200,
the end event, no error event, and exactly the content events the mock was asked for.
Event readers see the body after HTTP chunked decoding and only count: content
events, the end event, an error event (told apart by markers each wire gives).
WebSocket clients are in `websocket.py`, the wires that pair requests with readers
in `wires.py`.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import socket
import time
from array import array
from collections import Counter
from dataclasses import dataclass
from typing import Protocol, cast

MAX_HEAD = 64 * 1024  # a response head larger than this is a broken server
END_GRACE = 2.0  # seconds from the end event to the end of the body before a stream fails
MAX_LATE = 20_000  # late gaps kept with their time, to tell one global pause from many small ones
_ERROR_CODE = re.compile(rb'"code"\s*:\s*"([^"]{1,64})"')
_ERROR_MESSAGE = re.compile(rb'"message"\s*:\s*"([^"]{1,120})')


class EventReader(Protocol):
    done: bool  # the end event arrived
    error: str | None  # an error event arrived (its code or message)

    def feed(self, payload: bytes) -> int:
        """Take body bytes; return how many content events they completed."""
        ...


class SSEReader:
    """Server-sent events: `\\n\\n`-separated; content / end / error told apart by markers."""

    __slots__ = ("_buf", "_content", "_end", "_error", "done", "error")

    def __init__(self, content: bytes, end: bytes, error: bytes = b'"error"') -> None:
        self._buf = b""
        self._content = content
        self._end = end
        self._error = error
        self.done = False
        self.error: str | None = None

    def feed(self, payload: bytes) -> int:
        buf = self._buf + payload if self._buf else payload
        if b"\n\n" not in buf:
            self._buf = buf
            return 0
        *events, self._buf = buf.split(b"\n\n")
        n = 0
        for event in events:
            if event.startswith(b":"):  # a comment: lean's `: ping` heartbeat
                continue
            if self._content in event:
                n += 1
            elif event.startswith(self._end):
                self.done = True
            elif self._error in event:
                self.error = error_reason(event)
        return n


class NDJSONReader:
    """One JSON object per line; the same markers as `SSEReader`."""

    __slots__ = ("_buf", "_content", "_end", "_error", "done", "error")

    def __init__(self, content: bytes, end: bytes, error: bytes = b'"error"') -> None:
        self._buf = b""
        self._content = content
        self._end = end
        self._error = error
        self.done = False
        self.error: str | None = None

    def feed(self, payload: bytes) -> int:
        buf = self._buf + payload if self._buf else payload
        if b"\n" not in buf:
            self._buf = buf
            return 0
        *lines, self._buf = buf.split(b"\n")
        n = 0
        for line in lines:
            if self._content in line:
                n += 1
            elif self._end in line:
                self.done = True
            elif self._error in line:
                self.error = error_reason(line)
        return n


def error_reason(event: bytes) -> str:
    code = _ERROR_CODE.search(event)
    if code:
        return code.group(1).decode(errors="replace")
    message = _ERROR_MESSAGE.search(event)
    return message.group(1).decode(errors="replace") if message else "error event"


class GroupStats:
    """What one group of connections saw; filled by the protocols, read by the runner."""

    def __init__(self) -> None:
        self.ok = 0
        self.failed = 0
        self.evicted = 0  # stalled streams the target cut
        self.not_evicted = 0  # stalled streams still alive (or completed) after the stall
        self.reasons: Counter[str] = Counter()
        self.chunks = 0
        self.ttfc: list[float] = []
        self.ttfc_sent: list[float] = []  # when each of those streams sent its request
        self.late: list[tuple[float, float]] = []  # (when, gap) of gaps over LATE, bounded
        self.gaps = array("d")
        self.open = 0
        self.max_open = 0
        self.first_sent = 0.0
        self.last_done = 0.0

    def opened(self) -> None:
        self.open += 1
        if self.open > self.max_open:
            self.max_open = self.open

    def fail(self, reason: str) -> None:
        self.failed += 1
        self.reasons[reason] += 1


@dataclass(frozen=True)
class Judge:
    """How a stream is judged: content events expected, stall behaviour, what is late."""

    expect: int
    stall_after: int = 0
    stall_for: float = 0.0
    check_for: float = 3.0
    late_gap: float = 1.0


class HTTPStream(asyncio.Protocol):
    """One streaming request on its own connection, read to the end and judged.

    Stalled mode (`stall_after` > 0): after that many content events the client stops
    reading for `stall_for` seconds, then reads again for `check_for` seconds: a stream
    that ends early meanwhile was cut by the target (evicted); one still flowing or
    complete was not.
    """

    def __init__(
        self, request: bytes, reader: EventReader, stats: GroupStats, judge: Judge
    ) -> None:
        self.request = request
        self.reader = reader
        self.stats = stats
        self.expect = judge.expect
        self.stall_after = judge.stall_after
        self.stall_for = judge.stall_for
        self.check_for = judge.check_for
        self.late_gap = judge.late_gap
        self.finished: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.count = 0
        self.sent = 0.0
        self.last = 0.0
        self.status = 0
        self._head: bytes | None = b""
        self._chunked = False
        self._length = -1  # Content-Length left, -1 = none
        self._cbuf = b""
        self._need = 0  # chunk bytes left; -2 = the CRLF after a chunk
        self._body_done = False
        self._error_body = b""
        self._stalled = False
        self._checking = False
        self._outcome: str | None = None  # given at the end event, final at the body's end

    # --- asyncio.Protocol ---
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.stats.opened()
        self.sent = time.monotonic()
        if not self.stats.first_sent:
            self.stats.first_sent = self.sent
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.stats.open -= 1
        if self.finished.done():
            return
        if self._head is None and self._length < 0 and not self._chunked:
            self._body_done = True  # a close-delimited body ends here
            self._end_of_body()
            if self.finished.done():
                return
        why = type(exc).__name__ if exc else "EOF"
        if self._outcome is not None:
            self._finish(self._outcome)  # the end event arrived; the server then closed
        elif self._stalled:
            self._finish("evicted")
        elif self.status and self.status != 200:
            self._fail(f"HTTP {self.status} {error_reason(self._error_body)}")
        else:
            self._fail(f"closed before the end ({why}) after {_bucket(self.count)} chunks")

    def data_received(self, data: bytes) -> None:
        if self._head is not None:
            head = self._head + data
            end = head.find(b"\r\n\r\n")
            if end < 0:
                if len(head) > MAX_HEAD:
                    self._fail("response head too large")
                self._head = head
                return
            self._parse_head(head[:end])
            data = head[end + 4 :]
            self._head = None
            self._headers_done()
        if self._chunked:
            payload = self._dechunk(data)
        elif self._length >= 0:
            payload = data[: self._length]
            self._length -= len(payload)
            self._body_done = self._length == 0
        else:
            payload = data
        if self.status != 200:
            if len(self._error_body) < 4096:
                self._error_body += payload[:4096]
        elif payload:
            self._payload(payload)
        if self._body_done:
            self._end_of_body()

    def _headers_done(self) -> None:
        """The response head was read (the WebSocket client sends its run frame here)."""

    def _payload(self, payload: bytes) -> None:
        n = self.reader.feed(payload)
        if n:
            self._events(n)
        if self.reader.error is not None and not self.finished.done():
            self._fail(f"error event: {self.reader.error}")
        elif self.reader.done and not self.finished.done() and self._outcome is None:
            if self._stalled:
                self._outcome = "not-evicted"
            elif self.count == self.expect:
                self._outcome = "ok"
            else:
                self._fail(f"got {self.count} content chunks, expected {self.expect}")
                return
            self._after_end_event()

    def _after_end_event(self) -> None:
        """The end event arrived: a client reads on to the end of the body (the chunked
        terminator), as a well-behaved one does, within END_GRACE."""
        if self._body_done:
            return  # _end_of_body gives the verdict
        loop = asyncio.get_running_loop()
        loop.call_later(END_GRACE, self._no_end_of_body)

    def _no_end_of_body(self) -> None:
        if not self.finished.done():
            self._fail(f"no end of the body {END_GRACE:g} s after the end event")

    def _events(self, n: int) -> None:
        now = time.monotonic()
        stats = self.stats
        if self.count == 0:
            stats.ttfc.append(now - self.sent)
            stats.ttfc_sent.append(self.sent)
        else:
            gap = now - self.last
            stats.gaps.append(gap)
            if gap > self.late_gap and len(stats.late) < MAX_LATE:
                stats.late.append((now, gap))
        if n > 1:
            stats.gaps.extend(itertools.repeat(0.0, n - 1))  # arrived in the same read
        self.last = now
        self.count += n
        stats.chunks += n
        if self.stall_after and not self._stalled and self.count >= self.stall_after:
            self._stalled = True
            assert self.transport is not None
            self.transport.pause_reading()
            asyncio.get_running_loop().call_later(self.stall_for, self._resume)

    def _resume(self) -> None:
        if self.finished.done() or self.transport is None or self.transport.is_closing():
            return
        self._checking = True
        sock = self.transport.get_extra_info("socket")
        if sock is not None:  # a stalled client's small window would make the drain crawl
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.transport.resume_reading()
        asyncio.get_running_loop().call_later(self.check_for, self._judge_stall)

    def _judge_stall(self) -> None:
        if not self.finished.done():
            self._finish("not-evicted")

    # --- HTTP/1.1 framing ---
    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        try:
            self.status = int(parts[1])
        except (IndexError, ValueError):
            self._fail("bad status line")
            return
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"transfer-encoding" and b"chunked" in value.lower():
                self._chunked = True
            elif name == b"content-length":
                self._length = int(value.strip())
        if self._length == 0:
            self._body_done = True

    def _dechunk(self, data: bytes) -> bytes:
        buf = self._cbuf + data if self._cbuf else data
        out: list[bytes] = []
        pos, size = 0, len(buf)
        while pos < size and not self._body_done:
            if self._need > 0:
                take = min(self._need, size - pos)
                out.append(buf[pos : pos + take])
                pos += take
                self._need -= take
                if self._need == 0:
                    self._need = -2
            elif self._need == -2:
                if size - pos < 2:
                    break
                pos += 2
                self._need = 0
            else:
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    break
                length = int(buf[pos:end].split(b";", 1)[0], 16)
                pos = end + 2
                if length == 0:
                    self._body_done = True
                else:
                    self._need = length
        self._cbuf = buf[pos:] if pos < size else b""
        return out[0] if len(out) == 1 else b"".join(out)

    def _end_of_body(self) -> None:
        if self.finished.done():
            return
        if self._outcome is not None:
            self._finish(self._outcome)
        elif self.status != 200:
            self._fail(f"HTTP {self.status} {error_reason(self._error_body)}")
        elif self._stalled:
            self._finish("evicted")  # the target ended the body early (a clean cut)
        else:
            self._fail(f"body ended before the end event after {_bucket(self.count)} chunks")

    # --- outcome ---
    def cut(self, reason: str) -> None:
        """End the stream from the client side (the deadline), counted failed."""
        if not self.finished.done():
            self._fail(reason)

    def _fail(self, reason: str) -> None:
        self.stats.fail(reason)
        self._done("failed")

    def _finish(self, outcome: str) -> None:
        if outcome == "ok":
            self.stats.ok += 1
        elif outcome == "evicted":
            self.stats.evicted += 1
        elif outcome == "not-evicted":
            self.stats.not_evicted += 1
        self._done(outcome)

    def _done(self, outcome: str) -> None:
        if self.finished.done():
            return
        self.stats.last_done = time.monotonic()
        self.finished.set_result(outcome)
        if self.transport is not None:
            self.transport.close() if outcome == "ok" else self.transport.abort()


def _bucket(n: int) -> str:
    """Chunk counts in failure reasons, rounded so that reasons group: 0, 1-9, 10-99, ..."""
    if n == 0:
        return "0"
    low = 10 ** (len(str(n)) - 1)
    return f"{low}+" if low > 1 else "1-9"


class IdleConnection(asyncio.Protocol):
    """A keep-alive HTTP connection that asks `GET /healthz` once, idles, and asks again."""

    def __init__(self, host: str, port: int, stats: GroupStats) -> None:
        self.request = b"GET /healthz HTTP/1.1\r\nHost: %b:%d\r\n\r\n" % (host.encode(), port)
        self.stats = stats
        self.transport: asyncio.Transport | None = None
        self.answered: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.closed = False
        self._buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.stats.opened()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self._buf[:end]
        match = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
        length = int(match.group(1)) if match else 0
        if len(self._buf) < end + 4 + length:
            return
        self._buf = self._buf[end + 4 + length :]
        status = int(head.split(b" ", 2)[1])
        if not self.answered.done():
            self.answered.set_result(status)

    def connection_lost(self, exc: Exception | None) -> None:
        self.stats.open -= 1
        self.closed = True
        if not self.answered.done():
            self.answered.set_exception(ConnectionError("closed by the server"))

    def ask_again(self) -> asyncio.Future[int]:
        self.answered = asyncio.get_running_loop().create_future()
        if self.closed or self.transport is None:
            self.answered.set_exception(ConnectionError("closed by the server while idle"))
        else:
            self.transport.write(self.request)
        return self.answered
