"""Every place lean relies on aiohttp's private parts, and why: the one module to check
when aiohttp changes.

pyproject.toml admits only the aiohttp versions these were tested with (3.14.5 to
3.14.x); tests/test_aiohttp_internals.py fails when one of them stops working, the
fast read path (1) included: a silent fall-back to `readany()` keeps every answer right
and costs ~21% of lean's CPU per chunk (docs/performance.md).

1. Upstream bodies read in aiohttp's data callback (`lean.arrivals`). A response body's
   `StreamReader` has its class swapped for `_ArrivingReader` (same layout, no slots of
   its own), whose `feed_data` / `feed_eof` / `set_exception` hand each read to a
   callback instead of buffering it and waking the task that awaits `readany()`. Relies
   on: the parser calling those three methods by attribute on the reader, and
   `read_nowait()` draining what was buffered before the swap. Only a plain
   `StreamReader` is swapped (`fast_reader`); anything else is read the usual way and
   counted in `READS.fallback`.
2. The upstream socket paused while a client is behind (`pause_socket`). The transport
   of the response's connection protocol is paused, not the protocol (whose own pause
   also pauses its parser at the next body piece, and a pause taken outside a parse
   stayed set past the resume). Relies on: `ResponseHandler.transport`.
3. aiohttp's low-level `web_server.Server` (public as `runner.server`) has its class
   swapped (`watch_server`): its `connection_made` / `connection_lost` and `__call__`
   (the protocol factory) are aiohttp's only hooks on client connections
   (`lean.connections`: header and keep-alive deadlines, the connection bound).
4. Each `web_protocol.RequestHandler` has its class swapped, in that factory, for a
   subclass with no slots of its own whose `data_received` notes the first byte of a
   request head. aiohttp has no hook there.
5. A finished WebSocket's `RequestHandler._data_received_cb` is cleared
   (`forget_data_callback`): aiohttp keeps it after the connection is gone, a cycle
   (protocol -> callback -> socket -> writer -> protocol) per socket that only the GC
   frees. The protocol checks the callback for None before every call.
6. Not a poke, a reliance: `lean.client_io` writes body frames to the transport itself
   after `StreamResponse.prepare()`, which relies on a `StreamResponse` sending its head
   at `prepare()` (`_send_headers_immediately`, true for it; `web.Response` defers).

The subclasses call aiohttp's own methods first; `force_close()` is public.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Container
from typing import Any, Protocol

import aiohttp
from aiohttp import web, web_protocol, web_server

__all__ = [
    "READS",
    "Arriving",
    "fast_reader",
    "forget_data_callback",
    "hand_over",
    "pause_socket",
    "resume_socket",
    "take_back",
    "watch_server",
]


class Arriving(Protocol):
    """What a swapped reader calls (`lean.arrivals.Arrivals`)."""

    def arrived(self, data: bytes) -> None: ...

    def end(self) -> None: ...

    def fail(self, exc: BaseException) -> None: ...


class ReadPaths:
    """Upstream reads handled on each path since start: the fast one (1) and the usual
    one. Added per stream, not per read."""

    __slots__ = ("fallback", "fast")

    def __init__(self) -> None:
        self.fast = 0
        self.fallback = 0


READS = ReadPaths()


# --- 1. upstream bodies read in the data callback ---


def fast_reader(resp: aiohttp.ClientResponse) -> tuple[aiohttp.StreamReader, Any] | None:
    """The body reader and connection protocol of `resp` when (1) applies to it."""
    content = resp.content
    if type(content) is aiohttp.StreamReader and resp.connection is not None:
        return content, resp.connection.protocol
    return None


# The reader whose reads are handled as they arrive, by its id(): the reader has
# __slots__ (no room for a reference), and the entry lives only between `hand_over`
# and `take_back`.
_ARRIVING: dict[int, Arriving] = {}


def hand_over(content: aiohttp.StreamReader, to: Arriving) -> bytes:
    """Send `content`'s reads to `to` from now on; the bytes it had buffered before."""
    leftover = _buffered(content)
    content.__class__ = _ArrivingReader
    _ARRIVING[id(content)] = to
    return leftover


def take_back(content: aiohttp.StreamReader) -> None:
    _ARRIVING.pop(id(content), None)


class _ArrivingReader(aiohttp.StreamReader):
    __slots__ = ()  # the same layout as aiohttp's class: its instances can become this

    def feed_data(self, data: bytes, size: int = 0) -> bool:
        arriving = _ARRIVING.get(id(self))
        if arriving is None:
            return super().feed_data(data, size)
        arriving.arrived(data)
        return False

    def feed_eof(self) -> None:
        super().feed_eof()
        arriving = _ARRIVING.get(id(self))
        if arriving is not None:
            arriving.end()

    def set_exception(self, exc: BaseException, *args: Any) -> None:
        super().set_exception(exc, *args)
        arriving = _ARRIVING.get(id(self))
        if arriving is not None:
            arriving.fail(exc)


def _buffered(content: aiohttp.StreamReader) -> bytes:
    """All the body `content` buffered so far. One `read_nowait()` is not enough: taking
    bytes lets aiohttp resume a reader its buffer had paused, and the resumed parser
    refills the buffer at once, inside that call (bounded by what aiohttp had read but
    not parsed); bytes left there would never be read."""
    if content.exception() is not None:
        return b""
    parts = []
    while part := content.read_nowait():
        parts.append(part)
    return b"".join(parts)


# --- 2. the upstream socket paused ---


def pause_socket(protocol: Any) -> None:
    if (transport := protocol.transport) is not None:
        transport.pause_reading()


def resume_socket(protocol: Any) -> None:
    if (transport := protocol.transport) is not None:
        transport.resume_reading()


# --- 3 and 4. client connections ---


def watch_server(
    server: web_server.Server,
    *,
    opened: Callable[[web_protocol.RequestHandler, float], None],
    lost: Callable[[web_protocol.RequestHandler], None],
    first_byte: Callable[[web_protocol.RequestHandler, float], None],
    idle: Container[web_protocol.RequestHandler],
) -> None:
    """Report `server`'s connections: `opened` and `lost`, and `first_byte` of a request
    head on a connection in `idle` (checked per client read: one membership test)."""
    if type(server) is not web_server.Server:
        raise RuntimeError(f"cannot watch a {type(server).__name__}")
    loop = asyncio.get_running_loop()

    class Handler(web_protocol.RequestHandler):
        __slots__ = ()  # the same layout as aiohttp's class: its instances can become this

        def data_received(self, data: bytes) -> None:
            if self in idle:
                first_byte(self, loop.time())
            super().data_received(data)

    class Server(web_server.Server):
        def __call__(self) -> web_protocol.RequestHandler:
            protocol = super().__call__()
            protocol.__class__ = Handler
            return protocol

        def connection_made(
            self, handler: web_protocol.RequestHandler, transport: asyncio.Transport
        ) -> None:
            super().connection_made(handler, transport)
            opened(handler, loop.time())

        def connection_lost(
            self, handler: web_protocol.RequestHandler, exc: BaseException | None = None
        ) -> None:
            super().connection_lost(handler, exc)
            lost(handler)

    server.__class__ = Server


# --- 5. a finished WebSocket's data callback ---


def forget_data_callback(request: web.Request) -> None:
    if getattr(request.protocol, "_data_received_cb", None) is not None:
        request.protocol._data_received_cb = None
