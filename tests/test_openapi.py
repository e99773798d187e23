"""lean/openapi.py: the description of lean's own routes, against the routes the app has."""

from __future__ import annotations

import gzip
import json
import re
from typing import Any

import aiohttp
from openapi_spec_validator import validate

from lean import openapi
from lean.app import create_app
from lean.events import Delta, Done, Error, Start, ToolEnd, ToolStart, Waiting
from tests.support import lean_config, running

METHODS = ("get", "post", "put", "patch", "delete")
TOKEN = "openapi-test-token"


def template(path: str) -> str:
    """A path with its parameters' names left out: `{run_id}` and `{runId}` are one route."""
    return re.sub(r"\{[^}]+\}", "{}", path)


def routes(**server: str) -> set[tuple[str, str]]:
    config = lean_config(server="\n".join(f"{k} = {v}" for k, v in server.items()))
    app = create_app(config)
    return {
        (route.method.lower(), template(route.resource.canonical))
        for route in app.router.routes()
        if route.method not in ("HEAD", "OPTIONS") and route.resource is not None
    }


def described(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (method, template(path))
        for path, item in document["paths"].items()
        for method in METHODS
        if method in item
    }


def test_every_route_is_described_and_every_described_route_exists() -> None:
    document = openapi.document()
    served = routes()
    assert ("post", "/v1/runs/{}/cancel") in served  # the walk sees the app's routes
    assert served == described(document)
    # Without the page, fewer routes, each still described.
    assert routes(web_ui="false") < served


def test_path_parameters_are_declared_with_their_templates_names() -> None:
    for path, item in openapi.document()["paths"].items():
        names = set(re.findall(r"\{([^}]+)\}", path))
        declared = {p["name"] for p in item.get("parameters", []) if p["in"] == "path"}
        assert names == declared, path


def test_the_document_is_valid_openapi_3_1() -> None:
    document = json.loads(openapi.encoded())
    assert document["openapi"].startswith("3.1")
    validate(document)  # raises on an invalid document


def test_scene_events_are_one_of_with_every_type_and_every_field_required() -> None:
    schemas = openapi.document()["components"]["schemas"]
    event = schemas["SceneEvent"]
    assert event["discriminator"]["propertyName"] == "type"
    types = {
        str(cls.__struct_config__.tag)
        for cls in (Start, Delta, ToolStart, ToolEnd, Waiting, Done, Error)
    }
    assert set(event["discriminator"]["mapping"]) == types
    assert len(event["oneOf"]) == len(types)
    # lean writes defaults too: `saved` and `fallback` are always on `done`
    assert {"fallback", "saved", "usage"} <= set(schemas["Done"]["required"])
    codes = schemas["ErrorBody"]["properties"]["error"]["properties"]["code"]["enum"]
    assert {"bad_request", "store_unavailable", "slow_client", "internal"} <= set(codes)
    # the saved user message: what was typed, and the filled template beside it
    assert "prompt" in schemas["MessageRecord"]["properties"]


async def test_openapi_json_is_served_without_a_token_like_lean_js() -> None:
    config = lean_config(environ={"LEAN_TOKENS": TOKEN})
    async with running(config) as lean, aiohttp.ClientSession(auto_decompress=False) as http:
        url = f"{lean.url}/openapi.json"
        async with http.get(url, headers={"Accept-Encoding": "identity"}) as r:
            assert r.status == 200 and r.content_type == "application/json"
            assert r.headers["Cache-Control"] == "no-cache"
            etag = r.headers["ETag"]
            assert json.loads(await r.read()) == json.loads(openapi.encoded())
        async with http.get(url, headers={"If-None-Match": etag, "Accept-Encoding": ""}) as r:
            assert r.status == 304
        async with http.get(url, headers={"Accept-Encoding": "gzip"}) as r:
            assert r.status == 200 and r.headers["Content-Encoding"] == "gzip"
            assert json.loads(gzip.decompress(await r.read()))["info"]["title"] == "lean"
        async with http.get(f"{lean.url}/v1/scenes") as r:
            assert r.status == 401  # the routes it describes still need the token
