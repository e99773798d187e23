"""lean as an operator sees it: client tokens, start-up checks, `lean serve` in a real
process (signals, drain), response headers, heartbeats (docs/protocol.md §1, §4).
Each async test runs on asyncio and on uvloop (conftest.py); `lean serve` itself always
runs on uvloop, as it does in production."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.fakes import (
    DEFAULT_TEXT,
    FakeOpenAI,
    Reply,
    Stall,
    Stream,
    completion,
    free_port,
    text_stream,
)
from tests.support import chat_body, content_of, lean_config, read_sse_data, running

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parent.parent
AUTH = "[auth]\ntokens_env = LEAN_TOKENS\n"
TOKENS = {"LEAN_TOKENS": "t1, t2"}
CLI_TIMEOUT = 20.0  # seconds a `lean` command may take before the test fails


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as f:
        yield f


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        yield s


def assert_openai_error(body: Any, code: str | None) -> None:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "code"}
    assert code is None or body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert isinstance(body["error"]["type"], str) and body["error"]["type"]


# --- client tokens ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer nope"},
        {"Authorization": "Bearer t1, t2"},  # the variable's raw value is not a token
        {"Authorization": "t1"},  # no scheme
        {"Authorization": "Basic t1"},
    ],
    ids=["none", "wrong", "raw-list", "no-scheme", "basic"],
)
async def test_auth_refuses_without_a_valid_token(
    fake: FakeOpenAI, session: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    config = lean_config(fake.base_url, extra=AUTH, environ=TOKENS)
    async with running(config) as server:
        for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models")):
            async with session.request(
                method, server.url + path, json=chat_body(), headers=headers
            ) as resp:
                assert resp.status == 401
                assert resp.content_type == "application/json"
                body = await resp.json()
        assert_openai_error(body, "unauthorized")
        assert body["error"]["type"] == "authentication_error"
    assert fake.requests == []


async def test_auth_query_token_only_for_get(
    fake: FakeOpenAI, session: aiohttp.ClientSession
) -> None:
    """EventSource cannot set headers, so GET may carry `?access_token=`; POST may not."""
    config = lean_config(fake.base_url, extra=AUTH, environ=TOKENS)
    async with running(config) as server:
        async with session.get(server.url + "/v1/models?access_token=t1") as resp:
            assert resp.status == 200
            assert [m["id"] for m in (await resp.json())["data"]] == ["default"]
        async with session.get(server.url + "/v1/models?access_token=t3") as resp:
            assert resp.status == 401
        url = server.url + "/v1/chat/completions?access_token=t1"
        async with session.post(url, json=chat_body()) as resp:
            assert resp.status == 401
            assert_openai_error(await resp.json(), "unauthorized")
    assert fake.requests == []


@pytest.mark.parametrize("token", ["t1", "t2"])
async def test_auth_accepts_every_listed_token(
    fake: FakeOpenAI, session: aiohttp.ClientSession, token: str
) -> None:
    config = lean_config(fake.base_url, extra=AUTH, environ=TOKENS)
    headers = {"Authorization": f"Bearer {token}"}
    async with running(config) as server:
        async with session.post(
            server.url + "/v1/chat/completions", json=chat_body(), headers=headers
        ) as resp:
            assert resp.status == 200
            data = await read_sse_data(resp)
    assert content_of(data) == DEFAULT_TEXT
    assert data[-1] == "[DONE]"
    assert len(fake.requests) == 1


async def test_health_endpoints_need_no_token(
    fake: FakeOpenAI, session: aiohttp.ClientSession
) -> None:
    config = lean_config(fake.base_url, extra=AUTH, environ=TOKENS)
    async with running(config) as server:
        for path, status in (("/healthz", "ok"), ("/readyz", "ready")):
            async with session.get(server.url + path) as resp:
                assert resp.status == 200
                assert (await resp.json())["status"] == status


# --- start-up checks (`lean check-config`, `lean serve`) ----------------------------------


def lean_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lean", *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        env=env,
        cwd=ROOT,
        check=False,
    )


def demo_config(
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    demo_delay: float = 0.01,
    drain_timeout: float = 0.5,
    extra: str = "",
) -> str:
    return f"""
[server]
host = {host}
port = {port}
drain_timeout = {drain_timeout}

[provider.demo]
kind = demo
demo_delay = {demo_delay}

[model.default]
provider = demo
upstream_model = lean-demo
{extra}
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.ini"
    path.write_text(text, encoding="utf-8")
    return str(path)


