"""The AI SDK UI message stream (docs/protocol.md §6): `POST /v1/scenes/{scene}/ui` and the
resume route `GET /v1/scenes/{scene}/ui/{chatId}/stream`.

lean runs for real (tests.support.running) against FakeOpenAI; the client is a real HTTP
client sending the body `useChat` sends, and each test checks the exact parts. The real
`ai` package reads the same stream in tests/test_aisdk.py. `UIParts` (the translation,
pure) is also fed events directly, and `UISink` is driven by a real aiohttp app from an
event source, as the resume route's buffer drives it (a restart cuts the reader).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from lean import events
from lean.app import Server
from lean.client_io import BodyWriter, ClientGone
from lean.config import Config
from lean.ui_handlers import UI_HEADERS, UISink
from lean.ui_stream import UIParts
from tests import toolbox
from tests.fakes import (
    PROMPT_TOKENS,
    FakeOpenAI,
    Reply,
    Stall,
    Stream,
    chunk,
    sse,
    text_stream,
    tool_call_stream,
)
from tests.support import lean_config, running
from tests.test_scenes import BIG, raw_post, saved_answer

pytestmark = pytest.mark.timeout(30)

TEXT = "Alpha beta gamma."
SCENES = """
[tool.clock]
kind = python
function = tests.toolbox:clock
description = The current time in ISO 8601

[tool.boom]
kind = python
function = tests.toolbox:boom

[tool.ask_user]
kind = client
description = Ask the user a question
parameters = {"type": "object", "properties": {"question": {"type": "string"}}}

[scene.chat]
model = default
template = {message}
history_turns = 4
resume_grace = 0  ; leaving cancels at once (test_resume_handlers.py: the grace)

[scene.helper]
model = default
template = {message}
tools = clock, boom, ask_user
max_tool_rounds = 2
resume_grace = 0

[scene.report]
model = default
template = Weather in {city}: {message}

