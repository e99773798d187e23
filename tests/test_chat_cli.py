"""`lean chat` (lean/chat.py) as a user runs it: a real `python -m lean chat` process
against a real lean with the built-in demo provider, over SSE and over one WebSocket.
What it printed is checked against what lean saved (`GET /v1/conversations/{id}/messages`).
"""

from __future__ import annotations

import asyncio
import os
import pty
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from lean.app import Server
from lean.config import Config
from tests.fakes import FakeOpenAI, free_port, text_stream, tool_call_stream
from tests.support import lean_config, running
from tests.test_tools import tool_messages
from tests.toolbox import CLOCK

pytestmark = pytest.mark.timeout(30)

PIPE = asyncio.subprocess.PIPE
ROOT = Path(__file__).resolve().parent.parent
SCENE = "[scene.chat]\nmodel = default\ntemplate = {message}\n"
AUTH = "[auth]\ntokens_env = LEAN_TOKENS\n"
INTRO = "Hello! This is lean's built-in demo provider, streaming"
DEADLINE = 15.0  # seconds one `lean chat` session may take before the test fails
MODES = pytest.mark.parametrize("mode", [(), ("--ws",)], ids=["sse", "ws"])


def demo_config(delay: float = 0.005, *, server: str = "", extra: str = "", **more: Any) -> Config:
    # The test provider's defaults (base_url, api_key_env = UP_KEY) stay: the demo kind
    # accepts and ignores them.
    return lean_config(
        provider=f"kind = demo\ndemo_delay = {delay}", server=server, extra=SCENE + extra, **more
    )


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        yield s


@asynccontextmanager
async def lean_chat(
    server: Server, *args: str, env: dict[str, str] | None = None, stdout: int = PIPE
) -> AsyncIterator[asyncio.subprocess.Process]:
    environ = {k: v for k, v in os.environ.items() if k not in ("LEAN_TOKEN", "LEAN_TOKENS")}
    environ.update(env or {})
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "lean",
        "chat",
        "--url",
        server.url,
        *args,
        stdin=PIPE,
        stdout=stdout,
        stderr=PIPE,
        env=environ,
        cwd=ROOT,
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.communicate()


async def finish(proc: asyncio.subprocess.Process, eof: bool = True) -> tuple[int, str, str]:
    """Close stdin (`eof`), wait for the exit: (exit code, the rest of stdout, stderr)."""
    assert proc.stdin is not None
    if eof:
        proc.stdin.close()  # communicate() without input leaves stdin open (Python 3.11)
    async with asyncio.timeout(DEADLINE):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, (out or b"").decode(), err.decode()


async def one_shot(server: Server, *args: str, **more: Any) -> tuple[int, str, str]:
    async with lean_chat(server, *args, **more) as proc:
        return await finish(proc)


def conversation_ids(stderr: str) -> list[str]:
    return re.findall(r"^conversation: (\S+)$", stderr, re.MULTILINE)


async def rows(session: aiohttp.ClientSession, server: Server, cid: str) -> list[dict[str, Any]]:
    url = f"{server.url}/v1/conversations/{cid}/messages"
    async with session.get(url, headers={"Authorization": "Bearer t1"}) as resp:
        assert resp.status == 200, await resp.text()
        found: list[dict[str, Any]] = (await resp.json())["messages"]
    return found


def auth_config(**more: Any) -> Config:
    return demo_config(extra=AUTH, environ={"LEAN_TOKENS": "t1"}, **more)


async def test_one_message_prints_the_whole_answer_and_exits_0(
    session: aiohttp.ClientSession,
) -> None:
    async with running(auth_config()) as server:
        # SSE and WebSocket side by side (one lean, two processes): the same answer.
        results = await asyncio.gather(
            *(
                one_shot(server, *mode, "--show-ids", f"hello {name}", env={"LEAN_TOKENS": "t1"})
                for name, mode in (("sse", ()), ("ws", ("--ws",)))
            )
        )
        for name, (code, out, err) in zip(("sse", "ws"), results, strict=True):
            assert code == 0, (name, err)
            (cid,) = conversation_ids(err)
            assert err == f"conversation: {cid}\n"
            user, answer = await rows(session, server, cid)
            assert (user["content"], answer["status"]) == (f"hello {name}", "complete")
            assert out == answer["content"] + "\n"
            assert out.startswith(INTRO) and f'You said: "hello {name}".' in out
            assert "\x1b[" not in out  # stdout is a pipe here: no escapes


