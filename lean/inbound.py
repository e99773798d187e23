"""What clients send, taken once: JSON bodies and frames, their media type, their ids.

Every JSON body or WebSocket frame from a client is decoded here, by `decode`, so a
failure is always a 400 (`BadRequest`) naming the problem: not JSON, a wrong field
(msgspec names it, e.g. `$.messages[0].role`), or JSON nested deeper than the decoder
can follow (msgspec raises `RecursionError` at Python's recursion limit, ~1,000 levels
less the stack in use; 100,000 levels of `[` must be a 400, not a 500 with a traceback).

A JSON endpoint takes only `application/json` (or a `+json` type, any parameters): a
browser sends `text/plain` from any web page without a preflight, so accepting it would
let any page start runs (docs/protocol.md §6). Anything else is a 415 before the body is read.

Ids a client chooses or repeats (`runId`, `toolCallId`; `conversationId` has its own,
narrower rule in `scenes`) are echoed in every frame and logged: `ClientId` bounds them.
"""

from __future__ import annotations

import re
from typing import Annotated, TypeVar

import msgspec
from aiohttp import web

from lean.errors import BadRequest, UnsupportedMediaType, clip

__all__ = ["MAX_ID_CHARS", "ClientId", "decode", "is_client_id", "require_json"]

# Ids are made by lean (`r...`, 25 characters) or by providers (`call_...`, `toolu_...`,
# ~30-40); 128 leaves room for a client's own UUIDs and prefixes. Printable ASCII without
# spaces: an id is echoed in frames and written to log lines as it is.
MAX_ID_CHARS = 128
_ID_CHARS = r"\A[!-~]+\Z"  # \Z: "$" would let a final newline through
ClientId = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_CHARS, pattern=_ID_CHARS)]
_ID = re.compile(_ID_CHARS)


def is_client_id(value: object) -> bool:
    return isinstance(value, str) and len(value) <= MAX_ID_CHARS and _ID.match(value) is not None


T = TypeVar("T")


def decode(decoder: msgspec.json.Decoder[T], data: bytes | str, what: str = "request") -> T:
    """`data` decoded by `decoder`; any failure is a `BadRequest` naming it."""
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as exc:
        said = str(exc)
        if said.startswith("Expected `object`") and " - at `$" not in said:
            said = f"the body must be a JSON object ({said})"
        raise BadRequest(f"invalid {what}: {clip(said)}") from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"invalid {what}: not valid JSON ({clip(str(exc))})") from None
    except RecursionError:
        raise BadRequest(f"invalid {what}: JSON nested too deeply") from None


def is_json(content_type: str) -> bool:
    """`application/json` or `application/<anything>+json`, parameters ignored."""
    kind = content_type.partition(";")[0].strip().lower()
    return kind == "application/json" or (
        kind.startswith("application/") and kind.endswith("+json")
    )


def require_json(request: web.Request) -> None:
    """415 unless the request says its body is JSON; checked before the body is read."""
    given = request.headers.get("Content-Type")
    if given is None or not is_json(given):
        shown = "none" if given is None else f"'{clip(given, 80)}'"
        raise UnsupportedMediaType(
            f"unsupported Content-Type {shown}: send the body as application/json"
        )
