"""The tool loop of scene runs (docs/protocol.md §2, §4; issue 4 "Tools").

lean runs for real (tests.support.running); the model is FakeOpenAI, scripted to
ask for tools (`tool_call_stream`) and then to answer; python tools live in
tests/toolbox.py; http tools call a small aiohttp server on 127.0.0.1 started
here; client tools are answered over HTTP (`POST /v1/runs/{id}/tool-results`)
or over the WebSocket (`tool_result` frame), as an app would.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from lean.app import Server
from lean.config import Config
from tests import toolbox
from tests.fakes import PROMPT_TOKENS, FakeOpenAI, Stream, text_stream, tool_call_stream
from tests.support import lean_config, running

pytestmark = pytest.mark.timeout(30)

ANSWER = "It is twenty to five and the sum is five."
ROOT = Path(__file__).resolve().parent.parent
MAX_WEB_BYTES = 1000
ADD_PARAMETERS = {
    "type": "object",
    "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
    "required": ["a", "b"],
}
ASK_PARAMETERS = {"type": "object", "properties": {"question": {"type": "string"}}}
# The scene's tools, in the order the scene lists them (and lean sends them).
SCENE_TOOLS = (
    "clock, add, nap, boom, sleepy, web, web_redirect, web_big, web_fail, web_split, ask_user"
)

Event = tuple[str, dict[str, Any], float]  # (event name, data, time.monotonic() on arrival)


def tools_config(fake: FakeOpenAI, web_url: str = "http://127.0.0.1:9", **more: Any) -> Config:
    extra = f"""
[tool.clock]
kind = python
function = tests.toolbox:clock
description = The current time in ISO 8601

[tool.add]
kind = python
function = tests.toolbox:add
description = Add two numbers
parameters = {json.dumps(ADD_PARAMETERS)}

[tool.nap]
kind = python
function = tests.toolbox:nap

[tool.boom]
kind = python
function = tests.toolbox:boom

[tool.sleepy]
kind = python
function = tests.toolbox:sleepy
timeout = 0.3

[tool.unused]
kind = python
function = tests.toolbox:clock
description = Configured, but no scene offers it

[tool.web]
kind = http
url = {web_url}/tool
allowed_hosts = 127.0.0.1
description = Ask the web service
timeout = 2
max_response_bytes = {MAX_WEB_BYTES}

[tool.web_redirect]
kind = http
url = {web_url}/redirect
allowed_hosts = 127.0.0.1
timeout = 2

[tool.web_big]
kind = http
url = {web_url}/big
allowed_hosts = 127.0.0.1
timeout = 2
max_response_bytes = {MAX_WEB_BYTES}

[tool.web_fail]
kind = http
url = {web_url}/fail
allowed_hosts = 127.0.0.1
timeout = 2

[tool.web_split]
kind = http
url = {web_url}/split
allowed_hosts = 127.0.0.1
timeout = 2
max_response_bytes = {MAX_WEB_BYTES}

[tool.ask_user]
kind = client
description = Ask the user a question
parameters = {json.dumps(ASK_PARAMETERS)}

[scene.assistant]
model = default
template = {{message}}
tools = {SCENE_TOOLS}
max_tool_rounds = 2

[scene.no_rounds]
model = default
template = {{message}}
tools = clock
max_tool_rounds = 0

[scene.plain]
model = default
template = {{message}}
"""
    return lean_config(fake.base_url, extra=extra, **more)


# --- the client side ----------------------------------------------------------------------


class Events:
    """A scene run's SSE response read event by event, each stamped on arrival."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.seen: list[Event] = []

    async def next(self) -> Event | None:
        while True:
            block = await self._resp.content.readuntil(b"\n\n")
            if not block:
                return None
            fields = dict(
                line.split(": ", 1)
                for line in block.decode().split("\n")
                if line and not line.startswith(":")
            )
            if fields:  # a `: ping` comment has none
                event = (fields["event"], json.loads(fields["data"]), time.monotonic())
                self.seen.append(event)
                return event

    async def until(self, name: str) -> Event:
        while (event := await self.next()) is not None:
            if event[0] == name:
                return event
        raise AssertionError(f"the run ended without {name}: {self.names()}")

    async def rest(self) -> list[Event]:
        while await self.next() is not None:
            pass
        return self.seen

    def names(self) -> list[str]:
        return [name for name, _, _ in self.seen]

    def of(self, name: str) -> list[dict[str, Any]]:
        return [data for n, data, _ in self.seen if n == name]


