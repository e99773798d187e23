"""lean's log: one line per run, logfmt or JSON, never a key, a prompt only when asked.

`lean serve` runs in a subprocess exactly as an operator starts it, its stderr going
to a file that is read once the process has exited (so every line is there); the
upstream is a FakeOpenAI in this process, reached with a key from the environment.
The formatters are also tested on their own with hand-made `logging.LogRecord`s.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from lean.logs import JsonFormatter, LogfmtFormatter
from tests.fakes import FakeOpenAI, Reply, completion, error_body, free_port, text_stream
from tests.support import SECRET, chat_body, content_of, read_sse_data

KEY_ENV = "LEAN_TEST_LOGS_UP_KEY"
TWO_WORDS = "Hello there."
MANY_WORDS = " ".join(f"word{i}" for i in range(200))
URL = "/v1/chat/completions"
RUN_FIELDS = {"endpoint", "model", "status", "first_token_ms", "duration_ms"}
SCENE_FIELDS = RUN_FIELDS | {"scene", "run_id", "prompt_tokens", "completion_tokens"}
TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def config_text(port: int, upstream: str, store: Path, server: str) -> str:
    return f"""
[server]
host = 127.0.0.1
port = {port}
drain_timeout = 0.5
{server}

[store]
path = {store}

[provider.up]
kind = openai
base_url = {upstream}
api_key_env = {KEY_ENV}
connect_timeout = 2
first_byte_timeout = 5
read_timeout = 5

[model.default]
provider = up
upstream_model = fake-model

