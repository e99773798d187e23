"""The upstream boundary: one shared client session, the read loop, error translation.

Everything a provider can do wrong becomes a `LeanError` here, once, with every
provider key removed from its message. Time limits: `connect_timeout` for the
TCP/TLS connect, `first_byte_timeout` until the first bytes of the answer, then
`read_timeout` of silence between chunks; there is no total cap (long answers
are legitimate). While streaming, the silence limits are enforced by the
stream's `Guard` (no timer per chunk); a non-streaming call is one await under
one `asyncio.timeout`.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import aiohttp
import msgspec

from lean.config import Config, ModelConfig, ProviderConfig
from lean.errors import (
    BadRequest,
    LeanError,
    Overloaded,
    RateLimited,
    UpstreamError,
    UpstreamTimeout,
    redact,
)
from lean.guard import Guard
from lean.providers import adapter, demo
from lean.providers.base import VISIBLE, Piece, Text
from lean.sse import SSEParser, SSEProtocolError


class Receiver(Protocol):
    """Where an answer's pieces go: a batch per upstream read."""

    def push(self, batch: list[Piece]) -> bool:
        """Write `batch` to the client now, without waiting; True when the client is
        behind: `drain()` before the next batch."""
        ...

    async def drain(self) -> None:
        """Wait until the client takes writes again (under its slow-client limit)."""
        ...


class Handed:
    """What the streams of one answer handed to their receiver: the relay's commit point."""

    __slots__ = ("receiving", "visible")

    def __init__(self) -> None:
        self.visible = False  # a piece the user sees went out: no more retries
        self.receiving = False  # inside the receiver: an exception now is not the upstream's

    async def deliver(self, receiver: Receiver, batch: list[Piece]) -> None:
        """For the rare paths (a whole answer, the demo); the read loop inlines this."""
        if not self.visible and any(isinstance(piece, VISIBLE) for piece in batch):
            self.visible = True
        self.receiving = True
        if receiver.push(batch):
            await receiver.drain()
        self.receiving = False


class _Arrivals:
    """An upstream body handled where its bytes arrive.

    aiohttp's response parser hands each read to the response's `StreamReader`, which
    buffers it and wakes the task that awaits `readany()`. `take()` turns that reader
    into a callback instead: each read is parsed, translated and written to the client
    inside aiohttp's data callback, and the stream's task only waits for the end, a
    failure, or a client that is behind (then the upstream stops being read until the
    client drains). The buffer, the wake-up and the `readany()` per read were 21-22% of
    lean's CPU per chunk (docs/performance.md). A failure inside the callback is kept and
    raised by the task; `handed.receiving` still tells whose it was.
    """

    __slots__ = (
        "_guard",
        "_handed",
        "_parser",
        "_paused",
        "_protocol",
        "_read_timeout",
        "_receiver",
        "_translator",
        "_wake",
        "behind",
        "ended",
        "failure",
    )

    def __init__(
        self,
        parser: SSEParser,
        translator: Any,
        receiver: Receiver,
        handed: Handed,
        guard: Guard,
        read_timeout: float,
    ) -> None:
        self._parser = parser
        self._translator = translator
        self._receiver = receiver
        self._handed = handed
        self._guard = guard
        self._read_timeout = read_timeout
        self._wake: asyncio.Future[None] | None = None
        self._protocol: Any = None  # the upstream connection's, while `take()` runs
        self._paused = False
        self.behind = False  # the client is behind: drain before reading more
        self.ended = False
        self.failure: BaseException | None = None

    def feed(self, data: bytes) -> bool:
        """Parse one read and write what it completes; True when the client is behind."""
        if self.failure is not None:
            return self.behind
        handed = self._handed
        try:
            # Parsed a slice at a time: what a stalled client makes lean hold stays
            # within READ_BYTES of parsed events.
            for part in (data,) if len(data) <= READ_BYTES else _slices(data):
                batch: list[Piece] = []
                failed: LeanError | None = None
                for message in self._parser.feed(part):
                    try:
                        batch += self._translator.feed(message)
                    except LeanError as exc:  # what came before it goes out first
                        failed = exc
                        break
                if batch:
                    if not handed.visible and any(isinstance(p, VISIBLE) for p in batch):
                        handed.visible = True
                    handed.receiving = True
                    if self._receiver.push(batch):
                        self.behind = True
                    handed.receiving = False
                if failed is not None:
                    raise failed
            self._guard.waiting(self._read_timeout)
        except Exception as exc:  # raised by the task, in `take()`
            self.failure = exc
        return self.behind

    async def take(self, content: aiohttp.StreamReader, protocol: Any) -> None:
        """Handle `content` as it arrives, until its end; raise what failed."""
        leftover = content.read_nowait() if content.exception() is None else b""
        content.__class__ = _ArrivingReader
        _ARRIVING[id(content)] = self
        self._protocol = protocol
        try:
            if leftover:
                self.feed(leftover)
            if (error := content.exception()) is not None:
                self.fail(error)
            elif content.is_eof():
                self.ended = True
            loop = asyncio.get_running_loop()
            while True:
                if self.failure is not None:
                    raise self.failure
                if self.behind:  # nothing more is read from the upstream until it drains
                    self._pause()
                    self._handed.receiving = True
                    await self._receiver.drain()
                    self._handed.receiving = False
                    self.behind = False
                    self._paused = False
                    protocol.resume_reading()
                    continue
                if self.ended:
                    return
                self._wake = loop.create_future()
                await self._wake
        finally:
            _ARRIVING.pop(id(content), None)
            self._wake = None
            self._protocol = None

    def arrived(self, data: bytes) -> None:
        if self.feed(data):
            self._pause()  # at once: what else arrives before the task runs is one read
            self._wake_up()
        elif self.failure is not None:
            self._wake_up()

    def _pause(self) -> None:
        if not self._paused and self._protocol is not None:
            self._paused = True
            self._protocol.pause_reading()

    def end(self) -> None:
        self.ended = True
        self._wake_up()

    def fail(self, exc: BaseException) -> None:
        if self.failure is None:
            self.failure = exc
        self._wake_up()

    def _wake_up(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)