[scene.reload]
model = default
template = {message}
"""
DONE_FRAME = "[DONE]"


def config(fake: FakeOpenAI, **more: Any) -> Config:
    return lean_config(fake.base_url, extra=SCENES, **more)


def chat_body(text: str, chat_id: str = "chatA1", **more: Any) -> dict[str, Any]:
    """What `useChat` (DefaultChatTransport) POSTs for a new user message."""
    body: dict[str, Any] = {
        "id": chat_id,
        "messages": [
            {"id": "m-user-1", "role": "user", "parts": [{"type": "text", "text": text}]},
        ],
        "trigger": "submit-message",
        "messageId": None,
    }
    body.update(more)
    return body


def parse(raw: str) -> list[Any]:
    """Every `data:` payload of a UI message stream, JSON-decoded; `[DONE]` kept as a string."""
    out: list[Any] = []
    for block in raw.split("\n\n"):
        for line in block.split("\n"):
            if line.startswith("data: "):
                data = line[6:]
                out.append(data if data == DONE_FRAME else json.loads(data))
    return out


async def post_ui(lean: Server, scene: str, body: Any) -> list[Any]:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{lean.url}/v1/scenes/{scene}/ui", json=body) as resp:
            assert resp.status == 200, await resp.text()
            assert resp.headers["x-vercel-ai-ui-message-stream"] == "v1"
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            return parse(await resp.text())


def opening(parts: list[Any], scene: str, chat_id: str, turn: int = 1) -> dict[str, Any]:
    """Check the `start` part and the first step; the start metadata."""
    start = parts[0]
    assert start["type"] == "start"
    assert start["messageId"] == f"{scene}:{chat_id}:{turn}"
    meta: dict[str, Any] = start["messageMetadata"]
    assert meta["runId"].startswith("run_")
    assert meta == {
        "runId": meta["runId"],
        "conversationId": chat_id,
        "scene": scene,
        "model": "default",
    }
    assert parts[1] == {"type": "start-step"}
    return meta


def text_parts(part_id: str, pieces: list[str]) -> list[dict[str, Any]]:
    return [
        {"type": "text-start", "id": part_id},
        *({"type": "text-delta", "id": part_id, "delta": p} for p in pieces),
        {"type": "text-end", "id": part_id},
    ]


def finish(finish_reason: str = "stop", **usage: int) -> dict[str, Any]:
    return {
        "type": "finish",
        "messageMetadata": {
            "finishReason": finish_reason,
            "usage": usage,
            "saved": True,
            "fallback": False,
        },
    }


# --- the POST route, by kind of answer ------------------------------------------------------


async def test_text_answer_parts_in_order() -> None:
    async with FakeOpenAI() as fake, running(config(fake)) as lean:
        fake.push(text_stream(TEXT))
        parts = await post_ui(lean, "chat", chat_body("Say it"))
        sent = await fake.wait_request()
    opening(parts, "chat", "chatA1")
    assert parts[2:] == [
        *text_parts("text-1", ["Alpha ", "beta ", "gamma."]),
        {"type": "finish-step"},
        finish(promptTokens=PROMPT_TOKENS, completionTokens=3),
        DONE_FRAME,
    ]
    assert sent.body["messages"][-1] == {"role": "user", "content": "Say it"}


async def test_reasoning_then_text_are_two_parts() -> None:
    async with FakeOpenAI() as fake, running(config(fake)) as lean:
        fake.push(text_stream("Yes.", reasoning="Let me think."))
        parts = await post_ui(lean, "chat", chat_body("Well?"))
    opening(parts, "chat", "chatA1")
    assert parts[2:-3] == [
        {"type": "reasoning-start", "id": "reasoning-1"},
        {"type": "reasoning-delta", "id": "reasoning-1", "delta": "Let "},
        {"type": "reasoning-delta", "id": "reasoning-1", "delta": "me "},
        {"type": "reasoning-delta", "id": "reasoning-1", "delta": "think."},
        {"type": "reasoning-end", "id": "reasoning-1"},
        *text_parts("text-2", ["Yes."]),
    ]


async def test_refusal_is_a_text_part_marked_as_one() -> None:
    refusal = Stream(
        [
            sse(chunk({"role": "assistant", "refusal": "I can't "})),
            sse(chunk({"refusal": "help with that."})),
            sse(chunk({}, finish_reason="stop")),
            b"data: [DONE]\n\n",
        ]
    )
    async with FakeOpenAI() as fake, running(config(fake)) as lean:
        fake.push(refusal)
        parts = await post_ui(lean, "chat", chat_body("Do harm"))
    opening(parts, "chat", "chatA1")
    assert parts[2] == {
        "type": "text-start",
        "id": "text-1",
        "providerMetadata": {"lean": {"refusal": True}},
    }
    assert parts[3:6] == [
        {"type": "text-delta", "id": "text-1", "delta": "I can't "},
        {"type": "text-delta", "id": "text-1", "delta": "help with that."},
        {"type": "text-end", "id": "text-1"},
    ]
    assert parts[7]["messageMetadata"]["finishReason"] == "refusal"


async def test_python_tool_round_is_a_provider_executed_dynamic_tool() -> None:
    async with FakeOpenAI() as fake, running(config(fake)) as lean:
        fake.push(
            tool_call_stream([("call_1", "clock", "{}"), ("call_2", "boom", '{"x": 1}')]),
            text_stream("It is late."),
        )
        parts = await post_ui(lean, "helper", chat_body("Time?"))
    opening(parts, "helper", "chatA1")
    server = {"providerExecuted": True, "dynamic": True}
    tools = parts[2:8]
    assert tools[:4] == [
        {"type": "tool-input-start", "toolCallId": "call_1", "toolName": "clock", **server},
        {
            "type": "tool-input-available",
            "toolCallId": "call_1",
            "toolName": "clock",
            "input": {},
            **server,
        },
        {"type": "tool-input-start", "toolCallId": "call_2", "toolName": "boom", **server},
        {
            "type": "tool-input-available",
            "toolCallId": "call_2",
            "toolName": "boom",
            "input": {"x": 1},
            **server,
        },
    ]
    outputs = {part["toolCallId"]: part for part in tools[4:]}  # in the order they finish
    assert outputs["call_1"] == {
        "type": "tool-output-available",
        "toolCallId": "call_1",
        "output": toolbox.CLOCK,
        **server,
    }
    assert outputs["call_2"]["type"] == "tool-output-error"
    assert "the boom tool always fails" in outputs["call_2"]["errorText"]
    assert parts[8:] == [
        {"type": "finish-step"},
        {"type": "start-step"},
        *text_parts("text-1", ["It ", "is ", "late."]),
        {"type": "finish-step"},
        finish(promptTokens=2 * PROMPT_TOKENS, completionTokens=5 + 3),  # fragments, words
        DONE_FRAME,
    ]


async def test_client_tool_is_answered_through_the_run_while_the_stream_stays_open() -> None:
    async with FakeOpenAI() as fake, running(config(fake)) as lean:
        fake.push(
            tool_call_stream([("call_ask", "ask_user", '{"question": "Which city?"}')]),
            text_stream("Paris it is."),
        )
        parts: list[Any] = []
        async with aiohttp.ClientSession() as http:
            url = f"{lean.url}/v1/scenes/helper/ui"
            async with http.post(url, json=chat_body("Weather?")) as resp:
                assert resp.status == 200
                buffer = ""
                async for data in resp.content.iter_any():
                    buffer += data.decode()
                    *blocks, buffer = buffer.split("\n\n")
                    for block in blocks:
                        parts.extend(parse(block))
                        if parts[-1] != DONE_FRAME and parts[-1]["type"] == "tool-input-available":
                            run_id = parts[0]["messageMetadata"]["runId"]
                            answer = {"toolCallId": "call_ask", "result": "Paris"}
                            async with http.post(
                                f"{lean.url}/v1/runs/{run_id}/tool-results", json=answer
                            ) as ok:
                                assert ok.status == 200
        second = await fake.wait_request(1)
    opening(parts, "helper", "chatA1")
    assert parts[2:5] == [
        # static (`tool-ask_user` parts) and not provider-executed: useChat calls onToolCall
        {"type": "tool-input-start", "toolCallId": "call_ask", "toolName": "ask_user"},
        {
            "type": "tool-input-available",
            "toolCallId": "call_ask",
            "toolName": "ask_user",
            "input": {"question": "Which city?"},
        },
        {"type": "tool-output-available", "toolCallId": "call_ask", "output": "Paris"},
    ]
    assert parts[5:7] == [{"type": "finish-step"}, {"type": "start-step"}]
    assert parts[7:-3] == text_parts("text-1", ["Paris ", "it ", "is."])
    assert second.body["messages"][-1] == {
        "role": "tool",
        "tool_call_id": "call_ask",
        "content": "Paris",
    }


async def test_the_chat_id_is_the_conversation_and_lean_keeps_the_history() -> None:
    async with FakeOpenAI() as fake, running(config(fake)) as lean:
        fake.push(text_stream("First answer."), text_stream("Second answer."))
        await post_ui(lean, "chat", chat_body("One", chat_id="chatHist"))
        # useChat sends the whole history; lean reads only the last message
        body = chat_body("Two", chat_id="chatHist")
        body["messages"] = [
            {"id": "u1", "role": "user", "parts": [{"type": "text", "text": "One"}]},
            {"id": "a1", "role": "assistant", "parts": [{"type": "text", "text": "ignored"}]},
            {"id": "odd", "metadata": {"any": ["thing"]}},  # earlier messages are not read
            {
                "id": "u2",
                "role": "user",
                "parts": [
                    {"type": "text", "text": "Tw"},
                    {"type": "file", "mediaType": "image/png", "url": "data:,"},
                    {"type": "text", "text": "o"},
                ],
            },
        ]
        parts = await post_ui(lean, "chat", body)
        sent = await fake.wait_request(1)
    opening(parts, "chat", "chatHist", turn=2)
    assert sent.body["messages"] == [
        {"role": "user", "content": "One"},
        {"role": "assistant", "content": "First answer."},
        {"role": "user", "content": "Two"},
    ]


async def test_scene_inputs_come_in_the_body() -> None:
    async with FakeOpenAI() as fake, running(config(fake)) as lean:
        fake.push(text_stream("Sunny."))
        parts = await post_ui(lean, "report", chat_body("tomorrow?", inputs={"city": "Oslo"}))
        sent = await fake.wait_request()
    assert parts[-1] == DONE_FRAME
    assert sent.body["messages"][-1]["content"] == "Weather in Oslo: tomorrow?"


# --- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"messages": []}, 400, "field `id`"),
        ({"id": "c1"}, 400, "field `messages`"),
        ({"id": "c1", "messages": []}, 400, "messages is empty"),
        ({"id": "c1", "messages": [{"role": "user"}]}, 400, "messages[0]: Object missing"),
        (
            {"id": "c1", "messages": [{"role": "user", "parts": "hi"}]},
            400,
            "messages[0]: Expected `array`, got `str` - at `$.parts`",
        ),
        (
            {"id": "c1", "messages": [{"role": "user", "parts": [{"type": "text", "text": 3}]}]},
            400,
            "messages[0].parts[0].text",
        ),
        (
            {"id": "c1", "messages": [{"role": "assistant", "parts": []}]},
            400,
            "messages[0].role must be 'user'",
        ),
        ({**chat_body("hi"), "id": "has:colon"}, 400, "id (the chat id)"),
        (chat_body(""), 400, "needs a message"),
        ({**chat_body("hi"), "inputs": {"city": ["x"]}}, 400, "`$.inputs[...]`"),
    ],
)
async def test_bad_bodies_are_400_naming_the_field(body: Any, status: int, says: str) -> None:
    async with FakeOpenAI() as fake, running(config(fake)) as lean:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{lean.url}/v1/scenes/chat/ui", json=body) as resp:
                assert resp.status == status
                error = (await resp.json())["error"]
        assert fake.requests == []
    assert error["code"] == "bad_request"
    assert says in error["message"]


async def test_errors_before_the_stream_are_http_errors_with_lean_s_body() -> None:
    async with FakeOpenAI() as fake, running(config(fake)) as lean:
        async with aiohttp.ClientSession() as http:
            url = f"{lean.url}/v1/scenes/nope/ui"
            async with http.post(url, json=chat_body("hi")) as resp:
                assert resp.status == 404
                assert "x-vercel-ai-ui-message-stream" not in resp.headers
                assert (await resp.json())["error"]["code"] == "not_found"
            url = f"{lean.url}/v1/scenes/report/ui"
            async with http.post(url, json=chat_body("hi")) as resp:
                assert resp.status == 400
                assert "needs input 'city'" in (await resp.json())["error"]["message"]
            url = f"{lean.url}/v1/scenes/chat/ui"
            async with http.post(url, data=json.dumps(chat_body("hi"))) as resp:
                assert resp.status == 415  # text/plain: a page could send it without preflight
        assert fake.requests == []


async def test_an_upstream_failure_after_start_is_an_error_part() -> None:
    async with FakeOpenAI() as fake, running(config(fake)) as lean:
        fake.default = lambda body: Reply(status=400, body={"error": {"message": "bad input"}})
        parts = await post_ui(lean, "chat", chat_body("hi"))
    opening(parts, "chat", "chatA1")
    assert parts[2]["type"] == "message-metadata"
    error = parts[2]["messageMetadata"]["error"]
    assert error["code"] == "bad_request" and error["retryable"] is False  # the upstream's 400
    assert parts[3:] == [{"type": "error", "errorText": error["message"]}, DONE_FRAME]


async def test_a_cut_mid_text_ends_the_text_part_then_the_error() -> None:
    stream = text_stream("one two three four five", usage=False)
    stream.cut_after = 3  # the role chunk and two words, then the connection drops
    async with FakeOpenAI() as fake, running(config(fake)) as lean:
        fake.push(stream)
        parts = await post_ui(lean, "chat", chat_body("count"))
    opening(parts, "chat", "chatA1")
    assert parts[2:6] == text_parts("text-1", ["one ", "two "])
    assert [p if p == DONE_FRAME else p["type"] for p in parts[6:]] == [
        "message-metadata",
        "error",
        DONE_FRAME,
    ]


async def test_a_cancelled_run_ends_with_abort() -> None:
    stream = text_stream("one two three four five six seven eight")
    stream.delay = 0.1
    async with FakeOpenAI() as fake, running(config(fake)) as lean:
        fake.push(stream)
        parts: list[Any] = []
        async with aiohttp.ClientSession() as http:
            url = f"{lean.url}/v1/scenes/chat/ui"
            async with http.post(url, json=chat_body("count")) as resp:
                async for line in resp.content:
                    if line.startswith(b"data: [DONE]"):
                        parts.append(DONE_FRAME)
                    elif line.startswith(b"data: {"):
                        parts.append(json.loads(line[6:]))
                    else:
                        continue
                    if len(parts) == 3:  # text-start: stop the run
                        assert parts[-1]["type"] == "text-start"
                        run_id = parts[0]["messageMetadata"]["runId"]
                        async with http.post(f"{lean.url}/v1/runs/{run_id}/cancel") as ok:
                            assert ok.status == 202
    assert [p if p == DONE_FRAME else p["type"] for p in parts[-4:]] == [
        "text-end",
        "message-metadata",
        "abort",
        DONE_FRAME,
    ]
    assert parts[-3]["messageMetadata"]["error"]["code"] == "cancelled"
    assert parts[-2] == {"type": "abort"}  # nothing else: ai 5.0's schema is strict


# --- the resume route ---------------------------------------------------------------------


async def test_resume_is_204_when_nothing_of_the_chat_runs() -> None:
    async with FakeOpenAI() as fake, running(config(fake)) as lean:
        fake.push(text_stream(TEXT))
        async with aiohttp.ClientSession() as http:
            resume = f"{lean.url}/v1/scenes/chat/ui/chatR1/stream"
            async with http.get(resume) as resp:
                assert resp.status == 204  # a chat lean never saw
            await post_ui(lean, "chat", chat_body("hi", chat_id="chatR1"))
            async with http.get(resume) as resp:
                assert resp.status == 204  # its answer has ended
            async with http.get(f"{lean.url}/v1/scenes/chat/ui/bad:id/stream") as resp:
                assert resp.status == 400
                assert "chatId" in (await resp.json())["error"]["message"]
            async with http.get(f"{lean.url}/v1/scenes/nope/ui/chatR1/stream") as resp:
                assert resp.status == 404


def drip(text: str, delay: float = 0.02) -> Stream:
    stream = text_stream(text)
    stream.delay = delay
    return stream


def same_message(parts: list[Any]) -> list[Any]:
    """Parts without the ids that differ between two runs of one answer."""
    out = []
    for part in parts:
        if isinstance(part, dict):
            part = {k: v for k, v in part.items() if k not in ("messageId", "messageMetadata")}
        out.append(part)
    return out


async def read_parts(resp: aiohttp.ClientResponse, count: int | None = None) -> list[Any]:
    """The response's parts: the next `count` of them, or all to its end."""
    parts: list[Any] = []
    async for line in resp.content:
        if line.startswith(b"data: [DONE]"):
            parts.append(DONE_FRAME)
        elif line.startswith(b"data: {"):
            parts.append(json.loads(line[6:]))
        if count is not None and len(parts) >= count:
            break
    return parts


