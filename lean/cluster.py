"""Instances sharing Redis (docs/protocol.md §7): which instance owns which run, how many
streams the cluster relays, and a request for a run handed to the instance that owns it.

In Redis (the database of `[cluster] redis_url`):
- `lean:live:<instance>`: set with a lease (`[cluster] lease`), renewed every third of it.
  When it is gone the instance counts as dead: the next instance that looks forgets its
  runs and frees its slots (`ADMIT`, `ROUTE`).
- `lean:instances`: the instances that registered; `lean:runs:<instance>`: the ids of the
  scene runs it owns; `lean:slots`: instance -> streams it relays (only counted with
  `[limits] cluster_max_streams`).
- Channel `lean:<db>:to:<instance>`: requests for the runs it owns, and the answers to
  the requests it made; and, for a run it resumes for a client of its own from another
  instance, that run's events (`lean.resume_remote`), and the `Stop` of such a reader.
  Pub/sub, not streams: a request is useful to the live owner now or never (a dead
  owner's runs are over), and every request gets an answer or a 503 within
  `ROUTE_TIMEOUT`, so nothing needs to wait in Redis to be read later.

Round trips: with `cluster_max_streams`, a stream's admission awaits one script (sum the
live instances' slots, take one if below); without, none. A run's start and end write
one command each (SADD/SREM; HINCRBY when counting) without waiting; nothing per chunk.
The lease is renewed by one script every `lease / 3`, which also sets this instance's
slot count to the truth, so a count gone wrong (a reply lost with a connection, an
admission whose request then failed) is right again within a renewal.

Redis down (or not answering within `CALL_TIMEOUT`): runs go on; new streams are admitted
by `[limits] max_streams` alone (the cluster bound is not enforced); a request for a run
this instance does not have answers 503 `cluster_unavailable`; lean reconnects every
`RECONNECT_MAX` at most and registers what it owns again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
from collections.abc import Awaitable, Callable

from lean.cluster_messages import ClusterMessages
from lean.cluster_wire import (
    ADMIT,
    BEAT,
    LAPSED,
    MINE,
    OTHER,
    REAP,
    Answer,
    Ask,
    Deliver,
    End,
    Event,
    Stop,
    sha,
)
from lean.config import ClusterConfig
from lean.errors import Overloaded, clip
from lean.redis_client import RedisConnection, parse_redis_url
from lean.resp import Reply, ReplyError

log = logging.getLogger("lean.cluster")


PREFIX = "lean:"
CONNECT_TIMEOUT = 1.0  # seconds to connect (and AUTH, SELECT) before trying again
CALL_TIMEOUT = 0.5  # seconds an admission waits for Redis before admitting without it
RECONNECT_MIN, RECONNECT_MAX = 0.1, 1.0  # seconds between attempts, doubling


class Cluster(ClusterMessages):
    """This instance's link to the others; every method is a no-op without `redis_url`."""

    def __init__(
        self,
        config: ClusterConfig,
        *,
        max_streams: int,
        streams: Callable[[], int],
        runs: Callable[[], list[str]],
    ) -> None:
        self.enabled = config.redis_url is not None
        self._address = parse_redis_url(config.redis_url) if config.redis_url else None
        self.instance = config.instance
        self._lease = config.lease
        self.max_streams = max_streams  # 0: the cluster's streams are not counted
        self._streams = streams  # how many streams this instance relays now
        self._runs = runs  # the ids of the scene runs it owns now
        db = self._address.db if self._address else 0
        self._channels = f"{PREFIX}{db}:to:"  # pub/sub spans databases: the number tells
        self.deliver: Deliver | None = None  # set by the app: answers requests for our runs
        # Set by the services: ends a dead instance's cut answers in the store (REAP).
        self.on_dead: Callable[[str], Awaitable[None]] | None = None
        # Called once connected (again), before any other command: lean.client_limits
        # writes its counts there (Redis may have restarted empty).
        self.on_join: list[Callable[[], None]] = []
        self._reaping: set[asyncio.Task[None]] = set()
        # Resumes across instances (lean.resume_remote), set by the app: the owner's side
        # (a resume asked of one of our runs -> status, body; a reader that left) ...
        self.serve: Callable[[Ask], tuple[int, bytes]] | None = None
        self.stopped: Callable[[Stop], None] | None = None
        # ... and the reader's: our resumes of other instances' runs, by ask id.
        self._feeds: dict[int, Callable[[Event | End], None]] = {}
        self._conn: RedisConnection | None = None  # commands; None while Redis is down
        self._sub: RedisConnection | None = None  # subscribed to our channel
        self._subscribed: asyncio.Event | None = None
        self._reserved = 0  # admitted streams already counted in Redis, not started yet
        self._generation = 0  # renewals so far: an admission across one is not reserved
        self._asks: dict[int, asyncio.Future[Answer]] = {}
        self._ask_ids = random.randrange(1 << 40)  # a restart's ids do not meet old answers
        self._token = secrets.token_hex(8)  # this process's mark on its lease
        self._task: asyncio.Task[None] | None = None

    @property
    def lease(self) -> float:
        return self._lease

    @property
    def up(self) -> bool:
        return self._conn is not None and self._conn.is_open

    # --- life ---

    def start(self) -> None:
        if self.enabled:
            self._task = asyncio.get_running_loop().create_task(self._keep(), name="lean-cluster")

    async def close(self) -> None:
        """Leave: our runs and slots are forgotten now, not a lease later."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for task in list(self._reaping):  # its lock lapses: another instance ends the rows
            task.cancel()
        conn = self._conn
        if conn is not None and conn.is_open:
            me = self.instance
            with contextlib.suppress(ConnectionError, ReplyError, TimeoutError):
                async with asyncio.timeout(CALL_TIMEOUT):
                    conn.send("HDEL", PREFIX + "slots", me)
                    conn.send("SREM", PREFIX + "instances", me)
                    conn.send("DEL", f"{PREFIX}runs:{me}")
                    await conn.call("DEL", f"{PREFIX}live:{me}")
        self._down()

    async def _keep(self) -> None:
        """Connect, renew the lease until the connection is lost, and again."""
        delay = RECONNECT_MIN
        was_up = True  # the first failure is logged too
        while True:
            try:
                await self._connect()
            except (OSError, ConnectionError, ReplyError, TimeoutError) as exc:
                self._down()
                if was_up:
                    log.warning(
                        "cluster: Redis unreachable (%s); running alone: cluster_max_streams "
                        "not enforced, other instances' runs answer 503; retrying",
                        exc or type(exc).__name__,
                    )
                was_up = False
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX)
                continue
            assert self._address is not None
            log.info("cluster: %s joined %s", self.instance, self._address.shown)
            was_up, delay = True, RECONNECT_MIN
            try:
                await self._renew_until_lost()
            except (ConnectionError, ReplyError, TimeoutError) as exc:
                log.warning("cluster: Redis lost (%s); reconnecting", exc or type(exc).__name__)
            else:
                log.warning("cluster: Redis connection closed; reconnecting")
            self._down()

    async def _connect(self) -> None:
        assert self._address is not None
        self._subscribed = subscribed = asyncio.Event()
        sub = await RedisConnection.open(
            self._address, timeout=CONNECT_TIMEOUT, on_push=self._pushed
        )
        self._sub = sub
        conn = await RedisConnection.open(self._address, timeout=CONNECT_TIMEOUT)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                sub.send("SUBSCRIBE", self._channels + self.instance)
                await subscribed.wait()
                held = await self._beat(conn, sync=True)
        except BaseException:
            conn.close()
            raise
        if held == OTHER:
            log.warning(
                "cluster: another process held the lease of %s: a restart within the lease, "
                "or two instances with that name ([cluster] instance must differ)",
                self.instance,
            )
        self._conn = conn
        for joined in self.on_join:
            joined()
        await self._reap(conn)

    async def _renew_until_lost(self) -> None:
        conn, sub = self._conn, self._sub
        assert conn is not None and sub is not None
        while True:
            lost, _ = await asyncio.wait(
                (conn.closed, sub.closed),
                timeout=self._lease / 3,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if lost:
                return
            # A renewal that lands within 2/3 of the lease after the last one keeps it; a
            # Redis that takes longer is taken for gone (and the lease would lapse anyway).
            async with asyncio.timeout(self._lease * 2 / 3):
                held = await self._beat(conn, sync=False)
                if held == OTHER:
                    log.error(
                        "cluster: another instance renews the lease of %s: two instances "
                        "share that name; [cluster] instance must differ",
                        self.instance,
                    )
                if held != MINE:
                    if held == LAPSED:
                        log.warning(
                            "cluster: %s's lease had lapsed; registering again", self.instance
                        )
                    await self._beat(conn, sync=True)
                    for joined in self.on_join:
                        joined()
                await self._reap(conn)

    async def _reap(self, conn: RedisConnection) -> None:
        """End the cut answers of the instances found dead since the last look (one
        instance does it for each: REAP), without holding up the renewal."""
        if self.on_dead is None:
            return
        sweep = str(round(max(self._lease * 3, 10.0) * 1000))  # ms the lock holds
        dead = await self._script(conn, REAP, sweep)
        for name in dead if isinstance(dead, list) else ():
            if not isinstance(name, bytes):
                continue
            task = asyncio.get_running_loop().create_task(self._sweep(name.decode()))
            self._reaping.add(task)
            task.add_done_callback(self._reaping.discard)

    async def _sweep(self, name: str) -> None:
        assert self.on_dead is not None
        try:
            await self.on_dead(name)
        except Exception as exc:  # the lock lapses and the next look tries again
            log.warning("cluster: ending the cut answers of %s failed: %s", clip(name), exc)
            return
        log.warning("cluster: %s is gone (its lease lapsed); its cut answers are incomplete", name)
        self._send("SREM", PREFIX + "dead", name)

    async def _beat(self, conn: RedisConnection, *, sync: bool) -> Reply:
        """Renew the lease (and set our slot count; with `sync`, our runs): who held it
        (LAPSED, MINE or OTHER)."""
        slots = ""
        if self.max_streams:
            slots = str(self._streams())
            self._generation += 1  # admissions in flight are counted by `slots` or after
            self._reserved = 0
        lease = str(round(self._lease * 1000))
        args: list[str] = [self._token, lease, slots, "sync" if sync else "renew"]
        if sync:
            args += self._runs()
        return await self._script(conn, BEAT, *args)

    def _down(self) -> None:
        conn, sub, self._conn, self._sub = self._conn, self._sub, None, None
        for c in (conn, sub):
            if c is not None:
                c.close()
        self._reserved = 0
        for future in self._asks.values():
            if not future.done():
                future.set_exception(ConnectionError("redis: connection lost"))
        for ask_id, feed in list(self._feeds.items()):  # their events may be lost: end them
            feed(End(ask_id))

    async def _script(self, conn: RedisConnection, script: str, *args: str | bytes) -> Reply:
        """Run one of the scripts above; loaded by its source when Redis lost it (restart)."""
        try:
            return await conn.call("EVALSHA", sha(script), 0, PREFIX, self.instance, *args)
        except ReplyError as exc:
            if exc.kind != "NOSCRIPT":
                raise
        return await conn.call("EVAL", script, 0, PREFIX, self.instance, *args)

    async def call(self, script: str, *args: str | bytes) -> Reply:
        """Run `script` (lean.client_limits'; ARGV[1] the prefix, ARGV[2] this instance)
        within CALL_TIMEOUT. ConnectionError while Redis is down; a Redis that fails or
        does not answer in time is reconnected, and the error raised."""
        conn = self._conn
        if conn is None or not conn.is_open:
            raise ConnectionError("redis: not connected")
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                return await self._script(conn, script, *args)
        except (ConnectionError, ReplyError, TimeoutError):
            conn.close()
            raise

    def send(self, *commands: tuple[str | int | bytes, ...]) -> None:
        """Commands written in one go without waiting (dropped while Redis is down)."""
        conn = self._conn
        if conn is not None and commands:
            with contextlib.suppress(ConnectionError):
                conn.send_all(*commands)

    def _send(self, *args: str | int | bytes) -> None:
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(ConnectionError):  # counted again at the reconnect
                conn.send(*args)

    # --- streams and runs (called by lean.limits and lean.services) ---

    async def admit(self) -> None:
        """Take one of the cluster's slots, or raise `Overloaded` past cluster_max_streams.
        Admits without counting while Redis is down or slow."""
        conn = self._conn
        if not self.max_streams or conn is None or not conn.is_open:
            return
        generation = self._generation
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                total = await self._script(conn, ADMIT, str(self.max_streams))
        except (ConnectionError, ReplyError, TimeoutError) as exc:
            log.warning("cluster: admission without Redis (%s)", exc or type(exc).__name__)
            conn.close()  # a Redis that does not answer is reconnected, not waited for
            return
        if total == -1:
            raise Overloaded(
                f"the cluster is relaying its limit of {self.max_streams} streams; retry shortly",
                retry_after=1,
            )
        if generation == self._generation:  # else the renewal's count left it out
            self._reserved += 1

    def stream_started(self) -> None:
        if self._reserved:
            self._reserved -= 1  # counted by its admission
        elif self.max_streams:
            self._send("HINCRBY", PREFIX + "slots", self.instance, 1)

    def stream_ended(self) -> None:
        if self.max_streams:
            self._send("HINCRBY", PREFIX + "slots", self.instance, -1)

    def run_owned(self, run_id: str) -> None:
        self._send("SADD", f"{PREFIX}runs:{self.instance}", run_id)

    def run_ended(self, run_id: str) -> None:
        self._send("SREM", f"{PREFIX}runs:{self.instance}", run_id)

    # --- requests for runs on other instances ---
