"""Scene runs over SSE (POST and EventSource GET) and NDJSON, cancel, and saved answers."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import time
import weakref
from datetime import timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp_sse_client import client as sse_client

from lean.app import Server
from lean.clients import DEFAULT
from lean.handlers import services_key
from tests.fakes import DONE, FakeOpenAI, Stall, Stream, sse, text_stream
from tests.support import lean_config, running

TEXT = "Alpha beta gamma delta epsilon zeta eta theta."
SCENES = """
[scene.chat]
model = default
system = Be brief.
template = {message}
history_turns = 2
resume_grace = 0  ; leaving cancels at once (test_resume.py: the grace)

[scene.summary]
model = default
template = Summarise in {words} words: {message}

[scene.keep]
model = default
template = {message}
on_disconnect = finish

[scene.report]
model = default
template = Weather in {city} for {days} days.

[scene.fixed]
model = default
template = Tell me a joke.
"""


def config(fake: FakeOpenAI, **more: str) -> Any:
    return lean_config(fake.base_url, extra=SCENES, **more)


def slow(text: str = TEXT, delay: float = 0.05, **more: Any) -> Stream:
    stream = text_stream(text, **more)
    stream.delay = delay
    return stream


def parse_sse(raw: str) -> list[tuple[str, int, dict[str, Any]]]:
    """(event, id, data) per SSE event; comments (pings) skipped."""
    out = []
    for block in raw.split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in block.split("\n") if line and not line.startswith(":")
        )
        if fields:
            out.append((fields["event"], int(fields["id"]), json.loads(fields["data"])))
    return out


async def post_sse(
    lean: Server, scene: str, body: dict[str, Any]
) -> list[tuple[str, int, dict[str, Any]]]:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{lean.url}/v1/scenes/{scene}/stream", json=body) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            return parse_sse(await resp.text())


async def saved(lean: Server, cid: str) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{lean.url}/v1/conversations/{cid}/messages") as resp:
            assert resp.status == 200
            body = await resp.json()
    assert body["conversationId"] == cid
    messages: list[dict[str, Any]] = body["messages"]
    return messages


async def saved_answer(lean: Server, cid: str) -> list[dict[str, Any]]:
    """The conversation once its last answer is saved (polled: the store has no change feed)."""
    async with asyncio.timeout(5):
        while True:
            rows = await saved(lean, cid)
            if rows[-1]["role"] == "assistant" and rows[-1]["status"] != "streaming":
                return rows
            await asyncio.sleep(0.02)


def assert_run_shape(evs: list[tuple[str, int, dict[str, Any]]], last: str) -> dict[str, Any]:
    names = [e[0] for e in evs]
    assert names[0] == "start" and names[-1] == last
    assert names.count("start") == 1 and names.count("done") + names.count("error") == 1
    assert [e[1] for e in evs] == list(range(1, len(evs) + 1))  # SSE ids are the sequence
    assert all(data["type"] == name for name, _, data in evs)
    start = evs[0][2]
    assert {data["messageId"] for _, _, data in evs} == {start["messageId"]}
    return start


# --- SSE ---------------------------------------------------------------------------------------


async def test_sse_run_order_ids_and_text() -> None:
    async with FakeOpenAI() as fake, running(config(fake)) as lean:
        fake.push(text_stream(TEXT))
        evs = await post_sse(lean, "chat", {"message": "Hello", "conversationId": "conv-1"})
    start = assert_run_shape(evs, "done")
    assert start["messageId"] == "chat:conv-1:1"
    assert start["scene"] == "chat" and start["model"] == "default"
    assert start["conversationId"] == "conv-1" and start["runId"].startswith("run_")
    deltas = [d for name, _, d in evs if name == "delta"]
    done = evs[-1][2]
    assert "".join(d["text"] for d in deltas) == done["text"] == TEXT
    assert done["finishReason"] == "stop" and done["fallback"] is False
    assert done["usage"]["completionTokens"] > 0 and done["usage"]["promptTokens"] > 0
    sent = fake.requests[0].body
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
    ]
    assert sent["stream_options"] == {"include_usage": True}  # lean asks for usage itself


async def test_a_finished_run_is_freed_by_reference_counting() -> None:
    # A run, its guard and its tool round must not form a reference cycle: each one
    # left for the cycle collector made its collections longer (measured: +3-5 ms at p99
    # on the first chunk at 100 streams, bench/RESULTS.md).
    async with FakeOpenAI() as fake, running(config(fake)) as lean:
        fake.push(slow(delay=0.02))
        runs = lean.app[services_key].runs
        gc.disable()
        try:
            async with aiohttp.ClientSession() as http:
                url = f"{lean.url}/v1/scenes/chat/stream"
                async with http.post(url, json={"message": "Hello"}) as resp:
                    head = await resp.content.readuntil(b"\n\n")  # start: registered
                    ((name, _, start),) = parse_sse(head.decode())
                    run = runs.get(start["runId"], DEFAULT)
                    assert name == "start" and run is not None
                    alive = weakref.ref(run)
                    del run
                    assert parse_sse(await resp.text())[-1][0] == "done"
            for _ in range(100):  # the run's task finishes after its last event
                if alive() is None:
                    break
                await asyncio.sleep(0.01)
            assert alive() is None
        finally:
            gc.enable()


async def test_thinking_arrives_as_its_own_part_never_in_content() -> None:
    async with FakeOpenAI() as fake, running(config(fake)) as lean:
        fake.push(text_stream(TEXT, reasoning="Let me think."))
        evs = await post_sse(lean, "chat", {"message": "Hi"})
    thinking = "".join(d["text"] for n, _, d in evs if n == "delta" and d["part"] == "thinking")
    content = "".join(d["text"] for n, _, d in evs if n == "delta" and d["part"] == "content")
    assert thinking == "Let me think."
    assert content == TEXT == evs[-1][2]["text"]


async def test_template_inputs_and_a_missing_input_is_a_400_before_the_upstream() -> None:
    async with FakeOpenAI() as fake, running(config(fake)) as lean:
        async with aiohttp.ClientSession() as http:
            url = f"{lean.url}/v1/scenes/summary/stream"
            async with http.post(url, json={"message": "My day."}) as resp:
                assert resp.status == 400
                error = (await resp.json())["error"]
            assert "words" in error["message"] and error["code"] == "bad_request"
            assert fake.requests == []
            payload = {"message": "My day.", "inputs": {"words": 12}}
            async with http.post(url, json=payload) as resp:
                await resp.read()
    assert fake.requests[0].body["messages"][-1]["content"] == "Summarise in 12 words: My day."


@pytest.mark.parametrize(
    ("scene", "body", "status", "named"),
    [
        ("nope", {"message": "x"}, 404, "nope"),
        ("chat", {"message": 3}, 400, "$.message"),
        ("chat", {"message": "x", "inputs": []}, 400, "$.inputs"),
        ("chat", {"message": "x", "extra": 1}, 400, "extra"),
        ("chat", {"message": "x", "conversationId": "a:b"}, 400, "conversationId"),
        ("chat", {}, 400, "message"),
    ],
)
async def test_bad_scene_requests(scene: str, body: Any, status: int, named: str) -> None:
    async with FakeOpenAI() as fake, running(config(fake)) as lean:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{lean.url}/v1/scenes/{scene}/stream", json=body) as resp:
                assert resp.status == status
                error = (await resp.json())["error"]
    assert named in error["message"]
    assert fake.requests == []


async def test_history_turns_go_to_the_model_and_turns_count_up() -> None:
    async with FakeOpenAI() as fake, running(config(fake)) as lean:
        for i in range(3):
            fake.push(text_stream(f"Answer {i}."))
            evs = await post_sse(lean, "chat", {"message": f"Question {i}", "conversationId": "h"})
            assert evs[0][2]["messageId"] == f"chat:h:{i + 1}"
        third = fake.requests[2].body["messages"]
        rows = await saved(lean, "h")
    assert third == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Question 0"},
        {"role": "assistant", "content": "Answer 0."},
        {"role": "user", "content": "Question 1"},
        {"role": "assistant", "content": "Answer 1."},
        {"role": "user", "content": "Question 2"},
    ]
    assert [(r["role"], r["content"], r["status"]) for r in rows] == [
        ("user", "Question 0", "complete"),
        ("assistant", "Answer 0.", "complete"),
        ("user", "Question 1", "complete"),
        ("assistant", "Answer 1.", "complete"),
        ("user", "Question 2", "complete"),
        ("assistant", "Answer 2.", "complete"),
    ]
    assistant = rows[-1]
    assert assistant["messageId"] == "chat:h:3" and assistant["scene"] == "chat"
    assert assistant["model"] == "default" and assistant["finishReason"] == "stop"
    assert assistant["completionTokens"] > 0 and assistant["firstTokenMs"] >= 0


async def test_the_saved_user_message_is_what_was_typed_and_the_model_sees_the_prompt() -> None:
    async with FakeOpenAI() as fake, running(config(fake)) as lean:
        for i in range(2):
            fake.push(text_stream(f"Answer {i}."))
            body = {"message": f"Day {i}.", "inputs": {"words": 5}, "conversationId": "p"}
            await post_sse(lean, "summary", body)
        second = fake.requests[1].body["messages"]
        rows = await saved(lean, "p")
        await post_sse(
            lean, "report", {"inputs": {"city": "Oslo", "days": 3}, "conversationId": "r"}
        )
        await post_sse(lean, "fixed", {"conversationId": "f"})
        report, fixed = (await saved(lean, "r"))[0], (await saved(lean, "f"))[0]
    # the history sent to the model is what it saw before: the filled template
    assert second == [
        {"role": "user", "content": "Summarise in 5 words: Day 0."},
        {"role": "assistant", "content": "Answer 0."},
        {"role": "user", "content": "Summarise in 5 words: Day 1."},
    ]
    assert [(r["role"], r["content"], r["prompt"]) for r in rows] == [
        ("user", "Day 0.", "Summarise in 5 words: Day 0."),
        ("assistant", "Answer 0.", None),
        ("user", "Day 1.", "Summarise in 5 words: Day 1."),
        ("assistant", "Answer 1.", None),
    ]
    # no {message}: the inputs as typed, one `name: value` line each; a fixed template: itself
    assert (report["content"], report["prompt"]) == (
        "city: Oslo\ndays: 3",
        "Weather in Oslo for 3 days.",
    )
    assert (fixed["content"], fixed["prompt"]) == ("Tell me a joke.", "Tell me a joke.")


async def test_a_run_without_conversation_gets_a_fresh_one() -> None:
    async with FakeOpenAI() as fake, running(config(fake)) as lean:
        first = await post_sse(lean, "chat", {"message": "a"})
        second = await post_sse(lean, "chat", {"message": "b"})
    a, b = first[0][2]["conversationId"], second[0][2]["conversationId"]
    assert a != b and first[0][2]["messageId"] == f"chat:{a}:1"


async def test_unknown_conversation_is_a_404() -> None:
    async with running(lean_config(extra=SCENES)) as lean, aiohttp.ClientSession() as http:
        async with http.get(f"{lean.url}/v1/conversations/none/messages") as resp:
            assert resp.status == 404


# --- failure, cancel, disconnect -----------------------------------------------------------------


async def test_failure_after_content_is_an_error_event_and_saves_incomplete() -> None:
    async with FakeOpenAI() as fake, running(config(fake)) as lean:
        stream = text_stream(TEXT)
        stream.cut_after = 3  # role chunk + two words
        fake.push(stream)
        evs = await post_sse(lean, "chat", {"message": "x", "conversationId": "f"})
        rows = await saved(lean, "f")
    assert_run_shape(evs, "error")
    error = evs[-1][2]
    assert error["code"] == "upstream_error" and error["retryable"] is True
    assert rows[-1]["status"] == "incomplete" and rows[-1]["content"] == "Alpha beta "
    assert rows[-1]["errorCode"] == "upstream_error"


async def test_failure_before_content_falls_back_and_says_so() -> None:
    from tests.fakes import Reply, completion

    async with FakeOpenAI() as fake, running(config(fake)) as lean:
        fake.push(Reply(status=500, body={"error": {"message": "x"}}), Reply(body=completion(TEXT)))
        evs = await post_sse(lean, "chat", {"message": "x"})
    assert_run_shape(evs, "done")
    assert evs[-1][2]["text"] == TEXT and evs[-1][2]["fallback"] is True


async def test_cancel_endpoint_ends_the_run_closes_the_upstream_and_saves_cancelled() -> None:
    async with FakeOpenAI() as fake, running(config(fake)) as lean:
        fake.push(slow(" ".join(["word"] * 200)))
        async with aiohttp.ClientSession() as http:
            url = f"{lean.url}/v1/scenes/chat/stream"
            async with http.post(url, json={"message": "x", "conversationId": "k"}) as resp:
                first = await resp.content.readuntil(b"\n\n")
                run_id = json.loads(first.split(b"data: ", 1)[1])["runId"]
                await resp.content.readuntil(b"\n\n")  # one delta
                async with http.post(f"{lean.url}/v1/runs/{run_id}/cancel") as cancel:
                    assert cancel.status == 202
                asked = time.monotonic()
                rest = (await resp.read()).decode()
            async with http.post(f"{lean.url}/v1/runs/{run_id}/cancel") as again:
                assert again.status == 404
        dropped = await fake.wait_disconnect(0, timeout=3)
        rows = await saved(lean, "k")
    assert dropped - asked < 1.0
    last = parse_sse(rest)[-1]
    assert last[0] == "error" and last[2]["code"] == "cancelled"
    assert rows[-1]["status"] == "cancelled" and rows[-1]["content"].startswith("word")


async def test_client_leaving_closes_the_upstream_and_saves_cancelled() -> None:
    async with FakeOpenAI() as fake, running(config(fake)) as lean:
        fake.push(slow(" ".join(["word"] * 200)))
        async with aiohttp.ClientSession() as http:
            resp = await http.post(
                f"{lean.url}/v1/scenes/chat/stream", json={"message": "x", "conversationId": "d"}
            )
            for _ in range(3):
                await resp.content.readuntil(b"\n\n")
            left = time.monotonic()
            resp.close()
        dropped = await fake.wait_disconnect(0, timeout=3)
        assert dropped - left < 1.0
        rows = await saved_answer(lean, "d")
    assert rows[-1]["status"] == "cancelled"


async def test_on_disconnect_finish_keeps_generating_and_saves_the_whole_answer() -> None:
    words = " ".join(f"w{i}" for i in range(30))
    async with FakeOpenAI() as fake, running(config(fake)) as lean:
        fake.push(slow(words, delay=0.02))
        async with aiohttp.ClientSession() as http:
            resp = await http.post(
                f"{lean.url}/v1/scenes/keep/stream", json={"message": "x", "conversationId": "fin"}
            )
            await resp.content.readuntil(b"\n\n")
            resp.close()
        rows = await saved_answer(lean, "fin")
        assert fake.requests[0].disconnected is None and fake.requests[0].finished is not None
    assert rows[-1]["status"] == "complete" and rows[-1]["content"] == words


async def test_shutdown_cuts_a_run_saves_it_incomplete_and_tells_the_client() -> None:
    async with FakeOpenAI() as fake:
        lean = Server(config(fake, server="drain_timeout = 0.3"), port=0)
        await lean.start()
        try:
            fake.push(slow(" ".join(["word"] * 200)))
            async with aiohttp.ClientSession() as http:
                url = f"{lean.url}/v1/scenes/chat/stream"
                async with http.post(url, json={"message": "x", "conversationId": "s"}) as resp:
                    for _ in range(3):
                        await resp.content.readuntil(b"\n\n")
                    stopping = asyncio.create_task(lean.stop())
                    rest = (await resp.read()).decode()
                await stopping
        finally:
            await lean.stop()
        # The store was flushed and closed on the way out: read the row from the file.
        from lean.store import Store

        store = Store(lean.config.store.path)
        await store.open()
        try:
            rows = await store.messages("s")
        finally:
            await store.close()
    last = parse_sse(rest)[-1]
    assert last[0] == "error" and last[2]["code"] == "shutting_down"
    assert rows[-1].status == "incomplete" and rows[-1].content.startswith("word")


# --- NDJSON ---------------------------------------------------------------------------------------


async def test_ndjson_same_events_one_object_per_line() -> None:
    async with FakeOpenAI() as fake, running(config(fake)) as lean:
        fake.push(text_stream(TEXT))
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{lean.url}/v1/scenes/chat/stream",
                json={"message": "x"},
                headers={"Accept": "application/x-ndjson"},
            ) as resp:
                assert resp.headers["Content-Type"].startswith("application/x-ndjson")
                assert resp.headers["X-Accel-Buffering"] == "no"
                lines = (await resp.text()).split("\n")
    assert lines[-1] == ""
    objs = [json.loads(line) for line in lines[:-1]]
    types = [o["type"] for o in objs]
    assert types[0] == "start" and types[-1] == "done" and set(types[1:-1]) == {"delta"}
    assert "".join(o["text"] for o in objs if o["type"] == "delta") == objs[-1]["text"] == TEXT


async def test_ndjson_heartbeat_is_a_ping_object() -> None:
    async with FakeOpenAI() as fake, running(config(fake, server="ping_interval = 0.2")) as lean:
        fake.push(Stream(events=text_stream(TEXT).events, first_byte_delay=0.8))
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{lean.url}/v1/scenes/chat/stream",
                json={"message": "x"},
                headers={"Accept": "application/x-ndjson"},
            ) as resp:
                lines = (await resp.text()).split("\n")[:-1]
    types = [json.loads(line)["type"] for line in lines]
    assert "ping" in types[: types.index("delta")]
    assert types[-1] == "done"


async def test_sse_heartbeat_from_byte_zero() -> None:
    async with FakeOpenAI() as fake, running(config(fake, server="ping_interval = 0.2")) as lean:
        fake.push(Stall(seconds=10))
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{lean.url}/v1/scenes/chat/stream", json={"message": "x"}
            ) as resp:
                start = await resp.content.readuntil(b"\n\n")
                ping = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 2)
    assert start.startswith(b"event: start")
    assert ping == b": ping\n\n"


# --- EventSource (GET) ------------------------------------------------------------------------


async def test_eventsource_get_with_query_inputs() -> None:
    async with FakeOpenAI() as fake, running(config(fake)) as lean:
        fake.push(text_stream(TEXT))
        url = f"{lean.url}/v1/scenes/summary/stream?inputs.words=5&message=Today&conversationId=es"
        seen = []
        async with aiohttp.ClientSession() as http:
            async with sse_client.EventSource(
                url, session=http, reconnection_time=timedelta(milliseconds=50)
            ) as source:
                async for event in source:
                    seen.append((event.type, event.last_event_id, json.loads(event.data)))
                    if event.type in ("done", "error"):
                        break
                # EventSource reconnects after the end; lean answers 204, never a second run.
                with pytest.raises(ConnectionAbortedError):
                    async for _ in source:
                        pass
    assert seen[0][0] == "start" and seen[-1][0] == "done"
    assert [int(e[1]) for e in seen] == list(range(1, len(seen) + 1))
    assert seen[-1][2]["text"] == TEXT
    assert fake.requests[0].body["messages"][-1]["content"] == "Summarise in 5 words: Today"
    assert len(fake.requests) == 1


async def test_get_with_access_token_when_auth_is_on() -> None:
    env = {"LEAN_TOKENS": "tok-1"}
    async with FakeOpenAI() as fake, running(config(fake, environ=env)) as lean:
        async with aiohttp.ClientSession() as http:
            url = f"{lean.url}/v1/scenes/chat/stream?message=hi"
            async with http.get(url) as resp:
                assert resp.status == 401
            async with http.get(url + "&access_token=tok-1") as resp:
                assert resp.status == 200
                assert parse_sse(await resp.text())[-1][0] == "done"
            async with http.post(
                f"{lean.url}/v1/scenes/chat/stream?access_token=tok-1", json={"message": "x"}
            ) as resp:
                assert resp.status == 401  # a token in the URL only for GET (EventSource)


# --- limits on every transport ------------------------------------------------------------------

BIG = sse({"choices": [{"index": 0, "delta": {"content": "z" * 4000}}]})


def raw_post(path: str, body: dict[str, Any]) -> bytes:
    data = json.dumps(body).encode()
    return (
        b"POST %b HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (path.encode(), len(data), data)
    )


def masked_text_frame(payload: bytes) -> bytes:
    """A client-to-server WebSocket text frame (RFC 6455 §5.2), masked as clients must."""
    mask = os.urandom(4)
    size = len(payload)
    head = (
        bytes([0x81, 0x80 | size]) if size < 126 else bytes([0x81, 0xFE, *size.to_bytes(2, "big")])
    )
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


@pytest.mark.parametrize("transport", ["sse", "ndjson", "ws"])
async def test_a_client_that_stops_reading_is_cut_on_every_transport(transport: str) -> None:
    async with FakeOpenAI() as fake:
        cfg = config(fake, limits="slow_client_timeout = 0.5")
        async with running(cfg) as lean:
            fake.push(Stream(events=[BIG] * 5000 + [DONE]))  # ~20 MB
            _, writer = await asyncio.open_connection("127.0.0.1", lean.port)
            body = {"message": "x", "conversationId": f"slow-{transport}"}
            if transport == "ws":
                writer.write(
                    b"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
                )
                frame = {"type": "run", "runId": "r1", "scene": "chat", **body}
                writer.write(masked_text_frame(json.dumps(frame).encode()))
            else:
                request = raw_post("/v1/scenes/chat/stream", body)
                if transport == "ndjson":
                    request = request.replace(
                        b"Host: 127.0.0.1\r\n",
                        b"Host: 127.0.0.1\r\nAccept: application/x-ndjson\r\n",
                    )
                writer.write(request)
            await writer.drain()
            # The client reads nothing: lean stops reading upstream, then cuts the client.
            await fake.wait_disconnect(0, timeout=6)
            assert fake.requests[0].finished is None
            assert fake.requests[0].events_sent < 5000
            rows = await saved_answer(lean, f"slow-{transport}")
            writer.close()
    assert rows[-1]["status"] == "incomplete"
    assert rows[-1]["errorCode"] == "slow_client"
    assert rows[-1]["content"].startswith("zzz")


async def test_admission_applies_to_scene_runs_on_every_transport() -> None:
    async with FakeOpenAI() as fake, running(config(fake, limits="max_streams = 1")) as lean:
        fake.push(Stall(seconds=10))
        async with aiohttp.ClientSession() as http:
            url = f"{lean.url}/v1/scenes/chat/stream"
            held = await http.post(url, json={"message": "x"})
            assert held.status == 200
            async with http.post(url, json={"message": "y"}) as refused:
                assert refused.status == 503
                assert refused.headers["Retry-After"] == "1"
                assert (await refused.json())["error"]["code"] == "overloaded"
            async with http.get(url + "?message=z") as refused_get:
                assert refused_get.status == 503
            async with http.ws_connect(f"{lean.url}/v1/ws") as ws:
                await ws.send_json({"type": "run", "runId": "w1", "scene": "chat", "message": "w"})
                frame = await asyncio.wait_for(ws.receive_json(), 5)
            assert frame["type"] == "error" and frame["runId"] == "w1"
            assert frame["code"] == "overloaded" and frame["retryable"] is True
            held.close()
        assert len(fake.requests) == 1


async def test_a_running_answer_is_listed_streaming_with_its_run_and_text_so_far() -> None:
    stream = text_stream("one two three four five")
    stream.stall_after = 1 + 3  # the role chunk and three words, then silence
    async with FakeOpenAI() as fake:
        fake.push(stream)
        async with (
            running(config(fake, store="flush_interval = 0.05")) as lean,
            aiohttp.ClientSession() as http,
            http.post(
                f"{lean.url}/v1/scenes/chat/stream",
                json={"message": "count"},
                headers={"Accept": "application/x-ndjson"},
            ) as resp,
        ):
            seen, start = "", {}
            async for line in resp.content:
                event = json.loads(line)
                if event["type"] == "start":
                    start = event
                seen += event.get("text", "")
                if seen == "one two three ":
                    break
            async with asyncio.timeout(5):
                while True:  # the next flush, within flush_interval
                    rows = await saved(lean, start["conversationId"])
                    if rows[-1]["content"] == seen:
                        break
                    await asyncio.sleep(0.02)
            answer = rows[-1]
            assert (answer["status"], answer["runId"]) == ("streaming", start["runId"])
