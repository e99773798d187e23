"""HTTP handlers of the OpenAI-compatible surface and the operator endpoints.

A chat completion's run is `lean.driver`'s, in `encoders.chat.ChatEncoder`'s frames.
"""

from __future__ import annotations

from aiohttp import web

from lean import driver
from lean.clients import DEFAULT, client_of
from lean.connections import Connections
from lean.dialects.anthropic import models_body as anthropic_models_body
from lean.encoders.chat import ChatEncoder
from lean.errors import Forbidden, PayloadTooLarge
from lean.inbound import require_json
from lean.openai_compat import models_body, parse_request
from lean.services import Services

services_key = web.AppKey("services", Services)
connections_key = web.AppKey("connections", Connections)


async def read_json(request: web.Request) -> bytes:
    """The body of a JSON endpoint: 415 unless it says it is JSON, 413 past the limit."""
    require_json(request)
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[services_key].config.server.max_body_bytes
        raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes") from None


async def chat_completions(request: web.Request) -> web.StreamResponse:
    services = request.app[services_key]
    chat, body = parse_request(await read_json(request))
    client = client_of(request)
    model = services.clients.model(client, chat.model)
    services.streams.check()
    ticket = await services.clients.admit(client)
    try:
        await services.streams.admit()  # the cluster's slot, after the client's limits
        if chat.stream:
            include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
            encoder = ChatEncoder(model=model.alias, include_usage=include_usage)
            return await driver.stream(request, services, model, body, encoder, ticket)
        encoder = ChatEncoder(model=model.alias)
        return await driver.complete(request, services, model, body, encoder, ticket)
    finally:
        ticket.end()  # refused before its stream began; else its outcome ended it, counted


async def models(request: web.Request) -> web.Response:
    """The aliases the client may use, in OpenAI's list shape, or Anthropic's for a request
    that carries `anthropic-version` (an Anthropic SDK; docs/protocol.md §1)."""
    aliases = request.app[services_key].clients.models(client_of(request))
    if "anthropic-version" in request.headers:
        body = anthropic_models_body(aliases)
    else:
        body = models_body(aliases)
    return web.Response(body=body, content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    """For the operator: the default client (`[auth]` tokens, or loopback without tokens).
    A `[client.NAME]` would read the other clients' names and use."""
    if client_of(request) is not DEFAULT:
        raise Forbidden("/metrics is for the operator's tokens ([auth] tokens_env)")
    services = request.app[services_key]
    body = services.metrics.render(
        [
            ("lean_active_streams", "Streams and runs in progress.", len(services.streams)),
            ("lean_active_scene_runs", "Scene runs in progress.", len(services.runs)),
            ("lean_draining", "1 while lean shuts down.", 1 if services.streams.draining else 0),
            (
                "lean_client_connections",
                "Client connections open, of [server] max_connections.",
                len(request.app[connections_key]),
            ),
        ]
    )
    return web.Response(
        body=body,
        content_type="text/plain",
        charset="utf-8",
        headers={"X-Content-Type-Options": "nosniff"},
    )


async def readyz(request: web.Request) -> web.Response:
    services = request.app[services_key]
    if services.streams.draining:
        return web.json_response({"status": "draining"}, status=503)
    if not services.store.writable:  # runs are refused (store_unavailable) until it writes
        body = {"status": "store_unavailable", "error": services.store.error}
        return web.json_response(body, status=503)
    return web.json_response({"status": "ready"})
