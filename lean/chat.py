"""`lean chat`: a terminal client for scene runs, over SSE or one WebSocket
(docs/protocol.md §2, §3).

One line is one run. Deltas are printed as they arrive (thinking dimmed on a terminal), a
newline ends the answer, errors go to stderr. Tool calls show on stderr as they start and end;
a `waiting` event (a client tool) asks at the prompt and sends the line typed as the tool's
result. The `conversationId` of the first `start` goes with every later run, so the model sees
the conversation. Ctrl-C during a run asks lean to cancel it (SSE: `POST
/v1/runs/{runId}/cancel`; WebSocket: a `cancel` frame) and waits for the run's last event; a
second Ctrl-C stops waiting. Ctrl-C at the prompt, or the end of stdin, ends the session with 0.
With a MESSAGE: one run, exit code 0 if it ends with `done`, else 1. Where lean is and the
token come from the flags, else from the config file as `lean serve` reads it (`[server]
host`/`port`; the variable `[auth] tokens_env` names).
"""

from __future__ import annotations

import asyncio
import configparser
import os
import signal
import sys
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO
from urllib.parse import quote

import aiohttp
import msgspec

from lean import events
from lean.sse import SSEParser

DIM, RESET = "\x1b[2m", "\x1b[0m"
CONNECT_TIMEOUT = 10.0  # seconds to reach lean; a run itself may take as long as it takes
FINAL = events.Done | events.Error

Handler = Callable[[events.Event], None]


@dataclass(frozen=True)
class Options:
    url: str = "http://127.0.0.1:8080"
    scene: str = "chat"
    ws: bool = False
    token: str | None = None
    show_ids: bool = False
    message: str | None = None  # None: read lines from stdin
    inputs: tuple[tuple[str, str], ...] = ()  # the scene's template inputs (--input NAME=VALUE)


def server_settings(path: str, environ: dict[str, str]) -> tuple[str, str | None]:
    """lean's URL and a client token, as the config file at `path` says `lean serve` runs:
    (`http://host:port`, the first token of the variable `[auth] tokens_env` names, or None).
    Only `[server]` and `[auth]` are read: a client has no provider keys to check. A missing
    file gives lean's defaults; a file that cannot be read as INI raises `ChatError`."""
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";", "#"))
    try:
        found = parser.read(path, encoding="utf-8-sig")
    except (configparser.Error, UnicodeDecodeError) as exc:
        first_line = str(exc).partition("\n")[0]
        raise ChatError(f"cannot read {path}: {first_line}") from None
    server = parser["server"] if found and parser.has_section("server") else {}
    host = server.get("host", "127.0.0.1").strip("[]")
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"  # listening everywhere: reach it on loopback
    elif host == "::":
        host = "::1"
    port = server.get("port", "8080")
    auth = parser["auth"] if found and parser.has_section("auth") else {}
    tokens = environ.get(auth.get("tokens_env", "LEAN_TOKENS"), "")
    token = next((t for t in (part.strip() for part in tokens.split(",")) if t), None)
    return f"http://{f'[{host}]' if ':' in host else host}:{port}", token


class ChatError(Exception):
    """A run that could not be made or followed to its end: lean unreachable, refusing, gone."""


class _Error(msgspec.Struct):
    message: str
    code: str = "error"


class _ErrorBody(msgspec.Struct):
    error: _Error


class _RunOf(msgspec.Struct, rename="camel"):
    run_id: str | None = None


_error_body = msgspec.json.Decoder(_ErrorBody).decode
_run_of = msgspec.json.Decoder(_RunOf).decode


def _event(data: str | bytes) -> events.Event | None:
    """The event, or None for what this client cannot read (an unknown type: skipped)."""
    try:
        return events.decode(data)
    except msgspec.DecodeError:
        return None