async def test_resume_of_a_running_answer_replays_it_from_its_start_then_live() -> None:
    """useChat's reload: the page left mid-answer (the run goes on for its resume_grace) and
    the resume route gives the whole message again, its start replayed, then live, to the end;
    a reader beside the first gets the same parts."""
    words = " ".join(f"w{i}" for i in range(30))
    async with FakeOpenAI() as fake, running(config(fake)) as lean:
        fake.push(text_stream(words), drip(words), drip(words))
        reference = await post_ui(lean, "reload", chat_body("hi", chat_id="chatRef"))
        async with aiohttp.ClientSession() as http:
            ui = f"{lean.url}/v1/scenes/reload/ui"
            async with http.post(ui, json=chat_body("hi", chat_id="chatR2")) as resp:
                first = await read_parts(resp, 5)  # start, start-step, text-start, 2 deltas
            # the page reloaded: useChat asks for the chat's stream
            resume = f"{lean.url}/v1/scenes/reload/ui/chatR2/stream"
            async with http.get(f"{lean.url}/v1/scenes/helper/ui/chatR2/stream") as resp:
                assert resp.status == 204  # the chat runs in another scene
            async with http.get(resume) as resp:
                assert resp.status == 200
                assert resp.headers["x-vercel-ai-ui-message-stream"] == "v1"
                replayed = await read_parts(resp)
            assert replayed[:5] == first  # the same start, messageId and metadata included
            assert same_message(replayed) == same_message(reference)
            rows = await saved_answer(lean, "chatR2")
            assert rows[-1]["status"] == "complete" and rows[-1]["content"] == words
            async with http.get(resume) as resp:
                assert resp.status == 204  # ended: nothing runs
            # a second reader beside the first: both get the whole message
            async with http.post(ui, json=chat_body("again", chat_id="chatR3")) as live:
                head = await read_parts(live, 3)
                async with http.get(f"{lean.url}/v1/scenes/reload/ui/chatR3/stream") as resp:
                    beside = await read_parts(resp)
                whole = head + await read_parts(live)
    assert beside == whole and whole[-1] == DONE_FRAME