# The reader whose reads a stream handles as they arrive, by its id(): the reader has
# __slots__ (no room for a reference), and the entry lives only while `take()` runs.
_ARRIVING: dict[int, _Arrivals] = {}


class _ArrivingReader(aiohttp.StreamReader):
    """aiohttp's body reader with its feed calls handed to an `_Arrivals`. Swapped in as
    the class of the response's reader (aiohttp offers no hook; the layout is the same),
    and only for a plain `StreamReader`: any other aiohttp is read with `readany()`."""

    __slots__ = ()

    def feed_data(self, data: bytes, size: int = 0) -> bool:
        arrivals = _ARRIVING.get(id(self))
        if arrivals is None:
            return super().feed_data(data, size)
        arrivals.arrived(data)
        return False

    def feed_eof(self) -> None:
        super().feed_eof()
        arrivals = _ARRIVING.get(id(self))
        if arrivals is not None:
            arrivals.end()

    def set_exception(self, exc: BaseException, *args: Any) -> None:
        super().set_exception(exc, *args)
        arrivals = _ARRIVING.get(id(self))
        if arrivals is not None:
            arrivals.fail(exc)


# An error body is read only to find its message; more than this is not an error message.
MAX_ERROR_BYTES = 64 * 1024
# Upstream bytes are parsed this much at a time. A slice's events are parsed at once and
# held until the client takes them, so this bounds what a stalled client makes lean hold
# beyond aiohttp's own buffer (which pauses the socket past 2 x 64 KiB).
READ_BYTES = 64 * 1024
# A whole non-streaming answer; a long one is ~100 KB, this leaves room for big tool calls.
MAX_ANSWER_BYTES = 16 * 1024 * 1024


class _ErrorDetail(msgspec.Struct):
    message: str = ""
    type: str | None = None


class _ErrorEnvelope(msgspec.Struct):
    error: _ErrorDetail | str | None = None
    message: str | None = None


_decode_error = msgspec.json.Decoder(_ErrorEnvelope).decode


