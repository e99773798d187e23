"""Python tools for lean's tool-loop tests (`[tool.X] kind = python, function = tests.toolbox:X`).

Sync and async, quick and slow, failing and returning structured values: each is
what a real deployment's tool module could hold. They keep no state between
calls, so the same config serves every test.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

CLOCK = "2026-11-21T16:40:00Z"  # fixed, so a test can compare the result exactly
NAP = 0.3  # seconds `nap` blocks its thread
SLEEPY = 5.0  # far beyond the `timeout` a test gives `sleepy`


def clock() -> str:
    """Sync, no arguments: a fixed ISO 8601 time."""
    return CLOCK


async def add(a: float, b: float) -> dict[str, Any]:
    """Async, returns a dict: lean sends it to the model as JSON."""
    await asyncio.sleep(0)
    return {"sum": a + b}


def nap(label: str = "") -> str:
    """Sync and blocking: two calls at once only finish together if lean runs them in parallel."""
    time.sleep(NAP)
    return f"rested {label}".strip()


def boom(**_: Any) -> str:
    raise ValueError("the boom tool always fails")


async def sleepy() -> str:
    """Async, so the timeout's cancellation really stops it (a sync sleeper would hold a thread)."""
    await asyncio.sleep(SLEEPY)
    return "woke up"


NOT_A_FUNCTION = 42  # `function = tests.toolbox:NOT_A_FUNCTION` is not callable
