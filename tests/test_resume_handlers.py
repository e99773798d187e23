"""Resuming runs for real (docs/protocol.md §6): `GET /v1/runs/{runId}/stream` over SSE and
NDJSON, the WebSocket `resume` frame, an EventSource reconnecting by itself, the grace a run
gets when its client leaves, and explicit cancels; against a fake upstream that drips words."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp_sse_client import client as sse_client

from lean.app import Server
from lean.config import Config
from tests.fakes import PROMPT_TOKENS, FakeOpenAI, Stream, chunk, sse, text_stream
from tests.support import lean_config, running

pytestmark = pytest.mark.timeout(30)

WORDS = 40
TEXT = " ".join(f"w{i}" for i in range(WORDS))
SCENES = """
[scene.chat]
model = default
template = {message}
resume_grace = 5

[scene.brief]
model = default
template = {message}
resume_grace = 0.3

[scene.keep]
model = default
template = {message}
on_disconnect = finish
"""
Event = tuple[str, int, dict[str, Any]]  # (type, seq, fields)


def config(fake: FakeOpenAI, limits: str = "") -> Config:
    return lean_config(fake.base_url, extra=SCENES, limits=limits)


def drip(text: str = TEXT, delay: float = 0.02) -> Stream:
    return dataclasses.replace(text_stream(text), delay=delay)


def parse_sse(raw: bytes) -> list[Event]:
    out = []
    for block in raw.decode().split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in block.split("\n") if line and not line.startswith(":")
        )
        if fields:
            out.append((fields["event"], int(fields["id"]), json.loads(fields["data"])))
    return out


def parse_ndjson(raw: bytes) -> list[Event]:
    out = []
    for line in raw.decode().splitlines():
        obj = json.loads(line)
        if obj["type"] != "ping":
            out.append((obj.pop("type"), obj.pop("seq"), obj))
    return out


async def sse_events(resp: aiohttp.ClientResponse, count: int) -> list[Event]:
    """The next `count` events of an SSE response."""
    out: list[Event] = []
    while len(out) < count:
        out += parse_sse(await resp.content.readuntil(b"\n\n"))
    return out


@contextlib.asynccontextmanager
async def begun(lean: Server, http: aiohttp.ClientSession, scene: str = "chat", read: int = 4,
                cid: str = "c1") -> AsyncIterator[tuple[str, list[Event]]]:  # fmt: skip
    """A run of `scene` whose client read `read` events; the client leaves on exit."""
    resp = await http.post(
        f"{lean.url}/v1/scenes/{scene}/stream", json={"message": "hi", "conversationId": cid}
    )
    try:
        seen = await sse_events(resp, read)
        yield seen[0][2]["runId"], seen
    finally:
        resp.close()


async def resumed(
    lean: Server, http: aiohttp.ClientSession, run_id: str, *, after: int | None = None,
    last_event_id: int | None = None, ndjson: bool = False,
) -> tuple[int, list[Event]]:  # fmt: skip
    headers = {"Accept": "application/x-ndjson"} if ndjson else {}
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    url = f"{lean.url}/v1/runs/{run_id}/stream" + ("" if after is None else f"?after={after}")
    async with http.get(url, headers=headers) as resp:
        raw = await resp.read()
        if resp.status != 200:
            return resp.status, []
        kind = resp.headers["Content-Type"]
        assert kind.startswith("application/x-ndjson" if ndjson else "text/event-stream")
        return 200, parse_ndjson(raw) if ndjson else parse_sse(raw)


def assert_whole(events: list[Event], text: str = TEXT) -> None:
    """One run's events: seqs 1..n once each, start first, done last, the text whole."""
    assert [seq for _, seq, _ in events] == list(range(1, len(events) + 1))
    assert events[0][0] == "start" and events[-1][0] == "done"
    assert "".join(f["text"] for t, _, f in events if t == "delta") == text
    assert events[-1][2]["text"] == text


async def saved(lean: Server, http: aiohttp.ClientSession, cid: str) -> dict[str, Any]:
    """The conversation's last answer once it is saved for good."""
    async with asyncio.timeout(5):
        while True:
            async with http.get(f"{lean.url}/v1/conversations/{cid}/messages") as resp:
                row: dict[str, Any] = (await resp.json())["messages"][-1]
            if row["role"] == "assistant" and row["status"] != "streaming":
                return row
            await asyncio.sleep(0.02)