async def read_at_most(content: aiohttp.StreamReader, limit: int) -> bytes:
    """The body up to `limit + 1` bytes (so the caller can tell it was too long).

    `StreamReader.read(n)` returns what is buffered, not n bytes: loop until EOF.
    """
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = await content.read(limit + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _slices(data: bytes) -> list[bytes]:
    return [data[start : start + READ_BYTES] for start in range(0, len(data), READ_BYTES)]


def error_from_response(status: int, body: bytes, headers: Any, provider: str) -> LeanError:
    """An upstream's HTTP error as a `LeanError`; only its parsed message is kept."""
    detail = ""
    try:
        envelope = _decode_error(body)
        if isinstance(envelope.error, _ErrorDetail):
            detail = envelope.error.message
        elif isinstance(envelope.error, str):
            detail = envelope.error
        elif envelope.message:
            detail = envelope.message
    except (msgspec.DecodeError, ValueError):
        pass
    said = f": {detail[:500]}" if detail else ""
    where = f"upstream {provider} answered HTTP {status}"
    retry_after = _retry_after(headers)
    if status == 429:
        return RateLimited(where + said, retry_after=retry_after)
    if status == 529 or (status == 503 and "overload" in detail.lower()):
        return Overloaded(where + said, retry_after=retry_after)
    if status in (401, 403):
        # The message may quote the key (or part of it): say only what happened.
        return UpstreamError(f"{where}: it rejected lean's credentials for this provider")
    if status in (408, 504):
        return UpstreamTimeout(where + said)
    if status >= 500:
        return UpstreamError(where + said, retryable=True, retry_after=retry_after)
    return BadRequest(where + said)


class Upstream:
    def __init__(self, config: Config) -> None:
        self._config = config
        self._session: aiohttp.ClientSession | None = None
        self.secrets = [p.api_key.reveal() for p in config.providers.values() if p.api_key]

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=0, ttl_dns_cache=300, enable_cleanup_closed=True, keepalive_timeout=30
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None),
            auto_decompress=True,
            trust_env=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("Upstream.start() was not called")
        return self._session

    def provider(self, model: ModelConfig) -> ProviderConfig:
        return self._config.providers[model.provider]

    def _clean(self, error: LeanError) -> LeanError:
        error.message = redact(error.message, self.secrets)
        error.args = (error.message,)
        return error

    async def stream(
        self,
        model: ModelConfig,
        body: dict[str, Any],
        guard: Guard,
        receiver: Receiver,
        handed: Handed,
    ) -> None:
        """Hand the answer to `receiver` as it arrives: the pieces of one read per push
        (one client write each), recording in `handed` what went out. Each read is
        handled inside aiohttp's data callback (`_Arrivals`); this task only waits for
        the end, a failure or a client that is behind. An exception from the receiver
        passes through untouched; any exit closes the upstream connection.
        """
        provider = self.provider(model)
        if provider.kind == "demo":
            await self._demo(provider, body, guard, receiver, handed)
            return
        wire = adapter(provider.kind)
        request = wire.build_request(provider, model, body, stream=True)
        translator = wire.StreamTranslator()
        parser = SSEParser(provider.max_event_bytes)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=provider.connect_timeout)
        read_timeout = provider.read_timeout
        guard.waiting(provider.first_byte_timeout)
        try:
            async with self.session.post(
                request.url, data=request.body, headers=request.headers, timeout=timeout
            ) as resp:
                if resp.status != 200:
                    raise error_from_response(
                        resp.status,
                        await read_at_most(resp.content, MAX_ERROR_BYTES),
                        resp.headers,
                        provider.name,
                    )
                if resp.content_type == "application/json":
                    # A server that ignored "stream": the whole answer in one body.
                    await handed.deliver(receiver, wire.parse_completion(await resp.read()))
                    return
                content = resp.content
                arrivals = _Arrivals(parser, translator, receiver, handed, guard, read_timeout)
                if type(content) is aiohttp.StreamReader and resp.connection is not None:
                    await arrivals.take(content, resp.connection.protocol)
                else:  # an aiohttp that reads differently: read it the usual way
                    while data := await content.readany():
                        if arrivals.feed(data):
                            arrivals.behind = False
                            await receiver.drain()
                        if arrivals.failure is not None:
                            raise arrivals.failure
                parser.close()
                translator.close()
        except asyncio.CancelledError:
            if (timeout_error := guard.take_timeout()) is not None:
                raise self._clean(timeout_error) from None
            raise
        except LeanError as exc:
            if handed.receiving:
                raise
            raise self._clean(exc) from None
        except SSEProtocolError as exc:
            raise UpstreamError(f"upstream {provider.name} sent a bad stream: {exc}") from None
        except (aiohttp.ClientError, OSError) as exc:
            if handed.receiving:
                raise  # the client's side failed
            if translator.finished:
                return  # the connection broke after the answer was complete
            raise self._transport_error(provider, exc) from None

    async def complete(
        self, model: ModelConfig, body: dict[str, Any], guard: Guard | None = None
    ) -> list[Piece]:
        """The whole answer without streaming (the fallback path and `stream = false`)."""
        provider = self.provider(model)
        if provider.kind == "demo":
            return demo.answer(body)
        wire = adapter(provider.kind)
        request = wire.build_request(provider, model, body, stream=False)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=provider.connect_timeout)
        if guard is not None:
            guard.idle()  # heartbeats go on; this call has its own deadline
        try:
            async with (
                asyncio.timeout(provider.first_byte_timeout),
                self.session.post(
                    request.url, data=request.body, headers=request.headers, timeout=timeout
                ) as resp,
            ):
                if resp.status != 200:
                    raise error_from_response(
                        resp.status,
                        await read_at_most(resp.content, MAX_ERROR_BYTES),
                        resp.headers,
                        provider.name,
                    )
                body_bytes = await read_at_most(resp.content, MAX_ANSWER_BYTES)
                if len(body_bytes) > MAX_ANSWER_BYTES:
                    raise UpstreamError(f"upstream {provider.name} answer exceeds 16 MiB")
                return list(wire.parse_completion(body_bytes))
        except TimeoutError:
            raise UpstreamTimeout(
                f"upstream {provider.name} did not answer within {provider.first_byte_timeout:g} s"
            ) from None
        except LeanError as exc:
            raise self._clean(exc) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise self._transport_error(provider, exc) from None

    def _transport_error(self, provider: ProviderConfig, exc: BaseException) -> LeanError:
        if isinstance(exc, aiohttp.ClientConnectorError | ConnectionRefusedError):
            what = "could not connect"
        elif isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ServerDisconnectedError):
            what = "closed the connection mid-answer"
        else:
            what = f"failed ({type(exc).__name__})"
        return UpstreamError(f"upstream {provider.name} {what}", retryable=True)

    async def _demo(
        self,
        provider: ProviderConfig,
        body: dict[str, Any],
        guard: Guard,
        receiver: Receiver,
        handed: Handed,
    ) -> None:
        for piece in demo.answer(body):
            if isinstance(piece, Text) and provider.demo_delay > 0:
                guard.waiting(provider.read_timeout)
                await asyncio.sleep(provider.demo_delay)
            await handed.deliver(receiver, [piece])
