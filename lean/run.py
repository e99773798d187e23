"""A scene run: one task from `start` to `done` or `error`, whatever the transport.

A run owns its event order (`events.RunEvents`) and its I/O; the answer it assembles
and how it ends are its `core.RunCore`, which has none. It writes each event straight
to its transport's `Sink` (one encode, one write; the write blocks when the client
stops reading, which stops the upstream read: TCP backpressure end to end, one event
held per run).

The answer is saved as it grows: a `streaming` row when the run starts, its text rewritten
every `[store] flush_interval` (`lean.progress`), and the final save (`lean.run_save`) is
committed before the last event goes out, so `done` says whether it was (`saved`).

How a run ends, and the status saved with the assistant message (decided in `lean.core`,
as an `Ending`):
- `done`                                      -> complete
- the client cancels, or leaves with `on_disconnect = cancel` -> cancelled
- lean shuts down before the answer ended     -> incomplete (text kept)
- any other failure                           -> incomplete with text, else error
With `on_disconnect = finish`, a client that leaves (or is cut as too slow) only
detaches the sink: the run goes on to the end so the saved answer is whole.

A run runs in its own task so that leaving (the handler's cancellation) never
lands inside the upstream read; the handler waits for it through `shield`.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any, Literal, Protocol

import msgspec

from lean import events, run_save
from lean.client_io import ClientGone
from lean.clients import Ticket, estimate
from lean.config import ModelConfig, SceneConfig
from lean.core import RunCore
from lean.errors import BadRequest, Cancelled, Internal, LeanError, SlowClient
from lean.guard import Guard
from lean.providers.base import Piece, Usage
from lean.relay import Relay
from lean.replay import Replay
from lean.services import Services
from lean.tool_round import Call, ToolRound
from lean.tools import openai_tools

log = logging.getLogger("lean.run")


class Sink(Protocol):
    """Where a run's events go: one transport's framing and writes.

    `write` queues one event's frame without waiting and says whether the peer is
    behind; only then does the run await `drain` (under its guard's slow-client
    limit). An event the transport takes at once costs no await and no clock reading.
    Both raise `client_io.ClientGone` once the peer is gone. `pending` is what the peer has
    not taken yet (bytes): the guard samples it while the run waits for the peer."""

    def write(self, name: str, seq: int, payload: bytes) -> bool: ...

    async def drain(self) -> None: ...

    def pending(self) -> int: ...

    async def ping(self) -> None: ...

    def abort(self) -> None: ...


Part = Literal["content", "thinking", "refusal"]


def _usage(usage: Usage) -> events.Usage:
    """A scene's usage: the details only where the upstream gave them."""
    return events.Usage(
        usage.prompt_tokens,
        usage.completion_tokens,
        msgspec.UNSET if usage.cached_tokens is None else usage.cached_tokens,
        msgspec.UNSET if usage.reasoning_tokens is None else usage.reasoning_tokens,
    )


def new_run_id() -> str:
    return "run_" + uuid.uuid4().hex[:20]


