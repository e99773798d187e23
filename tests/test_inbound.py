"""What clients send, against lean for real (issue 10, items 7 and 9): JSON nested
100,000 levels deep is a 400 (an error frame on the WebSocket, which stays open with its
other runs going), and ids and echoed values are bounded."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.fakes import FakeOpenAI, text_stream
from tests.support import chat_body, lean_config, running

pytestmark = pytest.mark.timeout(30)

SCENE = "[scene.chat]\nmodel = default\ntemplate = {message}\n"
LEVELS = 100_000
DEEP = b"[" * LEVELS + b"]" * LEVELS
DEADLINE = 10.0


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as upstream:
        yield upstream


async def post(http: aiohttp.ClientSession, url: str, body: bytes) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"}
    async with http.post(url, data=body, headers=headers) as resp:
        return resp.status, json.loads(await resp.read())


async def test_deeply_nested_json_is_a_400_naming_it_on_every_json_endpoint(
    fake: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    chat = b'{"model": "default", "messages": [{"role": "user", "content": %b}]}'
    bodies = {
        "/v1/chat/completions": chat,
        "/v1/scenes/chat/stream": b'{"message": %b}',  # typed fields: refused at the first "["
        "/v1/runs/r1/tool-results": b'{"toolCallId": "call_1", "result": %b}',
    }
    caplog.set_level(logging.INFO)
    async with running(lean_config(fake.base_url, extra=SCENE)) as lean:
        async with aiohttp.ClientSession() as http:
            for path, body in bodies.items():
                for deep in (DEEP, b"[" * LEVELS):  # closed or not: the same answer
                    status, answer = await post(http, lean.url + path, body % deep)
                    assert status == 400, path
                    assert answer["error"]["code"] == "bad_request"
                    if "scenes" not in path:
                        assert "nested too deeply" in answer["error"]["message"]
    assert fake.requests == []
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_deeply_nested_frame_gets_an_error_frame_and_the_socket_and_its_runs_go_on(
    fake: FakeOpenAI,
) -> None:
    answer = text_stream("one two three four five six")
    answer.delay = 0.05
    fake.push(answer)
    async with running(lean_config(fake.base_url, extra=SCENE)) as lean:
        async with aiohttp.ClientSession() as http, http.ws_connect(lean.url + "/v1/ws") as ws:
            await ws.send_json({"type": "run", "runId": "r1", "scene": "chat", "message": "Hi"})
            assert (await ws.receive_json(timeout=DEADLINE))["type"] == "start"
            deep = b'{"type": "tool_result", "runId": "r1", "toolCallId": "c", "result": %b}'
            await ws.send_bytes(deep % DEEP)
            frames = []
            while not any(f["type"] == "done" for f in frames):
                frames.append(await ws.receive_json(timeout=DEADLINE))
            errors = [f for f in frames if f["type"] == "error"]
            assert len(errors) == 1
            assert errors[0]["runId"] is None
            assert "nested too deeply" in errors[0]["message"]
            done = [f for f in frames if f["type"] == "done"]
            assert done[0]["runId"] == "r1"
            assert done[0]["text"] == "one two three four five six"
            assert not ws.closed


async def test_a_huge_run_id_is_refused_naming_it_not_echoed(fake: FakeOpenAI) -> None:
    huge = "r" * 500_000
    async with (
        running(lean_config(fake.base_url, extra=SCENE)) as lean,
        aiohttp.ClientSession() as http,
    ):
        async with http.ws_connect(lean.url + "/v1/ws") as ws:
            for frame in (
                {"type": "run", "runId": huge, "scene": "chat", "message": "Hi"},
                {"type": "run", "runId": "a\nb", "scene": "chat", "message": "Hi"},
                {"type": "tool_result", "runId": "r1", "toolCallId": "c" * 200, "result": 1},
            ):
                await ws.send_json(frame)
                message = await ws.receive(timeout=DEADLINE)
                assert len(message.data) < 2000
                error = json.loads(message.data)
                assert error["type"] == "error"
                assert error["runId"] in (None, "r1")
                assert error["code"] == "bad_request"
                assert "runId" in error["message"] or "toolCallId" in error["message"]
            # an id of 128 characters is fine
            await ws.send_json(
                {"type": "run", "runId": "r" * 128, "scene": "chat", "message": "Hi"}
            )
            start = await ws.receive_json(timeout=DEADLINE)
            assert (start["type"], start["runId"]) == ("start", "r" * 128)
            await fake.wait_request(0)
        async with http.post(
            lean.url + "/v1/runs/r1/tool-results", json={"toolCallId": "c" * 200, "result": 1}
        ) as resp:
            assert resp.status == 400
            assert "toolCallId" in (await resp.json())["error"]["message"]
    assert len(fake.requests) == 1


async def test_a_huge_model_name_or_path_is_not_echoed_whole(fake: FakeOpenAI) -> None:
    model = "m" * 900_000
    async with running(lean_config(fake.base_url, extra=SCENE)) as lean:
        async with aiohttp.ClientSession() as http:
            async with http.post(
                lean.url + "/v1/chat/completions", json=chat_body(model=model)
            ) as resp:
                assert resp.status == 404
                body = await resp.read()
                assert len(body) < 1000
                assert b"mmmm" in body  # the start of what was asked is still shown
            for path in (
                "/v1/runs/" + "x" * 6000 + "/cancel",
                "/v1/conversations/" + "y" * 6000 + "/messages",
            ):
                method = http.post if path.endswith("cancel") else http.get
                async with method(lean.url + path) as resp:
                    assert resp.status == 404
                    assert len(await resp.read()) < 1000
            async with http.post(
                lean.url + "/v1/chat/completions",
                json=chat_body(messages=[{"role": "r" * 100_000, "content": "Hi"}]),
            ) as resp:
                assert resp.status == 400
                body = await resp.read()
                assert len(body) < 1000
                assert b"messages[0].role" in body  # what was cut is the value, not the field
    assert fake.requests == []