async def test_resume_without_a_buffer_is_409_still_running() -> None:
    """With `resume_buffer_kb = 0` lean keeps no events: a running answer cannot be replayed,
    and 204 would make useChat think nothing runs (the user would send again)."""
    async with FakeOpenAI() as fake, running(config(fake, limits="resume_buffer_kb = 0")) as lean:
        fake.push(Stall(seconds=2))
        async with aiohttp.ClientSession() as http:
            post = asyncio.ensure_future(
                http.post(f"{lean.url}/v1/scenes/chat/ui", json=chat_body("hi", chat_id="chatR4"))
            )
            await fake.wait_request()
            resume = f"{lean.url}/v1/scenes/chat/ui/chatR4/stream"
            async with http.get(resume) as resp:
                assert resp.status == 409
                error = (await resp.json())["error"]
            response = await post
            response.close()  # the client leaves: the run is cancelled
            async with asyncio.timeout(5):
                while True:
                    async with http.get(resume) as resp:
                        if resp.status == 204:
                            break
                    await asyncio.sleep(0.02)
    assert error["code"] == "still_running"
    assert "chatR4" in error["message"]


# --- the translation, fed directly ------------------------------------------------------------

MID = "chat:c1:1"


def run_events(*middle: events.Event, last: events.Event | None = None) -> list[events.Event]:
    start = events.Start(
        run_id="run_1", message_id=MID, scene="chat", model="default", conversation_id="c1"
    )
    end = last or events.Done(
        message_id=MID, finish_reason="stop", usage=events.Usage(1, 2), text=""
    )
    return [start, *middle, end]


