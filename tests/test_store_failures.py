"""`lean serve` with a store that cannot write, and killed with SIGKILL mid-answer (that one,
and a newer lean's schema, on SQLite and on PostgreSQL).

The failures are real, made by the kernel for the lean process alone: RLIMIT_FSIZE = 0
(set with `prlimit` on the running process, or before it starts) makes every write to a
regular file fail with EFBIG, as a full disk fails it with ENOSPC; raising it again is
space returning. It needs no mount and works as root, where a read-only file does not stop
writes. lean's log goes to a pipe, which the limit does not touch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from lean.messages import SCHEMA, SCHEMA_VERSION
from tests.fakes import FakeOpenAI, Stream, free_port, text_stream
from tests.store_targets import Target
from tests.support import SECRET

START_TIMEOUT = 15.0  # seconds `lean serve` may take to answer /healthz (2 shared cores)
DEADLINE = 10.0  # seconds any one step may take
NDJSON = {"Accept": "application/x-ndjson"}
NO_WRITES = (0, resource.RLIM_INFINITY)  # soft limit 0: every write to a file fails
WRITES = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)

pytestmark = pytest.mark.one_loop  # lean serve runs uvloop, whatever the test's loop is


def write_config(
    tmp_path: Path, upstream: str, port: int, flush_interval: float = 1.0, store: str = ""
) -> Path:
    """`store`: the [store] line naming the database (default: lean.db in tmp_path)."""
    config = tmp_path / "config.ini"
    store = store or f"path = {tmp_path / 'lean.db'}"
    config.write_text(
        f"[server]\nhost = 127.0.0.1\nport = {port}\ndrain_timeout = 0.5\n\n"
        f"[store]\n{store}\nflush_interval = {flush_interval}\n\n"
        f"[provider.up]\nkind = openai\nbase_url = {upstream}\napi_key_env = UP_KEY\n\n"
        "[model.default]\nprovider = up\nupstream_model = fake-model\n\n"
        "[scene.chat]\nmodel = default\ntemplate = {message}\n"
    )
    return config


class Lean:
    """`lean serve` in a subprocess; its log (stderr) collected from a pipe."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int) -> None:
        self.proc = proc
        self.url = f"http://127.0.0.1:{port}"
        self.log: list[str] = []
        assert proc.stderr is not None
        self._reader = asyncio.create_task(self._read(proc.stderr))

    async def _read(self, stream: asyncio.StreamReader) -> None:
        async for line in stream:
            self.log.append(line.decode(errors="replace"))

    async def wait_log(self) -> str:
        await asyncio.wait_for(self._reader, DEADLINE)
        return "".join(self.log)

    def limit_writes(self, limits: tuple[int, int]) -> None:
        resource.prlimit(self.proc.pid, resource.RLIMIT_FSIZE, limits)


async def spawn(
    config: Path, port: int, preexec: Callable[[], None] | None = None
) -> asyncio.subprocess.Process:
    env = dict(os.environ, UP_KEY=SECRET)
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "lean",
        "serve",
        "--config",
        str(config),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=config.parent,
        preexec_fn=preexec,
    )


@contextlib.asynccontextmanager
async def lean_serve(config: Path, port: int) -> AsyncIterator[Lean]:
    lean = Lean(await spawn(config, port), port)
    try:
        async with aiohttp.ClientSession() as http, asyncio.timeout(START_TIMEOUT):
            while True:
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    async with http.get(lean.url + "/healthz") as resp:
                        if resp.status == 200:
                            break
                assert lean.proc.returncode is None, "".join(lean.log)
                await asyncio.sleep(0.05)
        yield lean
    finally:
        if lean.proc.returncode is None:
            lean.proc.kill()
        await lean.proc.wait()
        await lean.wait_log()


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as f:
        yield f


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DEADLINE)) as s:
        yield s


def paced(text: str, delay: float) -> Stream:
    stream = text_stream(text)
    stream.delay = delay
    return stream


async def run_scene(
    http: aiohttp.ClientSession, lean: Lean, body: dict[str, Any]
) -> list[dict[str, Any]]:
    async with http.post(lean.url + "/v1/scenes/chat/stream", json=body, headers=NDJSON) as resp:
        assert resp.status == 200, await resp.text()
        return [json.loads(line) async for line in resp.content if line.strip()]


