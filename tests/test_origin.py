"""A web page cannot spend the keys (issue 10, docs/protocol.md §6): media types, Origin,
Sec-Fetch-Site and Host, each from a real HTTP or WebSocket client against lean on
127.0.0.1, and every refused request provably never reaches the fake upstream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from lean.config import ConfigError
from tests.fakes import FakeOpenAI
from tests.support import chat_body, lean_config, running

pytestmark = pytest.mark.timeout(30)

SCENE = "[scene.chat]\nmodel = default\ntemplate = {message}\n"
AUTH = "[auth]\ntokens_env = LEAN_TOKENS\n"
LISTED = "https://app.example.com"


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as upstream:
        yield upstream


def config(fake: FakeOpenAI, *, listed: bool = False, **more: Any) -> Any:
    server = f"cors_origins = {LISTED}, http://localhost:5173" if listed else ""
    return lean_config(fake.base_url, server=server, extra=SCENE, **more)


# --- JSON endpoints take JSON only ---


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None]
)
async def test_a_json_endpoint_refuses_another_media_type_before_any_provider_call(
    fake: FakeOpenAI, content_type: str | None
) -> None:
    body = b'{"model": "default", "messages": [{"role": "user", "content": "Hi"}]}'
    headers = {} if content_type is None else {"Content-Type": content_type}
    async with running(config(fake)) as lean, aiohttp.ClientSession() as http:
        paths = [
            "/v1/chat/completions",
            "/v1/responses",
            "/v1/scenes/chat/stream",
            "/v1/scenes/chat/ui",
        ]
        for path in (*paths, "/v1/runs/r1/tool-results"):
            # skip_auto_headers: aiohttp would add application/octet-stream to raw bytes
            async with http.post(
                lean.url + path, data=body, headers=headers, skip_auto_headers=["Content-Type"]
            ) as resp:
                assert resp.status == 415, path
                error = (await resp.json())["error"]
                assert error["code"] == "bad_request"
                assert (content_type or "none") in error["message"]
                assert "application/json" in error["message"]
        assert fake.requests == []
        for accepted in (
            "application/json; charset=utf-8",
            "application/vnd.x+json",
            "APPLICATION/JSON",
        ):
            async with http.post(
                lean.url + "/v1/chat/completions",
                json=chat_body(stream=False),
                headers={"Content-Type": accepted},
            ) as resp:
                assert resp.status == 200, accepted
    assert len(fake.requests) == 3


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
async def test_the_anthropic_routes_refuse_another_media_type_in_anthropics_body(
    fake: FakeOpenAI, path: str
) -> None:
    body = b'{"model": "default", "max_tokens": 9, "messages": [{"role": "user", "content": "Hi"}]}'
    async with running(config(fake)) as lean, aiohttp.ClientSession() as http:
        async with http.post(
            lean.url + path, data=body, headers={"Content-Type": "text/plain"}
        ) as resp:
            assert resp.status == 415
            answer = await resp.json()
    assert answer["type"] == "error" and answer["error"]["type"] == "invalid_request_error"
    assert "application/json" in answer["error"]["message"]
    assert fake.requests == []


# --- Origin and Sec-Fetch-Site, on every route ---


async def test_a_websocket_from_a_foreign_origin_is_refused_before_the_upgrade(
    fake: FakeOpenAI,
) -> None:
    async with running(config(fake)) as lean, aiohttp.ClientSession() as http:
        for origin in ("https://evil.example", "null", "http://127.0.0.1:1"):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(lean.url + "/v1/ws", headers={"Origin": origin})
            assert refused.value.status == 403, origin
    assert fake.requests == []


async def test_a_websocket_without_origin_from_lean_itself_or_a_listed_origin_is_welcome(
    fake: FakeOpenAI,
) -> None:
    async with running(config(fake, listed=True)) as lean, aiohttp.ClientSession() as http:
        # Not a browser (no Origin), lean's own page, a listed origin: all welcome.
        own = f"http://127.0.0.1:{lean.port}"
        for headers in ({}, {"Origin": own}, {"Origin": LISTED}, {"Origin": LISTED + ":443"}):
            async with http.ws_connect(lean.url + "/v1/ws", headers=headers) as ws:
                await ws.send_json({"type": "run", "runId": "r1", "scene": "chat", "message": "Hi"})
                while (frame := await ws.receive_json(timeout=10))["type"] not in ("done", "error"):
                    pass
                assert frame["type"] == "done", headers
    assert len(fake.requests) == 4


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://evil.example"},
        {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "cross-site"},  # an <img src> or a link: no Origin at all
        {"Sec-Fetch-Site": "same-site"},
        {"Sec-Fetch-Site": "cross-site", "Origin": "https://app.example.com.evil.example"},
    ],
)
async def test_a_foreign_page_starts_nothing_on_any_route(
    fake: FakeOpenAI, headers: dict[str, str]
) -> None:
    async with running(config(fake)) as lean, aiohttp.ClientSession() as http:
        get = "/v1/scenes/chat/stream?message=Hi"  # what an EventSource or an <img> asks
        for method, path in [("GET", get), ("GET", "/v1/models"), ("POST", "/v1/chat/completions")]:
            async with http.request(
                method, lean.url + path, json=chat_body(), headers=headers
            ) as resp:
                assert resp.status == 403, (method, path)
                error = (await resp.json())["error"]
                assert error["code"] == "forbidden"
        async with http.get(lean.url + "/healthz", headers=headers) as resp:
            assert resp.status == 200  # the probes stay open
        async with http.get(lean.url + "/metrics") as resp:
            reason = "origin" if "Origin" in headers else "fetch_site"
            assert f'lean_admission_rejections_total{{reason="{reason}"}} 3' in await resp.text()
    assert fake.requests == []


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": LISTED, "Sec-Fetch-Site": "cross-site"},
        {"Origin": "http://localhost:5173", "Sec-Fetch-Site": "same-site"},
        {"Sec-Fetch-Site": "same-origin"},
        {"Sec-Fetch-Site": "none"},  # typed in the address bar
    ],
)
async def test_listed_origins_and_same_origin_requests_are_served(
    fake: FakeOpenAI, headers: dict[str, str]
) -> None:
    async with running(config(fake, listed=True)) as lean, aiohttp.ClientSession() as http:
        async with http.get(lean.url + "/v1/scenes/chat/stream?message=Hi", headers=headers) as r:
            assert r.status == 200
            assert "event: done" in await r.text()
    assert len(fake.requests) == 1


# --- Host (DNS rebinding) without tokens ---

FOREIGN_HOSTS = ["evil.example", "evil.example:{port}", "192.168.1.5:{port}", "[::2]"]
LOOPBACK_HOSTS = [
    "localhost:{port}",
    "LocalHost",
    "app.localhost:{port}",
    "127.0.0.9:{port}",
    "[::1]:{port}",
]


async def test_without_tokens_only_a_loopback_host_is_served(fake: FakeOpenAI) -> None:
    async with running(config(fake)) as lean, aiohttp.ClientSession() as http:
        url = lean.url + "/v1/chat/completions"
        for host in FOREIGN_HOSTS:
            headers = {"Host": host.format(port=lean.port)}
            async with http.post(url, json=chat_body(), headers=headers) as r:
                assert r.status == 403, host
                assert "loopback" in (await r.json())["error"]["message"]
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(lean.url + "/v1/ws", headers=headers)
            assert refused.value.status == 403
        assert fake.requests == []
        for host in LOOPBACK_HOSTS:
            headers = {"Host": host.format(port=lean.port)}
            async with http.post(url, json=chat_body(stream=False), headers=headers) as r:
                assert r.status == 200, host
    assert len(fake.requests) == len(LOOPBACK_HOSTS)


async def test_with_tokens_any_host_is_served_but_not_a_foreign_origin(fake: FakeOpenAI) -> None:
    cfg = lean_config(fake.base_url, extra=AUTH, environ={"LEAN_TOKENS": "tok"})
    async with running(cfg) as lean, aiohttp.ClientSession() as http:
        url = lean.url + "/v1/chat/completions"
        headers = {"Host": "lean.example.com", "Authorization": "Bearer tok"}
        async with http.post(url, json=chat_body(stream=False), headers=headers) as r:
            assert r.status == 200
        # A token does not make a foreign page welcome (a page cannot send one without CORS).
        headers["Origin"] = "https://evil.example"
        async with http.post(url, json=chat_body(stream=False), headers=headers) as r:
            assert r.status == 403
    assert len(fake.requests) == 1


# --- the rules themselves ---


def test_cors_origins_star_needs_tokens() -> None:
    with pytest.raises(ConfigError) as refused:
        lean_config(server="cors_origins = *")
    assert (refused.value.section, refused.value.key) == ("server", "cors_origins")
    cfg = lean_config(server="cors_origins = *", extra=AUTH, environ={"LEAN_TOKENS": "t"})
    assert cfg.server.cors_origins == ("*",)


@pytest.mark.parametrize(
    "bad", ["app.example.com", "https://app.example.com/path", "ftp://x", "null"]
)
def test_cors_origins_must_be_origins(bad: str) -> None:
    with pytest.raises(ConfigError) as refused:
        lean_config(server=f"cors_origins = {bad}")
    assert refused.value.key == "cors_origins"
    assert refused.value.got == bad


def test_origins_are_kept_as_browsers_write_them() -> None:
    from lean.origin import Browsers, normalise_origin

    cfg = lean_config(server="cors_origins = HTTPS://App.Example.com:443/, http://[::1]:5173")
    assert cfg.server.cors_origins == ("https://app.example.com", "http://[::1]:5173")
    assert normalise_origin("http://localhost:80") == "http://localhost"
    assert Browsers(cfg.server.cors_origins, tokens=False).listed("https://app.example.com")


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("localhost.", True),
        ("a.b.localhost:8080", True),
        ("127.1.2.3:80", True),
        ("[::1]:8080", True),
        ("[::ffff:127.0.0.1]", True),
        ("localhost.evil.example", False),
        ("127.0.0.1.evil.example", False),
        ("0.0.0.0", False),
        ("", False),
        ("[::1", False),
    ],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    from lean.origin import is_loopback_host

    assert is_loopback_host(host) is loopback