def fed(parts: UIParts, evs: list[events.Event]) -> list[Any]:
    return parse(b"".join(parts.feed(events.event_name(e), events.encode(e)) for e in evs).decode())


def test_switching_kinds_ends_the_open_part_and_numbers_the_next() -> None:
    evs = run_events(
        events.Delta(message_id=MID, text="a"),
        events.Delta(message_id=MID, text="b", part="thinking"),
        events.Delta(message_id=MID, text="c", part="refusal"),
        events.Delta(message_id=MID, text="d"),
    )
    kinds = [(p["type"], p.get("id")) for p in fed(UIParts(), evs)[2:-3]]
    assert kinds == [
        ("text-start", "text-1"),
        ("text-delta", "text-1"),
        ("text-end", "text-1"),
        ("reasoning-start", "reasoning-2"),
        ("reasoning-delta", "reasoning-2"),
        ("reasoning-end", "reasoning-2"),
        ("text-start", "text-3"),
        ("text-delta", "text-3"),
        ("text-end", "text-3"),
        ("text-start", "text-4"),
        ("text-delta", "text-4"),
        ("text-end", "text-4"),
    ]


def test_unparsable_tool_arguments_go_out_as_text_and_a_lone_waiting_is_input() -> None:
    evs = run_events(
        events.ToolStart(message_id=MID, tool_call_id="t1", name="clock", arguments="{oops"),
        events.ToolEnd(
            message_id=MID,
            tool_call_id="t1",
            name="clock",
            result="x",
            duration_ms=1,
            is_error=False,
        ),
        events.Waiting(message_id=MID, tool_call_id="t2", name="ask", arguments=""),
    )
    parts = fed(UIParts(frozenset({"ask"})), evs)
    assert parts[3]["input"] == "{oops"
    assert parts[5] == {
        "type": "tool-input-available",
        "toolCallId": "t2",
        "toolName": "ask",
        "input": {},
    }


