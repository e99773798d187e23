"""The aiohttp internals lean relies on (lean/aiohttp_internals.py) still hold, and the fast
read path is taken: a fall-back to `readany()` would keep every answer right and cost CPU."""

from __future__ import annotations

import aiohttp
from aiohttp import web, web_protocol

from lean import aiohttp_internals
from lean.aiohttp_internals import READS
from tests.fakes import FakeOpenAI, text_stream
from tests.support import chat_body, content_of, lean_config, read_sse_data, running

CHAT_SCENE = "[scene.chat]\nmodel = default\ntemplate = {message}\n"
TEXT = "one two three four five six seven eight nine ten"


async def test_an_upstream_stream_is_read_in_the_data_callback() -> None:
    fast, fallback = READS.fast, READS.fallback
    async with FakeOpenAI() as fake, running(lean_config(fake.base_url)) as lean:
        stream = text_stream(TEXT)
        stream.delay = 0.005  # reads arrive one by one, after the reader was handed over
        fake.push(stream)
        async with aiohttp.ClientSession() as http:
            async with http.post(lean.url + "/v1/chat/completions", json=chat_body()) as resp:
                assert content_of(await read_sse_data(resp)) == TEXT
    assert READS.fallback == fallback, "an upstream stream was read with readany()"
    assert READS.fast > fast, "no upstream read went through the data callback"


async def test_a_scene_stream_is_read_in_the_data_callback() -> None:
    fast, fallback = READS.fast, READS.fallback
    async with FakeOpenAI() as fake, running(lean_config(fake.base_url, extra=CHAT_SCENE)) as lean:
        stream = text_stream(TEXT)
        stream.delay = 0.005
        fake.push(stream)
        async with aiohttp.ClientSession() as http:
            async with http.post(
                lean.url + "/v1/scenes/chat/stream", json={"message": "hi"}
            ) as resp:
                assert resp.status == 200
                assert b"event: done" in await resp.read()
    assert READS.fallback == fallback
    assert READS.fast > fast


def test_the_versions_pinned_are_the_versions_tested() -> None:
    assert aiohttp.__version__.startswith("3.14."), aiohttp.__version__


def test_the_reader_swap_keeps_aiohttps_layout() -> None:
    # A swapped class must add no instance state; aiohttp's reader must still have slots.
    assert aiohttp_internals._ArrivingReader.__slots__ == ()
    assert "_buffer" in aiohttp.StreamReader.__slots__
    for name in ("feed_data", "feed_eof", "set_exception", "read_nowait"):
        assert callable(getattr(aiohttp.StreamReader, name))


def test_the_websocket_data_callback_is_still_a_slot() -> None:
    assert "_data_received_cb" in web_protocol.RequestHandler.__slots__


def test_a_stream_response_sends_its_head_at_prepare() -> None:
    # lean.client_io writes body frames to the transport itself after prepare().
    assert web.StreamResponse._send_headers_immediately is True
