"""Clients' limits counted in Redis, shared by every instance of a cluster (docs/protocol.md
§8): a `lean.clients.Limiter` used when `[cluster] redis_url` is set.

In Redis (the cluster's database; `<c>` is the client's name):
- `lean:client:<c>:tat`: the GCRA's theoretical arrival time (µs, Redis' clock, so every
  instance reads the same time), expiring when it is in the past.
- `lean:client:<c>:streams`: instance -> the client's streams it relays; an instance
  whose lease is gone is left out of the sum and forgotten, as `lean.cluster` does with
  its slots, so a dead instance's streams free themselves within a lease.
- `lean:client:<c>:tokens:<day>`: tokens used on that UTC day (the day as days since the
  epoch, by this instance's clock), expiring two days later.

Round trips per request: `take` awaits ONE script (`TAKE`: checks the day's tokens, the
client's streams across the cluster and its rate, and takes a stream and a request of the
rate only when all three allow it); `give` writes up to three commands in one write,
without waiting (HINCRBY -1 on the streams, INCRBY + EXPIRE on the day's tokens). A
client without a limit costs no Redis command. Nothing per chunk.

Redis down (or not answering within `lean.cluster.CALL_TIMEOUT`): each instance counts in
memory (`MemoryLimiter`), on its own, so a client may get up to the full limits on each
instance until Redis is back; lean logs the change both ways and `lean_client_limits_shared`
is 0. Tokens used then are still added in Redis if it is back when the request ends. When
lean reconnects it writes its streams of each client again (Redis may have restarted empty).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from lean.clients import DAY, STREAMS_RETRY_AFTER, MemoryLimiter, Refusal, refusal
from lean.cluster import PREFIX, Cluster
from lean.config import ClientConfig
from lean.resp import ReplyError

log = logging.getLogger("lean.clients")

TOKENS_TTL = 2 * 86400  # seconds a day's token count is kept: past any clock skew
LIMITS = ("", "tokens_per_day", "max_streams", "requests_per_minute")  # TAKE's codes

# ARGV: prefix, instance, client, max_streams ('' none), requests_per_minute ('' none),
# burst, tokens_per_day ('' none), the UTC day. {0, 0} when taken; else {code, ms to wait}
# (LIMITS[code]; the caller works out tokens_per_day's wait, to its own midnight).
TAKE = """
local p, me = ARGV[1], ARGV[2]
local c = p .. 'client:' .. ARGV[3] .. ':'
if ARGV[7] ~= '' then
  local spent = tonumber(redis.call('GET', c .. 'tokens:' .. ARGV[8]) or '0')
  if spent >= tonumber(ARGV[7]) then return {1, 0} end
end
local streams = c .. 'streams'
if ARGV[4] ~= '' then
  local total, held = 0, redis.call('HGETALL', streams)
  for k = 1, #held, 2 do
    if held[k] == me or redis.call('EXISTS', p .. 'live:' .. held[k]) == 1 then
      total = total + tonumber(held[k + 1])
    else
      redis.call('HDEL', streams, held[k])
    end
  end
  if total >= tonumber(ARGV[4]) then return {2, 0} end
end
if ARGV[5] ~= '' then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local interval = 60000000 / tonumber(ARGV[5])
  local tolerance = (tonumber(ARGV[6]) - 1) * interval
  local key = c .. 'tat'
  local tat = math.max(tonumber(redis.call('GET', key) or '0'), now)
  if tat - now > tolerance then return {3, math.ceil((tat - now - tolerance) / 1000)} end
  tat = tat + interval
  local ms = math.max(1, math.ceil((tat - now) / 1000))
  redis.call('SET', key, string.format('%.0f', tat), 'PX', string.format('%d', ms))
end
if ARGV[4] ~= '' then redis.call('HINCRBY', streams, me, 1) end
return {0, 0}
"""


def _limited(client: ClientConfig) -> bool:
    return (
        client.max_streams is not None
        or client.requests_per_minute is not None
        or client.tokens_per_day is not None
    )


class RedisLimiter:
    """Counts in Redis through the cluster's connection; in `memory` while it is down."""

    def __init__(
        self,
        cluster: Cluster,
        clients: Iterable[ClientConfig],
        *,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._cluster = cluster
        self._wall = wall
        self.memory = MemoryLimiter(wall=wall)
        self.shared = True  # the last admission was counted in Redis
        self.local_admissions = 0  # admitted by memory alone because Redis was down
        # Per client: its requests admitted in Redis and not ended yet (this instance's
        # share of `streams`, written again at each reconnect).
        self._held: dict[str, int] = {}
        self._counted = [client for client in clients if client.max_streams is not None]
        cluster.on_join.append(self._joined)

    async def take(self, client: ClientConfig) -> Refusal | None:
        if not _limited(client):
            return await self.memory.take(client)
        wall = self._wall()
        day = int(wall // DAY)
        args = (
            client.name,
            _arg(client.max_streams),
            _arg(client.requests_per_minute),
            str(client.requests_burst or client.requests_per_minute or 1),
            _arg(client.tokens_per_day),
            str(day),
        )
        try:
            reply = await self._cluster.call(TAKE, *args)
        except (ConnectionError, ReplyError, TimeoutError) as exc:
            self._alone(exc)
            self.local_admissions += 1
            return await self.memory.take(client)
        if not self.shared:
            self.shared = True
            log.warning("client limits: Redis is back; counting across instances again")
        assert isinstance(reply, list) and isinstance(reply[0], int) and isinstance(reply[1], int)
        code, wait_ms = reply[0], reply[1]
        if code == 0:
            self._held[client.name] = self._held.get(client.name, 0) + 1
            return None
        limit = LIMITS[code]
        if limit == "tokens_per_day":
            return refusal(client, limit, (day + 1) * DAY - wall)
        if limit == "max_streams":
            return refusal(client, limit, STREAMS_RETRY_AFTER)
        return refusal(client, limit, wait_ms / 1000)

    def give(self, client: ClientConfig, tokens: int) -> None:
        commands: list[tuple[str | int, ...]] = []
        held = self._held.get(client.name, 0)
        if held:  # admitted in Redis (when both kinds run, which one ends does not matter)
            self._held[client.name] = held - 1
            if client.max_streams is not None:
                me = self._cluster.instance
                commands.append(("HINCRBY", _key(client, "streams"), me, -1))
            self.memory.spend(client, tokens)
        else:
            self.memory.give(client, tokens)
        if tokens and client.tokens_per_day is not None:
            key = _key(client, f"tokens:{int(self._wall() // DAY)}")
            commands += [("INCRBY", key, tokens), ("EXPIRE", key, TOKENS_TTL)]
        self._cluster.send(*commands)  # one write; none while Redis is down

    def _alone(self, exc: BaseException) -> None:
        if self.shared:
            self.shared = False
            log.warning(
                "client limits: Redis unreachable (%s); each instance counts its own until "
                "it is back (a client may get its limits on every instance)",
                exc or type(exc).__name__,
            )

    def _joined(self) -> None:
        """Connected or registered again: this instance's streams of each client, as they
        are now (Redis may have restarted empty, or others forgotten us; a restart of this
        instance within its lease finds its old counts there)."""
        me = self._cluster.instance
        self._cluster.send(
            *(("HSET", _key(c, "streams"), me, self._held.get(c.name, 0)) for c in self._counted)
        )


def _arg(value: int | None) -> str:
    return "" if value is None else str(value)


def _key(client: ClientConfig, what: str) -> str:
    return f"{PREFIX}client:{client.name}:{what}"
