"""Client connections: a deadline for each request head, one for idle keep-alive, a bound.

aiohttp's server has no header-read timeout and no bound on connections, and its
keep-alive timer (3,630 s by default) is not reset by bytes: 500 slowloris and 2,000
idle sockets all stayed open until `LimitNOFILE` was reached and lean served nothing.
The rules here, with `[server]` keys:

- `header_timeout`: a request's head (request line and headers) must be whole within
  this, counted from the connection's start for its first request, from the request's
  first byte for later ones on a kept-alive connection. Else the connection is closed.
- `keepalive_timeout`: a connection idle between requests (no byte since its last
  response) is closed after this.
- `max_connections`: at the bound, a new connection makes room by closing one with no
  request running: the one idle the longest between requests, else the one that has
  been sending its head the longest. So idle and slowloris sockets give way to new
  clients. When every connection is running
  a request, up to `RESERVED` more are let in for `/healthz` and `/readyz` (anything
  else there gets 503 `overloaded` and the connection closes); past those, a new
  connection is closed at once. So the probes stay answerable at the bound.

One sweeper task per server checks the deadlines (every `SWEEP_EVERY` at most, so a
deadline is kept to within that): no timer per connection, two dict operations per
request, one membership test per read of a client's bytes.

aiohttp's server offers no hook on connections: `lean.aiohttp_internals` (items 3 and 4)
swaps the classes of its low-level server and of each request handler to report them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from typing import Any

from aiohttp import web_protocol, web_server

from lean.aiohttp_internals import watch_server

__all__ = ["RESERVED", "SWEEP_EVERY", "Connections"]

# Connections let in past `max_connections` when every one is running a request, for the
# health probes only: systemd's or a load balancer's probe, and a person with curl.
RESERVED = 8
# The longest wait between two checks of the deadlines (shorter when a deadline is).
SWEEP_EVERY = 1.0

Protocol = web_protocol.RequestHandler


class Connections:
    """The client connections of one server, and the rules above."""

    def __init__(
        self,
        *,
        header_timeout: float,
        keepalive_timeout: float,
        max_connections: int,
        rejections: Counter[tuple[str]] | None = None,
    ) -> None:
        self.header_timeout = header_timeout
        self.keepalive_timeout = keepalive_timeout
        self.max_connections = max_connections
        self._open: set[Protocol] = set()
        # Connections with no request running, each in the order its clock started:
        self._heads: dict[Protocol, float] = {}  # a head on its way, since
        self._idle: dict[Protocol, float] = {}  # no byte since the last response, since
        self._reserve: set[Protocol] = set()  # let in past the bound: probes only
        self._sweeper: asyncio.Task[None] | None = None
        # lean_admission_rejections_total{reason}: "header_timeout", "max_connections"
        # (closed to make room, or refused); an idle connection closed is no rejection.
        self._rejections: Counter[tuple[str]] = Counter() if rejections is None else rejections

    def __len__(self) -> int:
        return len(self._open)

    # --- wiring ---

    def watch(self, server: web_server.Server) -> None:
        """Take over `server`'s connections; before it listens."""
        watch_server(
            server, opened=self.opened, lost=self.lost, first_byte=self.first_byte, idle=self._idle
        )

    def start(self) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

    # --- events ---

    def opened(self, protocol: Protocol, now: float) -> None:
        if len(self._open) - len(self._reserve) >= self.max_connections:
            victim = self._longest_idle()
            if victim is not None:
                self._close(victim)
            elif len(self._reserve) < RESERVED:
                self._reserve.add(protocol)
            else:
                self._rejections[("max_connections",)] += 1
                protocol.force_close()
                return
        self._open.add(protocol)
        self._heads[protocol] = now  # the first head's clock runs from the start

    def lost(self, protocol: Protocol) -> None:
        self._forget(protocol)

    def first_byte(self, protocol: Protocol, now: float) -> None:
        """The first bytes since the last response: a head starts its clock."""
        if self._idle.pop(protocol, None) is not None:
            self._heads[protocol] = now

    def refuses(self, protocol: Any) -> bool:
        """Whether a request other than the probes is refused on `protocol` (counted):
        true on a connection let in past the bound."""
        if protocol in self._reserve:
            self._rejections[("max_connections",)] += 1
            return True
        return False

    def busy(self, protocol: Any) -> None:
        """A request runs on `protocol`: no deadline here until it ends."""
        self._heads.pop(protocol, None)
        self._idle.pop(protocol, None)

    def done(self, protocol: Any, now: float) -> None:
        """The request ended; the connection waits for the next one (if it stays open)."""
        if protocol in self._open:
            self._idle[protocol] = now

    # --- inside ---

    def _longest_idle(self) -> Protocol | None:
        """The regular connection idle the longest: between requests first, then one still
        sending its head (a slowloris, or a slow client). Closing a reserved one frees no
        regular place: at most RESERVED are skipped."""
        for table in (self._idle, self._heads):
            for protocol in table:
                if protocol not in self._reserve:
                    return protocol
        return None

    def _forget(self, protocol: Protocol) -> None:
        self._open.discard(protocol)
        self._reserve.discard(protocol)
        self._heads.pop(protocol, None)
        self._idle.pop(protocol, None)

    def _close(self, protocol: Protocol) -> None:
        self._rejections[("max_connections",)] += 1
        self._forget(protocol)  # now: its connection_lost comes in a later loop turn
        protocol.force_close()

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        every = min(SWEEP_EVERY, self.header_timeout / 4, self.keepalive_timeout / 4)
        while True:
            await asyncio.sleep(every)
            now = loop.time()
            self._expire(self._heads, now - self.header_timeout, "header_timeout")
            self._expire(self._idle, now - self.keepalive_timeout, None)

    def _expire(
        self, table: dict[Protocol, float], started_before: float, reason: str | None
    ) -> None:
        while table:
            protocol, since = next(iter(table.items()))
            if since > started_before:
                return  # the table is in the order the clocks started
            if reason is not None:
                self._rejections[(reason,)] += 1
            self._forget(protocol)
            protocol.force_close()
