"""Python tools for lean's tool-loop tests (`[tool.X] kind = python, function = tests.toolbox:X`).

Sync and async, quick and slow, failing and returning structured values: each is
what a real deployment's tool module could hold. They keep no state between
calls, so the same config serves every test.
"""

from __future__ import annotations

import asyncio
import threading
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


# `stuck` blocks its thread until a test sets this (tests replace it with a fresh Event).
RELEASE = threading.Event()
FREEZE = 0.8  # seconds `freeze` blocks the event loop


def stuck() -> str:
    """Sync and blocking past any timeout: its thread stays busy until RELEASE is set."""
    RELEASE.wait(20)
    return "released"


def huge(size: int, structured: bool = False) -> Any:
    """Sync: a result of `size` characters (2 bytes each in UTF-8), as text or in a dict."""
    text = "é" * size
    return {"text": text} if structured else text


async def freeze() -> str:
    """Async but blocking: the mistake that freezes every stream (lean can only notice it)."""
    time.sleep(FREEZE)  # noqa: ASYNC251 - the point of this tool
    return "thawed"


NOT_A_FUNCTION = 42  # `function = tests.toolbox:NOT_A_FUNCTION` is not callable
