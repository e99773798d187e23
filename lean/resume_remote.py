"""Resuming a run that runs on another instance (docs/protocol.md §7, "Resuming on another
instance"): both sides of it.

The reader's instance (the one the client reconnected to) does not have the run. It asks
the run's owner through Redis (`Cluster.route`, a `resume` request with the cursor), as a
cancel is asked. The owner checks the client, opens an ordinary `Subscription` on its own
buffer (so the cursor, the restart rule and the end are exactly a local resume's), answers
200, and publishes each of the subscription's events to the reader instance's channel,
awaiting each PUBLISH: its count of receivers says whether the reader is still there. The
reader's instance queues them for its client's `pump`. Redis carries a run's events only
while a reader on another instance follows it: a run nobody resumes elsewhere sends
nothing per event.

Pub/sub over one connection each way keeps the events in order and loses none while the
connections hold; when either is lost the reader's stream ends without its last event and
the client resumes again from its cursor (nothing repeated or missing). Heartbeats every
third of a lease tell a silent owner (a run waiting for a tool) from a dead one: a reader
that hears nothing for a lease ends its stream the same way.

No live instance owns the run (its owner died and its lease ran out): the saved answer is
served, as `incomplete` while its row still says `streaming` (the sweep of a dead
instance's rows marks it so within a lease). Redis unreachable: 503 `cluster_unavailable`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Awaitable, Callable

import msgspec

from lean.clients import Client
from lean.cluster import Cluster
from lean.cluster_wire import Ask, End, Event, RunRequest, Stop
from lean.config_clients import DEFAULT_CLIENT
from lean.encoders.chat import error_response
from lean.errors import BadRequest, LeanError, NotFound, clip
from lean.messages import MessageRecord
from lean.replay import Item
from lean.resp import ReplyError
from lean.resume import Subscription, saved_events
from lean.services import Services

__all__ = ["Feeds", "RemoteSubscription", "reader", "refused"]

PUBLISH_TIMEOUT = 1.0  # seconds an owner waits for Redis to take one event


async def _nothing() -> list[Item]:
    return []


class RemoteSubscription(Subscription):
    """The events of a run on another instance, as the owner publishes them. Ends after
    the owner's `End`, when the connection to Redis is lost, when the owner is silent for
    `silence` seconds, or when more than `limit` bytes wait for a client that does not
    read (the client then resumes from its cursor)."""

    def __init__(self, cluster: Cluster, after: int, *, silence: float, limit: int) -> None:
        super().__init__(None, after, _nothing)
        self._cluster = cluster
        self._silence = silence
        self._limit = limit
        self._queue: collections.deque[Item] = collections.deque()
        self._queued = 0  # bytes of the events waiting
        self._over = False  # nothing more will come
        self._wake = asyncio.Event()
        self._ask: int | None = None  # set once the owner accepted
        self._owner = ""
        self._ended = False  # the owner (or the lost connection) ended the feed

    def accepted(self, ask: int, owner: str) -> None:
        self._ask, self._owner = ask, owner

    def push(self, message: Event | End) -> None:
        """One message of the owner's for this resume (`Cluster` calls it)."""
        if isinstance(message, End):
            self._over = self._ended = True
        elif message.seq and not self._over:
            payload = bytes(message.payload)
            self._queue.append((message.seq, message.name, payload))
            self._queued += len(payload)
            if self._queued > self._limit and len(self._queue) > 1:
                self._over = True  # the client reads slower than the run: it resumes later
        self._wake.set()  # a heartbeat (seq 0) too: the owner is alive

    async def __anext__(self) -> Item:
        while not self._queue:
            if self._over:
                self.close()
                raise StopAsyncIteration
            self._wake.clear()
            try:
                async with asyncio.timeout(self._silence):
                    await self._wake.wait()
            except TimeoutError:
                self._over = True  # no heartbeat for a lease: the owner is gone
        item = self._queue.popleft()
        self._queued -= len(item[2])
        return item

    def close(self) -> None:
        ask, self._ask = self._ask, None
        if ask is not None:
            self._cluster.unfeed(ask)
            if not self._ended:  # the client left (or fell behind): the owner stops feeding
                self._cluster.send_to(self._owner, Stop(ask, self._cluster.instance))
        self._over = True
        super().close()


Remote = Callable[[str, int, Client, MessageRecord | None], Awaitable[Subscription]]


