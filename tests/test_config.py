"""lean.config: the shipped config.ini, every validation rule, and secrets kept out of sight."""

import os
import pickle
import re
from pathlib import Path

import pytest

from lean.config import (
    Config,
    ConfigError,
    Secret,
    ServerConfig,
    is_loopback,
    load_config,
    parse_config,
)

SHIPPED = Path(__file__).resolve().parent.parent / "config.ini"
KEY = "sk-live-DO-NOT-LEAK-4242"

# The smallest valid config; tests add sections to it.
BASE = """
[provider.demo]
kind = demo

[model.default]
provider = demo
upstream_model = lean-demo
"""


def parse(extra: str = "", environ: dict[str, str] | None = None) -> Config:
    return parse_config(BASE + extra, environ={} if environ is None else environ)


def error(extra: str = "", environ: dict[str, str] | None = None, base: str = BASE) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(base + extra, environ={} if environ is None else environ)
    return info.value


def assert_error(e: ConfigError, section: str, key: str | None, *text: str) -> None:
    assert (e.section, e.key) == (section, key)
    line = str(e)
    prefix = (
        f"config error: [{section}] {key}: expected " if key else f"config error: [{section}]: "
    )
    assert line.startswith(prefix), line
    assert "\n" not in line
    for part in text:
        assert part in line, line


# --- the shipped config.ini ---


def test_shipped_config_loads_with_no_environment() -> None:
    config = load_config(SHIPPED, environ={})
    assert config.server == ServerConfig(host="127.0.0.1", port=8080)
    assert config.auth.tokens_env == "LEAN_TOKENS" and config.auth.tokens == ()
    assert config.store.path == str(SHIPPED.parent / "lean.db")
    assert (config.limits.max_streams, config.limits.queue_events) == (2000, 64)
    assert config.limits.slow_client_timeout == 30.0
    assert config.providers["demo"].kind == "demo"
    assert config.models["default"].provider == "demo"
    assert config.models["default"].upstream_model == "lean-demo"
    chat = config.scenes["chat"]
    assert (chat.model, chat.system) == ("default", "You are a helpful assistant.")
    assert (chat.template, chat.inputs, chat.uses_message) == ("{message}", (), True)
    diary = config.scenes["diary_summary"]
    assert (diary.inputs, diary.uses_message) == (("words",), True)
    assert config.path == str(SHIPPED)


def test_shipped_examples_are_valid_once_uncommented(tmp_path: Path) -> None:
    text = re.sub(r"(?m)^; ?", "", SHIPPED.read_text())
    path = tmp_path / "config.ini"
    path.write_text(text)
    variables = re.findall(r"(?m)^api_key_env = (\w+)", text)
    assert len(variables) >= 5
    clients = re.findall(r"(?m)^token_env = (\w+)", text)
    config = load_config(
        path, environ={**dict.fromkeys(variables, KEY), **dict.fromkeys(clients, "app-token")}
    )
    assert config.clients["notes_app"].models == ("default",)
    assert {"local", "openai", "deepseek", "openrouter", "anthropic", "gemini"} <= set(
        config.providers
    )
    assert config.providers["local"].base_url == "http://127.0.0.1:11434/v1"
    assert config.providers["openai"].api_key == Secret(KEY)
    assert config.models["smart"].fallback == ("claude", "llama")
    assert config.tools["clock"].function == "mytools:clock"
    assert KEY not in repr(config)
    # Without the keys the same file is refused, naming the variable but no value.
    assert_error(error(base=text), "provider.openai", "api_key_env", "OPENAI_API_KEY")


# --- ConfigError and Secret ---


def test_config_error_line() -> None:
    e = ConfigError("server", "port", "an integer from 1 to 65535", "x")
    assert str(e) == "config error: [server] port: expected an integer from 1 to 65535, got 'x'"
    assert str(ConfigError("model.NAME", None, "at least one")) == (
        "config error: [model.NAME]: expected at least one"
    )
    assert str(ConfigError("s", "k", "e", "a\nb")) == "config error: [s] k: expected e, got 'a\\nb'"
    assert str(ConfigError("s", "k", "e", "x" * 500)).endswith("x...'")
    copy = pickle.loads(pickle.dumps(e))
    assert (copy.section, copy.key, str(copy)) == ("server", "port", str(e))