async def messages(http: aiohttp.ClientSession, lean: Lean, cid: str) -> list[dict[str, Any]]:
    async with http.get(f"{lean.url}/v1/conversations/{cid}/messages") as resp:
        assert resp.status == 200, await resp.text()
        rows: list[dict[str, Any]] = (await resp.json())["messages"]
        return rows


async def status_of(http: aiohttp.ClientSession, lean: Lean, path: str) -> int:
    async with http.get(lean.url + path) as resp:
        return resp.status


async def until_ready(http: aiohttp.ClientSession, lean: Lean, status: int) -> None:
    async with asyncio.timeout(DEADLINE):
        while await status_of(http, lean, "/readyz") != status:  # noqa: ASYNC110 - polled
            await asyncio.sleep(0.05)


async def test_a_store_that_cannot_write_is_told_refused_counted_and_recovered(
    tmp_path: Path, fake: FakeOpenAI, http: aiohttp.ClientSession
) -> None:
    port = free_port()
    config = write_config(tmp_path, fake.base_url, port, flush_interval=60)  # no progress
    async with lean_serve(config, port) as lean:
        fake.push(text_stream("first answer"))
        first = await run_scene(http, lean, {"message": "one"})
        assert first[-1]["type"] == "done" and first[-1]["saved"] is True
        cid = first[0]["conversationId"]

        # The disk fills: no run starts that could not be saved. 503 store_unavailable,
        # retryable, in the OpenAI error shape, before any provider call; on the WebSocket,
        # an error frame. /readyz fails.
        lean.limit_writes(NO_WRITES)
        requests = len(fake.requests)
        for body in ({"message": "two", "conversationId": cid}, {"message": "three"}):
            async with http.post(lean.url + "/v1/scenes/chat/stream", json=body) as resp:
                assert resp.status == 503
                assert int(resp.headers["Retry-After"]) >= 1
                error = (await resp.json())["error"]
                assert error["code"] == "store_unavailable" and error["type"] == "server_error"
        async with http.ws_connect(lean.url + "/v1/ws") as ws:
            await ws.send_json({"type": "run", "runId": "w", "scene": "chat", "message": "hi"})
            frame = await ws.receive_json(timeout=DEADLINE)
        assert (frame["type"], frame["code"], frame["retryable"]) == (
            "error",
            "store_unavailable",
            True,
        )
        assert len(fake.requests) == requests
        async with http.get(lean.url + "/readyz") as resp:
            assert resp.status == 503
            assert (await resp.json())["status"] == "store_unavailable"

        # Space returns: lean notices by itself (a probe: nothing else writes).
        lean.limit_writes(WRITES)
        await until_ready(http, lean, 200)

        # An answer whose final save fails: `done` says so, and so does the run's log line.
        fake.push(paced("an answer that cannot be kept", delay=0.05))
        async with http.post(
            lean.url + "/v1/scenes/chat/stream",
            json={"message": "four", "conversationId": cid},
            headers=NDJSON,
        ) as resp:
            lines = resp.content.__aiter__()
            assert json.loads(await anext(lines))["type"] == "start"
            rows = await messages(http, lean, cid)  # reads wait for the queued writes
            assert [r["status"] for r in rows][-2:] == ["complete", "streaming"]
            lean.limit_writes(NO_WRITES)
            rest = [json.loads(line) async for line in lines if line.strip()]
        done = rest[-1]
        assert done["type"] == "done" and done["text"] == "an answer that cannot be kept"
        assert done["saved"] is False
        assert await status_of(http, lean, "/readyz") == 503

        async with http.get(lean.url + "/metrics") as resp:
            metrics = await resp.text()
        assert [m for m in metrics.splitlines() if "store_failures_total{" in m] == [
            'lean_store_failures_total{op="save"} 1',
            'lean_store_failures_total{op="turn"} 1',
        ]

        lean.limit_writes(WRITES)
        await until_ready(http, lean, 200)
        # The answer whose save failed is written with the first commit that succeeds.
        fake.push(text_stream("saved again"))
        last = await run_scene(http, lean, {"message": "five", "conversationId": cid})
        assert last[-1]["type"] == "done" and last[-1]["saved"] is True
        rows = await messages(http, lean, cid)
        assert [(r["role"], r["status"], r["content"]) for r in rows] == [
            ("user", "complete", "one"),
            ("assistant", "complete", "first answer"),
            ("user", "complete", "four"),
            ("assistant", "complete", "an answer that cannot be kept"),  # written on recovery
            ("user", "complete", "five"),
            ("assistant", "complete", "saved again"),
        ]
    log = await lean.wait_log()
    failed = [line for line in log.splitlines() if "saved=false" in line]
    assert len(failed) == 1 and "status=complete" in failed[0], log
    assert "Traceback" not in log and SECRET not in log


