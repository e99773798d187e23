"""lean.store: turn numbering, round trips, history, flush/close guarantees, a free loop;
each test on SQLite and on PostgreSQL (`target`, tests/store_targets.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from lean import saved_responses
from lean.messages import SCHEMA_VERSION, MessageRecord, TextBuffer
from lean.store import Store, StoreClosed, StoreError, StoreWriteError
from tests.store_targets import Target

AT = "2026-11-21T16:40:00.123Z"


@pytest.fixture
async def store(target: Target) -> AsyncIterator[Store]:
    s = Store(target.where)
    await s.open()
    yield s
    await s.close()


def answer(cid: str, turn: int, content: str = "", **kw: Any) -> MessageRecord:
    kw.setdefault("status", "complete")
    kw.setdefault("created_at", AT)
    return MessageRecord(
        message_id=f"chat:{cid}:{turn}",
        conversation_id=cid,
        role="assistant",
        content=content or f"answer {turn}",
        turn=turn,
        scene="chat",
        **kw,
    )


async def ask(store: Store, cid: str, text: str = "q") -> int:
    return await store.begin_turn(conversation_id=cid, scene="chat", user_content=text)


def indexes(target: Target) -> set[str]:
    if target.kind == "sqlite":
        return {row[1] for row in target.sql("PRAGMA index_list(messages)")}
    rows = target.sql("SELECT indexname FROM pg_indexes WHERE tablename = 'messages'")
    return {row[0] for row in rows}


def wal_left(target: Target) -> bool:
    return Path(target.where + "-wal").exists()


# -- turns ------------------------------------------------------------------------------------


async def test_turns_count_from_one_per_conversation(store: Store) -> None:
    assert [await ask(store, "a") for _ in range(3)] == [1, 2, 3]
    assert await ask(store, "b") == 1
    assert await ask(store, "a") == 4


async def test_concurrent_begin_turn_gets_distinct_turns(store: Store) -> None:
    turns = await asyncio.gather(*(ask(store, "c", f"q{i}") for i in range(20)))
    assert sorted(turns) == list(range(1, 21))
    users = await store.messages("c")
    assert [m.message_id for m in users] == [f"chat:c:{t}:user" for t in range(1, 21)]


async def test_turn_counts_allocations_not_answers(store: Store) -> None:
    # Turn 1 never got an answer saved (crash, client gone): the next turn is still 2.
    assert await ask(store, "a") == 1
    assert await ask(store, "a") == 2


async def test_begin_turn_writes_the_user_message_and_conversation(store: Store) -> None:
    assert not await store.conversation_exists("a")
    await store.begin_turn(conversation_id="a", scene="s", user_content="hello", created_at=AT)
    assert await store.conversation_exists("a")
    assert await store.messages("a") == [
        MessageRecord(
            message_id="s:a:1:user",
            conversation_id="a",
            role="user",
            content="hello",
            status="complete",
            created_at=AT,
            turn=1,
            scene="s",
            prompt="hello",  # no template: the model saw what was typed
        )
    ]


async def test_begin_turn_default_timestamp_is_utc_millis(store: Store) -> None:
    await ask(store, "a")
    [user] = await store.messages("a")
    assert len(user.created_at) == len(AT) and user.created_at.endswith("Z")
    assert user.created_at[19] == "." and user.created_at[10] == "T"


# -- saves and reads --------------------------------------------------------------------------


async def test_round_trip_every_field(store: Store) -> None:
    turn = await ask(store, "a", "what time is it?")
    tool = {
        "id": "t1",
        "name": "clock",
        "arguments": "{}",
        "result": {"now": "16:40", "nested": [1, 2.5, None, True]},
        "isError": False,
        "durationMs": 3.25,
    }
    record = MessageRecord(
        message_id=f"chat:a:{turn}",
        conversation_id="a",
        role="assistant",
        content="It is 16:40. ✓ \u2028 \U0001f600",
        status="complete",
        created_at=AT,
        turn=turn,
        scene="chat",
        model="default",
        reasoning="look at the clock",
        tool_calls=[tool],
        finish_reason="stop",
        error_code=None,
        prompt_tokens=12,
        completion_tokens=7,
        first_token_ms=81.5,
        duration_ms=420.0,
    )
    await store.save_assistant(record)
    await store.flush()
    user, saved = await store.messages("a")
    assert saved == record
    assert user.role == "user" and user.content == "what time is it?"
    # The wire shape of §1 is the camelCase encoding of the record.
    wire = msgspec.json.decode(msgspec.json.encode(saved))
    assert {"messageId", "createdAt", "toolCalls", "firstTokenMs", "promptTokens"} <= set(wire)


async def test_every_assistant_status_round_trips(store: Store) -> None:
    statuses = ["complete", "error", "cancelled", "incomplete"]
    for turn, status in enumerate(statuses, 1):
        extra = {"error_code": "upstream_error"} if status != "complete" else {}
        await store.save_assistant(answer("a", turn, status=status, **extra))
    await store.flush()
    saved = await store.messages("a")
    assert [m.status for m in saved] == statuses
    assert [m.error_code for m in saved] == [None, *["upstream_error"] * 3]


async def test_save_is_idempotent(store: Store) -> None:
    await store.save_assistant(answer("a", 1, "partial", status="incomplete"))
    await store.save_assistant(answer("a", 1, "partial", status="incomplete"))
    await store.save_assistant(answer("a", 1, "final"))
    await store.flush()
    [saved] = await store.messages("a")
    assert (saved.content, saved.status) == ("final", "complete")


async def test_messages_oldest_first_user_before_assistant(store: Store) -> None:
    for _ in range(3):
        await ask(store, "a")
    for turn in (3, 1, 2):  # answers may finish out of order
        await store.save_assistant(answer("a", turn))
    await store.flush()
    got = [(m.turn, m.role) for m in await store.messages("a")]
    assert got == [(t, r) for t in (1, 2, 3) for r in ("user", "assistant")]


async def test_messages_limit_keeps_the_latest(store: Store) -> None:
    for turn in range(1, 6):
        await ask(store, "a")
        await store.save_assistant(answer("a", turn))
    await store.flush()
    got = [(m.turn, m.role) for m in await store.messages("a", limit=3)]
    assert got == [(4, "assistant"), (5, "user"), (5, "assistant")]
    assert await store.messages("a", limit=0) == []
    assert await store.messages("nobody") == []


async def test_save_without_begin_turn_creates_the_conversation(store: Store) -> None:
    await store.save_assistant(answer("a", 3))
    await store.flush()
    assert await store.conversation_exists("a")
    assert await ask(store, "a") == 4  # never reuses a turn that has an answer


# -- history ----------------------------------------------------------------------------------


async def test_history_last_turns_skipping_empty_failures(store: Store) -> None:
    rows: list[tuple[str, dict[str, Any]]] = [
        ("first", {}),
        ("", {"status": "error", "error_code": "upstream_timeout"}),  # nothing usable
        ("partial answ", {"status": "incomplete", "error_code": "upstream_error"}),
        ("", {"status": "cancelled", "error_code": "cancelled"}),  # nothing usable
        ("fourth", {}),
    ]
    for i, (content, kw) in enumerate(rows, 1):
        turn = await ask(store, "a", f"q{i}")
        record = msgspec.structs.replace(answer("a", turn, **kw), content=content)
        await store.save_assistant(record)
    await ask(store, "a", "q6")  # in flight: no answer yet, not part of history
    await store.flush()

    assert await store.history("a", 2) == [
        ("user", "q3"),
        ("assistant", "partial answ"),
        ("user", "q5"),
        ("assistant", "fourth"),
    ]
    assert await store.history("a", 10) == [
        ("user", "q1"),
        ("assistant", "first"),
        ("user", "q3"),
        ("assistant", "partial answ"),
        ("user", "q5"),
        ("assistant", "fourth"),
    ]
    assert await store.history("a", 0) == []
    assert await store.history("a", -1) == []
    assert await store.history("other", 5) == []


async def test_history_keeps_text_of_a_cancelled_answer(store: Store) -> None:
    await ask(store, "a", "q")
    await store.save_assistant(answer("a", 1, "half", status="cancelled", error_code="cancelled"))
    await store.flush()
    assert await store.history("a", 1) == [("user", "q"), ("assistant", "half")]


# -- flush, close, failures -------------------------------------------------------------------


async def test_a_read_sees_the_writes_queued_before_it(store: Store) -> None:
    await store.begin_first_turn(conversation_id="a", scene="chat", user_content="q")
    await store.save_assistant(answer("a", 1))  # no flush: the reads wait for both
    assert await store.conversation_exists("a")
    assert [m.role for m in await store.messages("a")] == ["user", "assistant"]
    assert await store.history("a", 1) == [("user", "q"), ("assistant", "answer 1")]


async def test_a_save_nobody_waits_for_is_committed_by_itself(target: Target) -> None:
    s = Store(target.where)
    await s.open()
    await s.save_assistant(answer("a", 1))
    for _ in range(500):  # LINGER is 20 ms; polled from another connection for up to 5 s
        if target.count_rows():
            break
        await asyncio.sleep(0.01)
    assert target.count_rows() == 1
    await s.close()


async def test_a_waited_for_op_ends_the_linger_at_once(
    target: Target, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("lean.store.LINGER", 60.0)  # a save alone would wait a minute
    s = Store(target.where)
    await s.open()
    await s.save_assistant(answer("a", 1))
    await asyncio.sleep(0.05)  # the writer has the save and lingers
    async with asyncio.timeout(5):
        assert await ask(s, "a") == 2  # turn 1 is the save's, committed in the same batch
    assert target.count_rows() == 2
    await s.close()


async def test_close_commits_every_queued_write(target: Target) -> None:
    s = Store(target.where)
    await s.open()
    for turn in range(1, 1001):
        await s.save_assistant(answer("a", turn))
    await s.close()  # no flush before
    assert target.kind != "sqlite" or not wal_left(target)  # checkpointed on close
    assert target.count_rows() == 1000
    s = Store(target.where)
    await s.open()
    assert len(await s.messages("a", limit=5000)) == 1000
    await s.close()


async def test_close_commits_writes_waiting_for_queue_space(target: Target) -> None:
    s = Store(target.where, queue_max=8, batch_max=4)
    await s.open()
    saves = [asyncio.create_task(s.save_assistant(answer("a", t))) for t in range(1, 301)]
    await asyncio.sleep(0)  # every save has started; most wait for space
    await s.close()
    await asyncio.gather(*saves)
    assert target.count_rows() == 300


async def test_backpressure_keeps_order_and_loses_nothing(target: Target) -> None:
    s = Store(target.where, queue_max=4, batch_max=2)
    await s.open()
    # The same message saved 200 times with growing content: the last one must win.
    await asyncio.gather(*(s.save_assistant(answer("a", 1, f"v{i}")) for i in range(200)))
    await asyncio.gather(*(s.save_assistant(answer("a", t)) for t in range(2, 202)))
    await s.flush()
    saved = await s.messages("a", limit=1000)
    assert len(saved) == 201 and saved[0].content == "v199"
    await s.close()


async def test_after_close_writes_and_reads_raise(target: Target) -> None:
    s = Store(target.where)
    await s.open()
    await s.close()
    await s.close()  # idempotent
    await s.flush()  # nothing pending: returns
    with pytest.raises(StoreClosed):
        await s.save_assistant(answer("a", 1))
    with pytest.raises(StoreClosed):
        await ask(s, "a")
    with pytest.raises(StoreClosed):
        await s.messages("a")
    with pytest.raises(StoreClosed):
        await s.open()


async def test_concurrent_close_calls_all_wait(target: Target) -> None:
    s = Store(target.where)
    await s.open()
    for turn in range(1, 101):
        await s.save_assistant(answer("a", turn))
    await asyncio.gather(s.close(), s.close(), s.flush())
    assert target.count_rows() == 100


async def test_use_before_open_is_misuse(target: Target) -> None:
    s = Store(target.where)
    with pytest.raises(RuntimeError, match="open"):
        await s.save_assistant(answer("a", 1))
    await s.close()


async def test_failing_save_surfaces_on_flush_and_writer_keeps_going(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    await store.save_assistant(answer("a", 1), wait=False)
    await store.save_assistant(answer("a", 2, status="bogus"), wait=False)  # violates a CHECK
    await store.save_assistant(answer("a", 3), wait=False)
    with caplog.at_level(logging.ERROR, logger="lean.store"), pytest.raises(StoreWriteError):
        await store.flush()
    assert "chat:a:2" in caplog.text
    await store.flush()  # the failure was reported once
    await store.save_assistant(answer("a", 4))
    await store.flush()
    assert [m.turn for m in await store.messages("a")] == [1, 3, 4]


async def test_several_failures_reported_together(store: Store) -> None:
    for turn in (1, 2, 3):
        await store.save_assistant(answer("a", turn, status="bogus"), wait=False)
    with pytest.raises(StoreWriteError) as info:
        await store.flush()
    assert "2 more saves failed" in str(info.value.__notes__)


async def test_failing_begin_turn_raises_and_does_not_use_the_turn(store: Store) -> None:
    with pytest.raises(StoreWriteError):
        await store.begin_turn(conversation_id="a", scene="chat", user_content=None)  # type: ignore[arg-type]
    assert await ask(store, "a") == 1
    await store.flush()


async def test_unencodable_tool_call_fails_the_caller(store: Store) -> None:
    with pytest.raises(TypeError):
        await store.save_assistant(answer("a", 1, tool_calls=[{"result": object()}]))
    await store.flush()


async def test_cancelled_begin_turn_does_not_break_the_writer(store: Store) -> None:
    task = asyncio.create_task(ask(store, "a"))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await ask(store, "a") in (1, 2)
    await store.flush()


# -- the loop stays free ----------------------------------------------------------------------


async def test_loop_keeps_ticking_while_rows_are_written(store: Store) -> None:
    # What the loop's own thread spends between two of its ticks: writes done on the loop
    # would spend the whole writing stretch there. Its CPU time, not the wall clock's: a busy
    # machine (the suite's other worker, a bench) may keep the thread waiting, not working.
    spent: list[float] = []
    stop = asyncio.Event()

    async def tick() -> None:
        last = time.thread_time()
        while not stop.is_set():
            await asyncio.sleep(0.001)
            now = time.thread_time()
            spent.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.01)
    big = "x" * 2000
    for turn in range(1, 5001):
        await store.save_assistant(answer("a", turn, big))
        if turn % 500 == 0:
            await asyncio.sleep(0)  # as a server does between requests
    reading = asyncio.create_task(store.messages("a", limit=5000))
    await store.flush()
    assert all(m.conversation_id == "a" for m in await reading)  # read beside the writes
    stop.set()
    await ticker
    assert len(spent) > 3
    assert max(spent) < 0.1, max(spent)


# -- the file ---------------------------------------------------------------------------------


async def test_reopen_keeps_data_and_schema(target: Target) -> None:
    for _ in range(2):
        s = Store(target.where)
        await s.open()
        await ask(s, "a")
        await s.close()
    s = Store(target.where)
    await s.open()
    assert [m.turn for m in await s.messages("a")] == [1, 2]
    await s.close()
    assert target.version() == SCHEMA_VERSION
    if target.kind == "sqlite":
        assert target.sql("PRAGMA journal_mode")[0][0] == "wal"


async def test_newer_schema_is_refused(target: Target) -> None:
    target.seed("", SCHEMA_VERSION + 1)
    s = Store(target.where)
    with pytest.raises(StoreError, match="schema version"):
        await s.open()
    with pytest.raises(StoreClosed):
        await ask(s, "a")
    assert target.version() == SCHEMA_VERSION + 1  # left as it was


async def test_failed_transaction_fails_its_batch_and_the_writer_recovers(
    target: Target, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    target.quick_lock_timeout(monkeypatch)
    s = Store(target.where)
    await s.open()
    assert await ask(s, "a") == 1
    with target.locked():  # another process holds the write lock
        with caplog.at_level(logging.ERROR, logger="lean.store"):
            await s.save_assistant(answer("a", 1), wait=False)
            with pytest.raises(StoreWriteError, match="lock"):
                await ask(s, "a")
            with pytest.raises(StoreWriteError, match="lock"):
                await s.flush()
        assert "batch" in caplog.text
        assert [m.role for m in await s.messages("a")] == ["user"]  # reads still work
    await s.save_assistant(answer("a", 1))
    assert await ask(s, "a") == 2
    await s.flush()
    assert [(m.turn, m.role) for m in await s.messages("a")] == [
        (1, "user"),
        (1, "assistant"),
        (2, "user"),
    ]
    await s.close()


@pytest.mark.parametrize("count", [0, 1, 15, 16, 17, 1000])
def test_text_buffer_keeps_every_fragment_in_order(count: int) -> None:
    fragments = [f"t{i} " for i in range(count)]
    buffer = TextBuffer()
    for fragment in fragments:
        buffer.add(fragment)
    assert buffer.size == len("".join(fragments))
    assert buffer.text() == "".join(fragments)
    buffer.add("end")  # more after a read still lands at the end
    assert buffer.text() == "".join(fragments) + "end"
    assert buffer.text() is buffer.text()  # held as one string once read


# -- answers saved as they grow, schema 2 -------------------------------------------------------

V1_SCHEMA = """
CREATE TABLE messages (
    message_id TEXT PRIMARY KEY, conversation_id TEXT NOT NULL,
    turn INTEGER NOT NULL CHECK (turn >= 1),
    role TEXT NOT NULL CHECK (role IN ('user', 'assistant')), content TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('complete', 'error', 'cancelled', 'incomplete')),
    created_at TEXT NOT NULL, scene TEXT NOT NULL, model TEXT NOT NULL, reasoning TEXT NOT NULL,
    tool_calls TEXT NOT NULL, finish_reason TEXT, error_code TEXT, prompt_tokens INTEGER,
    completion_tokens INTEGER, first_token_ms REAL, duration_ms REAL,
    CHECK (role = 'assistant' OR status = 'complete')
);
CREATE INDEX messages_by_turn ON messages (conversation_id, turn);
INSERT INTO messages VALUES ('chat:a:1:user', 'a', 1, 'user', 'hi', 'complete', '{at}', 'chat',
    '', '', '[]', NULL, NULL, NULL, NULL, NULL, NULL);
