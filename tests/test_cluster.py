"""Several `lean serve` processes sharing a real Redis (docs/protocol.md §7).

Each instance is a subprocess on its own port with its own SQLite file; they share the
machine's Redis (database `DB`, flushed before and after each test) or, for an outage and
the tests of `lean.cluster` in this process, a `redis-server` the test starts on a port of
its own and kills. The upstream is a fake OpenAI server in the test's process whose answers
come slowly, so that runs are still going when the test cancels, answers, counts or kills.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from lean.cluster import CALL_TIMEOUT, Cluster
from lean.cluster_wire import RunRequest
from lean.config import ClusterConfig
from lean.errors import ClusterUnavailable, Overloaded
from tests.fakes import FakeOpenAI, Stream, free_port, text_stream, tool_call_stream
from tests.support import SECRET

START_TIMEOUT = 15.0  # seconds `lean serve` may take to answer /healthz (2 shared cores)
DEADLINE = 10.0  # seconds any one step may take
# The Redis database these tests use (flushed): one per pytest-xdist worker (gw0, gw1, ...),
# so that two tests at once never count or flush each other's instances; 10-15 are lean's.
DB = 10 + int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0) % 6
LEAN_DB = "lean.db"
LEASE = 1.0  # seconds: a dead instance is forgotten within this
# Tokens for a test that names clients: the operator's ([auth], /metrics) and two apps'.
TOKENS = {"LEAN_TOKENS": "op-token", "ALPHA_TOKENS": "alpha-token", "BETA_TOKENS": "beta-token"}
CLIENTS = (
    "[auth]\ntokens_env = LEAN_TOKENS\n\n"
    "[client.alpha]\ntoken_env = ALPHA_TOKENS\n\n[client.beta]\ntoken_env = BETA_TOKENS\n\n"
)
OPERATOR = {"Authorization": "Bearer op-token"}  # ignored by an instance without tokens
NDJSON = {"Accept": "application/x-ndjson"}

pytestmark = pytest.mark.one_loop  # lean serve runs uvloop, whatever the test's loop is


def redis_command(port: int, *commands: tuple[str, ...]) -> bytes:
    """Commands to Redis on one connection, their raw replies: the test's own, not lean's."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        out = b""
        for args in commands:
            out += f"*{len(args)}\r\n".encode()
            out += b"".join(f"${len(a.encode())}\r\n{a}\r\n".encode() for a in args)
        s.sendall(out)
        replies = b""
        while replies.count(b"\r\n") < len(commands):  # one-line replies only
            data = s.recv(65536)
            if not data:
                break
            replies += data
        return replies


def redis_up(port: int = 6379) -> bool:
    try:
        return redis_command(port, ("PING",)) == b"+PONG\r\n"
    except OSError:
        return False


@pytest.fixture
def shared_redis() -> Any:
    if not redis_up():
        pytest.skip("no Redis on 127.0.0.1:6379 (.ci/run starts it)")
    flush = ("SELECT", str(DB)), ("FLUSHDB",)
    assert redis_command(6379, *flush) == b"+OK\r\n+OK\r\n"
    yield f"redis://127.0.0.1:6379/{DB}"
    redis_command(6379, *flush)


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


def write_config(
    directory: Path,
    upstream: str,
    port: int,
    redis_url: str,
    *,
    limits: str = "",
    extra: str = "",
    store: str = "",
    scene: str = "",
) -> Path:
    """`store`: the `[store]` keys, shared by instances that get the same (default: a
    SQLite file of this instance's own); `scene`: more keys of `[scene.chat]`."""
    directory.mkdir()
    config = directory / "config.ini"
    store = store or f"path = {directory / 'lean.db'}"
    config.write_text(
        f"[server]\nhost = 127.0.0.1\nport = {port}\ndrain_timeout = 0.5\n\n{extra}"
        f"[store]\n{store or f'path = {directory / LEAN_DB}'}\n\n"
        f"[cluster]\nredis_url = {redis_url}\nlease = {LEASE}\ninstance = test-{port}\n\n"
        f"[limits]\nslow_client_timeout = 5\n{limits}\n\n"
        f"[provider.up]\nkind = openai\nbase_url = {upstream}\napi_key_env = UP_KEY\n\n"
        "[model.default]\nprovider = up\nupstream_model = fake-model\n\n"
        "[tool.ask_user]\nkind = client\ndescription = Ask the user\n\n"
        "[scene.chat]\nmodel = default\ntemplate = {message}\ntools = ask_user\n" + scene
    )
    return config