async def test_lean_serve_exits_2_with_one_line_when_the_store_cannot_write(
    tmp_path: Path,
) -> None:
    with contextlib.closing(sqlite3.connect(tmp_path / "lean.db")) as conn:
        # An up-to-date database: opening it needs no write, yet lean must find out.
        conn.executescript(f"{SCHEMA} PRAGMA user_version = {SCHEMA_VERSION};")
    port = free_port()
    config = write_config(tmp_path, "http://127.0.0.1:9/v1", port)
    proc = await spawn(config, port, lambda: resource.setrlimit(resource.RLIMIT_FSIZE, NO_WRITES))
    try:
        _, err = await asyncio.wait_for(proc.communicate(), START_TIMEOUT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 2, err
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and "[store] path" in lines[0], lines


def store_line(target: Target) -> str:
    return f"{'url' if target.kind == 'postgresql' else 'path'} = {target.where}"


async def test_a_database_from_a_newer_lean_is_one_line_and_exit_2(
    tmp_path: Path, target: Target
) -> None:
    target.seed("", 99)
    port = free_port()
    config = write_config(tmp_path, "http://127.0.0.1:9/v1", port, store=store_line(target))
    proc = await spawn(config, port)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), START_TIMEOUT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 2, err
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and "schema version 99" in lines[0], lines
    assert f"[store] {store_line(target).split()[0]}" in lines[0]
    assert target.version() == 99  # left as it was


async def test_an_unreachable_postgresql_is_one_line_and_exit_2(tmp_path: Path) -> None:
    port = free_port()
    url = "postgresql://lean:s3cret@127.0.0.1:9/lean"
    config = write_config(tmp_path, "http://127.0.0.1:9/v1", port, store=f"url = {url}")
    proc = await spawn(config, port)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), START_TIMEOUT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 2, err
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and "[store] url" in lines[0], lines
    assert "s3cret" not in lines[0] and "127.0.0.1:9" in lines[0]


async def test_kill_9_mid_answer_keeps_the_text_flushed_before_it(
    tmp_path: Path, fake: FakeOpenAI, http: aiohttp.ClientSession, target: Target
) -> None:
    words = [f"w{i} " for i in range(40)]
    stream = text_stream("".join(words))
    stream.stall_after = 1 + 10  # the role chunk, then 10 words; then the upstream stalls
    fake.push(stream)
    port = free_port()
    config = write_config(tmp_path, fake.base_url, port, 0.2, store=store_line(target))
    async with lean_serve(config, port) as lean:
        async with http.post(
            lean.url + "/v1/scenes/chat/stream", json={"message": "go"}, headers=NDJSON
        ) as resp:
            seen = ""
            cid = ""
            async for line in resp.content:
                event = json.loads(line)
                if event["type"] == "start":
                    cid = event["conversationId"]
                elif event["type"] == "delta":
                    seen += event["text"]
                if seen == "".join(words[:10]):
                    break
            await asyncio.sleep(0.2 * 3)  # past one flush interval, with room for the writer
            lean.proc.send_signal(signal.SIGKILL)
            await lean.proc.wait()
    async with lean_serve(config, port) as lean:
        rows = await messages(http, lean, cid)
    assert [(r["role"], r["status"]) for r in rows] == [
        ("user", "complete"),
        ("assistant", "incomplete"),
    ]
    assert rows[1]["content"] == seen and rows[1]["runId"].startswith("run_")