def assert_one_error_line(stderr: str, *parts: str) -> None:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    for part in parts:
        assert part in lines[0], stderr


def test_check_config_refuses_non_loopback_without_tokens(tmp_path: Path) -> None:
    path = write(tmp_path, demo_config(host="0.0.0.0"))
    refused = lean_cli("check-config", path, env={})
    assert refused.returncode == 2
    assert refused.stdout == ""
    assert_one_error_line(refused.stderr, "[server] host", "LEAN_TOKENS", "0.0.0.0")

    allowed = lean_cli("check-config", path, env={"LEAN_TOKENS": "t1"})
    assert allowed.returncode == 0, allowed.stderr
    assert "ok" in allowed.stdout
    assert "t1" not in allowed.stdout + allowed.stderr


def socket_connect(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


def test_serve_refuses_non_loopback_without_tokens(tmp_path: Path) -> None:
    port = free_port()
    path = write(tmp_path, demo_config(host="0.0.0.0", port=port))
    result = lean_cli("serve", "--config", path, env={})
    assert result.returncode == 2
    assert_one_error_line(result.stderr, "[server] host")
    with pytest.raises(ConnectionRefusedError):
        socket_connect(port)


BAD_CONFIGS = {
    "unknown-kind": (
        demo_config().replace("kind = demo", "kind = magic"),
        ("[provider.demo] kind", "magic", "openai"),
    ),
    "missing-provider": (
        demo_config().replace("provider = demo", "provider = nowhere"),
        ("[model.default] provider", "nowhere"),
    ),
    "max-streams": (
        demo_config(extra="[limits]\nmax_streams = many\n"),
        ("[limits] max_streams", "integer", "many"),
    ),
    "missing-key": (
        demo_config(
            extra="[provider.up]\nkind = openai\nbase_url = http://127.0.0.1:9/v1\n"
            "api_key_env = LEAN_TEST_ABSENT_KEY\n"
        ),
        ("[provider.up] api_key_env", "LEAN_TEST_ABSENT_KEY"),
    ),
}


@pytest.mark.parametrize("command", ["check-config", "serve"])
@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_exits_2_naming_section_and_key(tmp_path: Path, case: str, command: str) -> None:
    text, parts = BAD_CONFIGS[case]
    path = write(tmp_path, text)
    args = ("check-config", path) if command == "check-config" else ("serve", "--config", path)
    result = lean_cli(*args, env={})
    assert result.returncode == 2
    assert result.stdout == ""
    assert_one_error_line(result.stderr, "config error:", *parts)


def test_shipped_config_passes_check_config_with_an_empty_environment() -> None:
    result = lean_cli("check-config", "config.ini", env={})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("config.ini: ok")
    assert result.stderr == ""


# --- `lean serve` in a real process -------------------------------------------------------


class LeanProcess:
    """`lean serve` in a subprocess; its stderr (the log) collected line by line."""

    def __init__(self, proc: asyncio.subprocess.Process, url: str) -> None:
        self.proc = proc
        self.url = url
        self.log: list[str] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.log.append(line.decode(errors="replace"))
            self._changed.set()
            self._changed = asyncio.Event()
        self._changed.set()

    async def wait_log(self, text: str, timeout: float = 5.0) -> str:  # noqa: ASYNC109
        async with asyncio.timeout(timeout):
            while True:
                for line in self.log:
                    if text in line:
                        return line
                if self._reader.done():
                    raise AssertionError(f"{text!r} never logged: {self.log}")
                await self._changed.wait()

    async def wait_healthy(self, session: aiohttp.ClientSession, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        async with asyncio.timeout(timeout):
            while True:
                assert self.proc.returncode is None, self.log
                try:
                    async with session.get(self.url + "/healthz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.05)

    def terminate(self) -> float:
        self.proc.send_signal(signal.SIGTERM)
        return time.monotonic()

    async def exit_code(self, timeout: float) -> int:  # noqa: ASYNC109
        async with asyncio.timeout(timeout):
            code = await self.proc.wait()
            await self._reader
        return code


@asynccontextmanager
async def lean_serve(tmp_path: Path, **config: Any) -> AsyncIterator[LeanProcess]:
    port = free_port()
    path = write(tmp_path, demo_config(port=port, **config))
    env = {k: v for k, v in os.environ.items() if k != "LEAN_TOKENS"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "lean",
        "serve",
        "--config",
        path,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=tmp_path,
    )
    lean = LeanProcess(proc, f"http://127.0.0.1:{port}")
    try:
        yield lean
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        with contextlib.suppress(Exception):
            await lean._reader


async def read_lines(resp: aiohttp.ClientResponse, lines: list[bytes], stop: bytes) -> None:
    """Append the response's lines until one starts with `stop` (or the body ends)."""
    while line := await resp.content.readline():
        lines.append(line)
        if line.startswith(stop):
            return


async def test_serve_streams_then_a_stream_within_the_drain_window_finishes(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    async with lean_serve(tmp_path, demo_delay=0.01, drain_timeout=3) as lean:
        await lean.wait_healthy(session)
        url = lean.url + "/v1/chat/completions"
        async with session.post(url, json=chat_body("ping pong")) as resp:
            assert resp.status == 200
            data = await read_sse_data(resp)
        assert data[-1] == "[DONE]"
        assert 'You said: "ping pong".' in content_of(data)

        # SIGTERM right after a stream started: it has drain_timeout (3 s) to finish, and
        # needs ~0.6 s, so it ends normally.
        async with session.post(url, json=chat_body("second")) as resp:
            assert resp.status == 200
            lines: list[bytes] = []
            async with asyncio.timeout(5):
                await read_lines(resp, lines, b"data: ")
                sent = lean.terminate()
                rest = await resp.read()
        data = [
            line.removeprefix("data: ")
            for line in (b"".join(lines) + rest).decode().split("\n")
            if line.startswith("data: ")
        ]
        assert data[-1] == "[DONE]"
        assert not any('"error"' in d for d in data)
        assert 'You said: "second".' in content_of(data)
        assert await lean.exit_code(timeout=5) == 0
        assert time.monotonic() - sent < 5
        await lean.wait_log("status=complete")


async def get_status(session: aiohttp.ClientSession, url: str) -> int | None:
    """The status of GET url, or None when the connection is refused or dropped."""
    try:
        async with session.get(url) as resp:
            await resp.read()
            return resp.status
    except aiohttp.ClientConnectionError:
        return None


async def test_sigterm_drains_then_ends_a_long_stream_with_shutting_down(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    async with (
        lean_serve(tmp_path, demo_delay=0.2, drain_timeout=0.5) as lean,
        # A load balancer's kept-alive connection, opened before the signal.
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as balancer,
    ):
        await lean.wait_healthy(session)
        assert await get_status(balancer, lean.url + "/readyz") == 200
        async with session.post(lean.url + "/v1/chat/completions", json=chat_body()) as resp:
            assert resp.status == 200
            lines: list[bytes] = []
            async with asyncio.timeout(5):
                await read_lines(resp, lines, b"data: ")
            sent = lean.terminate()
            await lean.wait_log("lean stopping")  # logged just before draining starts

            # Not ready any more: a new connection is refused (the listener is closed) or
            # gets 503; never 200. The kept-alive one still reaches lean: 503, and new
            # work is refused with a retryable error.
            assert await get_status(session, lean.url + "/readyz") in (503, None)
            assert await get_status(balancer, lean.url + "/readyz") == 503
            async with balancer.post(
                lean.url + "/v1/chat/completions", json=chat_body()
            ) as refused:
                assert refused.status == 503
                assert refused.headers["Retry-After"] == "1"
                assert_openai_error(await refused.json(), "shutting_down")

            async with asyncio.timeout(5):
                await read_lines(resp, lines, b'data: {"error"')
                ended = time.monotonic()
                tail = await resp.read()
        assert tail == b"\n"  # the error line's blank line, then the body ends
        last = lines[-1].decode()
        assert last.startswith('data: {"error"'), lines[-3:]
        error = json.loads(last.removeprefix("data: "))["error"]
        assert error["code"] == "shutting_down"
        assert set(error) == {"message", "type", "code"}
        assert not any(line.startswith(b"data: [DONE]") for line in lines)
        assert ended - sent >= 0.4  # the stream had its drain_timeout (0.5 s) first
        assert await lean.exit_code(timeout=5) == 0
        assert time.monotonic() - sent < 5
        await lean.wait_log("code=shutting_down")


# --- response headers, heartbeats, routes -------------------------------------------------


async def test_stream_headers_arrive_at_commit_wait_while_the_upstream_is_silent(
    fake: FakeOpenAI, session: aiohttp.ClientSession
) -> None:
    fake.push(Stall(seconds=3))
    async with running(lean_config(fake.base_url, server="commit_wait = 0.2")) as server:
        async with asyncio.timeout(1):
            resp = await session.post(
                server.url + "/v1/chat/completions",
                json=chat_body(),
                headers={"Accept-Encoding": "gzip, br"},
            )
        async with resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            assert resp.headers["Cache-Control"] == "no-cache, no-transform"
            assert resp.headers["X-Accel-Buffering"] == "no"
            assert "Content-Encoding" not in resp.headers
            await fake.wait_request(timeout=2)
        # The client left while the upstream was silent: lean closes the upstream at once.
        await fake.wait_disconnect(timeout=2)


async def test_stream_is_not_compressed_for_gzip_clients(
    fake: FakeOpenAI, session: aiohttp.ClientSession
) -> None:
    async with running(lean_config(fake.base_url)) as server:
        async with session.post(
            server.url + "/v1/chat/completions",
            json=chat_body(),
            headers={"Accept-Encoding": "gzip, br"},
        ) as resp:
            assert "Content-Encoding" not in resp.headers
            raw = await resp.content.read()  # the bytes as sent: plain SSE text
    assert raw.startswith(b"data: {") and raw.endswith(b"data: [DONE]\n\n")


@pytest.mark.parametrize("upstream_stream", [True, False], ids=["stream-upstream", "plain"])
async def test_heartbeat_before_the_first_byte(
    fake: FakeOpenAI, session: aiohttp.ClientSession, upstream_stream: bool
) -> None:
    """The upstream is silent for 1 s (a slow first token, or a whole non-streaming
    answer): the client hears `: ping` meanwhile, then the answer as usual."""
    if upstream_stream:
        fake.push(Stream(events=text_stream(DEFAULT_TEXT).events, first_byte_delay=1.0))
    else:
        fake.push(Reply(body=completion(DEFAULT_TEXT), delay=1.0))
    config = lean_config(fake.base_url, stream=upstream_stream, server="ping_interval = 0.2")
    lines: list[bytes] = []
    async with running(config) as server:
        async with session.post(server.url + "/v1/chat/completions", json=chat_body()) as resp:
            assert resp.status == 200
            async with asyncio.timeout(5):
                await read_lines(resp, lines, b"data: [DONE]")
    first_data = next(i for i, line in enumerate(lines) if line.startswith(b"data: "))
    pings = lines[:first_data].count(b": ping\n")
    assert pings >= 3  # about one per 0.2 s during the 1 s of upstream silence
    assert all(line in (b": ping\n", b"\n") for line in lines[:first_data])
    data = [line[6:-1].decode() for line in lines if line.startswith(b"data: ")]
    assert content_of(data) == DEFAULT_TEXT
    assert data[-1] == "[DONE]"


async def test_drain_ends_a_non_stream_request_with_503(
    fake: FakeOpenAI, session: aiohttp.ClientSession
) -> None:
    """Server.stop() is what SIGTERM runs: a whole-answer request still waiting when
    drain_timeout (0.5 s) passes gets a 503 `shutting_down`, not a dropped connection."""
    fake.push(Reply(body=completion(DEFAULT_TEXT), delay=3.0))
    async with running(lean_config(fake.base_url)) as server:
        url = server.url + "/v1/chat/completions"
        request = asyncio.create_task(session.post(url, json=chat_body(stream=False)))
        try:
            await fake.wait_request(timeout=2)
            started = time.monotonic()
            async with asyncio.timeout(5):
                await server.stop()
                async with await request as resp:
                    assert resp.status == 503
                    assert_openai_error(await resp.json(), "shutting_down")
        finally:
            request.cancel()  # only matters when the test failed before awaiting it
        assert time.monotonic() - started >= 0.4
    await fake.wait_disconnect(timeout=2)  # lean closed its upstream call


async def test_unknown_route_is_an_openai_404(
    fake: FakeOpenAI, session: aiohttp.ClientSession
) -> None:
    async with running(lean_config(fake.base_url)) as server:
        async with session.get(server.url + "/v1/nope") as resp:
            assert resp.status == 404
            assert resp.content_type == "application/json"
            body = await resp.json()
    assert_openai_error(body, "not_found")
    assert "/v1/nope" in body["error"]["message"]
    assert fake.requests == []


async def test_wrong_method_is_a_405_with_allow(
    fake: FakeOpenAI, session: aiohttp.ClientSession
) -> None:
    async with running(lean_config(fake.base_url)) as server:
        async with session.delete(server.url + "/v1/models") as resp:
            assert resp.status == 405
            assert resp.content_type == "application/json"
            assert_openai_error(await resp.json(), None)
            assert "GET" in resp.headers.get("Allow", "")