@asynccontextmanager
async def scene_run(
    lean: Server, http: aiohttp.ClientSession, message: str = "What time is it?", **body: Any
) -> AsyncIterator[Events]:
    url = f"{lean.url}/v1/scenes/{body.pop('scene', 'assistant')}/stream"
    async with http.post(url, json={"message": message, **body}) as resp:
        assert resp.status == 200
        yield Events(resp)


async def run_scene(lean: Server, message: str = "What time is it?", **body: Any) -> Events:
    async with aiohttp.ClientSession() as http, scene_run(lean, http, message, **body) as run:
        await run.rest()
    return run


async def saved_answer(lean: Server, cid: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{lean.url}/v1/conversations/{cid}/messages") as resp:
            assert resp.status == 200
            rows: list[dict[str, Any]] = (await resp.json())["messages"]
    assert rows[-1]["role"] == "assistant"
    return rows[-1]


def assert_order(names: list[str], last: str = "done") -> None:
    assert names[0] == "start" and names[-1] == last
    assert names.count("start") == 1 and names.count("done") + names.count("error") == 1


def tool_messages(request_body: dict[str, Any]) -> dict[str, str]:
    """tool_call_id -> content of the `tool` messages the model was sent."""
    return {
        m["tool_call_id"]: m["content"] for m in request_body["messages"] if m["role"] == "tool"
    }


# --- an http tool's server --------------------------------------------------------------------

SPLIT_BODY = b'{"part": "one", ' + b'"rest": "' + b"x" * 200 + b'"}'


@asynccontextmanager
async def web_tools() -> AsyncIterator[tuple[str, list[tuple[str, str, bytes]]]]:
    """(base url, requests as (path, content type, body)) of a real HTTP tool service."""
    seen: list[tuple[str, str, bytes]] = []

    async def record(request: web.Request) -> None:
        seen.append((request.path, request.headers.get("Content-Type", ""), await request.read()))

    async def tool(request: web.Request) -> web.Response:
        await record(request)
        args = json.loads(seen[-1][2])
        return web.json_response({"city": args.get("city"), "temperature": 21})

    async def redirect(request: web.Request) -> web.Response:
        await record(request)
        raise web.HTTPFound("/tool")

    async def big(request: web.Request) -> web.Response:
        await record(request)
        return web.Response(text="y" * (MAX_WEB_BYTES * 5))

    async def fail(request: web.Request) -> web.Response:
        await record(request)
        return web.Response(status=500, text="the service is broken")

    async def split(request: web.Request) -> web.StreamResponse:
        """A small answer in two writes: a client must read to the end, not one read."""
        await record(request)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        await resp.write(SPLIT_BODY[:16])
        await asyncio.sleep(0.05)
        await resp.write(SPLIT_BODY[16:])
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/tool", tool)
    app.router.add_post("/redirect", redirect)
    app.router.add_post("/big", big)
    app.router.add_post("/fail", fail)
    app.router.add_post("/split", split)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", seen
    finally:
        await runner.cleanup()


# --- what the model is offered ------------------------------------------------------------------


async def test_the_model_is_offered_the_scenes_tools_in_openai_form() -> None:
    async with FakeOpenAI() as fake, running(tools_config(fake)) as lean:
        fake.push(text_stream(ANSWER), text_stream(ANSWER))
        run = await run_scene(lean)
        plain = await run_scene(lean, scene="plain")
    assert_order(run.names())
    offered = fake.requests[0].body["tools"]
    assert [t["function"]["name"] for t in offered] == SCENE_TOOLS.split(", ")
    assert "unused" not in {t["function"]["name"] for t in offered}
    by_name = {t["function"]["name"]: t for t in offered}
    assert by_name["add"] == {
        "type": "function",
        "function": {"name": "add", "description": "Add two numbers", "parameters": ADD_PARAMETERS},
    }
    assert by_name["clock"]["function"]["parameters"] == {"type": "object", "properties": {}}
    assert by_name["ask_user"]["function"]["parameters"] == ASK_PARAMETERS
    assert "tool_choice" not in fake.requests[0].body  # the model is free to choose
    assert_order(plain.names())
    assert "tools" not in fake.requests[1].body  # a scene without tools offers none


# --- a round of server tools ------------------------------------------------------------------


async def test_two_tools_at_once_then_the_answer() -> None:
    calls = [("call_a1", "clock", "{}"), ("call_b2", "add", '{"a": 2, "b": 3}')]
    async with FakeOpenAI() as fake, running(tools_config(fake)) as lean:
        fake.push(tool_call_stream(calls), text_stream(ANSWER))
        run = await run_scene(lean, conversationId="two")
        row = await saved_answer(lean, "two")
    names = run.names()
    assert_order(names)
    first_delta = names.index("delta")
    assert names[1:first_delta] == ["tool_start", "tool_start", "tool_end", "tool_end"]
    assert set(names[first_delta:-1]) == {"delta"}
    starts, ends = run.of("tool_start"), run.of("tool_end")
    assert [(s["toolCallId"], s["name"], s["arguments"]) for s in starts] == calls
    assert {e["toolCallId"]: e["result"] for e in ends} == {
        "call_a1": toolbox.CLOCK,
        "call_b2": '{"sum":5}',  # the async tool's dict, as JSON
    }
    assert all(e["isError"] is False and e["durationMs"] >= 0 for e in ends)
    assert {e["name"] for e in ends} == {"clock", "add"}
    done = run.of("done")[0]
    assert done["text"] == ANSWER == "".join(d["text"] for d in run.of("delta"))
    assert done["finishReason"] == "stop"

    assert len(fake.requests) == 2
    second = fake.requests[1].body["messages"]
    assert second[-3] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": i, "type": "function", "function": {"name": n, "arguments": a}}
            for i, n, a in calls
        ],
    }
    assert second[-2:] == [
        {"role": "tool", "tool_call_id": "call_a1", "content": toolbox.CLOCK},
        {"role": "tool", "tool_call_id": "call_b2", "content": '{"sum":5}'},
    ]
    assert second[:-3] == fake.requests[0].body["messages"]  # the prompt itself is unchanged
    assert row["status"] == "complete" and row["content"] == ANSWER


