"""lean.config_clients: `[client.NAME]` sections, every rule, errors naming the section and
the key and never a token."""

import pytest

from lean.config import Config, ConfigError, Secret, parse_config

BASE = """
[provider.demo]
kind = demo

[model.default]
provider = demo
upstream_model = lean-demo

[model.big]
provider = demo
upstream_model = lean-demo

[scene.chat]
model = default

[scene.deep]
model = big
"""
TOKEN = "app-token-DO-NOT-LEAK-42"


def parse(extra: str, environ: dict[str, str] | None = None) -> Config:
    return parse_config(BASE + extra, environ={"APP_TOKENS": TOKEN} if environ is None else environ)


def error(extra: str, environ: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(extra, environ)
    assert TOKEN not in str(info.value)
    return info.value


def test_a_client_with_every_key() -> None:
    config = parse(
        """
[client.app]
token_env = APP_TOKENS
scenes = chat
models = default
max_streams = 3
requests_per_minute = 60
requests_burst = 5
tokens_per_day = 100000
""",
        {"APP_TOKENS": f"{TOKEN}, second-token"},
    )
    app = config.clients["app"]
    assert app.tokens == (Secret(TOKEN), Secret("second-token"))  # rotation: both work
    assert (app.scenes, app.models) == (("chat",), ("default",))
    assert (app.max_streams, app.requests_per_minute, app.requests_burst) == (3, 60, 5)
    assert app.tokens_per_day == 100000
    assert config.has_tokens and config.auth.tokens == ()
    assert TOKEN not in repr(config)


def test_absent_keys_mean_everything_and_no_limit() -> None:
    app = parse("[client.app]\ntoken_env = APP_TOKENS\n").clients["app"]
    assert (app.scenes, app.models, app.max_streams) == (None, None, None)
    assert (app.requests_per_minute, app.requests_burst, app.tokens_per_day) == (None, None, None)


def test_client_tokens_let_lean_listen_beyond_loopback() -> None:
    config = parse("[server]\nhost = 0.0.0.0\n[client.app]\ntoken_env = APP_TOKENS\n")
    assert config.server.host == "0.0.0.0"


@pytest.mark.parametrize(
    ("extra", "environ", "key", "expected"),
    [
        ("[client.app]\nmax_streams = 1\n", None, "token_env", "an environment variable"),
        (
            "[client.app]\ntoken_env = NOPE\n",
            None,
            "token_env",
            "tokens in the environment variable NOPE",
        ),
        (
            "[client.app]\ntoken_env = APP_TOKENS\n",
            {"APP_TOKENS": " , "},
            "token_env",
            "APP_TOKENS",
        ),
        (
            "[client.app]\ntoken_env = APP_TOKENS\nscenes = chat, nope\n",
            None,
            "scenes",
            "chat, deep",
        ),
        ("[client.app]\ntoken_env = APP_TOKENS\nscenes = ,\n", None, "scenes", "at least one"),
        ("[client.app]\ntoken_env = APP_TOKENS\nmodels = nope\n", None, "models", "big, default"),
        (
            "[client.app]\ntoken_env = APP_TOKENS\nscenes = deep\nmodels = default\n",
            None,
            "models",
            "'big' too, the model of scene 'deep'",
        ),
        ("[client.app]\ntoken_env = APP_TOKENS\nmax_streams = 0\n", None, "max_streams", ">= 1"),
        (
            "[client.app]\ntoken_env = APP_TOKENS\nrequests_per_minute = x\n",
            None,
            "requests_per_minute",
            "an integer",
        ),
        (
            "[client.app]\ntoken_env = APP_TOKENS\nrequests_burst = 3\n",
            None,
            "requests_burst",
            "requests_per_minute set beside it",
        ),
        (
            "[client.app]\ntoken_env = APP_TOKENS\ntokens_per_day = -1\n",
            None,
            "tokens_per_day",
            ">= 1",
        ),
        ("[client.app]\ntoken_env = APP_TOKENS\nmax_stream = 1\n", None, "max_stream", "one of"),
    ],
)
def test_errors_name_the_section_and_the_key(
    extra: str, environ: dict[str, str] | None, key: str, expected: str
) -> None:
    e = error(extra, environ)
    assert (e.section, e.key) == ("client.app", key), str(e)
    assert expected in str(e)


def test_a_token_says_who_a_request_is_so_no_two_clients_share_one() -> None:
    two = "[client.a]\ntoken_env = A\n[client.b]\ntoken_env = B\n"
    e = error(two, {"A": TOKEN, "B": f"other, {TOKEN}"})
    assert (e.section, e.key) == ("client.b", "token_env")
    assert "no other client" in str(e)
    e = error("[client.a]\ntoken_env = A\n", {"A": TOKEN, "LEAN_TOKENS": TOKEN})
    assert (e.section, e.key) == ("client.a", "token_env")


def test_default_is_the_auth_tokens_client_and_reserved() -> None:
    e = error("[client.default]\ntoken_env = APP_TOKENS\n")
    assert (e.section, e.key) == ("client.default", None)
    assert "a name other than 'default'" in str(e)
