"""RESP2, the Redis wire protocol: commands to bytes, bytes to replies, no I/O.

lean speaks to Redis with a few commands (EVALSHA, PUBLISH, SADD/SREM, HINCRBY,
SUBSCRIBE), so this is the whole of what it needs: a command is an array of bulk
strings; a reply is a simple string, an error, an integer, a bulk string (or nil) or an
array of replies. `Parser` takes bytes as they arrive and hands back whole replies; it
remembers where the unparsed part starts, so a reply cut at any byte costs one more look
at its head, not a re-read of everything before it.
"""

from __future__ import annotations

from typing import Union

# The largest bulk string lean accepts from Redis: lean's own messages are a client
# tool's result at most ([server] max_body_bytes, 1 MiB by default); Redis itself allows
# 512 MB. A peer that announces more is not the Redis lean talks to.
MAX_BULK = 64 * 1024 * 1024
# Nesting of arrays in one reply: lean's replies nest two deep (a pub/sub message).
MAX_DEPTH = 8
# Bytes of a line (+, -, :, $ and * headers) before its CRLF must have arrived.
MAX_LINE = 64 * 1024

Reply = Union[None, int, bytes, "ReplyError", list["Reply"]]


class ReplyError(Exception):
    """An error reply (`-ERR ...`): the command failed, the connection is fine."""

    @property
    def kind(self) -> str:
        """Its first word: ERR, NOSCRIPT, WRONGTYPE, BUSY, ..."""
        return str(self).partition(" ")[0]


class ProtocolError(Exception):
    """Bytes that are not RESP2: the connection cannot be trusted any longer."""


def command(*args: bytes | str | int) -> bytes:
    """One command as RESP: an array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(out)


class _Incomplete(Exception):
    pass


class Parser:
    """Bytes in (`feed`), whole replies out (`replies`)."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._start = 0  # where the first unparsed reply begins

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def replies(self) -> list[Reply]:
        """Every reply complete so far, in order; raises `ProtocolError` on bad bytes."""
        out: list[Reply] = []
        buffer = self._buffer
        while self._start < len(buffer):
            try:
                reply, self._start = self._parse(self._start, 0)
            except _Incomplete:
                break
            out.append(reply)
        if self._start:  # drop what was parsed, in one move per feed
            del buffer[: self._start]
            self._start = 0
        return out

    def _line(self, pos: int) -> tuple[bytes, int]:
        end = self._buffer.find(b"\r\n", pos)
        if end < 0:
            if len(self._buffer) - pos > MAX_LINE:
                raise ProtocolError("a RESP line longer than MAX_LINE")
            raise _Incomplete
        return bytes(self._buffer[pos + 1 : end]), end + 2

    def _int(self, line: bytes) -> int:
        try:
            return int(line)
        except ValueError:
            raise ProtocolError(f"not an integer: {line[:40]!r}") from None

    def _parse(self, pos: int, depth: int) -> tuple[Reply, int]:
        if pos >= len(self._buffer):
            raise _Incomplete
        kind = self._buffer[pos]
        line, pos = self._line(pos)
        if kind == 0x2B:  # + simple string
            return line, pos
        if kind == 0x2D:  # - error
            return ReplyError(line.decode(errors="replace")), pos
        if kind == 0x3A:  # : integer
            return self._int(line), pos
        if kind == 0x24:  # $ bulk string
            size = self._int(line)
            if size == -1:
                return None, pos
            if not 0 <= size <= MAX_BULK:
                raise ProtocolError(f"a bulk string of {size} bytes")
            end = pos + size
            if len(self._buffer) < end + 2:
                raise _Incomplete
            if self._buffer[end : end + 2] != b"\r\n":
                raise ProtocolError("a bulk string without its CRLF")
            return bytes(self._buffer[pos:end]), end + 2
        if kind == 0x2A:  # * array
            count = self._int(line)
            if count == -1:
                return None, pos
            if count < 0 or depth >= MAX_DEPTH:
                raise ProtocolError(f"an array of {count} at depth {depth}")
            items: list[Reply] = []
            for _ in range(count):
                item, pos = self._parse(pos, depth + 1)
                items.append(item)
            return items, pos
        raise ProtocolError(f"a reply starting with {bytes([kind])!r}")