async def test_parallel_calls_run_concurrently() -> None:
    calls = [("call_1", "nap", '{"label": "one"}'), ("call_2", "nap", '{"label": "two"}')]
    async with FakeOpenAI() as fake, running(tools_config(fake)) as lean:
        fake.push(tool_call_stream(calls), text_stream(ANSWER))
        run = await run_scene(lean)
    assert_order(run.names())
    started = min(t for name, _, t in run.seen if name == "tool_start")
    ended = max(t for name, _, t in run.seen if name == "tool_end")
    # Each call blocks its thread for NAP (0.3 s): one after the other would take 0.6 s.
    assert toolbox.NAP * 0.9 <= ended - started < 0.55
    ends = run.of("tool_end")
    assert sorted(e["result"] for e in ends) == ["rested one", "rested two"]
    assert all(toolbox.NAP * 1000 * 0.9 <= e["durationMs"] < 550 for e in ends)


async def test_failing_tools_are_error_results_and_the_run_goes_on() -> None:
    calls = [
        ("c_boom", "boom", "{}"),
        ("c_sleepy", "sleepy", "{}"),
        ("c_nosuch", "no_such_tool", "{}"),
        ("c_unused", "unused", "{}"),  # configured, but not one of this scene's tools
        ("c_badjson", "add", '{"a": 1,'),
        ("c_notobj", "add", "[1, 2]"),
        ("c_badargs", "add", '{"x": 1}'),
    ]
    async with FakeOpenAI() as fake, running(tools_config(fake)) as lean:
        fake.push(tool_call_stream(calls), text_stream(ANSWER))
        run = await run_scene(lean, conversationId="fail")
        row = await saved_answer(lean, "fail")
    assert_order(run.names())
    ends = {e["toolCallId"]: e for e in run.of("tool_end")}
    assert set(ends) == {c[0] for c in calls}
    assert all(e["isError"] is True for e in ends.values())
    result = {call_id: e["result"] for call_id, e in ends.items()}
    assert "ValueError" in result["c_boom"] and "always fails" in result["c_boom"]
    assert "timed out after 0.3 s" in result["c_sleepy"]
    assert 300 <= ends["c_sleepy"]["durationMs"] < 2000
    assert result["c_nosuch"] == "unknown tool 'no_such_tool'"
    assert result["c_unused"] == "unknown tool 'unused'"
    assert result["c_badjson"].startswith("invalid arguments")
    assert result["c_notobj"].startswith("invalid arguments")
    assert "TypeError" in result["c_badargs"] and "'x'" in result["c_badargs"]
    # The model sees each error as that call's result, and the run completes.
    assert tool_messages(fake.requests[1].body) == result
    assert run.of("done")[0]["text"] == ANSWER
    assert row["status"] == "complete"


