"""The store's reads (docs/protocol.md §2, §6, §8): what a conversation, a run or a Responses
chain saved, for its owner. Each is one SELECT that `Store._query` runs on the reader
thread after the writes queued before it; the store is `lean.store.Store`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from lean.messages import (
    SELECT_EXISTS,
    SELECT_HISTORY,
    SELECT_MESSAGES,
    SELECT_RUN,
    MessageRecord,
    history,
    records,
)
from lean.saved_responses import MAX_CHAIN, SELECT_CHAIN
from lean.saved_responses import history as chain_messages

__all__ = ["StoreReads"]

_T = TypeVar("_T")


class StoreReads:
    async def _query(self, sql: str, args: tuple[Any, ...], convert: Callable[[Any], _T]) -> _T:
        raise NotImplementedError  # lean.store.Store's

    async def messages(self, conversation_id: str, *, limit: int = 1000) -> list[MessageRecord]:
        """The latest `limit` messages, oldest first (by turn, user before assistant)."""
        if limit <= 0:
            return []
        return await self._query(SELECT_MESSAGES, (conversation_id, limit), records)

    async def history(self, conversation_id: str, turns: int) -> list[tuple[str, str]]:
        """The last `turns` answered turns as [(role, content)], oldest first.

        A turn counts when its assistant message has text, whatever its status (an
        `incomplete` or `cancelled` answer keeps the text the user saw). A turn without one
        (an empty error, or still running) is left out whole, user message included, so the
        result always alternates user/assistant as providers require.
        """
        if turns <= 0:
            return []
        return await self._query(SELECT_HISTORY, (conversation_id, turns), history)

    async def run_answer(self, run_id: str, client: str | None = None) -> MessageRecord | None:
        """The answer the run `run_id` saved (the latest, for a reused id) when `client` owns
        it (None: the default client), or None: another client's run is not there for it."""
        found = await self._query(SELECT_RUN, (run_id, client or ""), records)
        return found[0] if found else None

    async def conversation_exists(self, conversation_id: str, client: str | None = None) -> bool:
        """Whether the conversation has messages and `client` owns it (None: the default
        client, which owns the rows written before clients existed)."""
        return await self._query(SELECT_EXISTS, (conversation_id, client or ""), bool)

    async def response_history(
        self, response_id: str, client: str | None = None
    ) -> list[dict[str, Any]] | None:
        """The messages of the chain that ends with `response_id`, oldest first; None when
        lean saved no such response for `client` (None: the default client)."""
        args = (response_id, client or "", MAX_CHAIN, client or "")
        return await self._query(SELECT_CHAIN, args, chain_messages)
