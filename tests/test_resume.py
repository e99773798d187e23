"""lean.replay and lean.resume fed directly: a run's buffer replays the exact bytes the run
wrote, stays in its bound, and its subscriptions give every event after a cursor once, live
ones included."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from lean import events
from lean.clients import DEFAULT, Client
from lean.config import ClientConfig
from lean.messages import MessageRecord
from lean.replay import ENTRY_BYTES, Item, Replay
from lean.resume import Replays, Subscription, saved_events

pytestmark = pytest.mark.timeout(10)

M = "chat:c1:1"


def run_events(words: int = 20) -> list[events.Event]:
    """A run with every kind of event, and text that JSON must escape."""
    out: list[events.Event] = [events.Start("run_1", M, "chat", "default", "c1")]
    out.append(events.Delta(M, "thinking \u2028 first", "thinking"))
    for i in range(words):
        out.append(events.Delta(M, f'w{i} "q" \\ \u00e9\u2029\n '))
    out.append(events.ToolStart(M, "call_1", "clock", "{}"))
    out.append(events.ToolEnd(M, "call_1", "clock", "12:00", 3.5, False))
    out.append(events.Waiting(M, "call_2", "ask", '{"q": 1}'))
    out.append(events.Delta(M, "no.", "refusal"))
    out.append(events.Done(M, "stop", events.Usage(3, 4), "the whole text"))
    return out


class FakeRun:
    """What a buffer asks of its run (`lean.replay.Live`): its text as lean.run keeps it."""

    def __init__(self) -> None:
        self.text = ""
        self.reasoning = ""
        self.changes: list[int] = []
        self.replay: Replay | None = None
        self.cancelled = False
        self.tools: Any = None

    def texts(self) -> tuple[str, str]:
        return self.text, self.reasoning

    def text_slice(self, thinking: bool, begin: int, end: int) -> str:
        return (self.reasoning if thinking else self.text)[begin:end]

    def readers_changed(self) -> None:
        assert self.replay is not None
        self.changes.append(self.replay.readers)

    def cancel(self) -> None:
        self.cancelled = True

    def write(self, event: events.Event, seq: int) -> None:
        """As lean.run does: the text joins the answer, then the event is written."""
        if isinstance(event, events.Delta):
            if event.part == "thinking":
                self.reasoning += event.text
            else:
                self.text += event.text
        assert self.replay is not None
        self.replay.add(event, seq, events.encode(event))


def fed(evs: list[events.Event], bound: int = 1 << 20) -> Replay:
    run = FakeRun()
    replay = run.replay = Replay("run_1", M, bound, run)
    for seq, event in enumerate(evs, 1):
        run.write(event, seq)
    return replay


async def nothing_saved() -> list[Item]:
    raise AssertionError("the store is not asked")


async def collect(subscription: Subscription) -> list[Item]:
    return [item async for item in subscription]


def test_every_event_comes_back_as_the_bytes_the_run_wrote() -> None:
    evs = run_events()
    replay = fed(evs)
    for ended in (False, True):  # from the run's text, then from the stretch copied out
        assert replay.ended is ended
        for cursor in range(len(evs)):
            assert replay.after(cursor) == (
                cursor + 1,
                events.event_name(evs[cursor]),
                events.encode(evs[cursor]),
            )
        assert replay.after(len(evs)) is None
        assert replay.final and replay.last == len(evs)
        replay.end()


def test_a_delta_costs_an_entry_and_its_characters_count_in_the_bound() -> None:
    evs: list[events.Event] = [events.Start("run_1", M, "chat", "default", "c1")]
    evs += [events.Delta(M, "word ") for _ in range(200)]
    replay = fed(evs)
    assert replay.size - len(events.encode(evs[0])) == 200 * (len("word ") + ENTRY_BYTES)
    assert replay._ends.itemsize * len(replay._ends) == 200 * ENTRY_BYTES  # all it holds


def test_the_bound_drops_the_oldest_and_keeps_start_and_the_newest() -> None:
    evs: list[events.Event] = [events.Start("run_1", M, "chat", "default", "c1")]
    for i in range(1000):
        evs.append(events.Delta(M, f"word{i:04} ", "thinking" if i % 7 == 3 else "content"))
        if i % 100 == 50:
            evs.append(events.ToolStart(M, f"call_{i}", "clock", "{}"))
    bound = 1024
    run = FakeRun()
    replay = run.replay = Replay("run_1", M, bound, run)
    for seq, event in enumerate(evs, 1):
        run.write(event, seq)
        assert replay.size - len(events.encode(evs[0])) <= bound
    for ended in (False, True):
        assert replay.ended is ended
        assert replay.after(0) == (1, "start", events.encode(evs[0]))  # kept aside
        assert replay.after(1) is False  # long gone
        kept = [replay.after(c) for c in range(1, len(evs)) if replay.after(c) is not False]
        assert len(kept) > 40  # most of the bound holds deltas, not bookkeeping
        seqs = [item[0] for item in kept if isinstance(item, tuple)]
        assert seqs == list(range(seqs[0], len(evs) + 1))  # contiguous up to the newest
        for seq in seqs:
            event = evs[seq - 1]
            assert replay.after(seq - 1) == (seq, events.event_name(event), events.encode(event))
        replay.end()
    # One event larger than the bound is still kept while it is the newest.
    replay = fed(evs, bound)
    big = events.ToolEnd(M, "call_1", "clock", "x" * 4000, 1.0, False)
    replay.add(big, len(evs) + 1, events.encode(big))
    assert replay.after(len(evs)) == (len(evs) + 1, "tool_end", events.encode(big))


async def test_a_subscription_gets_the_buffered_events_then_the_live_ones_once() -> None:
    evs = run_events(50)
    run = FakeRun()
    replay = run.replay = Replay("run_1", M, 1 << 20, run)
    for seq, event in enumerate(evs[:10], 1):
        run.write(event, seq)
    subscription = Subscription(replay, 4, nothing_saved)
    assert run.changes == [1]  # a reader joined
    reader = asyncio.create_task(collect(subscription))
    for seq, event in enumerate(evs[10:], 11):
        await asyncio.sleep(0)
        run.write(event, seq)
    got = await asyncio.wait_for(reader, 2)
    expected = [(s, events.event_name(e), events.encode(e)) for s, e in enumerate(evs, 1)]
    assert got == expected[4:]  # nothing twice, nothing missing, then it ends
    assert run.changes == [1, 0]  # and left


async def test_a_cursor_out_of_the_buffer_restarts_the_answer_from_the_shown_text() -> None:
    run = FakeRun()
    replay = run.replay = Replay("run_1", M, 512, run)
    start = events.Start("run_1", M, "chat", "default", "c1")
    run.write(start, 1)
    for seq in range(2, 200):
        run.write(events.Delta(M, "abc "), seq)
    run.text += "held, not written yet"
    subscription = Subscription(replay, 3, nothing_saved)
    first = await anext(subscription)
    second = await anext(subscription)
    assert first == (1, "start", events.encode(start))  # the client starts over
    shown = "abc " * 198
    assert second == (199, "delta", events.encode(events.Delta(M, shown)))
    done = events.Done(M, "stop", events.Usage(), shown)
    run.write(done, 200)
    assert await anext(subscription) == (200, "done", events.encode(done))
    with pytest.raises(StopAsyncIteration):
        await anext(subscription)


async def test_a_finished_run_whose_cursor_left_the_buffer_is_served_from_the_store() -> None:
    replay = fed(run_events(300), bound=256)
    replay.end()
    record = MessageRecord(
        message_id=M,
        conversation_id="c1",
        role="assistant",
        content="saved text",
        status="complete",
        created_at="2026-12-03T00:00:00.000Z",
        turn=1,
        run_id="run_1",
    )

    async def saved() -> list[Item]:
        return saved_events(record)

    got = await collect(Subscription(replay, 2, saved))
    assert [(s, n) for s, n, _ in got] == [(1, "start"), (2, "delta"), (3, "done")]
    assert events.decode(got[1][2]) == events.Delta(M, "saved text")
    # At the last event already: nothing to send.
    assert Subscription(replay, replay.last, saved).empty


def test_saved_events_end_as_the_answer_was_saved() -> None:
    base: dict[str, Any] = {
        "message_id": M,
        "conversation_id": "c1",
        "role": "assistant",
        "created_at": "2026-12-03T00:00:00.000Z",
        "turn": 1,
        "run_id": "run_1",
        "scene": "chat",
        "model": "default",
    }
    done = saved_events(
        MessageRecord(**base, content="hi", status="complete", prompt_tokens=5, completion_tokens=2)
    )
    assert events.decode(done[0][2]) == events.Start("run_1", M, "chat", "default", "c1")
    assert events.decode(done[-1][2]) == events.Done(M, "stop", events.Usage(5, 2), "hi")
    cancelled = saved_events(
        MessageRecord(**base, content="", status="cancelled", error_code="cancelled")
    )
    assert [n for _, n, _ in cancelled] == ["start", "error"]  # no empty delta
    error = events.decode(cancelled[-1][2])
    assert isinstance(error, events.Error) and error.code == "cancelled"


async def nowhere(run_id: str, owner: str | None) -> MessageRecord | None:
    return None


def test_replays_keep_finished_runs_for_their_ttl_only() -> None:
    replays = Replays(buffer_bytes=4096, ttl=0.05, find=nowhere)
    run = FakeRun()
    replay = replays.open("run_1", M, run, DEFAULT)
    assert replay is not None and replays.get("run_1") is replay
    assert replays.open("run_1", M, FakeRun(), DEFAULT) is None  # a running run keeps its id
    assert replays.running("run_1", DEFAULT) is run
    replays.ended(replay)
    assert replays.running("run_1", DEFAULT) is None and replays.get("run_1") is replay
    assert replays.finished_bytes == replay.size
    time.sleep(0.06)
    assert replays.get("run_1") is None and replays.finished_bytes == 0
    assert Replays(buffer_bytes=0, ttl=1, find=nowhere).open("r", M, run, DEFAULT) is None  # off


def test_a_new_run_takes_the_id_of_a_finished_one() -> None:
    replays = Replays(buffer_bytes=4096, ttl=60, find=nowhere)
    old = replays.open("r1", M, FakeRun(), DEFAULT)
    assert old is not None
    replays.ended(old)
    new = replays.open("r1", M, FakeRun(), DEFAULT)
    assert new is not None and new is not old and replays.get("r1") is new
    assert replays.finished_bytes == 0


async def test_subscribing_to_an_unknown_run_or_past_the_newest_event_is_refused() -> None:
    from lean.errors import BadRequest, NotFound

    replays = Replays(buffer_bytes=4096, ttl=60, find=nowhere)
    with pytest.raises(NotFound):
        await replays.subscribe("nope", 0, DEFAULT)
    run = FakeRun()
    replay = replays.open("run_1", M, run, DEFAULT)
    assert replay is not None
    run.replay = replay
    run.write(events.Start("run_1", M, "chat", "default", "c1"), 1)
    with pytest.raises(BadRequest, match="after"):
        await replays.subscribe("run_1", 5, DEFAULT)
    (await replays.subscribe("run_1", 1, DEFAULT)).close()
    assert run.changes == [1, 0]


async def test_a_run_is_its_clients_in_the_buffers_and_in_the_store() -> None:
    """Another client finds neither the running run, nor its finished buffer, nor its
    saved answer (docs/protocol.md §8): `find` is asked for the caller's own only."""
    from lean.errors import NotFound

    app = Client(ClientConfig(name="app", token_env="APP_TOKENS"))
    asked: list[tuple[str, str | None]] = []

    async def find(run_id: str, owner: str | None) -> MessageRecord | None:
        asked.append((run_id, owner))
        return None

    replays = Replays(buffer_bytes=4096, ttl=60, find=find)
    run = FakeRun()
    replay = run.replay = replays.open("run_1", M, run, app)
    assert replay is not None and replay.owner == "app"
    run.write(events.Start("run_1", M, "chat", "default", "c1"), 1)
    assert replays.running("run_1", DEFAULT) is None and replays.running("run_1", app) is run
    with pytest.raises(NotFound):
        await replays.subscribe("run_1", 0, DEFAULT)
    assert run.changes == []  # the refused reader never counted
    mine = await replays.subscribe("run_1", 0, app)
    assert [name for _, name, _ in [await anext(mine)]] == ["start"]
    mine.close()
    replays.ended(replay)
    with pytest.raises(NotFound):
        await replays.subscribe("run_1", 0, DEFAULT)
    assert asked == [("run_1", None), ("run_1", None)]


def test_a_text_slice_near_the_end_is_the_same_as_the_whole_text_sliced() -> None:
    import random

    from lean.messages import TextBuffer

    rng = random.Random(12)
    buffer = TextBuffer()
    whole = ""
    for i in range(2000):
        piece = "é" * rng.randrange(0, 7) + f"{i} "
        buffer.add(piece)
        whole += piece
        if i % 97 == 0:
            buffer.text()  # as a save or a resume far back does
        for _ in range(3):
            end = rng.randrange(max(0, len(whole) - 400), len(whole) + 1)
            begin = rng.randrange(max(0, end - 50), end + 1)
            assert buffer.slice(begin, end) == whole[begin:end]
    assert buffer.slice(0, 10) == whole[:10]  # far back: joined once
    assert buffer.slice(len(whole) - 3, len(whole)) == whole[-3:]
