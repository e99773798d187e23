"""A saved message: its shape, its SQLite table, and the conversion between the two.

`lean.store` moves these rows through its writer thread; this module says what they are.
Columns follow `MessageRecord`'s field order, so a row is the record's tuple (tool calls
as JSON text).
"""

from __future__ import annotations

import itertools
import sqlite3
from datetime import UTC, datetime
from typing import Any

import msgspec

SCHEMA_VERSION = 4  # kept in PRAGMA user_version; a newer file is refused, not guessed at

# Version 2: status `streaming` (a run's answer while it runs, flushed as it grows) and
# `run_id`. SQLite cannot change a CHECK in place, so a version-1 table is copied into a new
# one (MIGRATE_FROM_1), in the same transaction that sets the version.
# Version 3: `prompt`, the filled template a user message became (what the model saw), beside
# `content`, what the user typed. NULL when the two are the same (a `{message}` template), so
# a plain chat stores its text once; a version-2 row (whose `content` was the filled template)
# gets NULL too, and reads back as before. A nullable column added at the end needs no copy
# (MIGRATE_FROM_2).
# Version 4: an index on `run_id`, so a resume of a run lean no longer buffers finds its
# saved answer without reading the whole table (lean.resume).
_TABLE = """
CREATE TABLE {name} (
    message_id TEXT PRIMARY KEY,
    conversation_id TEXT NOT NULL,
    turn INTEGER NOT NULL CHECK (turn >= 1),
    role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    content TEXT NOT NULL,
    status TEXT NOT NULL
        CHECK (status IN ('complete', 'error', 'cancelled', 'incomplete', 'streaming')),
    created_at TEXT NOT NULL,
    scene TEXT NOT NULL,
    model TEXT NOT NULL,
    reasoning TEXT NOT NULL,
    tool_calls TEXT NOT NULL,  -- JSON array
    finish_reason TEXT,
    error_code TEXT,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    first_token_ms REAL,
    duration_ms REAL,
    run_id TEXT,
    prompt TEXT,
    CHECK (role = 'assistant' OR status = 'complete')
);
"""
_INDEX = "CREATE INDEX IF NOT EXISTS messages_by_turn ON messages (conversation_id, turn);"
_RUN_INDEX = "CREATE INDEX IF NOT EXISTS messages_by_run ON messages (run_id);"
SCHEMA = _TABLE.format(name="IF NOT EXISTS messages") + _INDEX + _RUN_INDEX
_V1_COLUMNS = (
    "message_id, conversation_id, turn, role, content, status, created_at, scene, model,"
    " reasoning, tool_calls, finish_reason, error_code, prompt_tokens, completion_tokens,"
    " first_token_ms, duration_ms"
)
# Each makes the current table of a file at that version.
MIGRATE_FROM_1 = (
    _TABLE.format(name="messages_new")
    + f"INSERT INTO messages_new ({_V1_COLUMNS}) SELECT {_V1_COLUMNS} FROM messages;"
    + "DROP TABLE messages; ALTER TABLE messages_new RENAME TO messages;"
    + _INDEX
    + _RUN_INDEX
)
MIGRATE_FROM_2 = "ALTER TABLE messages ADD COLUMN prompt TEXT;" + _RUN_INDEX
MIGRATE_FROM_3 = _RUN_INDEX
MIGRATIONS = {
    0: SCHEMA,
    1: MIGRATE_FROM_1,
    2: MIGRATE_FROM_2,
    3: MIGRATE_FROM_3,
    SCHEMA_VERSION: "",
}
# At start-up no run is running: a row still `streaming` is an answer cut by a crash, and
# keeps the text flushed before it.
END_STREAMING = "UPDATE messages SET status = 'incomplete' WHERE status = 'streaming'"


