"""A saved message: its shape, its table (the same on SQLite and PostgreSQL), the schema's
versions, and the conversion between a record and a row.

`lean.store` moves these rows through its writer thread; this module says what they are.
Columns follow `MessageRecord`'s field order, so a row is the record's tuple (tool calls
as JSON text).
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from typing import Any

import msgspec

# The schema is a list of steps: MIGRATIONS[v] takes a database at version v to v + 1. A new
# database runs every step, so an old database and a new one take the same path. Each is plain
# SQL that SQLite and PostgreSQL both run (lean.store_sqlite, lean.store_pg); to change the
# schema, append a step (CREATE TABLE / CREATE INDEX / ALTER TABLE ... ADD COLUMN, types TEXT,
# INTEGER, REAL) and never edit one that has shipped. The version is kept in the database
# (SQLite: PRAGMA user_version; PostgreSQL: the table lean_schema); a database at a newer
# version than this lean's is refused, not guessed at.
#
# Version 1: the messages table.
# Version 2: status `streaming` (a run's answer while it runs, flushed as it grows) and
# `run_id`. SQLite cannot change a CHECK in place, so the table is copied into a new one.
# Version 3: `prompt`, the filled template a user message became (what the model saw), beside
# `content`, what the user typed. NULL when the two are the same (a `{message}` template), so
# a plain chat stores its text once; a version-2 row (whose `content` was the filled template)
# gets NULL too, and reads back as before. A nullable column added at the end needs no copy.
# Version 4: `client`, the `[client.NAME]` that owns the conversation (docs/protocol.md §8);
# NULL for the default client, which so owns every row written before. Not a field of
# `MessageRecord`: it is never shown, only compared (`next_turn`, SELECT_EXISTS, SELECT_RUN).
# Version 5: the `responses` table (lean.saved_responses has its SQL): saved Responses
# answers, for `previous_response_id` (docs/protocol.md §1), each owned by its `client`
# (NULL: the default client) as conversations are.
# Version 6: `instance`, the lean instance that wrote an assistant row ([cluster] instance),
# so the start-up sweep of `streaming` rows touches only the starting instance's own answers
# while other instances sharing the database keep running theirs (docs/protocol.md §4). NULL
# on user rows and on rows from before version 6. Not a field of `MessageRecord` either.
# Version 7: an index on `run_id`, so a resume of a run lean no longer buffers finds its
# saved answer without reading the whole table (lean.resume).
_V1_COLUMNS = (
    "message_id, conversation_id, turn, role, content, status, created_at, scene, model,"
    " reasoning, tool_calls, finish_reason, error_code, prompt_tokens, completion_tokens,"
    " first_token_ms, duration_ms"
)
_TABLE = """
CREATE TABLE {name} (
    message_id TEXT PRIMARY KEY,
    conversation_id TEXT NOT NULL,
    turn INTEGER NOT NULL CHECK (turn >= 1),
    role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    content TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ({statuses})),
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
    duration_ms REAL,{more}
    CHECK (role = 'assistant' OR status = 'complete')
);
"""
_STATUSES = "'complete', 'error', 'cancelled', 'incomplete'"
_INDEX = "CREATE INDEX IF NOT EXISTS messages_by_turn ON messages (conversation_id, turn);"
MIGRATIONS: list[str] = [
    # 0 -> 1
    _TABLE.format(name="IF NOT EXISTS messages", statuses=_STATUSES, more="") + _INDEX,
    # 1 -> 2
    _TABLE.format(
        name="messages_new", statuses=_STATUSES + ", 'streaming'", more="\n    run_id TEXT,"
    )
    + f"INSERT INTO messages_new ({_V1_COLUMNS}) SELECT {_V1_COLUMNS} FROM messages;"
    + "DROP TABLE messages; ALTER TABLE messages_new RENAME TO messages;"
    + _INDEX,
    # 2 -> 3
    "ALTER TABLE messages ADD COLUMN prompt TEXT;",
    # 3 -> 4
    "ALTER TABLE messages ADD COLUMN client TEXT;",
    # 4 -> 5
    """
CREATE TABLE responses (
    response_id TEXT PRIMARY KEY,
    previous_id TEXT,
    client TEXT,
    model TEXT NOT NULL,
    messages TEXT NOT NULL,  -- JSON array: this turn's input messages, then the answer
    created_at TEXT NOT NULL
);
""",
    # 5 -> 6
    "ALTER TABLE messages ADD COLUMN instance TEXT;",
    # 6 -> 7
    "CREATE INDEX IF NOT EXISTS messages_by_run ON messages (run_id);",
]
SCHEMA_VERSION = len(MIGRATIONS)  # 7
SCHEMA = "".join(MIGRATIONS)  # a new database's schema, every step in one script
# At start-up no run of this instance is running: a row of its own still `streaming` is an
# answer cut by a crash, and keeps the text flushed before it. Rows of other instances
# sharing the database are theirs to end; a row without an instance was written by a lean
# from before version 5, when one process owned the database (parameter: this instance's
# name).
END_STREAMING = (
    "UPDATE messages SET status = 'incomplete'"
    " WHERE status = 'streaming' AND (instance = ? OR instance IS NULL)"
)


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
# An upsert, not SQLite's INSERT OR REPLACE, so one statement serves both databases. A
# record's row, then its owner and the instance that wrote it (`row`).
INSERT_MESSAGE = (
    f"INSERT INTO messages ({_COLUMNS}, client, instance)"
    f" VALUES ({', '.join('?' * (len(_FIELDS) + 2))})"
    " ON CONFLICT (message_id) DO UPDATE SET "
    + ", ".join(f"{name} = excluded.{name}" for name in (*_FIELDS[1:], "client", "instance"))
)
# The conversation's last turn and its owner (`next_turn`).
LAST_TURN = "SELECT turn, client FROM messages WHERE conversation_id = ? ORDER BY turn DESC LIMIT 1"
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
# A conversation exists for a client when it owns it ('' for the default client's NULL).
SELECT_EXISTS = (
    "SELECT 1 FROM messages WHERE conversation_id = ? AND coalesce(client, '') = ? LIMIT 1"
)
# A run's answer, when `client` owns it ('' for the default client's NULL); a WebSocket's run
# ids are its client's: the latest of that id.
SELECT_RUN = (
    f"SELECT {_COLUMNS} FROM messages WHERE run_id = ? AND role = 'assistant'"
    " AND coalesce(client, '') = ? ORDER BY created_at DESC LIMIT 1"
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


def next_turn(last: tuple[Any, ...] | None, client: str | None) -> int:
    """The number of a conversation's next turn from its `LAST_TURN` row, or 0 when the
    conversation belongs to another client than `client` (None: the default client)."""
    if last is None:
        return 1
    if last[1] != client:
        return 0
    return int(last[0]) + 1


def user_row(
    cid: str,
    scene: str,
    content: str,
    at: str,
    prompt: str | None,
    turn: int,
    client: str | None = None,
) -> list[Any]:
    """The user message of a conversation's turn `turn`, owned by `client`, as an
    `INSERT_MESSAGE` row. `prompt` is the filled template, kept when it differs from
    `content`."""
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
    return row(user, client)


def row(record: MessageRecord, client: str | None = None, instance: str | None = None) -> list[Any]:
    """The record as an `INSERT_MESSAGE` row, owned by `client` (None: the default) and
    written by `instance` (None on user rows: the sweep at start-up looks at answers only)."""
    values = list(msgspec.structs.astuple(record))
    values[_TOOL_CALLS] = _encode_json(record.tool_calls).decode() if record.tool_calls else "[]"
    values.append(client)
    values.append(instance)
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
