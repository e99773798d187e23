"""The Anthropic Messages routes (docs/protocol.md §1, "The Anthropic dialect"):
`POST /v1/messages` and `POST /v1/messages/count_tokens`, for Claude Code and the
Anthropic SDKs, in front of any model alias.

A request is checked and translated by `lean.dialects.anthropic`; its run is
`lean.driver`'s, in `encoders.anthropic.MessagesEncoder`'s events. Errors raised here
(a bad body, an unknown alias) are rendered in Anthropic's shape by the app's error
middleware, which picks Anthropic's renderer for these paths (`lean.app`).

A client's limits (docs/protocol.md §8) apply to `/v1/messages` as to chat completions:
its models, then admission (429 in Anthropic's shape with Retry-After, which the SDKs type
as `RateLimitError`) before any provider call. `count_tokens` is not a run: it checks the
model is the client's, and counts toward none of its limits (no answer, no tokens).
"""

from __future__ import annotations

import logging

from aiohttp import web

from lean import driver
from lean.clients import client_of
from lean.config import ModelConfig
from lean.dialects.anthropic import Request, parse_request
from lean.dialects.estimate import estimate_tokens
from lean.encoders.anthropic import MessagesEncoder
from lean.errors import BadRequest, LeanError, clip
from lean.handlers import read_json, services_key
from lean.providers.anthropic import Native
from lean.providers.base import NATIVE

__all__ = ["count_tokens", "messages"]

log = logging.getLogger("lean.anthropic")

# How many of the places a non-Anthropic alias cannot take an error message names.
MAX_NAMED = 3


async def _read(request: web.Request, *, counting: bool = False) -> Request:
    return parse_request(
        await read_json(request),
        version=request.headers.get("anthropic-version"),
        beta=request.headers.get("anthropic-beta"),
        counting=counting,
    )


def _is_anthropic(request: web.Request, model: ModelConfig) -> bool:
    return request.app[services_key].upstream.provider(model).kind == "anthropic"


async def messages(request: web.Request) -> web.StreamResponse:
    services = request.app[services_key]
    asked = await _read(request)
    client = client_of(request)
    model = services.clients.model(client, asked.model)
    if asked.untranslated and not _is_anthropic(request, model):
        # Left out, they would change what the request means: a server tool, a document.
        named = ", ".join(f"`{clip(place)}`" for place in asked.untranslated[:MAX_NAMED])
        more = len(asked.untranslated) - MAX_NAMED
        raise BadRequest(
            f"invalid request: model '{clip(model.alias)}' is not served by an Anthropic "
            f"upstream, which alone takes {named}" + (f" and {more} more" if more > 0 else "")
        )
    services.streams.check()
    ticket = await services.clients.admit(client)
    try:
        await services.streams.admit()  # the cluster's slot, after the client's limits
        encoder = MessagesEncoder(model=model.alias, input_tokens=estimate_tokens(asked.body))
        if asked.stream:
            return await driver.stream(request, services, model, asked.body, encoder, ticket)
        return await driver.complete(request, services, model, asked.body, encoder, ticket)
    finally:
        ticket.end()  # refused before its stream began; else its outcome ended it, counted


async def count_tokens(request: web.Request) -> web.Response:
    """`{"input_tokens": N}`: an Anthropic upstream's own count; elsewhere, or when that
    upstream cannot count (a compatible server without the route), lean's estimate."""
    services = request.app[services_key]
    asked = await _read(request, counting=True)
    model = services.clients.model(client_of(request), asked.model)  # no admission: not a run
    native = asked.body[NATIVE]
    tokens: int | None = None
    if _is_anthropic(request, model) and isinstance(native, Native):
        try:
            tokens = await services.upstream.count(model, native)
        except LeanError as exc:
            log.warning(
                "upstream count failed, estimating model=%s code=%s error=%s",
                model.alias,
                exc.code,
                exc.message,
            )
    if tokens is None:
        tokens = estimate_tokens(asked.body)
    return web.json_response({"input_tokens": tokens})
