"""lean/systemd.py and systemd/lean.service.

The notify protocol is driven through real AF_UNIX datagram sockets: Notifier directly
(path and abstract addresses, the watchdog, send failures), and `lean serve` in a
subprocess the way systemd runs it under `Type=notify`. The unit file is checked line by
line, and by `systemd-analyze verify` where the tool exists.
"""

from __future__ import annotations

import asyncio
import http.client
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from lean.config import load_config
from lean.systemd import Notifier
from tests.fakes import free_port

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "lean.service"
RECV_TIMEOUT = 10.0  # seconds a test waits for one datagram before failing
EXIT_TIMEOUT = 10.0  # seconds `lean serve` may take to drain and exit
WATCHDOG_USEC = 200_000  # systemd's timeout; lean pings every 0.1 s
PING_WINDOW = 1.0  # two pings are due within 0.2 s; the rest is slack for a busy machine
NOTIFY_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LEAN_TOKENS")


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound in tmp_path, as systemd's notify socket; and its path."""
    path = str(tmp_path / "notify.sock")
    assert len(path.encode()) < 108, "sun_path holds 108 bytes"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(RECV_TIMEOUT)
    try:
        yield sock, path
    finally:
        sock.close()


def drain(sock: socket.socket) -> list[bytes]:
    """Every datagram already queued on `sock`, without waiting."""
    sock.setblocking(False)
    got: list[bytes] = []
    try:
        while True:
            got.append(sock.recv(4096))
    except BlockingIOError:
        return got
    finally:
        sock.settimeout(RECV_TIMEOUT)


# --- Notifier --------------------------------------------------------------------------


async def test_without_notify_socket_every_call_is_a_no_op() -> None:
    notifier = Notifier({"WATCHDOG_USEC": str(WATCHDOG_USEC)})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None  # no socket to ping: no watchdog either
    notifier.ready("listening on http://127.0.0.1:8080")
    notifier.start_watchdog()
    notifier.stopping("draining")
    await notifier.close()
    await notifier.close()


def test_ready_and_stopping_on_an_abstract_socket() -> None:
    name = f"lean-test-{os.getpid()}-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(RECV_TIMEOUT)
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.enabled
        notifier.ready("listening on http://127.0.0.1:8080")
        notifier.stopping("draining for up to 10 s")
        assert sock.recv(4096) == b"READY=1\nSTATUS=listening on http://127.0.0.1:8080"
        assert sock.recv(4096) == b"STOPPING=1\nSTATUS=draining for up to 10 s"
        asyncio.run(notifier.close())


def test_a_status_stays_on_one_line(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    notifier = Notifier({"NOTIFY_SOCKET": path})
    notifier.ready("two\nlines")
    assert sock.recv(4096) == b"READY=1\nSTATUS=two lines"
    asyncio.run(notifier.close())


async def test_watchdog_pings_from_the_loop_until_closed(
    receiver: tuple[socket.socket, str],
) -> None:
    sock, path = receiver
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "20000"})
    assert notifier.watchdog_interval == pytest.approx(0.01)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    notifier.start_watchdog()
    with pytest.raises(RuntimeError):
        notifier.start_watchdog()
    async with asyncio.timeout(RECV_TIMEOUT):
        for _ in range(3):
            assert await loop.sock_recv(sock, 4096) == b"WATCHDOG=1"
    await notifier.close()
    drain(sock)
    await asyncio.sleep(0.05)  # five intervals: a ping still running would show
    assert drain(sock) == []
    await notifier.close()


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # another process's
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_follows_sd_watchdog_enabled(
    receiver: tuple[socket.socket, str], environ: dict[str, str], interval: float | None
) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": receiver[1], **environ})
    assert notifier.watchdog_interval == interval
    asyncio.run(notifier.close())


def test_a_failing_socket_never_raises_and_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    with caplog.at_level(logging.WARNING, logger="lean.systemd"):
        notifier.ready("listening")
        notifier.stopping("draining")
    assert len(caplog.records) == 1
    assert "systemd notify failed" in caplog.records[0].getMessage()
    asyncio.run(notifier.close())


def test_a_full_socket_never_blocks(
    receiver: tuple[socket.socket, str], caplog: pytest.LogCaptureFixture
) -> None:
    sock, path = receiver  # bound, never read: its queue fills up
    notifier = Notifier({"NOTIFY_SOCKET": path})
    with caplog.at_level(logging.WARNING, logger="lean.systemd"):
        for _ in range(5000):  # a blocking send would hang here (the test timeout fails it)
            notifier.ready("listening")
    assert len(caplog.records) == 1
    assert drain(sock)[0] == b"READY=1\nSTATUS=listening"
    asyncio.run(notifier.close())


