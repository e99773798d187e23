"""WebSocket clients (RFC 6455), client side: a run on its own socket, and an idle socket.

Framing is the minimum a load generator needs: client frames are FIN and masked with
the all-zero key (valid, and no XOR to do: a load generator is not a browser, whose
keys must be unpredictable); server frames are read whole, pings answered with pongs.
"""

from __future__ import annotations

import asyncio
import time
from typing import cast

from bench.harness.clients import EventReader, GroupStats, HTTPStream, Judge

OP_TEXT, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x8, 0x9, 0xA


def ws_upgrade(host: str, port: int) -> bytes:
    return (
        b"GET /v1/ws HTTP/1.1\r\nHost: %b:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: bGVhbi1iZW5jaC1rZXkhIQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        % (host.encode(), port)
    )


def ws_frame(opcode: int, payload: bytes) -> bytes:
    """A client frame: FIN, masked with the all-zero key."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


def ws_frames(buf: bytes) -> tuple[list[tuple[int, bool, bytes]], bytes]:
    """Complete server frames in `buf` as (opcode, fin, payload), and the bytes left over."""
    frames: list[tuple[int, bool, bytes]] = []
    pos, size = 0, len(buf)
    while size - pos >= 2:
        b0, b1 = buf[pos], buf[pos + 1]
        n, head = b1 & 0x7F, 2
        if n == 126:
            if size - pos < 4:
                break
            n, head = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
        elif n == 127:
            if size - pos < 10:
                break
            n, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
        if b1 & 0x80:
            head += 4  # servers do not mask; a masked frame is skipped, not unmasked
        if size - pos < head + n:
            break
        frames.append((b0 & 0x0F, bool(b0 & 0x80), buf[pos + head : pos + head + n]))
        pos += head + n
    return frames, buf[pos:]


class WSStream(HTTPStream):
    """One run on its own WebSocket: upgrade (101), a `run` frame, the run's frames judged
    like any stream; pings answered. The body after the head is frames, not HTTP."""

    def __init__(
        self, request: bytes, run_frame: bytes, reader: EventReader, stats: GroupStats, judge: Judge
    ) -> None:
        super().__init__(request, reader, stats, judge)
        self._run_frame = run_frame
        self._frames = b""
        self._message = b""

    def _parse_head(self, head: bytes) -> None:
        super()._parse_head(head)
        if self.status == 101:
            self.status = 200  # judged as a successful response from here on
            self._chunked, self._length = False, -1

    def _headers_done(self) -> None:
        if self.status == 200 and self.transport is not None:
            # Time to first chunk counts from the run frame, as an HTTP stream's counts from
            # its request: a WebSocket client upgrades once and sends many runs.
            self.sent = time.monotonic()
            self.transport.write(self._run_frame)

    def _payload(self, payload: bytes) -> None:
        frames, self._frames = ws_frames(self._frames + payload if self._frames else payload)
        text: list[bytes] = []
        for opcode, fin, data in frames:
            if opcode == OP_PING:
                assert self.transport is not None
                self.transport.write(ws_frame(OP_PONG, data))
            elif opcode == OP_CLOSE:
                self._end_of_body()
            elif opcode in (OP_TEXT, 0x0):  # text, or the continuation of one
                self._message += data
                if fin:
                    text.append(self._message + b"\n")
                    self._message = b""
        if text:
            super()._payload(b"".join(text))

    def _after_end_event(self) -> None:
        if self._outcome is not None:  # a run's end on a WebSocket is its last frame
            self._finish(self._outcome)

    def _done(self, outcome: str) -> None:
        # A client that is done closes as a browser's `ws.close()` does: a close frame
        # (1000, normal closure), then the connection; a failed stream just drops it.
        if outcome == "ok" and not self.finished.done() and self.transport is not None:
            self.transport.write(ws_frame(OP_CLOSE, (1000).to_bytes(2, "big")))
        super()._done(outcome)


class IdleWebSocket(asyncio.Protocol):
    """A WebSocket that upgrades, idles (answering the server's pings), and at the end
    pings the server and waits for the pong: proof it was held open all along."""

    def __init__(self, host: str, port: int, stats: GroupStats) -> None:
        self.request = ws_upgrade(host, port)
        self.stats = stats
        self.transport: asyncio.Transport | None = None
        self.answered: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.closed = False
        self._buf = b""
        self._upgraded = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.stats.opened()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if not self._upgraded:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = int(self._buf.split(b" ", 2)[1])
            self._buf = self._buf[end + 4 :]
            self._upgraded = status == 101
            if not self.answered.done():
                self.answered.set_result(200 if self._upgraded else status)
        frames, self._buf = ws_frames(self._buf)
        for opcode, _, payload in frames:
            if opcode == OP_PING and self.transport is not None:
                self.transport.write(ws_frame(OP_PONG, payload))
            elif opcode == OP_PONG and not self.answered.done():
                self.answered.set_result(200)
            elif opcode == OP_CLOSE and not self.answered.done():
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 0
                self.answered.set_exception(ConnectionError(f"closed by the server ({code})"))

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
            self.transport.write(ws_frame(OP_PING, b"bench"))
        return self.answered
