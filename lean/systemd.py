"""systemd's notify protocol (sd_notify(3), sd_watchdog_enabled(3)), standard library only.

Strategy: under `Type=notify` systemd passes `$NOTIFY_SOCKET`, an AF_UNIX datagram socket
(a filesystem path, or an abstract name written with a leading "@"). lean sends it
newline-separated `KEY=VALUE` assignments, one datagram per message:

- `READY=1` once the server listens, so `systemctl start` returns only when lean serves;
- `STOPPING=1` when the drain starts, so `systemctl status` says why lean is still running;
- `WATCHDOG=1` every `$WATCHDOG_USEC / 2` while `$WATCHDOG_USEC` is set (and
  `$WATCHDOG_PID` is unset or our pid), from a task on lean's own event loop.

Guarantees: without `$NOTIFY_SOCKET` every method is a no-op costing one attribute check;
sends never block (non-blocking socket, tiny datagrams) and never raise into the server:
a failure is logged once and the next message is tried again. The price: a datagram
refused because the receiver's queue is full is lost. systemd drains its socket at once,
so in practice this is a test harness that does not read; a lost ping is covered by the
next one (two per WatchdogSec). libsystemd's sd_notify blocks instead; lean's event loop
must not. No dependency: this is the whole protocol lean needs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger("lean.systemd")


def _address(value: str) -> str | None:
    """The socket address of `$NOTIFY_SOCKET`; None when unset or of a kind lean can't use."""
    if value.startswith("@"):
        return "\0" + value[1:]  # Linux abstract namespace
    if value.startswith("/"):
        return value
    if value:  # e.g. "vsock:..." (systemd 253+, for VMs): not something lean runs under
        log.warning("NOTIFY_SOCKET=%r is not a unix socket path; systemd notify disabled", value)
    return None


def _watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Seconds between pings as sd_watchdog_enabled(3) decides, or None for no watchdog."""
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec:
        return None
    pid = environ.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None  # the watchdog is another process's (we were started by it, say)
    try:
        value = int(usec)
    except ValueError:
        value = 0
    if value <= 0:
        log.warning("WATCHDOG_USEC=%r is not a positive integer; watchdog pings disabled", usec)
        return None
    # Half the timeout, as sd_watchdog_enabled(3) advises: one late ping is not fatal.
    return value / 2_000_000


def _line(text: str) -> str:
    """A value on one line: a newline would start another assignment."""
    return text.replace("\n", " ")


class Notifier:
    """Tells systemd lean's state through `$NOTIFY_SOCKET`; does nothing without it."""

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        self._address = _address(environ.get("NOTIFY_SOCKET", ""))
        self._socket: socket.socket | None = None
        if self._address is not None:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._socket.setblocking(False)
        self.watchdog_interval = _watchdog_interval(environ) if self._socket is not None else None
        self._watchdog: asyncio.Task[None] | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def ready(self, status: str) -> None:
        self._send(f"READY=1\nSTATUS={_line(status)}")

    def stopping(self, status: str) -> None:
        self._send(f"STOPPING=1\nSTATUS={_line(status)}")

    def start_watchdog(self) -> None:
        """Ping from now on, when systemd asked for it; call on the running loop, once."""
        if self.watchdog_interval is None:
            return
        if self._watchdog is not None:
            raise RuntimeError("the watchdog is already running")
        log.info("systemd watchdog: pinging every %g s", self.watchdog_interval)
        self._watchdog = asyncio.get_running_loop().create_task(
            self._ping(self.watchdog_interval), name="lean-systemd-watchdog"
        )

    async def close(self) -> None:
        """Stop pinging and close the socket; idempotent."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            # wait() rather than `await task`: it never raises the task's CancelledError,
            # so a cancellation of the caller itself still propagates.
            await asyncio.wait((self._watchdog,))
            self._watchdog = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    async def _ping(self, interval: float) -> None:
        # The pings come from lean's event loop on purpose, not from a thread: a loop that
        # is stuck (a blocking call, a busy loop) stops them, systemd kills lean after
        # WatchdogSec= and restarts it (Restart=on-failure counts a watchdog timeout).
        while True:
            self._send("WATCHDOG=1")
            await asyncio.sleep(interval)

    def _send(self, message: str) -> None:
        if self._socket is None or self._address is None:
            return
        try:
            self._socket.sendto(message.encode(), self._address)
        except OSError as exc:  # full buffer (BlockingIOError), socket gone, refused...
            if not self._warned:
                self._warned = True
                log.warning("systemd notify failed (logged once): %s", exc)
