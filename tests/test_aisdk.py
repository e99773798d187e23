"""The real AI SDK reads lean's UI message stream (docs/protocol.md §6): tests/aisdk/chat.mjs
runs the `ai` package's Chat (what `useChat` wraps) with its DefaultChatTransport against
lean's `POST /v1/scenes/{scene}/ui`, answers a client tool from `onToolCall`, asks for a
resume (lean: 204), and prints the chat; or, as a page reloaded mid-answer, resumes a chat
whose answer is running. lean runs in-process against FakeOpenAI.

Skips, saying why, without node or tests/aisdk/node_modules (`npm ci --prefix tests/aisdk`,
which `make test` and .ci/run do; nothing is downloaded at test time).
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from lean.app import Server
from tests import toolbox
from tests.fakes import FakeOpenAI, Reply, text_stream, tool_call_stream
from tests.support import lean_config, running

HERE = Path(__file__).resolve().parent / "aisdk"
NODE = shutil.which("node")
MISSING = (
    "node is missing"
    if NODE is None
    else "tests/aisdk/node_modules is missing (npm ci --prefix tests/aisdk)"
    if not (HERE / "node_modules" / "ai").is_dir()
    else None
)
pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.one_loop,  # node is the client; one event loop for lean is enough
    pytest.mark.skipif(MISSING is not None, reason=f"AI SDK tests: {MISSING}"),
]

SCENES = """
[tool.clock]
kind = python
function = tests.toolbox:clock
description = The current time in ISO 8601

[tool.ask_user]
kind = client
description = Ask the user a question
parameters = {"type": "object", "properties": {"question": {"type": "string"}}}

[scene.helper]
model = default
template = {message}
tools = clock, ask_user
max_tool_rounds = 2
"""


async def chat(lean: Server, chat_id: str, text: str, tool_answer: str = "") -> dict[str, Any]:
    """What the AI SDK's Chat holds after sending `text` to the helper scene."""
    assert NODE is not None
    args = [str(HERE / "chat.mjs"), lean.url, "helper", chat_id, text]
    process = await asyncio.create_subprocess_exec(
        NODE,
        *args,
        *([tool_answer] if tool_answer else []),
        cwd=HERE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(40):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, err.decode()[-3000:]
    result: dict[str, Any] = json.loads(out)
    return result


async def test_the_ai_sdk_assembles_text_tools_and_a_client_tool_answer() -> None:
    answer = text_stream("It is late in Paris.", reasoning="Both tools answered.")
    answer.first_byte_delay = 0.35  # lean's `: ping` comments go through the AI SDK's reader
    async with (
        FakeOpenAI() as fake,
        running(lean_config(fake.base_url, extra=SCENES, server="ping_interval = 0.1")) as lean,
    ):
        fake.push(
            tool_call_stream([("call_clock", "clock", "{}")]),
            tool_call_stream([("call_ask", "ask_user", '{"question": "Which city?"}')]),
            answer,
        )
        seen = await chat(lean, "aisdkChat1", "Time and city?", tool_answer="Paris")
        third = await fake.wait_request(2)
    assert seen["status"] == "ready" and seen["error"] is None, seen
    assert seen["statusAfterResume"] == "ready"  # the resume got 204: nothing changed
    assert seen["errors"] == []
    assert seen["finishes"] == [{"isAbort": False, "isError": False, "isDisconnect": False}]
    user, answer = seen["messages"]
    assert user["role"] == "user" and user["parts"] == [{"type": "text", "text": "Time and city?"}]
    assert answer["role"] == "assistant"
    assert answer["id"] == "helper:aisdkChat1:1"
    assert answer["metadata"]["runId"].startswith("run_")
    assert answer["metadata"]["finishReason"] == "stop"
    kinds = [part["type"] for part in answer["parts"]]
    assert kinds == [
        "step-start",
        "dynamic-tool",  # clock: lean ran it
        "step-start",
        "tool-ask_user",  # the client's tool: onToolCall answered it
        "step-start",
        "reasoning",
        "text",
    ]
    clock, ask = answer["parts"][1], answer["parts"][3]
    assert clock["toolName"] == "clock" and clock["toolCallId"] == "call_clock"
    assert clock["state"] == "output-available" and clock["output"] == toolbox.CLOCK
    assert ask["state"] == "output-available"
    assert ask["input"] == {"question": "Which city?"} and ask["output"] == "Paris"
    assert [call["toolName"] for call in seen["toolCalls"]] == ["ask_user"]  # not clock
    assert answer["parts"][5]["text"] == "Both tools answered."
    assert answer["parts"][6] == {"type": "text", "text": "It is late in Paris.", "state": "done"}
    assert third.body["messages"][-1]["content"] == "Paris"  # the model got the answer


async def test_an_error_after_the_first_byte_is_the_chat_s_error() -> None:
    async with FakeOpenAI() as fake, running(lean_config(fake.base_url, extra=SCENES)) as lean:
        fake.default = lambda body: Reply(status=400, body={"error": {"message": "no such model"}})
        seen = await chat(lean, "aisdkChat2", "Hello?")
    assert seen["status"] == "error"
    assert "no such model" in seen["error"]
    assert seen["errors"] == [seen["error"]]
    assert seen["finishes"] == [{"isAbort": False, "isError": True, "isDisconnect": False}]
    answer = seen["messages"][-1]
    assert answer["metadata"]["error"]["code"] == "bad_request"


async def test_the_ai_sdk_resumes_a_running_answer_after_a_reload() -> None:
    """useChat's `resume: true` after a reload: the page left mid-answer (lean keeps the run
    for its resume_grace) and a new Chat of that id assembles the whole answer from lean's
    replay of its start, then the live parts."""
    words = " ".join(f"w{i}" for i in range(40))
    answer = text_stream(words)
    answer.delay = 0.03
    async with FakeOpenAI() as fake, running(lean_config(fake.base_url, extra=SCENES)) as lean:
        fake.push(answer)
        async with aiohttp.ClientSession() as http:
            body = {
                "id": "aisdkChat3",
                "messages": [
                    {"id": "u1", "role": "user", "parts": [{"type": "text", "text": "Go"}]}
                ],
            }
            async with http.post(f"{lean.url}/v1/scenes/helper/ui", json=body) as resp:
                assert resp.status == 200
                for _ in range(4):  # start, start-step, text-start, a delta: then the reload
                    await resp.content.readuntil(b"\n\n")
        seen = await chat(lean, "aisdkChat3", "--resume")
    assert seen["status"] == "ready" and seen["error"] is None, seen
    assert seen["errors"] == []
    assert seen["finishes"] == [{"isAbort": False, "isError": False, "isDisconnect": False}]
    (message,) = seen["messages"]  # the reloaded page had nothing: the answer alone
    assert message["role"] == "assistant" and message["id"] == "helper:aisdkChat3:1"
    assert message["metadata"]["finishReason"] == "stop"
    assert message["parts"] == [
        {"type": "step-start"},
        {"type": "text", "text": words, "state": "done"},
    ]
