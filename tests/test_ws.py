"""`GET /v1/ws`: one WebSocket carrying several scene runs (docs/protocol.md §2, §3).

lean runs for real (tests.support.running), its upstream is FakeOpenAI, the client
is aiohttp's own `ws_connect`. Saved answers are read back over HTTP from
`GET /v1/conversations/{id}/messages`, as an app would.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import time
import weakref
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest

from lean.app import Server
from lean.config import Config
from lean.handlers import services_key
from tests.fakes import DEFAULT_TEXT, FakeOpenAI, Stall, Stream, text_stream
from tests.support import lean_config, running

pytestmark = pytest.mark.timeout(30)

SCENES = """
[scene.chat]
model = default
template = {message}
resume_grace = 0  ; leaving cancels at once (test_resume.py: the grace)

[scene.summary]
model = default
template = Summarise in {words} words: {message}

[scene.keep]
model = default
template = {message}
on_disconnect = finish
"""
AUTH = "[auth]\ntokens_env = LEAN_TOKENS\n"
FINAL = frozenset({"done", "error"})
DEADLINE = 10.0  # seconds any one exchange with lean may take before the test fails


def ws_config(fake: FakeOpenAI, *, server: str = "", extra: str = "", **more: Any) -> Config:
    return lean_config(
        fake.base_url,
        server=server,
        limits="max_runs_per_socket = 2",
        extra=SCENES + extra,
        **more,
    )


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as f:
        yield f


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        yield s


def run_frame(run_id: str, message: str = "Hi", scene: str = "chat", **more: Any) -> dict[str, Any]:
    return {"type": "run", "runId": run_id, "scene": scene, "message": message, **more}


def stalling(text: str, after: int) -> Stream:
    """`text` word by word, stalling (connection held open) after `after` words."""
    return dataclasses.replace(text_stream(text), stall_after=1 + after)  # +1: the role chunk


def paced(text: str, delay: float = 0.03) -> Stream:
    return dataclasses.replace(text_stream(text), delay=delay)


async def recv(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    msg = await ws.receive(timeout=DEADLINE)
    assert msg.type is aiohttp.WSMsgType.TEXT, msg
    frame = json.loads(msg.data)
    assert isinstance(frame, dict)
    return frame


async def collect(ws: aiohttp.ClientWebSocketResponse, *run_ids: str) -> list[dict[str, Any]]:
    """Every frame until each of `run_ids` has had its final event, in arrival order."""
    frames: list[dict[str, Any]] = []
    pending = set(run_ids)
    async with asyncio.timeout(DEADLINE):
        while pending:
            frame = await recv(ws)
            assert frame.get("runId") in run_ids, frame
            frames.append(frame)
            if frame["type"] in FINAL:
                assert frame["runId"] in pending, f"a second final event: {frame}"
                pending.discard(frame["runId"])
    return frames


async def frames_until(
    ws: aiohttp.ClientWebSocketResponse, run_id: str, deltas: int
) -> list[dict[str, Any]]:
    """Frames of `run_id` until it has sent `deltas` deltas (the run is then mid-answer)."""
    frames: list[dict[str, Any]] = []
    async with asyncio.timeout(DEADLINE):
        while sum(f["type"] == "delta" for f in frames) < deltas:
            frame = await recv(ws)
            assert frame["runId"] == run_id and frame["type"] not in FINAL, frame
            frames.append(frame)
    return frames


def of_run(frames: list[dict[str, Any]], run_id: str) -> list[dict[str, Any]]:
    return [f for f in frames if f["runId"] == run_id]


def assert_answer(frames: list[dict[str, Any]], run_id: str, text: str, scene: str = "chat") -> str:
    """A whole run: start, deltas, done, all with `runId`; returns its conversation id."""
    types = [f["type"] for f in frames]
    assert types[:1] == ["start"] and types[-1:] == ["done"], frames
    assert set(types[1:-1]) <= {"delta"}, frames
    start, *deltas, done = frames
    assert all(f["runId"] == run_id for f in frames)
    cid = start["conversationId"]
    assert (start["scene"], start["model"]) == (scene, "default")
    assert {f["messageId"] for f in frames} == {f"{scene}:{cid}:1"}
    assert "".join(f["text"] for f in deltas) == done["text"] == text
    assert all(f["part"] == "content" for f in deltas)
    return str(cid)


async def messages(
    session: aiohttp.ClientSession, server: Server, cid: str
) -> list[dict[str, Any]]:
    async with session.get(f"{server.url}/v1/conversations/{cid}/messages") as resp:
        assert resp.status == 200, await resp.text()
        body = await resp.json()
    assert body["conversationId"] == cid
    found: list[dict[str, Any]] = body["messages"]
    return found


async def saved_answer(
    session: aiohttp.ClientSession, server: Server, cid: str, turn: int = 1
) -> dict[str, Any]:
    """The assistant row of `turn`, polled until the run has saved it for good."""
    async with asyncio.timeout(DEADLINE):
        while True:
            for row in await messages(session, server, cid):
                mine = (row["role"], row["turn"]) == ("assistant", turn)
                if mine and row["status"] != "streaming":
                    return row
            await asyncio.sleep(0.02)


# --- one run ------------------------------------------------------------------------------


async def test_a_run_is_start_deltas_done_with_run_id_and_message_id(
    fake: FakeOpenAI, session: aiohttp.ClientSession
) -> None:
    fake.push(text_stream("Three small words."))
    async with (
        running(ws_config(fake)) as server,
        session.ws_connect(server.url + "/v1/ws") as ws,
    ):
        await ws.send_json(run_frame("r1", "Hello"))
        frames = await collect(ws, "r1")
        cid = assert_answer(frames, "r1", "Three small words.")
        assert len(frames) == 5  # start, three deltas, done
        done = frames[-1]
        assert done["usage"] == {"promptTokens": 8, "completionTokens": 3}
        assert (done["finishReason"], done["fallback"]) == ("stop", False)
        assert fake.requests[-1].body["messages"] == [{"role": "user", "content": "Hello"}]
        user, answer = await messages(session, server, cid)
        assert (user["role"], user["content"]) == ("user", "Hello")
        assert (answer["status"], answer["content"]) == ("complete", "Three small words.")
        assert answer["messageId"] == done["messageId"]


async def test_template_inputs_reach_the_upstream(
    fake: FakeOpenAI, session: aiohttp.ClientSession
) -> None:
    async with (
        running(ws_config(fake)) as server,
        session.ws_connect(server.url + "/v1/ws") as ws,
    ):
        await ws.send_json(run_frame("s1", "a long text", "summary", inputs={"words": 5}))
        assert_answer(await collect(ws, "s1"), "s1", DEFAULT_TEXT, scene="summary")
    sent = fake.requests[-1].body["messages"]
    assert sent == [{"role": "user", "content": "Summarise in 5 words: a long text"}]


async def test_frames_of_every_length_arrive_whole(
    fake: FakeOpenAI, session: aiohttp.ClientSession
) -> None:
    # lean writes its text frames itself: a 7-bit, a 16-bit and a 64-bit length header
    # (RFC 6455 §5.2), each parsed here by aiohttp's client.
    tokens = ["Hi ", "m" * 300 + " ", "x" * 70_000 + " ", "!"]
    fake.push(text_stream("".join(tokens)))  # one delta per word, spaces kept
    async with (
        running(ws_config(fake)) as server,
        session.ws_connect(server.url + "/v1/ws", max_msg_size=0) as ws,
    ):
        await ws.send_json(run_frame("r1"))
        frames = await collect(ws, "r1")
    deltas = [f["text"] for f in frames if f["type"] == "delta"]
    assert deltas == tokens
    assert frames[-1]["text"] == "".join(tokens)


# --- several runs on one socket -------------------------------------------------------------


async def test_two_runs_interleave_and_each_completes_with_its_own_text(
    fake: FakeOpenAI, session: aiohttp.ClientSession
) -> None:
    a, b = "alpha beta gamma delta epsilon", "one two three four five"
    fake.push(paced(a), paced(b))
    async with (
        running(ws_config(fake)) as server,
        session.ws_connect(server.url + "/v1/ws") as ws,
    ):
        await ws.send_json(run_frame("a", "first"))
        await fake.wait_request(0)  # so "a" gets the first pushed stream
        await ws.send_json(run_frame("b", "second"))
        frames = await collect(ws, "a", "b")
    assert_answer(of_run(frames, "a"), "a", a)
    assert_answer(of_run(frames, "b"), "b", b)
    order = [f["runId"] for f in frames if f["type"] == "delta"]
    assert order.index("b") < len(order) - 1 - order[::-1].index("a"), order  # interleaved
    assert of_run(frames, "a")[0]["conversationId"] != of_run(frames, "b")[0]["conversationId"]


async def test_a_run_beyond_the_socket_limit_is_refused_and_the_others_go_on(
    fake: FakeOpenAI, session: aiohttp.ClientSession
) -> None:
    fake.push(paced("a1 a2 a3 a4"), paced("b1 b2 b3 b4"))
    async with (
        running(ws_config(fake)) as server,
        session.ws_connect(server.url + "/v1/ws") as ws,
    ):
        await ws.send_json(run_frame("a"))
        await fake.wait_request(0)
        await ws.send_json(run_frame("b"))
        await ws.send_json(run_frame("c"))
        frames = await collect(ws, "a", "b", "c")
        (refused,) = of_run(frames, "c")
        assert refused["type"] == "error"
        assert (refused["code"], refused["retryable"]) == ("overloaded", True)
        assert_answer(of_run(frames, "a"), "a", "a1 a2 a3 a4")
        assert_answer(of_run(frames, "b"), "b", "b1 b2 b3 b4")
        assert len(fake.requests) == 2
        # The limit counts running runs: with "a" and "b" done, a new one is admitted.
        await ws.send_json(run_frame("c"))
        assert_answer(await collect(ws, "c"), "c", DEFAULT_TEXT)


# --- cancel and disconnect -----------------------------------------------------------------


async def test_cancel_frame_ends_that_run_closes_its_upstream_and_saves_cancelled(
    fake: FakeOpenAI, session: aiohttp.ClientSession
) -> None:
    fake.push(stalling("kept words never sent", after=2), paced("b1 b2 b3 b4 b5"))
    async with (
        running(ws_config(fake)) as server,
        session.ws_connect(server.url + "/v1/ws") as ws,
    ):
        await ws.send_json(run_frame("a"))
        seen = await frames_until(ws, "a", deltas=2)
        await ws.send_json(run_frame("b"))
        await fake.wait_request(1)
        await ws.send_json({"type": "cancel", "runId": "a"})
        await fake.wait_disconnect(0, timeout=1.0)
        frames = await collect(ws, "a", "b")
        (ended,) = of_run(frames, "a")
        assert (ended["type"], ended["code"]) == ("error", "cancelled")
        assert ended["messageId"] == seen[0]["messageId"]
        assert_answer(of_run(frames, "b"), "b", "b1 b2 b3 b4 b5")
        row = await saved_answer(session, server, seen[0]["conversationId"])
        assert (row["status"], row["content"]) == ("cancelled", "kept words ")
    assert fake.requests[1].finished is not None  # "b" was never cut


async def test_closing_the_socket_cancels_its_runs(
    fake: FakeOpenAI, session: aiohttp.ClientSession
) -> None:
    fake.push(stalling("kept words never sent", after=2))
    async with running(ws_config(fake)) as server:
        async with session.ws_connect(server.url + "/v1/ws") as ws:
            await ws.send_json(run_frame("a"))
            seen = await frames_until(ws, "a", deltas=2)
        closed = time.monotonic()
        left = await fake.wait_disconnect(0, timeout=1.0)
        assert left - closed < 1.0
        row = await saved_answer(session, server, seen[0]["conversationId"])
        assert (row["status"], row["content"]) == ("cancelled", "kept words ")


async def test_a_new_conversation_can_be_read_as_soon_as_its_run_starts(
    fake: FakeOpenAI, session: aiohttp.ClientSession
) -> None:
    for _ in range(5):
        fake.push(stalling("slow words", after=1))
    async with running(ws_config(fake)) as server:
        for n in range(5):
            async with session.ws_connect(server.url + "/v1/ws") as ws:
                await ws.send_json(run_frame(f"r{n}", message=f"question {n}"))
                start = await recv(ws)
                assert start["type"] == "start", start
                # At once: the first turn is written behind the run's back, yet visible,
                # and so is the running answer, with its run.
                rows = await messages(session, server, start["conversationId"])
                assert [(r["role"], r["content"], r["status"], r["runId"]) for r in rows] == [
                    ("user", f"question {n}", "complete", None),
                    ("assistant", "", "streaming", f"r{n}"),
                ]


async def test_closing_the_socket_with_on_disconnect_finish_saves_the_whole_answer(
    fake: FakeOpenAI, session: aiohttp.ClientSession
) -> None:
    text = "the answer goes on after the client has left"
    fake.push(paced(text, delay=0.02))
    async with running(ws_config(fake)) as server:
        async with session.ws_connect(server.url + "/v1/ws") as ws:
            await ws.send_json(run_frame("k", scene="keep"))
            seen = await frames_until(ws, "k", deltas=1)
        row = await saved_answer(session, server, seen[0]["conversationId"])
        assert (row["status"], row["content"]) == ("complete", text)
        assert row["messageId"] == seen[0]["messageId"]
    assert fake.requests[0].disconnected is None
    assert fake.requests[0].finished is not None


# --- bad frames -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "run_id", "code"),
    [
        ("{not json", None, "bad_request"),
        ("[1, 2]", None, "bad_request"),
        ({"type": "hello", "runId": "x"}, "x", "bad_request"),
        ({"runId": "x", "scene": "chat", "message": "Hi"}, "x", "bad_request"),  # no type
        ({"type": "run", "scene": "chat", "message": "Hi"}, None, "bad_request"),  # no runId
        ({"type": "run", "runId": 7, "scene": "chat", "message": "Hi"}, None, "bad_request"),
        ({**run_frame("x"), "message": 5}, "x", "bad_request"),
        (run_frame("x", inputs=["words"]), "x", "bad_request"),
        (run_frame("x", temperature=2), "x", "bad_request"),  # unknown field
        (run_frame("x", conversationId="a:b"), "x", "bad_request"),
        (run_frame("x", ""), "x", "bad_request"),  # the chat template needs a message
        (run_frame("x", scene="nope"), "x", "not_found"),
        (run_frame("x", scene="summary"), "x", "bad_request"),  # no inputs.words
        ({"type": "cancel", "runId": "x"}, "x", "not_found"),
        ({"type": "tool_result", "runId": "x", "toolCallId": "t", "result": 1}, "x", "not_found"),
    ],
    ids=[
        "not-json",
        "not-object",
        "unknown-type",
        "no-type",
        "no-run-id",
        "run-id-not-string",
        "message-not-string",
        "inputs-not-object",
        "unknown-field",
        "bad-conversation-id",
        "missing-message",
        "unknown-scene",
        "missing-input",
        "cancel-unknown-run",
        "tool-result-unknown-run",
    ],
)
async def test_a_bad_frame_gets_an_error_frame_and_the_socket_stays_open(
    fake: FakeOpenAI,
    session: aiohttp.ClientSession,
    frame: str | dict[str, Any],
    run_id: str | None,
    code: str,
) -> None:
    async with (
        running(ws_config(fake)) as server,
        session.ws_connect(server.url + "/v1/ws") as ws,
    ):
        await ws.send_str(frame if isinstance(frame, str) else json.dumps(frame))
        error = await recv(ws)
        assert error["type"] == "error", error
        assert "runId" in error and error["runId"] == run_id
        assert (error["code"], error["retryable"]) == (code, False)
        assert isinstance(error["message"], str) and error["message"]
        if frame == run_frame("x", scene="summary"):
            assert "words" in error["message"]
        await ws.send_json(run_frame("ok"))
        assert_answer(await collect(ws, "ok"), "ok", DEFAULT_TEXT)
    assert len(fake.requests) == 1  # a bad frame never reaches the upstream


async def test_a_run_id_already_running_is_refused_and_the_first_run_goes_on(
    fake: FakeOpenAI, session: aiohttp.ClientSession
) -> None:
    fake.push(paced("first run answer words", delay=0.05))
    async with (
        running(ws_config(fake)) as server,
        session.ws_connect(server.url + "/v1/ws") as ws,
    ):
        await ws.send_json(run_frame("r1", "first"))
        seen = await frames_until(ws, "r1", deltas=1)
        await ws.send_json(run_frame("r1", "second"))
        rest: list[dict[str, Any]] = []
        async with asyncio.timeout(DEADLINE):
            while not rest or rest[-1]["type"] != "done":
                rest.append(await recv(ws))
        errors = [f for f in rest if f["type"] == "error"]
        assert [(e["runId"], e["code"]) for e in errors] == [("r1", "bad_request")]
        assert_answer(seen + [f for f in rest if f not in errors], "r1", "first run answer words")
    assert len(fake.requests) == 1


async def test_run_ids_belong_to_their_socket(
    fake: FakeOpenAI, session: aiohttp.ClientSession
) -> None:
    fake.push(paced("first socket answer"), paced("second socket answer"))
    async with (
        running(ws_config(fake)) as server,
        session.ws_connect(server.url + "/v1/ws") as one,
        session.ws_connect(server.url + "/v1/ws") as two,
    ):
        await one.send_json(run_frame("1"))
        await frames_until(one, "1", deltas=1)
        await two.send_json(run_frame("1"))
        assert_answer(await collect(two, "1"), "1", "second socket answer")


# --- the connection --------------------------------------------------------------------------


async def test_the_socket_is_not_compressed_even_when_the_client_offers_it(
    fake: FakeOpenAI, session: aiohttp.ClientSession
) -> None:
    handshakes: list[aiohttp.ClientResponse] = []

    async def on_request_end(
        s: aiohttp.ClientSession, ctx: SimpleNamespace, params: aiohttp.TraceRequestEndParams
    ) -> None:
        handshakes.append(params.response)

    trace = aiohttp.TraceConfig()
    trace.on_request_end.append(on_request_end)
    async with (
        running(ws_config(fake)) as server,
        aiohttp.ClientSession(trace_configs=[trace]) as traced,
        traced.ws_connect(server.url + "/v1/ws", compress=15) as ws,
    ):
        assert ws.compress == 0
        (handshake,) = handshakes
        assert handshake.status == 101
        assert "Sec-WebSocket-Extensions" not in handshake.headers
        await ws.send_json(run_frame("r1"))
        assert_answer(await collect(ws, "r1"), "r1", DEFAULT_TEXT)


async def test_auth_a_socket_needs_a_token(
    fake: FakeOpenAI, session: aiohttp.ClientSession
) -> None:
    config = ws_config(fake, extra=AUTH, environ={"LEAN_TOKENS": "t1"})
    async with running(config) as server:
        url = server.url + "/v1/ws"
        for headers in ({}, {"Authorization": "Bearer nope"}):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(url, headers=headers)
            assert refused.value.status == 401
        # A browser's WebSocket cannot set headers: GET takes ?access_token= as well.
        for url, headers in (
            (server.url + "/v1/ws", {"Authorization": "Bearer t1"}),
            (server.url + "/v1/ws?access_token=t1", {}),
        ):
            async with session.ws_connect(url, headers=headers) as ws:
                await ws.send_json(run_frame("r1"))
                assert_answer(await collect(ws, "r1"), "r1", DEFAULT_TEXT)
    assert len(fake.requests) == 2


async def test_a_conversation_goes_on_across_runs_with_its_history(
    fake: FakeOpenAI, session: aiohttp.ClientSession
) -> None:
    fake.push(text_stream("First answer."), text_stream("Second answer."))
    async with (
        running(ws_config(fake)) as server,
        session.ws_connect(server.url + "/v1/ws") as ws,
    ):
        await ws.send_json(run_frame("r1", "Hello", conversationId="conv-1"))
        first = await collect(ws, "r1")
        await ws.send_json(run_frame("r2", "And again", conversationId="conv-1"))
        second = await collect(ws, "r2")
        assert first[0]["messageId"] == first[-1]["messageId"] == "chat:conv-1:1"
        assert second[0]["messageId"] == second[-1]["messageId"] == "chat:conv-1:2"
        assert second[-1]["text"] == "Second answer."
        rows = await messages(session, server, "conv-1")
    assert fake.requests[-1].body["messages"] == [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "First answer."},
        {"role": "user", "content": "And again"},
    ]
    assert [(r["role"], r["turn"], r["status"]) for r in rows] == [
        ("user", 1, "complete"),
        ("assistant", 1, "complete"),
        ("user", 2, "complete"),
        ("assistant", 2, "complete"),
    ]


async def test_heartbeat_pings_reach_the_client_while_the_upstream_is_silent(
    fake: FakeOpenAI, session: aiohttp.ClientSession
) -> None:
    fake.push(Stall(seconds=10))
    config = ws_config(fake, server="ping_interval = 0.2")
    async with (
        running(config) as server,
        session.ws_connect(server.url + "/v1/ws", autoping=False) as ws,
    ):
        await ws.send_json(run_frame("r1"))
        pings = 0
        texts: list[dict[str, Any]] = []
        async with asyncio.timeout(DEADLINE):
            while pings < 2 or not texts:
                msg = await ws.receive()
                if msg.type is aiohttp.WSMsgType.PING:
                    pings += 1
                    await ws.pong(msg.data)
                else:
                    assert msg.type is aiohttp.WSMsgType.TEXT, msg
                    texts.append(json.loads(msg.data))
            assert [f["type"] for f in texts] == ["start"]  # the run still waits upstream
            assert len(fake.requests) == 1 and fake.requests[0].finished is None
            await ws.send_json({"type": "cancel", "runId": "r1"})
            msg = await ws.receive()
            while msg.type is aiohttp.WSMsgType.PING:
                await ws.pong(msg.data)
                msg = await ws.receive()
        ended = json.loads(msg.data)
        assert (ended["type"], ended["runId"], ended["code"]) == ("error", "r1", "cancelled")


async def test_a_socket_whose_client_vanished_is_released_at_once(fake: FakeOpenAI) -> None:
    # A client that drops the TCP connection without a close frame: aiohttp cancels the
    # handler but leaves the socket's heartbeat timer armed, which would hold the socket's
    # objects (~11 KB) for a whole ping_interval; a client churning sockets could pile
    # them up. lean closes the socket on the way out, so nothing of it stays alive.
    async with running(ws_config(fake, server="ping_interval = 60")) as server:
        sockets = server.app[services_key].sockets
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(
            b"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE)
        assert head.startswith(b"HTTP/1.1 101"), head
        assert len(sockets) == 1
        alive = [weakref.ref(ws) for ws in sockets]
        writer.transport.abort()  # gone: no close frame, no FIN handshake
        for _ in range(500):  # the handler sees the loss and ends (polled, up to 5 s)
            if not sockets:
                break
            await asyncio.sleep(0.01)
        assert not sockets
        await asyncio.sleep(0.05)  # the handler's task finishes
        gc.collect()  # aiohttp's close() after a lost connection leaves a cycle of its own
        assert [ref() for ref in alive] == [None]


async def test_a_closed_socket_is_freed_by_reference_counting(
    fake: FakeOpenAI, session: aiohttp.ClientSession
) -> None:
    # aiohttp's protocol keeps a socket's data callback: protocol and socket form a cycle,
    # and a client that opened a socket per run left one per run for the GC (its pauses
    # grew with them). lean breaks it when the socket ends.
    fake.push(text_stream("Short answer."))
    async with running(ws_config(fake)) as server:
        sockets = server.app[services_key].sockets
        gc.collect()
        gc.disable()
        try:
            async with session.ws_connect(server.url + "/v1/ws") as ws:
                await ws.send_json(run_frame("r1"))
                assert_answer(await collect(ws, "r1"), "r1", "Short answer.")
                alive = [weakref.ref(socket) for socket in sockets]
            for _ in range(500):  # the handler sees the close and ends (polled, up to 5 s)
                if not sockets:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)  # the handler's task finishes
            assert len(alive) == 1 and alive[0]() is None
        finally:
            gc.enable()


async def test_shutdown_closes_an_idle_socket_with_going_away(
    fake: FakeOpenAI, session: aiohttp.ClientSession
) -> None:
    server = Server(ws_config(fake), port=0)  # drain_timeout = 0.5
    await server.start()
    stopping: asyncio.Task[None] | None = None
    try:
        async with session.ws_connect(server.url + "/v1/ws") as ws:
            stopping = asyncio.create_task(server.stop())
            started = time.monotonic()
            with contextlib.suppress(TimeoutError):
                msg = await ws.receive(timeout=1.5)
            took = time.monotonic() - started
            assert took < 1.5, "no close frame within 1.5 s of the stop"
            assert msg.type is aiohttp.WSMsgType.CLOSE, msg
            assert msg.data == aiohttp.WSCloseCode.GOING_AWAY
    finally:  # the client has closed by now: the stop ends even if lean never closed it
        await (stopping if stopping is not None else server.stop())
