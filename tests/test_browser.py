"""lean's chat page and lean.js in a real browser (Debian's chromium, driven by playwright-core).

One lean (tokens on) against a fake OpenAI upstream runs in a thread for the whole module;
tests/browser/run.mjs runs every scenario in one browser and reports what the page showed;
each test checks one scenario against that report and against what lean saved. The fake
answers by the last user message, so the scenarios need no shared queue.

For the cross-origin scenarios another thread serves a page of "another app" on another
port (another origin), a second lean whose `cors_origins` lists that origin, and a third
lean without tokens (loopback only) that lists the same page as http://localhost:PORT (a
different origin from http://127.0.0.1:PORT), each lean with its own fake upstream.

Skips, saying why, without /usr/bin/chromium, node or tests/browser/node_modules
(`npm ci --prefix tests/browser`; .ci/run installs both).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from lean.sse import SSEParser
from tests.fakes import FakeOpenAI, Stream, text_stream, tool_call_stream
from tests.support import lean_config, running

HERE = Path(__file__).parent / "browser"
LEAN_JS = Path(__file__).parent.parent / "lean" / "web" / "lean.js"
CHROMIUM = os.environ.get("LEAN_CHROMIUM", "/usr/bin/chromium")
NODE = shutil.which("node")
DRIVER = HERE / "node_modules" / "playwright-core"
TOKEN = "browser-test-token-7f3a"

ANSWER = "Hello from the page test: line one.\nLine two, with  two spaces."
THOUGHT = "The user says hello; answer kindly."
XSS = 'Look: <img src=x onerror="window.__pwned=1"> and <b>bold</b> & more.'
SLOW = " ".join(f"word{i}" for i in range(80))
ASKED = '{"question": "Which city?"}'

SCENES = """
[tool.ask_user]
kind = client
description = Ask the user
parameters = {"type": "object", "properties": {"question": {"type": "string"}}}

[tool.clock]
kind = python
function = tests.toolbox:clock

[tool.boom]
kind = python
function = tests.toolbox:boom

[scene.chat]
model = default
system = Be brief.
template = {message}
tools = ask_user, clock, boom

[scene.summary]
model = default
template = Summarise in {words} words: {message}
"""


def _missing() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} is missing (apt-get install chromium)"
    if NODE is None:
        return "node is missing (apt-get install nodejs npm)"
    if not DRIVER.exists():
        return "tests/browser/node_modules is missing (npm ci --prefix tests/browser)"
    return None


MISSING = _missing()
needs_browser = pytest.mark.skipif(MISSING is not None, reason=f"browser tests: {MISSING}")


def behave(body: Any) -> Stream:
    """The fake upstream's answer, chosen by the conversation's last message."""
    last = body["messages"][-1]
    if last["role"] == "tool":
        return text_stream(f"You said {last['content']}.")
    said = last["content"] if isinstance(last["content"], str) else ""
    if "xss" in said:
        return text_stream(XSS)
    if "slow" in said:
        stream = text_stream(SLOW)
        stream.delay = 0.1
        return stream
    if "ask me" in said:
        return tool_call_stream([("call_ask", "ask_user", ASKED)])
    if "tools" in said:
        return tool_call_stream([("call_clock", "clock", "{}"), ("call_boom", "boom", "{}")])
    return text_stream(ANSWER, reasoning=THOUGHT)


class Background(threading.Thread):
    """Servers on their own event loop, for the module's lifetime (`serve` sets them up)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Event | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self.error = exc
            self.ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        await self.serve(self._done)

    async def serve(self, done: asyncio.Event) -> None:
        raise NotImplementedError

    def begin(self) -> None:
        self.start()
        assert self.ready.wait(10), f"{type(self).__name__} did not start"
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        if self._loop is not None and self._done is not None:
            self._loop.call_soon_threadsafe(self._done.set)
        self.join(10)


def get(url: str, token: str | None = TOKEN) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=5) as response:
        body = response.read()
        return json.loads(body) if response.headers["Content-Type"].endswith("json") else body


