"""Behaviour under failure: clients that leave or stall, overload, fallback, keys.

Each test runs lean through the same AppRunner path as `lean serve`, against a
real fake upstream on 127.0.0.1 that records when its connection dropped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import tracemalloc

import aiohttp
import pytest

from lean.handlers import services_key
from tests.fakes import (
    DONE,
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

TEXT = "One two three four five six seven eight nine ten."
URL = "/v1/chat/completions"


def slow_stream(words: int = 400, delay: float = 0.02) -> Stream:
    stream = text_stream(" ".join(["word"] * words))
    stream.delay = delay
    return stream


def errors_in(data: list[str]) -> list[dict[str, str]]:
    return [json.loads(d)["error"] for d in data if d.startswith('{"error"')]


# --- a client that leaves ----------------------------------------------------------------


async def test_client_leaving_mid_stream_closes_the_upstream_within_1s() -> None:
    async with FakeOpenAI() as fake, running(lean_config(fake.base_url)) as lean:
        fake.push(slow_stream())
        async with aiohttp.ClientSession() as http:
            resp = await http.post(lean.url + URL, json=chat_body())
            for _ in range(3):
                await resp.content.readuntil(b"\n\n")
            left = time.monotonic()
            resp.close()
        dropped = await fake.wait_disconnect(0, timeout=3)
        assert dropped - left < 1.0
        assert fake.requests[0].finished is None
        await asyncio.sleep(0.05)
        assert len(lean.app[services_key].streams) == 0


async def test_client_leaving_a_non_stream_request_closes_the_upstream_within_1s() -> None:
    async with FakeOpenAI() as fake, running(lean_config(fake.base_url)) as lean:
        fake.push(Stall(seconds=10))
        async with aiohttp.ClientSession() as http:
            request = asyncio.ensure_future(http.post(lean.url + URL, json=chat_body(stream=False)))
            async with asyncio.timeout(5):
                while not fake.requests:  # noqa: ASYNC110 - the fake exposes no event for arrivals
                    await asyncio.sleep(0.01)
            request.cancel()
            left = time.monotonic()
            with pytest.raises(asyncio.CancelledError):
                await request
        dropped = await fake.wait_disconnect(0, timeout=3)
        assert dropped - left < 1.0


# --- a client that does not read ----------------------------------------------------------


async def test_a_client_that_never_reads_is_cut_and_its_upstream_closed() -> None:
    big = "x" * 4000
    events = [sse({"choices": [{"index": 0, "delta": {"content": big}}]})] * 5000  # ~20 MB
    async with FakeOpenAI() as fake:
        config = lean_config(fake.base_url, limits="slow_client_timeout = 0.5")
        async with running(config) as lean:
            fake.push(Stream(events=[*events, DONE]))
            _, writer = await asyncio.open_connection("127.0.0.1", lean.port)
            body = json.dumps(chat_body()).encode()
            writer.write(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
                % (len(body), body)
            )
            await writer.drain()
            # The client reads nothing. lean must stop reading upstream (TCP pushes back),
            # then cut the client after slow_client_timeout and close the upstream.
            dropped = await fake.wait_disconnect(0, timeout=5)
            assert dropped - fake.requests[0].started < 4.5
            assert fake.requests[0].finished is None  # the upstream never got to send it all
            # What went out is what the kernel buffers of the loopback sockets hold, not
            # the 20 MB answer: lean stopped reading the upstream.
            assert fake.requests[0].events_sent < len(events) * 0.75
            await asyncio.sleep(0.05)
            assert len(lean.app[services_key].streams) == 0
            writer.close()


async def test_a_client_that_reads_slowly_gets_the_whole_answer() -> None:
    """The upstream is much faster than the client: lean stops reading it whenever the
    client is behind and goes on when it drains, many times over, losing nothing."""
    pieces = [f"{i:05d}" + "z" * 3995 for i in range(500)]  # 2 MB, numbered
    chunks = [sse({"choices": [{"index": 0, "delta": {"content": p}}]}) for p in pieces]
    async with FakeOpenAI() as fake:
        async with running(lean_config(fake.base_url)) as lean:
            fake.push(Stream(events=[*chunks, DONE]))
            async with aiohttp.ClientSession() as http:
                url = f"{lean.url}/v1/chat/completions"
                async with http.post(url, json=chat_body()) as resp:
                    assert resp.status == 200
                    raw = bytearray()
                    async for block in resp.content.iter_chunked(16384):
                        raw += block
                        await asyncio.sleep(0.002)  # ~8 MB/s: far behind the upstream
    data = [line[6:] for line in raw.decode().split("\n") if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    assert content_of(data) == "".join(pieces)
    assert fake.requests[0].finished is not None  # the upstream was read to its end


async def test_what_lean_holds_for_a_client_that_never_reads_is_bounded() -> None:
    """Python memory (tracemalloc: lean's heap, not kernel socket buffers) stays flat."""
    chunk = sse({"choices": [{"index": 0, "delta": {"content": "y" * 4000}}]})
    async with FakeOpenAI() as fake:
        config = lean_config(fake.base_url, limits="slow_client_timeout = 3")
        async with running(config) as lean:
            fake.push(Stream(events=[chunk] * 5000 + [DONE]))  # 20 MB
            tracemalloc.start()
            try:
                base = tracemalloc.get_traced_memory()[0]
                _, writer = await asyncio.open_connection("127.0.0.1", lean.port)
                body = json.dumps(chat_body()).encode()
                writer.write(
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
                    % (len(body), body)
                )
                record = await fake.wait_request(0)
                sent = -1
                async with asyncio.timeout(2.5):
                    while record.events_sent != sent:  # until backpressure stops the upstream
                        sent = record.events_sent
                        await asyncio.sleep(0.2)
                held = tracemalloc.get_traced_memory()[1] - base
            finally:
                tracemalloc.stop()
            writer.close()
            await fake.wait_disconnect(0, timeout=5)
    assert 0 < sent < 5000
    # Measured ~1.5 MB on both loops: aiohttp's buffer of the upstream response (~0.7 MB),
    # one 64 KiB read and its parsed events (lean.arrivals.READ_BYTES), write buffers, and
    # this test's own raw client and fake. Not the 20 MB answer.
    assert held < 3_000_000


# --- overload ---------------------------------------------------------------------------------


async def test_over_max_streams_is_refused_at_once_without_touching_the_upstream() -> None:
    async with FakeOpenAI() as fake:
        # commit_wait: the first stream's headers go out while its upstream is silent.
        config = lean_config(fake.base_url, limits="max_streams = 1", server="commit_wait = 0.1")
        async with running(config) as lean:
            fake.push(Stall(seconds=10))
            async with aiohttp.ClientSession() as http:
                first = await http.post(lean.url + URL, json=chat_body())
                assert first.status == 200
                async with http.post(lean.url + URL, json=chat_body()) as second:
                    assert second.status == 503
                    assert second.headers["Retry-After"] == "1"
                    body = await second.json()
                async with http.post(lean.url + URL, json=chat_body(stream=False)) as third:
                    assert third.status == 503
                first.close()
            assert body["error"]["code"] == "overloaded"
            assert body["error"]["type"] == "server_error"
            assert len(fake.requests) == 1


# --- fallback to the non-streaming path before the first visible content -----------------------


async def test_stream_false_provider_still_streams_the_whole_answer() -> None:
    async with FakeOpenAI() as fake, running(lean_config(fake.base_url, stream=False)) as lean:
        fake.push(Reply(body=completion(TEXT)))
        async with (
            aiohttp.ClientSession() as http,
            http.post(lean.url + URL, json=chat_body()) as resp,
        ):
            data = await read_sse_data(resp)
    assert content_of(data) == TEXT and data[-1] == "[DONE]"
    assert [r.body["stream"] for r in fake.requests] == [False]


ROLE = sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
BEFORE_CONTENT = {
    "http_500": Reply(status=500, body=error_body("boom", type="server_error")),
    "http_429": Reply(status=429, body=error_body("slow down"), headers={"Retry-After": "1"}),
    "http_400": Reply(status=400, body=error_body("bad")),
    "cut_after_role": Stream(events=[ROLE, ROLE], cut_after=1),
    "truncated_clean_end": Stream(events=[ROLE]),
    "unparseable": Stream(events=[ROLE, b"data: {nope\n\n"]),
    "inband_error_after_preamble": Stream(
        events=[ROLE, sse({"error": {"message": "overloaded", "type": "overloaded_error"}})]
    ),
}


@pytest.mark.parametrize("failure", list(BEFORE_CONTENT))
async def test_failure_before_content_falls_back_and_delivers_the_whole_answer(
    failure: str,
) -> None:
    async with FakeOpenAI() as fake, running(lean_config(fake.base_url)) as lean:
        fake.push(BEFORE_CONTENT[failure], Reply(body=completion(TEXT)))
        async with (
            aiohttp.ClientSession() as http,
            http.post(lean.url + URL, json=chat_body()) as resp,
        ):
            assert resp.status == 200
            data = await read_sse_data(resp)
    assert content_of(data) == TEXT
    assert data[-1] == "[DONE]"
    assert [r.body["stream"] for r in fake.requests] == [True, False]


async def test_silence_before_the_first_byte_falls_back() -> None:
    config_provider = "first_byte_timeout = 0.4"
    async with (
        FakeOpenAI() as fake,
        running(lean_config(fake.base_url, provider=config_provider)) as lean,
    ):
        fake.push(Stall(seconds=10), Reply(body=completion(TEXT)))
        async with (
            aiohttp.ClientSession() as http,
            http.post(lean.url + URL, json=chat_body()) as resp,
        ):
            data = await read_sse_data(resp)
        assert content_of(data) == TEXT
        assert fake.requests[0].disconnected is not None  # the silent attempt was closed


async def test_fallback_failing_too_ends_with_a_502_before_the_commit() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens: connection refused, twice
    async with running(lean_config(url)) as lean, aiohttp.ClientSession() as http:
        async with http.post(lean.url + URL, json=chat_body()) as resp:
            status = resp.status  # nothing was committed: an HTTP status, OpenAI's body
            error = (await resp.json())["error"]
    assert status == 502
    assert error["code"] == "upstream_error"
    assert "could not connect" in error["message"]


async def test_fallback_failing_too_after_the_commit_ends_with_an_inband_error() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    config = lean_config(url, server="commit_wait = 0")  # headers before the upstream answers
    async with running(config) as lean, aiohttp.ClientSession() as http:
        async with http.post(lean.url + URL, json=chat_body()) as resp:
            assert resp.status == 200
            data = await read_sse_data(resp)
    assert "[DONE]" not in data
    assert errors_in(data)[0]["code"] == "upstream_error"
    assert "could not connect" in errors_in(data)[0]["message"]


# --- failure after the first visible content: a typed error, never a finish -------------------


async def test_cut_after_content_is_an_error_not_a_finish() -> None:
    async with FakeOpenAI() as fake, running(lean_config(fake.base_url)) as lean:
        stream = text_stream(TEXT)
        stream.cut_after = 4  # role chunk + three words
        fake.push(stream)
        async with (
            aiohttp.ClientSession() as http,
            http.post(lean.url + URL, json=chat_body()) as resp,
        ):
            data = await read_sse_data(resp)
    assert content_of(data) == "One two three "
    assert "[DONE]" not in data
    assert errors_in(data)[-1]["code"] == "upstream_error"
    finishes = [json.loads(d)["choices"][0]["finish_reason"] for d in data if '"choices"' in d]
    assert set(finishes) == {None}
    assert len(fake.requests) == 1  # no fallback after the commit point


async def test_silence_mid_stream_is_an_upstream_timeout() -> None:
    config = "read_timeout = 0.4"
    async with FakeOpenAI() as fake, running(lean_config(fake.base_url, provider=config)) as lean:
        stream = text_stream(TEXT)
        stream.stall_after = 3
        fake.push(stream)
        async with (
            aiohttp.ClientSession() as http,
            http.post(lean.url + URL, json=chat_body()) as resp,
        ):
            data = await read_sse_data(resp)
        assert content_of(data) == "One two "
        assert errors_in(data)[-1]["code"] == "upstream_timeout"
        assert "[DONE]" not in data
        await fake.wait_disconnect(0, timeout=3)


async def test_inband_error_after_content_keeps_its_type() -> None:
    async with FakeOpenAI() as fake, running(lean_config(fake.base_url)) as lean:
        error = sse({"error": {"message": "rate limit", "type": "rate_limit_error"}})
        events = [*text_stream(TEXT).events[:3], error]
        fake.push(Stream(events=events))
        async with (
            aiohttp.ClientSession() as http,
            http.post(lean.url + URL, json=chat_body()) as resp,
        ):
            data = await read_sse_data(resp)
    assert errors_in(data)[-1]["code"] == "rate_limited"


async def test_non_stream_failure_is_an_http_error_with_openai_body() -> None:
    async with FakeOpenAI() as fake, running(lean_config(fake.base_url)) as lean:
        fake.push(
            Reply(status=503, body=error_body("down")), Reply(status=503, body=error_body("down"))
        )
        async with aiohttp.ClientSession() as http:
            async with http.post(lean.url + URL, json=chat_body(stream=False)) as resp:
                assert resp.status == 502
                body = await resp.json()
    assert body["error"]["code"] == "upstream_error"
    assert "HTTP 503" in body["error"]["message"]


# --- keys never leave lean ----------------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 401, 500])
@pytest.mark.parametrize("stream", [True, False])
async def test_an_upstream_echoing_the_key_never_leaks_it(
    status: int, stream: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    echo = Reply(status=status, body=error_body(f"Incorrect API key provided: {SECRET}."))
    async with FakeOpenAI() as fake, running(lean_config(fake.base_url)) as lean:
        fake.push(echo, echo)
        async with aiohttp.ClientSession() as http:
            async with http.post(lean.url + URL, json=chat_body(stream=stream)) as resp:
                text = await resp.text()
        assert fake.requests and fake.requests[0].headers["Authorization"] == f"Bearer {SECRET}"
    assert SECRET not in text
    assert "error" in text
    assert SECRET not in caplog.text
    assert all(SECRET not in str(r.args) for r in caplog.records)
