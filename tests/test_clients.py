"""Clients and their limits (lean.clients, docs/protocol.md §8): real HTTP and WebSocket
clients against lean on a socket, a real fake upstream reporting usage. Every limit hit
with its 429 + Retry-After in the route's error shape, scenes and models a client may not
use, conversations and runs owned by their client (404 to another), /metrics by client,
and the `[auth]` tokens working as before.

Minute windows stay fast without touching lean's clock: a client with
`requests_per_minute = 2` is refused on its third request (Retry-After ~30 s, asserted, not
waited for), and one with `requests_per_minute = 60, requests_burst = 1` shows the refill
after a second."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from lean.app import Server
from lean.clients import Clients, MemoryLimiter
from lean.config import ClientConfig, Config
from lean.errors import RateLimited
from lean.metrics import Metrics
from lean.providers.base import Usage
from tests.fakes import FakeOpenAI, Reply, Stream, completion, text_stream, tool_call_stream
from tests.support import chat_body, lean_config, read_sse_data, running

TOKENS = {
    "LEAN_TOKENS": "legacy-token",
    "ALPHA_TOKENS": "alpha-token",
    "BETA_TOKENS": "beta-token",
    "GAMMA_TOKENS": "gamma-token",
    "DELTA_TOKENS": "delta-token, delta-token-2",
}
CLIENTS = """
[model.other]
provider = up
upstream_model = fake-other

[tool.ask_user]
kind = client
description = Ask the user
parameters = {"type": "object", "properties": {"question": {"type": "string"}}}

[scene.chat]
model = default
template = {message}
resume_grace = 0  ; leaving cancels at once (test_resume_handlers.py: the grace)

[scene.costly]
model = other
template = {message}

[scene.asking]
model = default
template = {message}
tools = ask_user

[client.alpha]
token_env = ALPHA_TOKENS
max_streams = 1

[client.beta]
token_env = BETA_TOKENS
scenes = chat
models = default
requests_per_minute = 2

[client.gamma]
token_env = GAMMA_TOKENS
tokens_per_day = 20

