"""The `[store]` section: a SQLite file (`path`, the default) or a PostgreSQL database (`url`)
(docs/protocol.md §4, §7)."""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

import msgspec

from lean.config_keys import ConfigError

__all__ = ["StoreConfig", "store_config"]

PG_SCHEMES = ("postgresql", "postgres")


class StoreConfig(msgspec.Struct, frozen=True, kw_only=True):
    path: str = "lean.db"  # absolute once loaded; unused when `url` is set
    # postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE[?...]: conversations in PostgreSQL,
    # shared by every instance that names it; "" for the SQLite file at `path`.
    url: str = ""
    # Seconds between writes of a running answer's text: what a kill -9 can lose of an
    # answer. One row update per running answer per interval, all in one commit; 0: only
    # the row at the start and the final save.
    flush_interval: float = 1.0


def store_config(values: dict[str, Any], config_path: str) -> StoreConfig:
    flush_interval = values.get("flush_interval", StoreConfig().flush_interval)
    if "url" in values:
        if "path" in values:  # which one lean writes to must not be a guess
            raise ConfigError("store", "url", "either path or url, not both")
        return StoreConfig(url=_url(values["url"]), flush_interval=flush_interval)
    path = values.get("path", "lean.db")
    if not path or path == ":memory:":
        # The store is a file in WAL mode, read and written on two connections: an
        # in-memory database can be neither (and answers must outlive a restart).
        raise ConfigError("store", "path", "a file path, e.g. lean.db", path or None)
    base = os.path.dirname(os.path.abspath(config_path))
    path = os.path.join(base, os.path.expanduser(path))  # join keeps an absolute path
    return StoreConfig(path=path, flush_interval=flush_interval)


def _url(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in PG_SCHEMES or not parts.path.strip("/"):
        # Never echoed: a URL may carry a password.
        raise ConfigError(
            "store", "url", "postgresql://USER@HOST[:PORT]/DATABASE (the database must exist)"
        )
    return raw
