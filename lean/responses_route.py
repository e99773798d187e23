"""`POST /v1/responses`: OpenAI's Responses API in front of any configured model alias
(docs/protocol.md §1).

The request becomes lean's chat body (`lean.dialects.responses`), the run is the driver's
(`lean.driver`), the client sees `encoders.responses.ResponsesEncoder`'s events. What this
route adds is state: with `store` (the API's default) an answer that ended is saved, and
`previous_response_id` sends the saved chain's messages before the new input; an id lean
did not save (or saved with `store: false`: nothing) is a 404 in OpenAI's shape.

A client's limits (docs/protocol.md §8) apply as on chat completions: its models (one it
may not use is a 404 as if it did not exist), then admission (429 in OpenAI's shape with
Retry-After) before any provider call. A saved response is its client's: another client's
`previous_response_id` is not found (404), as another client's conversation is.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import msgspec
from aiohttp import web

from lean import driver
from lean.clients import Client, client_of
from lean.dialects.responses import Request, parse_request
from lean.encoders.responses import ResponsesEncoder
from lean.encoders.responses_body import chat_message
from lean.errors import clip
from lean.handlers import read_json, services_key
from lean.messages import utc_now
from lean.saved_responses import row
from lean.scene_handlers import reading
from lean.services import Services
from lean.store import Store

__all__ = ["responses"]

log = logging.getLogger("lean.responses")

_encode = msgspec.json.Encoder().encode


async def responses(request: web.Request) -> web.StreamResponse:
    services = request.app[services_key]
    parsed = parse_request(await read_json(request))
    client = client_of(request)
    model = services.clients.model(client, parsed.model)
    services.streams.check()
    body = parsed.body
    messages = body["messages"]
    new = messages[1:] if parsed.instructions else messages  # this turn's input
    if parsed.previous_response_id is not None:  # before admission: a 404 spends nothing
        with reading():
            history = await services.store.response_history(
                parsed.previous_response_id, client.owner
            )
        if history is None:
            return _not_found(parsed.previous_response_id)
        body = {**body, "messages": messages[: len(messages) - len(new)] + history + new}
    ticket = await services.clients.admit(client)
    try:
        await services.streams.admit()  # the cluster's slot, after the client's limits
        encoder = ResponsesEncoder(
            model=model.alias,
            echo=parsed.echo,
            custom_tools=parsed.custom_tools,
            namespaces=parsed.namespaces,
            on_end=_saver(services, parsed, client, model.alias, new) if parsed.store else None,
        )
        if parsed.stream:
            return await driver.stream(request, services, model, body, encoder, ticket)
        return await driver.complete(request, services, model, body, encoder, ticket)
    finally:
        ticket.end()  # refused before its stream began; else its outcome ended it, counted


def _not_found(response_id: str) -> web.Response:
    error = {
        "message": f"Previous response with id '{clip(response_id)}' not found.",
        "type": "invalid_request_error",
        "param": "previous_response_id",
        "code": "previous_response_not_found",
    }
    return web.Response(status=404, body=_encode({"error": error}), content_type="application/json")


# Saves in flight: a task is kept until it ends (the loop holds tasks weakly).
_saving: set[asyncio.Task[None]] = set()


def _saver(
    services: Services, parsed: Request, client: Client, model: str, new: list[dict[str, Any]]
) -> Callable[[ResponsesEncoder], None]:
    """What the encoder calls as an answer ends: the response's row, queued at once (a task
    started now runs before the loop reads the client's next request)."""

    def save(encoder: ResponsesEncoder) -> None:
        messages = [*new, chat_message(encoder.items)]
        previous = parsed.previous_response_id
        values = row(encoder.id, previous, client.owner, model, messages, utc_now())
        task = asyncio.get_running_loop().create_task(_save(services.store, values))
        _saving.add(task)
        task.add_done_callback(_saving.discard)

    return save


async def _save(store: Store, values: tuple[Any, ...]) -> None:
    try:
        await store.save_response(values)
    except Exception:  # a closed store at shutdown: the answer went out, its row did not
        log.warning("response %s not saved", values[0], exc_info=True)