async def reference_run(lean: Server, http: aiohttp.ClientSession) -> list[Event]:
    """An uninterrupted run of the same upstream answer, for comparison."""
    async with http.post(f"{lean.url}/v1/scenes/chat/stream", json={"message": "hi"}) as resp:
        return parse_sse(await resp.read())


def shape(events: list[Event]) -> list[tuple[str, int, str]]:
    """What two runs of one answer share: types, seqs, delta texts (ids differ)."""
    return [(t, seq, f.get("text", "") if t == "delta" else "") for t, seq, f in events]


# --- resume over HTTP ------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["last-event-id", "after", "ndjson"])
async def test_resume_gives_exactly_the_missing_events_then_the_live_ones(how: str) -> None:
    async with FakeOpenAI() as fake, running(config(fake)) as lean, aiohttp.ClientSession() as http:
        fake.push(text_stream(TEXT), drip(delay=0.01))
        full = await reference_run(lean, http)
        async with begun(lean, http, read=5) as (run_id, first):
            pass  # the client left mid-answer; the run goes on (resume_grace)
        if how == "last-event-id":
            status, rest = await resumed(lean, http, run_id, after=0, last_event_id=5)
        else:
            status, rest = await resumed(lean, http, run_id, after=5, ndjson=how == "ndjson")
        assert status == 200
        assert rest[0][1] == 6  # live events came after the buffered ones without a seam
        assert_whole(first + rest)
        assert shape(first + rest) == shape(full)
        assert fake.requests[1].disconnected is None  # the upstream answer went on
        row = await saved(lean, http, "c1")
    assert row["status"] == "complete" and row["content"] == TEXT


async def test_resume_after_the_run_ended_while_it_is_still_buffered() -> None:
    async with FakeOpenAI() as fake, running(config(fake)) as lean, aiohttp.ClientSession() as http:
        fake.push(drip(delay=0.005))
        async with begun(lean, http, read=3) as (run_id, first):
            pass
        await saved(lean, http, "c1")  # the run has ended
        status, rest = await resumed(lean, http, run_id, after=3)
        assert status == 200
        assert_whole(first + rest)
        last = rest[-1][1]
        # An EventSource that reconnects after the last event gets 204: stop.
        assert (await resumed(lean, http, run_id, last_event_id=last))[0] == 204
        status, again = await resumed(lean, http, run_id)  # from the start: the same events
        assert status == 200 and again == first + rest


async def test_a_run_past_its_buffer_ttl_is_served_from_its_saved_answer() -> None:
    async with FakeOpenAI() as fake, running(config(fake, "resume_ttl = 0.1")) as lean:
        fake.push(text_stream(TEXT))
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{lean.url}/v1/scenes/chat/stream", json={"message": "hi", "conversationId": "t"}
            ) as resp:
                full = parse_sse(await resp.read())
            run_id = full[0][2]["runId"]
            await asyncio.sleep(0.4)  # past the ttl: lean's upkeep drops the buffer
            status, served = await resumed(lean, http, run_id, after=7)
    assert status == 200
    assert [(t, seq) for t, seq, _ in served] == [("start", 1), ("delta", 2), ("done", 3)]
    assert served[0][2] == full[0][2]  # the same start
    assert served[1][2]["text"] == TEXT
    done = served[2][2]
    assert done["text"] == TEXT and done["finishReason"] == "stop"
    assert done["usage"] == full[-1][2]["usage"]


async def test_unknown_run_is_404_and_a_bad_cursor_is_400_naming_the_field() -> None:
    async with FakeOpenAI() as fake, running(config(fake)) as lean, aiohttp.ClientSession() as http:
        async with http.get(f"{lean.url}/v1/runs/run_nope/stream") as resp:
            assert resp.status == 404
            assert "run_nope" in (await resp.json())["error"]["message"]
        fake.push(drip())
        async with begun(lean, http, read=2) as (run_id, _):
            for query, headers, field in (
                ("?after=x", {}, "after"),
                ("?after=-1", {}, "after"),
                ("", {"Last-Event-ID": "1.5"}, "Last-Event-ID"),
                ("?after=999", {}, "after"),  # past the run's newest event
            ):
                url = f"{lean.url}/v1/runs/{run_id}/stream{query}"
                async with http.get(url, headers=headers) as resp:
                    assert resp.status == 400, query
                    assert field in (await resp.json())["error"]["message"]