INSERT INTO messages VALUES ('chat:a:1', 'a', 1, 'assistant', 'hello', 'complete', '{at}',
    'chat', 'm', '', '[]', 'stop', NULL, 3, 4, 12.5, 40.0);
"""


async def test_a_version_1_database_is_migrated_and_keeps_its_messages(target: Target) -> None:
    target.seed(V1_SCHEMA.replace("{at}", AT), 1)
    s = Store(target.where)
    await s.open()
    before = await s.messages("a")
    assert [(m.role, m.content, m.status, m.run_id) for m in before] == [
        ("user", "hi", "complete", None),
        ("assistant", "hello", "complete", None),
    ]
    assert (before[1].prompt_tokens, before[1].first_token_ms) == (3, 12.5)
    await s.save_assistant(answer("a", 2, status="streaming", run_id="run_1"))
    assert [(m.status, m.run_id) for m in await s.messages("a")][-1] == ("streaming", "run_1")
    await s.close()
    assert target.version() == SCHEMA_VERSION == 7
    assert "messages_by_run" in indexes(target)  # a resume finds a saved run by its id
    if target.kind == "sqlite":
        assert target.sql("PRAGMA integrity_check")[0][0] == "ok"


# -- schema 3: the user message as typed, the filled template beside it -----------------------


async def test_a_user_message_keeps_what_was_typed_and_history_gives_the_prompt(
    store: Store,
) -> None:
    await store.begin_turn(
        conversation_id="a", scene="s", user_content="where?", prompt="In 3 words: where?"
    )
    await store.save_assistant(answer("a", 1))
    user, _ = await store.messages("a")
    assert (user.content, user.prompt) == ("where?", "In 3 words: where?")
    assert (await store.history("a", 5))[0] == ("user", "In 3 words: where?")


async def test_a_version_2_database_is_migrated_and_keeps_its_messages(target: Target) -> None:
    v2 = V1_SCHEMA.replace(
        "completion_tokens INTEGER, first_token_ms REAL, duration_ms REAL,",
        "completion_tokens INTEGER, first_token_ms REAL, duration_ms REAL, run_id TEXT,",
    )
    v2 = v2.replace("'incomplete')", "'incomplete', 'streaming')")
    v2 = v2.replace("NULL, NULL);", "NULL, NULL, NULL);").replace("40.0);", "40.0, 'run_0');")
    target.seed(v2.replace("'hi'", "'Say: hi'").replace("{at}", AT), 2)
    s = Store(target.where)
    await s.open()
    user, assistant = await s.messages("a")
    # a version-2 user row holds the filled template: it stays both content and prompt
    assert (user.content, user.prompt, user.created_at) == ("Say: hi", "Say: hi", AT)
    assert (assistant.content, assistant.run_id, assistant.prompt) == ("hello", "run_0", None)
    assert (assistant.prompt_tokens, assistant.duration_ms) == (3, 40.0)
    assert await s.history("a", 5) == [("user", "Say: hi"), ("assistant", "hello")]
    await s.begin_turn(conversation_id="a", scene="chat", user_content="x", prompt="Say: x")
    assert [(m.content, m.prompt) for m in await s.messages("a")][-1] == ("x", "Say: x")
    # version 5: saved Responses answers, a chain read back oldest first
    await s.save_response(saved_responses.row("resp_1", None, None, "m", [{"role": "user"}], AT))
    await s.save_response(
        saved_responses.row("resp_2", "resp_1", None, "m", [{"role": "tool"}], AT)
    )
    assert await s.response_history("resp_2") == [{"role": "user"}, {"role": "tool"}]
    assert await s.response_history("resp_x") is None
    await s.close()
    assert target.version() == SCHEMA_VERSION
    if target.kind == "sqlite":
        assert target.sql("PRAGMA integrity_check")[0][0] == "ok"


async def test_streaming_rows_are_incomplete_at_the_next_open_with_their_text(
    target: Target,
) -> None:
    s = Store(target.where)
    await s.open()
    await s.save_assistant(answer("a", 1, status="streaming", run_id="run_1"))
    await s.save_progress([("the text so far", "thinking", "chat:a:1")])
    await s.close()  # as a kill would leave it: a row still streaming
    s = Store(target.where)
    await s.open()
    [row] = await s.messages("a")
    assert (row.status, row.content, row.reasoning, row.run_id) == (
        "incomplete",
        "the text so far",
        "thinking",
        "run_1",
    )
    await s.close()


async def test_progress_rewrites_only_rows_still_streaming(store: Store) -> None:
    await store.save_assistant(answer("a", 1, status="streaming"))
    await store.save_assistant(answer("a", 2, "final", status="complete"))
    await store.save_progress([("grown", "", "chat:a:1"), ("late progress", "", "chat:a:2")])
    assert [(m.content, m.status) for m in await store.messages("a")] == [
        ("grown", "streaming"),
        ("final", "complete"),
    ]


async def test_history_leaves_out_a_running_answer(store: Store) -> None:
    await ask(store, "a", "first")
    await store.save_assistant(answer("a", 1, "one"))
    await ask(store, "a", "second")
    await store.save_assistant(answer("a", 2, status="streaming"))
    await store.save_progress([("half an ans", "", "chat:a:2")])
    assert await store.history("a", 10) == [("user", "first"), ("assistant", "one")]


async def test_a_store_that_cannot_write_says_so_counts_it_and_recovers_by_itself(
    target: Target, monkeypatch: pytest.MonkeyPatch
) -> None:
    target.quick_lock_timeout(monkeypatch)
    failures: list[tuple[str, int]] = []
    s = Store(target.where, on_failure=lambda op, n: failures.append((op, n)))
    await s.open()
    assert s.writable
    with target.locked():  # another process holds the write lock: nothing commits
        with pytest.raises(StoreWriteError, match="lock"):
            await s.save_assistant(answer("a", 1, "kept for later"))  # awaited: told at once
        assert not s.writable and s.error is not None and "lock" in s.error
        await s.save_progress([("x", "", "chat:a:9")])
        with pytest.raises(StoreWriteError):
            await ask(s, "b")
        assert failures == [("save", 1), ("progress", 1), ("turn", 1)]
        # A new conversation's first turn is not awaited (its run has started): kept for later.
        await s.begin_first_turn(conversation_id="n", scene="chat", user_content="new")
        with pytest.raises(StoreWriteError):
            await s.flush()
        assert failures[-1] == ("turn", 1) and len(failures) == 4
    # The lock goes: the probe finds out, nothing else writes.
    async with asyncio.timeout(5):
        while not s.writable:  # noqa: ASYNC110 - the store's health has no event to wait on
            await asyncio.sleep(0.02)
    assert s.error is None
    # The failed final save and first turn were written with the probe's commit.
    rows = await s.messages("a")
    assert [(m.content, m.status) for m in rows] == [("kept for later", "complete")]
    assert [(m.turn, m.content) for m in await s.messages("n")] == [(1, "new")]
    assert await s.messages("b") == []  # an awaited turn was refused, not kept
    await s.close()


# -- schema 4: a conversation's owner (docs/protocol.md §8) ------------------------------------


async def test_a_runs_answer_is_found_by_its_run_id_and_only_for_its_client(store: Store) -> None:
    """What a resume of a run lean no longer buffers reads (schema 7: the run_id index)."""
    await store.begin_first_turn(conversation_id="a", scene="chat", user_content="q", client="x")
    await store.save_assistant(answer("a", 1, "first", run_id="r1"), client="x")
    await store.begin_first_turn(conversation_id="b", scene="chat", user_content="q")
    # a WebSocket's run ids are its client's: the default client used "r1" too, later
    late = "2026-11-21T16:41:00.000Z"
    await store.save_assistant(answer("b", 1, "second", run_id="r1", created_at=late))
    found = await store.run_answer("r1", "x")
    assert found is not None and (found.content, found.conversation_id) == ("first", "a")
    found = await store.run_answer("r1")
    assert found is not None and found.content == "second"
    assert await store.run_answer("r1", "y") is None  # another client's: not there for it
    assert await store.run_answer("r2") is None
    await store.begin_turn(conversation_id="b", scene="chat", user_content="q")
    later = "2026-11-21T17:00:00.000Z"
    await store.save_assistant(answer("b", 2, "third", run_id="r1", created_at=later))
    found = await store.run_answer("r1")
    assert found is not None and found.content == "third"  # the latest of a reused id


async def test_a_conversation_is_its_clients_and_another_cannot_add_a_turn(store: Store) -> None:
    assert (
        await store.begin_turn(conversation_id="a", scene="chat", user_content="q", client="x") == 1
    )
    await store.save_assistant(answer("a", 1), client="x")
    assert (
        await store.begin_turn(conversation_id="a", scene="chat", user_content="q", client="y") == 0
    )
    assert await ask(store, "a") == 0  # the default client's is not x's either
    assert [m.turn for m in await store.messages("a")] == [1, 1]  # nothing was written
    assert await store.conversation_exists("a", "x")
    assert not await store.conversation_exists("a", "y")
    assert not await store.conversation_exists("a")
    assert (
        await store.begin_turn(conversation_id="a", scene="chat", user_content="q", client="x") == 2
    )
    await store.begin_first_turn(conversation_id="n", scene="chat", user_content="q", client="y")
    assert await store.conversation_exists("n", "y")
    assert not await store.conversation_exists("n", "x")


async def test_a_version_3_database_is_migrated_and_its_rows_are_the_default_clients(
    target: Target,
) -> None:
    v3 = V1_SCHEMA.replace(
        "completion_tokens INTEGER, first_token_ms REAL, duration_ms REAL,",
        "completion_tokens INTEGER, first_token_ms REAL, duration_ms REAL, run_id TEXT,"
        " prompt TEXT,",
    )
    v3 = v3.replace("'incomplete')", "'incomplete', 'streaming')")
    v3 = v3.replace("NULL, NULL);", "NULL, NULL, NULL, NULL);")
    v3 = v3.replace("40.0);", "40.0, 'run_0', NULL);")
    target.seed(v3.replace("{at}", AT), 3)
    s = Store(target.where)
    await s.open()
    assert [(m.role, m.content) for m in await s.messages("a")] == [
        ("user", "hi"),
        ("assistant", "hello"),
    ]
    assert await s.conversation_exists("a")  # the default client owns what came before
    assert not await s.conversation_exists("a", "x")
    assert await s.begin_turn(conversation_id="a", scene="chat", user_content="q", client="x") == 0
    assert await ask(s, "a") == 2
    assert (await s.run_answer("run_0") or answer("?", 1)).content == "hello"  # the default's
    assert await s.run_answer("run_0", "x") is None
    await s.close()
    assert target.version() == SCHEMA_VERSION == 7
    assert "messages_by_run" in indexes(target)
    if target.kind == "sqlite":
        assert target.sql("PRAGMA integrity_check")[0][0] == "ok"


# -- schema 5: saved Responses answers, each its client's (docs/protocol.md §1, §8) -------------


def said(text: str, role: str = "user") -> dict[str, Any]:
    return {"role": role, "content": text}


async def test_a_response_chain_is_read_oldest_first_and_only_by_its_client(
    store: Store,
) -> None:
    row = saved_responses.row
    await store.save_response(row("resp_1", None, "x", "m", [said("1"), said("a", "x")], AT))
    await store.save_response(row("resp_2", "resp_1", "x", "m", [said("2")], AT))
    await store.save_response(row("resp_d", None, None, "m", [said("d")], AT))
    history = await store.response_history("resp_2", "x")
    assert history == [said("1"), said("a", "x"), said("2")]
    assert await store.response_history("resp_1", "x") == [said("1"), said("a", "x")]
    assert await store.response_history("resp_2", "y") is None  # another client's
    assert await store.response_history("resp_2") is None  # nor the default client's
    assert await store.response_history("resp_d") == [said("d")]
    assert await store.response_history("resp_d", "x") is None
    # A link another client made ends the walk there: nothing of its messages is read.
    await store.save_response(row("resp_3", "resp_d", "x", "m", [said("3")], AT))
    assert await store.response_history("resp_3", "x") == [said("3")]


async def test_a_response_saved_twice_fails_alone_and_the_batch_commits(target: Target) -> None:
    failures: list[tuple[str, int]] = []
    s = Store(target.where, on_failure=lambda op, n: failures.append((op, n)))
    await s.open()
    row = saved_responses.row
    await s.save_response(row("resp_1", None, None, "m", [said("first")], AT))
    await s.flush()
    # Queued together (one batch, as a rule): the duplicate fails alone; the rest is written.
    await s.save_response(row("resp_1", None, None, "m", [said("again")], AT))
    await s.save_assistant(answer("a", 1, "kept"), wait=False)
    await s.save_response(row("resp_2", "resp_1", None, "m", [said("second")], AT))
    await s.flush()
    assert failures == [("response", 1)]
    assert await s.response_history("resp_2") == [said("first"), said("second")]
    assert [m.content for m in await s.messages("a")] == ["kept"]
    await s.close()


async def test_a_version_4_database_gains_the_responses_table(target: Target) -> None:
    v4 = V1_SCHEMA.replace(
        "completion_tokens INTEGER, first_token_ms REAL, duration_ms REAL,",
        "completion_tokens INTEGER, first_token_ms REAL, duration_ms REAL, run_id TEXT,"
        " prompt TEXT, client TEXT,",
    )
    v4 = v4.replace("'incomplete')", "'incomplete', 'streaming')")
    v4 = v4.replace("NULL, NULL);", "NULL, NULL, NULL, NULL, 'x');")
    v4 = v4.replace("40.0);", "40.0, 'run_0', NULL, 'x');")
    target.seed(v4.replace("{at}", AT), 4)
    s = Store(target.where)
    await s.open()
    assert [m.content for m in await s.messages("a")] == ["hi", "hello"]
    assert await s.conversation_exists("a", "x")
    await s.save_response(saved_responses.row("resp_1", None, "x", "m", [said("q")], AT))
    assert await s.response_history("resp_1", "x") == [said("q")]
    assert await s.response_history("resp_1") is None
    await s.close()
    assert target.version() == SCHEMA_VERSION == 7
    if target.kind == "sqlite":
        assert target.sql("PRAGMA integrity_check")[0][0] == "ok"


# -- schema 6: instances sharing one database (docs/deploy.md §11) ----------------------------

# An answer's row as a lean from before version 6 left it: no instance.
LEGACY_STREAMING = (
    "INSERT INTO messages (message_id, conversation_id, turn, role, content, status,"
    " created_at, scene, model, reasoning, tool_calls) VALUES ('chat:{cid}:1', '{cid}', 1,"
    f" 'assistant', 'cut', 'streaming', '{AT}', 'chat', 'm', '', '[]')"
)


# Version 4's table (the client column last) and version 1's two rows.
V4_SCHEMA = (
    V1_SCHEMA.replace(
        "completion_tokens INTEGER, first_token_ms REAL, duration_ms REAL,",
        "completion_tokens INTEGER, first_token_ms REAL, duration_ms REAL, run_id TEXT,"
        " prompt TEXT, client TEXT,",
    )
    .replace("'incomplete')", "'incomplete', 'streaming')")
    .replace("NULL, NULL);", "NULL, NULL, NULL, NULL, NULL);")
    .replace("40.0);", "40.0, 'run_0', NULL, NULL);")
    .replace("{at}", AT)
)


def statuses(target: Target) -> dict[str, tuple[str, str | None]]:
    """conversation id -> (status, instance) of its answers."""
    found = target.sql(
        "SELECT conversation_id, status, instance FROM messages WHERE role = 'assistant'"
    )
    return {cid: (status, instance) for cid, status, instance in found}


async def test_an_instance_ends_only_its_own_streaming_rows_at_open(target: Target) -> None:
    a, b = Store(target.where, instance="a"), Store(target.where, instance="b")
    await a.open()
    await b.open()  # both open on one database at once
    await a.save_assistant(answer("x", 1, status="streaming"))
    await b.save_assistant(answer("y", 1, status="streaming"))
    await a.close()  # as a kill would leave them: rows still streaming
    await b.close()
    target.sql(LEGACY_STREAMING.format(cid="z"))
    assert statuses(target) == {
        "x": ("streaming", "a"),
        "y": ("streaming", "b"),
        "z": ("streaming", None),
    }
    a = Store(target.where, instance="a")
    await a.open()  # a restarts while b's answer runs on
    assert statuses(target) == {
        "x": ("incomplete", "a"),
        "y": ("streaming", "b"),
        "z": ("incomplete", None),
    }
    await a.close()


async def test_a_live_instance_ends_a_dead_ones_streaming_rows(target: Target) -> None:
    """`end_streaming` (lean.cluster's sweep of a dead instance): only that instance's rows
    still streaming, and twice (two instances at it) is no different from once."""
    a, b = Store(target.where, instance="a"), Store(target.where, instance="b")
    await a.open()
    await b.open()
    await a.save_assistant(answer("x", 1, status="streaming"))
    await a.save_assistant(answer("done", 1))
    await b.save_assistant(answer("y", 1, status="streaming"))
    await a.close()  # a is killed: its row is still streaming
    await asyncio.gather(b.end_streaming("a"), b.end_streaming("a"))
    assert statuses(target) == {
        "x": ("incomplete", "a"),
        "done": ("complete", "a"),
        "y": ("streaming", "b"),
    }
    await b.close()


async def test_two_stores_on_one_database_write_at_once(target: Target) -> None:
    a, b = Store(target.where, instance="a"), Store(target.where, instance="b")
    await a.open()
    await b.open()
    # Turns of one conversation from both writers: each allocates under a lock both take
    # (SQLite: the file's write lock; PostgreSQL: the conversation's), so no two get the
    # same turn; every save of both lands.
    turns = await asyncio.gather(*(ask(s, "shared") for _ in range(50) for s in (a, b)))
    assert sorted(turns) == list(range(1, 101))
    await asyncio.gather(
        *(s.save_assistant(answer(f"c{i}{s.instance}", 1)) for i in range(200) for s in (a, b))
    )
    await a.close()
    await b.close()
    assert target.count_rows() == 100 + 400


async def test_a_version_4_database_gets_the_instance_column(target: Target) -> None:
    target.seed(V4_SCHEMA + LEGACY_STREAMING.format(cid="c") + ";", 4)
    s = Store(target.where, instance="web-1")
    await s.open()
    await s.save_assistant(answer("b", 1))
    assert [(m.role, m.content) for m in await s.messages("a")] == [
        ("user", "hi"),
        ("assistant", "hello"),
    ]
    await s.close()
    assert statuses(target) == {
        "a": ("complete", None),
        "b": ("complete", "web-1"),
        "c": ("incomplete", None),
    }
    assert target.version() == SCHEMA_VERSION == 7


async def test_instances_opening_an_older_database_together_migrate_it_once(
    target: Target,
) -> None:
    target.seed(V4_SCHEMA, 4)
    stores = [Store(target.where, instance=f"i{n}") for n in range(4)]
    # Each reads the version under the lock the migration takes (SQLite: the file's write
    # lock; PostgreSQL: an advisory lock): the first migrates, the others find it current
    # (a second ADD COLUMN would fail their start-up).
    await asyncio.gather(*(s.open() for s in stores))
    assert [await ask(s, "a") for s in stores] == [2, 3, 4, 5]
    for s in stores:
        await s.close()
    assert target.version() == SCHEMA_VERSION