def test_secret_hides_its_value() -> None:
    secret = Secret(KEY)
    assert secret.reveal() == KEY
    assert repr(secret) == str(secret) == "Secret('****')"
    assert KEY not in f"{secret} {secret!r} {[secret]}"
    assert secret == Secret(KEY) and secret != Secret("other") and secret != KEY
    assert hash(secret) == hash(Secret(KEY))
    assert len({secret, Secret(KEY)}) == 1


# --- file reading and INI syntax ---


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.ini"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert_error(info.value, "file", None, "a readable config file", str(path))


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "config.ini"
    path.write_bytes(b"[server]\nhost = \xff\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert_error(info.value, "file", None, "UTF-8")


def test_byte_order_mark_is_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "config.ini"
    path.write_bytes(b"\xef\xbb\xbf" + BASE.lstrip().encode())
    assert "default" in load_config(str(path), environ={}).models


@pytest.mark.parametrize(
    ("text", "section", "key", "expected"),
    [
        ("host = 1\n" + BASE, "file", None, "a [section] header"),
        (BASE + "[server]\nport\n", "file", None, "key = value"),
        (BASE + "[server]\n[server]\n", "server", None, "each section once"),
        (BASE + "[server]\nport = 1\nPort = 2\n", "server", "port", "each key once"),
        (BASE + "[DEFAULT]\nport = 1\n", "DEFAULT", None, "a section named server"),
    ],
)
def test_ini_syntax_errors(text: str, section: str, key: str | None, expected: str) -> None:
    assert_error(error(base=text), section, key, expected)


def test_inline_comments_and_key_case() -> None:
    config = parse("[server]\nPORT = 9000   ; a comment\nhost = ::1 # another\n")
    assert (config.server.port, config.server.host) == (9000, "::1")


def test_environ_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEAN_TOKENS", "t1")
    assert parse_config(BASE).auth.tokens == (Secret("t1"),)


# --- sections and keys ---


@pytest.mark.parametrize(
    "section", ["servers", "provider", "server.x", "plugin.x", "Server", "model"]
)
def test_unknown_section(section: str) -> None:
    assert_error(error(f"[{section}]\n"), section, None, "a section named server, auth")


@pytest.mark.parametrize("section", ["provider.a b", "model.é", "tool.a/b", "scene."])
def test_bad_section_name(section: str) -> None:
    assert_error(error(f"[{section}]\n"), section, None, "letters, digits")


@pytest.mark.parametrize(
    ("extra", "section", "key", "listed"),
    [
        ("[server]\nhots = x\n", "server", "hots", "one of host, port, ping_interval"),
        ("[auth]\ntokens = abc\n", "auth", "tokens", "one of tokens_env"),
        ("[limits]\nmax_stream = 1\n", "limits", "max_stream", "one of max_streams"),
        ("[tool.t]\nkind = client\nurl2 = x\n", "tool.t", "url2", "one of kind, description"),
        ("[scene.s]\nmodel = default\nmodle = x\n", "scene.s", "modle", "one of model, system"),
    ],
)
def test_unknown_key(extra: str, section: str, key: str, listed: str) -> None:
    assert_error(error(extra), section, key, listed)


def test_unknown_key_never_echoes_its_value() -> None:
    e = error(f"[provider.x]\nkind = openai\napi_key = {KEY}\n")
    assert_error(e, "provider.x", "api_key", "one of kind, base_url, api_key_env")
    assert KEY not in str(e)


def test_at_least_one_model() -> None:
    assert_error(error(base="[provider.demo]\nkind = demo\n"), "model.NAME", None, "at least one")


def test_defaults_and_frozen() -> None:
    config = parse("[server]\n[limits]\n[store]\n")
    assert config.server == ServerConfig()
    assert config.limits.max_runs_per_socket == 16 and config.limits.client_tool_timeout == 300.0
    with pytest.raises(AttributeError):
        config.server.port = 1  # type: ignore[misc]


# --- values ---


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("server", "port", "0", "an integer from 1 to 65535"),
        ("server", "port", "65536", "an integer from 1 to 65535"),
        ("server", "port", "http", "an integer from 1 to 65535"),
        ("server", "port", "80.5", "an integer from 1 to 65535"),
        ("server", "ping_interval", "0", "a number > 0"),
        ("server", "ping_interval", "-1", "a number > 0"),
        ("server", "ping_interval", "nan", "a number > 0"),
        ("server", "drain_timeout", "inf", "a number > 0"),
        ("server", "drain_timeout", "soon", "a number > 0"),
        ("server", "max_body_bytes", "0", "an integer >= 1"),
        ("server", "log_format", "xml", "one of logfmt, json"),
        ("server", "log_prompts", "maybe", "a boolean"),
        ("limits", "max_streams", "0", "an integer >= 1"),
        ("limits", "queue_events", "0", "an integer >= 1"),
        ("limits", "queue_events", "-5", "an integer >= 1"),
        ("limits", "slow_client_timeout", "0", "a number > 0"),
        ("limits", "max_runs_per_socket", "0", "an integer >= 1"),
        ("limits", "client_tool_timeout", "-1", "a number > 0"),
    ],
)
def test_bad_numbers_and_choices(section: str, key: str, value: str, expected: str) -> None:
    assert_error(error(f"[{section}]\n{key} = {value}\n"), section, key, expected, f"'{value}'")


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("kind", "mistral", "one of openai, anthropic, gemini, demo"),
        ("stream", "sometimes", "a boolean"),
        ("connect_timeout", "0", "a number > 0"),
        ("first_byte_timeout", "-2", "a number > 0"),
        ("read_timeout", "x", "a number > 0"),
        ("max_event_bytes", "0", "an integer >= 1"),
        ("demo_delay", "-0.1", "a number >= 0"),
    ],
)
def test_bad_provider_values(key: str, value: str, expected: str) -> None:
    extra = "[provider.p]\n" + ("" if key == "kind" else "kind = demo\n") + f"{key} = {value}\n"
    assert_error(error(extra), "provider.p", key, expected, f"'{value}'")


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("retries", "-1", "an integer >= 0"),
        ("retries", "two", "an integer >= 0"),
        ("max_tokens", "0", "an integer >= 1"),
        ("temperature", "-0.5", "a number >= 0"),
    ],
)
def test_bad_model_values(key: str, value: str, expected: str) -> None:
    extra = f"[model.m]\nprovider = demo\nupstream_model = x\n{key} = {value}\n"
    assert_error(error(extra), "model.m", key, expected, f"'{value}'")


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("max_tool_rounds", "-1", "an integer >= 0"),
        ("history_turns", "ten", "an integer >= 0"),
        ("on_disconnect", "pause", "one of cancel, finish"),
    ],
)
def test_bad_scene_values(key: str, value: str, expected: str) -> None:
    extra = f"[scene.s]\nmodel = default\n{key} = {value}\n"
    assert_error(error(extra), "scene.s", key, expected, f"'{value}'")


