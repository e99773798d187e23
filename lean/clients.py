"""Who a request is, what it may use and how much (docs/protocol.md §8).

- `client_of(request)`: the `Client` whose token the request carried (set by the auth
  middleware); the default client for `[auth]` tokens and for loopback without tokens.
- `Clients.model` / `Clients.scene`: a model alias or scene the client may not use is a
  404 in the very words of one that does not exist, so a client learns nothing of names it
  cannot use (and `/v1/models`, `/v1/scenes` list only its own).
- `Clients.admit` -> `Ticket`, before any provider call: a stream slot and one request of
  the client's rate, or 429 + `Retry-After`; `Ticket.end` frees the slot and counts the
  tokens the answer used.

Counting is a `Limiter`'s job; `MemoryLimiter` counts on this instance, and
`lean.client_limits.RedisLimiter` across the instances sharing Redis (the same two calls:
`take` in one round trip that checks and takes everything at once, a script; `give`
without blocking, a queued write).

The request rate is a GCRA (a token bucket kept as one timestamp per client, the
"theoretical arrival time"): `requests_burst` requests at once after a quiet spell, then
one every 60/`requests_per_minute` s; its `Retry-After` is exact. Tokens are counted per
UTC day: the upstream's usage (prompt + completion) where it gave one, else an estimate
(`lean.dialects.estimate`); a request is admitted while the day's count is below the limit.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from aiohttp import web

from lean.config import ClientConfig, Config, ModelConfig, SceneConfig
from lean.config_clients import DEFAULT_CLIENT
from lean.dialects.estimate import estimate_tokens, text_tokens
from lean.errors import NotFound, QuotaExceeded, RateLimited, clip
from lean.metrics import Metrics
from lean.providers.base import Usage

__all__ = [
    "DEFAULT",
    "Client",
    "Clients",
    "Limiter",
    "MemoryLimiter",
    "Refusal",
    "Ticket",
    "client_key",
    "client_of",
    "estimate",
    "refusal",
]

DAY = 86400.0
# Seconds a client at its max_streams is asked to wait: streams end at any moment.
STREAMS_RETRY_AFTER = 1.0


def estimate(body: dict[str, Any], answer: str, chunks: int = 0) -> float:
    """The tokens of a request whose upstream reported no usage (a stream cut before its
    usage chunk, a server that never sends one): its chat body and the answer so far (its
    text, plus `chunks` relayed whose text lean did not keep), by the rule of
    `lean.dialects.estimate`, which leans toward counting too much. Nothing when nothing of
    an answer came: a request the upstream refused (a connect error, an HTTP error) is not
    billed."""
    if not answer and not chunks:
        return 0.0
    return estimate_tokens(body) + text_tokens(answer) + chunks


class Client:
    """A request's client: `config` is its `[client.NAME]`, None for the default client."""

    __slots__ = ("config", "name", "owner")

    def __init__(self, config: ClientConfig | None) -> None:
        self.config = config
        self.name = DEFAULT_CLIENT if config is None else config.name
        # What the store records as a conversation's owner: NULL for the default client,
        # which also owns the rows written before clients existed.
        self.owner = None if config is None else config.name

    def __repr__(self) -> str:
        return f"Client({self.name!r})"


DEFAULT = Client(None)
client_key = web.RequestKey("client", Client)


def client_of(request: web.Request) -> Client:
    try:
        return request[client_key]
    except KeyError:  # no tokens: the default client
        return DEFAULT


# Which limit refused a request (a `[client.NAME]` key, the metrics label) and the error to
# answer with.
Refusal = tuple[str, RateLimited]


class Limiter(Protocol):
    async def take(self, client: ClientConfig) -> Refusal | None:
        """One more request of `client` now: None when everything was taken (a stream slot,
        one request of its rate); else nothing was taken, and which limit refused it."""
        ...

    def give(self, client: ClientConfig, tokens: int) -> None:
        """A request of `client` ended having used `tokens`: its slot is free. Never waits."""
        ...


class _State:
    __slots__ = ("day", "spent", "streams", "tat")

    def __init__(self) -> None:
        self.streams = 0
        self.tat = 0.0  # the GCRA's theoretical arrival time (monotonic seconds)
        self.day = 0  # the UTC day `spent` counts (days since the epoch)
        self.spent = 0