def test_an_address_that_is_not_a_unix_socket_disables_notify(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="lean.systemd"):
        notifier = Notifier({"NOTIFY_SOCKET": "vsock:2:1234", "WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    assert "not a unix socket path" in caplog.text
    notifier.ready("listening")


# --- `lean serve` under Type=notify ------------------------------------------------------


def healthz(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=RECV_TIMEOUT)
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status
    finally:
        conn.close()


def test_lean_serve_speaks_the_notify_protocol(
    tmp_path: Path, receiver: tuple[socket.socket, str]
) -> None:
    sock, path = receiver
    port = free_port()
    config = tmp_path / "config.ini"
    config.write_text(
        f"[server]\nhost = 127.0.0.1\nport = {port}\ndrain_timeout = 0.5\n\n"
        "[provider.demo]\nkind = demo\n\n"
        "[model.default]\nprovider = demo\nupstream_model = lean-demo\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in NOTIFY_VARIABLES}
    env |= {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    log_path = tmp_path / "lean.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lean", "serve", "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            env=env,
            cwd=tmp_path,
        )
    try:
        try:
            first = sock.recv(4096)
        except TimeoutError:
            pytest.fail(f"no READY=1 from lean: {log_path.read_text()}")
        ready_at = time.monotonic()
        assert first == f"READY=1\nSTATUS=listening on http://127.0.0.1:{port}".encode()
        assert healthz(port) == 200  # READY means serving: no retry needed

        pings = 0
        sock.settimeout(PING_WINDOW)
        while pings < 2:
            assert time.monotonic() - ready_at < PING_WINDOW, f"{pings} pings"
            assert sock.recv(4096) == b"WATCHDOG=1"
            pings += 1
        sock.settimeout(RECV_TIMEOUT)

        proc.send_signal(signal.SIGTERM)
        while (message := sock.recv(4096)) == b"WATCHDOG=1":
            pass
        assert message == b"STOPPING=1\nSTATUS=draining for up to 0.5 s"
        assert proc.wait(EXIT_TIMEOUT) == 0, log_path.read_text()
        assert set(drain(sock)) <= {b"WATCHDOG=1"}  # nothing after STOPPING but pings
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- systemd/lean.service ------------------------------------------------------------------


def unit_settings(text: str) -> dict[tuple[str, str], list[str]]:
    """(section, key) -> every value, in order; systemd lets most keys repeat."""
    settings: dict[tuple[str, str], list[str]] = {}
    section = ""
    for raw in text.split("\n"):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a KEY=value line: {raw!r}"
        settings.setdefault((section, key.strip()), []).append(value.strip())
    return settings


def seconds(value: str) -> float:
    """A systemd time span of the simple kinds the unit uses: 30, 30s, 2min."""
    for suffix, scale in (("min", 60.0), ("ms", 0.001), ("s", 1.0)):
        if value.endswith(suffix):
            return float(value.removesuffix(suffix)) * scale
    return float(value)


def megabytes(value: str) -> float:
    scale = {"K": 1 / 1024, "M": 1.0, "G": 1024.0}
    return float(value[:-1]) * scale[value[-1]] if value[-1] in scale else float(value) / 2**20


@pytest.fixture(scope="module")
def service() -> dict[str, str]:
    """The [Service] section: each key's effective (last) value."""
    settings = unit_settings(UNIT.read_text())
    assert ("Install", "WantedBy") in settings
    return {key: values[-1] for (section, key), values in settings.items() if section == "Service"}


def test_unit_is_type_notify_with_a_watchdog(service: dict[str, str]) -> None:
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert seconds(service["WatchdogSec"]) >= 10  # lean pings every half of it
    assert service["ExecStart"] == "/opt/lean/.venv/bin/lean serve --config /etc/lean/config.ini"
    assert service["KillSignal"] == "SIGTERM"
    assert service["Restart"] == "on-failure"


def test_unit_sandbox(service: dict[str, str]) -> None:
    assert service["DynamicUser"] == "yes"
    assert service["StateDirectory"] == "lean"
    assert service["EnvironmentFile"] == "/etc/lean/lean.env"  # no "-": it must exist
    assert service["ProtectSystem"] == "strict"
    assert service["ProtectHome"] == "yes"
    assert service["PrivateTmp"] == "yes"
    assert service["NoNewPrivileges"] == "yes"
    assert service["CapabilityBoundingSet"] == ""
    assert set(service["RestrictAddressFamilies"].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}


def test_unit_limits_match_the_budget(service: dict[str, str]) -> None:
    assert megabytes(service["MemoryHigh"]) < megabytes(service["MemoryMax"]) <= 384
    assert int(service["LimitNOFILE"]) >= 20_000  # 10,000 clients, 2 sockets each


def test_unit_stop_timeout_outlasts_the_drain(service: dict[str, str]) -> None:
    drain_timeout = load_config(str(ROOT / "config.ini")).server.drain_timeout
    # After drain_timeout lean ends the remaining streams and waits up to 2 s more.
    assert seconds(service["TimeoutStopSec"]) > drain_timeout + 2


def analyze(unit: Path) -> tuple[int, list[str]]:
    """`systemd-analyze verify`: its exit code and the lines about this unit."""
    tool = shutil.which("systemd-analyze")
    assert tool is not None
    result = subprocess.run(
        [tool, "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""},
    )
    # Only lines naming this unit: a host's own units may draw remarks of their own.
    lines = (result.stdout + result.stderr).split("\n")
    return result.returncode, [line for line in lines if unit.name in line]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # /opt/lean does not exist here and verify checks ExecStart's executable: point it at
    # this interpreter, the rest of the unit unchanged.
    text = UNIT.read_text()
    old = "ExecStart=/opt/lean/.venv/bin/lean "
    assert old in text
    unit = tmp_path / "lean.service"
    unit.write_text(text.replace(old, f"ExecStart={sys.executable} -m lean "))
    assert analyze(unit) == (0, [])

    # The check is not vacuous: verify does report a bad line of this unit.
    unit.write_text(text.replace(old, f"ExecStart={sys.executable} -m lean ") + "Bogus=1\n")
    assert analyze(unit)[1] != []


# --- systemd/lean@.service: one instance per %i (docs/deploy.md "More than one instance") ---

TEMPLATE = ROOT / "systemd" / "lean@.service"
# What the template may set differently from lean.service; every other line is the same.
PER_INSTANCE = {
    ("Unit", "Description"),
    ("Unit", "PartOf"),
    ("Service", "ExecStart"),
    ("Service", "SyslogIdentifier"),
    ("Service", "User"),
    ("Service", "Group"),
    ("Service", "MemoryHigh"),
    ("Service", "MemoryMax"),
    ("Install", "WantedBy"),
}


def test_template_differs_from_the_single_unit_only_per_instance() -> None:
    single, template = unit_settings(UNIT.read_text()), unit_settings(TEMPLATE.read_text())
    differ = {
        key for key in single.keys() | template.keys() if single.get(key) != template.get(key)
    }
    assert differ == PER_INSTANCE


def test_template_names_each_instance_and_shares_one_user() -> None:
    settings = unit_settings(TEMPLATE.read_text())
    service = {
        key: values[-1] for (section, key), values in settings.items() if section == "Service"
    }
    assert service["ExecStart"] == (
        "/opt/lean/.venv/bin/lean serve --config /etc/lean/config.ini --instance %i"
    )
    # One user for every instance: one state directory, and SO_REUSEPORT needs one uid.
    assert (service["DynamicUser"], service["User"], service["StateDirectory"]) == (
        "yes",
        "lean",
        "lean",
    )
    # Two of them fit the single unit's budget on a 768 MB VPS.
    assert 2 * megabytes(service["MemoryMax"]) <= megabytes(
        unit_settings(UNIT.read_text())[("Service", "MemoryMax")][-1]
    )
    assert megabytes(service["MemoryHigh"]) < megabytes(service["MemoryMax"])
    assert settings[("Install", "WantedBy")] == ["lean.target"]
    assert unit_settings((ROOT / "systemd" / "lean.target").read_text())[
        ("Install", "WantedBy")
    ] == ["multi-user.target"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_template_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    text = TEMPLATE.read_text()
    old = "ExecStart=/opt/lean/.venv/bin/lean "
    assert old in text
    text = text.replace(old, f"ExecStart={sys.executable} -m lean ")
    (tmp_path / "lean.target").write_text((ROOT / "systemd" / "lean.target").read_text())
    template, instance = tmp_path / "lean@.service", tmp_path / "lean@1.service"
    template.write_text(text)
    assert analyze(instance)[0] == 0  # verify reads the template for the instance ...
    assert [line for line in _verify_output(instance) if "lean@" in line] == []
    template.write_text(text + "Bogus=1\n")  # ... and does report a bad line of it
    assert any("Bogus" in line for line in _verify_output(instance))


def _verify_output(unit: Path) -> list[str]:
    tool = shutil.which("systemd-analyze")
    assert tool is not None
    result = subprocess.run(
        [tool, "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""},
    )
    return (result.stdout + result.stderr).split("\n")