@pytest.mark.parametrize(
    ("value", "result"),
    [
        *[("true", True), ("YES", True), ("on", True), ("1", True)],
        *[("false", False), ("no", False), ("Off", False), ("0", False)],
    ],
)
def test_booleans(value: str, result: bool) -> None:
    assert parse(f"[server]\nlog_prompts = {value}\n").server.log_prompts is result


def test_zero_is_allowed_where_it_means_none() -> None:
    config = parse(
        "[provider.fast]\nkind = demo\ndemo_delay = 0\n"
        "[model.m]\nprovider = fast\nupstream_model = x\nretries = 0\ntemperature = 0\n"
        "[scene.s]\nmodel = m\nmax_tool_rounds = 0\nhistory_turns = 0\n"
    )
    assert config.providers["fast"].demo_delay == 0.0
    assert (config.models["m"].retries, config.models["m"].temperature) == (0, 0.0)
    assert (config.scenes["s"].max_tool_rounds, config.scenes["s"].history_turns) == (0, 0)


# --- providers ---


def test_provider_kind_is_required() -> None:
    assert_error(
        error("[provider.p]\nbase_url = http://x\n"), "provider.p", "kind", "one of openai"
    )


def test_provider_base_urls() -> None:
    config = parse(
        "[provider.local]\nkind = openai\nbase_url = http://127.0.0.1:11434/v1/\n"
        "[provider.a]\nkind = anthropic\n[provider.g]\nkind = gemini\n"
        "[provider.a2]\nkind = anthropic\nbase_url = https://proxy.example.com/anthropic\n"
    )
    assert config.providers["local"].base_url == "http://127.0.0.1:11434/v1"
    assert config.providers["a"].base_url == "https://api.anthropic.com/v1"
    assert config.providers["g"].base_url == "https://generativelanguage.googleapis.com/v1beta"
    assert config.providers["a2"].base_url == "https://proxy.example.com/anthropic"
    assert config.providers["demo"].base_url == ""


def test_openai_provider_needs_base_url() -> None:
    assert_error(error("[provider.p]\nkind = openai\n"), "provider.p", "base_url", "URL")