async def test_a_cursor_that_left_the_buffer_restarts_the_answer_then_goes_on_live() -> None:
    words = " ".join(f"word{i:03}" for i in range(300))
    async with FakeOpenAI() as fake, running(config(fake, "resume_buffer_kb = 1")) as lean:
        fake.push(drip(words, delay=0.004))
        async with aiohttp.ClientSession() as http:
            async with begun(lean, http, read=2) as (run_id, _):
                pass
            await asyncio.sleep(0.4)  # ~100 words: well past 1 KiB of events
            status, rest = await resumed(lean, http, run_id, after=2)
    assert status == 200
    assert rest[0][0] == "start" and rest[0][1] == 1  # the answer starts over...
    assert rest[1][0] == "delta" and rest[1][1] > 50  # ...with the text so far as one delta
    assert [seq for _, seq, _ in rest[1:]] == list(range(rest[1][1], rest[1][1] + len(rest) - 1))
    assert "".join(f["text"] for t, _, f in rest if t == "delta") == words
    assert rest[-1][0] == "done" and rest[-1][2]["text"] == words


# --- the grace, cancels ----------------------------------------------------------------------


async def test_a_client_that_leaves_and_comes_back_within_the_grace_gets_the_whole_answer() -> None:
    async with FakeOpenAI() as fake, running(config(fake)) as lean, aiohttp.ClientSession() as http:
        fake.push(drip(delay=0.03))
        async with begun(lean, http, scene="brief", read=3) as (run_id, first):
            pass
        await asyncio.sleep(0.15)  # half the grace: the run goes on without a reader
        status, rest = await resumed(lean, http, run_id, after=3)
        assert status == 200
        assert_whole(first + rest)
        row = await saved(lean, http, "c1")
    assert row["status"] == "complete" and fake.requests[0].disconnected is None


async def test_a_client_that_stays_away_past_the_grace_cancels_the_run() -> None:
    async with FakeOpenAI() as fake, running(config(fake)) as lean, aiohttp.ClientSession() as http:
        fake.push(drip(delay=0.05))
        async with begun(lean, http, scene="brief", read=3) as (run_id, _):
            pass
        await fake.wait_disconnect(0, timeout=2)  # 0.3 s later lean closed the upstream call
        row = await saved(lean, http, "c1")
        assert row["status"] == "cancelled" and row["content"].startswith("w0")
        status, rest = await resumed(lean, http, run_id, after=3)  # still buffered
    assert status == 200
    assert rest[-1][0] == "error" and rest[-1][2]["code"] == "cancelled"


async def test_a_resumed_reader_that_leaves_starts_the_grace_again() -> None:
    async with FakeOpenAI() as fake, running(config(fake)) as lean, aiohttp.ClientSession() as http:
        fake.push(drip(delay=0.05))
        async with begun(lean, http, scene="brief", read=3) as (run_id, _):
            pass
        resp = await http.get(f"{lean.url}/v1/runs/{run_id}/stream?after=3")
        await sse_events(resp, 2)
        resp.close()
        await fake.wait_disconnect(0, timeout=2)
        row = await saved(lean, http, "c1")
    assert row["status"] == "cancelled"


async def test_explicit_cancel_stops_at_once_and_saves_cancelled_with_the_usage_so_far() -> None:
    # An upstream that reports its running usage on every chunk (vLLM's continuous usage).
    pieces = [sse(chunk({"content": f"w{i} "}, usage={"prompt_tokens": PROMPT_TOKENS,
              "completion_tokens": i + 1, "total_tokens": PROMPT_TOKENS + i + 1}))
              for i in range(200)]  # fmt: skip
    async with FakeOpenAI() as fake, running(config(fake)) as lean, aiohttp.ClientSession() as http:
        fake.push(Stream(pieces, delay=0.02))
        async with begun(lean, http, read=6) as (run_id, _):
            async with http.post(f"{lean.url}/v1/runs/{run_id}/cancel") as resp:
                assert resp.status == 202
            await fake.wait_disconnect(0, timeout=1)  # at once, not after the grace
        row = await saved(lean, http, "c1")
    assert row["status"] == "cancelled"
    assert row["promptTokens"] == PROMPT_TOKENS
    words = len(row["content"].split())
    assert words >= 5 and row["completionTokens"] in (words, words + 1)