class MessageRecord(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    message_id: str  # "{scene}:{conversationId}:{turn}", user message: "...:{turn}:user"
    conversation_id: str
    role: str  # "user" | "assistant"
    content: str  # user: what the user typed (scenes.typed); assistant: the answer
    # user: "complete"; assistant: "complete" | "error" | "cancelled" | "incomplete" |
    # "streaming" (its run is running, or was when lean died: marked incomplete at start-up)
    status: str
    created_at: str  # ISO 8601 UTC with milliseconds, "2026-11-21T16:40:00.123Z"
    turn: int
    scene: str = ""
    model: str = ""
    reasoning: str = ""
    # each {"id", "name", "arguments", "result", "isError", "durationMs"}
    tool_calls: list[dict[str, Any]] = msgspec.field(default_factory=list)
    finish_reason: str | None = None
    error_code: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    first_token_ms: float | None = None  # latency to the first visible token
    duration_ms: float | None = None
    run_id: str | None = None  # the run that wrote an assistant message
    # user: the filled template, what the model saw (stored NULL when equal to `content`,
    # read back filled in); assistant: None
    prompt: str | None = None


# Columns in MessageRecord's field order, so a row is msgspec.structs.astuple(record).
_FIELDS = MessageRecord.__struct_fields__
_TOOL_CALLS = _FIELDS.index("tool_calls")
_COLUMNS = ", ".join(_FIELDS)
INSERT_MESSAGE = (
    f"INSERT OR REPLACE INTO messages ({_COLUMNS}) VALUES ({', '.join('?' * len(_FIELDS))})"
)
_LAST_TURN = "SELECT coalesce(max(turn), 0) FROM messages WHERE conversation_id = ?"
# Newest first so LIMIT keeps the latest messages; the caller reverses.
SELECT_MESSAGES = (
    f"SELECT {_COLUMNS} FROM messages WHERE conversation_id = ?"
    " ORDER BY turn DESC, role = 'user' LIMIT ?"
)
SELECT_HISTORY = (  # the user's side as the model saw it: the filled template
    "SELECT coalesce(u.prompt, u.content), a.content FROM messages AS a JOIN messages AS u"
    " ON u.conversation_id = a.conversation_id AND u.turn = a.turn AND u.role = 'user'"
    " WHERE a.conversation_id = ? AND a.role = 'assistant' AND a.content != ''"
    " AND a.status != 'streaming'"
    " ORDER BY a.turn DESC LIMIT ?"
)
SELECT_EXISTS = "SELECT 1 FROM messages WHERE conversation_id = ? LIMIT 1"
# A run's answer (a WebSocket's run ids are its client's: the latest of that id).
SELECT_RUN = (
    f"SELECT {_COLUMNS} FROM messages WHERE run_id = ? AND role = 'assistant'"
    " ORDER BY created_at DESC LIMIT 1"
)
# A running answer's text so far; a row its run has already saved for good is left alone.
UPDATE_STREAMING = (
    "UPDATE messages SET content = ?, reasoning = ? WHERE message_id = ? AND status = 'streaming'"
)


def utc_now() -> str:
    """Now as the store writes timestamps: ISO 8601 UTC with milliseconds and a Z."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_encode_json = msgspec.json.Encoder().encode
_decode_tool_calls = msgspec.json.Decoder(list[dict[str, Any]]).decode


def begin_turn(
    conn: sqlite3.Connection, cid: str, scene: str, content: str, at: str, prompt: str | None
) -> int:
    """Write the user message of the conversation's next turn; its number (writer thread).
    `prompt` is the filled template, when it differs from `content`."""
    turn: int = conn.execute(_LAST_TURN, (cid,)).fetchone()[0] + 1
    user = MessageRecord(
        message_id=f"{scene}:{cid}:{turn}:user",
        conversation_id=cid,
        role="user",
        content=content,
        status="complete",
        created_at=at,
        turn=turn,
        scene=scene,
        prompt=None if prompt == content else prompt,
    )
    conn.execute(INSERT_MESSAGE, row(user))
    return turn


def row(record: MessageRecord) -> list[Any]:
    """The record as an `INSERT_MESSAGE` row."""
    values = list(msgspec.structs.astuple(record))
    values[_TOOL_CALLS] = _encode_json(record.tool_calls).decode() if record.tool_calls else "[]"
    return values


def records(rows: list[tuple[Any, ...]]) -> list[MessageRecord]:
    """`SELECT_MESSAGES` rows (newest first) as records, oldest first."""
    out = []
    for row in reversed(rows):  # selected newest first
        fields = dict(zip(_FIELDS, row, strict=True))
        tool_calls = fields["tool_calls"]
        fields["tool_calls"] = [] if tool_calls == "[]" else _decode_tool_calls(tool_calls)
        if fields["role"] == "user" and fields["prompt"] is None:
            fields["prompt"] = fields["content"]
        out.append(MessageRecord(**fields))
    return out


def history(rows: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """`SELECT_HISTORY` rows (newest first) as (role, content) pairs, oldest first."""
    out: list[tuple[str, str]] = []
    for user, assistant in reversed(rows):  # selected newest first
        out += (("user", user), ("assistant", assistant))
    return out


class TextBuffer:
    """An answer's text as it arrives, a few bytes over its length.

    A streamed token is ~4 characters; kept as its own `str` it would cost ~64 bytes
    and a list slot, 10-15x the text. Fragments are joined every `FOLD`, so what a
    running answer holds is its text plus one short list.
    """

    FOLD = 16

    __slots__ = ("_joined", "_recent", "size")

    def __init__(self) -> None:
        self._joined: list[str] = []
        self._recent: list[str] = []
        self.size = 0  # characters so far

    def add(self, text: str) -> None:
        recent = self._recent
        recent.append(text)
        self.size += len(text)
        if len(recent) >= self.FOLD:
            self._joined.append("".join(recent))
            recent.clear()

    def slice(self, begin: int, end: int) -> str:
        """`text()[begin:end]`, walking the pieces back from the end: a slice near the end
        (a resumed reader's live delta) costs its own length, not the whole text's. One far
        back joins the text once, as `text()` does, and the next ones then start there."""
        parts: list[str] = []
        stop = self.size  # where the piece looked at ends
        pieces = itertools.chain(reversed(self._recent), reversed(self._joined))
        for walked, piece in enumerate(pieces):
            if walked == self.FOLD * 4:
                return self.text()[begin:end]
            start = stop - len(piece)
            if start < end:
                parts.append(piece[max(begin - start, 0) : end - start])
            if start <= begin:
                break
            stop = start
        parts.reverse()
        return "".join(parts)

    def text(self) -> str:
        """All of it; afterwards held as that one string (shared with the caller)."""
        if len(self._joined) != 1 or self._recent:
            whole = "".join(self._joined) + "".join(self._recent)
            self._joined = [whole]
            self._recent.clear()
        return self._joined[0]