[client.delta]
token_env = DELTA_TOKENS
requests_per_minute = 60
requests_burst = 1
"""
# The fake's usage: 8 prompt tokens + one per word of its default answer (5 words).
TOKENS_PER_ANSWER = 13


def config(fake: FakeOpenAI) -> Config:
    return lean_config(fake.base_url, extra=CLIENTS, environ=TOKENS)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


ALPHA, BETA, GAMMA, DELTA = (auth(f"{n}-token") for n in ("alpha", "beta", "gamma", "delta"))
LEGACY = auth("legacy-token")


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as f:
        yield f


@pytest.fixture
async def lean(fake: FakeOpenAI) -> AsyncIterator[Server]:
    async with running(config(fake)) as server:
        yield server


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


async def chat(
    http: aiohttp.ClientSession, lean: Server, headers: dict[str, str], **body: Any
) -> tuple[int, dict[str, str], Any]:
    """A chat completion: (status, headers, the JSON body or the SSE data lines)."""
    async with http.post(
        f"{lean.url}/v1/chat/completions", json=chat_body(**body), headers=headers
    ) as resp:
        if resp.content_type == "text/event-stream":
            return resp.status, dict(resp.headers), await read_sse_data(resp)
        return resp.status, dict(resp.headers), await resp.json()


def sse_events(raw: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for block in raw.split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in block.split("\n") if line and not line.startswith(":")
        )
        if fields:
            out.append((fields["event"], json.loads(fields["data"])))
    return out


async def scene_run(
    http: aiohttp.ClientSession,
    lean: Server,
    headers: dict[str, str],
    scene: str = "chat",
    **body: Any,
) -> tuple[int, Any]:
    """A whole scene run over SSE: (status, its events or the error body)."""
    body.setdefault("message", "Hi")
    url = f"{lean.url}/v1/scenes/{scene}/stream"
    async with http.post(url, json=body, headers=headers) as resp:
        if resp.status != 200:
            return resp.status, await resp.json()
        return 200, sse_events(await resp.text())


async def metric(http: aiohttp.ClientSession, lean: Server, series: str) -> float:
    async with http.get(f"{lean.url}/metrics", headers=LEGACY) as resp:
        assert resp.status == 200
        text = await resp.text()
    found = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


# --- max_streams ---------------------------------------------------------------------------


def held() -> Stream:
    """An answer that starts and then holds its stream open (until lean closes it)."""
    stream = text_stream("one two three four five six")
    stream.stall_after = 2
    return stream


async def wait_metric(http: aiohttp.ClientSession, lean: Server, series: str, value: float) -> None:
    async with asyncio.timeout(5):
        while await metric(http, lean, series) != value:  # noqa: ASYNC110 - polled over HTTP
            await asyncio.sleep(0.02)


async def test_max_streams_refuses_a_second_stream_of_that_client_only(
    fake: FakeOpenAI, lean: Server, http: aiohttp.ClientSession
) -> None:
    fake.push(held())
    first = asyncio.create_task(chat(http, lean, ALPHA))
    await fake.wait_request(0)
    status, headers, body = await chat(http, lean, ALPHA)
    assert status == 429
    assert headers["Retry-After"] == "1"
    assert body["error"]["code"] == "rate_limited"
    assert body["error"]["type"] == "rate_limit_error"
    assert "1 streams" in body["error"]["message"]
    # the same slot on a scene route, before any provider call
    status, error = await scene_run(http, lean, ALPHA)
    assert (status, error["error"]["code"]) == (429, "rate_limited")
    assert len(fake.requests) == 1
    # other clients are not held by alpha's limit
    assert (await chat(http, lean, LEGACY))[0] == 200
    assert (await chat(http, lean, GAMMA))[0] == 200
    assert await metric(http, lean, 'lean_client_active_streams{client="alpha"}') == 1
    first.cancel()  # the client leaves: lean closes the upstream and frees the slot
    await fake.wait_disconnect(0)
    await wait_metric(http, lean, 'lean_client_active_streams{client="alpha"}', 0)
    assert (await chat(http, lean, ALPHA))[0] == 200
    rejections = 'lean_client_rejections_total{client="alpha",limit="max_streams"}'
    assert await metric(http, lean, rejections) == 2


async def test_a_refused_websocket_run_gets_an_error_frame_with_retry_after(
    fake: FakeOpenAI, lean: Server, http: aiohttp.ClientSession
) -> None:
    fake.push(held())
    async with http.ws_connect(f"{lean.url}/v1/ws", headers=ALPHA) as ws:
        await ws.send_json({"type": "run", "runId": "r1", "scene": "chat", "message": "Hi"})
        await fake.wait_request(0)
        await ws.send_json({"type": "run", "runId": "r2", "scene": "chat", "message": "Hi"})
        refused = None
        while refused is None:
            frame = await ws.receive_json(timeout=5)
            if frame["runId"] == "r2":
                refused = frame
        assert refused["type"] == "error"
        assert (refused["code"], refused["retryAfter"], refused["retryable"]) == (
            "rate_limited",
            1,
            True,
        )
        await ws.send_json({"type": "cancel", "runId": "r1"})
        while (frame := await ws.receive_json(timeout=5))["type"] != "error":
            assert frame["runId"] == "r1"
        assert (frame["runId"], frame["code"]) == ("r1", "cancelled")
        assert "retryAfter" not in frame
        # its slot is free again: the next run of the socket goes through
        await ws.send_json({"type": "run", "runId": "r3", "scene": "chat", "message": "Hi"})
        while (frame := await ws.receive_json(timeout=5))["type"] not in ("done", "error"):
            assert frame["runId"] == "r3"
        assert (frame["runId"], frame["type"]) == ("r3", "done")
    assert len(fake.requests) == 2


# --- requests_per_minute ---------------------------------------------------------------------


async def test_requests_per_minute_refuses_past_the_burst_with_the_wait_until_the_next(
    fake: FakeOpenAI, lean: Server, http: aiohttp.ClientSession
) -> None:
    assert (await chat(http, lean, BETA))[0] == 200
    assert (await scene_run(http, lean, BETA))[0] == 200  # scene runs count the same
    status, headers, body = await chat(http, lean, BETA)
    assert status == 429
    # 2 a minute: one every 30 s once the burst of 2 is spent
    assert 28 <= int(headers["Retry-After"]) <= 30
    assert body["error"]["code"] == "rate_limited"
    status, error = await scene_run(http, lean, BETA)
    assert status == 429 and error["error"]["code"] == "rate_limited"
    assert len(fake.requests) == 2
    assert (await chat(http, lean, LEGACY))[0] == 200  # the default client has no limits
    limit = 'lean_client_rejections_total{client="beta",limit="requests_per_minute"}'
    assert await metric(http, lean, limit) == 2
    assert await metric(http, lean, 'lean_client_requests_total{client="beta"}') == 2


async def test_the_rate_refills_at_requests_per_minute(
    fake: FakeOpenAI, lean: Server, http: aiohttp.ClientSession
) -> None:
    assert (await chat(http, lean, DELTA))[0] == 200
    status, headers, _ = await chat(http, lean, auth("delta-token-2"))  # the same client
    assert (status, headers["Retry-After"]) == (429, "1")  # under 1 s, in whole seconds
    await asyncio.sleep(1.05)  # 60 a minute: one a second
    assert (await chat(http, lean, DELTA))[0] == 200


# --- tokens_per_day --------------------------------------------------------------------------


async def test_tokens_per_day_counts_the_upstreams_usage_and_refuses_until_utc_midnight(
    fake: FakeOpenAI, lean: Server, http: aiohttp.ClientSession
) -> None:
    assert (await chat(http, lean, GAMMA))[0] == 200  # 13 of 20
    fake.push(Reply(body=completion("one two three four five")))
    assert (await chat(http, lean, GAMMA, stream=False))[0] == 200  # admitted below: 26
    status, headers, body = await chat(http, lean, GAMMA)
    assert status == 429
    assert body["error"] == {
        "message": "client 'gamma' has used its 20 tokens of today (UTC)",
        "type": "insufficient_quota",
        "code": "quota_exceeded",
    }
    midnight = 86400 - time.time() % 86400
    assert abs(int(headers["Retry-After"]) - midnight) <= 5
    ws_error = await _ws_refusal(http, lean, GAMMA)
    assert (ws_error["code"], ws_error["retryable"]) == ("quota_exceeded", False)
    assert abs(ws_error["retryAfter"] - midnight) <= 5
    assert len(fake.requests) == 2
    tokens = 'lean_client_tokens_total{client="gamma",kind="completion"}'
    assert await metric(http, lean, tokens) == 2 * (TOKENS_PER_ANSWER - 8)
    assert await metric(http, lean, 'lean_client_tokens_total{client="gamma",kind="prompt"}') == 16


async def _ws_refusal(
    http: aiohttp.ClientSession, lean: Server, headers: dict[str, str]
) -> dict[str, Any]:
    async with http.ws_connect(f"{lean.url}/v1/ws", headers=headers) as ws:
        await ws.send_json({"type": "run", "runId": "r", "scene": "chat", "message": "Hi"})
        frame: dict[str, Any] = await ws.receive_json(timeout=5)
        assert frame["type"] == "error"
        return frame


async def test_an_answer_without_usage_is_counted_by_estimate(
    fake: FakeOpenAI, lean: Server, http: aiohttp.ClientSession
) -> None:
    fake.push(text_stream("a b c d e f g h", usage=False))
    assert (await chat(http, lean, GAMMA))[0] == 200
    estimated = await metric(
        http, lean, 'lean_client_tokens_total{client="gamma",kind="estimated"}'
    )
    assert estimated > 8  # the prompt's estimate and a token per chunk, never 0
    assert await metric(http, lean, 'lean_client_tokens_total{client="gamma",kind="prompt"}') == 0
    fake.push(text_stream("a b c d e f g h", usage=False))
    assert (await chat(http, lean, GAMMA))[0] == 200  # below 20 before it, admitted
    assert (await chat(http, lean, GAMMA))[0] == 429  # the estimates reached the day's 20


async def test_a_request_the_upstream_refused_costs_no_tokens(
    fake: FakeOpenAI, lean: Server, http: aiohttp.ClientSession
) -> None:
    refusal = Reply(status=400, body={"error": {"message": "no", "type": "invalid_request_error"}})
    fake.push(refusal, refusal)  # the stream, then the non-streaming path
    assert (await chat(http, lean, GAMMA))[0] == 400
    fake.push(refusal, refusal)
    assert (await scene_run(http, lean, GAMMA))[1][-1][0] == "error"
    assert len(fake.requests) == 4
    for kind in ("prompt", "completion", "estimated"):
        series = f'lean_client_tokens_total{{client="gamma",kind="{kind}"}}'
        assert await metric(http, lean, series) == 0
    assert await metric(http, lean, 'lean_client_requests_total{client="gamma"}') == 2
    assert await metric(http, lean, 'lean_client_active_streams{client="gamma"}') == 0


# --- scenes and models a client may use --------------------------------------------------------


async def test_a_scene_or_model_the_client_may_not_use_does_not_exist_for_it(
    fake: FakeOpenAI, lean: Server, http: aiohttp.ClientSession
) -> None:
    status, _, body = await chat(http, lean, BETA, model="other")
    _, _, unknown = await chat(http, lean, BETA, model="nonesuch")
    assert status == 404
    assert body["error"]["code"] == "not_found"
    assert body["error"]["message"] == unknown["error"]["message"].replace("nonesuch", "other")
    status, error = await scene_run(http, lean, BETA, "costly")
    _, unknown = await scene_run(http, lean, BETA, "nonesuch")
    assert status == 404
    assert error["error"]["message"] == unknown["error"]["message"].replace("nonesuch", "costly")
    assert (await scene_run(http, lean, BETA, "asking"))[0] == 404  # not in its scenes
    async with http.ws_connect(f"{lean.url}/v1/ws", headers=BETA) as ws:
        await ws.send_json({"type": "run", "runId": "r", "scene": "costly", "message": "Hi"})
        frame = await ws.receive_json(timeout=5)
        assert (frame["type"], frame["code"]) == ("error", "not_found")
    async with http.get(f"{lean.url}/v1/models", headers=BETA) as resp:
        assert [m["id"] for m in (await resp.json())["data"]] == ["default"]
    async with http.get(f"{lean.url}/v1/scenes", headers=BETA) as resp:
        assert [s["name"] for s in (await resp.json())["scenes"]] == ["chat"]
    assert fake.requests == []  # refused before any provider call, and not counted
    limit = 'lean_client_rejections_total{client="beta",limit="requests_per_minute"}'
    assert await metric(http, lean, limit) == 0
    assert (
        await metric(http, lean, 'lean_client_rejections_total{client="beta",limit="scene"}') == 3
    )
    # the others see everything
    async with http.get(f"{lean.url}/v1/models", headers=ALPHA) as resp:
        assert [m["id"] for m in (await resp.json())["data"]] == ["default", "other"]
    assert (await chat(http, lean, LEGACY, model="other"))[0] == 200


# --- ownership -----------------------------------------------------------------------------


async def messages_status(
    http: aiohttp.ClientSession, lean: Server, headers: dict[str, str], cid: str
) -> int:
    async with http.get(f"{lean.url}/v1/conversations/{cid}/messages", headers=headers) as resp:
        return resp.status


async def test_a_conversation_is_read_and_continued_by_its_client_only(
    fake: FakeOpenAI, lean: Server, http: aiohttp.ClientSession
) -> None:
    _, events = await scene_run(http, lean, ALPHA)
    cid = events[0][1]["conversationId"]
    assert await messages_status(http, lean, ALPHA, cid) == 200
    assert await messages_status(http, lean, GAMMA, cid) == 404
    assert await messages_status(http, lean, LEGACY, cid) == 404
    async with http.get(f"{lean.url}/v1/conversations/{cid}/messages", headers=GAMMA) as resp:
        unknown = f"{lean.url}/v1/conversations/nonesuch/messages"
        async with http.get(unknown, headers=GAMMA) as other:
            # the same answer as for an id that was never used: ids leak nothing
            assert (await resp.json())["error"]["message"] == (await other.json())["error"][
                "message"
            ].replace("nonesuch", cid)
    status, error = await scene_run(http, lean, GAMMA, conversationId=cid)
    assert (status, error["error"]["code"]) == (404, "not_found")
    assert len(fake.requests) == 1  # no provider call for the refused turn
    async with http.get(f"{lean.url}/v1/conversations/{cid}/messages", headers=ALPHA) as resp:
        assert len((await resp.json())["messages"]) == 2  # nothing was added to it
    # its own client continues it
    assert (await scene_run(http, lean, ALPHA, conversationId=cid))[0] == 200
    # the default client's conversations: its own, not the others'
    _, events = await scene_run(http, lean, LEGACY)
    legacy_cid = events[0][1]["conversationId"]
    assert await messages_status(http, lean, LEGACY, legacy_cid) == 200
    assert await messages_status(http, lean, ALPHA, legacy_cid) == 404


async def test_another_client_cannot_cancel_or_answer_a_run(
    fake: FakeOpenAI, lean: Server, http: aiohttp.ClientSession
) -> None:
    fake.push(tool_call_stream([("call_1", "ask_user", '{"question": "Colour?"}')]))
    url = f"{lean.url}/v1/scenes/asking/stream"
    async with http.post(url, json={"message": "Hi"}, headers=ALPHA) as resp:
        assert resp.status == 200
        run_id = None
        waiting = None
        buffer = ""
        while waiting is None:
            buffer += (await resp.content.readany()).decode()
            for name, data in sse_events(buffer.rsplit("\n\n", 1)[0]):
                if name == "start":
                    run_id = data["runId"]
                elif name == "waiting":
                    waiting = data
        answer = {"toolCallId": waiting["toolCallId"], "result": "blue"}
        base = f"{lean.url}/v1/runs/{run_id}"
        for headers in (GAMMA, LEGACY):
            async with http.post(f"{base}/tool-results", json=answer, headers=headers) as other:
                assert other.status == 404
                assert (await other.json())["error"]["message"] == f"run '{run_id}' is not running"
            async with http.post(f"{base}/cancel", headers=headers) as other:
                assert other.status == 404
        async with http.post(f"{base}/tool-results", json=answer, headers=ALPHA) as own:
            assert own.status == 200
        await fake.wait_request(1)  # the run went on with alpha's answer
        fake_answer = fake.requests[1].body["messages"][-1]
        assert fake_answer == {"role": "tool", "tool_call_id": "call_1", "content": "blue"}
        rest = sse_events((buffer + (await resp.text())).strip())
    assert rest[-1][0] == "done"


async def test_its_own_client_cancels_a_run_that_others_could_not(
    fake: FakeOpenAI, lean: Server, http: aiohttp.ClientSession
) -> None:
    fake.push(held())
    url = f"{lean.url}/v1/scenes/chat/stream"
    async with http.post(url, json={"message": "Hi"}, headers=GAMMA) as resp:
        head = await resp.content.readuntil(b"\n\n")
        run_id = sse_events(head.decode())[0][1]["runId"]
        async with http.post(f"{lean.url}/v1/runs/{run_id}/cancel", headers=ALPHA) as other:
            assert other.status == 404
        async with http.post(f"{lean.url}/v1/runs/{run_id}/cancel", headers=GAMMA) as own:
            assert own.status == 202
        events = sse_events((head + await resp.read()).decode())
    assert events[-1][0] == "error" and events[-1][1]["code"] == "cancelled"


async def test_a_websocket_conversation_belongs_to_the_sockets_client(
    fake: FakeOpenAI, lean: Server, http: aiohttp.ClientSession
) -> None:
    async with http.ws_connect(f"{lean.url}/v1/ws", headers=DELTA) as ws:
        await ws.send_json({"type": "run", "runId": "r", "scene": "chat", "message": "Hi"})
        start = await ws.receive_json(timeout=5)
        while (await ws.receive_json(timeout=5))["type"] != "done":
            pass
    cid = start["conversationId"]
    assert await messages_status(http, lean, DELTA, cid) == 200
    assert await messages_status(http, lean, ALPHA, cid) == 404
    async with http.ws_connect(f"{lean.url}/v1/ws", headers=ALPHA) as ws:
        await ws.send_json(
            {"type": "run", "runId": "r", "scene": "chat", "message": "Hi", "conversationId": cid}
        )
        frame = await ws.receive_json(timeout=5)
        assert (frame["type"], frame["code"]) == ("error", "not_found")


# --- metrics and the [auth] tokens -------------------------------------------------------------


async def test_metrics_by_client_for_the_operator_only(
    fake: FakeOpenAI, lean: Server, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{lean.url}/metrics", headers=LEGACY) as resp:
        text = await resp.text()
    for name in ("default", "alpha", "beta", "gamma", "delta"):  # there from the start, at 0
        assert f'lean_client_requests_total{{client="{name}"}} 0\n' in text
        assert f'lean_client_active_streams{{client="{name}"}} 0\n' in text
    assert (await chat(http, lean, ALPHA))[0] == 200
    assert (await chat(http, lean, LEGACY))[0] == 200
    assert await metric(http, lean, 'lean_client_requests_total{client="alpha"}') == 1
    assert await metric(http, lean, 'lean_client_requests_total{client="default"}') == 1
    completion_tokens = 'lean_client_tokens_total{client="alpha",kind="completion"}'
    assert await metric(http, lean, completion_tokens) == TOKENS_PER_ANSWER - 8
    async with http.get(f"{lean.url}/metrics", headers=ALPHA) as resp:
        assert resp.status == 403  # a client would read the others' names and use
        assert (await resp.json())["error"]["code"] == "forbidden"


async def test_the_auth_tokens_work_as_before_and_a_token_is_still_needed(
    fake: FakeOpenAI, lean: Server, http: aiohttp.ClientSession
) -> None:
    assert (await chat(http, lean, LEGACY))[0] == 200
    assert (await scene_run(http, lean, LEGACY, "costly"))[0] == 200
    for headers in ({}, auth("wrong"), auth("alpha-token,beta-token")):
        status, _, body = await chat(http, lean, headers)
        assert (status, body["error"]["code"]) == (401, "unauthorized")


async def test_client_tokens_alone_need_a_token_on_loopback_too(fake: FakeOpenAI) -> None:
    environ = {"ALPHA_TOKENS": "alpha-token"}
    extra = "[client.alpha]\ntoken_env = ALPHA_TOKENS\n"
    async with running(lean_config(fake.base_url, extra=extra, environ=environ)) as lean:
        async with aiohttp.ClientSession() as http:
            assert (await chat(http, lean, {}))[0] == 401
            assert (await chat(http, lean, ALPHA))[0] == 200


async def test_an_event_source_is_its_clients_by_its_access_token(
    fake: FakeOpenAI, lean: Server, http: aiohttp.ClientSession
) -> None:
    url = f"{lean.url}/v1/scenes/chat/stream?message=Hi&access_token=beta-token"
    async with http.get(url) as resp:
        assert resp.status == 200
        assert sse_events(await resp.text())[-1][0] == "done"
    assert await metric(http, lean, 'lean_client_requests_total{client="beta"}') == 1
    async with http.get(url.replace("chat", "costly")) as resp:
        assert resp.status == 404  # beta's scenes, whatever carries its token


# --- MemoryLimiter, fed its clocks -------------------------------------------------------------


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def limited(**limits: int) -> ClientConfig:
    return ClientConfig(name="app", token_env="APP_TOKENS", **limits)


async def test_the_rate_is_a_gcra_with_its_burst_and_an_exact_wait() -> None:
    clock = Clock(1000.0)
    limiter = MemoryLimiter(clock=clock)
    app = limited(requests_per_minute=6, requests_burst=3)  # one every 10 s, 3 at once
    for _ in range(3):
        assert await limiter.take(app) is None
    refusal = await limiter.take(app)
    assert refusal is not None
    assert refusal[0] == "requests_per_minute"
    assert refusal[1].retry_after == pytest.approx(10.0)
    clock.now += 4
    refusal = await limiter.take(app)
    assert refusal is not None and refusal[1].retry_after == pytest.approx(6.0)
    clock.now += 6
    assert await limiter.take(app) is None  # one more came back, not more
    assert await limiter.take(app) is not None
    clock.now += 1000  # a quiet spell refills the burst, never beyond it
    for _ in range(3):
        assert await limiter.take(app) is None
    assert await limiter.take(app) is not None


async def test_a_refused_request_takes_nothing() -> None:
    clock = Clock(0.0)
    limiter = MemoryLimiter(clock=clock)
    app = limited(max_streams=1, requests_per_minute=60, requests_burst=2)
    assert await limiter.take(app) is None
    refusal = await limiter.take(app)
    assert refusal is not None and refusal[0] == "max_streams"
    limiter.give(app, 0)
    assert await limiter.take(app) is None  # the refusal spent no request of the burst


async def test_tokens_are_counted_per_utc_day() -> None:
    wall = Clock(20_000 * 86400.0 + 86000)  # 400 s before a UTC midnight
    limiter = MemoryLimiter(wall=wall)
    app = limited(tokens_per_day=100)
    assert await limiter.take(app) is None
    limiter.give(app, 99)
    assert await limiter.take(app) is None  # 99 < 100: admitted, and may go past it
    limiter.give(app, 50)
    refusal = await limiter.take(app)
    assert refusal is not None
    assert refusal[0] == "tokens_per_day"
    assert refusal[1].code == "quota_exceeded"
    assert refusal[1].retry_after == pytest.approx(400.0)
    wall.now += 400  # midnight
    assert await limiter.take(app) is None


async def test_tickets_end_once() -> None:
    config = lean_config(extra="[client.app]\ntoken_env = T\nmax_streams = 1\n", environ={"T": "t"})
    metrics = Metrics()
    clients = Clients(config, metrics)
    app = next(client for _, client in clients.tokens if client.name == "app")
    ticket = await clients.admit(app)
    with pytest.raises(RateLimited):
        await clients.admit(app)
    ticket.end(Usage(3, 4))
    ticket.end(Usage(100, 100))  # a second end counts nothing
    assert metrics.client_tokens[("app", "prompt")] == 3
    assert metrics.client_streams[("app",)] == 0
    (await clients.admit(app)).end()
    assert metrics.client_requests[("app",)] == 2
    assert metrics.client_rejections[("app", "max_streams")] == 1