@pytest.mark.parametrize("url", ["api.openai.com/v1", "ftp://example.com", "https://", "http:/x"])
def test_bad_base_url(url: str) -> None:
    e = error(f"[provider.p]\nkind = openai\nbase_url = {url}\n")
    assert_error(e, "provider.p", "base_url", "an http:// or https:// URL", f"'{url}'")


def test_api_key_is_read_from_the_environment() -> None:
    extra = "[provider.o]\nkind = openai\nbase_url = https://api.openai.com/v1\n"
    extra += "api_key_env = OPENAI_API_KEY\n"
    config = parse(extra, environ={"OPENAI_API_KEY": f" {KEY}\n"})
    provider = config.providers["o"]
    assert provider.api_key_env == "OPENAI_API_KEY"
    assert provider.api_key is not None and provider.api_key.reveal() == KEY
    assert config.providers["demo"].api_key is None
    assert KEY not in repr(config) and KEY not in str(config)


@pytest.mark.parametrize("environ", [{}, {"OPENAI_API_KEY": ""}, {"OPENAI_API_KEY": "  "}])
def test_missing_api_key_is_refused(environ: dict[str, str]) -> None:
    extra = "[provider.o]\nkind = openai\nbase_url = https://x/v1\napi_key_env = OPENAI_API_KEY\n"
    e = error(extra, environ={**environ, "OTHER": KEY})
    assert_error(e, "provider.o", "api_key_env", "OPENAI_API_KEY")
    assert KEY not in str(e)


def test_empty_api_key_env_means_no_key() -> None:
    provider = parse("[provider.p]\nkind = demo\napi_key_env =\n").providers["p"]
    assert (provider.api_key_env, provider.api_key) == (None, None)


def test_headers() -> None:
    extra = (
        '[provider.r]\nkind = demo\nheaders = {"X-Title": "lean", "HTTP-Referer": "https://a"}\n'
    )
    headers = parse(extra).providers["r"].headers
    assert headers == (("X-Title", "lean"), ("HTTP-Referer", "https://a"))


@pytest.mark.parametrize(
    "value", [f'{{"Authorization": "Bearer {KEY}"', f'["{KEY}"]', f'{{"X": 1, "Y": "{KEY}"}}']
)
def test_bad_headers_never_echo_the_value(value: str) -> None:
    e = error(f"[provider.r]\nkind = demo\nheaders = {value}\n")
    assert_error(e, "provider.r", "headers", "a JSON object of strings")
    assert KEY not in str(e) and e.got is None


# --- models ---


def test_model_needs_provider_and_upstream_model() -> None:
    e = error("[model.m]\nupstream_model = x\n")
    assert_error(e, "model.m", "provider", "a [provider.NAME] name: one of demo")
    assert_error(error("[model.m]\nprovider = demo\n"), "model.m", "upstream_model", "model's name")
    e = error("[model.m]\nprovider = demo\nupstream_model =\n")
    assert_error(e, "model.m", "upstream_model")


def test_model_with_unknown_provider() -> None:
    e = error("[model.m]\nprovider = openai\nupstream_model = x\n")
    assert_error(e, "model.m", "provider", "one of demo", "'openai'")
    e = error(base="[model.m]\nprovider = demo\nupstream_model = x\n")
    assert_error(e, "model.m", "provider", "a [provider.NAME] name: none is defined", "'demo'")


def test_fallback() -> None:
    extra = "[model.b]\nprovider = demo\nupstream_model = x\n"
    extra += (
        "[model.a]\nprovider = demo\nupstream_model = y\nfallback = b , default,\nretries = 2\n"
    )
    model = parse(extra).models["a"]
    assert (model.fallback, model.retries) == (("b", "default"), 2)


@pytest.mark.parametrize("fallback", ["nope", "a", "default, a"])
def test_bad_fallback(fallback: str) -> None:
    e = error(f"[model.a]\nprovider = demo\nupstream_model = y\nfallback = {fallback}\n")
    assert_error(e, "model.a", "fallback", "a [model.NAME] name: one of default")
    assert "one of a," not in str(e)


# --- tools ---


def test_tools() -> None:
    config = parse(
        "[tool.clock]\nkind = python\nfunction = my.tools:clock\ndescription = Now\n"
        "[tool.weather]\nkind = http\nurl = https://Tools.Example.com/w\n"
        "[tool.ask]\nkind = client\n"
        'parameters = {"type": "object", "properties": {"q": {"type": "string"}}}\n'
    )
    clock, weather, ask = config.tools["clock"], config.tools["weather"], config.tools["ask"]
    assert (clock.kind, clock.function, clock.description) == ("python", "my.tools:clock", "Now")
    assert clock.parameters == {"type": "object", "properties": {}}
    assert weather.allowed_hosts == ("tools.example.com",)
    assert (weather.timeout, weather.max_response_bytes) == (10.0, 262144)
    assert ask.parameters["properties"] == {"q": {"type": "string"}}


