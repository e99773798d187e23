"""Child processes of the bench: pinned, with raised fd limits, always cleaned up.

Each child is started through `taskset` (its core), `prlimit` (RLIMIT_NOFILE soft =
hard: a proxy holds two sockets per stream) and `setpriv --pdeathsig TERM` (it dies
with the runner even if the runner is killed), in its own session so a Ctrl-C reaches
only the runner, which then stops every child in order.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: `bench` and `lean` import from here


def cores() -> tuple[int | None, int | None]:
    """(target core, harness core): lean or the relay on one, mock and load on the other."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) >= 2 and shutil.which("taskset"):
        return allowed[-1], allowed[0]
    return None, None


def pin_self(core: int | None) -> None:
    if core is not None:
        os.sched_setaffinity(0, {core})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nofile_hard() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def raise_nofile() -> int:
    """Raise this process's soft fd limit to the hard one; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class Child:
    """One child process, its log file, and how it ended."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        core: int | None,
        log: Path,
        env: dict[str, str] | None = None,
        cwd: Path = ROOT,
    ) -> None:
        prefix: list[str] = []
        if core is not None and shutil.which("taskset"):
            prefix += ["taskset", "-c", str(core)]
        if shutil.which("prlimit"):
            hard = nofile_hard()
            prefix += ["prlimit", f"--nofile={hard}:{hard}", "--"]
        if shutil.which("setpriv"):
            prefix += ["setpriv", "--pdeathsig", "TERM", "--"]
        self.name = name
        self.log = log
        self.argv = [*prefix, *argv]
        self._log_file = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pid = self.proc.pid
        self.crashed: int | None = None  # exit code if it ended before we stopped it

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check(self) -> None:
        if self.crashed is None and self.proc.poll() is not None:
            self.crashed = self.proc.returncode

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM, wait `grace` s, then SIGKILL. Returns the exit code."""
        self.check()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                self.proc.wait(5)
        self._log_file.close()
        return self.proc.returncode

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def python(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def wait_http(child: Child, port: int, path: str = "/healthz", timeout: float = 20.0) -> None:
    """Wait until GET `path` answers 200 on 127.0.0.1:port, or raise with the child's log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            raise RuntimeError(f"{child.name} exited with {child.proc.returncode}:\n{child.tail()}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", path)
            status = conn.getresponse().status
            conn.close()
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{child.name} did not answer {path} within {timeout:g} s:\n{child.tail()}")


def nofile_of(pid: int) -> str:
    """The `Max open files` soft/hard limits of a running process."""
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                parts = line.split()
                return f"{parts[3]}/{parts[4]}"
    except OSError:
        pass
    return "?"
