"""lean.config_cluster: [cluster] instance, [server] reuse_port and the `lean serve` overrides;
[cluster] redis_url and lease, and [limits] cluster_max_streams."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lean.config import ClusterConfig, Config, ConfigError, load_config, parse_config
from tests.test_config import assert_error

BASE = """
[provider.demo]
kind = demo

[model.default]
provider = demo
upstream_model = lean-demo
"""


def parse(extra: str = "", **overrides: object) -> Config:
    return parse_config(BASE + extra, environ={}, **overrides)  # type: ignore[arg-type]


def error(extra: str = "", **overrides: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(extra, **overrides)
    return info.value


def test_the_instance_defaults_to_host_name_and_port() -> None:
    config = parse("[server]\nport = 8123\n")
    assert config.cluster.instance == f"{socket.gethostname()}:8123"
    assert config.server.reuse_port is False


def test_an_instance_given_in_the_file() -> None:
    config = parse("[server]\nreuse_port = yes\n[cluster]\ninstance = web-1\n")
    assert (config.server.reuse_port, config.cluster.instance) == (True, "web-1")


def test_sharing_a_port_needs_a_name_per_instance() -> None:
    e = error("[server]\nreuse_port = true\n")
    assert (e.section, e.key) == ("cluster", "instance")
    assert "reuse_port" in str(e)


@pytest.mark.parametrize("name", ["", "web 1", "web'1", "é", "x" * 129])
def test_an_instance_name_is_short_and_plain(name: str) -> None:
    e = error(f"[cluster]\ninstance = {name}\n")
    assert (e.section, e.key) == ("cluster", "instance")
    assert "letters, digits" in str(e)


def test_reuse_port_is_a_boolean() -> None:
    e = error("[server]\nreuse_port = maybe\n")
    assert (e.section, e.key) == ("server", "reuse_port")


def test_an_unknown_cluster_key_is_named() -> None:
    e = error("[cluster]\ninstanse = web-1\n")
    assert (e.section, e.key) == ("cluster", "instanse")


def test_command_line_port_and_instance_win_over_the_file() -> None:
    text = "[server]\nport = 8123\nreuse_port = true\n[cluster]\ninstance = web-1\n"
    config = parse(text, port=9001, instance="lean@2")
    assert (config.server.port, config.cluster.instance) == (9001, "lean@2")
    # the default name follows the port in use
    assert parse("", port=9002).cluster.instance == f"{socket.gethostname()}:9002"
    # with reuse_port, --instance alone is enough
    assert parse("[server]\nreuse_port = true\n", instance="a").cluster.instance == "a"
    e = error("", port=0)
    assert (e.section, e.key) == ("server", "port")
    e = error("", instance="a b")
    assert (e.section, e.key) == ("cluster", "instance")


def test_load_config_passes_the_overrides(tmp_path: Path) -> None:
    path = tmp_path / "config.ini"
    path.write_text(BASE)
    config = load_config(path, environ={}, port=9003, instance="b")
    assert (config.server.port, config.cluster.instance) == (9003, "b")


def test_lean_serve_refuses_a_shared_port_without_instance(tmp_path: Path) -> None:
    path = tmp_path / "config.ini"
    path.write_text(f"[server]\nreuse_port = true\n[store]\npath = {tmp_path / 'x.db'}\n" + BASE)
    done = subprocess.run(
        [sys.executable, "-m", "lean", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "lean: config error: [cluster] instance: expected a name for each lean sharing the port"
        " (reuse_port = true)"
    ]


def test_check_config_takes_the_same_overrides(tmp_path: Path) -> None:
    path = tmp_path / "config.ini"
    path.write_text("[server]\nreuse_port = true\n" + BASE)

    def check(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "lean", "check-config", str(path), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=20)

    refused = check()
    assert refused.returncode == 2
    assert "[cluster] instance" in refused.stderr
    assert check("--instance", "lean@1", "--port", "8081").returncode == 0


# --- [cluster] redis_url, lease; [limits] cluster_max_streams ---------------------------


def test_without_the_section_lean_is_alone() -> None:
    config = parse("[server]\nport = 8123\n")
    assert config.cluster == ClusterConfig(instance=f"{socket.gethostname()}:8123")
    assert config.cluster.redis_url is None
    assert config.limits.cluster_max_streams == 0


def test_the_whole_section() -> None:
    config = parse(
        "[cluster]\nredis_url = redis://:pw@127.0.0.1:6379/2\ninstance = web-1\nlease = 4.5\n"
        "[limits]\ncluster_max_streams = 3000\n"
    )
    assert config.cluster == ClusterConfig(
        instance="web-1", redis_url="redis://:pw@127.0.0.1:6379/2", lease=4.5
    )
    assert config.limits.cluster_max_streams == 3000


@pytest.mark.parametrize(
    ("extra", "section", "key", "expected"),
    [
        ("[cluster]\nredis_url = http://h\n", "cluster", "redis_url", "a redis:// URL"),
        ("[cluster]\nredis_url = redis://h/db\n", "cluster", "redis_url", "a database number"),
        ("[cluster]\nlease = 0\n", "cluster", "lease", "a number > 0"),
        ("[cluster]\ninstance = a b\n", "cluster", "instance", "letters, digits or _ . : @ -"),
        ("[cluster]\nchannel = x\n", "cluster", "channel", "one of instance, redis_url, lease"),
        ("[limits]\ncluster_max_streams = -1\n", "limits", "cluster_max_streams", ">= 0"),
        ("[limits]\ncluster_max_streams = 5\n", "limits", "cluster_max_streams", "redis_url"),
    ],
)
def test_bad_values_name_the_key(extra: str, section: str, key: str, expected: str) -> None:
    assert_error(error(extra), section, key, expected)


def test_a_bad_url_never_shows_its_password() -> None:
    e = error("[cluster]\nredis_url = rediss://:hunter2-secret@h:6379/0\n")
    assert_error(e, "cluster", "redis_url", "a redis:// URL")
    assert "hunter2" not in str(e) and "hunter2" not in repr(e.args)