class MemoryLimiter:
    """Counts on this instance: one small `_State` per named client, nothing per request.
    `clock` (monotonic) times the request rate, `wall` (epoch seconds) says which UTC day
    it is."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self._wall = wall
        self._states: dict[str, _State] = {}

    def _state(self, client: ClientConfig) -> _State:
        state = self._states.get(client.name)
        if state is None:
            state = self._states[client.name] = _State()
        wall = self._wall()
        day = int(wall // DAY)
        if state.day != day:
            state.day, state.spent = day, 0
        return state

    async def take(self, client: ClientConfig) -> Refusal | None:
        state = self._state(client)
        if client.tokens_per_day is not None and state.spent >= client.tokens_per_day:
            return refusal(client, "tokens_per_day", (state.day + 1) * DAY - self._wall())
        if client.max_streams is not None and state.streams >= client.max_streams:
            return refusal(client, "max_streams", STREAMS_RETRY_AFTER)
        if client.requests_per_minute is not None:
            now = self._clock()
            interval = 60.0 / client.requests_per_minute
            tolerance = ((client.requests_burst or client.requests_per_minute) - 1) * interval
            tat = max(state.tat, now)
            if tat - now > tolerance:
                return refusal(client, "requests_per_minute", tat - now - tolerance)
            state.tat = tat + interval
        state.streams += 1
        return None

    def give(self, client: ClientConfig, tokens: int) -> None:
        self._state(client).streams -= 1
        self.spend(client, tokens)

    def spend(self, client: ClientConfig, tokens: int) -> None:
        """Count `tokens` toward today's, without a stream ending (lean.client_limits keeps
        this count too, for when Redis is down)."""
        self._state(client).spent += tokens


def refusal(client: ClientConfig, limit: str, retry_after: float) -> Refusal:
    """The 429 for `client` over `limit` (a `[client.NAME]` key), in every limiter's words."""
    name = clip(client.name)
    if limit == "tokens_per_day":
        return limit, QuotaExceeded(
            f"client '{name}' has used its {client.tokens_per_day} tokens of today (UTC)",
            retry_after=retry_after,
        )
    if limit == "max_streams":
        message = f"client '{name}' is running its limit of {client.max_streams} streams"
    else:
        message = f"client '{name}' made its {client.requests_per_minute} requests per minute"
    return limit, RateLimited(message, retry_after=retry_after)


class Ticket:
    """An admitted request's hold on its client's limits, until `end`."""

    __slots__ = ("_clients", "_ended", "client")

    def __init__(self, clients: Clients, client: Client) -> None:
        self._clients = clients
        self.client = client
        self._ended = False

    def end(self, usage: Usage | None = None, estimate: Callable[[], float] | None = None) -> None:
        """Free the stream slot and count the tokens: `usage` as the upstream gave it, else
        `estimate()` (prompt and answer so far); none for a request that never reached a
        provider. Only the first call counts."""
        if self._ended:
            return
        self._ended = True
        self._clients.ended(self.client, usage, estimate)


class Clients:
    def __init__(self, config: Config, metrics: Metrics, limiter: Limiter | None = None) -> None:
        self._config = config
        self._metrics = metrics
        self.limiter: Limiter = limiter or MemoryLimiter()
        # Each token (as bytes) and its client, for the auth middleware.
        tokens = [(token.reveal().encode(), DEFAULT) for token in config.auth.tokens]
        for named in config.clients.values():
            client = Client(named)
            tokens += [(token.reveal().encode(), client) for token in named.tokens]
        self.tokens = tuple(tokens)
        # Every client's series from the start, at 0: a rate over a series that appears only
        # with its first request misses that request.
        for name in (DEFAULT_CLIENT, *config.clients):
            metrics.client_requests[(name,)] += 0
            metrics.client_streams[(name,)] += 0

    def models(self, client: Client) -> list[str]:
        allowed = client.config.models if client.config is not None else None
        return [alias for alias in self._config.models if allowed is None or alias in allowed]

    def scenes(self, client: Client) -> list[SceneConfig]:
        return [s for s in self._config.scenes.values() if self._may_use_scene(client, s)]

    def model(self, client: Client, alias: str) -> ModelConfig:
        """The model `alias` names, if `client` may use it; else 404, as if it did not exist."""
        model = self._config.models.get(alias)
        allowed = client.config.models if client.config is not None else None
        if model is None or (allowed is not None and alias not in allowed):
            if model is not None:
                self._metrics.client_rejections[(client.name, "model")] += 1
            raise NotFound(
                f"model '{clip(alias)}' does not exist; GET /v1/models lists the aliases"
            )
        return model

    def scene(self, client: Client, name: str) -> SceneConfig:
        """The scene `name`, if `client` may use it; else 404, as if it did not exist."""
        scene = self._config.scenes.get(name)
        if scene is None or not self._may_use_scene(client, scene):
            if scene is not None:
                self._metrics.client_rejections[(client.name, "scene")] += 1
            raise NotFound(f"scene '{clip(name)}' does not exist")
        return scene

    def _may_use_scene(self, client: Client, scene: SceneConfig) -> bool:
        config = client.config
        if config is None:
            return True
        if config.scenes is not None and scene.name not in config.scenes:
            return False
        return config.models is None or scene.model in config.models

    async def admit(self, client: Client) -> Ticket:
        """One request of `client` may start now (else 429 + Retry-After): its ticket,
        to `end` when its answer has ended, whatever happened."""
        metrics = self._metrics
        if client.config is not None:
            refusal = await self.limiter.take(client.config)
            if refusal is not None:
                limit, error = refusal
                metrics.client_rejections[(client.name, limit)] += 1
                raise error
        metrics.client_requests[(client.name,)] += 1
        metrics.client_streams[(client.name,)] += 1
        return Ticket(self, client)

    def ended(
        self, client: Client, usage: Usage | None, estimate: Callable[[], float] | None
    ) -> None:
        metrics = self._metrics
        metrics.client_streams[(client.name,)] -= 1
        tokens = 0
        if usage is not None and (usage.prompt_tokens or usage.completion_tokens):
            metrics.client_tokens[(client.name, "prompt")] += usage.prompt_tokens
            metrics.client_tokens[(client.name, "completion")] += usage.completion_tokens
            tokens = usage.prompt_tokens + usage.completion_tokens
        elif estimate is not None:
            tokens = round(estimate())
            metrics.client_tokens[(client.name, "estimated")] += tokens
        if client.config is not None:
            self.limiter.give(client.config, tokens)
