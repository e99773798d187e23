"""The `[cluster]` section (docs/protocol.md §7): several lean instances sharing Redis.

Without `redis_url` lean is one instance and nothing here is used. With it, every
instance registers the runs it owns and its streams in Redis under a lease (`lean.cluster`),
and `[limits] cluster_max_streams` may bound the streams of all instances together.
"""

from __future__ import annotations

import socket
from typing import Any

import msgspec

from lean.config_keys import ConfigError
from lean.redis_client import parse_redis_url


class ClusterConfig(msgspec.Struct, frozen=True, kw_only=True):
    instance: str  # this instance's name among the others; default "<hostname>:<port>"
    redis_url: str | None = None  # redis://[[user]:password@]host[:port][/db]; None: alone
    # Seconds after which an instance that stopped renewing its lease counts as dead: its
    # runs are forgotten and its stream slots free. Renewed every third of it.
    lease: float = 10.0


def cluster_config(values: dict[str, Any], *, port: int, cluster_max_streams: int) -> ClusterConfig:
    """The `[cluster]` section's values, checked; `port` is `[server] port`."""
    instance = values.get("instance") or f"{socket.gethostname()}:{port}"
    if any(c.isspace() for c in instance) or len(instance) > 200:
        raise ConfigError("cluster", "instance", "a name without spaces, at most 200 characters")
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
    lease = values.get("lease", 10.0)
    return ClusterConfig(instance=instance, redis_url=redis_url, lease=lease)
