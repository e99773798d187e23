"""A real, scriptable fake of an OpenAI-compatible provider, for lean's integration tests.

Strategy: a genuine aiohttp server on 127.0.0.1 (ephemeral port) that speaks the
Chat Completions wire format byte for byte - SSE streams in HTTP/1.1 chunked encoding,
plain JSON answers, HTTP errors - and records every request it receives. Each
POST /v1/chat/completions consumes one queued behaviour (`Stream`, `Reply`, `Stall`),
FIFO; with the queue empty `FakeOpenAI.default` decides.

What it guarantees, because lean's tests depend on it:
- `Recorded.disconnected` is set the moment the fake notices the client left before the
  response finished: a write failing or the handler being cancelled. Writes fail with
  `ConnectionError` - aiohttp's `ClientConnectionResetError` when the transport is
  already closing, but a plain `ConnectionError("Connection lost")` when the writer was
  blocked in drain() - so the fake catches `ConnectionError`, not just resets. The runner uses
  `handler_cancellation=True`, so a client that leaves while the fake is silent (a
  `Stall`, `stall_after`, a `Reply` delay, a `first_byte_delay`) is noticed when its
  FIN arrives, not at the next write.
- The fake's own actions are never recorded as a client leaving: `cut_after` aborts the
  connection itself, and `close()` cancels handlers that are still running.
- `close()` is idempotent and returns promptly even with stalled handlers.

Wire helpers follow the OpenAI streaming format: `data: <compact JSON>\\n\\n` events,
`data: [DONE]\\n\\n` at the end, a usage chunk with `"choices": []` before it.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise
from types import TracebackType
from typing import Any, TypeVar

from aiohttp import web

DEFAULT_TEXT = "Hello from the fake upstream."
CREATED = 1_700_000_000  # fixed "created" stamp so every helper's output is deterministic
PROMPT_TOKENS = 8  # the fake does not tokenise prompts; usage reports this fixed figure
STALL_LIMIT = 60.0  # how long `stall_after` holds a connection when the client stays
SHUTDOWN_TIMEOUT = 0.5  # close() cancels handlers itself; this only bounds stragglers
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}

DONE: bytes = b"data: [DONE]\n\n"

_T = TypeVar("_T")


# --- what the fake records -------------------------------------------------------------


class Headers(dict[str, str]):
    """Request headers with lower-cased keys; lookups ignore case, as HTTP does."""

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(key.lower())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and super().__contains__(key.lower())

    def get(self, key: str, default: Any = None, /) -> Any:
        return super().get(key.lower(), default)


@dataclass
class Recorded:
    """One request the fake received."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any  # parsed JSON, or None when empty or not JSON
    raw: bytes
    started: float  # time.monotonic() when the handler began
    disconnected: float | None = None  # when the client was noticed leaving early
    finished: float | None = None  # when the response completed normally
    events_sent: int = 0  # stream events fully written (a stalled reader stops this count)


# --- behaviours ------------------------------------------------------------------------


@dataclass
class Stream:
    """An SSE answer. `cut_after`/`stall_after` count events already sent."""

    events: list[bytes]
    delay: float = 0.0
    first_byte_delay: float = 0.0
    split: int | None = None
    cut_after: int | None = None
    stall_after: int | None = None
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Reply:
    """A plain answer: `raw` bytes if given, else `body` as compact JSON, else empty."""

    status: int = 200
    body: Any = None
    raw: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass
class Stall:
    """Accept the request and never answer; after `seconds` the connection is aborted."""

    seconds: float = 60.0


Behaviour = Stream | Reply | Stall


# --- wire helpers ----------------------------------------------------------------------


def _dumps(obj: Any) -> bytes:
    # ensure_ascii=False: providers send UTF-8 as is, so multi-byte characters reach lean
    # raw and can be split across reads (split=1), which is what lean must survive.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def sse(obj: Any) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


