"""Clients' limits counted in Redis by every instance, and a dead instance's cut answers
ended by a live one (docs/protocol.md §7, §8).

Real `lean serve` processes sharing the machine's Redis (a database per xdist worker, as in
tests/test_cluster.py, whose helpers these are) or a `redis-server` of the test's own that
it kills; a fake OpenAI upstream in the test's process.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from lean.client_limits import RedisLimiter
from lean.cluster import Cluster
from lean.config import ClientConfig, ClusterConfig
from tests import test_cluster
from tests.fakes import FakeOpenAI, free_port, text_stream
from tests.store_targets import Target
from tests.test_cluster import (
    DB,
    DEADLINE,
    LEASE,
    NDJSON,
    OPERATOR,
    Lean,
    instances,
    joined,
    own_redis,
    paced,
    redis_command,
    run_on,
)

pytestmark = pytest.mark.one_loop  # lean serve runs uvloop, whatever the test's loop is
# test_cluster's fixtures: a paced fake upstream, an HTTP session, the shared Redis database.
fake, http, shared_redis = test_cluster.fake, test_cluster.http, test_cluster.shared_redis

ALPHA = {"Authorization": "Bearer alpha-token"}


def clients(limits: str) -> str:
    """An operator token and the client `alpha` with `limits` (its section's lines)."""
    return (
        "[auth]\ntokens_env = LEAN_TOKENS\n\n"
        f"[client.alpha]\ntoken_env = ALPHA_TOKENS\n{limits}\n\n"
    )


async def scene(http: aiohttp.ClientSession, lean: Lean) -> tuple[int, Any, str | None]:
    """One whole scene run of alpha's on `lean`: (status, NDJSON events or error, Retry-After)."""
    url = lean.url + "/v1/scenes/chat/stream"
    async with http.post(url, json={"message": "x"}, headers={**NDJSON, **ALPHA}) as resp:
        if resp.status != 200:
            return resp.status, await resp.json(), resp.headers.get("Retry-After")
        events = [json.loads(line) for line in (await resp.read()).splitlines() if line]
        return 200, events, None


async def metric(http: aiohttp.ClientSession, lean: Lean, line: str) -> bool:
    async with http.get(lean.url + "/metrics", headers=OPERATOR) as resp:
        return f"\n{line}\n" in await resp.text()


async def test_two_instances_share_a_clients_streams_and_rate(
    tmp_path: Path, fake: FakeOpenAI, http: aiohttp.ClientSession, shared_redis: str
) -> None:
    extra = clients("max_streams = 1\nrequests_per_minute = 3")  # burst 3, then one per 20 s
    async with instances(tmp_path, fake.base_url, shared_redis, 2, extra=extra) as (a, b):
        assert await metric(http, a, "lean_client_limits_shared 1")
        async with run_on(http, a, token="alpha-token") as run:  # request 1 of the rate
            run_id = (await run.until("start"))["runId"]
            await run.until("delta")
            status, body, retry = await scene(http, b)
            assert (status, retry) == (429, "1"), body
            assert "limit of 1 streams" in body["error"]["message"]
            chat = {"model": "default", "messages": [{"role": "user", "content": "x"}]}
            async with http.post(b.url + "/v1/chat/completions", json=chat, headers=ALPHA) as r:
                assert r.status == 429  # every route, one count
            cancel = f"{b.url}/v1/runs/{run_id}/cancel"
            async with http.post(cancel, headers=ALPHA) as r:
                assert r.status == 202
            assert (await run.last())["code"] == "cancelled"
        # A's run ended: its slot is free for B (given back without waiting: a refusal
        # meanwhile takes nothing of the rate).
        fake.push(text_stream("two"), text_stream("three"))
        async with asyncio.timeout(DEADLINE):
            while (got := await scene(http, b))[0] == 429:
                assert "streams" in got[1]["error"]["message"], got
                await asyncio.sleep(0.05)
        assert got[0] == 200 and got[1][-1]["type"] == "done", got  # request 2
        status, events, _ = await scene(http, a)  # request 3
        assert status == 200 and events[-1]["type"] == "done", events
        for lean in (b, a):  # the fourth, on either instance: 20 s to wait
            status, body, retry = await scene(http, lean)
            assert status == 429, body
            assert "3 requests per minute" in body["error"]["message"]
            assert retry is not None and 15 <= int(retry) <= 21, retry
        assert len(fake.requests) == 3  # the refused ones never reached the upstream
        assert await metric(
            http, b, 'lean_client_rejections_total{client="alpha",limit="requests_per_minute"} 1'
        )


async def test_a_clients_tokens_per_day_count_across_instances(
    tmp_path: Path, fake: FakeOpenAI, http: aiohttp.ClientSession, shared_redis: str
) -> None:
    extra = clients("tokens_per_day = 10")
    fake.push(text_stream("one two three"))  # usage: 8 prompt + 3 completion = 11 tokens
    async with instances(tmp_path, fake.base_url, shared_redis, 2, extra=extra) as (a, b):
        status, events, _ = await scene(http, a)
        assert status == 200 and events[-1]["type"] == "done", events
        day = int(time.time() // 86400)
        key = f"lean:client:alpha:tokens:{day}"
        async with asyncio.timeout(DEADLINE):  # counted as A's request ended, not awaited
            while True:
                if redis_command(6379, ("SELECT", str(DB)), ("GET", key)) == b"+OK\r\n$2\r\n11\r\n":
                    break
                await asyncio.sleep(0.02)
        status, body, retry = await scene(http, b)
        assert status == 429, body
        assert body["error"]["code"] == "quota_exceeded"
        midnight = (day + 1) * 86400 - time.time()
        assert retry is not None and abs(int(retry) - midnight) <= 5
        ttl = redis_command(6379, ("SELECT", str(DB)), ("TTL", key))
        assert 86400 < int(ttl.split(b":")[1]) <= 2 * 86400  # the count expires
        assert len(fake.requests) == 1


async def test_a_redis_outage_leaves_the_limits_counted_on_each_instance(
    tmp_path: Path, fake: FakeOpenAI, http: aiohttp.ClientSession
) -> None:
    port = free_port()
    extra = clients("max_streams = 1")
    async with own_redis(port) as redis:
        url = f"redis://127.0.0.1:{port}/0"
        async with instances(tmp_path, fake.base_url, url, 2, extra=extra) as (a, b):
            redis.kill()
            await redis.wait()
            async with asyncio.timeout(DEADLINE):
                for lean in (a, b):
                    while True:
                        if await metric(http, lean, "lean_cluster_up 0"):
                            break
                        await asyncio.sleep(0.05)
            async with run_on(http, a, token="alpha-token") as first:
                await first.until("delta")
                status, body, retry = await scene(http, a)  # A still holds alpha to 1
                assert (status, retry) == (429, "1"), body
                assert "limit of 1 streams" in body["error"]["message"]
                async with run_on(http, b, token="alpha-token") as second:  # B counts its own
                    await second.until("delta")
                assert await metric(http, a, "lean_client_limits_shared 0")
            assert any("each instance counts its own" in line for line in a.log), a.log


async def test_a_killed_instances_client_streams_are_freed_within_its_lease(
    tmp_path: Path, fake: FakeOpenAI, http: aiohttp.ClientSession, shared_redis: str
) -> None:
    extra = clients("max_streams = 1")
    async with instances(tmp_path, fake.base_url, shared_redis, 2, extra=extra) as (a, b):
        async with run_on(http, a, token="alpha-token") as run:
            await run.until("delta")
            status, body, _ = await scene(http, b)
            assert status == 429 and "limit of 1 streams" in body["error"]["message"], body
            a.proc.send_signal(signal.SIGKILL)  # its stream is never given back
            killed = time.monotonic()
            fake.push(text_stream("free"))
            async with asyncio.timeout(DEADLINE):
                while True:
                    got = await scene(http, b)
                    if got[0] != 429:
                        break
                    await asyncio.sleep(0.05)
            took = time.monotonic() - killed
    assert got[0] == 200 and got[1][-1]["text"] == "free", got
    assert took < LEASE + 1.0, took  # the lease after A's last renewal, no later


async def test_a_killed_instances_cut_answer_is_incomplete_on_another_within_a_lease(
    tmp_path: Path,
    fake: FakeOpenAI,
    http: aiohttp.ClientSession,
    shared_redis: str,
    target: Target,
) -> None:
    """kill -9 of A mid-answer: B (found A's lease gone) ends A's row, with the text A had
    flushed, so a client reading the history on B sees `incomplete` (docs/protocol.md §7)."""
    where = f"{'url' if target.kind == 'postgresql' else 'path'} = {target.where}"
    store = f"{where}\nflush_interval = 0.1"  # one store for both: the history is shared
    fake.default = lambda body: paced(400, 0.02)
    async with instances(tmp_path, fake.base_url, shared_redis, 2, store=store) as (a, b):
        async with run_on(http, a) as run:
            start = await run.until("start")
            while sum(e["type"] == "delta" for e in run.events) < 10:
                await run.until("delta")
            await asyncio.sleep(0.3)  # a flush or two of A's text
            a.proc.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            sent = "".join(e["text"] for e in run.events if e["type"] == "delta")
            url = f"{b.url}/v1/conversations/{start['conversationId']}/messages"
            async with asyncio.timeout(DEADLINE):
                while True:
                    async with http.get(url) as resp:
                        assert resp.status == 200
                        answer = (await resp.json())["messages"][-1]
                    if answer["status"] != "streaming":
                        break
                    await asyncio.sleep(0.05)
            took = time.monotonic() - killed
    assert answer["status"] == "incomplete", answer
    assert answer["messageId"] == start["messageId"]
    text = answer["content"]
    assert len(text) >= len("w0 w1 w2 w3 w4 ") and sent.startswith(text[: len(sent)]), (text, sent)
    assert took < LEASE * 3 + 1.0, took  # a lease, a renewal's look (lease/3), the sweep
    assert any("is gone" in line and f"test-{a.url.rsplit(':', 1)[1]}" in line for line in b.log)


async def test_one_live_instance_ends_a_dead_ones_answers(shared_redis: str) -> None:
    """Every live instance looks for dead ones at each renewal; each dead one is given to
    exactly one of them (lean.cluster_wire.REAP), and forgotten once it was swept."""
    select = ("SELECT", str(DB))
    redis_command(6379, select, ("SADD", "lean:instances", "gone"))
    redis_command(6379, select, ("SET", "lean:live:gone", "x", "PX", "300"))
    swept: list[tuple[str, str]] = []

    def sweeper(by: str) -> Any:
        async def sweep(name: str) -> None:
            swept.append((by, name))
            await asyncio.sleep(LEASE)  # a slow database: the others look meanwhile

        return sweep

    async with joined(shared_redis, "live-a") as a, joined(shared_redis, "live-b") as b:
        a.on_dead, b.on_dead = sweeper("live-a"), sweeper("live-b")
        async with asyncio.timeout(DEADLINE):
            while True:
                if swept:
                    break
                await asyncio.sleep(0.02)
        await asyncio.sleep(LEASE * 2)  # looks of both, during the sweep and after it
    assert [name for _, name in swept] == ["gone"], swept
    assert redis_command(6379, select, ("SCARD", "lean:dead")) == b"+OK\r\n:0\r\n"


async def test_an_instance_back_within_its_lease_sets_its_clients_streams_right(
    shared_redis: str,
) -> None:
    """A restart within the lease finds the count its killed self left in Redis (its name
    is live, so nobody forgot it): joining writes this instance's true count (none)."""
    select = ("SELECT", str(DB))
    redis_command(6379, select, ("HSET", "lean:client:alpha:streams", "back", "1"))
    alpha = ClientConfig(name="alpha", token_env="ALPHA_TOKENS", max_streams=1)
    config = ClusterConfig(instance="back", redis_url=shared_redis, lease=LEASE)
    cluster = Cluster(config, max_streams=0, streams=lambda: 0, runs=lambda: [])
    limiter = RedisLimiter(cluster, [alpha])  # as lean.services builds it, before it joins
    cluster.start()
    try:
        async with asyncio.timeout(DEADLINE):
            while True:
                if cluster.up:
                    break
                await asyncio.sleep(0.01)
        assert await limiter.take(alpha) is None  # the one stream: its own
        refused = await limiter.take(alpha)
        assert refused is not None and refused[0] == "max_streams"
        limiter.give(alpha, 0)
        assert await limiter.take(alpha) is None
        assert limiter.shared
    finally:
        await cluster.close()
