"""The [cluster] section: who this lean is among several sharing a store (docs/protocol.md §4).

Several lean processes may serve one set of conversations: on one host, sharing the port
(`[server] reuse_port`) or one port each behind nginx, and on several hosts sharing a store.
Each needs a name of its own that stays the same across its restarts: its answers' rows carry
it, so the start-up sweep that ends answers cut by a crash touches only its own rows, never
the answers another instance is streaming. The name defaults to "<host name>:<port>", which
is unique unless instances share a port: then it must be given (`[cluster] instance`, or
`lean serve --instance`, one config file for every unit of a systemd template).
"""

import re
import socket
from collections.abc import Mapping
from typing import Any

import msgspec

from lean.config_keys import ConfigError

__all__ = ["INSTANCE", "ClusterConfig", "cluster_config"]

# A host name and port, a systemd instance (%i), "web-1": short, printable, no spaces or
# quotes, so it can go in logs, metrics labels and SQL as it is.
INSTANCE = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")
_EXPECTED = "a name of up to 128 letters, digits or _ . : @ -, e.g. web-1"


class ClusterConfig(msgspec.Struct, frozen=True, kw_only=True):
    instance: str  # this process among the instances sharing a store: "<hostname>:<port>"
    redis_url: str | None = None
    lease: float = 10.0


def cluster_config(
    values: Mapping[str, Any], *, port: int, reuse_port: bool, instance: str | None = None
) -> ClusterConfig:
    """The [cluster] section's Struct; `instance` (from `lean serve --instance`) wins over
    the file's. `port` and `reuse_port` are [server]'s, for the default name."""
    name = instance if instance is not None else values.get("instance")
    if name is None:
        if reuse_port:
            # Every process on the port would default to the same name, and each one's
            # start-up would end the others' running answers.
            raise ConfigError(
                "cluster", "instance", "a name for each lean sharing the port (reuse_port = true)"
            )
        name = f"{socket.gethostname()}:{port}"
    if not INSTANCE.fullmatch(name):
        raise ConfigError("cluster", "instance", _EXPECTED, name)
    return ClusterConfig(instance=name, **{k: v for k, v in values.items() if k != "instance"})