def test_nothing_follows_the_end() -> None:
    parts = UIParts()
    for event in run_events():
        parts.feed(events.event_name(event), events.encode(event))
    with pytest.raises(RuntimeError, match="after the UI stream ended"):
        parts.feed("delta", events.encode(events.Delta(message_id=MID, text="late")))


async def serve_events(
    request: web.Request, source: AsyncIterator[tuple[int, str, bytes]]
) -> web.StreamResponse:
    """`UISink` written from an event source as `resume_handlers.pump` writes it (the resume
    route), without lean's guard: the sink's own behaviour."""
    response = web.StreamResponse(headers=UI_HEADERS)
    sink = UISink(request, UIParts())
    sink.body = await BodyWriter.start(request, response)
    try:
        async for seq, name, payload in source:
            if sink.write(name, seq, payload):
                await sink.drain()
    except ClientGone:
        pass
    return response


async def test_a_replayed_run_is_the_same_parts_as_live() -> None:
    """The resume route's half: (seq, name, payload) in, the same parts as live out."""
    evs = run_events(
        events.Delta(message_id=MID, text="Hel"),
        events.Delta(message_id=MID, text="lo"),
    )

    async def source() -> AsyncIterator[tuple[int, str, bytes]]:
        for seq, event in enumerate(evs, 1):
            await asyncio.sleep(0)
            yield seq, events.event_name(event), events.encode(event)

    async def handler(request: web.Request) -> web.StreamResponse:
        return await serve_events(request, source())

    app = web.Application()
    app.router.add_get("/replay", handler)
    async with TestServer(app, host="127.0.0.1") as server, aiohttp.ClientSession() as http:
        async with http.get(server.make_url("/replay")) as resp:
            assert resp.headers["x-vercel-ai-ui-message-stream"] == "v1"
            replayed = parse(await resp.text())
    assert replayed == fed(UIParts(), evs)
    assert replayed[2:6] == text_parts("text-1", ["Hel", "lo"])


