"""Running lean for real in tests: a config aimed at a fake upstream, a server on 127.0.0.1."""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

from lean.app import Server
from lean.config import Config, parse_config

# A provider key that must never leave lean: tests grep responses and logs for it.
SECRET = "sk-test-SECRET-do-not-leak-0123456789"


_SCRATCH = Path(tempfile.mkdtemp(prefix="lean-tests-"))
atexit.register(shutil.rmtree, _SCRATCH, ignore_errors=True)


def _scratch() -> Path:
    """A fresh directory per config, removed when the test session ends."""
    return Path(tempfile.mkdtemp(dir=_SCRATCH))


def _section(name: str, defaults: dict[str, str], overrides: str) -> str:
    """One INI section: the defaults, with `key = value` lines of `overrides` replacing them."""
    values = dict(defaults)
    for line in overrides.strip().splitlines():
        key, _, value = line.partition("=")
        values[key.strip()] = value.strip()
    return f"[{name}]\n" + "".join(f"{k} = {v}\n" for k, v in values.items())


def lean_config(
    upstream_url: str = "http://127.0.0.1:9/v1",
    *,
    stream: bool = True,
    server: str = "",
    limits: str = "",
    store: str = "",
    provider: str = "",
    model: str = "",
    extra: str = "",
    environ: dict[str, str] | None = None,
) -> Config:
    """A config with one OpenAI-compatible provider `up` behind the alias `default`.

    `server`, `limits`, `provider` and `model` hold `key = value` lines that replace
    or add to that section's test defaults; `extra` is appended as it is.
    """
    text = "\n".join(
        [
            _section("server", {"host": "127.0.0.1", "drain_timeout": "0.5"}, server),
            _section("store", _store_defaults(store), store),
            _section("limits", {"slow_client_timeout": "5"}, limits),
            _section(
                "provider.up",
                {
                    "kind": "openai",
                    "base_url": upstream_url,
                    "api_key_env": "UP_KEY",
                    "stream": "true" if stream else "false",
                    "connect_timeout": "2",
                    "first_byte_timeout": "5",
                    "read_timeout": "5",
                },
                provider,
            ),
            _section("model.default", {"provider": "up", "upstream_model": "fake-model"}, model),
            extra,
        ]
    )
    env = {"UP_KEY": SECRET}
    env.update(environ or {})
    return parse_config(text, environ=env)


def _store_defaults(overrides: str) -> dict[str, str]:
    """A fresh SQLite file, unless `overrides` names a PostgreSQL `url` instead."""
    keys = {line.partition("=")[0].strip() for line in overrides.strip().splitlines()}
    return {} if "url" in keys else {"path": str(_scratch() / "lean.db")}


@asynccontextmanager
async def running(config: Config) -> AsyncIterator[Server]:
    """lean on an ephemeral port through the same AppRunner path as `lean serve`."""
    server = Server(config, port=0)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def chat_body(text: str = "Hi", *, stream: bool = True, **more: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "default",
        "messages": [{"role": "user", "content": text}],
        "stream": stream,
    }
    body.update(more)
    return body


async def read_sse_data(resp: aiohttp.ClientResponse) -> list[str]:
    """Every `data:` payload of an SSE response, in order (comments skipped)."""
    raw = (await resp.read()).decode()
    out = []
    for block in raw.replace("\r\n", "\n").split("\n\n"):
        lines = [line[6:] for line in block.split("\n") if line.startswith("data: ")]
        if lines:
            out.append("\n".join(lines))
    return out


def chunks_of(data: list[str]) -> list[dict[str, Any]]:
    return [json.loads(d) for d in data if d != "[DONE]"]


def content_of(data: list[str]) -> str:
    return "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunks_of(data) if c.get("choices")
    )
