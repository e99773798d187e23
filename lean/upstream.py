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
from typing import Any

import aiohttp
import msgspec

from lean.aiohttp_internals import fast_reader
from lean.arrivals import Arrivals, Handed, Receiver
from lean.budget import MIB, Budget, Lease
from lean.client_io import ClientGone
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
from lean.providers import anthropic as anthropic_wire
from lean.providers.base import Piece, Text
from lean.sse import SSEParser, SSEProtocolError

# An error body is read only to find its message; more than this is not an error message.
MAX_ERROR_BYTES = 64 * 1024
# A whole non-streaming answer; a long one is ~100 KB, this leaves room for big tool calls.
# What all of them hold at once is bounded by [limits] fallback_budget_mb (lean.budget).
MAX_ANSWER_BYTES = 16 * MIB
# Charged before a non-streaming request is sent: when the budget has not even this
# left, the request is refused before the provider generates (and bills) an answer.
ANSWER_FLOOR = 64 * 1024


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


async def read_answer(
    content: aiohttp.StreamReader, length: int | None, lease: Lease, provider: str
) -> bytearray:
    """A whole answer's body in one buffer, each byte charged to `lease` as it arrives.

    No list of chunks joined at the end: the body exists once (plus one read). A
    Content-Length is charged before the first byte is read, so a refused answer costs
    nothing; a chunked body is charged as it grows. Raises `BudgetExhausted` past the
    budget, `UpstreamError` past MAX_ANSWER_BYTES.
    """
    too_big = UpstreamError(f"upstream {provider} answer exceeds {MAX_ANSWER_BYTES // MIB} MiB")
    if length is not None:
        if length > MAX_ANSWER_BYTES:
            raise too_big
        if length > lease.held:
            lease.charge(length - lease.held)
    body = bytearray()
    while chunk := await content.readany():
        size = len(body) + len(chunk)
        if size > MAX_ANSWER_BYTES:
            raise too_big
        if size > lease.held:
            lease.charge(size - lease.held)
        body += chunk
    return body


def _retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


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
        # Whole answers held at once (lean.budget); shared by every request.
        self.budget = Budget(config.limits.fallback_budget_mb * MIB)
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
        handled inside aiohttp's data callback (`arrivals.Arrivals`); this task only waits for
        the end, a failure or a client that is behind. The receiver's `ClientGone` passes
        through untouched; any exit closes the upstream connection.
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
                    with self.budget.lease() as lease:
                        body_bytes = await read_answer(
                            resp.content, resp.content_length, lease, provider.name
                        )
                        pieces = wire.parse_completion(body_bytes)
                        del body_bytes  # parsed: only the pieces are held while they go out
                        await handed.deliver(receiver, pieces)
                    return
                arrivals = Arrivals(parser, translator, receiver, handed, guard, read_timeout)
                if (fast := fast_reader(resp)) is not None:
                    await arrivals.take(*fast)
                else:  # a reader of another kind, or a body already complete
                    await arrivals.read(resp.content)
                parser.close()
                translator.close()
        except ClientGone:
            raise  # the client's side failed, not the upstream
        except asyncio.CancelledError:
            if (timeout_error := guard.take_timeout()) is not None:
                raise self._clean(timeout_error) from None
            raise
        except LeanError as exc:
            raise self._clean(exc) from None
        except SSEProtocolError as exc:
            raise UpstreamError(f"upstream {provider.name} sent a bad stream: {exc}") from None
        except (aiohttp.ClientError, OSError) as exc:
            if translator.finished:
                return  # the connection broke after the answer was complete
            raise self._transport_error(provider, exc) from None

    async def complete(
        self,
        model: ModelConfig,
        body: dict[str, Any],
        guard: Guard | None = None,
        lease: Lease | None = None,
    ) -> list[Piece]:
        """The whole answer without streaming (the fallback path and `stream = false`).

        Its body is charged to `lease` (the caller keeps it until the pieces are handed
        on); without one, to a lease of its own released on return.
        """
        if lease is None:
            with self.budget.lease() as own:
                return await self.complete(model, body, guard, own)
        provider = self.provider(model)
        if provider.kind == "demo":
            return demo.answer(body)
        lease.charge(ANSWER_FLOOR)  # refused here, no provider is asked
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
                body_bytes = await read_answer(
                    resp.content, resp.content_length, lease, provider.name
                )
                return list(wire.parse_completion(body_bytes))
        except TimeoutError:
            raise UpstreamTimeout(
                f"upstream {provider.name} did not answer within {provider.first_byte_timeout:g} s"
            ) from None
        except LeanError as exc:
            raise self._clean(exc) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise self._transport_error(provider, exc) from None

    async def count(self, model: ModelConfig, native: anthropic_wire.Native) -> int:
        """An Anthropic upstream's own count of a Messages request's input tokens
        (`POST /messages/count_tokens`), under `first_byte_timeout`."""
        provider = self.provider(model)
        request = anthropic_wire.build_count_request(provider, model, native)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=provider.connect_timeout)
        try:
            async with (
                asyncio.timeout(provider.first_byte_timeout),
                self.session.post(
                    request.url, data=request.body, headers=request.headers, timeout=timeout
                ) as resp,
            ):
                body = await read_at_most(resp.content, MAX_ERROR_BYTES)
                if resp.status != 200:
                    raise error_from_response(resp.status, body, resp.headers, provider.name)
                return anthropic_wire.parse_count(body)
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
