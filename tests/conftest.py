"""Shared test set-up: every async test runs on both asyncio and uvloop, but those marked
`one_loop` (they drive a `lean serve` subprocess, which runs uvloop whatever the test's loop
is) run once."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import pytest
import uvloop

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
