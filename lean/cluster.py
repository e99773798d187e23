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

import msgspec

from lean.cluster_wire import (
    ADMIT,
    BEAT,
    LAPSED,
    MINE,
    OTHER,
    REAP,
    ROUTE,
    Answer,
    Ask,
    Deliver,
    End,
    Event,
    RunRequest,
    Stop,
    decode,
    encode,
    sha,
)
from lean.config import ClusterConfig
from lean.errors import ClusterUnavailable, NotFound, Overloaded, clip
from lean.redis_client import RedisConnection, parse_redis_url
from lean.resp import Reply, ReplyError

log = logging.getLogger("lean.cluster")


def answer_status(future: asyncio.Future[Answer]) -> int | None:
    """The status of an answer that came, else None."""
    if not future.done() or future.cancelled() or future.exception() is not None:
        return None
    return future.result().status


PREFIX = "lean:"
CONNECT_TIMEOUT = 1.0  # seconds to connect (and AUTH, SELECT) before trying again
CALL_TIMEOUT = 0.5  # seconds an admission waits for Redis before admitting without it
ROUTE_TIMEOUT = 1.0  # a cancel reaches its run within 1 s (docs/protocol.md §3), routed too
RECONNECT_MIN, RECONNECT_MAX = 0.1, 1.0  # seconds between attempts, doubling
MAX_ASKS = 1024  # requests to other instances awaiting an answer at once; past it, 503


class Cluster:
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

    async def route(
        self, request: RunRequest, feed: Callable[[Event | End], None] | None = None
    ) -> tuple[int, bytes]:
        """`request` answered by the instance that owns its run: (HTTP status, body).
        NotFound when no live instance owns it; ClusterUnavailable when that cannot be known
        or the owner does not answer within ROUTE_TIMEOUT. A resume's `feed` gets the
        events that follow a 200, until an `End` (also when the connection is lost)."""
        shown = clip(request.run_id)
        if not self.enabled:
            raise NotFound(f"run '{shown}' is not running")
        conn = self._conn
        unreachable = f"run '{shown}' is not on this instance and Redis cannot be reached"
        if conn is None or not conn.is_open:
            raise ClusterUnavailable(unreachable, retry_after=1)
        if len(self._asks) >= MAX_ASKS:
            raise ClusterUnavailable("too many requests to other instances", retry_after=1)
        self._ask_ids += 1
        ask_id = self._ask_ids
        returned = 0  # the answer's status, once route returns it
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._asks[ask_id] = future
        if feed is not None:  # before asking: the events may follow the answer at once
            self._feeds[ask_id] = feed
        message = encode(Ask(ask_id, self.instance, request))
        try:
            async with asyncio.timeout(ROUTE_TIMEOUT):
                received = await self._script(conn, ROUTE, self._channels, request.run_id, message)
                if received == -1:
                    raise NotFound(f"run '{shown}' is not running")
                if received == 0:
                    raise ClusterUnavailable(
                        f"the instance that owns run '{shown}' is not listening", retry_after=1
                    )
                answer = await future
                returned = answer.status
        except TimeoutError:
            raise ClusterUnavailable(
                f"the instance that owns run '{shown}' did not answer within 1 s", retry_after=1
            ) from None
        except (ConnectionError, ReplyError):
            raise ClusterUnavailable(unreachable, retry_after=1) from None
        finally:
            del self._asks[ask_id]
            if returned != 200:
                self._feeds.pop(ask_id, None)
                if answer_status(future) == 200:  # a resume accepted for an asker now gone
                    self._abandon(ask_id, future.result())
        return answer.status, bytes(answer.body)

    def _abandon(self, ask_id: int, answer: Answer) -> None:
        """Stop the feed of an accepted resume whose asker left before it was told."""
        with contextlib.suppress(msgspec.DecodeError, KeyError, TypeError):
            owner = msgspec.json.decode(answer.body)["instance"]
            self.send_to(str(owner), Stop(ask_id, self.instance))

    def unfeed(self, ask_id: int) -> None:
        self._feeds.pop(ask_id, None)

    def send_to(self, instance: str, message: Stop | End) -> None:
        self._send("PUBLISH", self._channels + instance, encode(message))

    async def publish(self, instance: str, message: Event | End) -> int:
        """`message` published to `instance`'s channel: how many received it (0: gone).
        Raises ConnectionError while Redis is down."""
        conn = self._conn
        if conn is None or not conn.is_open:
            raise ConnectionError("redis: not connected")
        received = await conn.call("PUBLISH", self._channels + instance, encode(message))
        assert isinstance(received, int)
        return received

    def _pushed(self, reply: Reply) -> None:
        """One reply on the subscribed connection: a subscription, a request, an answer."""
        if not isinstance(reply, list) or len(reply) != 3:
            return
        kind, _, data = reply
        if kind == b"subscribe":
            if self._subscribed is not None:
                self._subscribed.set()
            return
        if kind != b"message" or not isinstance(data, bytes):
            return
        try:
            message = decode(data)
        except msgspec.DecodeError:
            log.warning("cluster: a message lean cannot read on %s's channel", self.instance)
            return
        if isinstance(message, Answer):
            future = self._asks.get(message.id)
            if future is not None and not future.done():
                future.set_result(message)
            return
        if isinstance(message, (Event, End)):
            feed = self._feeds.get(message.id)
            if feed is not None:
                feed(message)
            return
        if isinstance(message, Stop):
            if self.stopped is not None:
                self.stopped(message)
            return
        if self.deliver is None or self.serve is None:
            raise RuntimeError("Cluster.deliver and Cluster.serve are not set")
        try:
            if message.request.op == "resume":
                status, body = self.serve(message)
            else:
                status, body = self.deliver(message.request)
        except Exception:  # a bug: the asker gets a 500 now rather than a 503 in a second
            log.exception("cluster: answering %s failed", message.sender)
            status, body = 500, b'{"error":{"message":"internal error","code":"internal"}}'
        answer = encode(Answer(message.id, status, msgspec.Raw(body)))
        self._send("PUBLISH", self._channels + message.sender, answer)
