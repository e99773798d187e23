"""What lean writes into Redis for `lean.cluster` (docs/protocol.md §7): its Lua
scripts, and the messages instances send each other on their channels.

Each script runs atomically in Redis, so an admission that sums the live instances' slots
and takes one cannot interleave with another instance's. Keys are built inside the
scripts (the instance names are data), so they need a single Redis, not Redis Cluster.
Every script gets ARGV[1] = the key prefix and ARGV[2] = this instance's name.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Literal

import msgspec

# ARGV: prefix, instance, cluster_max_streams. The live instances' slots summed (the dead
# ones' forgotten on the way); one taken for `instance` if below the bound: the new
# total, else -1.
ADMIT = """
local p, me, max = ARGV[1], ARGV[2], tonumber(ARGV[3])
redis.call('SADD', p .. 'instances', me)
local total = 0
for _, i in ipairs(redis.call('SMEMBERS', p .. 'instances')) do
  if i == me or redis.call('EXISTS', p .. 'live:' .. i) == 1 then
    total = total + tonumber(redis.call('HGET', p .. 'slots', i) or '0')
  else
    redis.call('SREM', p .. 'instances', i)
    redis.call('HDEL', p .. 'slots', i)
    redis.call('DEL', p .. 'runs:' .. i)
    redis.call('SADD', p .. 'dead', i)
  end
end
if total >= max then return -1 end
redis.call('HINCRBY', p .. 'slots', me, 1)
return total + 1
"""
# ARGV: prefix, instance, this process's token, lease (ms), slots ('' when not counted),
# 'sync' or 'renew', and with 'sync' every run id the instance owns. 1 if this process
# held the lease; 2 if another process did (the same name twice, or a restart within the
# lease); 0 if nobody did (the caller then syncs: others may have forgotten its runs).
BEAT = """
local p, me = ARGV[1], ARGV[2]
local was = redis.call('SET', p .. 'live:' .. me, ARGV[3], 'PX', ARGV[4], 'GET')
redis.call('SADD', p .. 'instances', me)
if ARGV[5] ~= '' then redis.call('HSET', p .. 'slots', me, ARGV[5]) end
if ARGV[6] == 'sync' then
  local key = p .. 'runs:' .. me
  redis.call('DEL', key)
  for i = 7, #ARGV, 1000 do
    redis.call('SADD', key, unpack(ARGV, i, math.min(i + 999, #ARGV)))
  end
end
if was == ARGV[3] then return 1 end
if was then return 2 end
return 0
"""
# ARGV: prefix, instance (the sender), channel prefix, run id, message. The message
# published to the live instance that owns the run: how many received it; -1 when no live
# instance owns it.
ROUTE = """
local p, chan, run = ARGV[1], ARGV[3], ARGV[4]
for _, i in ipairs(redis.call('SMEMBERS', p .. 'instances')) do
  if redis.call('SISMEMBER', p .. 'runs:' .. i, run) == 1
      and redis.call('EXISTS', p .. 'live:' .. i) == 1 then
    return redis.call('PUBLISH', chan .. i, ARGV[5])
  end
end
return -1
"""
# ARGV: prefix, instance, how long a sweep may take (ms). The dead instances whose cut
# answers this instance is to end (lean.store's END_STREAMING): each found dead (its lease
# gone, here or by ADMIT) is forgotten and put in `dead`, then given to ONE caller, the
# one that takes its `reaping:` lock (SET NX); the caller SREMs it from `dead` once its
# rows are ended, else the lock lapses and the next caller tries again. One that came back
# (a restart: it ends its own rows at start) is not given.
REAP = """
local p, me = ARGV[1], ARGV[2]
for _, i in ipairs(redis.call('SMEMBERS', p .. 'instances')) do
  if i ~= me and redis.call('EXISTS', p .. 'live:' .. i) == 0 then
    redis.call('SREM', p .. 'instances', i)
    redis.call('HDEL', p .. 'slots', i)
    redis.call('DEL', p .. 'runs:' .. i)
    redis.call('SADD', p .. 'dead', i)
  end
end
local mine = {}
for _, i in ipairs(redis.call('SMEMBERS', p .. 'dead')) do
  if i == me or redis.call('EXISTS', p .. 'live:' .. i) == 1 then
    redis.call('SREM', p .. 'dead', i)
  elseif redis.call('SET', p .. 'reaping:' .. i, me, 'NX', 'PX', ARGV[3]) then
    mine[#mine + 1] = i
  end
end
return mine
"""
LAPSED, MINE, OTHER = 0, 1, 2  # who held the lease when BEAT renewed it
SHA = {script: hashlib.sha1(script.encode()).hexdigest() for script in (ADMIT, BEAT, ROUTE, REAP)}


def sha(script: str) -> str:
    """A script's EVALSHA name (lean.client_limits' scripts are hashed once, here)."""
    known = SHA.get(script)
    if known is None:
        known = SHA[script] = hashlib.sha1(script.encode()).hexdigest()
    return known


class RunRequest(msgspec.Struct, frozen=True):
    """What an instance asks of the owner of a run, for the client that asked: the owner
    acts only for the client that started the run (any other gets the 404 it would get
    there). A `resume` is answered 200 (then `Event`s and an `End` under the ask's id),
    204 (nothing after `after`), or the error a local resume would get."""

    op: Literal["cancel", "tool_result", "resume"]
    run_id: str
    client: str  # the asking client's name (lean.clients.Client.name)
    tool_call_id: str = ""
    result: msgspec.Raw = msgspec.Raw(b"null")
    after: int = 0  # resume: the reader's cursor


class Ask(msgspec.Struct, tag="ask", array_like=True):
    id: int
    sender: str  # the instance whose channel gets the answer
    request: RunRequest


class Answer(msgspec.Struct, tag="answer", array_like=True):
    id: int
    status: int
    body: msgspec.Raw  # the owner's JSON response body, as it would have answered


class Event(msgspec.Struct, tag="event", array_like=True):
    """One event of a run, owner -> the resuming reader's instance; seq 0: a heartbeat."""

    id: int  # the resume's ask id
    seq: int
    name: str
    payload: msgspec.Raw  # the event's JSON as the run encoded it (lean.events)


class End(msgspec.Struct, tag="end", array_like=True):
    """Owner -> reader: the run's events for this resume are over (its last event was sent,
    or the owner stopped the feed)."""

    id: int


class Stop(msgspec.Struct, tag="stop", array_like=True):
    """Reader -> owner: the resuming client left; stop feeding ask `id` of `sender`."""

    id: int
    sender: str


# JSON, not msgpack: a tool's result and an answer's body are JSON already, carried as
# they are (`msgspec.Raw`), never decoded and encoded again on the way.
encode = msgspec.json.Encoder().encode
decode = msgspec.json.Decoder(Ask | Answer | Event | End | Stop).decode

# The owner's side: a request for one of its runs -> (HTTP status, JSON body).
Deliver = Callable[[RunRequest], tuple[int, bytes]]
