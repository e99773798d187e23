"""`[client.NAME]` sections: who may call lean, with what, and how much (docs/protocol.md §8).

Each client has its own tokens, read from the environment variable its `token_env` names
(comma-separated, as `[auth] tokens_env`: several let a client rotate its token), the
scenes and model aliases it may use (absent: all), and its limits (absent: none). The
tokens of `[auth]` stay what they were: the default client, unnamed and unlimited.

Checked here, once: every name a client lists exists, a client that may use a scene may
use its model, and no token belongs to two clients (or to a client and `[auth]`): a
request's token must say who it is. Errors name the section and the key, never a token.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING, Any

import msgspec

from lean.config_keys import ConfigError

if TYPE_CHECKING:
    from lean.config import Secret

__all__ = ["DEFAULT_CLIENT", "ClientConfig", "parse_clients"]

# The metrics label of requests made with `[auth]` tokens, or without auth on loopback:
# reserved, so no `[client.NAME]` can be mistaken for them.
DEFAULT_CLIENT = "default"


class ClientConfig(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    token_env: str
    tokens: tuple[Secret, ...] = ()  # from $token_env
    scenes: tuple[str, ...] | None = None  # None: every scene
    models: tuple[str, ...] | None = None  # None: every model alias
    max_streams: int | None = None  # streams and runs at once
    requests_per_minute: int | None = None
    # Requests at once after a quiet spell (the bucket's size); default requests_per_minute.
    requests_burst: int | None = None
    tokens_per_day: int | None = None  # prompt + completion tokens per UTC day


def _names(
    section: str, key: str, listed: tuple[str, ...], known: Collection[str], kind: str
) -> tuple[str, ...]:
    for name in listed:
        if name not in known:
            names = ", ".join(sorted(known)) or "none is defined"
            raise ConfigError(section, key, f"[{kind}.NAME] names: one of {names}", name)
    if not listed:
        raise ConfigError(section, key, f"at least one [{kind}.NAME] name (absent: all)")
    return listed


def parse_clients(
    sections: Mapping[str, dict[str, Any]],
    environ: Mapping[str, str],
    *,
    scenes: Mapping[str, Any],
    models: Collection[str],
    auth_tokens: Collection[Secret],
    secret: Callable[[str], Secret],
) -> dict[str, ClientConfig]:
    """The `[client.NAME]` sections, checked; `secret` wraps each token (lean.config.Secret,
    passed in: that module imports this one)."""
    clients: dict[str, ClientConfig] = {}
    seen = {token.reveal() for token in auth_tokens}
    for name, values in sections.items():
        section = f"client.{name}"
        if name == DEFAULT_CLIENT:
            raise ConfigError(
                section, None, f"a name other than '{DEFAULT_CLIENT}' ([auth] tokens' client)"
            )
        env = values.get("token_env")
        if not env:
            raise ConfigError(section, "token_env", "the name of an environment variable")
        raw = environ.get(env, "")
        tokens = [t for t in (part.strip() for part in raw.split(",")) if t]
        if not tokens:
            raise ConfigError(
                section, "token_env", f"client tokens in the environment variable {env}"
            )
        for token in tokens:
            if token in seen:  # never echoed: it is a credential
                raise ConfigError(
                    section, "token_env", f"tokens no other client and no [auth] token use (${env})"
                )
            seen.add(token)
        values["tokens"] = tuple(secret(t) for t in tokens)
        if "scenes" in values:
            values["scenes"] = _names(section, "scenes", values["scenes"], scenes, "scene")
        if "models" in values:
            values["models"] = _names(section, "models", values["models"], models, "model")
            for scene in values.get("scenes", ()):
                model = scenes[scene].model
                if model not in values["models"]:
                    # Using a scene is using its model: lists that allow the scene and not
                    # its model contradict each other.
                    raise ConfigError(
                        section, "models", f"'{model}' too, the model of scene '{scene}'"
                    )
        if "requests_burst" in values and "requests_per_minute" not in values:
            raise ConfigError(section, "requests_burst", "requests_per_minute set beside it")
        clients[name] = ClientConfig(name=name, **values)
    return clients