@MODES
async def test_an_error_exits_1_with_the_message_on_stderr(mode: tuple[str, ...]) -> None:
    async with running(auth_config()) as server:
        unknown, refused = await asyncio.gather(
            one_shot(server, *mode, "--token", "t1", "--scene", "nope", "hi"),
            one_shot(server, *mode, "hi"),  # no token
        )
    assert unknown == (1, "", "lean chat: not_found: scene 'nope' does not exist\n")
    code, out, err = refused
    assert (code, out) == (1, "")
    assert err.startswith("lean chat: ") and "unauthorized" in err, err


def test_an_unreachable_lean_exits_1() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "lean", "chat", "--url", url, *mode, "hi"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for mode in ((), ("--ws",))
    ]
    for proc in procs:
        with proc:
            out, err = proc.communicate(timeout=DEADLINE)
        assert (proc.returncode, out) == (1, "")
        assert err.startswith(f"lean chat: cannot reach lean at {url}"), err


@MODES
async def test_lines_on_stdin_are_turns_of_one_conversation_until_ctrl_c(
    session: aiohttp.ClientSession, mode: tuple[str, ...]
) -> None:
    # A short heartbeat: the WebSocket client must answer pings while it waits at the prompt.
    async with (
        running(auth_config(server="ping_interval = 0.2")) as server,
        lean_chat(server, *mode, "--show-ids", "--token", "t1") as proc,
    ):
        assert proc.stdin is not None and proc.stdout is not None
        async with asyncio.timeout(DEADLINE):
            proc.stdin.write(b"first\n")
            await proc.stdin.drain()
            first = (await proc.stdout.readline()).decode()
            if mode:  # idle at the prompt past a ping and its pong deadline (0.2 + 0.1 s)
                await asyncio.sleep(0.4)
            proc.stdin.write(b"\nsecond\n")  # an empty line is no turn
            await proc.stdin.drain()
            second = (await proc.stdout.readline()).decode()
        proc.send_signal(signal.SIGINT)  # Ctrl-C at the prompt ends the session
        code, rest, err = await finish(proc, eof=False)
        assert (code, rest) == (0, ""), err
        (cid,) = conversation_ids(err)
        assert err == f"conversation: {cid}\n"  # no prompt: stdin is not a terminal
        saved = await rows(session, server, cid)
    assert [(r["role"], r["turn"], r["status"]) for r in saved] == [
        ("user", 1, "complete"),
        ("assistant", 1, "complete"),
        ("user", 2, "complete"),
        ("assistant", 2, "complete"),
    ]
    assert [saved[0]["content"], saved[2]["content"]] == ["first", "second"]
    assert [first, second] == [saved[1]["content"] + "\n", saved[3]["content"] + "\n"]
    assert 'You said: "second"' in second


@MODES
async def test_ctrl_c_cancels_the_run_and_the_session_goes_on(
    session: aiohttp.ClientSession, mode: tuple[str, ...]
) -> None:
    async with (
        running(demo_config(delay=0.05)) as server,
        lean_chat(server, *mode, "--show-ids") as proc,
    ):
        assert proc.stdin is not None and proc.stdout is not None
        printed = []
        async with asyncio.timeout(DEADLINE):
            for line in (b"first\n", b"second\n"):
                proc.stdin.write(line)
                await proc.stdin.drain()
                start = await proc.stdout.read(1)  # the answer has begun
                proc.send_signal(signal.SIGINT)
                printed.append((start + await proc.stdout.readline()).decode())
        code, rest, err = await finish(proc)  # EOF: exit 0
        assert (code, rest) == (0, ""), err
        (cid,) = conversation_ids(err)
        cancelled = "lean chat: cancelled: the run was cancelled\n"
        assert err == f"conversation: {cid}\n" + cancelled * 2
        saved = await rows(session, server, cid)
    answers = [r for r in saved if r["role"] == "assistant"]
    assert [(r["turn"], r["status"]) for r in answers] == [(1, "cancelled"), (2, "cancelled")]
    for row, line in zip(answers, printed, strict=True):
        assert line == row["content"] + "\n"  # what the user saw is what was saved
        assert line.startswith("Hello!") and "You said" not in line, line  # cut early


