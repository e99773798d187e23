"""CORS for the origins in `[server] cors_origins` (docs/protocol.md §6): preflights answered
without auth and without reaching a handler, `Access-Control-Allow-Origin` on every response
(streams, WebSocket upgrades and errors included), nothing for an origin not listed. Real
HTTP clients (and a raw socket for the upgrade's headers) against lean on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDictProxy

from tests.fakes import FakeOpenAI, Reply, error_body
from tests.support import chat_body, lean_config, running

pytestmark = pytest.mark.timeout(30)

SCENE = "[scene.chat]\nmodel = default\ntemplate = {message}\n"
AUTH = "[auth]\ntokens_env = LEAN_TOKENS\n"
TOKEN = "cors-test-token"
LISTED = "https://app.example.com"
OTHER = "http://localhost:5173"
BEARER = {"Authorization": f"Bearer {TOKEN}"}

# What the official SDKs and lean.js send from a browser, as Chromium lists them in
# Access-Control-Request-Headers (lower case, sorted).
SDK_HEADERS = [
    "anthropic-beta",
    "anthropic-dangerous-direct-browser-access",
    "anthropic-version",
    "authorization",
    "content-type",
    "last-event-id",
    "x-api-key",
    "x-stainless-arch",
    "x-stainless-async",
    "x-stainless-helper-method",
    "x-stainless-lang",
    "x-stainless-os",
    "x-stainless-package-version",
    "x-stainless-poll-helper",
    "x-stainless-retry-count",
    "x-stainless-runtime",
    "x-stainless-runtime-version",
    "x-stainless-timeout",
]
POST_ROUTES = [
    "/v1/chat/completions",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/v1/responses",
    "/v1/scenes/chat/stream",
    "/v1/scenes/chat/ui",
    "/v1/runs/run_1/cancel",
    "/v1/runs/run_1/tool-results",
]


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as upstream:
        yield upstream


def config(fake: FakeOpenAI, origins: str = f"{LISTED}, {OTHER}", *, tokens: bool = True) -> Any:
    if not tokens:
        return lean_config(fake.base_url, server=f"cors_origins = {origins}", extra=SCENE)
    return lean_config(
        fake.base_url,
        server=f"cors_origins = {origins}",
        extra=SCENE + AUTH,
        environ={"LEAN_TOKENS": TOKEN},
    )


def preflight(origin: str, method: str = "POST", headers: str = "") -> dict[str, str]:
    asked = {"Origin": origin, "Access-Control-Request-Method": method}
    if headers:
        asked["Access-Control-Request-Headers"] = headers
    return asked


def assert_cors(headers: CIMultiDictProxy[str], origin: str) -> None:
    assert headers.get("Access-Control-Allow-Origin") == origin
    assert "Origin" in [v.strip() for v in headers.get("Vary", "").split(",")]
    exposed = [v.strip().lower() for v in headers["Access-Control-Expose-Headers"].split(",")]
    assert "retry-after" in exposed
    assert "Access-Control-Allow-Credentials" not in headers  # no cookies: none asked for


def assert_no_cors(headers: CIMultiDictProxy[str]) -> None:
    assert not any(name.lower().startswith("access-control-") for name in headers), headers


# --- preflights ---


async def test_a_preflight_from_a_listed_origin_is_answered_without_auth_on_every_route(
    fake: FakeOpenAI,
) -> None:
    asked = ", ".join([*SDK_HEADERS, "x-not-allowed", "cookie"])
    async with running(config(fake)) as lean, aiohttp.ClientSession() as http:
        routes = [("POST", path) for path in POST_ROUTES]
        routes += [("GET", "/v1/models"), ("GET", "/v1/scenes/chat/stream"), ("GET", "/v1/ws")]
        routes += [("GET", "/v1/scenes/chat/ui/chat1/stream"), ("GET", "/v1/runs/run_1/stream")]
        for method, path in routes:
            for origin in (LISTED, OTHER):
                async with http.options(
                    lean.url + path, headers=preflight(origin, method, asked)
                ) as resp:
                    assert resp.status == 204, (path, await resp.text())
                    assert_cors(resp.headers, origin)
                    methods = resp.headers["Access-Control-Allow-Methods"].split(", ")
                    assert method in methods and "OPTIONS" in methods
                    allowed = resp.headers["Access-Control-Allow-Headers"].split(", ")
                    assert allowed == SDK_HEADERS  # the two others left out: the browser refuses
                    assert int(resp.headers["Access-Control-Max-Age"]) >= 600
                    assert await resp.read() == b""
        # Not the actual request: the same POST without a token is still 401.
        async with http.post(
            lean.url + "/v1/chat/completions", json=chat_body(), headers={"Origin": LISTED}
        ) as resp:
            assert resp.status == 401
            assert_cors(resp.headers, LISTED)  # and the page can read why
        # An OPTIONS that is no preflight (no Origin, or no Request-Method) is any request.
        for headers in ({"Origin": LISTED}, {"Access-Control-Request-Method": "POST"}):
            async with http.options(lean.url + "/v1/chat/completions", headers=headers) as resp:
                assert resp.status == 401
                assert "Access-Control-Allow-Methods" not in resp.headers
    assert fake.requests == []


async def test_a_preflight_from_an_origin_not_listed_is_refused_without_cors_headers(
    fake: FakeOpenAI,
) -> None:
    async with running(config(fake)) as lean, aiohttp.ClientSession() as http:
        own = f"http://127.0.0.1:{lean.port}"
        for origin in ("https://evil.example", "null", f"{LISTED}.evil.example", own):
            for path in ("/v1/chat/completions", "/v1/scenes/chat/stream", "/lean.js"):
                async with http.options(
                    lean.url + path, headers=preflight(origin, headers="content-type")
                ) as resp:
                    assert resp.status == 403, (origin, path)
                    assert (await resp.json())["error"]["code"] == "forbidden"
                    assert_no_cors(resp.headers)
    # CORS off (no cors_origins): every preflight refused, and no hook at all.
    cfg = lean_config(fake.base_url, extra=SCENE)
    async with running(cfg) as lean, aiohttp.ClientSession() as http:
        async with http.options(
            lean.url + "/v1/chat/completions", headers=preflight(LISTED, headers="content-type")
        ) as resp:
            assert resp.status == 403
            assert_no_cors(resp.headers)
            assert "Vary" not in resp.headers
    assert fake.requests == []


async def test_a_preflight_to_a_foreign_host_without_tokens_is_refused(fake: FakeOpenAI) -> None:
    async with running(config(fake, tokens=False)) as lean, aiohttp.ClientSession() as http:
        headers = {**preflight(LISTED, headers="content-type"), "Host": "evil.example"}
        async with http.options(lean.url + "/v1/chat/completions", headers=headers) as resp:
            assert resp.status == 403
            assert "loopback" in (await resp.json())["error"]["message"]
        async with http.options(
            lean.url + "/v1/chat/completions", headers=preflight(LISTED, headers="content-type")
        ) as resp:
            assert resp.status == 204
    assert fake.requests == []


# --- the actual requests: every response carries the headers ---


async def test_streams_carry_the_cors_headers_sse_ndjson_and_eventsource(fake: FakeOpenAI) -> None:
    headers = {**BEARER, "Origin": LISTED, "Sec-Fetch-Site": "cross-site"}
    async with running(config(fake)) as lean, aiohttp.ClientSession() as http:
        async with http.post(
            lean.url + "/v1/chat/completions", json=chat_body(), headers=headers
        ) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            assert_cors(resp.headers, LISTED)
            assert b"[DONE]" in await resp.read()
        ndjson = {**headers, "Accept": "application/x-ndjson"}
        async with http.post(
            lean.url + "/v1/scenes/chat/stream", json={"message": "Hi"}, headers=ndjson
        ) as resp:
            assert resp.headers["Content-Type"].startswith("application/x-ndjson")
            assert_cors(resp.headers, LISTED)
            assert b'"type":"done"' in await resp.read()
        # An EventSource: GET, the token in the query, no Authorization header.
        url = f"{lean.url}/v1/scenes/chat/stream?message=Hi&access_token={TOKEN}"
        async with http.get(url, headers={"Origin": OTHER}) as resp:
            assert resp.status == 200
            assert_cors(resp.headers, OTHER)
            assert b"event: done" in await resp.read()
    assert len(fake.requests) == 3


async def test_errors_carry_the_cors_headers(fake: FakeOpenAI) -> None:
    fake.default = lambda body: Reply(
        503, error_body("upstream overloaded", type="server_error"), headers={"Retry-After": "7"}
    )
    origin = {"Origin": LISTED}
    async with running(config(fake)) as lean, aiohttp.ClientSession() as http:
        cases = [
            ("POST", "/v1/chat/completions", {}, 401),  # no token
            ("POST", "/v1/scenes/nope/stream", BEARER, 404),  # no such scene
            ("GET", "/v1/no/such/route", BEARER, 404),
            ("GET", "/v1/chat/completions", BEARER, 405),
        ]
        for method, path, auth, status in cases:
            async with http.request(
                method, lean.url + path, json={"message": "Hi"}, headers={**origin, **auth}
            ) as resp:
                assert resp.status == status, path
                assert_cors(resp.headers, LISTED)
        async with http.post(
            lean.url + "/v1/chat/completions",
            data=b"{}",
            headers={**origin, **BEARER, "Content-Type": "text/plain"},
        ) as resp:
            assert resp.status == 415
            assert_cors(resp.headers, LISTED)
        async with http.post(
            lean.url + "/v1/chat/completions",
            json=chat_body(stream=False),
            headers={**origin, **BEARER},
        ) as resp:
            assert resp.status == 503
            assert resp.headers["Retry-After"] == "7"  # exposed: the page may read it
            assert_cors(resp.headers, LISTED)


async def test_an_origin_not_listed_gets_no_cors_headers_and_is_refused(fake: FakeOpenAI) -> None:
    async with running(config(fake)) as lean, aiohttp.ClientSession() as http:
        for origin in ("https://evil.example", f"{LISTED}:8443", "http://app.example.com"):
            async with http.post(
                lean.url + "/v1/chat/completions",
                json=chat_body(),
                headers={**BEARER, "Origin": origin},
            ) as resp:
                assert resp.status == 403, origin
                assert_no_cors(resp.headers)
                assert "Origin" in resp.headers["Vary"]
        # Not a browser (no Origin): served, without CORS headers.
        async with http.post(
            lean.url + "/v1/chat/completions", json=chat_body(), headers=BEARER
        ) as resp:
            assert resp.status == 200
            assert_no_cors(resp.headers)
            await resp.read()
    assert len(fake.requests) == 1


async def test_star_with_tokens_allows_any_origin_and_still_asks_for_the_token(
    fake: FakeOpenAI,
) -> None:
    async with running(config(fake, "*")) as lean, aiohttp.ClientSession() as http:
        origin = "https://anywhere.example:8443"
        async with http.options(
            lean.url + "/v1/scenes/chat/stream",
            headers=preflight(origin, headers="authorization, content-type"),
        ) as resp:
            assert resp.status == 204
            assert_cors(resp.headers, origin)  # the origin echoed, never a literal *
        async with http.post(
            lean.url + "/v1/scenes/chat/stream", json={"message": "Hi"}, headers={"Origin": origin}
        ) as resp:
            assert resp.status == 401
            assert_cors(resp.headers, origin)
        async with http.post(
            lean.url + "/v1/scenes/chat/stream",
            json={"message": "Hi"},
            headers={"Origin": origin, **BEARER},
        ) as resp:
            assert resp.status == 200
            assert_cors(resp.headers, origin)
            assert b"event: done" in await resp.read()
    assert len(fake.requests) == 1


async def upgrade_headers(port: int, origin: str, query: str) -> tuple[int, dict[str, str]]:
    """A WebSocket handshake by hand: the status and headers of lean's answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            (
                f"GET /v1/ws{query} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: {origin}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            ).encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    finally:
        writer.close()
    status_line, *lines = head.decode().split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        if name:
            headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers


async def test_a_websocket_upgrade_for_a_listed_origin_carries_the_cors_headers(
    fake: FakeOpenAI,
) -> None:
    async with running(config(fake)) as lean:
        status, headers = await upgrade_headers(lean.port, LISTED, f"?access_token={TOKEN}")
        assert status == 101
        assert headers["access-control-allow-origin"] == LISTED
        status, headers = await upgrade_headers(lean.port, "https://evil.example", "")
        assert status == 403
        assert "access-control-allow-origin" not in headers


async def test_lean_js_is_shared_with_listed_origins_and_the_page_is_not(fake: FakeOpenAI) -> None:
    async with running(config(fake)) as lean, aiohttp.ClientSession() as http:
        for path in ("/lean.js", "/lean.d.ts"):
            async with http.get(lean.url + path, headers={"Origin": LISTED}) as resp:
                assert resp.status == 200
                assert_cors(resp.headers, LISTED)
                assert resp.headers["Vary"] == "Accept-Encoding, Origin"
                etag = resp.headers["ETag"]
            # The revalidation too (a browser merges a 304's headers into what it cached).
            async with http.get(
                lean.url + path, headers={"Origin": LISTED, "If-None-Match": etag}
            ) as resp:
                assert resp.status == 304
                assert_cors(resp.headers, LISTED)
            async with http.get(lean.url + path, headers={"Origin": "https://evil.example"}) as r:
                assert r.status == 200  # public, but not readable by that page
                assert_no_cors(r.headers)
        for path in ("/", "/app.js"):
            async with http.get(lean.url + path, headers={"Origin": LISTED}) as resp:
                assert resp.status == 200
                assert_no_cors(resp.headers)
                assert "Origin" not in resp.headers["Vary"]
            async with http.options(lean.url + path, headers=preflight(LISTED)) as resp:
                assert resp.status == 405
                assert_no_cors(resp.headers)


