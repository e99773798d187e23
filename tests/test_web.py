"""`GET /v1/scenes`, and lean's own web files: the chat page at `/`, `/lean.js` (lean/static.py)."""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from lean import static
from tests.support import lean_config, running

ROOT = Path(__file__).parent.parent
WEB = ROOT / "lean" / "web"
TOKEN = "web-test-token"
SCENES = """
[tool.ask_user]
kind = client

[tool.clock]
kind = python
function = tests.toolbox:clock

[scene.chat]
model = default
template = {message}
tools = ask_user, clock

[scene.summary]
model = default
template = Summarise in {words} words, as a {tone} note: {message}

[scene.greeting]
model = default
template = Greet {name}.
"""


def config(server: str = "", tokens: bool = False) -> Any:
    environ = {"LEAN_TOKENS": TOKEN} if tokens else {}
    return lean_config(extra=SCENES, server=server, environ=environ)


async def test_scenes_lists_each_scene_with_its_inputs_and_tools() -> None:
    async with running(config()) as lean, aiohttp.ClientSession() as http:
        async with http.get(f"{lean.url}/v1/scenes") as r:
            assert r.status == 200 and r.content_type == "application/json"
            body = await r.json()
    assert body == {
        "scenes": [
            {
                "name": "chat",
                "model": "default",
                "inputs": [],
                "tools": ["ask_user", "clock"],
                "needsMessage": True,
            },
            {
                "name": "summary",
                "model": "default",
                "inputs": ["words", "tone"],
                "tools": [],
                "needsMessage": True,
            },
            {
                "name": "greeting",
                "model": "default",
                "inputs": ["name"],
                "tools": [],
                "needsMessage": False,
            },
        ]
    }


async def test_scenes_needs_a_token_when_lean_has_tokens() -> None:
    async with running(config(tokens=True)) as lean, aiohttp.ClientSession() as http:
        async with http.get(f"{lean.url}/v1/scenes") as r:
            assert r.status == 401
            assert (await r.json())["error"]["code"] == "unauthorized"
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        async with http.get(f"{lean.url}/v1/scenes", headers=bearer) as r:
            assert r.status == 200
            assert [s["name"] for s in (await r.json())["scenes"]] == [
                "chat",
                "summary",
                "greeting",
            ]


FILES = {
    "/": ("index.html", "text/html"),
    "/app.js": ("app.js", "text/javascript"),
    "/app.css": ("app.css", "text/css"),
    "/lean.js": ("lean.js", "text/javascript"),
    "/lean.d.ts": ("lean.d.ts", "application/typescript"),
    "/favicon.svg": ("favicon.svg", "image/svg+xml"),
}


@pytest.mark.parametrize("path", list(FILES))
async def test_web_files_are_served_with_their_type_and_no_token(path: str) -> None:
    name, content_type = FILES[path]
    async with running(config(tokens=True)) as lean, aiohttp.ClientSession() as http:
        etags = []
        for encoding in ("identity", "gzip, deflate"):
            async with http.get(lean.url + path, headers={"Accept-Encoding": encoding}) as r:
                assert r.status == 200
                assert r.content_type == content_type
                assert r.charset == ("utf-8" if "svg" not in content_type else None)
                assert await r.read() == (WEB / name).read_bytes()  # gzip undone by aiohttp
                assert r.headers.get("Content-Encoding", "identity") == encoding.split(",")[0]
                assert r.headers["X-Content-Type-Options"] == "nosniff"
                assert r.headers["Cross-Origin-Resource-Policy"] == "same-origin"
                assert r.headers["Cache-Control"] == "no-cache"
                assert r.headers["Vary"] == "Accept-Encoding"
                assert "Access-Control-Allow-Origin" not in r.headers
                etags.append(r.headers["ETag"])
            revalidate = {"Accept-Encoding": encoding, "If-None-Match": etags[-1]}
            async with http.get(lean.url + path, headers=revalidate) as r:
                assert r.status == 304 and await r.read() == b""
                assert r.headers["ETag"] == etags[-1]
        plain, packed = etags
        assert plain.strip('"') in hashlib.sha256((WEB / name).read_bytes()).hexdigest()
        assert packed != plain  # one strong ETag per encoding
        async with http.get(lean.url + path, headers={"If-None-Match": '"other"'}) as r:
            assert r.status == 200
        async with http.head(lean.url + path) as r:
            assert r.status == 200


async def test_the_page_has_a_strict_content_security_policy_and_no_inline_script() -> None:
    async with running(config()) as lean, aiohttp.ClientSession() as http:
        async with http.get(lean.url + "/") as r:
            csp = r.headers["Content-Security-Policy"]
            page = await r.text()
            assert r.headers["X-Frame-Options"] == "DENY"
    rules = dict(rule.strip().split(" ", 1) for rule in csp.split(";"))
    assert rules["default-src"] == "'self'" and rules["script-src"] == "'self'"
    assert rules["frame-ancestors"] == "'none'" and rules["object-src"] == "'none'"
    assert "unsafe" not in csp
    # every script is a file of lean's own origin
    assert page.count("<script") == page.count('<script type="module" src="/')
    assert 'name="viewport"' in page


async def test_web_ui_false_leaves_out_the_page_but_not_lean_js() -> None:
    async with running(config("web_ui = false")) as lean, aiohttp.ClientSession() as http:
        for path in ("/", "/app.js", "/app.css", "/favicon.svg"):
            async with http.get(lean.url + path) as r:
                assert r.status == 404, path
        for path in ("/lean.js", "/lean.d.ts"):
            async with http.get(lean.url + path) as r:
                assert r.status == 200, path


def test_every_web_file_is_served_and_ships_in_the_wheel() -> None:
    names = {path.name for path in WEB.iterdir()}
    assert {name for name, _ in {**static.CLIENT, **static.PAGE}.values()} == names
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["lean"]
    assert "web/*" in package_data


def test_config_ini_documents_web_ui() -> None:
    assert "web_ui = true" in (ROOT / "config.ini").read_text()
