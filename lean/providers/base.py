"""What every provider translator produces: small pieces of one assistant answer.

Translators turn a provider's wire format (a stream of SSE messages or one JSON
body) into these pieces; lean's outputs (OpenAI chunks, unified events) are
rendered from them. Pieces are provider-neutral and use OpenAI's words for
finish reasons ("stop", "length", "tool_calls", "content_filter").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

import msgspec

from lean.errors import UpstreamError
from lean.sse import SSEMessage

_T = TypeVar("_T")


class Text(msgspec.Struct, frozen=True, gc=False):
    text: str


class Reasoning(msgspec.Struct, frozen=True, gc=False):
    text: str


class Refusal(msgspec.Struct, frozen=True, gc=False):
    """The model declining to answer, in its own words (OpenAI's `refusal`): shown to the
    user like text, but never mistaken for an answer."""

    text: str


class ToolCall(msgspec.Struct, frozen=True, gc=False):
    """One fragment of a tool call; `id` and `name` come on a call's first fragment."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None


class Finish(msgspec.Struct, frozen=True, gc=False):
    """How the upstream ended the answer, in OpenAI's words; `native` is an Anthropic
    upstream's own stop reason where OpenAI's words lose it (`stop_sequence`,
    `pause_turn`, `refusal`, ...), with the `stop_sequence` that matched, for a Messages
    client."""

    reason: str
    native: str | None = None
    stop_sequence: str | None = None


class Usage(msgspec.Struct, frozen=True, gc=False):
    """Token counts as the upstream gave them. The details are None when the upstream did
    not say (unknown, never 0); `total_tokens` is the upstream's own total, which need not
    be the sum (xAI's is not)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int | None = None  # of prompt_tokens, read from the provider's cache
    reasoning_tokens: int | None = None  # of completion_tokens, spent thinking
    total_tokens: int | None = None

    @property
    def total(self) -> int:
        """The upstream's own total when it gave one, else the sum."""
        if self.total_tokens is None:
            return self.prompt_tokens + self.completion_tokens
        return self.total_tokens

    def plus(self, other: Usage) -> Usage:
        """Two upstream calls' usage, summed (a detail stays unknown only if both are;
        a sum has no upstream total)."""
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            _add(self.cached_tokens, other.cached_tokens),
            _add(self.reasoning_tokens, other.reasoning_tokens),
        )


def _add(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    return a if b is None else a + b


class Signature(msgspec.Struct, frozen=True, gc=False):
    """An opaque token the provider attaches to its reasoning (Anthropic's thinking-block
    signature, Gemini's `thoughtSignature`). Never shown to a user; consumers skip it."""

    value: str
    kind: str = "anthropic"


class Verbatim(msgspec.Struct, frozen=True, gc=False):
    """An OpenAI-compatible upstream's chunk that carries what lean does not model
    (`logprobs`, `delta.annotations`): its `choices` array as the upstream sent it, for a
    Chat Completions client, and the pieces it carries that lean does model, for everyone
    else (`RunCore` unpacks them; a consumer of pieces other than `RunCore` and the
    Chat Completions framer must too)."""

    choices: bytes
    pieces: tuple[Piece, ...]


class Extras(msgspec.Struct, frozen=True, gc=False):
    """What a whole (non-streaming) OpenAI-compatible answer carries that lean does not
    model, as the upstream sent it: the choice's `logprobs`, the message's `annotations`."""

    logprobs: msgspec.Raw | None = None
    annotations: msgspec.Raw | None = None


Piece = Text | Reasoning | Refusal | ToolCall | Finish | Usage | Signature | Verbatim | Extras

# Pieces a user sees: once one has gone to a client, a failure can no longer fall back.
VISIBLE = (Text, Reasoning, Refusal, ToolCall, Verbatim)


# The key of an internal chat body under which a client dialect leaves its request as the
# client sent it, for an upstream of the same API (lean/dialects). Its value is a Struct, which
# no JSON body can hold, so a client cannot forge it; builders of other kinds drop the key.
NATIVE = "lean_native"


class HttpRequest(msgspec.Struct, frozen=True):
    url: str
    headers: dict[str, str]
    body: bytes


class StreamTranslator(Protocol):
    def feed(self, message: SSEMessage) -> list[Piece]:
        """Translate one SSE message; raise `UpstreamError` for an in-band error."""
        ...

    def close(self) -> None:
        """End of the byte stream: raise `UpstreamError` when it was truncated."""
        ...


def decode_answer(decode: Callable[[bytes | bytearray], _T], body: bytes | bytearray) -> _T:
    """A whole upstream answer decoded; one that is not what it should be is a retryable
    upstream error (a proxy's HTML page, a cut body), never a crash."""
    try:
        return decode(body)
    except (msgspec.DecodeError, ValueError) as exc:
        raise UpstreamError(f"unparseable upstream answer: {exc}", retryable=True) from None