@contextlib.asynccontextmanager
async def instances(
    tmp_path: Path,
    upstream: str,
    redis_url: str,
    count: int,
    *,
    limits: str = "",
    extra: str = "",
    store: str = "",
    scene: str = "",
) -> AsyncIterator[list[Lean]]:
    """`count` instances started together, each up (GET /healthz) before the body runs."""
    leans: list[Lean] = []
    try:
        for n in range(count):
            port = free_port()
            config = write_config(
                tmp_path / f"i{n}",
                upstream,
                port,
                redis_url,
                limits=limits,
                extra=extra,
                store=store,
                scene=scene,
            )
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                *("-m", "lean", "serve", "--config", str(config)),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env=dict(os.environ, UP_KEY=SECRET, **(TOKENS if "[auth]" in extra else {})),
                cwd=config.parent,
            )
            leans.append(Lean(proc, port))
        async with aiohttp.ClientSession() as http, asyncio.timeout(START_TIMEOUT):
            for lean in leans:
                while not await cluster_up(http, lean):
                    assert lean.proc.returncode is None, "".join(lean.log)
                    await asyncio.sleep(0.05)
        yield leans
    finally:
        for lean in leans:
            if lean.proc.returncode is None:
                lean.proc.kill()
            await lean.proc.wait()
            await asyncio.wait_for(lean._reader, DEADLINE)


async def cluster_up(http: aiohttp.ClientSession, lean: Lean) -> bool:
    """Whether `lean` answers and has joined the cluster (lean_cluster_up 1)."""
    try:
        async with http.get(lean.url + "/metrics", headers=OPERATOR) as resp:
            return "\nlean_cluster_up 1\n" in await resp.text()
    except aiohttp.ClientConnectionError:
        return False


def paced(words: int, delay: float = 0.05) -> Stream:
    stream = text_stream(" ".join(f"w{n}" for n in range(words)))
    stream.delay = delay
    return stream


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as f:
        f.default = lambda body: paced(400)  # 20 s: every run is still going when it matters
        yield f


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        yield s


