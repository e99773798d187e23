"""Where lean listens (issue 10, item 11): `host = [::1]` is `::1`, served for real when
the machine has IPv6 loopback; a bad host or a port in use is one line and exit 2."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from lean.config import ConfigError
from tests.support import lean_config, running

pytestmark = pytest.mark.timeout(30)


def has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.parametrize("host", ["[::1]", " [::1] "])
def test_an_ipv6_host_may_be_bracketed(host: str) -> None:
    assert lean_config(server=f"host = {host}").server.host == "::1"


@pytest.mark.parametrize("host", ["[localhost]", "127.0.0.1:8080", "[::1]:8080", "a b", "[::1"])
def test_a_host_with_a_port_or_stray_brackets_is_a_config_error(host: str) -> None:
    with pytest.raises(ConfigError) as refused:  # with tokens: not refused as non-loopback
        lean_config(server=f"host = {host}", environ={"LEAN_TOKENS": "t"})
    assert "without a port" in str(refused.value)
    assert (refused.value.section, refused.value.key) == ("server", "host")


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback on this machine")
async def test_lean_serves_on_ipv6_loopback() -> None:
    async with running(lean_config(server="host = [::1]")) as lean, aiohttp.ClientSession() as http:
        assert lean.url.startswith("http://[::1]:")
        async with http.get(lean.url + "/v1/models") as resp:  # Host: [::1]:PORT, no token
            assert resp.status == 200


def serve(tmp_path: Path, server: str, **environ: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "config.ini"
    config.write_text(
        f"[server]\n{server}\n[store]\npath = {tmp_path / 'lean.db'}\n"
        "[provider.demo]\nkind = demo\n[model.default]\nprovider = demo\nupstream_model = d\n"
    )
    return subprocess.run(
        [sys.executable, "-m", "lean", "serve", "--config", str(config)],
        capture_output=True,
        env={**os.environ, **environ},
        text=True,
        timeout=20,
    )


def test_a_port_in_use_is_one_line_and_exit_2(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = serve(tmp_path, f"host = 127.0.0.1\nport = {port}")
    assert done.returncode == 2
    expected = f"expected a free port (127.0.0.1:{port} is already in use)"
    assert done.stderr.strip().splitlines() == [f"lean: config error: [server] port: {expected}"]


@pytest.mark.parametrize("host", ["192.0.2.1", "no-such-host.invalid"])
def test_an_address_not_of_this_machine_is_one_line_and_exit_2(tmp_path: Path, host: str) -> None:
    done = serve(
        tmp_path, f"host = {host}\nport = 8080", LEAN_TOKENS="t"
    )  # tokens: may listen beyond loopback
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert done.stderr.startswith(
        f"lean: config error: [server] host: expected an address of this machine ({host}:8080: "
    )
