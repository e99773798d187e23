"""A streaming client's connection: its send buffer, its body writes, cutting it off.

`BodyWriter` writes a prepared response's body one frame per `transport.write()`,
with the HTTP/1.1 chunk header and trailer formatted around the frame in the same
bytes. aiohttp's `StreamResponse.write()` does the same work in five Python calls
(a formatted header, a join, a coroutine) per frame; at one frame per upstream
read those calls were a measurable part of what lean adds to a bare relay (see
bench/RESULTS.md). Backpressure is kept: when the transport could not hand
everything to the kernel, the caller awaits `drain()`, which returns once aiohttp
resumes writing, exactly what `StreamResponse.write()` would wait for.

`TextFrames` does the same for WebSocket text frames (RFC 6455 §5.2: a server's
frames are unmasked, so a frame is a 2-, 4- or 10-byte header and the payload):
aiohttp's `send_frame()` is three coroutines deep per frame. Every other frame on
the socket (pings, pongs, close, errors) still goes through aiohttp, and every
write of either is one whole frame in one `transport.write()`, so frames never
interleave.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import socket
import struct
import sys
import termios

from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter

from lean.errors import Cancelled, LeanError


class ClientGone(ConnectionResetError):
    """The client side failed: its connection closed, or lean cut it. Raised where lean
    calls into the client side (the writers here, a run's sink), so whose failure it was
    travels as this type: the upstream boundary (`lean.upstream`, `lean.relay`) lets it
    through untouched, never retries it nor blames the provider for it. A
    `ConnectionResetError`, so what treats a lost peer as one (aiohttp, the guard's
    heartbeat) still does. `reason`: how a run it ends ends (`Cancelled` unless said)."""

    def __init__(self, reason: LeanError | None = None) -> None:
        self.reason = reason if reason is not None else Cancelled("the client left")
        super().__init__(self.reason.message)


def bound_send_buffer(request: web.Request, size: int) -> None:
    """Cap the kernel's send buffer of a streaming client's socket.

    Loopback and LAN sockets autotune up to 4 MB each: a client that stops reading
    would park that much kernel memory per stream, and lean would see the stall only
    once it was full. A bounded buffer keeps kernel memory per stream small and makes a
    stall reach the writer (and the guard) early. A chat stream needs little: 128 KiB
    carries ~10 MB/s at 100 ms round trips.
    """
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if size and sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


# Linux's SIOCOUTQ (the same number as TIOCOUTQ): bytes a TCP socket's kernel send queue
# still holds, sent or not, that its peer has not acknowledged.
_OUTQ: int | None = termios.TIOCOUTQ if sys.platform == "linux" else None
_INT = bytes(4)


def unsent(transport: asyncio.WriteTransport | None) -> int:
    """Bytes written to `transport` that its peer has not taken yet: the transport's
    buffer plus, where the kernel tells (Linux), its send queue. Sampled by the guard while
    lean waits for a client; when it shrinks, the client took bytes. Without the
    kernel's part, what the client takes shows only when the kernel frees about a third
    of the send buffer (`send_buffer_bytes`)."""
    if transport is None or transport.is_closing():
        return 0
    size = transport.get_write_buffer_size()
    if _OUTQ is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):  # not a TCP socket: its buffer only
                size += struct.unpack("i", fcntl.ioctl(sock.fileno(), _OUTQ, _INT))[0]
    return size


def reset(request: web.Request) -> None:
    """Cut a client with a TCP reset: what the kernel still buffers for it is dropped
    at once, instead of waiting (up to megabytes per socket) for a reader that stalled."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def _prepare(
    request: web.Request, response: web.StreamResponse
) -> tuple[asyncio.Transport, AbstractStreamWriter]:
    """Send the response's head (or accept the upgrade); its transport and writer."""
    writer = await response.prepare(request)
    transport = request.transport
    if writer is None or transport is None:
        raise ClientGone(Cancelled("the client left before the response started"))
    return transport, writer


class _Frames:
    """One transport write per frame; `drain()` when a write says the client is behind."""

    __slots__ = ("_transport", "_writer")

    def __init__(self, transport: asyncio.Transport, writer: AbstractStreamWriter) -> None:
        self._transport = transport
        self._writer = writer

    async def drain(self) -> None:
        """Wait until the transport takes writes again; `ClientGone` if the client left."""
        try:
            await self._writer.drain()
        except ConnectionError:
            raise ClientGone() from None

    def pending(self) -> int:
        """Bytes written that the client has not taken yet (`unsent`)."""
        return unsent(self._transport)

    def behind(self) -> bool:
        """The client has not taken every write yet (lean still buffers some)."""
        return self._transport.get_write_buffer_size() > 0


class BodyWriter(_Frames):
    """Frames to a prepared `StreamResponse`'s body, one transport write each."""

    __slots__ = ("_chunked",)

    def __init__(
        self, transport: asyncio.Transport, writer: AbstractStreamWriter, *, chunked: bool
    ) -> None:
        super().__init__(transport, writer)
        self._chunked = chunked

    @classmethod
    async def start(cls, request: web.Request, response: web.StreamResponse) -> BodyWriter:
        """Send the response's headers; the writer for its body."""
        transport, writer = await _prepare(request, response)
        # HTTP/1.1: chunked; an HTTP/1.0 client's body ends when the connection closes.
        chunked = response.headers.get(hdrs.TRANSFER_ENCODING, "").lower() == "chunked"
        return cls(transport, writer, chunked=chunked)

    def write(self, frame: bytes) -> bool:
        """Queue `frame` (not empty); True when the client is behind: await `drain()`."""
        transport = self._transport
        if transport.is_closing():
            raise ClientGone(Cancelled("the client closed the connection"))
        transport.write(b"%x\r\n%b\r\n" % (len(frame), frame) if self._chunked else frame)
        return transport.get_write_buffer_size() > 0


class TextFrames(_Frames):
    """Text frames to a prepared `WebSocketResponse`, one transport write each."""

    __slots__ = ("_ws",)

    def __init__(
        self, ws: web.WebSocketResponse, transport: asyncio.Transport, writer: AbstractStreamWriter
    ) -> None:
        super().__init__(transport, writer)
        self._ws = ws

    @classmethod
    async def start(cls, request: web.Request, ws: web.WebSocketResponse) -> TextFrames:
        """Accept the upgrade; the writer for the socket's text frames."""
        transport, writer = await _prepare(request, ws)
        return cls(ws, transport, writer)

    def write(self, payload: bytes) -> bool:
        """Queue one text frame (`payload` is UTF-8); True when the client is behind:
        await `drain()`."""
        transport = self._transport
        if self._ws.closed or transport.is_closing():
            raise ClientGone(Cancelled("the WebSocket is closed"))
        size = len(payload)
        if size < 126:
            transport.write(b"\x81%c%b" % (size, payload))
        elif size < 65536:
            transport.write(b"\x81\x7e%b%b" % (size.to_bytes(2, "big"), payload))
        else:
            transport.write(b"\x81\x7f%b%b" % (size.to_bytes(8, "big"), payload))
        return transport.get_write_buffer_size() > 0
