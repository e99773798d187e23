"""Retries and fallback aliases (issue 4 "Failover"; lean/relay.py), seen by real clients.

Two FakeOpenAI servers play two providers: `up` behind the alias `default`
(`fallback = backup`, `retries = 1`) and `backup` behind the alias `backup`.
Each rule runs against fakes that fail in that way, through the OpenAI endpoint
(`openai`: a streaming Chat Completions request; `complete`: a non-streaming
one) and through a scene run (`scene`). Which upstream was asked, in which
order and on which path is read from the fakes' own records.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from lean.app import Server
from lean.config import Config
from tests.fakes import (
    FakeOpenAI,
    Reply,
    Stall,
    Stream,
    completion,
    error_body,
    free_port,
    sse,
    text_stream,
)
from tests.support import SECRET, chat_body, content_of, lean_config, read_sse_data, running

pytestmark = pytest.mark.timeout(30)

TEXT = "One two three four five six seven eight nine ten."
BACKUP_SECRET = "sk-backup-SECRET-never-shown-9876543210"
ROLE = sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
VIAS = ["openai", "scene"]
CHAT_SCENE = "[scene.chat]\nmodel = default\ntemplate = {message}\n"
# The guard checks silence every quarter of its smallest limit; with this slow-client
# limit a 0.3 s read_timeout is noticed within ~0.5 s (tested below).
QUICK_WATCH = "slow_client_timeout = 1"


def _section(name: str, values: dict[str, str]) -> str:
    return f"[{name}]\n" + "".join(f"{k} = {v}\n" for k, v in values.items())


def failover_config(
    primary_url: str,
    backup_url: str,
    *,
    model: str = "",
    provider: str = "",
    backup: dict[str, str] | None = None,
    limits: str = "",
) -> Config:
    """`default` (provider `up`, fallback `backup`, retries 1) and `backup`; `model` and
    `provider` lines override `default`'s and `up`'s keys, `backup` the backup provider's."""
    backup_provider = {
        "kind": "openai",
        "base_url": backup_url,
        "api_key_env": "BACKUP_KEY",
        "connect_timeout": "2",
        "first_byte_timeout": "5",
        "read_timeout": "5",
        **(backup or {}),
    }
    extra = "\n".join(
        [
            _section("provider.backup", backup_provider),
            _section("model.backup", {"provider": "backup", "upstream_model": "backup-model"}),
            _section("scene.chat", {"model": "default", "template": "{message}"}),
        ]
    )
    return lean_config(
        primary_url,
        model="fallback = backup\nretries = 1\n" + model,
        provider=provider,
        limits=limits,
        extra=extra,
        environ={"BACKUP_KEY": BACKUP_SECRET},
    )


@asynccontextmanager
async def providers() -> AsyncIterator[tuple[FakeOpenAI, FakeOpenAI]]:
    async with FakeOpenAI() as primary, FakeOpenAI(model="backup-model") as backup:
        yield primary, backup


def sequence(*fakes: tuple[str, FakeOpenAI]) -> list[tuple[str, str]]:
    """Every upstream request in arrival order, as (provider, "stream" | "non-stream")."""
    seen = [
        (r.started, name, "stream" if r.body["stream"] else "non-stream")
        for name, fake in fakes
        for r in fake.requests
    ]
    return [(name, path) for _, name, path in sorted(seen)]


@dataclass
class Outcome:
    """What a client got: the visible text and how it ended."""

    text: str
    chunks: int  # text deltas (openai, scene) that carried it
    error: dict[str, Any] | None  # {"code", "message", ...}
    done: dict[str, Any] | None = None  # scene: the done event
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    raw: str = ""