def reader(services: Services) -> Remote:
    """The reader instance's side: `Replays.remote`, called for a run not buffered here
    whose saved row (`record`, the client's own, if any) is absent or still `streaming`."""
    cluster = services.cluster
    limit = max(services.config.limits.resume_buffer_kb * 1024, 64 * 1024)

    async def resume(
        run_id: str, after: int, client: Client, record: MessageRecord | None
    ) -> Subscription:
        subscription = RemoteSubscription(cluster, after, silence=cluster.lease, limit=limit)
        request = RunRequest("resume", run_id, client.name, after=after)
        try:
            status, body = await cluster.route(request, subscription.push)
        except NotFound:  # no live instance owns the run
            return await _owner_gone(services, run_id, after, client, record)
        if status == 204:
            subscription.empty = True
            return subscription
        if status != 200:
            raise refused(status, body)
        accepted = msgspec.json.decode(body, type=dict[str, int | str])
        ask, owner = accepted["id"], accepted["instance"]
        assert isinstance(ask, int) and isinstance(owner, str)
        subscription.accepted(ask, owner)
        return subscription

    return resume


async def _owner_gone(
    services: Services, run_id: str, after: int, client: Client, record: MessageRecord | None
) -> Subscription:
    """No live instance owns the run: the saved answer. Read again, as the run may have
    just ended (its final save comes before it leaves the registry). A row still
    `streaming` is a dead instance's answer, cut where its last flush left it: served as
    `incomplete`, which the sweep of that instance's rows will make it."""
    if record is not None:
        record = await services.store.run_answer(run_id, client.owner)
    if record is None:
        raise NotFound(f"run '{clip(run_id)}' does not exist")
    if record.status == "streaming":
        record = msgspec.structs.replace(record, status="incomplete")
    return Subscription(None, after, _nothing, saved_events(record))


def refused(status: int, body: bytes) -> LeanError:
    """The owner's refusal (an error status and its JSON body), raised here as the same
    error."""
    try:
        error = msgspec.json.decode(body)["error"]
        message, code = str(error["message"]), str(error["code"])
    except (msgspec.DecodeError, KeyError, TypeError):
        message, code = "the run's instance refused the request", "internal"
    if status == 404:
        return NotFound(message)
    if status == 400:
        return BadRequest(message)
    other = LeanError(message)
    other.status, other.code = status, code
    return other


class Feeds:
    """The owner's side: the resumes other instances asked of this instance's runs, each a
    task publishing one subscription's events to the reader's instance."""

    def __init__(self, services: Services) -> None:
        self._services = services
        self._tasks: dict[tuple[str, int], asyncio.Task[None]] = {}

    def __len__(self) -> int:
        return len(self._tasks)

    def serve(self, ask: Ask) -> tuple[int, bytes]:
        """`Cluster.serve`: answer a resume of one of our runs, and start its feed."""
        services, request = self._services, ask.request
        try:
            owner = None if request.client == DEFAULT_CLIENT else request.client
            subscription = services.replays.here(
                request.run_id, request.after, request.client, owner
            )
            if subscription is None:
                shown = clip(request.run_id)
                if services.runs.get(request.run_id, request.client) is not None:
                    raise NotFound(f"run '{shown}' is running but cannot be resumed")
                raise NotFound(f"run '{shown}' does not exist")
        except LeanError as exc:
            response = error_response(exc)
            assert isinstance(response.body, bytes)
            return response.status, response.body
        if subscription.empty:
            subscription.close()
            return 204, b""
        key = (ask.sender, ask.id)
        self._tasks[key] = asyncio.get_running_loop().create_task(self._feed(ask, subscription))
        return 200, msgspec.json.encode({"id": ask.id, "instance": services.cluster.instance})

    def stopped(self, stop: Stop) -> None:
        """`Cluster.stopped`: the reader left."""
        task = self._tasks.get((stop.sender, stop.id))
        if task is not None:
            task.cancel()

    async def _feed(self, ask: Ask, subscription: Subscription) -> None:
        cluster, sender = self._services.cluster, ask.sender
        beats = asyncio.get_running_loop().create_task(self._beat(ask))
        try:
            async for seq, name, payload in subscription:
                event = Event(ask.id, seq, name, msgspec.Raw(payload))
                async with asyncio.timeout(PUBLISH_TIMEOUT):
                    if not await cluster.publish(sender, event):
                        return  # the reader's instance is gone
            async with asyncio.timeout(PUBLISH_TIMEOUT):
                await cluster.publish(sender, End(ask.id))
        except (ConnectionError, ReplyError, TimeoutError):
            pass  # the reader's stream ends without its last event; its client resumes
        finally:
            subscription.close()
            beats.cancel()
            self._tasks.pop((sender, ask.id), None)

    async def _beat(self, ask: Ask) -> None:
        """A heartbeat every third of a lease; a reader instance gone stops the feed."""
        cluster = self._services.cluster
        heartbeat = Event(ask.id, 0, "", msgspec.Raw(b"null"))
        with contextlib.suppress(ConnectionError, ReplyError, TimeoutError):
            while True:
                await asyncio.sleep(cluster.lease / 3)
                async with asyncio.timeout(PUBLISH_TIMEOUT):
                    if not await cluster.publish(ask.sender, heartbeat):
                        break
        task = self._tasks.get((ask.sender, ask.id))
        if task is not None:
            task.cancel()

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
