"""[redis] mode = "cluster" through a primary failover: three primaries with a replica each, two gateways.

Every node has a password (`requirepass`, and `masterauth` for the replicas), given
to the gateways in the URL only. One primary is killed with SIGKILL while both
gateways are under load on keys whose group lives on it. Until the cluster has
promoted its replica, requests follow on_error ("deny" on one gateway, "allow" on
the other) and none hangs; /readyz names the silent primary. After the promotion
both gateways use the new primary with no restart, and limits are exact again.
The password appears in no log, /readyz body or command output.

The two gateways differ so that each way back is seen:
- "deny" has the circuit (3 failures open it for 1 s), no event records and nobody
  polling its /readyz, so the only thing that brings it back is its script pipes
  reading the slot map again after their own failures. The killed primary owns
  neither slot 0 (redis-py's default node) nor the event stream's slot.
- "allow" has no circuit to speak of, writes event records to Redis and has its
  /readyz polled every 100 ms: /readyz names the dead primary, and afterwards the
  cluster client of those odd commands has followed too.
"""

from __future__ import annotations

import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from redis.cluster import RedisCluster
from redis.crc import key_slot

from proxy.limits.plan import ADMIT
from proxy.records.events import REDIS_STREAM
from proxy.request.auth import new_key
from tests.cluster_nodes import Node, create_cluster, limit_blocks, slot_of, start_node
from tests.conftest import Mocks, Proc, run_keys_usage, start_gateway, wait_until
from tests.failover_load import Load, chat, check_gap

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None or shutil.which("redis-cli") is None,
    reason="redis-server and redis-cli are not installed: this test builds a Redis Cluster with them",
)

PASSWORD = "clusterpw-" + secrets.token_hex(8)  # distinctive, so a leak is found by grep
NODE_TIMEOUT_MS = 1000  # cluster-node-timeout: a primary silent this long is failed over
TIMEOUT_S = 0.5
COOLDOWN_S = 1.0
FAILOVER_BOUND_S = 15.0  # kill -> first request admitted through the promoted replica
AFTER_PROMOTION_BOUND_S = 4.0  # promotion -> that request: the slot map's re-read and the circuit's cool-down
GATEWAYS = {  # on_error -> [redis] circuit_failures, [events] sink
    "deny": (3, "off"),
    "allow": (1_000_000, "redis"),
}
HANG_MARGIN_S = 2.0


@dataclass
class Cluster:
    nodes: list[Node]

    def slots(self, via: Node) -> list[tuple[int, int, int, list[int]]]:
        """(first slot, last slot, primary's port, replicas' ports) as `via` sees them."""
        return [
            (start, end, primary[1], [replica[1] for replica in replicas])
            for start, end, primary, *replicas in via.client().execute_command("CLUSTER", "SLOTS")
        ]

    def owner(self, slot: int, via: Node | None = None) -> Node:
        for start, end, port, _ in self.slots(via or self.nodes[0]):
            if start <= slot <= end:
                return self.node(port)
        raise AssertionError(f"slot {slot} is not covered")

    def node(self, port: int) -> Node:
        return next(node for node in self.nodes if node.port == port)

    def replica_of(self, primary: Node) -> Node:
        ports = {port: replicas for _, _, port, replicas in self.slots(self.nodes[0])}
        return self.node(ports[primary.port][0])

    def client(self, via: Node) -> RedisCluster:
        return RedisCluster(host="127.0.0.1", port=via.port, password=PASSWORD, socket_timeout=5)

    def healthy(self) -> bool:
        if not all(n.client().cluster("info")["cluster_state"] == "ok" for n in self.nodes):
            return False
        return all(n.client().info("replication").get("master_link_status", "up") == "up" for n in self.nodes) and all(
            len(replicas) == 1 for *_, replicas in self.slots(self.nodes[0])
        )


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    nodes = Cluster([])
    try:
        for _ in range(6):
            node = start_node(tmp_path, ["--cluster-node-timeout", str(NODE_TIMEOUT_MS)], PASSWORD, timeout_s=2)
            nodes.nodes.append(node)
        create_cluster(nodes.nodes, replicas=1)
        wait_until("every slot served and every replica in sync", nodes.healthy, 30)
        yield nodes
    finally:
        for node in nodes.nodes:
            node.stop()


