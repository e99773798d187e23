"""Every key config.ini accepts, and how its raw text becomes a typed value.

A section's keys are a table of parsers; a parser takes (section, key, raw text) and
returns the value or raises `ConfigError`, whose one line names the section, the key and
what was expected, and never echoes a secret. `lean.config` assembles the values into
its Structs and checks the references between sections.
"""

import configparser
import ipaddress
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, get_args

from lean.origin import normalise_origin

ProviderKind = Literal["openai", "anthropic", "gemini", "demo"]
ToolKind = Literal["python", "http", "client"]


class ConfigError(Exception):
    """Bad configuration: stops start-up with exit code 2 and this one line."""

    def __init__(
        self, section: str, key: str | None, expected: str, got: str | None = None
    ) -> None:
        # args keep all four so the error pickles; __str__ builds the line.
        super().__init__(section, key, expected, got)
        self.section = section
        self.key = key
        self.expected = expected
        self.got = got

    def __str__(self) -> str:
        where = f"[{self.section}] {self.key}" if self.key else f"[{self.section}]"
        line = f"config error: {where}: expected {self.expected}"
        if self.got is not None:
            got = self.got.replace("\r", "\\r").replace("\n", "\\n")
            line += f", got '{got[:80]}...'" if len(got) > 80 else f", got '{got}'"
        return line


# --- value parsers: (section, key, raw text) -> typed value, or ConfigError ---

_Parser = Callable[[str, str, str], Any]


def _str(section: str, key: str, raw: str) -> str:
    return raw


