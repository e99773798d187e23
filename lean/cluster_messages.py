"""What instances say to each other through Redis (docs/protocol.md §7): a request for a run
another instance owns (a cancel, a tool result, a resume) and its answer, a resume's events,
and the messages that stop or end one. `Cluster` (lean.cluster) holds the connections and the
lease; this is its messaging half, on its subscribed channel."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import msgspec

from lean.cluster_wire import (
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
)
from lean.errors import ClusterUnavailable, NotFound, clip
from lean.redis_client import RedisConnection
from lean.resp import Reply, ReplyError

__all__ = ["MAX_ASKS", "ROUTE_TIMEOUT", "ClusterMessages", "answer_status"]

log = logging.getLogger("lean.cluster")

ROUTE_TIMEOUT = 1.0  # a cancel reaches its run within 1 s (docs/protocol.md §3), routed too
MAX_ASKS = 1024  # requests to other instances awaiting an answer at once; past it, 503


def answer_status(future: asyncio.Future[Answer]) -> int | None:
    """The status of an answer that came, else None."""
    if not future.done() or future.cancelled() or future.exception() is not None:
        return None
    return future.result().status


class ClusterMessages:
    # Set by `Cluster.__init__` (lean.cluster).
    enabled: bool
    instance: str
    deliver: Deliver | None
    serve: Callable[[Ask], tuple[int, bytes]] | None
    stopped: Callable[[Stop], None] | None
    _conn: RedisConnection | None
    _channels: str
    _subscribed: asyncio.Event | None
    _asks: dict[int, asyncio.Future[Answer]]
    _ask_ids: int
    _feeds: dict[int, Callable[[Event | End], None]]

    async def _script(self, conn: RedisConnection, script: str, *args: str | bytes) -> Reply:
        raise NotImplementedError  # Cluster's

    def _send(self, *args: str | int | bytes) -> None:
        raise NotImplementedError  # Cluster's

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
