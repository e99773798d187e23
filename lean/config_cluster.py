"""The [cluster] section: who this lean is among several sharing a store, and the Redis they
share (docs/protocol.md §4, §7).

Several lean processes may serve one set of conversations: on one host, sharing the port
(`[server] reuse_port`) or one port each behind nginx, and on several hosts sharing a store.
Each needs a name of its own that stays the same across its restarts: its answers' rows carry
it, so the start-up sweep that ends answers cut by a crash touches only its own rows, never
the answers another instance is streaming; and with Redis, its lease, its runs and its channel
are keyed by it. The name defaults to "<host name>:<port>", which is unique unless instances
share a port: then it must be given (`[cluster] instance`, or `lean serve --instance`, one
config file for every unit of a systemd template).

Without `redis_url` nothing is shared but the store. With it, every instance registers the
runs it owns and its streams in Redis under a lease (`lean.cluster`), and `[limits]
cluster_max_streams` may bound the streams of all instances together.
"""

import re
import socket
from collections.abc import Mapping
from typing import Any

import msgspec

from lean.config_keys import ConfigError
from lean.redis_client import parse_redis_url

__all__ = ["INSTANCE", "ClusterConfig", "cluster_config"]

# A host name and port, a systemd instance (%i), "web-1": short, printable, no spaces or
# quotes, so it can go in logs, metrics labels, Redis keys and channels, and SQL as it is.
INSTANCE = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")
_EXPECTED = "a name of up to 128 letters, digits or _ . : @ -, e.g. web-1"


class ClusterConfig(msgspec.Struct, frozen=True, kw_only=True):
    instance: str  # this process among the instances sharing a store: "<hostname>:<port>"
    redis_url: str | None = None  # redis://[[user]:password@]host[:port][/db]; None: alone
    # Seconds after which an instance that stopped renewing its lease counts as dead: its
    # runs are forgotten and its stream slots free. Renewed every third of it.
    lease: float = 10.0


def cluster_config(
    values: Mapping[str, Any],
    port: int,
    reuse_port: bool,
    cluster_max_streams: int = 0,
    instance: str | None = None,
) -> ClusterConfig:
    """The [cluster] section's Struct, checked; `instance` (from `lean serve --instance`)
    wins over the file's. `port` and `reuse_port` are [server]'s, for the default name;
    `cluster_max_streams` is [limits]', which needs `redis_url`."""
    name = instance if instance is not None else values.get("instance")
    if name is None:
        if reuse_port:
            # Every process on the port would default to the same name: each one's start-up
            # would end the others' running answers, and they would share one Redis lease.
            raise ConfigError(
                "cluster", "instance", "a name for each lean sharing the port (reuse_port = true)"
            )
        name = f"{socket.gethostname()}:{port}"
    if not INSTANCE.fullmatch(name):
        raise ConfigError("cluster", "instance", _EXPECTED, name)
    redis_url = values.get("redis_url") or None
    if redis_url is not None:
        try:
            parse_redis_url(redis_url)
        except ValueError as exc:
            # The URL may hold a password: never echoed.
            raise ConfigError("cluster", "redis_url", str(exc)) from None
    if cluster_max_streams and redis_url is None:
        raise ConfigError(
            "limits", "cluster_max_streams", "[cluster] redis_url set (the count lives in Redis)"
        )
    if "lease" in values:
        return ClusterConfig(instance=name, redis_url=redis_url, lease=values["lease"])
    return ClusterConfig(instance=name, redis_url=redis_url)
