"""A single Redis with a password (`requirepass`): the URL's password is used and shown nowhere.

Sentinel and Cluster with passwords: tests/test_e2e_sentinel.py and tests/test_e2e_cluster_failover.py.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from proxy.auth import key_digest, new_key
from tests.conftest import ROOT, Mocks, beta_config, free_port, start_gateway, wait_for_port

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")

PASSWORD = "singlepw-" + secrets.token_hex(8)  # distinctive, so a leak is found by grep
WRONG = "wrongpw-" + secrets.token_hex(8)
CHAT = {"model": "mock-chat", "messages": [{"role": "user", "content": "hi"}]}


def test_a_password_protected_redis_limits_exactly_and_the_password_shows_nowhere(tmp_path: Path, mocks: Mocks) -> None:
    port = free_port()
    log = tmp_path / "redis.log"
    args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    with log.open("ab") as out:
        server = subprocess.Popen([*args, "--requirepass", PASSWORD], stdout=out, stderr=subprocess.STDOUT)
    procs = []
    try:
        wait_for_port(port, server, log)
        secret = new_key()
        config = beta_config(
            mocks, f'[[keys]]\nname = "k"\nsha256 = "{key_digest(secret)}"\nrpm = 3\n', '[redis]\non_error = "allow"'
        )
        for name, password in (("right", PASSWORD), ("wrong", WRONG)):
            url = f"redis://:{password}@127.0.0.1:{port}/0"
            procs.append(start_gateway(tmp_path, mocks, config, redis_url=url, name=name))
        right, wrong = procs

        def chat(_: int) -> int:
            headers = {"Authorization": f"Bearer {secret}"}
            return httpx.post(
                f"http://127.0.0.1:{right.port}/v1/chat/completions", json=CHAT, headers=headers
            ).status_code

        with ThreadPoolExecutor(6) as pool:
            assert sorted(pool.map(chat, range(6))) == [200] * 3 + [429] * 3
        assert httpx.get(f"http://127.0.0.1:{right.port}/readyz").status_code == 200
        refused = httpx.get(f"http://127.0.0.1:{wrong.port}/readyz")
        assert refused.status_code == 503
        assert refused.json()["reason"].startswith("redis: ")
        assert WRONG not in refused.text and PASSWORD not in refused.text

        check = subprocess.run(
            [sys.executable, "-m", "proxy", "check-config", "--config", str(tmp_path / "right.toml")],
            cwd=ROOT, capture_output=True, text=True, timeout=30,
            env={**os.environ, "REDIS_URL": f"redis://:{PASSWORD}@127.0.0.1:{port}/0"},
        )  # fmt: skip
        assert check.returncode == 0, check.stdout + check.stderr
        assert PASSWORD not in check.stdout + check.stderr
    finally:
        for proc in procs:
            proc.stop()
        server.kill()
        server.wait()
    for proc in procs:
        output = proc.log.read_text(errors="replace")
        assert PASSWORD not in output and WRONG not in output
    assert "limits are NOT enforced" in procs[1].log.read_text(errors="replace")
