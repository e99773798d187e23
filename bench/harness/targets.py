"""What the load generator is pointed at: lean, the reference relay, or the mock itself.

A target starts its process (pinned to the target core, stderr to a log file) and
says where streams and idle connections go. `wires` lists the client kinds it
speaks; a reference target answers a scene client with the OpenAI one, so the same
scenario still has a baseline. To add a target: subclass `Target`, list it in `TARGETS`.
"""

from __future__ import annotations

import http.client
import os
from dataclasses import dataclass
from pathlib import Path

import msgspec

from bench.harness.procs import Child, free_port, python, wait_http
from bench.harness.scenarios import Scenario
from bench.harness.wires import BENCH_MODEL, BENCH_SCENE, IDLE_WIRES, WIRES


@dataclass
class Mock:
    child: Child
    port: int  # plain HTTP
    tls_port: int  # 0 when the scenario has no TLS
    cert: Path | None

    def base_url(self, tls: bool) -> str:
        if tls:
            return f"https://127.0.0.1:{self.tls_port}/v1"
        return f"http://127.0.0.1:{self.port}/v1"

    def stats(self) -> dict[str, int]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("GET", "/stats")
            return dict(msgspec.json.decode(conn.getresponse().read()))
        finally:
            conn.close()


@dataclass
class Endpoint:
    """Where the load goes for one run."""

    child: Child | None  # the process measured; None for `direct`
    port: int
    tls: bool
    idle_port: int


class Target:
    name = ""
    wires: frozenset[str] = frozenset({"openai", "idle-http"})  # the client kinds it speaks
    measured = True  # has a process of its own to sample

    def client_for(self, wire: str) -> str:
        """`wire` if this target speaks it, else the OpenAI stream or an idle HTTP connection."""
        if wire in self.wires:
            return wire
        return "idle-http" if wire in IDLE_WIRES else "openai"

    def start(
        self, scenario: Scenario, mock: Mock, workdir: Path, core: int | None, label: str
    ) -> Endpoint:
        """Start the target for one run; `label` names its files (scenario-target-wire)."""
        raise NotImplementedError


def _env(mock: Mock, scenario: Scenario) -> dict[str, str]:
    env = dict(os.environ)
    if scenario.tls and mock.cert is not None:
        env["SSL_CERT_FILE"] = str(mock.cert)  # how lean and the relay trust the mock's cert
    return env


# [store] flush_interval of the lean under test: LEAN_BENCH_FLUSH_INTERVAL=0 measures lean
# without saving running answers (the default, 1.0, is lean's).
FLUSH_INTERVAL = os.environ.get("LEAN_BENCH_FLUSH_INTERVAL", "1.0")


class Lean(Target):
    name = "lean"
    wires = frozenset({*WIRES, *IDLE_WIRES})

    def config(self, scenario: Scenario, mock: Mock, port: int, workdir: Path, label: str) -> str:
        return f"""\
# written by python -m bench for the {scenario.name} scenario
[server]
host = 127.0.0.1
port = {port}
drain_timeout = 2
max_connections = 25000

[auth]
tokens_env = LEAN_BENCH_NO_TOKENS

[store]
path = {workdir}/{label}.db
flush_interval = {FLUSH_INTERVAL}

[limits]
max_streams = 20000
slow_client_timeout = {scenario.slow_client_timeout:g}

[provider.mock]
kind = openai
base_url = {mock.base_url(scenario.tls)}

[model.{BENCH_MODEL}]
provider = mock
upstream_model = mock-model

[scene.{BENCH_SCENE}]
model = {BENCH_MODEL}
template = {{message}}
history_turns = 0
"""

    def start(
        self, scenario: Scenario, mock: Mock, workdir: Path, core: int | None, label: str
    ) -> Endpoint:
        port = free_port()
        config = workdir / f"{label}.ini"
        config.write_text(self.config(scenario, mock, port, workdir, label))
        env = _env(mock, scenario)
        env.pop("LEAN_BENCH_NO_TOKENS", None)
        child = Child(
            "lean",
            python("lean", "serve", "--config", str(config)),
            core=core,
            log=workdir / f"{label}.log",
            env=env,
        )
        wait_http(child, port)
        return Endpoint(child, port, False, port)


class Relay(Target):
    name = "relay"

    def start(
        self, scenario: Scenario, mock: Mock, workdir: Path, core: int | None, label: str
    ) -> Endpoint:
        port = free_port()
        child = Child(
            "relay",
            python("bench.harness.relay", "--port", str(port), "--upstream",
                   mock.base_url(scenario.tls)),
            core=core,
            log=workdir / f"{label}.log",
            env=_env(mock, scenario),
        )  # fmt: skip
        wait_http(child, port)
        return Endpoint(child, port, False, port)


class Direct(Target):
    """The load generator straight to the mock: the harness's own ceiling."""

    name = "direct"
    measured = False

    def start(
        self, scenario: Scenario, mock: Mock, workdir: Path, core: int | None, label: str
    ) -> Endpoint:
        port = mock.tls_port if scenario.tls else mock.port
        return Endpoint(None, port, scenario.tls, mock.port)


TARGETS: dict[str, Target] = {t.name: t for t in (Direct(), Relay(), Lean())}
