"""Wires: the kinds of streaming client, each a request and a reader of its events.

A scenario group names a wire; `--wires` picks lean's. The reference targets (relay,
direct) speak only `openai`, the mock's own protocol (targets.Target.client_for). Every
wire asks the mock for its stream the same way: `[bench chunks=.. interval=.. size=..]`
in the message (see mock.py). To add a client kind: a class with `name`, `request()`
and `reader()`, listed in `WIRES`.
"""

from __future__ import annotations

from typing import Protocol

import msgspec

from bench.harness.clients import EventReader, NDJSONReader, SSEReader
from bench.harness.websocket import OP_TEXT, ws_frame, ws_upgrade

_encode = msgspec.json.Encoder().encode


class Ask(msgspec.Struct, frozen=True):
    """What a stream asks of the mock (see mock.py): content chunks, their interval and size."""

    chunks: int
    interval: float
    size: int

    def marker(self) -> str:
        return f"[bench chunks={self.chunks} interval={self.interval:g} size={self.size}]"


def _post(path: bytes, host: str, port: int, accept: bytes, body: bytes) -> bytes:
    return (
        b"POST %b HTTP/1.1\r\nHost: %b:%d\r\nContent-Type: application/json\r\n"
        b"Accept: %b\r\nContent-Length: %d\r\n\r\n%b"
        % (path, host.encode(), port, accept, len(body), body)
    )


class Wire(Protocol):
    """One client kind of stream: its request bytes and the reader of its events."""

    name: str

    def request(self, host: str, port: int, ask: Ask) -> bytes: ...

    def reader(self) -> EventReader: ...


class OpenAIWire:
    """`POST /v1/chat/completions`, `stream: true`; `data: [DONE]` ends it."""

    name = "openai"

    def request(self, host: str, port: int, ask: Ask) -> bytes:
        body = _encode(
            {
                "model": BENCH_MODEL,
                "messages": [{"role": "user", "content": ask.marker() + " Tell me a story."}],
                "stream": True,
                "bench_chunks": ask.chunks,  # for upstreams reached without lean (direct, relay)
                "bench_interval": ask.interval,
                "bench_size": ask.size,
            }
        )
        return _post(b"/v1/chat/completions", host, port, b"text/event-stream", body)

    def reader(self) -> EventReader:
        return SSEReader(content=b'"content":', end=b"data: [DONE]")


class SceneSSEWire:
    """`POST /v1/scenes/bench/stream` as SSE: `event: delta` ... `event: done`."""

    name = "scene-sse"

    def request(self, host: str, port: int, ask: Ask) -> bytes:
        body = _encode({"message": ask.marker() + " Tell me a story."})
        return _post(SCENE_PATH, host, port, b"text/event-stream", body)

    def reader(self) -> EventReader:
        return SSEReader(content=b"event: delta", end=b"event: done", error=b"event: error")


class SceneNDJSONWire:
    """`POST /v1/scenes/bench/stream` as NDJSON: one `{"type": ...}` object per line."""

    name = "scene-ndjson"

    def request(self, host: str, port: int, ask: Ask) -> bytes:
        body = _encode({"message": ask.marker() + " Tell me a story."})
        return _post(SCENE_PATH, host, port, b"application/x-ndjson", body)

    def reader(self) -> EventReader:
        return NDJSONReader(
            content=b'{"type":"delta"', end=b'{"type":"done"', error=b'{"type":"error"'
        )


class WebSocketWire:
    """`GET /v1/ws`, then one `run` frame; the run's frames carry `"type"` like NDJSON."""

    name = "ws"

    def request(self, host: str, port: int, ask: Ask) -> bytes:
        return ws_upgrade(host, port)

    def run_frame(self, ask: Ask) -> bytes:
        frame = {"type": "run", "runId": "r1", "scene": BENCH_SCENE}
        frame["message"] = ask.marker() + " Tell me a story."
        return ws_frame(OP_TEXT, _encode(frame))

    def reader(self) -> EventReader:
        return NDJSONReader(
            content=b'"type":"delta"', end=b'"type":"done"', error=b'"type":"error"'
        )


BENCH_MODEL = "mock"  # the model alias and scene the bench's lean config defines
BENCH_SCENE = "bench"
SCENE_PATH = b"/v1/scenes/bench/stream"
WIRES: dict[str, Wire] = {
    w.name: w for w in (OpenAIWire(), SceneSSEWire(), SceneNDJSONWire(), WebSocketWire())
}
IDLE_WIRES = ("idle-http", "idle-ws")  # what an idle connection is: keep-alive HTTP or a WebSocket
