"""One round of tool calls inside a scene run: `tool_start`, run or wait, `tool_end`.

The model asked for some tools; every call gets `tool_start` (with its full
arguments), then server tools run concurrently (each with its own timeout) while
client tools (`kind = client`) get `waiting` and pause the run until the client
answers or `client_tool_timeout` passes. `tool_end` goes out as each call
finishes, with its result, `durationMs` and `isError`. A failing tool is an
error result the model sees, never a crashed run. No deltas are sent meanwhile:
the model is not called again until every result is in.

The run's guard is told whom the round waits for: the client while one of its
tools is unanswered (`client_tool_timeout`), else the server tools (their longest
timeout plus `guard.TOOL_GRACE`). The upstream's silence limit does not apply to a
round, and the guard's heartbeats go on.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from lean import events
from lean.config import SceneConfig, ToolConfig
from lean.errors import BadRequest, ToolTimeout
from lean.guard import TOOL_GRACE, Guard
from lean.tools import Tools, as_text


class Call:
    def __init__(self, index: int, id: str | None, name: str | None) -> None:
        self.index = index
        self.id = id or f"call_{uuid.uuid4().hex[:24]}"
        self.name = name or ""
        self.arguments = ""
        self.result = ""
        self.is_error = False
        self.duration_ms = 0.0

    def saved(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "arguments": self.arguments,
            "result": self.result,
            "isError": self.is_error,
            "durationMs": round(self.duration_ms, 1),
        }

    def openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


Emit = Callable[[events.Event], Awaitable[None]]


class ToolRound:
    def __init__(
        self,
        *,
        message_id: str,
        scene: SceneConfig,
        tools: Tools,
        client_timeout: float,
    ) -> None:
        self._message_id = message_id
        self._scene = scene
        self._tools = tools
        self._client_timeout = client_timeout
        self._waiting: dict[str, asyncio.Future[Any]] = {}

    def answer(self, tool_call_id: str, result: Any) -> None:
        """A client tool's result (from a `tool_result` frame or the HTTP endpoint)."""
        future = self._waiting.get(tool_call_id)
        if future is None or future.done():
            raise BadRequest(f"the run is not waiting for tool call '{tool_call_id}'")
        future.set_result(result)

    def _tool(self, name: str) -> ToolConfig | None:
        return self._tools.config.get(name) if name in self._scene.tools else None

    async def run(self, calls: list[Call], emit: Emit, guard: Guard) -> None:
        """Run `calls`, their events through `emit`, the waits under `guard` (both given per
        call, not kept: a round that held its run's method would make run and round a
        cycle only the GC frees)."""
        guard.idle()  # the model's answer is over: its silence limit no longer applies
        for call in calls:
            await emit(
                events.ToolStart(
                    message_id=self._message_id,
                    tool_call_id=call.id,
                    name=call.name,
                    arguments=call.arguments,
                )
            )
        pending: dict[asyncio.Future[Any], Call] = {}
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        try:
            for call in calls:
                tool = self._tool(call.name)
                if tool is None:
                    future: asyncio.Future[Any] = loop.create_future()
                    future.set_result((f"unknown tool '{call.name}'", True))
                elif tool.kind == "client":
                    future = loop.create_future()
                    self._waiting[call.id] = future
                    await emit(
                        events.Waiting(
                            message_id=self._message_id,
                            tool_call_id=call.id,
                            name=call.name,
                            arguments=call.arguments,
                        )
                    )
                else:
                    future = asyncio.ensure_future(self._tools.run(tool, call.arguments))
                pending[future] = call
            await self._finish(pending, started, emit, guard)
        finally:
            why = guard.reason.message if guard.reason else "the run ended first"
            for future, call in pending.items():
                if not future.done():  # the run ends without this call's result
                    call.is_error = True
                    call.result = f"no result: {why}"
                    call.duration_ms = (time.monotonic() - started) * 1000
                future.cancel()
            self._waiting.clear()

    async def _finish(
        self, pending: dict[asyncio.Future[Any], Call], started: float, emit: Emit, guard: Guard
    ) -> None:
        since = asyncio.get_running_loop().time()
        tools = [tool for call in pending.values() if (tool := self._tool(call.name))]
        tool_limit = max((t.timeout for t in tools if t.kind != "client"), default=0) + TOOL_GRACE
        left = set(pending)
        while left:
            # Set again after every `tool_end`: a write that waited for the client ends
            # the guard's phase.
            waiting = {pending[f].name for f in left if pending[f].id in self._waiting}
            if waiting:
                limit = self._client_timeout
                expiry = (
                    f"the client did not answer {', '.join(sorted(waiting))} within {limit:g} s"
                )
            else:
                limit = tool_limit
                running = ", ".join(sorted({pending[f].name for f in left}))
                expiry = f"tool {running} did not finish within {limit:g} s"
            guard.tools(client=bool(waiting), since=since, limit=limit, expiry=ToolTimeout(expiry))
            done, left = await asyncio.wait(left, return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                call = pending[future]
                if call.id in self._waiting:
                    call.result, call.is_error = as_text(future.result()), False
                else:
                    call.result, call.is_error = future.result()
                call.duration_ms = (time.monotonic() - started) * 1000
                await emit(
                    events.ToolEnd(
                        message_id=self._message_id,
                        tool_call_id=call.id,
                        name=call.name,
                        result=call.result,
                        duration_ms=round(call.duration_ms, 1),
                        is_error=call.is_error,
                    )
                )