async def ask(lean: Server, via: str, cid: str = "conv") -> Outcome:
    async with aiohttp.ClientSession() as http:
        if via == "openai":
            async with http.post(f"{lean.url}/v1/chat/completions", json=chat_body()) as resp:
                if resp.status != 200:  # every try failed before the stream's commit
                    raw = await resp.text()
                    error = json.loads(raw)["error"]
                    headers = dict(resp.headers)
                    return Outcome("", 0, error, status=resp.status, headers=headers, raw=raw)
                data = await read_sse_data(resp)
            errors = [json.loads(d)["error"] for d in data if d.startswith('{"error"')]
            if errors:
                assert "[DONE]" not in data  # an error is never followed by a finish
            else:
                assert data[-1] == "[DONE]"
            deltas = [d for d in data if '"content"' in d and '"error"' not in d]
            return Outcome(
                content_of(data), len(deltas), errors[-1] if errors else None, raw="\n".join(data)
            )
        if via == "complete":
            url = f"{lean.url}/v1/chat/completions"
            async with http.post(url, json=chat_body(stream=False)) as resp:
                raw = await resp.text()
                body = json.loads(raw)
                headers = dict(resp.headers)
                status = resp.status
            if status == 200:
                text = body["choices"][0]["message"]["content"]
                return Outcome(text, 1, None, status=status, headers=headers, raw=raw)
            return Outcome("", 0, body["error"], status=status, headers=headers, raw=raw)
        url = f"{lean.url}/v1/scenes/chat/stream"
        async with http.post(url, json={"message": "Hi", "conversationId": cid}) as resp:
            assert resp.status == 200
            raw = await resp.text()
    evs = []
    for block in raw.split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        fields = dict(line.split(": ", 1) for line in lines)
        if fields:
            evs.append((fields["event"], json.loads(fields["data"])))
    names = [n for n, _ in evs]
    assert names[0] == "start" and names.count("done") + names.count("error") == 1
    deltas = [d["text"] for n, d in evs if n == "delta"]
    last_name, last = evs[-1]
    return Outcome(
        "".join(deltas),
        len(deltas),
        last if last_name == "error" else None,
        done=last if last_name == "done" else None,
        raw=raw,
    )


