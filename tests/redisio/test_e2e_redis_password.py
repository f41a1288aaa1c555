"""A single Redis with a password (`requirepass`): the URL's password is used and shown nowhere.

Sentinel and Cluster with passwords: tests/redisio/test_e2e_sentinel.py and tests/redisio/test_e2e_cluster_failover.py.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis

from proxy.records.events import REDIS_STREAM
from proxy.request.auth import key_digest, new_key
from tests.conftest import (
    GATEWAY_ACL,
    GATEWAY_COMMANDS,
    ROOT,
    Mocks,
    beta_config,
    free_port,
    start_gateway,
    wait_for_port,
    wait_until,
)

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


ADMIN_PASSWORD = "adminpw-" + secrets.token_hex(8)
USER_PASSWORD = "aclpw-" + secrets.token_hex(8)


def test_the_acl_names_every_command_the_scripts_call_and_the_readme_gives_it() -> None:
    """Redis checks a script's own calls against the user's ACL: a new one in a script belongs in the list."""
    assert f"resetchannels ~sg:* ~sluicegate:events -@all {GATEWAY_COMMANDS}\n" in (ROOT / "README.md").read_text()
    called = set()
    for script in (ROOT / "proxy").rglob("*.lua"):
        called |= {name.lower() for name in re.findall(r"redis\.p?call\('(\w+)'", script.read_text())}
    assert called, "the scripts call Redis"
    assert {f"+{name}" for name in called} <= set(GATEWAY_COMMANDS.split())


def test_an_acl_user_with_only_the_gateways_commands_and_keys_limits_exactly(tmp_path: Path, mocks: Mocks) -> None:
    port = free_port()
    conf = tmp_path / "redis.conf"
    conf.write_text(
        f'port {port}\nbind 127.0.0.1\nsave ""\nappendonly no\n'
        "user default off\n"  # no password-less access at all
        f"user admin on >{ADMIN_PASSWORD} ~* &* +@all\n"
        f"user gateway {GATEWAY_ACL.format(password=USER_PASSWORD)}\n"
    )
    log = tmp_path / "redis.log"
    with log.open("ab") as out:
        server = subprocess.Popen(["redis-server", str(conf)], stdout=out, stderr=subprocess.STDOUT)
    admin = redis.Redis(port=port, username="admin", password=ADMIN_PASSWORD, socket_timeout=5)
    procs = []
    try:
        wait_for_port(port, server, log)
        secret = new_key()
        keys = f'[[keys]]\nname = "k"\nsha256 = "{key_digest(secret)}"\nrpm = 3\nbudget = 1\n'
        config = f"""
[redis]
on_error = "deny"

[events]
sink = "redis"

[[providers]]
name = "beta"
base_url = "{mocks.beta.url}/v1"
models = ["mock-chat"]

[[prices]]
model = "mock-chat"
input = 2
output = 10
currency = "EUR"
{keys}"""
        url = f"redis://gateway:{USER_PASSWORD}@127.0.0.1:{port}/0"
        for name, password in (("right", USER_PASSWORD), ("wrong", WRONG)):
            given = url.replace(USER_PASSWORD, password)
            procs.append(start_gateway(tmp_path, mocks, config, redis_url=given, name=name))
        right, wrong = procs
        headers = {"Authorization": f"Bearer {secret}"}

        def chat(i: int) -> int:
            request = {**headers, "X-Request-ID": f"acl-{i}"}
            url = f"http://127.0.0.1:{right.port}/v1/chat/completions"
            return httpx.post(url, json=CHAT, headers=request, timeout=10).status_code

        # Six at once, rpm = 3: exactly three admitted, each holding and then settling part of the budget.
        with ThreadPoolExecutor(6) as pool:
            statuses = list(pool.map(chat, range(6)))
        assert sorted(statuses) == [200] * 3 + [429] * 3
        subscription = httpx.get(f"http://127.0.0.1:{right.port}/v1/dashboard/billing/subscription", headers=headers)
        assert subscription.status_code == 200, subscription.text
        assert httpx.get(f"http://127.0.0.1:{right.port}/readyz").status_code == 200
        admitted = f"acl-{statuses.index(200)}"
        wait_until("the admitted request's record in the stream", lambda: admin.xlen(REDIS_STREAM) >= 6, 5)
        wait_until("the holds released", lambda: not admin.keys("sg:*:money_held"), 5)

        env = {**os.environ, "REDIS_URL": url}
        for command in (["keys", "usage"], ["events", "--request-id", admitted]):
            ran = subprocess.run(
                [sys.executable, "-m", "proxy", *command, "--config", str(tmp_path / "right.toml")],
                cwd=ROOT, capture_output=True, text=True, timeout=30, env=env,
            )  # fmt: skip
            assert ran.returncode == 0, ran.stdout + ran.stderr
            assert USER_PASSWORD not in ran.stdout + ran.stderr
        assert "key rpm 0/3" in subprocess.run(
            [sys.executable, "-m", "proxy", "keys", "usage", "--config", str(tmp_path / "right.toml")],
            cwd=ROOT, capture_output=True, text=True, timeout=30, env=env,
        ).stdout  # fmt: skip

        # Redis refused the gateway nothing: no command or key outside its ACL was tried (the only
        # entries are the wrong password's failed logins).
        denied = [(e["reason"], e["object"]) for e in admin.acl_log() if e["username"] == "gateway"]
        assert denied and all(reason == "auth" for reason, _ in denied), denied

        refused = httpx.get(f"http://127.0.0.1:{wrong.port}/readyz")
        assert refused.status_code == 503
        assert refused.json()["reason"].startswith("redis: ")
        denied_request = httpx.post(f"http://127.0.0.1:{wrong.port}/v1/chat/completions", json=CHAT, headers=headers)
        assert denied_request.status_code == 503  # on_error = "deny"
        for text in (refused.text, subscription.text):
            assert USER_PASSWORD not in text and WRONG not in text and ADMIN_PASSWORD not in text
    finally:
        for proc in procs:
            proc.stop()
        admin.close()
        server.kill()
        server.wait()
    for proc in procs:
        output = proc.log.read_text(errors="replace")
        assert USER_PASSWORD not in output and WRONG not in output and ADMIN_PASSWORD not in output
        assert "Traceback" not in output