def groups_on(cluster: Cluster, node: Node, count: int) -> list[str]:
    names = (f"team{i}" for i in range(1000))
    return [name for name in names if cluster.owner(slot_of(name)) is node][:count]


def gateway_config(mocks: Mocks, on_error: str, keys: dict[str, tuple[str, str, str]], groups: dict[str, str]) -> str:
    """keys: name -> (secret, group, extra TOML); groups: name -> its TOML lines."""
    circuit_failures, sink = GATEWAYS[on_error]
    return f"""
[redis]
mode = "cluster"
on_error = "{on_error}"
timeout_s = {TIMEOUT_S}
circuit_failures = {circuit_failures}
circuit_cooldown_s = {COOLDOWN_S}

[events]
sink = "{sink}"

[[providers]]
name = "beta"
base_url = "{mocks.beta.url}/v1"
models = ["mock-chat"]
{limit_blocks(keys, groups)}"""


@dataclass
class Readiness:
    """/readyz of one gateway every 100 ms: (when, status, body)."""

    proc: Proc
    seen: list[tuple[float, int, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        deadline = time.monotonic() + 60
        with httpx.Client(timeout=10) as client:
            while not self.stop.is_set() and time.monotonic() < deadline:
                resp = client.get(f"http://127.0.0.1:{self.proc.port}/readyz")
                self.seen.append((time.monotonic(), resp.status_code, resp.text))
                time.sleep(0.1)


def slot_map_reads(nodes: list[Node]) -> int:
    stats = [node.client().info("commandstats") for node in nodes]
    return sum(int(s.get("cmdstat_cluster|slots", {}).get("calls", 0)) for s in stats)


def test_the_gateways_follow_a_cluster_primary_failover_without_a_restart(
    tmp_path: Path, mocks: Mocks, cluster: Cluster
) -> None:
    # The victim: a primary that owns neither slot 0 nor the event stream's slot.
    avoided = {cluster.owner(0).port, cluster.owner(key_slot(REDIS_STREAM.encode())).port}
    victim = cluster.node(next(port for _, _, port, _ in cluster.slots(cluster.nodes[0]) if port not in avoided))
    replica = cluster.replica_of(victim)
    survivors = [node for node in cluster.nodes if node is not victim]
    keyed, pooled = groups_on(cluster, victim, 2)
    print(f"\nkilling primary :{victim.port} (replica :{replica.port}), holding groups {keyed} and {pooled}")
    secrets_ = {name: new_key() for name in ("load", "before", "after", "p1", "p2")}
    keys = {
        "load": (secrets_["load"], keyed, "rpm = 100000"),
        "before": (secrets_["before"], keyed, "rpm = 5"),
        "after": (secrets_["after"], keyed, "rpm = 5"),
        "p1": (secrets_["p1"], pooled, ""),
        "p2": (secrets_["p2"], pooled, ""),
    }
    groups = {keyed: "", pooled: "rpm = 4"}
    # The URL names the primary that will die: a running gateway knows every node by then.
    url = f"redis://:{PASSWORD}@127.0.0.1:{victim.port}/0"
    procs = {
        on_error: start_gateway(
            tmp_path, mocks, gateway_config(mocks, on_error, keys, groups), redis_url=url, name=f"gateway-{on_error}"
        )
        for on_error in GATEWAYS
    }
    loads = {on_error: Load(proc, secrets_["load"]) for on_error, proc in procs.items()}
    readiness = Readiness(procs["allow"])
    threads = [threading.Thread(target=job.run) for job in (*loads.values(), readiness)]
    promoted: list[float] = []
    try:
        with httpx.Client(timeout=10) as client:
            statuses = [
                chat(client, procs["deny" if i % 2 else "allow"], secrets_["before"]).status_code for i in range(7)
            ]
            assert statuses == [200] * 5 + [429] * 2
        # Redis 7 does not replicate loaded scripts; flushing them makes sure: the new primary answers NOSCRIPT.
        replica.client().script_flush()
        assert replica.client().script_exists(ADMIT.sha) == [False]
        reads_before = slot_map_reads(survivors)

        for thread in threads:
            thread.start()
        time.sleep(0.5)
        killed = time.monotonic()
        victim.proc.kill()

        def back() -> bool:
            if not promoted and replica.client().role()[0] == b"master":
                promoted.append(time.monotonic())
            return bool(promoted) and all(load.back_at(killed) for load in loads.values())

        wait_until("the replica promoted and both gateways admitting through it", back, 30)
        time.sleep(0.5)
    finally:
        for job in (*loads.values(), readiness):
            job.stop.set()
        for thread in threads:
            thread.join(timeout=15)

    try:
        reads = slot_map_reads(survivors) - reads_before
        back_at = {on_error: load.back_at(killed) or 0.0 for on_error, load in loads.items()}
        back_s = {on_error: round(at - killed, 2) for on_error, at in back_at.items()}
        after_promotion_s = {on_error: round(at - promoted[0], 2) for on_error, at in back_at.items()}
        print(
            f"failover: kill -> replica promoted {promoted[0] - killed:.2f}s; kill -> first request admitted "
            f"through it {back_s}; promotion -> that request {after_promotion_s}; "
            f"CLUSTER SLOTS on the survivors meanwhile: {reads}"
        )
        assert all(took < FAILOVER_BOUND_S for took in back_s.values()), back_s
        assert all(took < AFTER_PROMOTION_BOUND_S for took in after_promotion_s.values()), after_promotion_s
        assert replica.client().script_exists(ADMIT.sha) == [True]  # loaded again after NOSCRIPT

        # During the gap on_error applied, and no request hung.
        check_gap(loads, killed, TIMEOUT_S + HANG_MARGIN_S)

        # /readyz named the dead primary until its replica took over, then was ready again.
        down = [body for at, status, body in readiness.seen if status == 503]
        assert any(f"127.0.0.1:{victim.port}" in body for body in down), down
        assert readiness.seen[-1][1] == 200, readiness.seen[-5:]
        assert not any(PASSWORD in body for *_, body in readiness.seen)

        # Limits are exact again: a key's rpm = 5 and a group's rpm = 4, over both gateways.
        def burst(keys: list[str], n: int) -> list[int]:
            def one(i: int) -> int:
                with httpx.Client(timeout=10) as client:
                    return chat(client, procs["deny" if i % 2 else "allow"], keys[i // 2 % len(keys)]).status_code

            with ThreadPoolExecutor(n) as pool:
                return sorted(pool.map(one, range(n)))

        assert burst([secrets_["after"]], 8) == [200] * 5 + [429] * 3
        assert burst([secrets_["p1"], secrets_["p2"]], 8) == [200] * 4 + [429] * 4
        for proc in procs.values():
            resp = httpx.get(f"http://127.0.0.1:{proc.port}/readyz", timeout=5)
            assert resp.status_code == 200, resp.text

        # The cluster client of the odd commands followed too: records reach the stream.
        with httpx.Client(timeout=10) as client:
            assert chat(client, procs["allow"], secrets_["load"], "after-failover").status_code == 200
        stream = cluster.client(survivors[0])
        try:
            wait_until(
                "the record in the stream",
                lambda: any(b"after-failover" in e[b"event"] for _, e in stream.xrange(REDIS_STREAM)),
                5,
            )
        finally:
            stream.close()
        usage = run_keys_usage(tmp_path / "gateway-deny.toml", f"redis://:{PASSWORD}@127.0.0.1:{replica.port}/0")
        assert usage.returncode == 0, usage.stderr + usage.stdout
        assert "key rpm 0/5" in usage.stdout, usage.stdout
        assert PASSWORD not in usage.stdout + usage.stderr
    finally:
        for proc in procs.values():
            proc.stop()
    for proc in procs.values():
        assert PASSWORD not in proc.log.read_text(errors="replace")
