"""`lean.resp` fed bytes (every split offset), and `lean.redis_client` against the real
Redis on 127.0.0.1:6379, on asyncio and uvloop."""

from __future__ import annotations

import asyncio

import pytest

from lean.redis_client import RedisConnection, parse_redis_url
from lean.resp import MAX_BULK, Parser, ProtocolError, Reply, ReplyError, command
from tests.test_cluster import DB, redis_up

# Every kind of reply, as Redis sends it (examples from the RESP2 specification).
WIRE = (
    b"+OK\r\n"
    b"-ERR unknown command 'foo'\r\n"
    b":1000\r\n"
    b":-1\r\n"
    b"$5\r\nhello\r\n"
    b"$0\r\n\r\n"
    b"$-1\r\n"
    b"*-1\r\n"
    b"*0\r\n"
    b"*3\r\n$7\r\nmessage\r\n$4\r\nchan\r\n$6\r\na\r\nb\r\n\r\n"
    b"*2\r\n*1\r\n:1\r\n$1\r\nx\r\n"
)


def check(replies: list[Reply]) -> None:
    ok, error, *rest = replies
    assert ok == b"OK"
    assert isinstance(error, ReplyError) and error.kind == "ERR"
    assert rest == [
        1000,
        -1,
        b"hello",
        b"",
        None,
        None,
        [],
        [b"message", b"chan", b"a\r\nb\r\n"],  # a bulk string may hold CRLF
        [[1], b"x"],
    ]


def test_every_reply_kind_whole() -> None:
    parser = Parser()
    parser.feed(WIRE)
    check(parser.replies())
    assert parser.replies() == []


@pytest.mark.parametrize("step", [1, 2, 7])
def test_replies_split_at_every_offset(step: int) -> None:
    for cut in range(len(WIRE)):
        parser = Parser()
        replies: list[Reply] = []
        for piece in (WIRE[:cut], WIRE[cut:]):
            for i in range(0, len(piece), step):
                parser.feed(piece[i : i + step])
                replies += parser.replies()
        check(replies)


@pytest.mark.parametrize(
    "wire",
    [
        b"?what\r\n",
        b":12x\r\n",
        b"$%d\r\n" % (MAX_BULK + 1),
        b"$3\r\nabcXY",
        b"*" + b"*1\r\n" * 20,
        b"+" + b"x" * 70_000,
    ],
)
def test_bad_bytes_are_a_protocol_error(wire: bytes) -> None:
    parser = Parser()
    parser.feed(wire)
    with pytest.raises(ProtocolError):
        parser.replies()


def test_a_command_is_an_array_of_bulk_strings() -> None:
    assert command("SET", b"k\r\n", 12) == b"*3\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$2\r\n12\r\n"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1", ("127.0.0.1", 6379, 0, None, None)),
        ("redis://h:6380/3", ("h", 6380, 3, None, None)),
        ("redis://:p%40ss@h/1", ("h", 6379, 1, None, "p@ss")),
        ("redis://u:pw@[::1]:7000", ("::1", 7000, 0, "u", "pw")),
    ],
)
def test_redis_urls(url: str, expected: tuple[object, ...]) -> None:
    assert tuple(parse_redis_url(url)) == expected


@pytest.mark.parametrize(
    "url", ["http://h", "rediss://h", "redis://", "redis://h/x", "redis://h:99999", "redis://h?a=1"]
)
def test_bad_redis_urls(url: str) -> None:
    with pytest.raises(ValueError):
        parse_redis_url(url)


async def test_a_connection_pipelines_and_matches_replies() -> None:
    if not redis_up():
        pytest.skip("no Redis on 127.0.0.1:6379")
    address = parse_redis_url(f"redis://127.0.0.1:6379/{DB}")
    conn = await RedisConnection.open(address, timeout=2)
    try:
        conn.send("SET", "lean-test:resp", "v")  # reply dropped, order kept
        replies = [conn.call("GET", "lean-test:resp"), conn.call("NOPE"), conn.call("PING")]
        got, failed, pong = await asyncio.gather(*replies, return_exceptions=True)
        assert (got, pong) == (b"v", b"PONG")
        assert isinstance(failed, ReplyError) and failed.kind == "ERR"
        big = b"x" * 300_000  # arrives in many reads
        conn.send("SET", "lean-test:resp", big)
        assert await conn.call("GET", "lean-test:resp") == big
        await conn.call("DEL", "lean-test:resp")
        # a lost connection fails what waits, and refuses what follows
        waiting = conn.call("BLPOP", "lean-test:never", "5")
        conn.close()
        with pytest.raises(ConnectionError):
            await waiting
        with pytest.raises(ConnectionError):
            conn.send("PING")
        assert not conn.is_open
    finally:
        conn.close()


async def test_a_subscribed_connection_hands_every_push_over() -> None:
    if not redis_up():
        pytest.skip("no Redis on 127.0.0.1:6379")
    address = parse_redis_url(f"redis://127.0.0.1:6379/{DB}")
    pushed: asyncio.Queue[Reply] = asyncio.Queue()
    sub = await RedisConnection.open(address, timeout=2, on_push=pushed.put_nowait)
    conn = await RedisConnection.open(address, timeout=2)
    # Channels span Redis's databases: the name carries this xdist worker's, so that the
    # other worker running this test at once is not a second subscriber.
    chan = f"lean-test:{DB}:chan"
    try:
        sub.send("SUBSCRIBE", chan)
        assert await asyncio.wait_for(pushed.get(), 2) == [b"subscribe", chan.encode(), 1]
        assert await conn.call("PUBLISH", chan, b"\x00hi\r\n") == 1
        assert await asyncio.wait_for(pushed.get(), 2) == [
            b"message",
            chan.encode(),
            b"\x00hi\r\n",
        ]
    finally:
        sub.close()
        conn.close()