def test_each_model_call_is_a_step_even_one_that_only_calls_tools() -> None:
    def round_of(call_id: str) -> list[events.Event]:
        return [
            events.ToolStart(message_id=MID, tool_call_id=call_id, name="clock", arguments="{}"),
            events.ToolEnd(
                message_id=MID,
                tool_call_id=call_id,
                name="clock",
                result="now",
                duration_ms=1,
                is_error=False,
            ),
        ]

    evs = run_events(*round_of("t1"), *round_of("t2"), events.Delta(message_id=MID, text="ok"))
    kinds = [p if p == DONE_FRAME else p["type"] for p in fed(UIParts(), evs)]
    assert kinds == [
        "start",
        "start-step",
        *("tool-input-start", "tool-input-available", "tool-output-available"),
        *("finish-step", "start-step"),
        *("tool-input-start", "tool-input-available", "tool-output-available"),
        *("finish-step", "start-step"),
        *("text-start", "text-delta", "text-end"),
        *("finish-step", "finish", DONE_FRAME),
    ]


async def test_a_listed_page_reads_the_stream_and_its_header_and_others_are_refused() -> None:
    page, foreign, token = "https://chat.example.com", "https://evil.example.net", "ui-token"
    bearer = {"Authorization": f"Bearer {token}"}
    async with FakeOpenAI() as fake:
        cors = lean_config(
            fake.base_url,
            server=f"cors_origins = {page}",
            extra=SCENES + "[auth]\ntokens_env = LEAN_TOKENS\n",
            environ={"LEAN_TOKENS": token},
        )
        async with running(cors) as lean, aiohttp.ClientSession() as http:
            url = f"{lean.url}/v1/scenes/chat/ui"
            headers = {**bearer, "Origin": page, "Sec-Fetch-Site": "cross-site"}
            async with http.post(url, json=chat_body("hi"), headers=headers) as resp:
                assert resp.status == 200
                assert resp.headers["Access-Control-Allow-Origin"] == page
                exposed = resp.headers["Access-Control-Expose-Headers"].lower()
                assert "x-vercel-ai-ui-message-stream" in exposed  # useChat may check it
                assert parse(await resp.text())[-1] == DONE_FRAME
            resume = f"{lean.url}/v1/scenes/chat/ui/chatA1/stream"
            async with http.get(resume, headers={**bearer, "Origin": page}) as resp:
                assert resp.status == 204
                assert resp.headers["Access-Control-Allow-Origin"] == page
            headers = {**bearer, "Origin": foreign, "Sec-Fetch-Site": "cross-site"}
            async with http.post(url, json=chat_body("hi"), headers=headers) as resp:
                assert resp.status == 403
                assert "Access-Control-Allow-Origin" not in resp.headers
            async with http.post(url, json=chat_body("hi")) as resp:
                assert resp.status == 401  # no token
        assert len(fake.requests) == 1


async def test_heartbeats_are_sse_comments_between_parts() -> None:
    late = text_stream(TEXT)
    late.first_byte_delay = 0.35
    async with FakeOpenAI() as fake, running(config(fake, server="ping_interval = 0.1")) as lean:
        fake.push(late)
        async with aiohttp.ClientSession() as http:
            url = f"{lean.url}/v1/scenes/chat/ui"
            async with http.post(url, json=chat_body("hi")) as resp:
                raw = await resp.text()
    head, _, rest = raw.partition('data: {"type":"start-step"}\n\n')
    assert head.startswith('data: {"type":"start"')
    assert rest.startswith(": ping\n\n")  # the AI SDK's reader skips comments
    assert parse(raw)[-1] == DONE_FRAME


async def test_a_client_that_stops_reading_is_cut_and_the_answer_saved() -> None:
    async with FakeOpenAI() as fake:
        async with running(config(fake, limits="slow_client_timeout = 0.5")) as lean:
            fake.push(Stream(events=[BIG] * 5000 + [b"data: [DONE]\n\n"]))  # ~20 MB
            _, writer = await asyncio.open_connection("127.0.0.1", lean.port)
            writer.write(raw_post("/v1/scenes/chat/ui", chat_body("x", chat_id="slowUI")))
            await writer.drain()
            # The client reads nothing: lean stops reading upstream, then cuts the client.
            await fake.wait_disconnect(0, timeout=6)
            assert fake.requests[0].events_sent < 5000
            rows = await saved_answer(lean, "slowUI")
            writer.close()
    assert rows[-1]["status"] == "incomplete"
    assert rows[-1]["errorCode"] == "slow_client"
    assert rows[-1]["content"].startswith("zzz")