class Cutter:
    """A TCP relay in front of lean that a page can cut: `GET /__cut` on it closes every
    other connection through it at once, as a network that drops would (never sent on).
    The browser may send `/__cut` on a kept-alive connection it used before, so every
    request the relay passes on is looked at, not only a connection's first."""

    CUT = b"GET /__cut"

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = ""
        self.open: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.relay, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def cut(self, writer: asyncio.StreamWriter) -> None:
        for other in list(self.open - {writer}):
            other.transport.abort()
        writer.write(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.transport.abort()

    async def relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.open |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, page: bool) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    if page and data.startswith(self.CUT):
                        self.open -= {writer}
                        await self.cut(writer)
                        break
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        try:
            await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))
        finally:
            self.open -= {writer, up_writer}

    async def close(self) -> None:
        for writer in list(self.open):
            writer.transport.abort()
        if self.server is not None:
            self.server.close()


class Lean(Background):
    """lean (tokens on, no cors_origins) and its fake upstream; `cutter` relays to it."""

    def __init__(self) -> None:
        super().__init__()
        self.url = ""
        self.fake: FakeOpenAI | None = None
        self.cutter: Cutter | None = None

    async def serve(self, done: asyncio.Event) -> None:
        async with FakeOpenAI() as fake:
            fake.default = behave
            self.fake = fake
            config = lean_config(fake.base_url, extra=SCENES, environ={"LEAN_TOKENS": TOKEN})
            async with running(config) as server:
                self.url = server.url
                self.cutter = Cutter(int(server.url.rsplit(":", 1)[1]))
                await self.cutter.start()
                self.ready.set()
                try:
                    await done.wait()
                finally:
                    await self.cutter.close()

    def get(self, path: str) -> Any:
        return get(self.url + path)


OTHER_PAGE = b"<!doctype html><meta charset=utf-8><title>another app</title><p>another app"


class Elsewhere(Background):
    """Another app's page on another origin; a lean that lists it; a lean without tokens that
    lists only the same page reached by the name localhost."""

    def __init__(self) -> None:
        super().__init__()
        self.page = self.page_by_name = self.listed = self.open = ""
        self.listed_fake: FakeOpenAI | None = None
        self.open_fake: FakeOpenAI | None = None

    async def serve(self, done: asyncio.Event) -> None:
        app = web.Application()

        async def page(request: web.Request) -> web.Response:
            return web.Response(body=OTHER_PAGE, content_type="text/html")

        app.router.add_get("/", page)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        self.page = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            async with FakeOpenAI() as listed_fake, FakeOpenAI() as open_fake:
                listed_fake.default = open_fake.default = behave
                self.listed_fake, self.open_fake = listed_fake, open_fake
                listed = lean_config(
                    listed_fake.base_url,
                    server=f"cors_origins = {self.page}",
                    extra=SCENES,
                    environ={"LEAN_TOKENS": TOKEN},
                )
                # Loopback, no tokens; lists the same page reached as localhost, another origin.
                self.page_by_name = self.page.replace("127.0.0.1", "localhost")
                unguarded = lean_config(
                    open_fake.base_url, server=f"cors_origins = {self.page_by_name}", extra=SCENES
                )
                async with running(listed) as one, running(unguarded) as other:
                    self.listed, self.open = one.url, other.url
                    self.ready.set()
                    await done.wait()
        finally:
            await runner.cleanup()


@pytest.fixture(scope="module")
def lean() -> Iterator[Lean]:
    server = Lean()
    server.begin()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def elsewhere() -> Iterator[Elsewhere]:
    servers = Elsewhere()
    servers.begin()
    yield servers
    servers.stop()


SCENARIOS = ["chat", "xss", "stop", "reload", "dropped", "waiting", "tools", "inputs", "history"]
SCENARIOS += ["phone", "leanjs"]
SCENARIOS += ["crossOrigin", "crossOriginRefused", "unlistedLoopback"]