def chunk(
    delta: dict[str, Any],
    *,
    finish_reason: str | None = None,
    model: str = "fake-model",
    id: str = "chatcmpl-fake",
    usage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "id": id,
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }
    if usage is not None:
        obj["usage"] = usage
    return obj


def usage_chunk(
    usage: dict[str, Any], *, model: str = "fake-model", id: str = "chatcmpl-fake"
) -> dict[str, Any]:
    """The last chunk of a stream with `stream_options.include_usage`: no choices."""
    return {
        "id": id,
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": model,
        "choices": [],
        "usage": usage,
    }


def _usage(completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": completion_tokens,
        "total_tokens": PROMPT_TOKENS + completion_tokens,
    }


_WORD = re.compile(r"\s*\S+\s*")


def _words(text: str) -> list[str]:
    """Pieces that concatenate back to `text`: each word keeps the spaces after it."""
    pieces = _WORD.findall(text)
    return pieces if pieces else ([text] if text else [])


def text_stream(
    text: str,
    *,
    words: bool = True,
    usage: bool = True,
    finish_reason: str = "stop",
    reasoning: str | None = None,
    model: str = "fake-model",
) -> Stream:
    content = _words(text)
    thoughts = _words(reasoning) if reasoning else []
    events = [sse(chunk({"role": "assistant", "content": ""}, model=model))]
    for piece in thoughts if words else ([reasoning] if reasoning else []):
        events.append(sse(chunk({"reasoning_content": piece}, model=model)))
    for piece in content if words else ([text] if text else []):
        events.append(sse(chunk({"content": piece}, model=model)))
    events.append(sse(chunk({}, finish_reason=finish_reason, model=model)))
    if usage:
        events.append(sse(usage_chunk(_usage(len(content) + len(thoughts)), model=model)))
    events.append(DONE)
    return Stream(events)


def _fragments(arguments: str) -> list[str]:
    """Split tool-call arguments into 3 fragments (fewer when shorter than 3 chars)."""
    n = min(3, len(arguments))
    if n == 0:
        return []
    cuts = [len(arguments) * i // n for i in range(n + 1)]
    return [arguments[a:b] for a, b in pairwise(cuts)]


def tool_call_stream(calls: list[tuple[str, str, str]], *, model: str = "fake-model") -> Stream:
    """OpenAI's form: the first delta carries the role and the first call's header."""
    events: list[bytes] = []
    tokens = 0
    for index, (call_id, name, arguments) in enumerate(calls):
        head: dict[str, Any] = {
            "index": index,
            "id": call_id,
            "type": "function",
            "function": {"name": name, "arguments": ""},
        }
        delta: dict[str, Any] = {"tool_calls": [head]}
        if index == 0:
            delta = {"role": "assistant", "content": None, **delta}
        events.append(sse(chunk(delta, model=model)))
        for fragment in _fragments(arguments):
            part = {"index": index, "function": {"arguments": fragment}}
            events.append(sse(chunk({"tool_calls": [part]}, model=model)))
            tokens += 1
    events.append(sse(chunk({}, finish_reason="tool_calls", model=model)))
    events.append(sse(usage_chunk(_usage(tokens), model=model)))
    events.append(DONE)
    return Stream(events)


def completion(
    text: str,
    *,
    finish_reason: str = "stop",
    tool_calls: list[Any] | None = None,
    reasoning: str | None = None,
    usage: dict[str, Any] | None = None,
    model: str = "fake-model",
) -> dict[str, Any]:
    """A non-streaming chat.completion. `tool_calls` items may be OpenAI dicts or
    (id, name, arguments) tuples; with tool calls and no text, content is null."""
    message: dict[str, Any] = {
        "role": "assistant",
        "content": text if text or not tool_calls else None,
    }
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    if tool_calls:
        message["tool_calls"] = [
            c
            if isinstance(c, dict)
            else {"id": c[0], "type": "function", "function": {"name": c[1], "arguments": c[2]}}
            for c in tool_calls
        ]
    tokens = len(_words(text)) + len(_words(reasoning or ""))
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": CREATED,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
        "usage": usage if usage is not None else _usage(tokens),
    }


