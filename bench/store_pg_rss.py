"""What `[store] url` costs a lean instance in memory: an idle `lean serve` with the SQLite
file and with PostgreSQL (the driver imported, its writer and reader connections open), RSS
after /healthz answers, three times each.

Needs PostgreSQL on 127.0.0.1:5432 with trust auth (a database is created and dropped).
Run: .venv/bin/python -m bench.store_pg_rss   (~15 s)
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.request

from tests.fakes import free_port


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def idle_rss(store: str, tmp: str) -> float:
    """RSS of `lean serve` half a second after its /healthz answers."""
    port = free_port()
    config = os.path.join(tmp, "config.ini")
    with open(config, "w") as f:
        f.write(
            f"[server]\nhost = 127.0.0.1\nport = {port}\n[store]\n{store}\n"
            "[provider.up]\nkind = openai\nbase_url = http://127.0.0.1:9/v1\napi_key_env = K\n"
            "[model.default]\nprovider = up\nupstream_model = m\n"
        )
    cmd = [sys.executable, "-m", "lean", "serve", "--config", config]
    proc = subprocess.Popen(cmd, env=dict(os.environ, K="x"), stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz"):
                    break
            except OSError:
                time.sleep(0.05)
        time.sleep(0.5)
        return rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait()


def psql(sql: str) -> None:
    cmd = ["psql", "-qh", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-c", sql]
    subprocess.run(cmd, check=True, capture_output=True)


def main() -> None:
    print(f"$ {sys.executable} -m bench.store_pg_rss")
    name = f"lean_rss_{secrets.token_hex(4)}"
    psql(f"CREATE DATABASE {name}")
    try:
        for _ in range(3):
            with tempfile.TemporaryDirectory() as tmp:
                sqlite = idle_rss(f"path = {tmp}/lean.db", tmp)
                pg = idle_rss(f"url = postgresql://postgres@127.0.0.1/{name}", tmp)
            print(f"idle lean serve RSS: SQLite {sqlite:.1f} MB, PostgreSQL {pg:.1f} MB,"
                  f" +{pg - sqlite:.1f} MB")  # fmt: skip
    finally:
        psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


if __name__ == "__main__":
    main()
