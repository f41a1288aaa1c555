"""[redis] mode = "sentinel" against real processes: a primary, a replica, three sentinels, two gateways.

The primary is killed under a light load; the sentinels promote the replica. Meanwhile
requests follow on_error ("deny" on one gateway, "allow" on the other) and none hangs;
afterwards both gateways use the new primary with no restart, its scripts loaded again
after NOSCRIPT, and limits hold exactly.

The data nodes have a password (`requirepass`, `masterauth`; the sentinels know it as
`auth-pass`), given to the gateways in the URL only; it appears in no log, /readyz
body or command output. The sentinels themselves have none: sluicegate reaches them
without a password.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from proxy.limits.plan import ADMIT
from proxy.records.events import REDIS_STREAM
from proxy.request.auth import key_digest, new_key
from tests.conftest import Mocks, free_port, run_keys_usage, start_gateway, wait_for_port, wait_until
from tests.failover_load import Load, chat, check_gap

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None,
    reason="redis-server is not installed: this test runs a primary, a replica and three sentinels with it",
)

SERVICE = "mymaster"
PASSWORD = "datapw-" + secrets.token_hex(8)  # distinctive, so a leak is found by grep
URL = f"redis://:{PASSWORD}@127.0.0.1:1/0"
TIMEOUT_S = 0.5
COOLDOWN_S = 1.0
FAILOVER_BOUND_S = 15.0
HANG_MARGIN_S = 2.0  # no request takes longer than timeout_s and this


@dataclass
class Node:
    """A redis-server process: a data node or (with a config file and --sentinel) a sentinel."""

    args: list[str]
    port: int
    log: Path
    password: str | None = None
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Node:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(["redis-server", *self.args], stdout=out, stderr=subprocess.STDOUT)
        wait_for_port(self.port, self.proc, self.log)
        return self

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, password=self.password, socket_timeout=2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def data_node(tmp: Path, name: str, *extra: str) -> Node:
    port = free_port()
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp)]
    args += ["--requirepass", PASSWORD, "--masterauth", PASSWORD]
    return Node([*args, *extra], port, tmp / f"{name}.log", PASSWORD).start()


def sentinel_node(tmp: Path, name: str, primary: int) -> Node:
    port = free_port()
    conf = tmp / f"{name}.conf"  # a sentinel rewrites its own config file
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {tmp}\n"
        f"sentinel monitor {SERVICE} 127.0.0.1 {primary} 2\n"
        f"sentinel auth-pass {SERVICE} {PASSWORD}\n"
        f"sentinel down-after-milliseconds {SERVICE} 1000\n"
        f"sentinel failover-timeout {SERVICE} 3000\n"
        f"sentinel parallel-syncs {SERVICE} 1\n"
    )
    return Node([str(conf), "--sentinel"], port, tmp / f"{name}.log").start()


@dataclass
class Cluster:
    primary: Node
    replica: Node
    sentinels: list[Node]

    def all(self) -> list[Node]:
        return [self.primary, self.replica, *self.sentinels]

    def sees_everyone(self) -> bool:
        for sentinel in self.sentinels:
            state = sentinel.client().sentinel_master(SERVICE)
            if state["num-other-sentinels"] < 2 or state["num-slaves"] < 1:
                return False
        return True


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    primary = data_node(tmp_path, "primary")
    nodes = Cluster(primary, data_node(tmp_path, "replica", "--replicaof", "127.0.0.1", str(primary.port)), [])
    try:
        nodes.sentinels = [sentinel_node(tmp_path, f"sentinel{i}", primary.port) for i in range(3)]
        wait_until(
            "the replica in sync", lambda: nodes.replica.client().info("replication")["master_link_status"] == "up", 10
        )
        wait_until("each sentinel sees the replica and the two others", nodes.sees_everyone, 15)
        yield nodes
    finally:
        for node in nodes.all():
            node.stop()


def gateway_config(mocks: Mocks, cluster: Cluster, keys: dict[str, str], on_error: str) -> str:
    sentinels = ", ".join(f'"127.0.0.1:{s.port}"' for s in cluster.sentinels)
    blocks = "".join(
        f'\n[[keys]]\nname = "{name}"\nsha256 = "{key_digest(secret)}"\nrpm = {100000 if name == "load" else 5}\n'
        for name, secret in keys.items()
    )
    return f"""
