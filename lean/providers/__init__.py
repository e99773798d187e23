"""Provider adapters: per `kind`, a request builder and translators, no I/O.

An adapter module provides `build_request(provider, model, body, *, stream)`,
`StreamTranslator()` (feed SSE messages, get pieces; `close()` raises when the
stream was truncated; `finished` once a finish reason was seen) and
`parse_completion(body) -> list[Piece]`. `body` is always an OpenAI Chat
Completions request; each adapter translates it to its provider's API.
"""

from __future__ import annotations

from types import ModuleType

from lean.providers import anthropic, gemini, openai

_ADAPTERS: dict[str, ModuleType] = {"openai": openai, "anthropic": anthropic, "gemini": gemini}


def register(kind: str, module: ModuleType) -> None:
    _ADAPTERS[kind] = module


def adapter(kind: str) -> ModuleType:
    try:
        return _ADAPTERS[kind]
    except KeyError:
        raise RuntimeError(f"no adapter for provider kind {kind!r}") from None
