"""Shared test set-up: every async test runs on both asyncio and uvloop, but those marked
`one_loop` (they drive a `lean serve` subprocess, which runs uvloop whatever the test's loop
is) run once. `target`: a fresh database of each kind the store runs on."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
import uvloop

from tests.store_targets import BACKENDS, PgServer, PgTarget, SqliteTarget, Target

LOOPS: Mapping[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "one_loop: run an async test on uvloop only")


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    if item.get_closest_marker("one_loop") is not None:
        return {"uvloop": LOOPS["uvloop"]}
    return LOOPS


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test on PostgreSQL runs on uvloop only: the store's front (the part a loop can
    change) is the same for both databases and runs on both loops with SQLite; the
    PostgreSQL half is the backend, on the store's threads. Saves the suite ~15 s."""
    keep: list[pytest.Item] = []
    drop: list[pytest.Item] = []
    for item in items:
        params = getattr(item, "callspec", None)
        params = params.params if params is not None else {}
        twice = (
            params.get("target") == "postgresql"
            and params.get("_asyncio_loop_factory") is LOOPS["asyncio"]
        )
        (drop if twice else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    server = PgServer()
    yield server
    server.drop()


@pytest.fixture(params=BACKENDS)
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    """A fresh database of each kind the store runs on (tests/store_targets.py)."""
    if request.param == "sqlite":
        return SqliteTarget(tmp_path)
    server: PgServer = request.getfixturevalue("pg_server")
    if server.skip:
        pytest.skip(server.skip)
    server.clean()
    return PgTarget(server.url)