class SSETransport:
    """A `POST /v1/scenes/{scene}/stream` per run."""

    def __init__(self, http: aiohttp.ClientSession, url: str, scene: str) -> None:
        self._http, self._url, self._scene = http, url, scene

    async def run(self, body: dict[str, Any], handle: Handler) -> None:
        """Start a run; hand each of its events to `handle`, up to the last one."""
        url = f"{self._url}/v1/scenes/{quote(self._scene, safe='')}/stream"
        async with self._http.post(url, json=body) as resp:
            if resp.status != 200:
                raw = await resp.read()
                try:
                    error = _error_body(raw).error
                except msgspec.DecodeError:
                    raise ChatError(f"HTTP {resp.status}: {raw[:200]!r}") from None
                raise ChatError(f"{error.code}: {error.message}")
            parser = SSEParser()
            async for data in resp.content.iter_any():
                for message in parser.feed(data):
                    if (event := _event(message.data)) is not None:
                        handle(event)
                        if isinstance(event, FINAL):
                            return
        raise ChatError("lean ended the stream before the run ended")

    async def cancel(self, run_id: str) -> None:
        # A 404 means the run has just ended: nothing is left to cancel.
        async with self._http.post(f"{self._url}/v1/runs/{quote(run_id, safe='')}/cancel"):
            pass

    async def tool_result(self, run_id: str, tool_call_id: str, result: str) -> None:
        url = f"{self._url}/v1/runs/{quote(run_id, safe='')}/tool-results"
        async with self._http.post(url, json={"toolCallId": tool_call_id, "result": result}) as r:
            if r.status != 200:
                raise ChatError(f"lean refused the answer: HTTP {r.status}")

    async def close(self) -> None:
        pass


class WSTransport:
    """One socket for the session. A reader task takes every frame as it comes, so the
    socket answers lean's heartbeat pings even while the user sits at the prompt."""

    def __init__(self, socket: aiohttp.ClientWebSocketResponse, scene: str) -> None:
        self._socket, self._scene = socket, scene
        self._run_id: str | None = None
        self._handle: Handler | None = None
        self._ended: asyncio.Future[None] | None = None
        self._reader = asyncio.create_task(self._read())

    async def run(self, body: dict[str, Any], handle: Handler) -> None:
        if self._reader.done():
            raise ChatError("lean closed the connection")
        self._run_id = run_id = "cli_" + uuid.uuid4().hex[:20]
        self._handle, self._ended = handle, asyncio.get_running_loop().create_future()
        try:
            frame = {"type": "run", "runId": run_id, "scene": self._scene, **body}
            await self._socket.send_json(frame)
            await self._ended
        finally:  # frames of a run given up on (a second Ctrl-C) are dropped from now on
            self._run_id = self._handle = self._ended = None

    async def cancel(self, run_id: str) -> None:
        await self._socket.send_json({"type": "cancel", "runId": run_id})

    async def tool_result(self, run_id: str, tool_call_id: str, result: str) -> None:
        frame = {"type": "tool_result", "runId": run_id, "toolCallId": tool_call_id}
        await self._socket.send_json({**frame, "result": result})

    async def close(self) -> None:
        await self._socket.close()
        await self._reader

    async def _read(self) -> None:
        try:
            async for message in self._socket:
                if message.type is not aiohttp.WSMsgType.TEXT or self._handle is None:
                    continue
                event = _event(message.data)
                if event is None or _run_of(message.data).run_id != self._run_id:
                    continue
                self._handle(event)
                if isinstance(event, FINAL) and self._ended is not None:
                    self._handle = None
                    self._ended.set_result(None)
        finally:
            if self._ended is not None and not self._ended.done():
                self._ended.set_exception(ChatError("lean closed the connection"))


Transport = SSETransport | WSTransport