@pytest.fixture(scope="module")
def seen(
    lean: Lean, elsewhere: Elsewhere, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """What the browser saw, per scenario (one browser, one run of run.mjs)."""
    shots = os.environ.get("LEAN_SCREENSHOTS") or str(tmp_path_factory.mktemp("shots"))
    cross = {"page": elsewhere.page, "listed": elsewhere.listed, "open": elsewhere.open}
    assert lean.cutter is not None
    cross["cutter"] = lean.cutter.url
    args = {"url": lean.url, "token": TOKEN, "shots": shots, "scenarios": SCENARIOS, "cross": cross}
    assert NODE is not None
    done = subprocess.run(
        [NODE, str(HERE / "run.mjs"), json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results: dict[str, Any] = json.loads(done.stdout)
    return results


def scenario(seen: dict[str, Any], name: str) -> dict[str, Any]:
    result = seen[name]
    assert "failed" not in result, result["failed"]
    assert result["errors"] == [], result["errors"]  # no script error, no CSP refusal
    return result


def saved_answer(lean: Lean, conversation_id: str) -> dict[str, Any]:
    """The conversation's first answer (the phone scenario adds a turn to one of them)."""
    messages = lean.get(f"/v1/conversations/{conversation_id}/messages")["messages"]
    answer: dict[str, Any] = next(m for m in messages if m["role"] == "assistant")
    return answer


@needs_browser
def test_the_page_streams_an_answer_and_shows_what_lean_saved(
    lean: Lean, seen: dict[str, Any]
) -> None:
    result = scenario(seen, "chat")
    assert result["askedForToken"] is True  # /v1/scenes said 401: the page asks
    assert result["status"] == "complete"
    assert result["text"] == ANSWER  # line breaks and double spaces kept
    assert result["thinking"] == "Thinking" + THOUGHT
    assert result["thinkingOpen"] is False and result["thinkingVisible"] is False
    assert result["listed"] >= 1
    assert result["tokenInSession"] is True and result["tokenInLocal"] is False
    saved = saved_answer(lean, result["conversationId"])
    assert saved["content"] == result["text"] and saved["status"] == "complete"


@needs_browser
def test_model_text_is_never_html(seen: dict[str, Any]) -> None:
    result = scenario(seen, "xss")
    assert result["status"] == "complete"
    assert result["text"] == XSS
    assert result["images"] == 0 and result["pwned"] is False


@needs_browser
def test_stop_cancels_the_run_and_lean_saves_it_cancelled(lean: Lean, seen: dict[str, Any]) -> None:
    result = scenario(seen, "stop")
    assert result["status"] == "cancelled" and result["sendBack"] is True
    assert 0 < len(result["text"]) < len(SLOW)
    saved = saved_answer(lean, result["conversationId"])
    assert saved["status"] == "cancelled"
    assert SLOW.startswith(saved["content"]) and saved["content"].startswith(result["text"])


@needs_browser
def test_a_reload_mid_answer_reads_the_answer_again_to_its_end(
    lean: Lean, seen: dict[str, Any]
) -> None:
    result = scenario(seen, "reload")
    assert 0 < len(result["before"]) < len(SLOW)  # reloaded mid-answer
    assert result["status"] == "complete" and result["text"] == SLOW  # whole, nothing twice
    assert result["answers"] == 1
    saved = saved_answer(lean, result["conversationId"])
    assert saved["status"] == "complete" and saved["content"] == SLOW  # the run went on


@needs_browser
def test_lean_js_resumes_a_dropped_stream_by_itself(seen: dict[str, Any]) -> None:
    result = scenario(seen, "dropped")
    assert result["resumes"] >= 1  # the connection was cut and lean.js came back
    assert result["last"] == "done" and result["text"] == SLOW
    assert result["seqs"] == list(range(1, len(result["seqs"]) + 1))  # nothing twice or missing


@needs_browser
def test_a_waiting_tool_is_answered_in_the_page(lean: Lean, seen: dict[str, Any]) -> None:
    result = scenario(seen, "waiting")
    assert json.loads(result["asked"]) == json.loads(ASKED)
    assert result["cardState"] == "done" and result["cardResult"] == "Paris"
    assert result["status"] == "complete" and result["text"] == "You said Paris."
    saved = saved_answer(lean, result["conversationId"])
    assert saved["toolCalls"][0]["result"] == "Paris" and saved["content"] == "You said Paris."
    assert Path(result["screenshot"]).stat().st_size > 10_000


@needs_browser
def test_tool_cards_show_results_durations_and_errors(lean: Lean, seen: dict[str, Any]) -> None:
    result = scenario(seen, "tools")
    clock, boom = result["cards"]
    assert clock["name"] == "clock" and clock["state"] == "done" and not clock["error"]
    assert clock["result"] == "2026-11-21T16:40:00Z" and clock["label"].endswith(" ms")
    assert boom["name"] == "boom" and boom["state"] == "error" and boom["error"]
    assert "boom" in boom["result"] and boom["label"].startswith("failed")


@needs_browser
def test_scene_inputs_are_fields_of_the_page(lean: Lean, seen: dict[str, Any]) -> None:
    result = scenario(seen, "inputs")
    assert result["fields"] == ["words"]
    assert result["refusedStatus"] == "error" and "words" in result["failure"]
    assert result["status"] == "complete" and result["text"] == ANSWER
    messages = lean.get(f"/v1/conversations/{result['conversationId']}/messages")["messages"]
    # saved as typed, the template the page's input filled beside it
    assert (messages[0]["content"], messages[0]["prompt"]) == (
        "dear diary",
        "Summarise in 5 words: dear diary",
    )


@needs_browser
def test_a_new_tab_lists_conversations_and_shows_their_history(seen: dict[str, Any]) -> None:
    result = scenario(seen, "history")
    assert {"Hello there", "show me xss", "use your tools"} <= set(result["list"])
    assert result["articles"] == 2 and result["cards"] == 2 and result["errorCards"] == 1


@needs_browser
def test_the_page_fits_a_phone(seen: dict[str, Any]) -> None:
    result = scenario(seen, "phone")
    assert result["scroll"] <= result["client"] == 390
    assert result["composer"] <= 390


@needs_browser
def test_lean_js_streams_over_fetch_and_websocket_and_chat_completions(
    seen: dict[str, Any],
) -> None:
    result = scenario(seen, "leanjs")
    fetch = result["fetch"]
    assert fetch["types"][0] == "start" and fetch["types"][-1] == "done"
    assert "delta" in fetch["types"] and fetch["text"] == ANSWER
    assert fetch["seqs"] == list(range(1, len(fetch["seqs"]) + 1))  # the SSE ids, in order
    assert fetch["done"]["text"] == ANSWER
    assert result["unauthorized"] == {"name": "LeanError", "status": 401, "code": "unauthorized"}

    ws = result["ws"]
    assert len(set(ws["runIds"])) == 3 and ws["allOwnRunId"] is True
    assert ws["slow"][-1] == "error" and ws["slowLast"]["code"] == "cancelled"
    assert ws["quick"][-1] == "done" and ws["quickText"] == ANSWER
    assert "waiting" in ws["ask"] and ws["ask"][-1] == "done" and ws["askText"] == "You said Oslo."

    assert result["chat"]["text"] == ANSWER and result["chat"]["chunks"] > 3
    assert result["unknownModel"] == {"status": 404, "code": "not_found"}


# --- from a page on another origin ---


def rejections(url: str, reason: str) -> int:
    """lean_admission_rejections_total{reason} from a lean without tokens, or with TOKEN."""
    text = get(url + "/metrics").decode()
    line = f'lean_admission_rejections_total{{reason="{reason}"}} '
    return next((int(float(x[len(line) :])) for x in text.splitlines() if x.startswith(line)), 0)


def asked(fake: FakeOpenAI | None, words: str) -> int:
    """How many requests the fake upstream got whose last message says `words`."""
    assert fake is not None
    return sum(
        words in json.dumps(r.body["messages"][-1]) for r in fake.requests if r.body is not None
    )


@needs_browser
def test_a_listed_origin_imports_lean_js_and_streams_over_fetch_eventsource_and_websockets(
    elsewhere: Elsewhere, seen: dict[str, Any]
) -> None:
    result = scenario(seen, "crossOrigin")
    assert result["origin"] == elsewhere.page != elsewhere.listed  # another origin indeed
    assert result["console"] == []  # no CORS complaint from the browser
    fetch = result["fetch"]
    assert fetch["types"][0] == "start" and fetch["types"][-1] == "done"
    assert fetch["text"] == ANSWER and result["saved"] == ANSWER
    source = result["eventSource"]
    assert source["how"] == "done" and source["text"] == ANSWER
    assert source["ids"][0] == "1" and source["done"]["text"] == ANSWER
    assert result["ws"]["types"][-1] == "done" and result["ws"]["text"] == ANSWER
    by_protocol = result["bySubprotocol"]  # the token as a subprotocol, not in the URL
    assert by_protocol["protocol"] == "lean" and by_protocol["types"][-1] == "done"
    assert by_protocol["text"] == ANSWER
    assert result["chatText"] == ANSWER
    assert result["refused"] == {"status": 401, "code": "unauthorized"}  # readable: CORS on errors
    assert asked(elsewhere.listed_fake, "hello from afar") == 5


@needs_browser
def test_an_origin_not_listed_is_refused_by_the_browser_and_by_lean(
    lean: Lean, seen: dict[str, Any]
) -> None:
    result = scenario(seen, "crossOriginRefused")
    assert result["imported"] == "TypeError"  # no Access-Control-Allow-Origin on lean.js
    failure = result["fetchError"]  # the preflight refused: fetch fails, no status to read
    assert failure["name"] == "LeanError" and failure["status"] == 0
    assert failure["message"].startswith("cannot reach lean")
    assert result["eventSource"]["types"] == [] and result["eventSource"]["how"] == "closed"
    assert result["ws"]["opened"] is False and result["ws"]["code"] == 1006
    assert asked(lean.fake, "refused from afar") == 0
    # lean itself refused them (not only the browser): the preflight, the EventSource, the socket.
    assert rejections(lean.url, "origin") >= 3


@needs_browser
def test_a_page_not_listed_starts_no_run_on_a_loopback_lean_without_tokens(
    elsewhere: Elsewhere, seen: dict[str, Any]
) -> None:
    result = scenario(seen, "unlistedLoopback")
    assert result["json"] == "TypeError"  # the preflight got 403
    assert result["simple"] == "opaque"  # sent (a no-cors POST), refused by lean
    assert result["eventSource"]["types"] == [] and result["eventSource"]["how"] == "closed"
    assert result["ws"]["opened"] is False
    assert result["image"] == "error" and result["form"] == "submitted"
    # Each reached lean and was refused there: JSON preflight, no-cors POST, EventSource,
    # WebSocket and form carry an Origin; the <img> only Sec-Fetch-Site.
    assert rejections(elsewhere.open, "origin") == 5
    assert rejections(elsewhere.open, "fetch_site") == 1
    # The one request the fake upstream saw: the same page reached as localhost, listed.
    listed = result["fromListed"]
    assert listed["origin"] == elsewhere.page_by_name and listed["status"] == 200
    assert listed["text"] == ANSWER
    assert elsewhere.open_fake is not None
    assert [asked(elsewhere.open_fake, w) for w in ("spend it", "from localhost")] == [0, 1]
    assert len(elsewhere.open_fake.requests) == 1


# --- lean.js's SSE reader against lean/sse.py, at every split (node only, no browser) ----

VECTORS: list[bytes] = [
    b"data: YHOO\ndata: +2\ndata: 10\n\n",  # WHATWG's examples
    b": test stream\n\ndata: first event\nid: 1\n\ndata:second event\nid\n\ndata:  third event\n\n",
    b"data\n\ndata\ndata\n\ndata:",
    b"data:test\n\ndata: test\n\n",
    b"event: add\ndata: 73857293\n\nevent: remove\ndata: 2153\n\nevent: add\ndata: 113411\n\n",
    b"data: a\rdata: b\r\rdata: c\r\n\r\ndata: d\n\n",  # CR, CRLF and LF
    b"data: x\r\r\ndata: y\r\n\r\n",  # CR CR LF: two line ends
    b"data: a\r\ndata: b\r\n\r\n",  # a CRLF split across reads is one line end
    b"\xef\xbb\xbfdata: bom\n\n\xef\xbb\xbfdata: kept\n\n",  # one leading BOM only
    b"id: a\x00b\ndata: nul id ignored\n\nid: 7\ndata: x\n\ndata: keeps 7\n\nid\ndata: reset\n\n",
    b"retry: 1000\ndata: r\n\nretry: 1x\ndata: s\n\n",
    b"data: caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80\n\n",  # multi-byte, split inside
    b"data: bad \xff byte\n\n",
    b"data: line \xe2\x80\xa8 sep\n\n",  # U+2028 is not a line end
    b'event: delta\nid: 3\ndata: {"type":"delta"}\n\n: ping\n\nevent: done\ndata: end\n\n',
    b"Data: case\ndata : space\nfoo: bar\ndata: only this\n\n",
    b"data: unterminated at the end",
]


def python_messages(stream: bytes) -> list[list[Any]]:
    parser = SSEParser()
    messages = parser.feed(stream)
    parser.close()
    return [[m.event or "message", m.data, m.id or "", m.retry] for m in messages]


@pytest.mark.skipif(NODE is None, reason="lean.js tests: node is missing")
def test_lean_js_sse_reader_matches_lean_sse_at_every_split() -> None:
    vectors = [base64.b64encode(v).decode() for v in VECTORS]
    done = subprocess.run(
        [NODE, str(HERE / "sse.mjs"), str(LEAN_JS)],
        input=json.dumps(vectors),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)
    for vector, result in zip(VECTORS, results, strict=True):
        assert result["mismatches"] == [], (vector, result["mismatches"][:3])
        assert result["messages"] == python_messages(vector), vector