async def test_a_cancelled_run_whose_upstream_reported_no_usage_saves_none_not_zeros() -> None:
    async with FakeOpenAI() as fake, running(config(fake)) as lean, aiohttp.ClientSession() as http:
        fake.push(drip(delay=0.05))  # usage only in the last chunk, which never comes
        async with begun(lean, http, read=4) as (run_id, _):
            async with http.post(f"{lean.url}/v1/runs/{run_id}/cancel") as resp:
                assert resp.status == 202
        row = await saved(lean, http, "c1")
    assert row["status"] == "cancelled" and row["content"].startswith("w0")
    assert row["promptTokens"] is None and row["completionTokens"] is None


async def test_the_running_answer_is_listed_streaming_with_its_run_id() -> None:
    async with FakeOpenAI() as fake, running(config(fake)) as lean, aiohttp.ClientSession() as http:
        fake.push(drip())
        async with begun(lean, http, read=3, cid="s") as (run_id, _):
            async with http.get(f"{lean.url}/v1/conversations/s/messages") as resp:
                row = (await resp.json())["messages"][-1]
            assert (row["status"], row["runId"]) == ("streaming", run_id)
            status, rest = await resumed(lean, http, row["runId"], after=3)
            assert status == 200 and rest[-1][0] == "done"


# --- the WebSocket and EventSource -----------------------------------------------------------


async def test_websocket_resume_gets_the_rest_of_a_run_begun_on_another_socket() -> None:
    async with FakeOpenAI() as fake, running(config(fake)) as lean, aiohttp.ClientSession() as http:
        fake.push(drip())
        first: list[dict[str, Any]] = []
        async with http.ws_connect(lean.url + "/v1/ws") as ws:
            await ws.send_json({"type": "run", "runId": "rw-1", "scene": "chat", "message": "hi"})
            while len(first) < 4:
                first.append(await ws.receive_json(timeout=5))
        rest: list[dict[str, Any]] = []
        async with http.ws_connect(lean.url + "/v1/ws") as ws:
            await ws.send_json({"type": "resume", "runId": "rw-1", "after": 4})
            while not rest or rest[-1]["type"] not in ("done", "error"):
                rest.append(await ws.receive_json(timeout=5))
            await ws.send_json({"type": "resume", "runId": "rw-1", "after": "x"})
            bad = await ws.receive_json(timeout=5)
    assert (bad["type"], bad["code"], bad["runId"]) == ("error", "bad_request", "rw-1")
    frames = first + rest
    assert all(f["runId"] == "rw-1" for f in frames)
    events = [(f.pop("type"), f.pop("seq"), f) for f in frames]
    assert_whole(events)


async def test_websocket_cancel_reaches_a_resumed_run() -> None:
    async with FakeOpenAI() as fake, running(config(fake)) as lean, aiohttp.ClientSession() as http:
        fake.push(drip(delay=0.05))
        async with begun(lean, http, read=3) as (run_id, _):
            pass
        async with http.ws_connect(lean.url + "/v1/ws") as ws:
            await ws.send_json({"type": "resume", "runId": run_id, "after": 3})
            frame = await ws.receive_json(timeout=5)
            assert frame["seq"] == 4
            await ws.send_json({"type": "cancel", "runId": run_id})
            while frame["type"] not in ("done", "error"):
                frame = await ws.receive_json(timeout=5)
        assert (frame["type"], frame["code"]) == ("error", "cancelled")
        await fake.wait_disconnect(0, timeout=1)
        assert (await saved(lean, http, "c1"))["status"] == "cancelled"