[scene.chat]
model = default
template = {{message}}
"""


class Lean:
    def __init__(self, url: str) -> None:
        self.url = url
        self.lines: list[str] = []  # stderr, filled in once the process has exited


@asynccontextmanager
async def lean_serve(tmp_path: Path, fake: FakeOpenAI, server: str = "") -> AsyncIterator[Lean]:
    """`python -m lean serve` aimed at `fake`; stops it with SIGTERM and reads its stderr."""
    port = free_port()
    path = tmp_path / "config.ini"
    path.write_text(config_text(port, fake.base_url, tmp_path / "lean.db", server))
    env = {k: v for k, v in os.environ.items() if k != "LEAN_TOKENS"}
    env[KEY_ENV] = SECRET
    stderr_path = tmp_path / "stderr.log"
    with stderr_path.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "lean",
            "serve",
            "--config",
            str(path),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=stderr,
            env=env,
            cwd=tmp_path,
        )
    lean = Lean(f"http://127.0.0.1:{port}")
    try:
        async with aiohttp.ClientSession() as http, asyncio.timeout(10):
            while True:
                assert proc.returncode is None, stderr_path.read_text()
                try:
                    async with http.get(lean.url + "/healthz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.02)
        yield lean
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(5):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = stderr_path.read_text()
    assert text.endswith("\n")
    lean.lines = text[:-1].split("\n")


_PAIR = re.compile(r'([A-Za-z_][A-Za-z0-9_.]*)=("(?:[^"\\]|\\.)*"|[^\s"=]+)')


def logfmt(line: str) -> dict[str, Any]:
    """A strict logfmt reader: `key=value` pairs split by one space; quoted values are JSON."""
    fields: dict[str, Any] = {}
    pos = 0
    while pos < len(line):
        match = _PAIR.match(line, pos)
        assert match, f"not logfmt at {line[pos:]!r} in {line!r}"
        key, value = match.groups()
        assert key not in fields, f"{key} twice in {line!r}"
        fields[key] = json.loads(value) if value.startswith('"') else value
        pos = match.end()
        if pos < len(line):
            assert line[pos] == " ", line
            pos += 1
            assert pos < len(line), f"trailing space in {line!r}"
    return fields


def run_lines(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r["msg"] == "run"]


async def stream(http: aiohttp.ClientSession, lean: Lean, text: str = "Hi") -> str:
    async with http.post(lean.url + URL, json=chat_body(text)) as resp:
        assert resp.status == 200
        return content_of(await read_sse_data(resp))


async def non_stream(http: aiohttp.ClientSession, lean: Lean, text: str = "Hi") -> str:
    async with http.post(lean.url + URL, json=chat_body(text, stream=False)) as resp:
        assert resp.status == 200
        answer: str = (await resp.json())["choices"][0]["message"]["content"]
        return answer


async def scene(http: aiohttp.ClientSession, lean: Lean, message: str) -> str:
    async with http.post(f"{lean.url}/v1/scenes/chat/stream", json={"message": message}) as resp:
        assert resp.status == 200
        return await resp.text()


def check_run(line: dict[str, Any], endpoint: str, status: str = "complete") -> None:
    fields = SCENE_FIELDS if endpoint == "scene" else RUN_FIELDS
    if status != "complete":
        fields = fields - {"first_token_ms"}  # no token came: the field is absent (or null)
        # Nor any usage: the token counts are absent too, never invented zeros.
        fields = fields - {"prompt_tokens", "completion_tokens"}
    assert fields <= set(line), line
    assert line["endpoint"] == endpoint and line["model"] == "default", line
    assert line["status"] == status, line
    assert line["level"] == "info" and TIME.fullmatch(line["time"]), line
    if status == "complete":
        assert 0 <= int(line["first_token_ms"]) <= int(line["duration_ms"]) < 10_000, line


# --- lean serve: logfmt --------------------------------------------------------------------


async def test_one_run_line_per_completion_and_scene_run_and_none_per_chunk(
    tmp_path: Path,
) -> None:
    async with FakeOpenAI() as fake:
        fake.push(
            text_stream(TWO_WORDS),
            text_stream(MANY_WORDS),
            Reply(body=completion(TWO_WORDS)),
            text_stream(MANY_WORDS),
        )
        async with lean_serve(tmp_path, fake) as lean, aiohttp.ClientSession() as http:
            assert await stream(http, lean, "private-alpha") == TWO_WORDS
            assert await stream(http, lean, "private-beta") == MANY_WORDS
            assert await non_stream(http, lean, "private-gamma") == TWO_WORDS
            assert "event: done" in await scene(http, lean, "private-delta")
    assert fake.requests[0].headers["Authorization"] == f"Bearer {SECRET}"

    records = [logfmt(line) for line in lean.lines]
    messages = [r["msg"] for r in records]
    # Start-up, then only the four run lines (a 200-chunk answer writes one line, like a
    # 2-chunk one), then shutdown.
    assert messages[0].startswith("lean listening on")
    start = records[0]  # what this lean serves, and how clients get in
    assert start["config"].endswith(".ini") and start["models"] == "default"
    assert start["scenes"] == "chat" and start["auth"] == "none (loopback only)"
    assert start["page"] == messages[0].removeprefix("lean listening on ") + "/"
    assert messages[1:5] == ["run"] * 4
    assert all(m.startswith("lean stopping") for m in messages[5:]), messages
    two, many, whole, run = run_lines(records)
    for line in (two, many):
        check_run(line, "chat.completions")
        assert line["stream"] == "true"
    assert int(two["chunks"]) < 10 and int(many["chunks"]) >= 200  # the chunks were real
    check_run(whole, "chat.completions")
    assert whole["stream"] == "false"
    check_run(run, "scene")
    assert run["scene"] == "chat" and run["run_id"].startswith("run_")
    assert run["prompt_tokens"] == "8" and run["completion_tokens"] == "200"
    assert all("code" not in r and "prompt" not in r for r in (two, many, whole, run))

    text = "\n".join(lean.lines)
    assert "private-" not in text  # no prompt without log_prompts
    assert SECRET not in text


async def test_with_log_prompts_the_scene_prompt_is_on_its_run_line(tmp_path: Path) -> None:
    async with FakeOpenAI() as fake:
        fake.push(text_stream(TWO_WORDS))
        server = "log_prompts = true"
        async with lean_serve(tmp_path, fake, server) as lean, aiohttp.ClientSession() as http:
            await scene(http, lean, 'my "secret" plan,\nline two')
    (run,) = run_lines([logfmt(line) for line in lean.lines])
    check_run(run, "scene")
    assert run["prompt"] == 'my "secret" plan,\nline two'
    assert SECRET not in "\n".join(lean.lines)


async def test_with_log_prompts_a_chat_completion_prompt_is_on_its_run_line(
    tmp_path: Path,
) -> None:
    async with FakeOpenAI() as fake:
        server = "log_prompts = true"
        async with lean_serve(tmp_path, fake, server) as lean, aiohttp.ClientSession() as http:
            await stream(http, lean, "what is in my prompt")
    (run,) = run_lines([logfmt(line) for line in lean.lines])
    check_run(run, "chat.completions")
    assert run.get("prompt") == "what is in my prompt"


# --- lean serve: JSON ----------------------------------------------------------------------


async def test_json_log_every_line_is_json_and_the_key_never_appears_even_when_echoed(
    tmp_path: Path,
) -> None:
    echo = error_body(f"Incorrect API key provided: {SECRET}", code="invalid_api_key")
    boom = error_body(f"internal error while using key {SECRET}", type="server_error")
    async with FakeOpenAI() as fake:
        fake.push(
            text_stream(TWO_WORDS),
            Reply(body=completion(TWO_WORDS)),
            text_stream(TWO_WORDS),
            # Failures that quote the key; each request is tried streaming, then not.
            Reply(status=401, body=echo),
            Reply(status=401, body=echo),
            Reply(status=500, body=boom),
            Reply(status=500, body=boom),
            Reply(status=500, body=boom),
            Reply(status=500, raw=f"plain text {SECRET}".encode()),
        )
        server = "log_format = json"
        async with lean_serve(tmp_path, fake, server) as lean, aiohttp.ClientSession() as http:
            await stream(http, lean, "private-one")
            await non_stream(http, lean, "private-two")
            await scene(http, lean, "private-three")
            async with http.post(lean.url + URL, json=chat_body("private-four")) as resp:
                assert SECRET not in await resp.text()
            async with http.post(lean.url + URL, json=chat_body(stream=False)) as resp:
                assert resp.status == 502
                assert SECRET not in await resp.text()
            assert SECRET not in await scene(http, lean, "private-five")
    assert len(fake.requests) == 9
    assert fake.requests[3].headers["Authorization"] == f"Bearer {SECRET}"

    records = [json.loads(line) for line in lean.lines]
    for record in records:
        assert isinstance(record, dict)
        assert {"msg", "level", "time"} <= set(record)
        assert TIME.fullmatch(record["time"])
    runs = run_lines(records)
    assert [(r["endpoint"], r["status"]) for r in runs] == [
        ("chat.completions", "complete"),
        ("chat.completions", "complete"),
        ("scene", "complete"),
        ("chat.completions", "error"),
        ("chat.completions", "error"),
        ("scene", "error"),
    ]
    for run in runs:
        check_run(run, run["endpoint"], run["status"])
    assert [r["stream"] for r in runs if r["endpoint"] != "scene"] == [True, False, True, False]
    assert isinstance(runs[0]["first_token_ms"], int) and isinstance(runs[0]["duration_ms"], int)
    assert runs[2]["scene"] == "chat" and runs[2]["run_id"].startswith("run_")
    assert runs[2]["prompt_tokens"] == 8 and runs[2]["completion_tokens"] == 2
    assert {r["code"] for r in runs[3:]} == {"upstream_error"}
    # Every failed attempt is logged, once, with the key scrubbed from what the upstream said.
    assert [r["level"] for r in records].count("warning") == 6
    text = "\n".join(lean.lines)
    assert "[redacted]" in text
    assert SECRET not in text
    assert SECRET[:12] not in text and SECRET[-12:] not in text
    assert "private-" not in text


# --- the formatters, on their own ----------------------------------------------------------


def record(msg: str = "run", *args: Any, **fields: Any) -> logging.LogRecord:
    rec = logging.LogRecord("lean.run", logging.INFO, __file__, 1, msg, args or None, None)
    rec.fields = fields
    return rec


@pytest.mark.parametrize(
    ("value", "written"),
    [
        ("plain", "plain"),
        ("two words", '"two words"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("line\nbreak", '"line\\nbreak"'),
        ("back\\slash", '"back\\\\slash"'),
        ("a=b", '"a=b"'),
        ("", '""'),
        (12, "12"),
        (True, "true"),
        (1.5, "1.5"),
    ],
)
def test_logfmt_quotes_what_would_break_a_pair(value: Any, written: str) -> None:
    line = LogfmtFormatter().format(record(k=value))
    assert line.endswith(f" k={written}")
    assert "\n" not in line
    assert logfmt(line)["k"] == (value if isinstance(value, str) else written)


def test_logfmt_line_shape_and_none_fields_omitted() -> None:
    rec = record("lean listening on %s", "http://127.0.0.1:8080", status="complete", code=None)
    line = LogfmtFormatter().format(rec)
    fields = logfmt(line)
    assert list(fields) == ["time", "level", "logger", "msg", "status"]
    assert TIME.fullmatch(fields["time"])
    assert fields["level"] == "info" and fields["logger"] == "lean.run"
    assert fields["msg"] == "lean listening on http://127.0.0.1:8080"
    assert "code" not in line


def test_an_exception_stays_on_one_line() -> None:
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        rec = logging.LogRecord("lean", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    for line in (LogfmtFormatter().format(rec), JsonFormatter().format(rec)):
        assert "\n" not in line
    assert "ValueError: bad\nthing" in logfmt(LogfmtFormatter().format(rec))["error"]
    assert "ValueError: bad\nthing" in json.loads(JsonFormatter().format(rec))["error"]


def test_json_line_shape() -> None:
    rec = record(prompt='a "b"\nc', first_token_ms=12, stream=True)
    line = JsonFormatter().format(rec)
    assert "\n" not in line
    fields = json.loads(line)
    assert TIME.fullmatch(fields.pop("time"))
    assert fields == {
        "level": "info",
        "logger": "lean.run",
        "msg": "run",
        "prompt": 'a "b"\nc',
        "first_token_ms": 12,
        "stream": True,
    }


def test_json_omits_none_fields_as_logfmt_does() -> None:
    fields = json.loads(JsonFormatter().format(record(status="complete", code=None)))
    assert "code" not in fields


@pytest.mark.parametrize("value", ["a\rb", "a\tb", "\x1b[31mred"])
def test_logfmt_quotes_control_characters(value: str) -> None:
    line = LogfmtFormatter().format(record(prompt=value))
    assert not any(ord(c) < 0x20 or c == "\x7f" for c in line)
    assert logfmt(line)["prompt"] == value
