"""One connection to Redis on asyncio, speaking `lean.resp`: commands pipelined, replies
matched in order; or, once subscribed, every reply handed to a callback.

`send` writes a command and returns at once (its reply is read and dropped): a run's
registry updates cost a write, never an await or a task. `call` returns a future of the
reply. A lost connection fails every waiting call with `ConnectionError`; reconnecting
is the caller's (`lean.cluster`), which knows what to set up again.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import NamedTuple, cast
from urllib.parse import unquote, urlsplit

from lean.resp import Parser, ProtocolError, Reply, ReplyError, command

# Bytes written and not yet taken by the kernel past which `send` refuses: Redis that
# stopped reading must not grow lean's memory. Thousands of commands' worth.
MAX_UNSENT = 4 * 1024 * 1024


class RedisAddress(NamedTuple):
    host: str
    port: int
    db: int
    username: str | None
    password: str | None

    @property
    def shown(self) -> str:
        """For logs: never the password."""
        return f"redis://{self.host}:{self.port}/{self.db}"


def parse_redis_url(url: str) -> RedisAddress:
    """`redis://[[user]:password@]host[:port][/db]`; ValueError naming what is wrong."""
    parts = urlsplit(url)
    if parts.scheme != "redis":
        raise ValueError("a redis:// URL (TLS and unix sockets are not supported)")
    if not parts.hostname:
        raise ValueError("a redis:// URL with a host")
    port = parts.port or 6379  # raises ValueError on a bad port
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError("a database number after the host, e.g. redis://127.0.0.1:6379/0")
    if parts.query or parts.fragment:
        raise ValueError("a redis:// URL without ?query or #fragment")
    return RedisAddress(
        parts.hostname,
        port,
        int(path or 0),
        unquote(parts.username) if parts.username else None,
        unquote(parts.password) if parts.password is not None else None,
    )


class RedisConnection(asyncio.Protocol):
    def __init__(self, on_push: Callable[[Reply], None] | None = None) -> None:
        self._parser = Parser()
        self._waiting: deque[asyncio.Future[Reply] | None] = deque()
        self._on_push = on_push  # subscribed: every reply goes there
        self._transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()

    @classmethod
    async def open(
        cls,
        address: RedisAddress,
        *,
        timeout: float,  # noqa: ASYNC109  (also bounds AUTH and SELECT)
        on_push: Callable[[Reply], None] | None = None,
    ) -> RedisConnection:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            _, conn = await loop.create_connection(lambda: cls(None), address.host, address.port)
            try:
                if address.password is not None:
                    auth = (address.username or "default", address.password)
                    await conn.call("AUTH", *auth)
                if address.db:
                    await conn.call("SELECT", address.db)
            except BaseException:
                conn.close()
                raise
        conn._on_push = on_push
        return conn

    @property
    def is_open(self) -> bool:
        return not self.closed.done()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self._parser.feed(data)
        try:
            replies = self._parser.replies()
        except ProtocolError as exc:
            self._fail(ConnectionError(f"redis: {exc}"))
            return
        for reply in replies:
            if self._on_push is not None:
                self._on_push(reply)
                continue
            if not self._waiting:
                self._fail(ConnectionError("redis: a reply to no command"))
                return
            future = self._waiting.popleft()
            if future is None or future.done():  # sent without waiting, or timed out
                continue
            if isinstance(reply, ReplyError):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError(f"redis: connection lost ({exc or 'closed by the server'})"))

    def _fail(self, error: ConnectionError) -> None:
        if self._transport is not None:
            self._transport.abort()
        while self._waiting:
            future = self._waiting.popleft()
            if future is not None and not future.done():
                future.set_exception(error)
        if not self.closed.done():
            self.closed.set_result(None)

    def close(self) -> None:
        self._fail(ConnectionError("redis: connection closed by lean"))

    def _write(self, data: bytes) -> None:
        transport = self._transport
        if transport is None or self.closed.done():
            raise ConnectionError("redis: not connected")
        if transport.get_write_buffer_size() > MAX_UNSENT:
            raise ConnectionError("redis: not reading what lean sends")
        transport.write(data)

    def send(self, *args: bytes | str | int) -> None:
        """Write a command, its reply dropped; raises `ConnectionError` when not connected."""
        self._write(command(*args))
        if self._on_push is None:
            self._waiting.append(None)

    def send_all(self, *commands: tuple[bytes | str | int, ...]) -> None:
        """`send` for several commands in one write (one system call, not one each)."""
        self._write(b"".join(command(*args) for args in commands))
        if self._on_push is None:
            self._waiting.extend(None for _ in commands)

    def call(self, *args: bytes | str | int) -> asyncio.Future[Reply]:
        """Write a command; the future gets its reply (`ReplyError` raised from it)."""
        self._write(command(*args))
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        return future
