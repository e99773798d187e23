"""Server-side tools declared in the config: `kind = python` and `kind = http`.

A tool never crashes a run: whatever goes wrong (bad arguments, an exception,
a timeout, an HTTP error, an answer over its size bound) becomes an `isError`
result the model sees. Python tools are imported once at start-up, so a wrong
import path stops lean there (exit 2) rather than at the first call. HTTP tools
POST the arguments to their URL; the host must be one the tool allows,
redirects are not followed, and the answer is read up to `max_response_bytes`.
`kind = client` tools are answered by the client (`lean.run`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import importlib
import inspect
from collections.abc import Callable
from typing import Any

import aiohttp
import msgspec
import yarl

from lean.config import ConfigError, ToolConfig
from lean.metrics import Metrics
from lean.upstream import read_at_most

_encode = msgspec.json.Encoder().encode
_decode_args = msgspec.json.Decoder(dict[str, Any]).decode


class ToolsBusy(Exception):
    """Every tool thread is busy: the call becomes an error result at once."""


def openai_tools(tools: list[ToolConfig]) -> list[dict[str, Any]]:
    """The `tools` parameter of a Chat Completions request."""
    return [
        {
            "type": "function",
            "function": {
                "name": tool.name,
                "description": tool.description,
                "parameters": tool.parameters,
            },
        }
        for tool in tools
    ]


def _import(tool: ToolConfig) -> Callable[..., Any]:
    module_name, _, attr = tool.function.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"tool.{tool.name}", "function", "an importable module:function", tool.function
        ) from exc
    if not callable(function):
        raise ConfigError(f"tool.{tool.name}", "function", "a callable", tool.function)
    return function  # type: ignore[no-any-return]


def as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return _encode(value).decode()
    except TypeError:
        return str(value)


def _bounded(tool: ToolConfig, value: Any) -> tuple[str, bool]:
    """(result, is_error) for a python tool's value: its text, or an error past the bound."""
    limit = tool.max_response_bytes
    if isinstance(value, str):
        text = value
        size = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
    else:
        try:
            raw = _encode(value)
        except TypeError:
            raw = str(value).encode("utf-8", "surrogatepass")
        size = len(raw)
        text = "" if size > limit else raw.decode("utf-8", "replace")
    if size > limit:
        return (
            f"tool '{tool.name}' returned {size} bytes, more than its max_response_bytes "
            f"({limit}); the result was dropped",
            True,
        )
    return text, False


class Tools:
    def __init__(
        self, tools: dict[str, ToolConfig], *, threads: int = 16, metrics: Metrics | None = None
    ) -> None:
        self.config = tools
        self._functions = {
            name: _import(tool) for name, tool in tools.items() if tool.kind == "python"
        }
        self._session: aiohttp.ClientSession | None = None
        self._metrics = metrics if metrics is not None else Metrics()
        self.threads = threads  # [limits] tool_threads
        # Threads are started as calls need them, up to `threads` (none for check-config).
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="lean-tool"
        )
        self.busy = 0  # threads running a call, including calls past their timeout
        self._late: set[concurrent.futures.Future[Any]] = set()  # calls past their timeout

    async def start(self) -> None:
        if any(tool.kind == "http" for tool in self.config.values()):
            self._session = aiohttp.ClientSession(trust_env=False)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        # Calls not started are dropped; a running one cannot be stopped (see above).
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def run(self, tool: ToolConfig, arguments: str) -> tuple[str, bool]:
        """(result, is_error) for one call; never raises but on cancellation."""
        try:
            args = _decode_args(arguments or "{}")
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            return f"invalid arguments: {exc}", True
        try:
            async with asyncio.timeout(tool.timeout):
                if tool.kind == "python":
                    return _bounded(tool, await self._python(tool, args))
                return await self._http(tool, args)
        except TimeoutError:
            return f"tool '{tool.name}' timed out after {tool.timeout:g} s", True
        except ToolsBusy as exc:
            return str(exc), True
        except Exception as exc:
            return f"tool '{tool.name}' failed: {type(exc).__name__}: {exc}", True

    async def _python(self, tool: ToolConfig, args: dict[str, Any]) -> Any:
        function = self._functions[tool.name]
        if inspect.iscoroutinefunction(function):
            return await function(**args)
        # A sync tool may block: it runs on a thread so the loop keeps streaming.
        if self.busy >= self.threads:
            self._metrics.tool_refusals += 1
            raise ToolsBusy(
                f"tool '{tool.name}' was not run: all {self.threads} tool threads are busy "
                f"({len(self._late)} with calls past their timeout); [limits] tool_threads"
            )
        loop = asyncio.get_running_loop()
        future = self._executor.submit(functools.partial(function, **args))
        self.busy += 1
        future.add_done_callback(functools.partial(self._ended_threadsafe, loop))
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            if future.running():  # timed out or its run was cancelled: the thread goes on
                self._late.add(future)
                self._metrics.tool_overruns += 1
            raise

    def _ended_threadsafe(
        self, loop: asyncio.AbstractEventLoop, future: concurrent.futures.Future[Any]
    ) -> None:
        """A call's thread is free again (called on that thread, or on cancel)."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: lean has stopped
            loop.call_soon_threadsafe(self._ended, future)

    def _ended(self, future: concurrent.futures.Future[Any]) -> None:
        self.busy -= 1
        self._late.discard(future)

    async def _http(self, tool: ToolConfig, args: dict[str, Any]) -> tuple[str, bool]:
        assert self._session is not None
        host = yarl.URL(tool.url).host or ""
        if host not in tool.allowed_hosts:
            return f"tool '{tool.name}': host {host} is not allowed", True
        async with self._session.post(
            tool.url,
            data=_encode(args),
            headers={"Content-Type": "application/json"},
            allow_redirects=False,
        ) as resp:
            body = await read_at_most(resp.content, tool.max_response_bytes)
            if len(body) > tool.max_response_bytes:
                return (
                    f"tool '{tool.name}' answered more than {tool.max_response_bytes} bytes",
                    True,
                )
            text = body.decode("utf-8", "replace")
            if resp.status >= 300:
                return f"tool '{tool.name}' answered HTTP {resp.status}: {text[:500]}", True
            return text, False