def _int(low: int, high: int | None = None) -> _Parser:
    expected = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"

    def parse(section: str, key: str, raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(section, key, expected, raw) from None
        if value < low or (high is not None and value > high):
            raise ConfigError(section, key, expected, raw)
        return value

    return parse


def _float(*, zero_ok: bool = False) -> _Parser:
    expected = "a number >= 0" if zero_ok else "a number > 0"

    def parse(section: str, key: str, raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(section, key, expected, raw) from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
            raise ConfigError(section, key, expected, raw)
        return value

    return parse


def _bool(section: str, key: str, raw: str) -> bool:
    value = configparser.ConfigParser.BOOLEAN_STATES.get(raw.lower())
    if value is None:
        raise ConfigError(section, key, "a boolean: true/false, yes/no, on/off or 1/0", raw)
    return value


def _choice(*options: str) -> _Parser:
    def parse(section: str, key: str, raw: str) -> str:
        if raw not in options:
            raise ConfigError(section, key, "one of " + ", ".join(options), raw)
        return raw

    return parse


def _host(section: str, key: str, raw: str) -> str:
    """A host name or IP address to listen on; `[::1]` is written as `::1`."""
    host = raw.strip()
    bracketed = host.startswith("[") and host.endswith("]")
    name = host[1:-1] if bracketed else host
    if ":" in name or bracketed:
        try:
            ipaddress.IPv6Address(name)
        except ValueError:
            raise ConfigError(
                section, key, "a host name or IP address, without a port", raw
            ) from None
    if any(c.isspace() or c in "/[]" for c in name):  # "" (every interface) is allowed
        raise ConfigError(section, key, "a host name or IP address, without a port", raw)
    return name


def _origins(section: str, key: str, raw: str) -> tuple[str, ...]:
    """Comma-separated `scheme://host[:port]` origins, or `*`; kept as browsers write them."""
    origins = []
    for item in _list(section, key, raw):
        origin = "*" if item == "*" else normalise_origin(item)
        if origin is None:
            raise ConfigError(
                section, key, "origins like https://app.example.com or http://localhost:5173", item
            )
        origins.append(origin)
    return tuple(origins)


def _list(section: str, key: str, raw: str) -> tuple[str, ...]:
    return tuple(item for item in (part.strip() for part in raw.split(",")) if item)


def _json(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _json_object(section: str, key: str, raw: str) -> dict[str, Any]:
    value = _json(raw)
    if not isinstance(value, dict):
        raise ConfigError(section, key, 'a JSON object, e.g. {"type": "object"}', raw)
    return value


def _headers(section: str, key: str, raw: str) -> tuple[tuple[str, str], ...]:
    value = _json(raw)  # never echoed in the error: a header may carry a credential
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ConfigError(section, key, 'a JSON object of strings, e.g. {"X-Title": "lean"}')
    return tuple(value.items())


_COUNT = _int(1)
_POSITIVE = _float()

# Every key each kind of section accepts, with its parser. Keys absent from a section
# keep the Struct's default.
KEYS: dict[str, dict[str, _Parser]] = {
    "server": {
        "host": _host,
        "port": _int(1, 65535),
        "ping_interval": _POSITIVE,
        "drain_timeout": _POSITIVE,
        "max_body_bytes": _COUNT,
        "log_format": _choice("logfmt", "json"),
        "log_prompts": _bool,
        "web_ui": _bool,
        "cors_origins": _origins,
        "header_timeout": _POSITIVE,
        "keepalive_timeout": _POSITIVE,
        "max_connections": _COUNT,
        "commit_wait": _float(zero_ok=True),
        "reuse_port": _bool,
    },
    "auth": {"tokens_env": _str},
    "store": {"path": _str, "url": _str, "flush_interval": _float(zero_ok=True)},
    "limits": {
        "max_streams": _COUNT,
        "queue_events": _COUNT,
        "slow_client_timeout": _POSITIVE,
        "max_runs_per_socket": _COUNT,
        "client_tool_timeout": _POSITIVE,
        "send_buffer_bytes": _int(0),
        "fallback_budget_mb": _COUNT,
        "tool_threads": _COUNT,
        "cluster_max_streams": _int(0),
        "resume_buffer_kb": _int(0),
        "resume_ttl": _float(zero_ok=True),
    },
    "cluster": {"instance": _str, "redis_url": _str, "lease": _POSITIVE},  # lean.config_cluster
    "provider": {
        "kind": _choice(*get_args(ProviderKind)),
        "base_url": _str,
        "api_key_env": _str,
        "stream": _bool,
        "connect_timeout": _POSITIVE,
        "first_byte_timeout": _POSITIVE,
        "read_timeout": _POSITIVE,
        "max_event_bytes": _COUNT,
        "demo_delay": _float(zero_ok=True),
        "headers": _headers,
    },
    "model": {
        "provider": _str,
        "upstream_model": _str,
        "fallback": _list,
        "retries": _int(0),
        "max_tokens": _COUNT,
        "temperature": _float(zero_ok=True),
    },
    "tool": {
        "kind": _choice(*get_args(ToolKind)),
        "description": _str,
        "parameters": _json_object,
        "function": _str,
        "url": _str,
        "allowed_hosts": _list,
        "timeout": _POSITIVE,
        "max_response_bytes": _COUNT,
    },
    "scene": {
        "model": _str,
        "system": _str,
        "template": _str,
        "tools": _list,
        "max_tool_rounds": _int(0),
        "history_turns": _int(0),
        "on_disconnect": _choice("cancel", "finish"),
        "resume_grace": _float(zero_ok=True),
    },
    "client": {  # lean.config_clients
        "token_env": _str,
        "scenes": _list,
        "models": _list,
        "max_streams": _COUNT,
        "requests_per_minute": _COUNT,
        "requests_burst": _COUNT,
        "tokens_per_day": _COUNT,
    },
}
NAMED = ("provider", "model", "tool", "scene", "client")  # sections written [kind.NAME]
NAME = re.compile(r"[A-Za-z0-9_.-]+")
SECTIONS = (
    "a section named server, auth, store, limits, cluster, provider.NAME, model.NAME,"
    " tool.NAME, scene.NAME or client.NAME"
)


def read_section(
    section: str, table: Mapping[str, _Parser], items: Iterable[tuple[str, str]]
) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, raw in items:
        parse = table.get(key)
        if parse is None:
            raise ConfigError(section, key, "one of " + ", ".join(table))
        values[key] = parse(section, key, raw)
    return values
