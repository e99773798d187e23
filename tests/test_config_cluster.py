"""lean.config_cluster: the [cluster] section and [limits] cluster_max_streams."""

import socket

import pytest

from lean.config import ClusterConfig
from tests.test_config import assert_error, error, parse


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
        ("[cluster]\ninstance = a b\n", "cluster", "instance", "without spaces"),
        ("[cluster]\nchannel = x\n", "cluster", "channel", "one of instance, redis_url"),
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