async def saved(lean: Server, cid: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{lean.url}/v1/conversations/{cid}/messages") as resp:
            assert resp.status == 200
            rows: list[dict[str, Any]] = (await resp.json())["messages"]
    assert rows[-1]["role"] == "assistant"
    return rows[-1]


def answered_whole(out: Outcome, via: str, *, fallback: bool = False) -> None:
    assert out.error is None and out.text == TEXT
    if via == "scene":
        assert out.done is not None and out.done["text"] == TEXT
        assert out.done["fallback"] is fallback
    if not fallback and via != "complete":
        assert out.chunks == len(TEXT.split())  # streamed word by word, not in one piece


def http_error(status: int, message: str, **headers: str) -> Reply:
    return Reply(status=status, body=error_body(message, type="server_error"), headers=headers)


# --- before the commit point: retry, then the non-stream path, then the next alias --------------


@pytest.mark.parametrize("via", VIAS)
async def test_connection_refused_moves_to_the_backup(via: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    async with FakeOpenAI(model="backup-model") as backup:
        async with running(failover_config(dead, backup.base_url)) as lean:
            backup.push(text_stream(TEXT))
            out = await ask(lean, via)
    answered_whole(out, via)
    assert sequence(("backup", backup)) == [("backup", "stream")]
    assert backup.requests[0].body["model"] == "backup-model"
    assert backup.requests[0].headers["Authorization"] == f"Bearer {BACKUP_SECRET}"


async def test_429_with_a_short_retry_after_is_waited_out_on_the_same_alias() -> None:
    async with providers() as (primary, backup):
        async with running(failover_config(primary.base_url, backup.base_url)) as lean:
            primary.push(http_error(429, "slow down", **{"Retry-After": "1"}), text_stream(TEXT))
            out = await ask(lean, "scene")
    answered_whole(out, "scene")
    assert sequence(("primary", primary), ("backup", backup)) == [("primary", "stream")] * 2
    waited = primary.requests[1].started - primary.requests[0].started
    assert 0.95 <= waited < 2.0


@pytest.mark.parametrize("via", VIAS)
async def test_429_with_a_long_retry_after_is_not_waited_and_moves_on(via: str) -> None:
    too_long = http_error(429, "come back in a minute", **{"Retry-After": "60"})
    async with providers() as (primary, backup):
        async with running(failover_config(primary.base_url, backup.base_url)) as lean:
            primary.push(too_long, too_long)
            backup.push(text_stream(TEXT))
            started = time.monotonic()
            out = await ask(lean, via)
            took = time.monotonic() - started
    answered_whole(out, via)
    order = sequence(("primary", primary), ("backup", backup))
    assert order.count(("primary", "stream")) == 1  # no second try of the same stream
    assert order[-1] == ("backup", "stream")
    assert took < 1.0  # neither 60 s nor a backoff


Failure = Callable[[], Reply | Stream | Stall]

FIVE_XX: dict[str, Failure] = {
    "http_500": lambda: http_error(500, "internal"),
    "http_529": lambda: http_error(529, "Overloaded"),
    "http_503_overloaded": lambda: http_error(503, "The engine is overloaded"),
    "inband_overloaded_after_preamble": lambda: Stream(
        events=[ROLE, sse({"error": {"message": "Overloaded", "type": "overloaded_error"}})]
    ),
}


@pytest.mark.parametrize(
    ("failure", "via"),
    [
        ("http_500", "openai"),
        ("http_500", "scene"),
        ("http_529", "openai"),
        ("http_503_overloaded", "scene"),
        ("inband_overloaded_after_preamble", "openai"),
        ("inband_overloaded_after_preamble", "scene"),
    ],
)
async def test_5xx_and_overloaded_retry_then_non_stream_then_backup(failure: str, via: str) -> None:
    async with providers() as (primary, backup):
        async with running(failover_config(primary.base_url, backup.base_url)) as lean:
            make = FIVE_XX[failure]
            primary.push(make(), make(), http_error(529, "Overloaded"))
            backup.push(text_stream(TEXT))
            out = await ask(lean, via)
    answered_whole(out, via)
    assert sequence(("primary", primary), ("backup", backup)) == [
        ("primary", "stream"),
        ("primary", "stream"),
        ("primary", "non-stream"),
        ("backup", "stream"),
    ]


@pytest.mark.parametrize("via", VIAS)
async def test_silence_before_the_first_byte_times_out_and_moves_on(via: str) -> None:
    async with providers() as (primary, backup):
        config = failover_config(
            primary.base_url,
            backup.base_url,
            model="retries = 0",
            provider="first_byte_timeout = 0.2",
        )
        async with running(config) as lean:
            primary.push(Stall(seconds=10), Stall(seconds=10))
            backup.push(text_stream(TEXT))
            started = time.monotonic()
            out = await ask(lean, via)
            took = time.monotonic() - started
            await primary.wait_disconnect(0)  # lean hung up on each silent attempt
            await primary.wait_disconnect(1)
    answered_whole(out, via)
    assert sequence(("primary", primary), ("backup", backup)) == [
        ("primary", "stream"),
        ("primary", "non-stream"),
        ("backup", "stream"),
    ]
    assert 0.35 <= took < 2.5  # two silent attempts of 0.2 s, no more


@pytest.mark.parametrize("via", VIAS)
async def test_a_400_is_not_retried_but_the_backup_answers(via: str) -> None:
    bad = Reply(status=400, body=error_body("max_tokens is too large"))
    async with providers() as (primary, backup):
        async with running(failover_config(primary.base_url, backup.base_url)) as lean:
            primary.push(bad, bad)
            backup.push(text_stream(TEXT))
            out = await ask(lean, via)
    answered_whole(out, via)
    # retries = 1 does not apply to a non-retryable error: one stream attempt, then the
    # alias's non-streaming path once (relay.py's plan), then the next alias.
    assert sequence(("primary", primary), ("backup", backup)) == [
        ("primary", "stream"),
        ("primary", "non-stream"),
        ("backup", "stream"),
    ]


async def test_done_fallback_is_true_when_the_non_stream_path_answered() -> None:
    async with providers() as (primary, backup):
        async with running(failover_config(primary.base_url, backup.base_url)) as lean:
            primary.push(http_error(500, "x"), http_error(500, "x"), Reply(body=completion(TEXT)))
            out = await ask(lean, "scene", cid="fb")
            row = await saved(lean, "fb")
    answered_whole(out, "scene", fallback=True)
    assert sequence(("primary", primary), ("backup", backup)) == [
        ("primary", "stream"),
        ("primary", "stream"),
        ("primary", "non-stream"),
    ]
    assert row["status"] == "complete" and row["content"] == TEXT


async def test_a_large_non_stream_answer_is_read_whole() -> None:
    long_text = "word " * 100_000  # ~500 KB: more than one socket read
    async with FakeOpenAI() as primary:
        config = lean_config(primary.base_url, stream=False)
        async with running(config) as lean:
            primary.push(Reply(body=completion(long_text)))
            out = await ask(lean, "complete")
    assert out.error is None and out.text == long_text


# --- after the commit point: a typed error, never a fallback ----------------------------------


@pytest.mark.parametrize("via", VIAS)
async def test_silence_mid_stream_after_content_is_upstream_timeout_without_fallback(
    via: str,
) -> None:
    async with providers() as (primary, backup):
        config = failover_config(
            primary.base_url, backup.base_url, provider="read_timeout = 0.3", limits=QUICK_WATCH
        )
        async with running(config) as lean:
            stream = text_stream(TEXT)
            stream.stall_after = 3  # the role chunk and two words
            primary.push(stream)
            out = await ask(lean, via, cid="stall")
            row = await saved(lean, "stall") if via == "scene" else None
            await primary.wait_disconnect(0)
    assert out.text == "One two "
    assert out.error is not None and out.error["code"] == "upstream_timeout"
    assert sequence(("primary", primary), ("backup", backup)) == [("primary", "stream")]
    if row is not None:
        assert row["status"] == "incomplete" and row["content"] == "One two "
        assert row["errorCode"] == "upstream_timeout"


async def test_silence_mid_stream_is_noticed_soon_after_read_timeout() -> None:
    async with FakeOpenAI() as fake:
        config = lean_config(
            fake.base_url, provider="read_timeout = 0.3", limits="slow_client_timeout = 3"
        )
        async with running(config) as lean:
            stream = text_stream(TEXT)
            stream.stall_after = 3  # the role chunk and two words
            fake.push(stream)
            async with aiohttp.ClientSession() as http:
                url = f"{lean.url}/v1/chat/completions"
                async with http.post(url, json=chat_body()) as resp:
                    for _ in range(2):  # "One ", "two "
                        assert b'"content"' in await resp.content.readuntil(b"\n\n")
                    silent_since = time.monotonic()
                    rest = await resp.content.read()
                    noticed = time.monotonic() - silent_since
    assert b"upstream_timeout" in rest
    # The guard's promise: a limit is enforced within a quarter of itself (here 0.075 s).
    assert noticed < 0.3 + 0.2


@pytest.mark.parametrize("via", VIAS)
async def test_cut_mid_event_after_content_is_upstream_error_without_fallback(via: str) -> None:
    events = [*text_stream(TEXT).events[:3], b'data: {"choices":[{"index":0,"delta":{"cont']
    async with providers() as (primary, backup):
        async with running(failover_config(primary.base_url, backup.base_url)) as lean:
            primary.push(Stream(events=events, cut_after=len(events)))
            out = await ask(lean, via, cid="cut")
            row = await saved(lean, "cut") if via == "scene" else None
    assert out.text == "One two "
    assert out.error is not None and out.error["code"] == "upstream_error"
    assert sequence(("primary", primary), ("backup", backup)) == [("primary", "stream")]
    if row is not None:
        assert row["status"] == "incomplete" and row["content"] == "One two "


# --- every alias failing ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("primary_says", "backup_says", "code", "status", "via"),
    [
        (429, 429, "rate_limited", 429, "openai"),
        (429, 429, "rate_limited", 429, "scene"),
        (429, 429, "rate_limited", 429, "complete"),
        # the last error is the one reported
        (500, 429, "rate_limited", 429, "scene"),
        (429, 500, "upstream_error", 502, "complete"),
    ],
)
async def test_every_alias_failing_ends_with_the_last_error_typed(
    primary_says: int, backup_says: int, code: str, status: int, via: str
) -> None:
    async with providers() as (primary, backup):
        async with running(failover_config(primary.base_url, backup.base_url)) as lean:
            primary.push(*[http_error(primary_says, "no")] * 3)
            backup.push(*[http_error(backup_says, "no")] * 2)
            out = await ask(lean, via, cid="all")
            row = await saved(lean, "all") if via == "scene" else None
    assert out.error is not None and out.error["code"] == code
    assert f"HTTP {backup_says}" in out.error["message"] and "backup" in out.error["message"]
    assert out.text == ""
    if via == "complete":
        assert out.status == status
    if row is not None:
        assert row["status"] == "error" and row["errorCode"] == code
    assert sequence(("primary", primary), ("backup", backup)) == [
        ("primary", "stream"),
        ("primary", "stream"),
        ("primary", "non-stream"),
        ("backup", "stream"),
        ("backup", "non-stream"),
    ]


MAPPING: dict[str, tuple[Failure | None, int, str, bool]] = {
    # failure: (behaviour, lean's HTTP status, error code, retryable)
    "http_429": (
        lambda: http_error(429, "slow", **{"Retry-After": "30"}),
        429,
        "rate_limited",
        True,
    ),
    "http_529": (lambda: http_error(529, "Overloaded"), 503, "overloaded", True),
    "http_503_overloaded": (lambda: http_error(503, "overloaded"), 503, "overloaded", True),
    "http_500": (lambda: http_error(500, "boom"), 502, "upstream_error", True),
    "http_503": (lambda: http_error(503, "maintenance"), 502, "upstream_error", True),
    "http_504": (lambda: http_error(504, "gateway timeout"), 504, "upstream_timeout", True),
    "http_401": (lambda: http_error(401, "bad key"), 502, "upstream_error", False),
    "http_400": (lambda: Reply(status=400, body=error_body("bad")), 400, "bad_request", False),
    "silence": (lambda: Stall(seconds=10), 504, "upstream_timeout", True),
    "refused": (None, 502, "upstream_error", True),
}


@pytest.mark.parametrize(
    ("failure", "via"),
    [
        (failure, via)
        for failure in MAPPING
        for via in ("complete", "scene")
        # silence -> upstream_timeout in a scene: test_silence_before_the_first_byte...
        if (failure, via) != ("silence", "scene")
    ],
)
async def test_upstream_failures_map_to_codes_and_statuses(failure: str, via: str) -> None:
    make, status, code, retryable = MAPPING[failure]
    async with FakeOpenAI() as fake:
        url = fake.base_url if make is not None else f"http://127.0.0.1:{free_port()}/v1"
        config = lean_config(url, provider="first_byte_timeout = 0.2", extra=CHAT_SCENE)
        async with running(config) as lean:
            if make is not None:
                fake.push(make(), make())
            out = await ask(lean, via)
    assert out.error is not None
    assert out.error["code"] == code
    if via == "complete":
        assert out.status == status
        assert out.error["type"] in (
            "rate_limit_error",
            "server_error",
            "timeout_error",
            "invalid_request_error",
        )
        if failure == "http_429":
            assert out.headers.get("Retry-After") == "30"  # the upstream's, passed on
    else:
        assert out.error["retryable"] is retryable


# --- keys ------------------------------------------------------------------------------------


@pytest.mark.parametrize("via", ["openai", "scene", "complete"])
async def test_no_error_ever_carries_a_provider_key(
    via: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    def echo(status: int, key: str) -> Reply:
        return Reply(status=status, body=error_body(f"Incorrect API key provided: {key}"))

    inband = Stream(
        events=[
            ROLE,
            sse({"error": {"message": f"key {SECRET} is over quota", "type": "server_error"}}),
        ]
    )
    async with providers() as (primary, backup):
        async with running(failover_config(primary.base_url, backup.base_url)) as lean:
            primary.push(echo(500, SECRET), inband, echo(429, SECRET))
            backup.push(echo(503, BACKUP_SECRET), echo(400, BACKUP_SECRET))
            out = await ask(lean, via, cid="keys")
            row = await saved(lean, "keys") if via == "scene" else None
    assert primary.requests[0].headers["Authorization"] == f"Bearer {SECRET}"
    assert backup.requests[0].headers["Authorization"] == f"Bearer {BACKUP_SECRET}"
    assert len(primary.requests) == 3 and len(backup.requests) == 2
    assert out.error is not None and out.error["code"] == "bad_request"
    assert "Incorrect API key provided" in out.error["message"]  # the message is kept, cleaned
    for text in (out.raw, json.dumps(row), caplog.text, *(str(r.args) for r in caplog.records)):
        assert SECRET not in text and BACKUP_SECRET not in text