def test_tool_default_parameters_are_not_shared() -> None:
    config = parse("[tool.a]\nkind = client\n[tool.b]\nkind = client\n")
    assert config.tools["a"].parameters is not config.tools["b"].parameters


@pytest.mark.parametrize(
    ("extra", "key", "expected"),
    [
        ("", "kind", "one of python, http, client"),
        ("kind = shell\n", "kind", "one of python, http, client"),
        ("kind = python\n", "function", "module:function"),
        ("kind = python\nfunction = mytools\n", "function", "module:function"),
        ("kind = python\nfunction = a:b:c\n", "function", "module:function"),
        ("kind = python\nfunction = :clock\n", "function", "module:function"),
        ("kind = python\nfunction = my tools:clock\n", "function", "module:function"),
        ("kind = http\n", "url", "URL"),
        ("kind = http\nurl = file:///etc/passwd\n", "url", "URL"),
        ("kind = http\nurl = https://evil.com/x\nallowed_hosts = a.com, b.com\n", "url", "a.com"),
        ("kind = client\nparameters = {not json}\n", "parameters", "a JSON object"),
        ("kind = client\nparameters = [1, 2]\n", "parameters", "a JSON object"),
        ("kind = client\ntimeout = 0\n", "timeout", "a number > 0"),
        ("kind = client\nmax_response_bytes = 0\n", "max_response_bytes", "an integer >= 1"),
    ],
)
def test_bad_tools(extra: str, key: str, expected: str) -> None:
    assert_error(error("[tool.t]\n" + extra), "tool.t", key, expected)


def test_http_tool_host_must_be_allowed() -> None:
    e = error("[tool.t]\nkind = http\nurl = https://evil.com/x?key=abc\nallowed_hosts = a.com\n")
    assert_error(e, "tool.t", "url", "allowed_hosts (a.com)", "'evil.com'")
    extra = "[tool.t]\nkind = http\nurl = http://b.com:8080/x\nallowed_hosts = a.com, B.com\n"
    assert parse(extra).tools["t"].allowed_hosts == ("a.com", "b.com")


# --- scenes ---


def test_scene_needs_a_known_model() -> None:
    assert_error(error("[scene.s]\nsystem = hi\n"), "scene.s", "model", "one of default")
    e = error("[scene.s]\nmodel = gpt-4\n")
    assert_error(e, "scene.s", "model", "a [model.NAME] name: one of default", "'gpt-4'")


def test_scene_tools_must_exist() -> None:
    e = error("[tool.clock]\nkind = client\n[scene.s]\nmodel = default\ntools = clock, shell\n")
    assert_error(e, "scene.s", "tools", "a [tool.NAME] name: one of clock", "'shell'")
    e = error("[scene.s]\nmodel = default\ntools = clock\n")
    assert_error(e, "scene.s", "tools", "none is defined")
    extra = "[tool.clock]\nkind = client\n[scene.s]\nmodel = default\ntools = clock,\n"
    assert parse(extra).scenes["s"].tools == ("clock",)


@pytest.mark.parametrize(
    ("template", "inputs", "uses_message"),
    [
        ("{message}", (), True),
        ("Summarise in {words} words: {message}", ("words",), True),
        ("{b} {a} {b}", ("b", "a"), False),
        ("{{literal}} {message} {_x1}", ("_x1",), True),
        ("no fields at all", (), False),
    ],
)
def test_template_inputs(template: str, inputs: tuple[str, ...], uses_message: bool) -> None:
    scene = parse(f"[scene.s]\nmodel = default\ntemplate = {template}\n").scenes["s"]
    assert (scene.template, scene.inputs, scene.uses_message) == (template, inputs, uses_message)


def test_multiline_template() -> None:
    config = parse("[scene.s]\nmodel = default\ntemplate = In {n} words:\n\n    {message}\n")
    scene = config.scenes["s"]
    assert (scene.template, scene.inputs) == ("In {n} words:\n\n{message}", ("n",))


