"""Saved Responses answers, for `previous_response_id` (docs/protocol.md §1): their rows
and the chain a new response continues from. Plain SQL that SQLite and PostgreSQL both run
(the table is a step of messages.MIGRATIONS); `lean.store` moves it through its writer and
reader threads, on either backend.

A row is one response: this turn's input as Chat Completions messages (the instructions
left out: they are not carried on, as in OpenAI's API) followed by its answer as one
assistant message, the id of the response it continued, and the client that made it (a
response is its client's, as a conversation is: another client's id is not found). A new
response with `previous_response_id` sends the messages of that response's chain, oldest
first, before its own input. Only answers that ended (`completed` or `incomplete`) with
`store` true are saved; rows are kept as messages are (lean deletes neither).
"""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = ["INSERT_RESPONSE", "MAX_CHAIN", "SELECT_CHAIN", "history", "row"]

# The table is messages.MIGRATIONS' (version 5): response_id, previous_id, client, model,
# messages (a JSON array), created_at.
INSERT_RESPONSE = (
    "INSERT INTO responses (response_id, previous_id, client, model, messages, created_at)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)
# The most responses one chain sends on: a conversation of a thousand turns is past every
# model's context anyway, and the walk stays bounded whatever the rows say.
MAX_CHAIN = 1000
# Every link must be the client's own (its owner '' for the default client, as
# messages.SELECT_EXISTS compares): another client's response is not found. Arguments:
# (response_id, owner, MAX_CHAIN, owner). Runs as is on SQLite and PostgreSQL.
SELECT_CHAIN = """
WITH RECURSIVE chain (response_id, previous_id, messages, depth) AS (
    SELECT response_id, previous_id, messages, 0 FROM responses
    WHERE response_id = ? AND coalesce(client, '') = ?
    UNION ALL
    SELECT r.response_id, r.previous_id, r.messages, c.depth + 1
    FROM responses AS r JOIN chain AS c ON r.response_id = c.previous_id
    WHERE c.depth + 1 < ? AND coalesce(r.client, '') = ?
)
SELECT messages FROM chain ORDER BY depth DESC
"""

_encode = msgspec.json.Encoder().encode
_decode_messages = msgspec.json.Decoder(list[dict[str, Any]]).decode


def row(
    response_id: str,
    previous_id: str | None,
    client: str | None,
    model: str,
    messages: list[dict[str, Any]],
    created_at: str,
) -> tuple[str, str | None, str | None, str, str, str]:
    """An `INSERT_RESPONSE` row, owned by `client` (None: the default client)."""
    return (response_id, previous_id, client, model, _encode(messages).decode(), created_at)


def history(rows: list[tuple[str]]) -> list[dict[str, Any]] | None:
    """`SELECT_CHAIN` rows (oldest first) as one list of messages; None: no such response."""
    if not rows:
        return None
    out: list[dict[str, Any]] = []
    for (messages,) in rows:
        out += _decode_messages(messages)
    return out
