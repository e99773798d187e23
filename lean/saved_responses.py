"""Saved Responses answers, for `previous_response_id` (docs/protocol.md §1): the table, its
rows and the chain a new response continues from. Plain SQL that SQLite and PostgreSQL
both run; `lean.store` moves it through its writer and reader threads.

A row is one response: this turn's input as Chat Completions messages (the instructions
left out: they are not carried on, as in OpenAI's API) followed by its answer as one
assistant message, and the id of the response it continued. A new response with
`previous_response_id` sends the messages of that response's chain, oldest first, before
its own input. Only answers that ended (`completed` or `incomplete`) with `store` true
are saved; rows are kept as messages are (lean deletes neither).
"""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = ["INSERT_RESPONSE", "MAX_CHAIN", "RESPONSES_TABLE", "SELECT_CHAIN", "history", "row"]

RESPONSES_TABLE = """
CREATE TABLE IF NOT EXISTS responses (
    response_id TEXT PRIMARY KEY,
    previous_id TEXT,
    model TEXT NOT NULL,
    messages TEXT NOT NULL,  -- JSON array: this turn's input messages, then the answer
    created_at TEXT NOT NULL
);
"""
INSERT_RESPONSE = (
    "INSERT INTO responses (response_id, previous_id, model, messages, created_at)"
    " VALUES (?, ?, ?, ?, ?)"
)
# The most responses one chain sends on: a conversation of a thousand turns is past every
# model's context anyway, and the walk stays bounded whatever the rows say.
MAX_CHAIN = 1000
SELECT_CHAIN = """
WITH RECURSIVE chain (response_id, previous_id, messages, depth) AS (
    SELECT response_id, previous_id, messages, 0 FROM responses WHERE response_id = ?
    UNION ALL
    SELECT r.response_id, r.previous_id, r.messages, c.depth + 1
    FROM responses AS r JOIN chain AS c ON r.response_id = c.previous_id
    WHERE c.depth + 1 < ?
)
SELECT messages FROM chain ORDER BY depth DESC
"""

_encode = msgspec.json.Encoder().encode
_decode_messages = msgspec.json.Decoder(list[dict[str, Any]]).decode


def row(
    response_id: str,
    previous_id: str | None,
    model: str,
    messages: list[dict[str, Any]],
    created_at: str,
) -> tuple[str, str | None, str, str, str]:
    """An `INSERT_RESPONSE` row."""
    return (response_id, previous_id, model, _encode(messages).decode(), created_at)


def history(rows: list[tuple[str]]) -> list[dict[str, Any]] | None:
    """`SELECT_CHAIN` rows (oldest first) as one list of messages; None: no such response."""
    if not rows:
        return None
    out: list[dict[str, Any]] = []
    for (messages,) in rows:
        out += _decode_messages(messages)
    return out
