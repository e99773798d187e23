"""lean's token estimate for `count_tokens` without an upstream counter: the documented rule,
checked term by term, and never a constant (a client compacts its context by it)."""

from __future__ import annotations

import math
from typing import Any

from lean.dialects.estimate import (
    ASCII_CHARS,
    BASE_TOKENS,
    IMAGE_TOKENS,
    MESSAGE_TOKENS,
    NARROW_CHARS,
    TOOL_TOKENS,
    WIDE_CHARS,
    estimate_tokens,
    text_tokens,
)


def test_characters_count_by_script() -> None:
    assert text_tokens("a" * 70) == 70 / ASCII_CHARS
    assert text_tokens("é" * 10) == 10 / NARROW_CHARS
    assert text_tokens("Привет") == 6 / NARROW_CHARS
    assert text_tokens("你好世界") == 4 / WIDE_CHARS
    assert text_tokens("ok 🙂") == 3 / ASCII_CHARS + 1 / WIDE_CHARS
    assert text_tokens("") == 0


def test_a_body_sums_messages_calls_tools_and_images() -> None:
    assert estimate_tokens({}) == BASE_TOKENS  # never 0
    body: dict[str, Any] = {
        "messages": [
            {"role": "system", "content": "x" * 35},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "y" * 35},
                    {"type": "image_url", "image_url": {"url": "https://e.x/a.png"}},
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c", "type": "function", "function": {"name": "ff", "arguments": "{}"}}
                ],
            },
            {"role": "tool", "tool_call_id": "c", "content": "z" * 7},
        ],
        "tools": [{"type": "function", "function": {"name": "ff", "parameters": {}}}],
    }
    tool_json = '{"type":"function","function":{"name":"ff","parameters":{}}}'
    expected = (
        BASE_TOKENS
        + 4 * MESSAGE_TOKENS
        + (35 + 35 + 2 + 2 + 7) / ASCII_CHARS
        + IMAGE_TOKENS
        + TOOL_TOKENS
        + len(tool_json) / ASCII_CHARS
    )
    assert estimate_tokens(body) == math.ceil(expected)


def test_more_text_is_more_tokens() -> None:
    short = {"messages": [{"role": "user", "content": "Hello there."}]}
    long = {"messages": [{"role": "user", "content": "Hello there. " * 1000}]}
    assert estimate_tokens(short) < estimate_tokens(long)
    assert estimate_tokens(long) > 13_000 / ASCII_CHARS