class Chat:
    """A session: the conversation, the run under way, Ctrl-C, and what the terminal shows."""

    def __init__(
        self,
        transport: Transport,
        options: Options,
        out: TextIO,
        err: TextIO,
        lines: Callable[[], Lines] | None = None,
    ) -> None:
        self.transport, self.options, self.out, self.err = transport, options, out, err
        self._lines = lines  # where a client tool's answer is read from (None: nowhere)
        self.conversation_id: str | None = None
        self._dim = out.isatty()
        self._turn: asyncio.Task[None] | None = None
        self._run_id: str | None = None
        self._final: events.Event | None = None  # once it has come, Ctrl-C ends the session
        self._cancelling = False
        self._cancels: set[asyncio.Task[None]] = set()  # referenced until done
        self._part: str | None = None  # what the line printed last holds, if anything
        self._asking: asyncio.Task[None] | None = None  # a client tool's question at the prompt

    async def turn(self, message: str) -> bool:
        """One run; True when it ended with `done`."""
        body: dict[str, Any] = {"message": message}
        if self.options.inputs:
            body["inputs"] = dict(self.options.inputs)
        if self.conversation_id is not None:
            body["conversationId"] = self.conversation_id
        self._run_id, self._final, self._cancelling = None, None, False
        self._turn = task = asyncio.create_task(self._exchange(body))
        try:
            await asyncio.wait([task])  # returns, rather than raises, when `task` is cancelled
        finally:
            self._turn = None
            task.cancel()
            if self._asking is not None:  # the run ended before the question was answered
                self._asking.cancel()
                self._asking = None
        if task.cancelled():
            self._fail("stopped waiting for the run")
        return isinstance(self._final, events.Done)

    def interrupt(self) -> bool:
        """Ctrl-C: cancel the run (a second one: stop waiting); False when no run is under way."""
        if self._turn is None or self._final is not None:
            return False
        if self._cancelling:
            self._turn.cancel()
        else:
            self._cancelling = True
            if self._run_id is not None:  # else `start` sends it
                self._cancel(self._run_id)
        return True

    def _cancel(self, run_id: str) -> None:
        task = asyncio.create_task(self._send_cancel(run_id))
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)

    async def _answer(self, event: events.Waiting) -> None:
        """A client tool: ask at the prompt, send the line typed as its result."""
        run_id = self._run_id
        if self._lines is None or run_id is None:
            self._fail(f"the run waits for the client tool {event.name}; nobody can answer here")
            return
        print(f"[{event.name} waits for your answer]", file=self.err, flush=True)
        line = await self._lines().get()
        if line is None:
            return  # the end of input: the run ends with tool_timeout, or Ctrl-C cancels it
        try:
            await self.transport.tool_result(run_id, event.tool_call_id, line)
        except ChatError as exc:
            self._fail(str(exc))
        except (aiohttp.ClientError, OSError) as exc:
            self._fail(f"could not send the answer: {exc}")

    async def _send_cancel(self, run_id: str) -> None:
        try:
            await self.transport.cancel(run_id)
        except (aiohttp.ClientError, OSError) as exc:
            self._fail(f"could not cancel the run: {exc}")

    async def _exchange(self, body: dict[str, Any]) -> None:
        try:
            await self.transport.run(body, self._show)
        except ChatError as exc:
            self._fail(str(exc))
        except (aiohttp.ClientError, OSError) as exc:
            self._fail(f"cannot reach lean at {self.options.url}: {exc}")

    def _show(self, event: events.Event) -> None:
        if isinstance(event, events.Start):
            self._run_id = event.run_id
            if event.conversation_id != self.conversation_id:
                self.conversation_id = event.conversation_id
                if self.options.show_ids:
                    print(f"conversation: {event.conversation_id}", file=self.err, flush=True)
            if self._cancelling:
                self._cancel(event.run_id)
        elif isinstance(event, events.Delta) and event.text:
            if self._part == "thinking" and event.part != "thinking":
                self.out.write("\n")  # the answer starts on a line of its own
            dim = self._dim and event.part == "thinking"
            self.out.write(f"{DIM}{event.text}{RESET}" if dim else event.text)
            self.out.flush()
            self._part = event.part
        elif isinstance(event, events.ToolStart):
            self._end_line()
            print(f"[{event.name}({event.arguments})]", file=self.err, flush=True)
        elif isinstance(event, events.ToolEnd):
            self._end_line()
            outcome = "failed" if event.is_error else "->"
            result = event.result if len(event.result) <= 200 else event.result[:200] + "..."
            line = f"[{event.name} {outcome} {result} ({event.duration_ms:g} ms)]"
            print(line, file=self.err, flush=True)
        elif isinstance(event, events.Waiting):
            self._end_line()
            self._asking = asyncio.create_task(self._answer(event))
        elif isinstance(event, events.Done):
            self._final, self._part = event, None
            self.out.write("\n")
            self.out.flush()
        elif isinstance(event, events.Error):
            self._final = event
            self._fail(f"{event.code}: {event.message}")

    def _end_line(self) -> None:
        if self._part is not None:
            self.out.write("\n")
            self.out.flush()
            self._part = None

    def _fail(self, message: str) -> None:
        self._end_line()
        print(f"lean chat: {message}", file=self.err, flush=True)