class Running:
    """A scene run streaming NDJSON from one instance, read as it goes."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self.events: list[dict[str, Any]] = []

    async def until(self, kind: str) -> dict[str, Any]:
        async with asyncio.timeout(DEADLINE):
            while True:
                line = await self.resp.content.readline()
                assert line, f"the stream ended before a {kind!r} event: {self.events}"
                event = json.loads(line)
                self.events.append(event)
                if event["type"] == kind:
                    return event

    async def last(self) -> dict[str, Any]:
        """The final event (done or error), once the stream has ended."""
        async with asyncio.timeout(DEADLINE):
            async for line in self.resp.content:
                if line.strip():
                    self.events.append(json.loads(line))
        return self.events[-1]


@contextlib.asynccontextmanager
async def run_on(
    http: aiohttp.ClientSession, lean: Lean, message: str = "hi", token: str = ""
) -> AsyncIterator[Running]:
    body = {"message": message}
    headers = {**NDJSON, "Authorization": f"Bearer {token}"} if token else NDJSON
    async with http.post(lean.url + "/v1/scenes/chat/stream", json=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        yield Running(resp)


async def post(
    http: aiohttp.ClientSession, url: str, body: Any = None, token: str = ""
) -> tuple[int, dict[str, Any], aiohttp.typedefs.LooseHeaders]:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    async with http.post(url, json=body, headers=headers) as resp:
        return resp.status, await resp.json(), resp.headers


async def test_a_cancel_on_b_stops_a_run_on_a_within_a_second(
    tmp_path: Path, fake: FakeOpenAI, http: aiohttp.ClientSession, shared_redis: str
) -> None:
    async with instances(tmp_path, fake.base_url, shared_redis, 2) as (a, b):
        async with run_on(http, a) as run:
            run_id = (await run.until("start"))["runId"]
            await run.until("delta")
            sent = time.monotonic()
            status, body, _ = await post(http, f"{b.url}/v1/runs/{run_id}/cancel")
            assert (status, body) == (202, {"runId": run_id, "status": "cancelling"})
            last = await run.last()
            took = time.monotonic() - sent
        assert (last["type"], last["code"]) == ("error", "cancelled"), run.events
        assert took < 1.0
        # gone everywhere now: 404 from either instance, as on one instance
        for lean in (a, b):
            status, body, _ = await post(http, f"{lean.url}/v1/runs/{run_id}/cancel")
            assert (status, body["error"]["code"]) == (404, "not_found")
        status, body, _ = await post(http, f"{b.url}/v1/runs/run_nowhere/cancel")
        assert (status, body["error"]["code"]) == (404, "not_found")


async def test_a_run_is_its_clients_on_every_instance(
    tmp_path: Path, fake: FakeOpenAI, http: aiohttp.ClientSession, shared_redis: str
) -> None:
    """Routed or not, a run another client started does not exist (404) for a client: the
    owner checks who asked, as it does for a request made to it (docs/protocol.md §8)."""
    async with instances(tmp_path, fake.base_url, shared_redis, 2, extra=CLIENTS) as (a, b):
        async with run_on(http, a, token="alpha-token") as run:
            run_id = (await run.until("start"))["runId"]
            await run.until("delta")
            answer = {"toolCallId": "call_x", "result": 1}
            for lean in (b, a):  # routed to A, and asked of A itself
                for path, body in (("cancel", None), ("tool-results", answer)):
                    url = f"{lean.url}/v1/runs/{run_id}/{path}"
                    status, got, _ = await post(http, url, body, token="beta-token")
                    assert (status, got["error"]["code"]) == (404, "not_found"), (lean, path)
                    assert "beta" not in json.dumps(got) and "alpha" not in json.dumps(got)
            status, got, _ = await post(http, f"{b.url}/v1/runs/{run_id}/cancel", token="op-token")
            assert status == 404  # the operator's [auth] tokens are a client too: the default
            status, got, _ = await post(
                http, f"{b.url}/v1/runs/{run_id}/cancel", token="alpha-token"
            )
            assert (status, got) == (202, {"runId": run_id, "status": "cancelling"})
            last = await run.last()
        assert (last["type"], last["code"]) == ("error", "cancelled"), run.events


async def test_a_tool_result_on_b_resumes_the_run_waiting_on_a(
    tmp_path: Path, fake: FakeOpenAI, http: aiohttp.ClientSession, shared_redis: str
) -> None:
    fake.push(tool_call_stream([("call_ask", "ask_user", '{"q": "city?"}')]))
    fake.push(text_stream("Paris it is."))
    async with instances(tmp_path, fake.base_url, shared_redis, 2) as (a, b):
        async with run_on(http, a) as run:
            run_id = (await run.until("start"))["runId"]
            assert (await run.until("waiting"))["toolCallId"] == "call_ask"
            url = f"{b.url}/v1/runs/{run_id}/tool-results"
            # the owner's own errors come back through B as A would answer them
            status, body, _ = await post(http, url, {"toolCallId": "call_other", "result": 1})
            assert status == 400 and "call_other" in body["error"]["message"], body
            answer = {"toolCallId": "call_ask", "result": {"city": "Paris"}}
            status, body, _ = await post(http, url, answer)
            assert (status, body["status"]) == (200, "accepted"), body
            last = await run.last()
    assert (last["type"], last["text"]) == ("done", "Paris it is."), run.events
    tool = [m for m in fake.requests[1].body["messages"] if m["role"] == "tool"]
    assert [(m["tool_call_id"], json.loads(m["content"])) for m in tool] == [
        ("call_ask", {"city": "Paris"})
    ]


async def test_cluster_max_streams_bounds_the_streams_of_all_instances(
    tmp_path: Path, fake: FakeOpenAI, http: aiohttp.ClientSession, shared_redis: str
) -> None:
    limits = "cluster_max_streams = 2"
    async with instances(tmp_path, fake.base_url, shared_redis, 3, limits=limits) as (a, b, c):
        async with run_on(http, a) as first, run_on(http, b) as second:
            await first.until("start")
            second_id = (await second.until("start"))["runId"]
            for lean in (a, b, c):  # a scene run and a chat completion, on any instance
                async with http.post(
                    lean.url + "/v1/scenes/chat/stream", json={"message": "x"}
                ) as resp:
                    body = await resp.json()
                    assert resp.status == 503, body
                    assert resp.headers["Retry-After"] == "1"
                    assert body["error"]["code"] == "overloaded"
                    assert "cluster" in body["error"]["message"]
            chat = {"model": "default", "messages": [{"role": "user", "content": "x"}]}
            async with http.post(a.url + "/v1/chat/completions", json=chat) as resp:
                assert resp.status == 503
            # every other route that starts a stream admits through the cluster too
            anthropic = {**chat, "max_tokens": 16}
            async with http.post(b.url + "/v1/messages", json=anthropic) as resp:
                body = await resp.json()
                assert resp.status == 529, body  # Anthropic's overloaded, its SDK retries it
                assert body["error"]["type"] == "overloaded_error"
                assert "cluster" in body["error"]["message"]
            responses = {"model": "default", "input": "x"}
            async with http.post(a.url + "/v1/responses", json=responses) as resp:
                body = await resp.json()
                assert resp.status == 503, body
                assert body["error"]["code"] == "overloaded"
            ui = {"id": "chat1", "messages": [{"id": "m1", "role": "user", "parts": [
                {"type": "text", "text": "x"}]}]}  # fmt: skip
            async with http.post(c.url + "/v1/scenes/chat/ui", json=ui) as resp:
                assert resp.status == 503, await resp.text()
            async with http.ws_connect(c.url + "/v1/ws") as ws:
                await ws.send_json({"type": "run", "runId": "r1", "scene": "chat", "message": "x"})
                async with asyncio.timeout(DEADLINE):
                    refused = await ws.receive_json()
                assert (refused["type"], refused["code"]) == ("error", "overloaded"), refused
            assert len(fake.requests) == 2  # only the two running runs reached the upstream
            # a stream that ends gives its slot back, to any instance
            await post(http, f"{c.url}/v1/runs/{second_id}/cancel")
            await second.last()
            async with run_on(http, c) as third:
                await third.until("start")


async def test_a_killed_instance_frees_its_slots_and_runs_within_the_lease(
    tmp_path: Path, fake: FakeOpenAI, http: aiohttp.ClientSession, shared_redis: str
) -> None:
    limits = "cluster_max_streams = 1"
    async with instances(tmp_path, fake.base_url, shared_redis, 2, limits=limits) as (a, b):
        async with run_on(http, a) as run:
            run_id = (await run.until("start"))["runId"]
            async with http.post(b.url + "/v1/scenes/chat/stream", json={"message": "x"}) as resp:
                assert resp.status == 503  # A holds the cluster's one slot
            a.proc.send_signal(signal.SIGKILL)
            await a.proc.wait()
            killed = time.monotonic()
        freed = None
        async with asyncio.timeout(DEADLINE):
            while freed is None:
                async with http.post(
                    b.url + "/v1/scenes/chat/stream", json={"message": "x"}
                ) as resp:
                    if resp.status == 200:
                        freed = time.monotonic() - killed
                    else:
                        assert resp.status == 503
                        await asyncio.sleep(0.05)
        assert freed < LEASE + 1.0  # the lease, then one admission on a loaded machine
        status, body, _ = await post(http, f"{b.url}/v1/runs/{run_id}/cancel")
        assert (status, body["error"]["code"]) == (404, "not_found")


@contextlib.asynccontextmanager
async def own_redis(port: int) -> AsyncIterator[asyncio.subprocess.Process]:
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed")
    proc = await asyncio.create_subprocess_exec(
        server,
        *("--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with asyncio.timeout(DEADLINE):
            while True:
                if redis_up(port):
                    break
                await asyncio.sleep(0.02)
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def test_a_redis_outage_leaves_each_instance_working_and_heals(
    tmp_path: Path, fake: FakeOpenAI, http: aiohttp.ClientSession
) -> None:
    fake.push(paced(200))  # the run on A through the outage: 10 s, cancelled before its end
    fake.default = lambda body: paced(30)  # 1.5 s
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    limits = "cluster_max_streams = 1"
    async with own_redis(port) as redis:
        async with instances(tmp_path, fake.base_url, url, 2, limits=limits) as (a, b):
            async with run_on(http, a) as through:
                through_id = (await through.until("start"))["runId"]
                redis.kill()
                await redis.wait()
                # B starts a run past the cluster bound (not enforced), which finishes
                async with run_on(http, b) as during:
                    await during.until("start")
                    cancel = f"{b.url}/v1/runs/{through_id}/cancel"
                    status, body, headers = await post(http, cancel)
                    assert (status, body["error"]["code"]) == (503, "cluster_unavailable")
                    assert headers["Retry-After"] == "1"
                    assert (await during.last())["type"] == "done"
                async with own_redis(port):  # restarted empty, mid-run
                    async with asyncio.timeout(DEADLINE):
                        while True:  # both reconnect by themselves
                            if await cluster_up(http, a) and await cluster_up(http, b):
                                break
                            await asyncio.sleep(0.05)
                    # A registered its run again: counted, and reachable from B
                    stream = b.url + "/v1/scenes/chat/stream"
                    async with http.post(stream, json={"message": "x"}) as resp:
                        assert resp.status == 503
                    status, _, _ = await post(http, cancel)
                    assert status == 202
                    last = await through.last()
                    assert (last["type"], last["code"]) == ("error", "cancelled")
                    assert any(e["type"] == "delta" for e in through.events)
            joined = [line for line in a.log if f"test-{a.url.rsplit(':', 1)[1]} joined" in line]
            assert len(joined) == 2, a.log  # at the start, and again after the outage


# --- lean.cluster.Cluster in this process, against a Redis of the test's own --------------


@contextlib.asynccontextmanager
async def joined(
    url: str, name: str, bound: int = 0, *, lease: float = LEASE, active: list[int] | None = None
) -> AsyncIterator[Cluster]:
    """A Cluster that has joined; `active[0]` is the streams it says it relays."""
    streams = [0] if active is None else active
    cluster = Cluster(
        ClusterConfig(instance=name, redis_url=url, lease=lease),
        max_streams=bound,
        streams=lambda: streams[0],
        runs=lambda: [],
    )
    cluster.deliver = lambda request: (404, b"{}")
    cluster.start()
    try:
        async with asyncio.timeout(DEADLINE):
            while True:
                if cluster.up:
                    break
                await asyncio.sleep(0.01)
        yield cluster
    finally:
        await cluster.close()


async def test_two_instances_with_one_name_are_told(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    async with own_redis(port):
        url = f"redis://127.0.0.1:{port}/0"
        async with joined(url, "twin"), joined(url, "twin"):
            await asyncio.sleep(LEASE)  # a few renewals each
    said = [r.getMessage() for r in caplog.records if r.name == "lean.cluster"]
    assert any("two instances share that name" in line for line in said), said


async def test_a_redis_that_stops_answering_admits_without_it() -> None:
    port = free_port()
    async with own_redis(port) as redis:
        url = f"redis://127.0.0.1:{port}/0"
        async with joined(url, "solo", bound=1) as cluster:
            await cluster.admit()  # the one slot
            with pytest.raises(Overloaded):
                await cluster.admit()
            redis.send_signal(signal.SIGSTOP)  # connected, and silent
            try:
                started = time.monotonic()
                await cluster.admit()  # past the bound, but Redis cannot say so
                assert time.monotonic() - started < CALL_TIMEOUT + 0.5
                assert not cluster.up  # not waited for again: reconnecting
                await cluster.admit()  # at once now
                with pytest.raises(ClusterUnavailable):
                    await cluster.route(RunRequest("cancel", "run_x", "default"))
            finally:
                redis.send_signal(signal.SIGCONT)
            async with asyncio.timeout(DEADLINE):
                while True:  # back by itself, its count set again from what runs (none)
                    if cluster.up:
                        break
                    await asyncio.sleep(0.02)
            await cluster.admit()
            with pytest.raises(Overloaded):
                await cluster.admit()


async def test_a_count_gone_wrong_is_set_right_by_the_next_renewal() -> None:
    port = free_port()
    lease = 3.0  # renewed every second: the checks below land well before the first one

    def slots() -> bytes:
        return redis_command(port, ("HGET", "lean:slots", "solo"))

    async with own_redis(port):
        url = f"redis://127.0.0.1:{port}/0"
        active = [0]
        async with joined(url, "solo", bound=5, lease=lease, active=active) as cluster:
            await cluster.admit()
            active[0] += 1
            cluster.stream_started()  # counted by its admission: nothing more sent
            assert slots() == b"$1\r\n1\r\n"
            active[0] -= 1
            cluster.stream_ended()
            await cluster.admit()  # a request that failed before its stream started
            await asyncio.sleep(0.05)  # the HINCRBY -1 is in
            assert slots() == b"$1\r\n1\r\n"  # one slot held for nothing...
            async with asyncio.timeout(lease):
                while True:  # ...until the renewal writes the true count
                    if slots() == b"$1\r\n0\r\n":
                        break
                    await asyncio.sleep(0.05)