class Proxy:
    """A TCP proxy to lean whose connections the test can cut, as a network drop would."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.writers: list[asyncio.StreamWriter] = []
        self.url = ""

    async def __aenter__(self) -> Proxy:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cut()
        self.server.close()
        await self.server.wait_closed()

    def cut(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writers += [writer, up_writer]

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))


async def test_an_eventsource_resumes_by_itself_with_last_event_id() -> None:
    async with FakeOpenAI() as fake, running(config(fake)) as lean, aiohttp.ClientSession() as http:
        fake.push(drip(delay=0.03))
        async with begun(lean, http, read=2) as (run_id, first):
            pass
        seen: list[Event] = []
        reconnects = 0
        async with Proxy(lean.port) as proxy:
            async with sse_client.EventSource(
                f"{proxy.url}/v1/runs/{run_id}/stream?after=2",
                session=http,
                reconnection_time=timedelta(milliseconds=20),
            ) as source:
                while not seen or seen[-1][0] not in ("done", "error"):
                    try:
                        event = await anext(source)
                    except aiohttp.ClientPayloadError:
                        # The network dropped the stream: the EventSource reconnects as a
                        # browser's does, to the same URL (after=2) with Last-Event-ID.
                        reconnects += 1
                        await source.connect()
                        continue
                    seen.append((event.type, int(event.last_event_id), json.loads(event.data)))
                    if len(seen) == 5:
                        proxy.cut()
    assert reconnects == 1
    assert_whole(first + seen)


# --- browsers --------------------------------------------------------------------------------


async def test_a_resume_follows_the_origin_and_token_rules_of_every_route() -> None:
    env = {"LEAN_TOKENS": "tok-1"}
    async with FakeOpenAI() as fake:
        fake.push(drip(delay=0.005))
        cfg = lean_config(
            fake.base_url, extra=SCENES, server="cors_origins = https://app.example", environ=env
        )
        async with running(cfg) as lean, aiohttp.ClientSession() as http:
            auth = {"Authorization": "Bearer tok-1"}
            async with http.post(
                f"{lean.url}/v1/scenes/chat/stream", json={"message": "hi"}, headers=auth
            ) as resp:
                run_id = parse_sse(await resp.read())[0][2]["runId"]
            url = f"{lean.url}/v1/runs/{run_id}/stream"
            async with http.get(url) as resp:
                assert resp.status == 401
            async with http.get(url, headers={**auth, "Origin": "https://evil.example"}) as resp:
                assert resp.status == 403
            # An EventSource on a listed origin: the token as access_token, CORS on the stream.
            listed = {"Origin": "https://app.example", "Last-Event-ID": "2"}
            async with http.get(url + "?access_token=tok-1", headers=listed) as resp:
                assert resp.status == 200
                assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
                assert parse_sse(await resp.read())[0][1] == 3


# --- runs that cannot be resumed -------------------------------------------------------------


async def test_a_websocket_run_whose_id_is_taken_runs_but_is_not_resumable() -> None:
    async with FakeOpenAI() as fake, running(config(fake)) as lean, aiohttp.ClientSession() as http:
        fake.push(drip(delay=0.03), text_stream("second"))
        async with (
            http.ws_connect(lean.url + "/v1/ws") as one,
            http.ws_connect(lean.url + "/v1/ws") as two,
        ):
            await one.send_json({"type": "run", "runId": "r1", "scene": "chat", "message": "a"})
            assert (await one.receive_json(timeout=5))["type"] == "start"
            # Another client names its run r1 too: it runs, as before resumable runs.
            await two.send_json({"type": "run", "runId": "r1", "scene": "chat", "message": "b"})
            frames = [await two.receive_json(timeout=5)]
            while frames[-1]["type"] not in ("done", "error"):
                frames.append(await two.receive_json(timeout=5))
            assert frames[-1]["type"] == "done" and frames[-1]["text"] == "second"
            # A resume of r1 reads the run that holds the id: the first one.
            status, rest = await resumed(lean, http, "r1", after=0)
        assert status == 200 and rest[-1][0] == "done" and rest[-1][2]["text"] == TEXT


async def test_with_no_buffer_runs_are_not_resumable_and_leaving_cancels_at_once() -> None:
    async with FakeOpenAI() as fake, running(config(fake, "resume_buffer_kb = 0")) as lean:
        fake.push(drip(delay=0.05))
        async with aiohttp.ClientSession() as http:
            async with begun(lean, http, read=3) as (run_id, _):
                status, _ = await resumed(lean, http, run_id, after=3)
                assert status == 404  # running, but nothing kept to resume from
            await fake.wait_disconnect(0, timeout=1)  # no grace without a buffer
            assert (await saved(lean, http, "c1"))["status"] == "cancelled"


async def test_a_second_reader_beside_the_first_gets_the_same_events() -> None:
    async with FakeOpenAI() as fake, running(config(fake)) as lean, aiohttp.ClientSession() as http:
        fake.push(drip(delay=0.01))
        async with http.post(f"{lean.url}/v1/scenes/chat/stream", json={"message": "hi"}) as resp:
            first = await sse_events(resp, 3)
            status, other = await resumed(lean, http, first[0][2]["runId"])  # from the start
            first += parse_sse(await resp.read())
    assert status == 200
    assert_whole(first)
    assert other == first  # a reader beside the first one: the same events, the same bytes


# --- ownership (docs/protocol.md §8) ----------------------------------------------------------

OWNERS = """
[client.alpha]
token_env = ALPHA_TOKENS