def test_the_allowed_headers_cover_what_the_sdks_send() -> None:
    from lean.origin import ALLOWED_HEADER_PREFIX, ALLOWED_HEADERS

    for name in SDK_HEADERS:
        assert name in ALLOWED_HEADERS or name.startswith(ALLOWED_HEADER_PREFIX), name
    assert "cookie" not in ALLOWED_HEADERS


# --- WebSocket auth for browsers: the subprotocol token ---


async def test_a_browser_websocket_may_send_its_token_as_a_subprotocol_never_logged(
    fake: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url = "/v1/ws"
    async with running(config(fake)) as lean, aiohttp.ClientSession() as http:
        origin = {"Origin": LISTED}
        async with http.ws_connect(
            lean.url + url, protocols=("lean", f"lean.bearer.{TOKEN}"), headers=origin
        ) as ws:
            assert ws.protocol == "lean"  # the token is never echoed
            await ws.send_json({"type": "run", "runId": "r1", "scene": "chat", "message": "Hi"})
            while (frame := await ws.receive_json(timeout=10))["type"] not in ("done", "error"):
                pass
            assert frame["type"] == "done"
        refusals = [
            (("lean", "lean.bearer.wrong-token"), "", 401),
            (("lean",), "", 401),
            # `lean` not offered: refused before aiohttp's handshake would log the list.
            ((f"lean.bearer.{TOKEN}",), "", 400),
            ((f"other.{TOKEN}",), f"?access_token={TOKEN}", 400),
        ]
        for protocols, query, status in refusals:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(lean.url + url + query, protocols=protocols, headers=origin)
            assert refused.value.status == status, protocols
        # The subprotocol is for the upgrade only, not a way to authenticate other requests.
        async with http.get(
            lean.url + "/v1/models", headers={"Sec-WebSocket-Protocol": f"lean.bearer.{TOKEN}"}
        ) as resp:
            assert resp.status == 401
    assert len(fake.requests) == 1
    logged = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert TOKEN not in logged


async def test_the_503_of_a_full_lean_carries_the_cors_headers(fake: FakeOpenAI) -> None:
    """Answered by the outermost middleware (lean.connections), before any route: still CORS."""
    cfg = lean_config(
        fake.base_url,
        server=f"cors_origins = {LISTED}\nmax_connections = 1",
        extra=SCENE + AUTH,
        environ={"LEAN_TOKENS": TOKEN},
    )
    async with running(cfg) as lean, aiohttp.ClientSession() as http:
        busy = await http.ws_connect(f"{lean.url}/v1/ws?access_token={TOKEN}")
        try:
            async with aiohttp.ClientSession() as other:
                async with other.get(
                    lean.url + "/v1/models", headers={**BEARER, "Origin": LISTED}
                ) as resp:
                    assert resp.status == 503
                    assert resp.headers["Retry-After"] == "1"
                    assert_cors(resp.headers, LISTED)
        finally:
            await busy.close()
