"""The built-in `demo` provider: a local answer, so a fresh install streams with no key.

It answers from the request alone, word by word; `lean.upstream` paces the words
with the provider's `demo_delay`.
"""

from __future__ import annotations

from typing import Any

from lean.providers.base import Finish, Piece, Text, Usage

_INTRO = (
    "Hello! This is lean's built-in demo provider, streaming a local answer word by word "
    "so you can watch the gateway work end to end without any key."
)
_OUTRO = (
    "To talk to a real model, add a [provider.NAME] section to config.ini "
    "(OpenAI, DeepSeek, OpenRouter, vLLM, Ollama, llama.cpp, Anthropic or Gemini) "
    "and point [model.default] at it."
)


def _last_user_text(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages") or ()):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def answer(body: dict[str, Any]) -> list[Piece]:
    """The whole demo answer as pieces: one `Text` per word, then finish and usage."""
    said = " ".join(_last_user_text(body).split())
    if len(said) > 200:
        said = said[:200] + "…"
    echo = f' You said: "{said}".' if said else ""
    text = f"{_INTRO}{echo} {_OUTRO}"
    words = text.split(" ")
    pieces: list[Piece] = [Text(word + " ") for word in words[:-1]]
    pieces.append(Text(words[-1]))
    pieces.append(Finish("stop"))
    prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body.get("messages") or ())
    pieces.append(Usage(prompt_tokens, len(words)))
    return pieces