# --- http tools ------------------------------------------------------------------------------


async def test_http_tool_posts_the_arguments_and_returns_the_body() -> None:
    async with web_tools() as (url, seen), FakeOpenAI() as fake:
        async with running(tools_config(fake, url)) as lean:
            fake.push(tool_call_stream([("c_web", "web", '{"city": "Lyon"}')]), text_stream(ANSWER))
            run = await run_scene(lean)
    assert_order(run.names())
    assert seen == [("/tool", "application/json", b'{"city":"Lyon"}')]
    end = run.of("tool_end")[0]
    assert end["isError"] is False
    assert json.loads(end["result"]) == {"city": "Lyon", "temperature": 21}
    assert tool_messages(fake.requests[1].body) == {"c_web": end["result"]}


@pytest.mark.parametrize(
    ("tool", "expected"),
    [
        ("web_redirect", "HTTP 302"),
        ("web_big", f"more than {MAX_WEB_BYTES} bytes"),
        ("web_fail", "HTTP 500"),
    ],
)
async def test_http_tool_failures_are_error_results(tool: str, expected: str) -> None:
    async with web_tools() as (url, seen), FakeOpenAI() as fake:
        async with running(tools_config(fake, url)) as lean:
            fake.push(tool_call_stream([("c1", tool, '{"q": 1}')]), text_stream(ANSWER))
            run = await run_scene(lean)
    assert_order(run.names())
    end = run.of("tool_end")[0]
    assert end["isError"] is True and expected in end["result"]
    assert tool in end["result"]
    assert [path for path, _, _ in seen] == ["/" + tool.removeprefix("web_")]  # no redirect hop
    assert run.of("done")[0]["text"] == ANSWER


async def test_http_tool_answer_arriving_in_pieces_is_read_whole() -> None:
    async with web_tools() as (url, _), FakeOpenAI() as fake:
        async with running(tools_config(fake, url)) as lean:
            fake.push(tool_call_stream([("c1", "web_split", "{}")]), text_stream(ANSWER))
            run = await run_scene(lean)
    end = run.of("tool_end")[0]
    assert end["result"] == SPLIT_BODY.decode() and end["isError"] is False


# --- client tools --------------------------------------------------------------------------------

ASK = ("call_ask", "ask_user", '{"question": "Which city?"}')


