"""No recognisable part of a provider key leaves lean (issue 10, item 10): an upstream
400 that echoes the key masked, as OpenAI and Anthropic do ("first 14 + last 4"), or a
fragment of it, reaches neither the client nor the log."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import pytest

from lean.app import Server
from tests.fakes import FakeOpenAI, Reply, error_body
from tests.fakes_providers import FakeAnthropic
from tests.support import SECRET, chat_body, lean_config, read_sse_data, running

pytestmark = pytest.mark.timeout(30)

MASKED = SECRET[:14] + "*" * 20 + SECRET[-4:]  # sk-test-SECRET********************6789
ECHOES = [
    f"Incorrect API key provided: {MASKED}. You can find your API key at ...",
    f"key {SECRET[:14]}...{SECRET[-4:]} is not allowed to use this model",
    f"key \u2022\u2022\u2022\u2022{SECRET[-4:]} has no access",
    f"invalid header value near '{SECRET[10:24]}'",  # a fragment from the middle
]
LEAKS = [SECRET[:8], SECRET[-8:], SECRET[10:18], SECRET[-4:], MASKED]


def assert_clean(text: str) -> None:
    for leak in LEAKS:
        assert leak not in text, (leak, text)


@asynccontextmanager
async def gateway(kind: str, server: str = "") -> AsyncIterator[tuple[FakeOpenAI, Server]]:
    fake = FakeAnthropic() if kind == "anthropic" else FakeOpenAI()
    async with fake:
        provider = f"kind = {kind}\nbase_url = {fake.base_url}"
        config = lean_config(fake.base_url, provider=provider, server=server)
        async with running(config) as lean:
            yield fake, lean


def upstream_400(kind: str, message: str) -> Reply:
    if kind == "anthropic":
        body = {"type": "error", "error": {"type": "invalid_request_error", "message": message}}
        return Reply(status=400, body=body)
    return Reply(status=400, body=error_body(message))


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
@pytest.mark.parametrize("stream", [True, False])
async def test_a_masked_key_in_an_upstream_error_reaches_neither_client_nor_log(
    kind: str, stream: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    # commit_wait = 0: a stream's headers go out before the upstream answers, so its
    # error comes in band (with a later commit it would be a status, as without stream).
    server = "commit_wait = 0" if stream else ""
    async with gateway(kind, server) as (fake, lean), aiohttp.ClientSession() as http:
        for echo in ECHOES:
            # every try says it (a failed stream is tried again without streaming)
            fake.default = lambda body, echo=echo: upstream_400(kind, echo)
            url = lean.url + "/v1/chat/completions"
            async with http.post(url, json=chat_body(stream=stream)) as resp:
                if stream:  # started before the upstream answered: the error comes in band
                    assert resp.status == 200
                    data = await read_sse_data(resp)
                    message = json.loads(data[-1])["error"]["message"]
                else:
                    assert resp.status == 400
                    message = (await resp.json())["error"]["message"]
            assert "[redacted]" in message
            assert_clean(message)
        assert len(fake.requests) >= len(ECHOES)
    assert_clean(caplog.text)


def test_every_recognisable_part_of_every_key_is_redacted() -> None:
    from lean.errors import redact

    other = "AIzaSyA-other-key-0000000000000000000"
    text = f"a {MASKED} b {other[5:15]} c {SECRET} d {other[:6]}\u2026{other[-4:]} e"
    assert redact(text, [SECRET, other]) == "a [redacted] b [redacted] c [redacted] d [redacted] e"
    assert redact("key abc here", ["abc"]) == "key [redacted] here"  # short keys: whole only
    for kept in (
        "Hello... world",  # a mask with no part of a key around it
        "sk-... is how keys start",
        "the key ends in ****",
        f"a short run {SECRET[:7]} of the key",  # 7 characters: not recognisable
    ):
        assert redact(kept, [SECRET]) == kept