@pytest.mark.parametrize(
    ("template", "shown"),
    [
        ("{}", "{}"),
        ("{0}", "{0}"),
        ("{a.b}", "{a.b}"),
        ("{a[0]}", "{a[0]}"),
        ("{message!r}", "{message!r}"),
        ("{message:>10}", "{message:>10}"),
        ("{a-b}", "{a-b}"),
        ("unclosed {message", "unclosed {message"),
        ("stray } brace", "stray } brace"),
    ],
)
def test_bad_template(template: str, shown: str) -> None:
    e = error(f"[scene.s]\nmodel = default\ntemplate = {template}\n")
    assert_error(e, "scene.s", "template", "plain {name} fields", f"'{shown}'")


# --- auth and the loopback rule ---


def test_tokens_are_read_from_the_environment() -> None:
    config = parse(environ={"LEAN_TOKENS": f" {KEY} , second,, ,"})
    assert config.auth.tokens == (Secret(KEY), Secret("second"))
    assert KEY not in repr(config)


def test_tokens_env_can_be_renamed() -> None:
    config = parse(
        "[auth]\ntokens_env = MY_TOKENS\n", environ={"MY_TOKENS": "a", "LEAN_TOKENS": "b"}
    )
    assert (config.auth.tokens_env, config.auth.tokens) == ("MY_TOKENS", (Secret("a"),))
    assert_error(error("[auth]\ntokens_env =\n"), "auth", "tokens_env", "environment variable")


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("LocalHost", True),
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("0.0.0.0", False),
        ("::", False),
        ("[::]", False),
        ("", False),
        ("192.168.1.10", False),
        ("10.0.0.1", False),
        ("example.com", False),
        ("localhost.example.com", False),
        ("128.0.0.1", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "192.168.1.10", "lean.example.com"])
def test_non_loopback_host_without_tokens_is_refused(host: str) -> None:
    e = error(f"[server]\nhost = {host}\n", environ={"LEAN_TOKENS": " , "})
    expected = "a loopback address, or client tokens in $LEAN_TOKENS"
    assert_error(e, "server", "host", expected, f"'{host}'")
    e = error(f"[auth]\ntokens_env = T\n[server]\nhost = {host}\n")
    assert_error(e, "server", "host", "client tokens in $T")


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10"])
def test_non_loopback_host_with_tokens_is_fine(host: str) -> None:
    config = parse(f"[server]\nhost = {host}\n", environ={"LEAN_TOKENS": KEY})
    assert config.server.host == host and config.auth.tokens == (Secret(KEY),)


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "::1"])
def test_loopback_host_without_tokens_is_fine(host: str) -> None:
    assert parse(f"[server]\nhost = {host}\n").server.host == host


# --- store ---


def test_relative_store_path_is_resolved_against_the_config_dir(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    path = tmp_path / "etc" / "lean.ini"
    path.write_text(BASE + "[store]\npath = data/lean.db\n")
    config = load_config(path, environ={})
    assert config.store.path == str(tmp_path / "etc" / "data" / "lean.db")
    assert config.path == str(path)


def test_store_path_defaults_next_to_the_config(tmp_path: Path) -> None:
    path = tmp_path / "config.ini"
    path.write_text(BASE)
    assert load_config(path, environ={}).store.path == str(tmp_path / "lean.db")


def test_absolute_store_path_and_no_memory_store(tmp_path: Path) -> None:
    assert parse(f"[store]\npath = {tmp_path}/x.db\n").store.path == f"{tmp_path}/x.db"
    assert_error(error("[store]\npath = :memory:\n"), "store", "path", "a file path")
    assert parse().store.path == os.path.join(os.getcwd(), "lean.db")
    assert_error(error("[store]\npath =\n"), "store", "path", "a file path")


def test_store_url_instead_of_path() -> None:
    url = "postgresql://lean:s3cret@127.0.0.1:5432/lean"
    store = parse(f"[store]\nurl = {url}\nflush_interval = 0.5\n").store
    assert (store.url, store.flush_interval) == (url, 0.5)
    assert parse().store.url == ""  # neither: the SQLite file, as before
    assert parse("[store]\nurl = postgres://db/lean\n").store.url == "postgres://db/lean"


@pytest.mark.parametrize(
    "store",
    [
        "url = postgresql://lean:s3cret@db/lean\npath = lean.db",  # both: which one is a guess
        "url = mysql://lean:s3cret@db/lean",
        "url = postgresql://lean:s3cret@db",  # no database
        "url = postgresql://lean:s3cret@db/",
        "url =",
    ],
)
def test_bad_store_url(store: str) -> None:
    e = error(f"[store]\n{store}\n")
    assert_error(e, "store", "url")
    assert "s3cret" not in str(e)