async def test_client_tool_over_http_waits_for_the_answer() -> None:
    async with FakeOpenAI() as fake, running(tools_config(fake)) as lean:
        fake.push(tool_call_stream([ASK]), text_stream(ANSWER))
        async with aiohttp.ClientSession() as http:
            async with scene_run(lean, http, conversationId="ask") as run:
                run_id = (await run.until("start"))[1]["runId"]
                _, waiting, _ = await run.until("waiting")
                assert waiting["toolCallId"] == "call_ask" and waiting["name"] == "ask_user"
                assert waiting["arguments"] == '{"question": "Which city?"}'
                await asyncio.sleep(0.2)
                assert len(fake.requests) == 1  # the model is not asked again meanwhile

                results = f"{lean.url}/v1/runs/{run_id}/tool-results"
                async with http.post(results, json={"toolCallId": "nope", "result": "x"}) as r:
                    assert r.status == 400
                    assert "nope" in (await r.json())["error"]["message"]
                unknown = f"{lean.url}/v1/runs/run_unknown/tool-results"
                async with http.post(unknown, json={"toolCallId": "call_ask", "result": "x"}) as r:
                    assert r.status == 404
                async with http.post(
                    results, json={"toolCallId": "call_ask", "result": "Paris"}
                ) as r:
                    assert r.status in (200, 202)

                after = await run.next()
                assert after is not None and after[0] == "tool_end"
                await run.rest()
        row = await saved_answer(lean, "ask")
    names = run.names()
    assert_order(names)
    assert names[: names.index("tool_end") + 1] == ["start", "tool_start", "waiting", "tool_end"]
    end = run.of("tool_end")[0]
    assert end["toolCallId"] == "call_ask" and end["result"] == "Paris"
    assert end["isError"] is False and end["durationMs"] >= 200
    assert tool_messages(fake.requests[1].body) == {"call_ask": "Paris"}
    assert run.of("done")[0]["text"] == ANSWER
    assert row["toolCalls"][0]["result"] == "Paris" and row["status"] == "complete"


def text_then_tool(text: str, calls: list[tuple[str, str, str]]) -> Stream:
    """One model turn that says something, then asks for tools."""
    head = text_stream(text).events[:-3]  # without its finish, usage and [DONE]
    return Stream(events=[*head, *tool_call_stream(calls).events])


@pytest.mark.parametrize(("said", "status"), [("", "error"), ("Let me ask you. ", "incomplete")])
async def test_client_tool_unanswered_times_out(said: str, status: str) -> None:
    config_limits = "client_tool_timeout = 0.5"
    async with FakeOpenAI() as fake, running(tools_config(fake, limits=config_limits)) as lean:
        fake.push(text_then_tool(said, [ASK]) if said else tool_call_stream([ASK]))
        run = await run_scene(lean, conversationId="late")
        row = await saved_answer(lean, "late")
        async with aiohttp.ClientSession() as http:
            run_id = run.of("start")[0]["runId"]
            answer = {"toolCallId": "call_ask", "result": "too late"}
            async with http.post(f"{lean.url}/v1/runs/{run_id}/tool-results", json=answer) as r:
                assert r.status == 404  # the run is over
    names = run.names()
    assert_order(names, last="error")
    assert "tool_end" not in names and "waiting" in names
    error = run.of("error")[0]
    assert error["code"] == "tool_timeout" and "ask_user" in error["message"]
    waited = run.seen[-1][2] - run.seen[names.index("waiting")][2]
    assert 0.4 <= waited < 2.0
    assert len(fake.requests) == 1
    assert row["status"] == status and row["content"] == said
    assert row["errorCode"] == "tool_timeout"


async def test_a_timed_out_client_call_is_saved_as_an_error() -> None:
    config_limits = "client_tool_timeout = 0.3"
    async with FakeOpenAI() as fake, running(tools_config(fake, limits=config_limits)) as lean:
        fake.push(tool_call_stream([ASK]))
        run = await run_scene(lean, conversationId="late")
        row = await saved_answer(lean, "late")
    assert run.of("error")[0]["code"] == "tool_timeout"
    call = row["toolCalls"][0]
    assert call["id"] == "call_ask" and call["isError"] is True and call["result"] != ""


