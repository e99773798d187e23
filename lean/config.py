"""config.ini -> frozen, typed Structs, checked once at start-up (docs/protocol.md §4).

When `load_config` returns, every value has its type and range, every reference resolves
(model -> provider, fallback -> model, scene -> model and tools), provider keys and client
tokens have been read from the environment into `Secret`s, and a server that listens beyond
loopback has client tokens. Anything else raises `ConfigError`: one line naming the section,
the key and what was expected, never a secret value.
"""

import configparser
import ipaddress
import os
import string
from collections.abc import Collection, Mapping
from typing import Any, Literal, get_args
from urllib.parse import urlsplit

import msgspec

from lean.config_clients import ClientConfig, parse_clients
from lean.config_cluster import ClusterConfig, cluster_config
from lean.config_keys import (
    KEYS,
    NAME,
    NAMED,
    SECTIONS,
    ConfigError,
    ProviderKind,
    ToolKind,
    read_section,
)
from lean.config_store import StoreConfig, store_config
from lean.secret import Secret

__all__ = [
    "AuthConfig",
    "ClientConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "LimitsConfig",
    "ModelConfig",
    "ProviderConfig",
    "ProviderKind",
    "SceneConfig",
    "Secret",
    "ServerConfig",
    "StoreConfig",
    "ToolConfig",
    "ToolKind",
    "is_loopback",
    "load_config",
    "parse_config",
]


class ServerConfig(msgspec.Struct, frozen=True, kw_only=True):
    host: str = "127.0.0.1"
    port: int = 8080
    ping_interval: float = 15.0  # seconds of silence before a heartbeat
    drain_timeout: float = 10.0  # seconds running streams may finish on SIGTERM
    max_body_bytes: int = 1048576
    log_format: Literal["logfmt", "json"] = "logfmt"
    log_prompts: bool = False
    web_ui: bool = True  # the chat page at / (lean.js is served either way)
    # Browser origins allowed besides lean's own (docs/protocol.md §6); "*" needs client tokens.
    cors_origins: tuple[str, ...] = ()
    # A request's head (line and headers) must arrive within this, counted from the
    # connection's start or the request's first byte: nginx's client_header_timeout is
    # 60 s; a phone on a poor network sends a 1 KB head in well under 10.
    header_timeout: float = 10.0
    # An idle connection between requests is closed after this. Above nginx's upstream
    # keepalive_timeout (60 s), so a proxy that reuses connections to lean closes first
    # and never sends on a connection lean is closing (aiohttp's own default: 3,630 s).
    keepalive_timeout: float = 75.0
    # Client connections at once. Each streaming one holds two descriptors (the client's
    # and the upstream's): 10,000 fit the unit's LimitNOFILE=65536 and its MemoryMax
    # (the bench's crowd: 10,000 sockets in <= 279 MB). See lean.connections for the bound.
    max_connections: int = 10000
    # Seconds a chat completion stream waits for its first piece before its headers go
    # out: an upstream failure before then (every retry and fallback failed) is an HTTP
    # status the client's SDK can type and retry (429 + Retry-After, 502, 503, 504).
    # Below ping_interval so proxies still see bytes early (a `: ping` follows the
    # headers); a first heartbeat commits the stream too. 0: headers at once.
    commit_wait: float = 5.0
    # SO_REUSEPORT: several lean processes listen on one port and the kernel spreads new
    # connections among them (docs/deploy.md); each then needs its [cluster] instance.
    reuse_port: bool = False


class AuthConfig(msgspec.Struct, frozen=True, kw_only=True):
    tokens_env: str = "LEAN_TOKENS"
    tokens: tuple[Secret, ...] = ()  # from $tokens_env, comma-separated; empty = no client auth


