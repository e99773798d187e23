"""lean.resume fed directly: a run's buffer replays the exact bytes it was given, stays in its
bound, and its subscriptions give every event after a cursor once, live ones included."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from lean import events
from lean.messages import MessageRecord
from lean.resume import ENTRY_BYTES, Item, Replay, Replays, Subscription, saved_events

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
    """What a buffer asks of its run (`lean.resume.Live`)."""

    def __init__(self) -> None:
        self.text = ""
        self.changes: list[int] = []
        self.replay: Replay | None = None
        self.cancelled = False

    def shown_text(self) -> str:
        return self.text

    def readers_changed(self) -> None:
        assert self.replay is not None
        self.changes.append(self.replay.readers)

    def cancel(self) -> None:
        self.cancelled = True


def fed(evs: list[events.Event], bound: int = 1 << 20, run: Any = None) -> Replay:
    replay = Replay("run_1", M, bound, run)
    for seq, event in enumerate(evs, 1):
        replay.add(event, seq, events.encode(event))
    return replay


async def nothing_saved() -> list[Item]:
    raise AssertionError("the store is not asked")


async def collect(subscription: Subscription) -> list[Item]:
    return [item async for item in subscription]


def test_every_event_comes_back_as_the_bytes_the_run_wrote() -> None:
    evs = run_events()
    replay = fed(evs)
    for cursor in range(len(evs)):
        assert replay.after(cursor) == (
            cursor + 1,
            events.event_name(evs[cursor]),
            events.encode(evs[cursor]),
        )
    assert replay.after(len(evs)) is None
    assert replay.final and replay.last == len(evs)


def test_a_delta_costs_its_text_not_its_payload() -> None:
    evs = [events.Start("run_1", M, "chat", "default", "c1")]
    evs += [events.Delta(M, "word ") for _ in range(200)]
    replay = fed(evs)
    payloads = sum(len(events.encode(e)) for e in evs[1:])
    assert replay.size - len(events.encode(evs[0])) == 200 * (len("word ") + ENTRY_BYTES)
    assert replay.size < payloads / 4


def test_the_bound_drops_the_oldest_and_keeps_start_and_the_newest() -> None:
    evs = [events.Start("run_1", M, "chat", "default", "c1")]
    evs += [events.Delta(M, f"word{i:04} ") for i in range(1000)]
    bound = 1024
    replay = Replay("run_1", M, bound, None)
    for seq, event in enumerate(evs, 1):
        replay.add(event, seq, events.encode(event))
        assert replay.size - len(events.encode(evs[0])) <= bound
    assert replay.after(0) == (1, "start", events.encode(evs[0]))  # start is kept aside
    assert replay.after(1) is False  # long gone
    kept = [replay.after(c) for c in range(1, len(evs)) if replay.after(c) is not False]
    assert len(kept) > 40  # most of the bound holds deltas, not bookkeeping
    seqs = [item[0] for item in kept if isinstance(item, tuple)]
    assert seqs == list(range(seqs[0], len(evs) + 1))  # contiguous up to the newest
    for seq in seqs:
        assert replay.after(seq - 1) == (seq, "delta", events.encode(evs[seq - 1]))
    # One event larger than the bound is still kept while it is the newest.
    big = events.ToolEnd(M, "call_1", "clock", "x" * 4000, 1.0, False)
    replay.add(big, len(evs) + 1, events.encode(big))
    assert replay.after(len(evs)) == (len(evs) + 1, "tool_end", events.encode(big))


async def test_a_subscription_gets_the_buffered_events_then_the_live_ones_once() -> None:
    evs = run_events(50)
    run = FakeRun()
    replay = run.replay = Replay("run_1", M, 1 << 20, run)
    for seq, event in enumerate(evs[:10], 1):
        replay.add(event, seq, events.encode(event))
    subscription = Subscription(replay, 4, nothing_saved)
    assert run.changes == [1]  # a reader joined
    reader = asyncio.create_task(collect(subscription))
    for seq, event in enumerate(evs[10:], 11):
        await asyncio.sleep(0)
        replay.add(event, seq, events.encode(event))
    got = await asyncio.wait_for(reader, 2)
    expected = [(s, events.event_name(e), events.encode(e)) for s, e in enumerate(evs, 1)]
    assert got == expected[4:]  # nothing twice, nothing missing, then it ends
    assert run.changes == [1, 0]  # and left


async def test_a_cursor_out_of_the_buffer_restarts_the_answer_from_the_shown_text() -> None:
    run = FakeRun()
    replay = run.replay = Replay("run_1", M, 512, run)
    start = events.Start("run_1", M, "chat", "default", "c1")
    replay.add(start, 1, events.encode(start))
    for seq in range(2, 200):
        replay.add(events.Delta(M, "abc "), seq, events.encode(events.Delta(M, "abc ")))
    run.text = "abc " * 198
    subscription = Subscription(replay, 3, nothing_saved)
    first = await anext(subscription)
    second = await anext(subscription)
    assert first == (1, "start", events.encode(start))  # the client starts over
    assert second == (199, "delta", events.encode(events.Delta(M, run.text)))
    done = events.Done(M, "stop", events.Usage(), run.text)
    replay.add(done, 200, events.encode(done))
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


async def nowhere(run_id: str) -> MessageRecord | None:
    return None


def test_replays_keep_finished_runs_for_their_ttl_only() -> None:
    replays = Replays(buffer_bytes=4096, ttl=0.05, find=nowhere)
    run = FakeRun()
    replay = replays.open("run_1", M, run)
    assert replay is not None and replays.get("run_1") is replay
    assert replays.open("run_1", M, FakeRun()) is None  # a running run keeps its id
    assert replays.running("run_1") is run
    replays.ended(replay)
    assert replays.running("run_1") is None and replays.get("run_1") is replay
    assert replays.finished_bytes == replay.size
    time.sleep(0.06)
    assert replays.get("run_1") is None and replays.finished_bytes == 0
    assert Replays(buffer_bytes=0, ttl=1, find=nowhere).open("r", M, run) is None  # off


def test_a_new_run_takes_the_id_of_a_finished_one() -> None:
    replays = Replays(buffer_bytes=4096, ttl=60, find=nowhere)
    old = replays.open("r1", M, FakeRun())
    assert old is not None
    replays.ended(old)
    new = replays.open("r1", M, FakeRun())
    assert new is not None and new is not old and replays.get("r1") is new
    assert replays.finished_bytes == 0


async def test_subscribing_to_an_unknown_run_or_past_the_newest_event_is_refused() -> None:
    from lean.errors import BadRequest, NotFound

    replays = Replays(buffer_bytes=4096, ttl=60, find=nowhere)
    with pytest.raises(NotFound):
        await replays.subscribe("nope", 0)
    run = FakeRun()
    replay = replays.open("run_1", M, run)
    assert replay is not None
    run.replay = replay
    start = events.Start("run_1", M, "chat", "default", "c1")
    replay.add(start, 1, events.encode(start))
    with pytest.raises(BadRequest, match="after"):
        await replays.subscribe("run_1", 5)
    (await replays.subscribe("run_1", 1)).close()
    assert run.changes == [1, 0]
