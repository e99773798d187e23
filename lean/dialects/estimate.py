"""An estimate of a request's input tokens, for `count_tokens` where the upstream has no
counter of its own (OpenAI-compatible, Gemini, demo). Never a constant: a client such as
Claude Code decides from it when to compact its context, and a 0 would mean never.

The rule, on lean's chat body (so every dialect is counted the same way, after
translation), by the kind of character, since tokenizers split scripts very differently:
- ASCII: one token per `ASCII_CHARS` characters (English and code);
- other characters below U+2E80 (Latin accents, Greek, Cyrillic, Arabic, Hebrew, ...):
  one per `NARROW_CHARS`;
- U+2E80 and above (CJK, kana, Hangul, emoji): one per `WIDE_CHARS`;
- plus `MESSAGE_TOKENS` per message (role and framing), `TOOL_TOKENS` per tool (its
  name, description and schema are counted as text), `IMAGE_TOKENS` per image (its
  size is not read), and `BASE_TOKENS` once.
The text counted is every message's text, tool calls' names and arguments, tool results
and the tools' definitions. The constants lean toward counting too much: an estimate
that is high makes a client compact early; one that is low lets it overflow the
upstream's context. Measured against real tokenizers (o200k_base, cl100k_base) on the
fixtures of `bench/estimate_tokens.py`; the figures are in bench/RESULTS.md.
"""

from __future__ import annotations

import math
import re
from typing import Any

import msgspec

__all__ = ["estimate_tokens"]

ASCII_CHARS = 3.5
NARROW_CHARS = 2.5
WIDE_CHARS = 1.1
MESSAGE_TOKENS = 4
TOOL_TOKENS = 8
# Anthropic bills an image by its area, up to ~1,600 tokens (about 1.15 megapixels);
# OpenAI's high detail ~765 for 1024x1024, Gemini 258 a tile. Images are not decoded here,
# so each counts as the largest of these.
IMAGE_TOKENS = 1600
BASE_TOKENS = 3

_NON_ASCII = re.compile(r"[^\x00-\x7f]")
_WIDE = re.compile(r"[^\x00-\u2e7f]")
_encode = msgspec.json.Encoder().encode


def text_tokens(text: str) -> float:
    """The estimate for `text` alone (fractional: a body sums many before rounding up)."""
    if text.isascii():
        return len(text) / ASCII_CHARS
    other = _NON_ASCII.subn("", text)[1]
    wide = _WIDE.subn("", text)[1]
    return (len(text) - other) / ASCII_CHARS + (other - wide) / NARROW_CHARS + wide / WIDE_CHARS


def estimate_tokens(body: dict[str, Any]) -> int:
    """The estimated input tokens of a chat body (see the rule above)."""
    total = float(BASE_TOKENS)
    for message in body.get("messages") or ():
        if not isinstance(message, dict):
            continue
        total += MESSAGE_TOKENS + _content(message.get("content"))
        if isinstance(message.get("refusal"), str):
            total += text_tokens(message["refusal"])
        for call in message.get("tool_calls") or ():
            function = call.get("function") or {} if isinstance(call, dict) else {}
            total += text_tokens(str(function.get("name") or ""))
            total += text_tokens(str(function.get("arguments") or ""))
    for tool in body.get("tools") or ():
        total += TOOL_TOKENS + text_tokens(_encode(tool).decode())
    return math.ceil(total)


def _content(content: Any) -> float:
    if isinstance(content, str):
        return text_tokens(content)
    total = 0.0
    for part in content if isinstance(content, list) else ():
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind == "text":
            total += text_tokens(str(part.get("text") or ""))
        elif kind in ("image_url", "file"):
            total += IMAGE_TOKENS
    return total
