"""Resuming on one instance a run that runs on another (docs/protocol.md §7, "Resuming on
another instance"): two real `lean serve` processes sharing the machine's Redis and one
SQLite file, a fake OpenAI upstream dripping words, real HTTP and WebSocket clients.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests import test_cluster
from tests.fakes import FakeOpenAI
from tests.store_targets import Target
from tests.test_aisdk import HERE, MISSING, NODE
from tests.test_cluster import (
    CLIENTS,
    DEADLINE,
    LEASE,
    free_port,
    instances,
    own_redis,
    paced,
    run_on,
)
from tests.test_ui_stream import DONE_FRAME, chat_body, read_parts

# test_cluster's fixtures: the fake upstream, an HTTP client, the shared Redis database
fake, http, shared_redis = test_cluster.fake, test_cluster.http, test_cluster.shared_redis
pytestmark = pytest.mark.one_loop  # lean serve runs uvloop, whatever the test's loop is

ALPHA = {"Authorization": "Bearer alpha-token"}
BETA = {"Authorization": "Bearer beta-token"}
SSE = tuple[str, str, str]  # id, event, data: as an EventSource gets them


def shared_store(tmp_path: Path, target: Target | None = None) -> str:
    """One SQLite file (or `target`'s database) for both instances, flushed often: a killed
    instance leaves little unsaved."""
    if target is None:
        where = f"path = {tmp_path / 'shared.db'}"
    else:
        where = f"{'url' if target.kind == 'postgresql' else 'path'} = {target.where}"
    return f"{where}\nflush_interval = 0.1"


async def sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[SSE]:
    """The events of an SSE body (comments, i.e. heartbeats, skipped)."""
    fields: dict[str, str] = {}
    async for raw in resp.content:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if fields:
                yield fields.get("id", ""), fields.get("event", ""), fields.get("data", "")
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(": ")
            fields[name] = value


async def test_a_run_on_a_resumed_on_b_gets_the_events_after_its_cursor_once(
    tmp_path: Path, fake: FakeOpenAI, http: aiohttp.ClientSession, shared_redis: str
) -> None:
    """SSE by Last-Event-ID, NDJSON from 0 and a WebSocket `resume` frame on B each equal
    what A's own client gets (byte for byte for SSE); another client gets 404; a cursor
    that left A's buffer restarts the answer, as on A."""
    fake.default = lambda body: paced(150, 0.03)  # 4.5 s: running throughout
    store = shared_store(tmp_path)
    limits = "resume_buffer_kb = 1"  # ~70 words: the early cursor leaves it mid-run
    async with instances(
        tmp_path, fake.base_url, shared_redis, 2, extra=CLIENTS, store=store, limits=limits
    ) as (a, b):
        url = a.url + "/v1/scenes/chat/stream"
        async with http.post(url, json={"message": "hi"}, headers=ALPHA) as resp:
            assert resp.status == 200
            baseline: list[SSE] = []
            events = sse_events(resp)
            async with asyncio.timeout(DEADLINE):
                while len(baseline) < 10:
                    baseline.append(await anext(events))
            run_id = json.loads(baseline[0][2])["runId"]
            cursor = int(baseline[-1][0])
            resume = f"{b.url}/v1/runs/{run_id}/stream"

            async def by_last_event_id() -> list[SSE]:
                headers = {**ALPHA, "Last-Event-ID": str(cursor)}
                async with http.get(resume, headers=headers) as got:
                    assert got.status == 200, await got.text()
                    return [event async for event in sse_events(got)]

            async def ndjson_from_start() -> list[dict[str, Any]]:
                headers = {**ALPHA, "Accept": "application/x-ndjson"}
                async with http.get(resume + "?after=0", headers=headers) as got:
                    assert got.status == 200, await got.text()
                    return [json.loads(line) async for line in got.content if line.strip()]

            async def ws_frame() -> list[dict[str, Any]]:
                async with http.ws_connect(b.url + "/v1/ws", headers=ALPHA) as ws:
                    await ws.send_json({"type": "resume", "runId": run_id, "after": cursor})
                    frames = []
                    while not frames or frames[-1]["type"] not in ("done", "error"):
                        frames.append(await ws.receive_json())
                    return frames

            async def restarted_when_gone() -> list[dict[str, Any]]:
                while True:  # once A's buffer no longer holds event 2
                    await asyncio.sleep(0.2)
                    if len(baseline) > 100:
                        break
                headers = {**ALPHA, "Accept": "application/x-ndjson"}
                async with http.get(resume + "?after=1", headers=headers) as got:
                    assert got.status == 200, await got.text()
                    return [json.loads(await got.content.readline()) for _ in range(2)]

            async def rest_of_baseline() -> None:
                async for event in events:
                    baseline.append(event)

            for headers in (BETA, {"Authorization": "Bearer op-token"}):  # not theirs: 404
                async with http.get(resume, headers=headers) as got:
                    assert got.status == 404, await got.text()
                    assert (await got.json())["error"]["code"] == "not_found"
            async with asyncio.timeout(DEADLINE):
                sse, ndjson, ws, restart, _ = await asyncio.gather(
                    by_last_event_id(),
                    ndjson_from_start(),
                    ws_frame(),
                    restarted_when_gone(),
                    rest_of_baseline(),
                )
    assert json.loads(baseline[-1][2])["type"] == "done", baseline[-1]
    assert [int(seq) for seq, _, _ in baseline] == list(range(1, len(baseline) + 1))
    assert sse == baseline[cursor:]  # the same bytes, nothing twice, nothing missing
    assert ndjson == [{**json.loads(data), "seq": int(seq)} for seq, _, data in baseline]
    assert ws == [
        {**json.loads(data), "runId": run_id, "seq": int(seq)} for seq, _, data in baseline[cursor:]
    ]
    start, delta = restart  # the answer again from its start, as A itself answers it
    assert (start["type"], start["seq"], delta["type"]) == ("start", 1, "delta")
    shown = "".join(
        json.loads(d).get("text", "") for s, e, d in baseline[: delta["seq"]] if e == "delta"
    )
    assert delta["text"] == shown and len(shown) > 0


async def test_a_killed_owners_run_is_resumed_from_the_saved_answer_on_b(
    tmp_path: Path,
    fake: FakeOpenAI,
    http: aiohttp.ClientSession,
    shared_redis: str,
    target: Target,
) -> None:
    """kill -9 of A mid-run: while A's lease lasts B answers 503 (A cannot be asked yet);
    then the saved partial answer, `incomplete`, with at least the text A had flushed.
    The instances share one SQLite file, or one PostgreSQL database."""
    store = shared_store(tmp_path, target)
    async with instances(tmp_path, fake.base_url, shared_redis, 2, store=store) as (a, b):
        async with run_on(http, a) as run:
            run_id = (await run.until("start"))["runId"]
            for _ in range(5):
                await run.until("delta")
            seen_early = "".join(e.get("text", "") for e in run.events if e["type"] == "delta")
            await asyncio.sleep(0.5)  # several flushes (0.1 s) after `seen_early`
            for _ in range(3):
                await run.until("delta")
            a.proc.kill()
            killed = time.monotonic()
            seen = "".join(e.get("text", "") for e in run.events if e["type"] == "delta")
        resume = f"{b.url}/v1/runs/{run_id}/stream?after=3"
        headers = {"Accept": "application/x-ndjson"}
        statuses = []
        async with asyncio.timeout(DEADLINE):
            while True:
                async with http.get(resume, headers=headers) as got:
                    statuses.append(got.status)
                    if got.status == 503:
                        body = await got.json()
                        assert body["error"]["code"] == "cluster_unavailable", body
                        assert got.headers["Retry-After"] == "1"
                        await asyncio.sleep(0.1)
                        continue
                    assert got.status == 200, await got.text()
                    answer = [json.loads(line) async for line in got.content if line.strip()]
                    break
        waited = time.monotonic() - killed
    assert waited < LEASE + 2.0, statuses
    assert [e["type"] for e in answer] == ["start", "delta", "error"], answer
    assert answer[0]["runId"] == run_id
    text = answer[1]["text"]
    assert text.startswith(seen_early), (text, seen_early)  # flushed long before the kill
    assert "".join(f"w{n} " for n in range(400)).startswith(text), text
    assert len(text) >= len(seen) - 20, (text, seen)  # about all the client got
    assert answer[2]["message"] == "the answer ended incomplete"


async def test_a_resume_on_b_while_redis_is_down_is_503(
    tmp_path: Path, fake: FakeOpenAI, http: aiohttp.ClientSession
) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    async with own_redis(port) as redis:
        store = shared_store(tmp_path)
        async with instances(tmp_path, fake.base_url, url, 2, store=store) as (a, b):
            async with run_on(http, a) as run:
                run_id = (await run.until("start"))["runId"]
                await run.until("delta")
                redis.kill()
                await redis.wait()
                async with http.get(f"{b.url}/v1/runs/{run_id}/stream") as got:
                    body = await got.json()
                assert got.status == 503, body
                assert body["error"]["code"] == "cluster_unavailable"
                assert "Redis" in body["error"]["message"]
                await run.until("delta")  # A's own client is served all along


async def test_a_reader_on_b_holds_the_run_on_a_until_it_leaves(
    tmp_path: Path, fake: FakeOpenAI, http: aiohttp.ClientSession, shared_redis: str
) -> None:
    """The client on A leaves: its reader on B keeps the run going past `resume_grace`, as
    a reader on A would; once that reader leaves too, A stops feeding it and the run is
    cancelled a grace later (it would run its 20 s otherwise)."""
    store, scene = shared_store(tmp_path), "resume_grace = 0.5\n"
    async with instances(tmp_path, fake.base_url, shared_redis, 2, store=store, scene=scene) as (
        a,
        b,
    ):
        async with run_on(http, a) as run:
            start = await run.until("start")
            await run.until("delta")
        url = f"{b.url}/v1/runs/{start['runId']}/stream?after=1"
        async with http.get(url, headers={"Accept": "application/x-ndjson"}) as got:
            assert got.status == 200, await got.text()
            begun = time.monotonic()
            async with asyncio.timeout(DEADLINE):
                while time.monotonic() - begun < 1.5:  # three graces: fed all along
                    line = json.loads(await got.content.readline())
                    assert line["type"] == "delta", line
        left = time.monotonic()
        messages = f"{b.url}/v1/conversations/{start['conversationId']}/messages"
        async with asyncio.timeout(DEADLINE):
            while True:
                async with http.get(messages) as resp:
                    answer = (await resp.json())["messages"][-1]
                if answer["status"] != "streaming":
                    break
                await asyncio.sleep(0.1)
    assert answer["status"] == "cancelled", answer
    assert time.monotonic() - left < 5.0


async def test_a_websocket_on_b_cancels_the_run_it_resumed_from_a(
    tmp_path: Path, fake: FakeOpenAI, http: aiohttp.ClientSession, shared_redis: str
) -> None:
    """`cancel` on the socket that resumed a run of A's reaches A (routed, as HTTP's)."""
    store = shared_store(tmp_path)
    async with instances(tmp_path, fake.base_url, shared_redis, 2, store=store) as (a, b):
        async with run_on(http, a) as run:
            run_id = (await run.until("start"))["runId"]
            await run.until("delta")
            async with http.ws_connect(b.url + "/v1/ws") as ws:
                await ws.send_json({"type": "resume", "runId": run_id, "after": 1})
                assert (await ws.receive_json())["type"] == "delta"
                await ws.send_json({"type": "cancel", "runId": run_id})
                await ws.send_json({"type": "cancel", "runId": "run_nowhere"})
                errors: dict[str, str] = {}
                async with asyncio.timeout(DEADLINE):
                    while len(errors) < 2:  # in either order: the feed and the frame loop
                        frame = await ws.receive_json()
                        if frame["type"] == "error":
                            errors[frame["runId"]] = frame["code"]
            last = await run.last()
        assert (last["type"], last["code"]) == ("error", "cancelled"), run.events
        assert errors == {run_id: "cancelled", "run_nowhere": "not_found"}


async def test_use_chats_resume_on_b_replays_the_answer_running_on_a(
    tmp_path: Path, fake: FakeOpenAI, http: aiohttp.ClientSession, shared_redis: str
) -> None:
    """`useChat`'s resume route on B finds the chat's running answer in the shared store and
    replays it from A: the same parts as A's own stream; 204 once it has ended."""
    fake.default = lambda body: paced(60, 0.03)
    store = shared_store(tmp_path)
    async with instances(tmp_path, fake.base_url, shared_redis, 2, store=store) as (a, b):
        resume = f"{b.url}/v1/scenes/chat/ui/chatX1/stream"
        async with http.post(a.url + "/v1/scenes/chat/ui", json=chat_body("hi", "chatX1")) as live:
            head = await read_parts(live, 5)
            async with asyncio.timeout(DEADLINE):
                while True:  # until A's streaming row is in the store (at once, or nearly)
                    resp = await http.get(resume)
                    if resp.status != 204:
                        break
                    resp.release()
                    await asyncio.sleep(0.05)
            async with resp:
                assert resp.status == 200, await resp.text()
                beside = await read_parts(resp)
            whole = head + await read_parts(live)
        async with http.get(resume) as resp:
            assert resp.status == 204  # ended: nothing runs
    assert beside == whole and whole[-1] == DONE_FRAME


@pytest.mark.skipif(MISSING is not None, reason=f"AI SDK tests: {MISSING}")
async def test_the_ai_sdk_resumes_on_b_an_answer_running_on_a(
    tmp_path: Path, fake: FakeOpenAI, http: aiohttp.ClientSession, shared_redis: str
) -> None:
    """The real `ai` Chat, reloaded against B (`resume: true`), assembles the whole answer
    A is running."""
    fake.default = lambda body: paced(40, 0.03)
    store = shared_store(tmp_path)
    async with instances(tmp_path, fake.base_url, shared_redis, 2, store=store) as (a, b):
        async with http.post(a.url + "/v1/scenes/chat/ui", json=chat_body("Go", "chatX2")) as r:
            for _ in range(4):  # start, start-step, text-start, a delta: then the reload
                await r.content.readuntil(b"\n\n")
        async with asyncio.timeout(DEADLINE):  # A's `streaming` row is written (not awaited)
            while True:
                async with http.get(f"{b.url}/v1/conversations/chatX2/messages") as resp:
                    rows = (await resp.json())["messages"] if resp.status == 200 else []
                if rows and rows[-1]["role"] == "assistant":
                    break
                await asyncio.sleep(0.05)
        assert NODE is not None
        node = await asyncio.create_subprocess_exec(
            *(NODE, str(HERE / "chat.mjs"), b.url, "chat", "chatX2", "--resume"),
            cwd=HERE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(30):
                out, err = await node.communicate()
        finally:
            if node.returncode is None:
                node.kill()
                await node.wait()
    assert node.returncode == 0, err.decode()[-3000:]
    seen = json.loads(out)
    assert seen["status"] == "ready" and seen["error"] is None, seen
    (message,) = seen["messages"]
    assert message["id"] == "chat:chatX2:1"
    words = " ".join(f"w{n}" for n in range(40))
    assert message["parts"] == [
        {"type": "step-start"},
        {"type": "text", "text": words, "state": "done"},
    ]
