"""The real Codex CLI against lean (README, "Codex CLI"): `codex exec` with lean as a custom
provider (`wire_api = "responses"`), the fake upstream behind lean answering with a tool
call and then text. Codex runs the command itself and fails the turn unless the stream
ends in `response.completed`.

Codex is a 400 MB npm package, not one of lean's dependencies: these tests run when
`LEAN_CODEX` names its binary (`npm install @openai/codex` somewhere, then
`LEAN_CODEX=/that/place/node_modules/.bin/codex`), and are skipped otherwise."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from tests.fakes import FakeOpenAI, text_stream, tool_call_stream
from tests.support import lean_config, running

CODEX = os.environ.get("LEAN_CODEX", "")

pytestmark = [
    pytest.mark.skipif(not CODEX, reason="LEAN_CODEX does not name a Codex CLI binary"),
    pytest.mark.one_loop,
    pytest.mark.timeout(90),
]


async def codex_exec(url: str, home: Path, prompt: str) -> list[dict[str, object]]:
    """`codex exec --json PROMPT` against lean at `url`; its JSON events."""
    (home / "config.toml").write_text(
        'model = "default"\nmodel_provider = "lean"\n'
        "[model_providers.lean]\n"
        f'name = "lean"\nbase_url = "{url}/v1"\nwire_api = "responses"\nenv_key = "LEAN_TOKEN"\n'
    )
    env = {**os.environ, "CODEX_HOME": str(home), "LEAN_TOKEN": "unused"}
    proc = await asyncio.create_subprocess_exec(
        CODEX,
        "exec",
        "--skip-git-repo-check",
        "--json",
        prompt,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env=env,
        cwd=home,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, out.decode()[-2000:]
    return [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]


async def test_codex_runs_a_tool_round_through_lean(tmp_path: Path) -> None:
    async with FakeOpenAI() as fake:
        call = ("call_1", "exec_command", json.dumps({"cmd": "echo lean-was-here"}))
        fake.push(tool_call_stream([call]), text_stream("It printed lean-was-here."))
        async with running(lean_config(fake.base_url)) as lean:
            events = await codex_exec(lean.url, tmp_path, "Run echo")
    items = [e["item"] for e in events if e["type"] == "item.completed"]
    commands = [i for i in items if i["type"] == "command_execution"]
    assert commands and "lean-was-here" in str(commands[0]["aggregated_output"])
    assert items[-1] == {**items[-1], "type": "agent_message", "text": "It printed lean-was-here."}
    assert events[-1]["type"] == "turn.completed"
    second = fake.requests[-1].body["messages"]
    assert second[-1]["role"] == "tool" and "lean-was-here" in second[-1]["content"]


async def test_codex_routes_a_sub_agent_tool_by_its_namespace(tmp_path: Path) -> None:
    """Codex's sub-agent tools come as a `namespace` group: lean names the namespace on the
    call, and Codex runs its tool (which refuses the made-up agent id) instead of answering
    "unsupported call"."""
    async with FakeOpenAI() as fake:
        call = ("call_1", "close_agent", json.dumps({"target": "no-such-agent"}))
        fake.push(tool_call_stream([call]), text_stream("Done."))
        async with running(lean_config(fake.base_url)) as lean:
            events = await codex_exec(lean.url, tmp_path, "Close the agent")
    assert events[-1]["type"] == "turn.completed"
    output = fake.requests[-1].body["messages"][-1]
    assert output["role"] == "tool" and "unsupported call" not in output["content"]