class Lines:
    """stdin, a line per `get()`, read on a daemon thread with `os.read`: the loop never blocks
    on the terminal, and a thread left in a read (Ctrl-C at the prompt) holds no lock of
    `sys.stdin` that could stop the interpreter from exiting. A line is read only when asked
    for; lines are the user's own input, and lean bounds a message (`max_body_bytes`)."""

    def __init__(self, fd: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._asked = threading.Semaphore(0)
        self._waiter: asyncio.Future[str | None] | None = None
        self._stopped = False
        threading.Thread(target=self._serve, args=(fd,), daemon=True).start()

    async def get(self) -> str | None:
        """The next line without its line end; None at the end of input or after `stop()`."""
        if self._stopped:
            return None
        waiter = self._waiter
        if waiter is None or waiter.done():  # else a caller that gave up left it: take it over
            waiter = self._waiter = self._loop.create_future()
            self._asked.release()
        return await asyncio.shield(waiter)  # a cancelled caller leaves the line to the next

    def stop(self) -> None:
        self._stopped = True
        self._deliver(None)

    def _deliver(self, line: str | None) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(line)

    def _serve(self, fd: int) -> None:
        buffer = b""
        while True:
            self._asked.acquire()
            while b"\n" not in buffer and (data := os.read(fd, 65536)):
                buffer += data
            raw, newline, buffer = buffer.partition(b"\n")
            line = raw.decode(errors="replace").removesuffix("\r") if raw or newline else None
            try:
                self._loop.call_soon_threadsafe(self._deliver, line)
            except RuntimeError:  # the loop is closed: the session is over
                return
            if line is None:
                return


async def _connect(http: aiohttp.ClientSession, options: Options) -> Transport:
    url = options.url.rstrip("/")
    if not options.ws:
        return SSETransport(http, url, options.scene)
    try:
        return WSTransport(await http.ws_connect(url + "/v1/ws"), options.scene)
    except aiohttp.WSServerHandshakeError as exc:
        hint = " (unauthorized: give a token: --token or $LEAN_TOKENS)" if exc.status == 401 else ""
        raise ChatError(f"lean refused the WebSocket: HTTP {exc.status}{hint}") from None
    except (aiohttp.ClientError, OSError) as exc:
        raise ChatError(f"cannot reach lean at {url}: {exc}") from None


async def session(options: Options, out: TextIO, err: TextIO, stdin: TextIO) -> int:
    headers = {"Authorization": f"Bearer {options.token}"} if options.token else {}
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as http:
        try:
            transport = await _connect(http, options)
        except ChatError as exc:
            print(f"lean chat: {exc}", file=err, flush=True)
            return 1
        made: list[Lines] = []

        def stdin_lines() -> Lines:  # made when first needed: a one-shot run may never read
            if not made:
                made.append(Lines(stdin.fileno()))
            return made[0]

        chat = Chat(transport, options, out, err, stdin_lines)
        lines = stdin_lines() if options.message is None else None

        def on_sigint() -> None:
            if not chat.interrupt() and lines is not None:  # at the prompt
                lines.stop()

        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, on_sigint)
        try:
            if lines is None:
                return 0 if await chat.turn(options.message or "") else 1
            prompt = "> " if stdin.isatty() else ""
            while True:
                print(prompt, end="", file=err, flush=True)
                line = await lines.get()
                if line is None:
                    print("\n" if prompt else "", end="", file=err, flush=True)
                    return 0
                if line.strip():
                    await chat.turn(line)
        finally:
            loop.remove_signal_handler(signal.SIGINT)
            await transport.close()


def chat(options: Options) -> int:
    """`lean chat`: the exit code."""
    try:
        return asyncio.run(session(options, sys.stdout, sys.stderr, sys.stdin))
    except KeyboardInterrupt:  # before the handler was installed
        return 130