[client.beta]
token_env = BETA_TOKENS
"""
OWNER_TOKENS = {"LEAN_TOKENS": "op-token", "ALPHA_TOKENS": "alpha-token", "BETA_TOKENS": "beta"}
ALPHA = {"Authorization": "Bearer alpha-token"}
OTHERS = ({"Authorization": "Bearer beta"}, {"Authorization": "Bearer op-token"})


async def test_another_clients_run_is_404_to_resume_running_buffered_or_saved() -> None:
    """To another client (a named one, or the operator's default) a run does not exist: the
    resume route and the WebSocket's resume frame say 404 in the words of an unknown id,
    while it runs, once it ended (still buffered), and once only the store has it."""
    async with FakeOpenAI() as fake:
        cfg = lean_config(
            fake.base_url, extra=SCENES + OWNERS, environ=OWNER_TOKENS, limits="resume_ttl = 0.3"
        )
        fake.push(drip(delay=0.03))
        async with running(cfg) as lean, aiohttp.ClientSession() as http:

            async def status_of(run_id: str, headers: dict[str, str]) -> tuple[int, str]:
                url = f"{lean.url}/v1/runs/{run_id}/stream?after=1"
                async with http.get(url, headers=headers) as resp:
                    body = await resp.read()
                    message = json.loads(body)["error"]["message"] if resp.status == 404 else ""
                    return resp.status, message

            resp = await http.post(
                f"{lean.url}/v1/scenes/chat/stream", json={"message": "hi"}, headers=ALPHA
            )
            first = await sse_events(resp, 3)
            resp.close()  # alpha left: the run goes on within its grace
            run_id = first[0][2]["runId"]
            unknown = await status_of("run_nope", ALPHA)
            assert unknown[0] == 404
            for headers in OTHERS:
                assert await status_of(run_id, headers) == (
                    404,
                    unknown[1].replace("run_nope", run_id),
                )
                token = headers["Authorization"].removeprefix("Bearer ")
                async with http.ws_connect(f"{lean.url}/v1/ws?access_token={token}") as ws:
                    await ws.send_json({"type": "resume", "runId": run_id, "after": 0})
                    frame = await ws.receive_json(timeout=5)
                    assert (frame["type"], frame["code"], frame["runId"]) == (
                        "error",
                        "not_found",
                        run_id,
                    )
                    await ws.send_json({"type": "cancel", "runId": run_id})
                    frame = await ws.receive_json(timeout=5)
                    assert (frame["type"], frame["code"]) == ("error", "not_found")
                async with http.post(f"{lean.url}/v1/runs/{run_id}/cancel", headers=headers) as r:
                    assert r.status == 404
            # its own client gets the rest, live, untouched by the others' attempts
            async with http.get(
                f"{lean.url}/v1/runs/{run_id}/stream", headers={**ALPHA, "Last-Event-ID": "3"}
            ) as resp:
                assert resp.status == 200
                rest = parse_sse(await resp.read())
            assert_whole(first + rest)
            for headers in OTHERS:  # ended, still buffered
                assert (await status_of(run_id, headers))[0] == 404
            await asyncio.sleep(0.5)  # past resume_ttl: only the store has it now
            for headers in OTHERS:
                assert (await status_of(run_id, headers))[0] == 404
            status, served = await resumed_as(lean, http, run_id, ALPHA)
    assert status == 200
    assert [(t, seq) for t, seq, _ in served] == [("start", 1), ("delta", 2), ("done", 3)]
    assert served[1][2]["text"] == TEXT


async def resumed_as(
    lean: Server, http: aiohttp.ClientSession, run_id: str, headers: dict[str, str]
) -> tuple[int, list[Event]]:
    async with http.get(f"{lean.url}/v1/runs/{run_id}/stream?after=1", headers=headers) as resp:
        return resp.status, parse_sse(await resp.read()) if resp.status == 200 else []