async def test_client_tool_over_websocket() -> None:
    async with FakeOpenAI() as fake, running(tools_config(fake)) as lean:
        fake.push(tool_call_stream([ASK]), text_stream(ANSWER))
        frames: list[dict[str, Any]] = []
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(f"{lean.url}/v1/ws") as ws,
        ):
            await ws.send_json(
                {"type": "run", "runId": "r1", "scene": "assistant", "message": "Where?"}
            )

            async def until(kind: str) -> dict[str, Any]:
                async with asyncio.timeout(10):
                    while True:
                        frame: dict[str, Any] = json.loads(await ws.receive_str())
                        frames.append(frame)
                        if frame["type"] == kind:
                            return frame

            waiting = await until("waiting")
            assert waiting["runId"] == "r1" and waiting["toolCallId"] == "call_ask"
            assert waiting["arguments"] == ASK[2]
            # A wrong id gets an error frame for the run; the socket and the run go on.
            await ws.send_json(
                {"type": "tool_result", "runId": "r1", "toolCallId": "nope", "result": 1}
            )
            refused = await until("error")
            assert refused["runId"] == "r1" and refused["code"] == "bad_request"
            await ws.send_json(
                {"type": "tool_result", "runId": "r1", "toolCallId": "call_ask", "result": "Oslo"}
            )
            done = await until("done")
    types = [f["type"] for f in frames]
    assert "delta" not in types[: types.index("tool_end")]
    end = next(f for f in frames if f["type"] == "tool_end")
    assert end["result"] == "Oslo" and end["isError"] is False
    assert done["text"] == ANSWER and done["runId"] == "r1"
    assert tool_messages(fake.requests[1].body) == {"call_ask": "Oslo"}


# --- rounds -------------------------------------------------------------------------------------


def keeps_asking(*, obeys_tool_choice: bool) -> Any:
    """A model that asks for the clock every time (unless told `tool_choice: none`)."""

    def behaviour(body: Any) -> Stream:
        if obeys_tool_choice and body.get("tool_choice") == "none":
            return text_stream(ANSWER)
        n = len(body["messages"])
        return tool_call_stream([(f"call_{n}", "clock", "{}")])

    return behaviour


async def test_max_tool_rounds_the_last_request_must_answer_in_words() -> None:
    async with FakeOpenAI() as fake, running(tools_config(fake)) as lean:
        fake.default = keeps_asking(obeys_tool_choice=True)
        run = await run_scene(lean, conversationId="rounds")
        row = await saved_answer(lean, "rounds")
    assert_order(run.names())
    assert [r.body.get("tool_choice") for r in fake.requests] == [None, None, "none"]
    assert all("tools" in r.body for r in fake.requests)
    assert len(run.of("tool_start")) == len(run.of("tool_end")) == 2  # max_tool_rounds = 2
    assert run.of("done")[0]["text"] == ANSWER
    assert [c["name"] for c in row["toolCalls"]] == ["clock", "clock"]


@pytest.mark.parametrize(("scene", "rounds"), [("assistant", 2), ("no_rounds", 0)])
async def test_a_model_ignoring_tool_choice_none_gets_no_extra_round(
    scene: str, rounds: int
) -> None:
    async with FakeOpenAI() as fake, running(tools_config(fake)) as lean:
        fake.default = keeps_asking(obeys_tool_choice=False)
        run = await run_scene(lean, scene=scene, conversationId="greedy")
        row = await saved_answer(lean, "greedy")
    assert len(fake.requests) == rounds + 1
    assert run.names()[-1] == "done"
    assert len(run.of("tool_start")) == rounds
    assert len(row["toolCalls"]) == rounds


async def test_max_tool_rounds_zero_forbids_tools_on_the_first_request() -> None:
    async with FakeOpenAI() as fake, running(tools_config(fake)) as lean:
        fake.default = keeps_asking(obeys_tool_choice=True)
        run = await run_scene(lean, scene="no_rounds")
    assert_order(run.names())
    assert len(fake.requests) == 1
    assert fake.requests[0].body.get("tool_choice") == "none"
    assert "tool_start" not in run.names()
    assert run.of("done")[0]["text"] == ANSWER


# --- the saved answer ----------------------------------------------------------------------------