class Run:
    def __init__(
        self,
        services: Services,
        *,
        run_id: str,
        scene: SceneConfig,
        model: ModelConfig,
        conversation_id: str,
        turn: int,
        body: dict[str, Any],
        sink: Sink | None,
        ticket: Ticket,
    ) -> None:
        self.services = services
        self.ticket = ticket  # its hold on its client's limits (lean.clients), ended with it
        self.client = ticket.client  # the only client that may cancel, answer or resume it
        self.run_id = run_id
        self.scene = scene
        self.model = model
        self.conversation_id = conversation_id
        self.turn = turn
        self.message_id = f"{scene.name}:{conversation_id}:{turn}"
        self.body = body
        self._prompt = body["messages"][-1].get("content")  # logged only with log_prompts
        self.sink = sink
        self.core = RunCore()  # the answer and how the run ended
        self.order = events.RunEvents()
        # Once a write says the client is behind, the text of the pieces that follow is
        # held and goes out as one delta after the drain: a client that is behind gets
        # fewer, larger frames. Bounded by what arrives before the drain (a read or two,
        # `arrivals.Arrivals`); `_held_part` is the part the held text belongs to.
        self._behind = False
        self._held: list[str] = []
        self._held_part: Part = "content"
        self.tools = ToolRound(
            message_id=self.message_id,
            scene=scene,
            tools=services.tools,
            client_timeout=services.config.limits.client_tool_timeout,
        )
        if scene.tools:
            body["tools"] = openai_tools([services.config.tools[name] for name in scene.tools])
        self.task: asyncio.Task[None] | None = None
        self.guard: Guard | None = None
        self.replay: Replay | None = None  # its recent events, for a resume (lean.resume)
        self._grace: asyncio.TimerHandle | None = None  # on_disconnect waits for a reader

    def start(self, *, register: bool = True) -> None:
        """Admit and start the run (synchronously: no other run can slip in between).

        `register` puts it in the app's registry, for `/v1/runs/{runId}/...` requests;
        a WebSocket's runs are named by its client and belong to that socket only.
        """
        self.services.streams.check()
        if register and self.run_id in self.services.runs:
            raise BadRequest(f"run id '{self.run_id}' is already running")
        self.task = asyncio.create_task(self._execute(), name=self.run_id)
        self.guard = self._new_guard()
        self.services.streams.add(self.guard)
        if register:
            self.services.runs.add(self)
        self.replay = self.services.replays.open(self.run_id, self.message_id, self, self.client)

    def _new_guard(self, *, heartbeats: bool = True) -> Guard:
        config = self.services.config
        return Guard(
            ping_interval=config.server.ping_interval,
            slow_client_timeout=config.limits.slow_client_timeout,
            ping=self._ping if heartbeats else None,
            on_slow_client=self._abort_sink,
            pending=self._pending,
            task=self.task,
            metrics=self.services.metrics,
        )

    def cancel(self, reason: LeanError | None = None) -> None:
        if self.guard is not None:
            self.guard.interrupt(reason or Cancelled("the run was cancelled"))

    def client_left(self) -> None:
        """The transport's peer is gone (`readers_changed`)."""
        self.sink = None
        self.readers_changed()

    def readers_changed(self) -> None:
        """A reader came or went (the sink, a resume). With none left, `on_disconnect`
        applies: at once, or after `resume_grace` for a resumable run (docs/protocol.md §2)."""
        if self.sink is not None or (self.replay is not None and self.replay.readers):
            if self._grace is not None:
                self._grace.cancel()
                self._grace = None
            return
        if self.scene.on_disconnect == "finish" or self._grace is not None:
            return
        grace = self.scene.resume_grace if self.replay is not None else 0.0
        if grace:
            self._grace = asyncio.get_running_loop().call_later(grace, self._abandoned)
        else:
            self.cancel(Cancelled("the client left"))

    def _abandoned(self) -> None:
        self._grace = None
        self.cancel(Cancelled("the client left"))

    def texts(self) -> tuple[str, str]:
        """The answer's text and reasoning so far: what a resume replays (lean.resume)."""
        return self.core.text.text(), self.core.reasoning.text()

    def text_slice(self, thinking: bool, begin: int, end: int) -> str:
        return (self.core.reasoning if thinking else self.core.text).slice(begin, end)

    async def _ping(self) -> None:
        if self.sink is not None:
            await self.sink.ping()

    def _abort_sink(self) -> None:
        if self.sink is not None:
            self.sink.abort()

    def _pending(self) -> int:
        return self.sink.pending() if self.sink is not None else 0

    async def _execute(self) -> None:
        try:
            await self._steps()
        finally:
            if self._grace is not None:
                self._grace.cancel()
                self._grace = None
            if self.replay is not None:
                self.services.replays.ended(self.replay)

    async def _steps(self) -> None:
        assert self.guard is not None
        guard = self.guard
        core = self.core
        final: events.Event | None = None
        try:
            owner = self.client.owner  # its `streaming` row, owned as the final one
            await self.services.store.save_assistant(
                run_save.record(self), wait=False, client=owner
            )
            self.services.progress.add(self.message_id, core.text, core.reasoning)
            await self._emit(self._start_event())
            fallback = False
            for round_number in range(self.scene.max_tool_rounds + 1):
                if self.scene.tools and round_number == self.scene.max_tool_rounds:
                    self.body["tool_choice"] = "none"  # the last round must answer in words
                relay = Relay(self.services, self.model, self.body, guard)
                core.next_call()
                await relay.run(self)
                fallback = fallback or relay.fallback
                if not core.round or round_number == self.scene.max_tool_rounds:
                    break  # a model that ignores tool_choice "none" gets no extra round
                await self._tool_round(core.round_calls(), guard)
            core.complete()
            usage = core.usage
            final = events.Done(
                message_id=self.message_id,
                finish_reason=core.finish,
                usage=_usage(usage),
                text=core.text.text(),  # one copy of the answer, shared with the save
                fallback=fallback,
            )
        except asyncio.CancelledError:
            reason = guard.take()
            if reason is None:
                core.cancelled()
                raise
            final = self._fail(reason)
        except ClientGone as gone:
            final = self._fail(gone.reason)
        except LeanError as exc:
            final = self._fail(exc)
        except Exception:
            log.exception("run %s failed", self.run_id)
            final = self._fail(Internal("internal error; see lean's log"))
        finally:
            await guard.close()
            self.services.streams.discard(guard)
            self.services.runs.discard(self)
            self.ticket.end(core.usage, lambda: estimate(self.body, core.text.text()))
            self.services.progress.discard(self.message_id)
            # Committed before the last event goes out: `done` tells whether the answer is
            # saved, a client that starts its next turn on `done` finds it in the history,
            # and a kill -9 after `done` loses nothing.
            saved = await run_save.save(self, self._prompt)
        if isinstance(final, events.Done) and not saved:
            final = msgspec.structs.replace(final, saved=False)
        if final is not None:
            await self._emit_final(final)

    def _start_event(self) -> events.Start:
        return events.Start(
            run_id=self.run_id,
            message_id=self.message_id,
            scene=self.scene.name,
            model=self.model.alias,
            conversation_id=self.conversation_id,
        )

    async def _emit_final(self, event: events.Event) -> None:
        """The last event, after the run's guard is gone. A `done` carries the whole
        answer: when the client is behind, a guard of its own waits for it under the same
        rule (cut when it takes nothing for `slow_client_timeout`), however long it takes
        a slow but steady client to read."""
        try:
            behind = False
            if self.order.seq == 0:  # interrupted before its first step
                behind = self._write(self._start_event())
            if self._held:
                behind = self._write_held() or behind
            if self._write(event) or behind:
                self.guard = self._new_guard(heartbeats=False)
                try:
                    await self._drain()
                finally:
                    await self.guard.close()
        except ClientGone:
            pass

    def push(self, batch: list[Piece]) -> bool:
        """One upstream read's pieces, written now (`arrivals.Receiver`); True when the
        client is behind: `drain()`. Behind, the text that follows is held (`_held`)."""
        behind = self._behind = self.core.push(batch, self, self._behind)
        if not behind:
            assert self.guard is not None
            self.guard.wrote()
        return behind

    def text(self, text: str, behind: bool) -> bool:
        """A text delta (`core.Out`); True when the client is behind."""
        if behind:
            self._hold(text, "content")
            return True
        return self._write(events.Delta(message_id=self.message_id, text=text))

    def reasoning(self, text: str, behind: bool) -> bool:
        """A reasoning delta (`core.Out`); True when the client is behind."""
        if behind:
            self._hold(text, "thinking")
            return True
        return self._write(events.Delta(message_id=self.message_id, text=text, part="thinking"))

    def refusal(self, text: str, behind: bool) -> bool:
        """A refusal delta (`core.Out`); True when the client is behind."""
        if behind:
            self._hold(text, "refusal")
            return True
        return self._write(events.Delta(message_id=self.message_id, text=text, part="refusal"))

    async def drain(self) -> None:
        await self._drain()
        while self._held and self._write_held():
            await self._drain()
        self._behind = False
        assert self.guard is not None
        self.guard.wrote()

    def _hold(self, text: str, part: Part) -> None:
        if part != self._held_part and self._held:
            self._write_held()  # the other part's text first: each part keeps its order
        self._held_part = part
        self._held.append(text)

    def _write_held(self) -> bool:
        """The held text as one delta; True when the client is behind."""
        text = "".join(self._held)
        self._held.clear()
        return self._write(
            events.Delta(message_id=self.message_id, text=text, part=self._held_part)
        )

    async def _tool_round(self, calls: list[Call], guard: Guard) -> None:
        """Run the calls the model asked for and give the model their results."""
        await self.tools.run(calls, self._emit, guard)
        self.body["messages"] = [*self.body["messages"], *self.core.tool_turn(calls)]

    async def _emit(self, event: events.Event) -> None:
        if self._held:  # text held for a client that was behind goes out first
            self._write_held()
        if self._write(event):
            await self._drain()
        assert self.guard is not None
        self.guard.wrote()

    def _write(self, event: events.Event) -> bool:
        """Write `event` without waiting; True when the client is behind (`_drain`)."""
        seq = self.order.check(event)
        sink = self.sink
        replay = self.replay
        if sink is None and replay is None:
            return False
        payload = events.encode(event)
        if replay is not None:
            replay.add(event, seq, payload)
        if sink is None:
            return False
        try:
            return sink.write(events.event_name(event), seq, payload)
        except ClientGone as gone:
            self._lost_client(gone.reason)
            return False

    async def _drain(self) -> None:
        """Wait for a client that is behind, under the slow-client limit."""
        sink = self.sink
        if sink is None:  # the client left after the write that said it was behind
            return
        assert self.guard is not None
        guard = self.guard
        guard.writing()
        try:
            await sink.drain()
        except ClientGone as gone:
            self._lost_client(gone.reason)
        except asyncio.CancelledError:
            if not isinstance(guard.reason, SlowClient):
                raise
            self._lost_client(guard.take() or SlowClient("the client stopped reading"))

    def _lost_client(self, reason: LeanError) -> None:
        self.sink = None
        if self.scene.on_disconnect == "finish":
            return
        replay = self.replay
        if replay is not None and (replay.readers or self.scene.resume_grace):
            self.readers_changed()  # others read on, or the client may come back
            return
        raise ClientGone(reason)

    def _fail(self, error: LeanError) -> events.Error | None:
        """Record how the run failed; the `error` event to send, if any."""
        self.core.failed(error)
        if isinstance(error, SlowClient):
            self.sink = None
        return events.Error(
            message_id=self.message_id,
            code=error.code,
            message=error.message,
            retryable=error.retryable,
        )
