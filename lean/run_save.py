"""A scene run's answer as a saved message, and its final save with the run's log line.

Kept apart from `lean.run` (which drives the run) because it is the one place that turns a
run's state (`core.RunCore`) into what the store and the log keep: the answer row while it
streams and at its end, the run's metrics, and one log line per run that never holds the
prompt unless `[server] log_prompts` says so.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from lean.core import Ending
from lean.messages import MessageRecord, utc_now
from lean.providers.base import Usage
from lean.store import StoreWriteError

if TYPE_CHECKING:
    from lean.run import Run

log = logging.getLogger("lean.run")
_NO_USAGE = Usage()


def record(run: Run, status: str = "streaming") -> MessageRecord:
    """The run's answer as it stands, with `status`. Token counts are the upstream's so far
    (a cancelled run keeps what the upstream had reported), None when it reported none:
    never invented zeros."""
    core = run.core
    usage = core.usage
    known = usage != _NO_USAGE
    return MessageRecord(
        message_id=run.message_id,
        conversation_id=run.conversation_id,
        role="assistant",
        content=core.text.text(),
        status=status,
        created_at=utc_now(),
        turn=run.turn,
        scene=run.scene.name,
        model=run.model.alias,
        reasoning=core.reasoning.text(),
        tool_calls=[call.saved() for call in core.calls],
        finish_reason=core.finish if core.ending is Ending.COMPLETE else None,
        error_code=core.error.code if core.error else None,
        prompt_tokens=usage.prompt_tokens if known else None,
        completion_tokens=usage.completion_tokens if known else None,
        first_token_ms=core.first_token_ms,
        duration_ms=(time.monotonic() - core.started) * 1000,
        run_id=run.run_id,
    )


async def save(run: Run, prompt: Any) -> bool:
    """Save the answer for good and log the run; whether the save was committed.
    `prompt` goes into the log line only with `[server] log_prompts`."""
    services = run.services
    saved = record(run, run.core.saved_status.value)
    first_token_ms = saved.first_token_ms
    services.metrics.run_ended(
        "scene",
        run.scene.name,
        saved.status,
        run.order.seq,
        None if first_token_ms is None else first_token_ms / 1000,
    )
    store_error: str | None = None
    try:  # the store counts a failed write (lean_store_failures_total)
        await services.store.save_assistant(saved, client=run.client.owner)
    except StoreWriteError as exc:  # a full disk, a database gone: no traceback
        store_error = str(exc)
    except Exception as exc:
        log.exception("run %s: saving the answer failed", run.run_id)
        store_error = str(exc) or type(exc).__name__
    fields: dict[str, Any] = {
        "endpoint": "scene",
        "client": run.client.name,
        "scene": run.scene.name,
        "model": run.model.alias,
        "run_id": run.run_id,
        "status": saved.status,
        "code": saved.error_code,
        "first_token_ms": None if first_token_ms is None else round(first_token_ms),
        "duration_ms": round(saved.duration_ms or 0),
        "prompt_tokens": saved.prompt_tokens,
        "completion_tokens": saved.completion_tokens,
        "tool_calls": len(saved.tool_calls) or None,
    }
    if store_error is not None:  # the run's status stays its outcome; this says the rest
        fields["saved"] = False
        fields["store_error"] = store_error
    if services.config.server.log_prompts:
        fields["prompt"] = prompt
    log.log(logging.INFO if store_error is None else logging.ERROR, "run", extra={"fields": fields})
    return store_error is None