async def test_saved_answer_holds_every_rounds_tool_calls() -> None:
    async with FakeOpenAI() as fake, running(tools_config(fake)) as lean:
        fake.push(
            tool_call_stream([("r1_clock", "clock", "{}"), ("r1_boom", "boom", "{}")]),
            tool_call_stream([("r2_add", "add", '{"a": 1, "b": 1}')]),
            text_stream(ANSWER),
        )
        run = await run_scene(lean, conversationId="saved")
        row = await saved_answer(lean, "saved")
    assert_order(run.names())
    calls = row["toolCalls"]
    assert [(c["id"], c["name"], c["arguments"]) for c in calls] == [
        ("r1_clock", "clock", "{}"),
        ("r1_boom", "boom", "{}"),
        ("r2_add", "add", '{"a": 1, "b": 1}'),
    ]
    assert [c["isError"] for c in calls] == [False, True, False]
    assert calls[0]["result"] == toolbox.CLOCK and calls[2]["result"] == '{"sum":2}'
    assert "always fails" in calls[1]["result"]
    assert all(isinstance(c["durationMs"], int | float) and c["durationMs"] >= 0 for c in calls)
    events = {e["toolCallId"]: e for e in run.of("tool_end")}
    assert all(events[c["id"]]["result"] == c["result"] for c in calls)
    assert row["content"] == ANSWER and row["status"] == "complete"


async def test_usage_counts_every_model_call_of_the_run() -> None:
    async with FakeOpenAI() as fake, running(tools_config(fake)) as lean:
        # 3 argument fragments: 3 completion tokens; then one token per word of the answer
        fake.push(tool_call_stream([("c1", "add", '{"a": 2, "b": 3}')]), text_stream(ANSWER))
        run = await run_scene(lean, conversationId="usage")
        row = await saved_answer(lean, "usage")
    words = len(ANSWER.split())
    assert run.of("done")[0]["usage"] == {
        "promptTokens": 2 * PROMPT_TOKENS,
        "completionTokens": 3 + words,
    }
    assert (row["promptTokens"], row["completionTokens"]) == (2 * PROMPT_TOKENS, 3 + words)


# --- check-config ---------------------------------------------------------------------------------

CHECK_CONFIG = """
[store]
path = {store}

[provider.local]
kind = demo

[model.default]
provider = local
upstream_model = demo

[tool.broken]
kind = python
function = {function}

[scene.assistant]
model = default
tools = broken
"""


