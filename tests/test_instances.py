"""Several `lean serve` processes on one host and one store (docs/deploy.md §11).

Real processes, a real fake upstream on 127.0.0.1, one store file: two instances sharing a
port with `reuse_port` both serve (their answers' rows say which one wrote them), and an
instance killed with SIGKILL and started again ends its own cut answer (`incomplete`) but
not the answer the other instance is still streaming (on one SQLite file and on one
PostgreSQL database).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import socket
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.fakes import FakeOpenAI, free_port, text_stream
from tests.store_targets import Target

pytestmark = [pytest.mark.timeout(60), pytest.mark.one_loop]

START_TIMEOUT = 15.0  # seconds for `lean serve` to listen (the suite runs on 2 busy cores)
STOP_TIMEOUT = 10.0
RUNS = 24  # on fresh connections: all on one of two instances by chance is 2 in 2**24


def write_config(tmp_path: Path, upstream: str, server: str, store: str = "") -> Path:
    config = tmp_path / "config.ini"
    store = store or f"path = {tmp_path / 'lean.db'}"
    config.write_text(
        f"[server]\nhost = 127.0.0.1\ndrain_timeout = 0.5\n{server}\n"
        f"[store]\n{store}\nflush_interval = 0.1\n"
        f"[provider.up]\nkind = openai\nbase_url = {upstream}\nread_timeout = 30\n"
        "[model.default]\nprovider = up\nupstream_model = fake-model\n"
        # A client that leaves cancels at once (no grace for a resume): the tests end runs so.
        "[scene.chat]\nmodel = default\nresume_grace = 0\n"
    )
    return config


class Lean:
    """One `lean serve` process, its stderr in a file."""

    def __init__(self, config: Path, log: Path, *args: str) -> None:
        self.config, self.log, self.args = config, log, args
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.log.write_bytes(b"")
        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "lean", "serve", "--config", str(self.config), *self.args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=log,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while b"lean listening" not in self.log.read_bytes():  # its socket is bound by then
            assert self.proc.returncode is None, self.log.read_text()
            assert time.monotonic() < deadline, f"not listening: {self.log.read_text()}"
            await asyncio.sleep(0.05)

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        proc = self.proc
        assert proc is not None
        if proc.returncode is None:
            proc.send_signal(sig)
        try:
            return await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise


@contextlib.asynccontextmanager
async def instances(*leans: Lean) -> AsyncIterator[None]:
    try:
        for lean in leans:
            await lean.start()
        yield
    finally:
        for lean in leans:
            if lean.proc is not None and lean.proc.returncode is None:
                await lean.stop()


ANSWERS = "SELECT status, instance, run_id FROM messages WHERE role = 'assistant'"


def rows(db: Path | Target) -> list[tuple[str, str, str]]:
    """(status, instance, run_id) of every answer."""
    if isinstance(db, Target):
        return [(s, i, r) for s, i, r in db.sql(ANSWERS)]
    if not db.exists():
        return []
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute(ANSWERS).fetchall()


async def until_rows(db: Path | Target, check: str, want: int) -> list[tuple[str, str, str]]:
    """Poll until `want` answers have status `check`; all answers."""
    deadline = time.monotonic() + 10.0
    while True:
        found = rows(db)
        if sum(status == check for status, _, _ in found) >= want:
            return found
        assert time.monotonic() < deadline, found
        await asyncio.sleep(0.05)


async def one_run(http: aiohttp.ClientSession, url: str) -> bytes:
    async with http.post(f"{url}/v1/scenes/chat/stream", json={"message": "Hi"}) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.read()


async def test_two_instances_share_a_port_and_both_serve(tmp_path: Path) -> None:
    async with FakeOpenAI() as upstream:
        port = free_port()
        config = write_config(tmp_path, upstream.base_url, f"port = {port}\nreuse_port = true")
        a = Lean(config, tmp_path / "a.log", "--instance", "web-a")
        b = Lean(config, tmp_path / "b.log", "--instance", "web-b")
        url = f"http://127.0.0.1:{port}"
        async with instances(a, b):
            # force_close: one connection per run, each placed by the kernel afresh. At once:
            # both processes commit to the one file at the same time.
            connector = aiohttp.TCPConnector(force_close=True)
            async with aiohttp.ClientSession(connector=connector) as http:
                bodies = await asyncio.gather(*(one_run(http, url) for _ in range(RUNS)))
            assert all(b"event: done" in body for body in bodies)
            by_instance: dict[str, int] = {}
            for status, instance, _ in rows(tmp_path / "lean.db"):
                assert status == "complete"
                by_instance[instance] = by_instance.get(instance, 0) + 1
            assert sum(by_instance.values()) == RUNS
            assert set(by_instance) == {"web-a", "web-b"}, by_instance  # the kernel used both
        assert a.proc is not None and b.proc is not None
        assert (a.proc.returncode, b.proc.returncode) == (0, 0)


async def test_a_restarted_instance_ends_only_its_own_cut_answers(
    tmp_path: Path, target: Target
) -> None:
    async with FakeOpenAI() as upstream:
        # A plain answer, then two that send their first words and hold the stream open
        # until lean leaves (one on each instance).
        held = [text_stream("one two three four five") for _ in range(2)]
        for stream in held:
            stream.stall_after = 3
        upstream.push(text_stream("one two three four five"), *held)
        db = target  # one SQLite file, or one PostgreSQL database
        store = f"{'url' if target.kind == 'postgresql' else 'path'} = {target.where}"
        config = write_config(tmp_path, upstream.base_url, "", store)
        port_a, port_b = free_port(), free_port()
        a = Lean(config, tmp_path / "a.log", "--port", str(port_a))  # default name: host:port
        b = Lean(config, tmp_path / "b.log", "--port", str(port_b))
        name_a, name_b = f"{socket.gethostname()}:{port_a}", f"{socket.gethostname()}:{port_b}"
        async with instances(a, b), aiohttp.ClientSession() as http:
            await one_run(http, f"http://127.0.0.1:{port_a}")  # the plain answer: a completes
            runs = []
            for port in (port_a, port_b):
                resp = await http.post(
                    f"http://127.0.0.1:{port}/v1/scenes/chat/stream", json={"message": "Hi"}
                )
                assert resp.status == 200
                runs.append(resp)
            found = await until_rows(db, "streaming", 2)
            assert sorted((s, i) for s, i, _ in found if s == "streaming") == sorted(
                [("streaming", name_a), ("streaming", name_b)]
            )

            await b.stop(signal.SIGKILL)  # b dies mid-answer ...
            runs[1].close()
            await b.start()  # ... and comes back on the same port, with the same name
            after = {(instance, status) for status, instance, _ in rows(db)}
            assert (name_b, "incomplete") in after  # its own cut answer, ended at start-up
            assert (name_a, "streaming") in after  # a's answer is a's: still running
            assert (name_a, "complete") in after

            runs[0].close()  # a's client leaves: a ends its answer itself
            final = await until_rows(db, "cancelled", 1)
            assert sorted((i, s) for s, i, _ in final) == sorted(
                [(name_a, "complete"), (name_a, "cancelled"), (name_b, "incomplete")]
            )


# --- behind nginx, one port per instance: the exact config of docs/deploy.md ---------------

DEPLOY = Path(__file__).resolve().parent.parent / "docs" / "deploy.md"


def deploy_upstream_config() -> str:
    """The nginx block of docs/deploy.md "More than one instance", as the docs give it."""
    section = DEPLOY.read_text().partition("## 11. More than one instance")[2]
    return section.partition("```nginx\n")[2].partition("```")[0]


def nginx_config(tmp_path: Path, port: int, ports: tuple[int, int]) -> Path:
    block = deploy_upstream_config()
    assert "127.0.0.1:8081" in block and "127.0.0.1:8082" in block
    block = block.replace("127.0.0.1:8081", f"127.0.0.1:{ports[0]}")
    block = block.replace("127.0.0.1:8082", f"127.0.0.1:{ports[1]}")
    listen = "# ... as in §8: listen, TLS, client_max_body_size ..."
    assert listen in block
    block = block.replace(listen, f"listen 127.0.0.1:{port};")
    path = tmp_path / "nginx.conf"
    path.write_text(
        f"error_log {tmp_path / 'nginx.log'} warn;\npid {tmp_path / 'nginx.pid'};\n"
        "events {}\nhttp {\n    access_log off;\n"
        f"    client_body_temp_path {tmp_path};\n    proxy_temp_path {tmp_path};\n"
        # as in docs/deploy.md §8
        "    map $http_upgrade $connection_upgrade { default upgrade; '' ''; }\n"
        f"{block}}}\n"
    )
    return path


@pytest.mark.skipif(shutil.which("nginx") is None, reason="no nginx here")
async def test_behind_nginx_streams_flow_and_a_stopped_instance_is_skipped(
    tmp_path: Path,
) -> None:
    async with FakeOpenAI() as upstream:
        slow = [text_stream("one two three four five six") for _ in range(2)]
        for stream in slow:
            stream.delay = 0.1  # between events: a buffering proxy would hold them all
        upstream.push(*slow)
        config = write_config(tmp_path, upstream.base_url, "")
        ports = (free_port(), free_port())
        a = Lean(config, tmp_path / "a.log", "--port", str(ports[0]), "--instance", "a")
        b = Lean(config, tmp_path / "b.log", "--port", str(ports[1]), "--instance", "b")
        port = free_port()
        conf = nginx_config(tmp_path, port, ports)
        nginx = await asyncio.create_subprocess_exec(
            shutil.which("nginx") or "nginx", "-c", str(conf), "-g", "daemon off;",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            async with instances(a, b), aiohttp.ClientSession() as http:
                deadline = time.monotonic() + START_TIMEOUT
                while True:  # nginx listening
                    try:
                        async with http.get(f"{url}/healthz") as resp:
                            if resp.status == 200:
                                break
                    except aiohttp.ClientConnectionError:
                        pass
                    assert time.monotonic() < deadline, (tmp_path / "nginx.log").read_text()
                    await asyncio.sleep(0.05)

                # SSE through nginx arrives as it is sent, not at the end.
                started = time.monotonic()
                body = {"message": "Hi"}
                async with http.post(f"{url}/v1/scenes/chat/stream", json=body) as resp:
                    assert resp.status == 200
                    first = None
                    async for line in resp.content:
                        if first is None and line.startswith(b"event: delta"):
                            first = time.monotonic() - started
                    total = time.monotonic() - started
                assert first is not None and total - first >= 0.3, (first, total)

                # A run over the WebSocket through nginx.
                async with http.ws_connect(f"{url}/v1/ws") as ws:
                    await ws.send_json({"type": "run", "runId": "r1", "scene": "chat",
                                        "message": "Hi"})  # fmt: skip
                    async for message in ws:
                        frame = message.json()
                        if frame["type"] in ("done", "error"):
                            break
                    assert frame["type"] == "done", frame

                # ip_hash keeps this client on one instance; stop it, and the next
                # requests go to the other (proxy_next_upstream).
                served = {instance for _, instance, _ in rows(tmp_path / "lean.db")}
                assert len(served) == 1, served
                first_lean = a if served == {"a"} else b
                assert await first_lean.stop() == 0
                for _ in range(3):
                    assert (await one_run(http, url)).count(b"event: done") == 1
                assert {i for _, i, _ in rows(tmp_path / "lean.db")} == {"a", "b"}
        finally:
            if nginx.returncode is None:
                nginx.terminate()
            await nginx.wait()
