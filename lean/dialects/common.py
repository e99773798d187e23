"""What the dialect parsers share: typed re-checks of a part of a body, naming its place.

A dialect decodes the whole body once through `lean.inbound.decode` (so deep nesting is a
400) and then checks its parts one by one (a content block, an input item) against small
Structs; `convert` re-types msgspec's failure as a `BadRequest` whose path is the part's
place in the whole body (`$.messages[2].content[0].text`), the way `decode` names a field.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from lean.errors import BadRequest, clip

T = TypeVar("T")

_encode = msgspec.json.Encoder().encode


def convert(value: Any, kind: type[T], path: str) -> T:
    """`value` as a `kind`; a `BadRequest` naming the field under `path` when it is not one."""
    try:
        return msgspec.convert(value, kind)
    except msgspec.ValidationError as exc:
        said = str(exc)
        said = said.replace("`$", "`" + path, 1) if "`$" in said else f"{said} - at `{path}`"
        raise BadRequest(f"invalid request: {clip(said)}") from None


def invalid(message: str, path: str) -> BadRequest:
    """A 400 in `decode`'s words: what is wrong, then where."""
    return BadRequest(f"invalid request: {clip(message)} - at `{path}`")


def arguments(value: Any) -> str:
    """A tool call's input object as the JSON string Chat Completions carries."""
    return _encode(value).decode()