def error_body(
    message: str, *, type: str = "invalid_request_error", code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": None, "code": code}}


def free_port() -> int:
    """A port on 127.0.0.1 with nothing listening, for "connection refused" tests."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# --- the server ------------------------------------------------------------------------


class FakeOpenAI:
    def __init__(self, *, model: str = "fake-model") -> None:
        self.model = model
        self.requests: list[Recorded] = []
        self.default: Callable[[Any], Behaviour] = self._default
        self._queue: deque[Behaviour] = deque()
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._closing = False
        self._handlers: set[asyncio.Task[Any]] = set()
        # Set and replaced on every change to `requests`, waking wait_disconnect().
        self._changed = asyncio.Event()

    def _default(self, body: Any) -> Behaviour:
        if isinstance(body, dict) and body.get("stream") is True:
            return text_stream(DEFAULT_TEXT, model=self.model)
        return Reply(body=completion(DEFAULT_TEXT, model=self.model))

    # lifecycle

    async def start(self) -> None:
        if self._runner is not None or self._closing:
            raise RuntimeError("FakeOpenAI can be started once")
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        runner = web.AppRunner(
            app,
            handler_cancellation=True,  # notice a client leaving while the handler is idle
            shutdown_timeout=SHUTDOWN_TIMEOUT,
            access_log=None,
        )
        await runner.setup()
        self._runner = runner
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        self._port = runner.addresses[0][1]

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        self._closing = True
        if runner is None:
            return
        # aiohttp would wait shutdown_timeout twice before cancelling a stalled handler.
        for task in list(self._handlers):
            task.cancel()
        await runner.cleanup()

    async def __aenter__(self) -> FakeOpenAI:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def base_url(self) -> str:
        if self._port is None:
            raise RuntimeError("FakeOpenAI is not started")
        return f"http://127.0.0.1:{self._port}/v1"

    # scripting

    def push(self, *behaviours: Behaviour) -> None:
        self._queue.extend(behaviours)

    # The agreed test API takes timeouts: each deadline is part of the question asked.

    async def wait_request(self, index: int = -1, timeout: float = 5.0) -> Recorded:  # noqa: ASYNC109
        """Wait until requests[index] has arrived (e.g. lean has reached the upstream)."""
        return await self._until(lambda: self._get(index), index, timeout, "never arrived")

    async def wait_disconnect(self, index: int = -1, timeout: float = 5.0) -> float:  # noqa: ASYNC109
        """Wait until requests[index] (which may not have arrived yet) is disconnected.
        Raises TimeoutError at the deadline, or at once if that request finished normally."""

        def check() -> float | None:
            rec = self._get(index)
            if rec is not None and rec.disconnected is None and rec.finished is not None:
                raise TimeoutError(f"request {index} finished normally; the client never left")
            return None if rec is None else rec.disconnected

        return await self._until(check, index, timeout, "not disconnected")

    def _get(self, index: int) -> Recorded | None:
        n = len(self.requests)
        return self.requests[index] if -n <= index < n else None

    async def _until(
        self,
        check: Callable[[], _T | None],
        index: int,
        timeout: float,  # noqa: ASYNC109
        what: str,
    ) -> _T:
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                while (value := check()) is None:
                    await self._changed.wait()
                return value
        except TimeoutError:
            if not deadline.expired():
                raise  # check() failed fast
            state = self._get(index)
            raise TimeoutError(f"request {index} {what} within {timeout} s: {state!r}") from None

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _left(self, rec: Recorded) -> None:
        if rec.disconnected is None and rec.finished is None:
            rec.disconnected = time.monotonic()
            self._notify()

    def _done(self, rec: Recorded) -> None:
        rec.finished = time.monotonic()
        self._notify()

    # handlers

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, self._next)

    async def _models(self, request: web.Request) -> web.StreamResponse:
        data = {"object": "list", "data": [{"id": self.model, "object": "model"}]}
        return await self._serve(request, lambda rec: Reply(body=data))

    async def _not_found(self, request: web.Request) -> web.StreamResponse:
        body = error_body(f"no route {request.method} {request.path}", code="not_found")
        return await self._serve(request, lambda rec: Reply(status=404, body=body))

    def _next(self, rec: Recorded) -> Behaviour:
        return self._queue.popleft() if self._queue else self.default(rec.body)

    async def _serve(
        self, request: web.Request, choose: Callable[[Recorded], Behaviour]
    ) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        rec: Recorded | None = None
        try:
            rec = await self._record(request)
            behaviour = choose(rec)
            if isinstance(behaviour, Stream):
                return await self._stream(request, rec, behaviour)
            if isinstance(behaviour, Reply):
                return await self._reply(request, rec, behaviour)
            return await self._stall(request, behaviour)
        except asyncio.CancelledError:
            # handler_cancellation: aiohttp cancels us when the client's connection drops.
            # close() cancels too; that is the fake leaving, not the client.
            if rec is not None and not self._closing:
                self._left(rec)
            raise
        finally:
            self._handlers.discard(task)

    async def _record(self, request: web.Request) -> Recorded:
        started = time.monotonic()
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        rec = Recorded(
            method=request.method,
            path=request.path,
            headers=Headers((k.lower(), v) for k, v in request.headers.items()),
            body=body,
            raw=raw,
            started=started,
        )
        self.requests.append(rec)
        self._notify()
        return rec

    async def _stream(self, request: web.Request, rec: Recorded, s: Stream) -> web.StreamResponse:
        if s.first_byte_delay:
            await asyncio.sleep(s.first_byte_delay)
        resp = web.StreamResponse(status=s.status, headers={**SSE_HEADERS, **s.headers})
        try:
            await resp.prepare(request)
            sent = 0
            for event in s.events:
                if sent == s.cut_after or sent == s.stall_after:
                    break
                if sent and s.delay:
                    await asyncio.sleep(s.delay)
                if s.split:
                    for i in range(0, len(event), s.split):
                        await resp.write(event[i : i + s.split])
                        await asyncio.sleep(0)  # let the transport send each piece alone
                else:
                    await resp.write(event)
                sent += 1
                rec.events_sent = sent
            if sent == s.stall_after:
                await asyncio.sleep(STALL_LIMIT)
                _abort(request)
            elif sent == s.cut_after:
                _abort(request)
            else:
                await resp.write_eof()
                self._done(rec)
        except ConnectionError:  # ClientConnectionResetError, or plain from drain()
            self._left(rec)
        return resp

    async def _reply(self, request: web.Request, rec: Recorded, r: Reply) -> web.StreamResponse:
        if r.delay:
            await asyncio.sleep(r.delay)
        payload = r.raw if r.raw is not None else b"" if r.body is None else _dumps(r.body)
        headers = {"Content-Type": "application/json", **r.headers} if payload else r.headers
        resp = web.Response(status=r.status, body=payload, headers=headers)
        try:
            await resp.prepare(request)
            await resp.write_eof()
            self._done(rec)
        except ConnectionError:
            self._left(rec)
        return resp

    async def _stall(self, request: web.Request, s: Stall) -> web.StreamResponse:
        await asyncio.sleep(s.seconds)
        _abort(request)
        return web.Response()  # never reaches the wire: the connection is gone


def _abort(request: web.Request) -> None:
    """Drop the TCP connection: the client sees a truncated response, not a clean end.
    No await follows this in any handler, so aiohttp's connection_lost (scheduled with
    call_soon) finds the handler already returned and cannot be mistaken for the client
    leaving."""
    if request.transport is not None:
        request.transport.abort()