class LimitsConfig(msgspec.Struct, frozen=True, kw_only=True):
    max_streams: int = 2000
    queue_events: int = 64
    slow_client_timeout: float = 30.0
    max_runs_per_socket: int = 16
    client_tool_timeout: float = 300.0
    send_buffer_bytes: int = 131072  # SO_SNDBUF of a streaming client's socket; 0: the kernel's
    # Whole (non-streaming) answers held at once, together (lean.budget): three of the
    # 16 MiB maximum, or hundreds of ordinary ones (~100 KB); parsing one peaks near twice
    # its size, so a burst stays well inside systemd/lean.service's MemoryMax=384M.
    fallback_budget_mb: int = 48
    # Threads for sync python tools (lean.tools): a call holds one until it returns, also
    # past its timeout; when all are busy a new sync call gets an error result at once.
    tool_threads: int = 16
    # Streams across every instance sharing [cluster] redis_url; 0: no bound but each
    # instance's max_streams (docs/protocol.md §7).
    cluster_max_streams: int = 0
    # Resumable runs (lean.resume): each run's recent events, up to this many KiB, kept
    # `resume_ttl` s after its end; 0 KiB: no run is resumable.
    resume_buffer_kb: int = 64
    resume_ttl: float = 120.0


class ProviderConfig(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    kind: ProviderKind
    base_url: str = ""  # http(s), no trailing "/"; "" only for demo
    api_key_env: str | None = None
    api_key: Secret | None = None  # read from $api_key_env at load
    stream: bool = True
    connect_timeout: float = 10.0
    first_byte_timeout: float = 120.0
    read_timeout: float = 120.0  # max silence between chunks
    max_event_bytes: int = 1048576
    demo_delay: float = 0.04  # demo kind only: seconds between words
    headers: tuple[tuple[str, str], ...] = ()


class ModelConfig(msgspec.Struct, frozen=True, kw_only=True):
    alias: str
    provider: str
    upstream_model: str
    fallback: tuple[str, ...] = ()
    retries: int = 0
    max_tokens: int | None = None
    temperature: float | None = None


def _empty_schema() -> dict[str, Any]:
    return {"type": "object", "properties": {}}


class ToolConfig(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    kind: ToolKind
    description: str = ""
    parameters: dict[str, Any] = msgspec.field(default_factory=_empty_schema)
    function: str = ""  # python: "module:function", imported later, not here
    url: str = ""  # http
    allowed_hosts: tuple[str, ...] = ()  # http: lower-case; defaults to the url's host
    timeout: float = 10.0
    max_response_bytes: int = 262144


class SceneConfig(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    model: str
    system: str = ""
    template: str = "{message}"
    inputs: tuple[str, ...] = ()  # the template's {names} in order, without "message"
    uses_message: bool = True  # whether {message} appears
    tools: tuple[str, ...] = ()
    max_tool_rounds: int = 4
    history_turns: int = 10
    on_disconnect: Literal["cancel", "finish"] = "cancel"
    resume_grace: float = 30.0  # seconds a resumable run goes on without a reader


class Config(msgspec.Struct, frozen=True, kw_only=True):
    server: ServerConfig
    auth: AuthConfig
    store: StoreConfig
    limits: LimitsConfig
    cluster: ClusterConfig
    providers: dict[str, ProviderConfig]
    models: dict[str, ModelConfig]
    tools: dict[str, ToolConfig]
    scenes: dict[str, SceneConfig]
    path: str  # the file it came from
    clients: dict[str, ClientConfig] = {}  # [client.NAME] (lean.config_clients)

    @property
    def has_tokens(self) -> bool:
        """Whether requests must carry a token: [auth]'s or a client's."""
        return bool(self.auth.tokens or self.clients)


def is_loopback(host: str) -> bool:
    """True for "localhost", 127.0.0.0/8 and ::1 (bracketed or not); "0.0.0.0", "::", "" are not."""
    name = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


_BASE_URLS: dict[str, str] = {
    "openai": "",  # required: there is no one OpenAI-compatible server
    "anthropic": "https://api.anthropic.com/v1",
    "gemini": "https://generativelanguage.googleapis.com/v1beta",
    "demo": "",
}


def _required(section: str, key: str, values: Mapping[str, Any], expected: str) -> Any:
    value = values.get(key)
    if value is None or value == "":
        raise ConfigError(section, key, expected)
    return value


def _ref(section: str, key: str, name: str | None, names: Collection[str], kind: str) -> str:
    """`name` must be one of `names`, the [kind.NAME] sections it may refer to."""
    if not name or name not in names:
        known = f"one of {', '.join(sorted(names))}" if names else "none is defined"
        raise ConfigError(section, key, f"a [{kind}.NAME] name: {known}", name or None)
    return name


def _url(section: str, key: str, raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(section, key, "an http:// or https:// URL", raw)
    return raw.rstrip("/")


def _template_fields(section: str, template: str) -> tuple[tuple[str, ...], bool]:
    """The names a template uses, in order of first use without "message", and whether
    it uses "message". Only plain {name} fields: inputs are strings from clients."""
    expected = "plain {name} fields, e.g. {message} or {words}; {{ and }} for literal braces"
    try:
        fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template)]
    except ValueError:
        raise ConfigError(section, "template", expected, template) from None
    names: list[str] = []
    for field, spec, conversion in fields:
        if field is None:
            continue
        if not field.isidentifier() or spec or conversion:
            shown = field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            raise ConfigError(section, "template", expected, "{" + shown + "}")
        if field not in names:
            names.append(field)
    inputs = tuple(name for name in names if name != "message")
    return inputs, "message" in names


# --- sections -> Structs ---


def _provider(
    section: str, name: str, values: dict[str, Any], environ: Mapping[str, str]
) -> ProviderConfig:
    kind = _required(section, "kind", values, "one of " + ", ".join(get_args(ProviderKind)))
    base_url = values.get("base_url") or _BASE_URLS[kind]
    if kind == "openai" and not base_url:
        raise ConfigError(
            section, "base_url", "an http:// or https:// URL (kind = openai needs one)"
        )
    values["base_url"] = _url(section, "base_url", base_url) if base_url else ""
    env = values.get("api_key_env") or None
    values["api_key_env"] = env
    if env is not None:
        key = environ.get(env, "").strip()
        if not key:
            raise ConfigError(
                section, "api_key_env", f"an API key in the environment variable {env}"
            )
        values["api_key"] = Secret(key)
    return ProviderConfig(name=name, **values)


def _model(
    section: str, alias: str, values: dict[str, Any], providers: Collection[str]
) -> ModelConfig:
    _ref(section, "provider", values.get("provider"), providers, "provider")
    _required(section, "upstream_model", values, "the model's name at the provider")
    return ModelConfig(alias=alias, **values)


def _tool(section: str, name: str, values: dict[str, Any]) -> ToolConfig:
    kind = _required(section, "kind", values, "one of " + ", ".join(get_args(ToolKind)))
    if kind == "python":
        function = _required(section, "function", values, "module:function, e.g. mytools:clock")
        module, _, func = function.partition(":")
        if not (all(part.isidentifier() for part in module.split(".")) and func.isidentifier()):
            raise ConfigError(section, "function", "module:function, e.g. mytools:clock", function)
    elif kind == "http":
        url = _url(section, "url", _required(section, "url", values, "an http:// or https:// URL"))
        host = urlsplit(url).hostname or ""
        allowed = tuple(h.lower() for h in values.get("allowed_hosts", ())) or (host,)
        if host not in allowed:
            raise ConfigError(
                section, "url", f"a host in allowed_hosts ({', '.join(allowed)})", host
            )
        values["allowed_hosts"] = allowed
    return ToolConfig(name=name, **values)


def _scene(
    section: str, name: str, values: dict[str, Any], models: Collection[str], tools: Collection[str]
) -> SceneConfig:
    _ref(section, "model", values.get("model"), models, "model")
    for tool in values.get("tools", ()):
        _ref(section, "tools", tool, tools, "tool")
    inputs, uses_message = _template_fields(section, values.get("template", "{message}"))
    return SceneConfig(name=name, inputs=inputs, uses_message=uses_message, **values)


def _auth(values: dict[str, Any], environ: Mapping[str, str]) -> AuthConfig:
    tokens_env = values.get("tokens_env", "LEAN_TOKENS")
    if not tokens_env:
        raise ConfigError("auth", "tokens_env", "the name of an environment variable")
    raw = environ.get(tokens_env, "")
    tokens = tuple(Secret(t) for t in (part.strip() for part in raw.split(",")) if t)
    return AuthConfig(tokens_env=tokens_env, tokens=tokens)


def parse_config(
    text: str,
    *,
    path: str = "<string>",
    environ: Mapping[str, str] | None = None,
    port: int | None = None,
    instance: str | None = None,
) -> Config:
    """Parse and check config text; relative paths resolve against `path`'s directory.
    `port` and `instance` (`lean serve --port/--instance`) win over the file's."""
    env = os.environ if environ is None else environ
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";", "#"))
    try:
        parser.read_string(text, source=path)
    except configparser.DuplicateSectionError as e:
        raise ConfigError(e.section, None, "each section once") from None
    except configparser.DuplicateOptionError as e:
        raise ConfigError(e.section, e.option, "each key once per section") from None
    except configparser.MissingSectionHeaderError as e:
        raise ConfigError("file", None, f"a [section] header before line {e.lineno}") from None
    except configparser.ParsingError as e:
        lines = ", ".join(str(lineno) for lineno, _ in e.errors)
        raise ConfigError("file", None, f"key = value lines (see line {lines})") from None
    if parser.defaults():
        raise ConfigError(parser.default_section, None, SECTIONS)

    sections: dict[str, dict[str, dict[str, Any]]] = {kind: {} for kind in KEYS}
    for section in parser.sections():
        kind, dot, name = section.partition(".")
        if kind not in KEYS or bool(dot) != (kind in NAMED):
            raise ConfigError(section, None, SECTIONS)
        if dot and not NAME.fullmatch(name):
            raise ConfigError(section, None, "a name of letters, digits, '_', '.' or '-'", name)
        sections[kind][name] = read_section(section, KEYS[kind], parser.items(section))

    def single(kind: str) -> dict[str, Any]:
        return sections[kind].get("", {})

    server_values = single("server")
    if port is not None:
        server_values["port"] = KEYS["server"]["port"]("server", "port", str(port))
    server = ServerConfig(**server_values)
    auth = _auth(single("auth"), env)
    providers = {n: _provider(f"provider.{n}", n, v, env) for n, v in sections["provider"].items()}
    models = {n: _model(f"model.{n}", n, v, providers) for n, v in sections["model"].items()}
    if not models:
        raise ConfigError("model.NAME", None, "at least one [model.NAME] section")
    for alias, model in models.items():
        others = [a for a in models if a != alias]
        for other in model.fallback:
            _ref(f"model.{alias}", "fallback", other, others, "model")
    tools = {n: _tool(f"tool.{n}", n, v) for n, v in sections["tool"].items()}
    scenes = {n: _scene(f"scene.{n}", n, v, models, tools) for n, v in sections["scene"].items()}
    clients = parse_clients(
        sections["client"],
        env,
        scenes=scenes,
        models=models,
        auth_tokens=auth.tokens,
        secret=Secret,
    )
    if not (auth.tokens or clients) and not is_loopback(server.host):
        expected = f"a loopback address, or client tokens in ${auth.tokens_env}"
        raise ConfigError("server", "host", expected, server.host)
    if not (auth.tokens or clients) and "*" in server.cors_origins:
        # Any page could then spend the keys of a lean that asks no token.
        expected = f"listed origins, or client tokens in ${auth.tokens_env} for '*'"
        raise ConfigError("server", "cors_origins", expected, "*")
    limits = LimitsConfig(**single("limits"))
    return Config(
        server=server,
        auth=auth,
        store=store_config(single("store"), path),
        limits=limits,
        cluster=cluster_config(
            single("cluster"), server.port, server.reuse_port, limits.cluster_max_streams, instance
        ),
        providers=providers,
        models=models,
        tools=tools,
        scenes=scenes,
        path=path,
        clients=clients,
    )


def load_config(
    path: str | os.PathLike[str],
    environ: Mapping[str, str] | None = None,
    *,
    port: int | None = None,
    instance: str | None = None,
) -> Config:
    """Read and check the config file; `environ` (default os.environ) holds keys and tokens;
    `port` and `instance` override the file's (see parse_config)."""
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8-sig") as f:  # -sig: tolerate an editor's BOM
            text = f.read()
    except OSError:
        raise ConfigError("file", None, "a readable config file", name) from None
    except UnicodeDecodeError:
        raise ConfigError("file", None, "a UTF-8 text file", name) from None
    return parse_config(text, path=name, environ=environ, port=port, instance=instance)