async def test_a_replay_that_restarts_the_answer_cuts_the_connection() -> None:
    """A buffer restarts the answer (`start` again) for a reader that fell behind: the parts
    already sent cannot be taken back, so the reader's connection is reset."""
    first = run_events(events.Delta(message_id=MID, text="Hel"))[:2]
    again = run_events(events.Delta(message_id=MID, text="Hello"))

    async def source() -> AsyncIterator[tuple[int, str, bytes]]:
        for seq, event in enumerate([*first, *again], 1):
            await asyncio.sleep(0)
            yield seq, events.event_name(event), events.encode(event)

    async def handler(request: web.Request) -> web.StreamResponse:
        return await serve_events(request, source())

    app = web.Application()
    app.router.add_get("/replay", handler)
    async with TestServer(app, host="127.0.0.1") as server, aiohttp.ClientSession() as http:
        async with http.get(server.make_url("/replay")) as resp:
            got = b""
            with pytest.raises(aiohttp.ClientPayloadError):
                async for data in resp.content.iter_any():
                    got += data
    assert "Hello" not in got.decode() and "[DONE]" not in got.decode()


# The fields `ai` 5.0.0 accepts per part type: its uiMessageChunkSchema was strict (a field it
# does not know fails the whole stream; later versions accept more). Transcribed from its
# dist/index.mjs.
AI_5_0_0_FIELDS: dict[str, set[str]] = {
    "start": {"messageId", "messageMetadata"},
    "start-step": set(),
    "finish-step": set(),
    "finish": {"messageMetadata"},
    "abort": set(),
    "message-metadata": {"messageMetadata"},
    "error": {"errorText"},
    "text-start": {"id", "providerMetadata"},
    "text-delta": {"id", "delta", "providerMetadata"},
    "text-end": {"id", "providerMetadata"},
    "reasoning-start": {"id", "providerMetadata"},
    "reasoning-delta": {"id", "delta", "providerMetadata"},
    "reasoning-end": {"id", "providerMetadata"},
    "tool-input-start": {"toolCallId", "toolName", "providerExecuted", "dynamic"},
    "tool-input-available": {
        "toolCallId",
        "toolName",
        "input",
        "providerExecuted",
        "providerMetadata",
        "dynamic",
    },
    "tool-output-available": {"toolCallId", "output", "providerExecuted", "dynamic"},
    "tool-output-error": {"toolCallId", "errorText", "providerExecuted", "dynamic"},
}


@pytest.mark.parametrize("code", ["upstream_error", "cancelled", None])
def test_every_part_has_only_fields_ai_5_0_0_accepts(code: str | None) -> None:
    def tool_end(call_id: str, is_error: bool) -> events.ToolEnd:
        return events.ToolEnd(
            message_id=MID,
            tool_call_id=call_id,
            name="clock",
            result="r",
            duration_ms=1,
            is_error=is_error,
        )

    last = None
    if code is not None:
        last = events.Error(message_id=MID, code=code, message="it failed", retryable=True)
    evs = run_events(
        events.Delta(message_id=MID, text="t", part="thinking"),
        events.Delta(message_id=MID, text="a"),
        events.ToolStart(message_id=MID, tool_call_id="s1", name="clock", arguments="{}"),
        events.ToolStart(message_id=MID, tool_call_id="c1", name="ask", arguments="{}"),
        events.Waiting(message_id=MID, tool_call_id="c1", name="ask", arguments="{}"),
        tool_end("s1", True),
        tool_end("c1", False),
        events.Delta(message_id=MID, text="no", part="refusal"),
        last=last,
    )
    parts = [p for p in fed(UIParts(frozenset({"ask"})), evs) if p != DONE_FRAME]
    for part in parts:
        kind = part.pop("type")
        assert set(part) <= AI_5_0_0_FIELDS[kind], kind
    seen = {p.get("type") for p in fed(UIParts(frozenset({"ask"})), evs) if p != DONE_FRAME}
    assert len(seen) >= 14  # the scenario covers nearly every kind lean sends