[redis]
mode = "sentinel"
sentinels = [{sentinels}]
service = "{SERVICE}"
on_error = "{on_error}"
timeout_s = {TIMEOUT_S}
circuit_failures = 3
circuit_cooldown_s = {COOLDOWN_S}

[events]
sink = "redis"

[[providers]]
name = "beta"
base_url = "{mocks.beta.url}/v1"
models = ["mock-chat"]
{blocks}"""


def test_the_gateways_follow_a_sentinel_failover_without_a_restart(
    tmp_path: Path, mocks: Mocks, cluster: Cluster
) -> None:
    keys = {name: new_key() for name in ("load", "before", "after")}
    procs = {
        on_error: start_gateway(
            tmp_path,
            mocks,
            gateway_config(mocks, cluster, keys, on_error),
            redis_url=URL,
            name=f"gateway-{on_error}",
        )  # REDIS_URL's host and port name no Redis at all: in sentinel mode only its password is used
        for on_error in ("deny", "allow")
    }
    loads = {on_error: Load(proc, keys["load"]) for on_error, proc in procs.items()}
    threads = [threading.Thread(target=load.run) for load in loads.values()]
    try:
        with httpx.Client(timeout=10) as client:
            # Served and limited through the primary the sentinels name.
            statuses = [chat(client, procs["deny" if i % 2 else "allow"], keys["before"]).status_code for i in range(7)]
            assert statuses == [200] * 5 + [429] * 2
        # Redis 7 does not replicate loaded scripts; flushing them makes sure: the new primary answers NOSCRIPT.
        replica = cluster.replica.client()
        replica.script_flush()
        assert replica.script_exists(ADMIT.sha) == [False]

        for thread in threads:
            thread.start()
        time.sleep(0.5)
        killed = time.monotonic()
        assert cluster.primary.proc is not None
        cluster.primary.proc.kill()
        wait_until(
            "both gateways admit through Redis again", lambda: all(ld.back_at(killed) for ld in loads.values()), 30
        )
        time.sleep(0.3)
    finally:
        for load in loads.values():
            load.stop.set()
        for thread in threads:
            thread.join(timeout=15)

    try:
        back = {on_error: at - killed if (at := load.back_at(killed)) else None for on_error, load in loads.items()}
        print(f"\nfailover: kill -> first request admitted through the new primary: {back}")
        assert all(took is not None and took < FAILOVER_BOUND_S for took in back.values()), back
        assert replica.role()[0] == b"master"
        assert replica.script_exists(ADMIT.sha) == [True]  # loaded again after NOSCRIPT

        # During the gap on_error applied, and no request hung.
        check_gap(loads, killed, TIMEOUT_S + HANG_MARGIN_S)

        # Limits hold again: rpm = 5 admits exactly 5 of 8 concurrent requests across both gateways.
        def burst(i: int) -> int:
            with httpx.Client(timeout=10) as client:
                return chat(client, procs["deny" if i % 2 else "allow"], keys["after"]).status_code

        with ThreadPoolExecutor(8) as pool:
            assert sorted(pool.map(burst, range(8))) == [200] * 5 + [429] * 3

        for proc in procs.values():
            ready = httpx.get(f"http://127.0.0.1:{proc.port}/readyz", timeout=5)
            assert ready.status_code == 200 and PASSWORD not in ready.text
        # The redis event sink writes to the new primary.
        with httpx.Client(timeout=10) as client:
            assert chat(client, procs["deny"], keys["load"], "after-failover").status_code == 200
        wait_until(
            "the record in the new primary's stream",
            lambda: any(b"after-failover" in e[b"event"] for _, e in replica.xrange(REDIS_STREAM)),
            5,
        )
        # keys usage finds the new primary through the sentinels too.
        usage = run_keys_usage(tmp_path / "gateway-deny.toml", URL)
        assert usage.returncode == 0, usage.stderr + usage.stdout
        assert "after" in usage.stdout and "key rpm 0/5" in usage.stdout, usage.stdout
        assert PASSWORD not in usage.stdout + usage.stderr
    finally:
        for proc in procs.values():
            proc.stop()
    for proc in procs.values():
        assert PASSWORD not in proc.log.read_text(errors="replace")