async def test_thinking_is_dimmed_on_a_terminal_only() -> None:
    """On a terminal, thinking is dim; in a pipe, plain. The answer starts on its own line."""
    async with FakeOpenAI() as fake:
        fake.push(*(text_stream("The answer.", reasoning="Let me think.") for _ in range(2)))
        async with running(lean_config(fake.base_url, extra=SCENE)) as server:
            code, piped, err = await one_shot(server, "hi")
            assert (code, piped, err) == (0, "Let me think.\nThe answer.\n", "")
            master, terminal = pty.openpty()
            try:
                async with lean_chat(server, "hi", stdout=terminal) as proc:
                    os.close(terminal)  # the child holds the only writer now
                    terminal = -1
                    code, _, err = await finish(proc)
                assert (code, err) == (0, "")
                shown = _read_all(master)
            finally:
                os.close(master)
                if terminal >= 0:
                    os.close(terminal)
    dim = "".join(f"\x1b[2m{word}\x1b[0m" for word in ("Let ", "me ", "think."))
    assert shown == dim + "\r\nThe answer.\r\n"  # the terminal turns \n into \r\n


def _read_all(master: int) -> str:
    """What a terminal received, once its only writer has exited."""
    data = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the other side is closed and everything was read
            break
        if not chunk:
            break
        data += chunk
    return data.decode()


# --- scene inputs, tools and the config file -------------------------------------------------

TOOLS = """
[tool.clock]
kind = python
function = tests.toolbox:clock
[tool.ask_user]
kind = client
description = Ask the user a question
[scene.helper]
model = default
template = In {words} words: {message}
tools = clock, ask_user
"""


@MODES
async def test_inputs_tools_and_a_client_tool_answered_at_the_prompt(
    session: aiohttp.ClientSession, mode: tuple[str, ...]
) -> None:
    ask = ("call_ask", "ask_user", '{"question": "Which city?"}')
    tick = ("call_clock", "clock", "{}")
    async with FakeOpenAI() as fake:
        fake.push(tool_call_stream([tick]), tool_call_stream([ask]), text_stream("Paris it is."))
        async with (
            running(lean_config(fake.base_url, extra=TOOLS)) as server,
            lean_chat(server, *mode, "--show-ids", "--scene", "helper", "--input", "words=3") as p,
        ):
            assert p.stdin is not None and p.stdout is not None and p.stderr is not None
            async with asyncio.timeout(DEADLINE):
                p.stdin.write(b"where?\n")
                await p.stdin.drain()
                shown = b""
                while b"waits for your answer]\n" not in shown:  # asked on stderr
                    shown += await p.stderr.read(1)
                p.stdin.write(b"Paris\n")  # the answer to the client tool
                await p.stdin.drain()
                answer = (await p.stdout.readline()).decode()
            code, rest, err = await finish(p)
            err = shown.decode() + err
            (cid,) = conversation_ids(err)
            async with session.get(f"{server.url}/v1/conversations/{cid}/messages") as resp:
                user, saved = (await resp.json())["messages"]
        assert (code, rest) == (0, ""), err
        assert answer == "Paris it is.\n"
        assert "[clock({})]\n" in err
        assert re.search(r"^\[clock -> 2026-\S+ \([\d.]+ ms\)\]$", err, re.MULTILINE), err
        asked = '[ask_user({"question": "Which city?"})]\n[ask_user waits for your answer]\n'
        assert asked in err
        assert re.search(r"^\[ask_user -> Paris \([\d.]+ ms\)\]$", err, re.MULTILINE), err
    # saved as typed, beside the template --input filled
    assert (user["content"], user["prompt"]) == ("where?", "In 3 words: where?")
    assert [c["result"] for c in saved["toolCalls"]] == [CLOCK, "Paris"]
    assert tool_messages(fake.requests[2].body) == {"call_clock": CLOCK, "call_ask": "Paris"}


def test_a_bad_input_flag_exits_2() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "lean", "chat", "--input", "words", "hi"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=DEADLINE,
    )
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == "lean chat: --input 'words': expected NAME=VALUE\n"


@MODES
async def test_the_url_and_token_come_from_the_config_file(
    tmp_path: Path, mode: tuple[str, ...]
) -> None:
    """Without --url and --token: where `lean serve` listens and the server's token variable."""
    async with running(auth_config()) as server:
        config = tmp_path / "config.ini"
        config.write_text(
            f"[server]\nhost = 127.0.0.1  ; a comment\nport = {server.port}\n"
            "[auth]\ntokens_env = MY_TOKENS\n"
        )
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "lean", "chat", "--config", str(config), *mode, "hi"),
            stdin=PIPE,
            stdout=PIPE,
            stderr=PIPE,
            env={**os.environ, "MY_TOKENS": " t1 , t2"},
            cwd=ROOT,
        )
        code, out, err = await finish(proc)
    assert (code, err) == (0, "")
    assert out.startswith(INTRO)
