"""Whose failure it was travels as a type: a receiver whose client failed raises
`ClientGone`, and the upstream boundary (upstream, relay) passes it through: no retry, no
fallback, no upstream error counted. Lean's own Relay and Upstream, a real fake upstream."""

from __future__ import annotations

import pytest

from lean.client_io import ClientGone
from lean.errors import SlowClient
from lean.guard import Guard
from lean.providers.base import Piece
from lean.relay import Relay
from lean.services import Services
from tests.fakes import FakeOpenAI, completion, text_stream
from tests.support import lean_config

TEXT = "one two three four five six"


class Leaving:
    """A receiver whose client fails at its `after`-th batch."""

    def __init__(self, after: int, *, on_drain: bool = False) -> None:
        self.batches: list[list[Piece]] = []
        self.after = after
        self.on_drain = on_drain

    def push(self, batch: list[Piece]) -> bool:
        self.batches.append(batch)
        if len(self.batches) >= self.after:
            if not self.on_drain:
                raise ClientGone(SlowClient("cut"))
            return True
        return False

    async def drain(self) -> None:
        raise ClientGone(SlowClient("cut"))


@pytest.mark.parametrize("on_drain", [False, True])
@pytest.mark.parametrize("after", [1, 3])
async def test_a_client_failure_passes_the_upstream_boundary_as_itself(
    after: int, on_drain: bool
) -> None:
    async with FakeOpenAI() as fake:
        config = lean_config(fake.base_url, model="retries = 2")
        services = Services(config)
        await services.upstream.start()
        guard = Guard(ping_interval=60, slow_client_timeout=5)
        try:
            stream = text_stream(TEXT)
            stream.delay = 0.002
            fake.push(stream, completion(TEXT), completion(TEXT))
            receiver = Leaving(after, on_drain=on_drain)
            relay = Relay(services, config.models["default"], {"messages": []}, guard)
            with pytest.raises(ClientGone) as gone:
                await relay.run(receiver)
        finally:
            await guard.close()
            await services.upstream.close()
    assert isinstance(gone.value.reason, SlowClient)
    assert len(fake.requests) == 1  # not retried, no fallback
    assert not services.metrics.upstream_errors and not relay.fallback
