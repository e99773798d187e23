"""What every request and run shares, built once per app, and the registry of running runs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from lean.client_limits import RedisLimiter
from lean.clients import Client, Clients
from lean.cluster import Cluster
from lean.config import Config, ConfigError
from lean.limits import Streams
from lean.metrics import Metrics
from lean.progress import Progress
from lean.resume import Replays
from lean.store import Store, StoreError
from lean.tools import Tools
from lean.upkeep import Upkeep
from lean.upstream import Upstream

if TYPE_CHECKING:
    from lean.run import Run


class Runs:
    """Running scene runs by id, for cancel and tool-result requests. A run is found only by
    the client that started it: to any other, it does not exist (404, not 403). Registered
    with the cluster, so that other instances can route such requests here (the owner checks
    the client as well: lean.scene_handlers)."""

    def __init__(self, cluster: Cluster) -> None:
        self._runs: dict[str, Run] = {}
        self._cluster = cluster

    def __len__(self) -> int:
        return len(self._runs)

    def get(self, run_id: str, client: Client | str) -> Run | None:
        """The run, if `client` (or the client of that name, for a request another instance
        routed here) started it."""
        name = client if isinstance(client, str) else client.name
        run = self._runs.get(run_id)
        return run if run is not None and run.client.name == name else None

    def __contains__(self, run_id: str) -> bool:
        """Whether a run of that id is running, whoever started it (ids are unique)."""
        return run_id in self._runs

    def of_conversation(self, conversation_id: str, scene: str, client: Client) -> Run | None:
        """The newest running run of a conversation in `scene` started by `client` (`useChat`'s
        resume route; another client's is not found). A scan of the running runs: only resume
        requests ask, and they are rare."""
        for run in reversed(self._runs.values()):
            if (
                run.conversation_id == conversation_id
                and run.scene.name == scene
                and run.client.name == client.name
            ):
                return run
        return None

    def add(self, run: Run) -> None:
        if run.run_id in self._runs:
            raise RuntimeError(f"run id {run.run_id} is already running")
        self._runs[run.run_id] = run
        self._cluster.run_owned(run.run_id)

    def discard(self, run: Run) -> None:
        if self._runs.get(run.run_id) is run:
            del self._runs[run.run_id]
            self._cluster.run_ended(run.run_id)

    def ids(self) -> list[str]:
        return list(self._runs)


class Services:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.upstream = Upstream(config)
        self.metrics = Metrics()
        try:
            where = config.store.url or config.store.path
            self.store = Store(
                where, instance=config.cluster.instance, on_failure=self.metrics.store_failed
            )
        except StoreError as exc:  # a url, and no driver installed
            raise ConfigError("store", "url", str(exc)) from None
        self.progress = Progress(self.store, config.store.flush_interval)
        self.cluster = Cluster(
            config.cluster,
            max_streams=config.limits.cluster_max_streams,
            streams=lambda: len(self.streams),
            runs=lambda: self.runs.ids(),
        )
        # A dead instance's cut answers: ended by one live instance (docs/protocol.md §7).
        self.cluster.on_dead = self.store.end_streaming
        self.streams = Streams(config.limits.max_streams, self.metrics, self.cluster)
        # Clients' limits: counted across instances in Redis with redis_url, else here.
        shared = self.cluster.enabled
        limiter = RedisLimiter(self.cluster, config.clients.values()) if shared else None
        self.clients = Clients(config, self.metrics, limiter)
        # Imports python tools: a bad path stops start-up.
        self.tools = Tools(config.tools, threads=config.limits.tool_threads, metrics=self.metrics)
        self.runs = Runs(self.cluster)
        limits = config.limits
        self.replays = Replays(
            buffer_bytes=limits.resume_buffer_kb * 1024,
            ttl=limits.resume_ttl,
            find=self.store.run_answer,
        )
        self.upkeep = Upkeep(self.metrics, lambda: len(self.streams))
        self.upkeep.chores.append(self.replays.sweep)  # finished buffers past their ttl
        self.metrics.gauges += [
            (
                "lean_tool_threads_busy",
                "Tool threads running a sync tool call, including calls past their timeout.",
                lambda: self.tools.busy,
            ),
            (
                "lean_whole_answer_bytes",
                "Bytes of whole (non-streaming) answers held now; bounded by fallback_budget_mb.",
                lambda: self.upstream.budget.held,
            ),
            (
                "lean_cluster_up",
                "1 while this instance reaches the cluster's Redis ([cluster] redis_url).",
                lambda: 1 if self.cluster.up else 0,
            ),
            (
                "lean_resume_buffers",
                "Runs whose recent events lean keeps for a resume, running and finished.",
                lambda: len(self.replays),
            ),
            (
                "lean_resume_finished_bytes",
                "Bytes the buffers of finished runs hold; bounded (lean.resume.FINISHED_BYTES).",
                lambda: self.replays.finished_bytes,
            ),
        ]
        if limiter is not None:
            self.metrics.gauges.append(
                (
                    "lean_client_limits_shared",
                    "1 while clients' limits are counted in Redis across instances; 0 while "
                    "Redis is unreachable and this instance counts its own.",
                    lambda: 1 if limiter.shared and self.cluster.up else 0,
                )
            )
        self.sockets: set[web.WebSocketResponse] = set()  # closed with 1001 on shutdown

    async def start(self) -> None:
        backend = self.store.backend
        fatal: tuple[type[Exception], ...] = (OSError, StoreError, *backend.errors)
        try:
            await self.store.open()
        except fatal as exc:
            reason = str(exc).partition("\n")[0]
            raise ConfigError(
                "store", backend.key, f"{backend.expected} ({reason})", backend.shown
            ) from None
        self.progress.start()
        await self.upstream.start()
        await self.tools.start()
        self.upkeep.start()
        self.cluster.start()

    async def close(self) -> None:
        await self.cluster.close()
        await self.upkeep.close()
        await self.upstream.close()
        await self.tools.close()
        await self.progress.close()
        await self.store.close()  # every pending write is flushed