@pytest.mark.parametrize(
    ("function", "code", "said"),
    [
        ("tests.no_such_module:clock", 2, "[tool.broken] function"),
        ("tests.toolbox:no_such_function", 2, "[tool.broken] function"),
        ("tests.toolbox:NOT_A_FUNCTION", 2, "a callable"),
        ("tests.toolbox:clock", 0, "ok"),
    ],
)
def test_check_config_imports_python_tools(function: str, code: int, said: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.ini"
        path.write_text(CHECK_CONFIG.format(store=Path(tmp) / "lean.db", function=function))
        done = subprocess.run(
            [sys.executable, "-m", "lean", "check-config", str(path)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert done.returncode == code, done.stderr
    out = done.stderr if code else done.stdout
    assert said in out
    if code:
        assert "[tool.broken] function" in out and function in out
        assert "Traceback" not in out


# --- bounds: tool threads, result sizes, a blocked loop (issue 10, items 8 and 9) -------------

MAX_PY_BYTES = 1000
BOUNDED_TOOLS = f"""
[tool.clock]
kind = python
function = tests.toolbox:clock

[tool.stuck]
kind = python
function = tests.toolbox:stuck
timeout = 0.2

[tool.huge]
kind = python
function = tests.toolbox:huge
max_response_bytes = {MAX_PY_BYTES}

[tool.freeze]
kind = python
function = tests.toolbox:freeze

[scene.bounded]
model = default
template = {{message}}
tools = clock, stuck, huge, freeze
"""


async def metric(lean: Server, name: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(f"{lean.url}/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not in /metrics")


async def test_overrunning_sync_tools_keep_their_threads_and_new_calls_are_refused() -> None:
    """tool_threads = 2: two `stuck` calls time out but hold both threads; the third call of
    the round and a later run's sync tool get an error result at once, and the runs go on.
    When the stuck calls return, sync tools run again."""
    toolbox.RELEASE = release = threading.Event()
    stuck = [("s1", "stuck", "{}"), ("s2", "stuck", "{}"), ("s3", "stuck", "{}")]
    try:
        async with FakeOpenAI() as fake:
            config = lean_config(fake.base_url, limits="tool_threads = 2", extra=BOUNDED_TOOLS)
            async with running(config) as lean:
                fake.push(tool_call_stream(stuck), text_stream(ANSWER))
                first = await run_scene(lean, scene="bounded")
                fake.push(tool_call_stream([("c1", "clock", "{}")]), text_stream(ANSWER))
                second = await run_scene(lean, scene="bounded")
                busy = await metric(lean, "lean_tool_threads_busy")
                overruns = await metric(lean, "lean_tool_overruns_total")
                refusals = await metric(lean, "lean_tool_refusals_total")
                release.set()
                for _ in range(100):  # the threads return as soon as they are released
                    if await metric(lean, "lean_tool_threads_busy") == 0:
                        break
                    await asyncio.sleep(0.02)
                fake.push(tool_call_stream([("c2", "clock", "{}")]), text_stream(ANSWER))
                third = await run_scene(lean, scene="bounded")
    finally:
        release.set()
    for run in (first, second, third):
        assert_order(run.names())
        assert run.of("done")[0]["text"] == ANSWER
    ends = {e["toolCallId"]: e for e in first.of("tool_end")}
    timed_out = [i for i, e in ends.items() if "timed out after 0.2 s" in e["result"]]
    refused = [i for i, e in ends.items() if "all 2 tool threads are busy" in e["result"]]
    assert len(timed_out) == 2 and len(refused) == 1
    assert all(e["isError"] for e in ends.values())
    clock = second.of("tool_end")[0]
    assert clock["isError"] is True
    assert "all 2 tool threads are busy (2 with calls past their timeout)" in clock["result"]
    assert "tool_threads" in clock["result"]
    assert (busy, overruns, refusals) == (2, 2, 2)
    again = third.of("tool_end")[0]
    assert again["isError"] is False and again["result"] == toolbox.CLOCK


@pytest.mark.parametrize("structured", [False, True])
async def test_a_python_tool_result_over_max_response_bytes_is_an_error_result(
    structured: bool,
) -> None:
    flag = ', "structured": true' if structured else ""
    calls = [
        ("small", "huge", '{"size": 10' + flag + "}"),
        ("big", "huge", '{"size": 50000' + flag + "}"),  # 100 KB in UTF-8
    ]
    async with (
        FakeOpenAI() as fake,
        running(lean_config(fake.base_url, extra=BOUNDED_TOOLS)) as lean,
    ):
        fake.push(tool_call_stream(calls), text_stream(ANSWER))
        run = await run_scene(lean, scene="bounded", conversationId="huge")
        row = await saved_answer(lean, "huge")
    assert_order(run.names())
    ends = {e["toolCallId"]: e for e in run.of("tool_end")}
    assert ends["small"]["isError"] is False
    assert "é" * 10 in ends["small"]["result"]
    big = ends["big"]
    assert big["isError"] is True
    assert f"more than its max_response_bytes ({MAX_PY_BYTES})" in big["result"]
    assert len(big["result"]) < 300
    sent = tool_messages(fake.requests[1].body)  # the model sees the error, not the 100 KB
    assert sent["big"] == big["result"]
    assert len(json.dumps(row)) < 5000  # nor is the big result saved


async def test_an_async_tool_that_blocks_the_loop_is_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="lean.upkeep")
    async with (
        FakeOpenAI() as fake,
        running(lean_config(fake.base_url, extra=BOUNDED_TOOLS)) as lean,
    ):
        fake.push(tool_call_stream([("f1", "freeze", "{}")]), text_stream(ANSWER))
        run = await run_scene(lean, scene="bounded")
        await asyncio.sleep(0.3)  # one more tick of the watch after the freeze
        stalls = await metric(lean, "lean_loop_stalls_total")
    assert_order(run.names())
    assert run.of("tool_end")[0]["result"] == "thawed"
    assert stalls >= 1
    warnings = [r.getMessage() for r in caplog.records if r.name == "lean.upkeep"]
    assert any("event loop was held for" in m and "async tool" in m for m in warnings)
