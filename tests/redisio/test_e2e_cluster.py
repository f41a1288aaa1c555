"""[redis] mode = "cluster" against real processes: a Redis Cluster of three primaries, two gateways.

The groups are picked so that their hash tags land on different primaries. Key and
group limits are exact over both gateways, a money budget blocks at the right
request, and when one group's slot is migrated to another primary while the
gateways run, they follow the MOVED and the group's limits hold.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from redis.cluster import RedisCluster

from proxy.records.events import REDIS_STREAM
from proxy.request.auth import new_key
from tests.cluster_nodes import Node, create_cluster, limit_blocks, slot_of, start_node
from tests.conftest import Mocks, Proc, run_keys_usage, start_gateway, wait_until

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None or shutil.which("redis-cli") is None,
    reason="redis-server and redis-cli are not installed: this test builds a Redis Cluster with them",
)

PRICE_IN, PRICE_OUT = 2, 10  # EUR per million tokens: micro-units per token
SHORT = {"model": "mock-chat", "messages": [{"role": "user", "content": "say something"}]}
SHORT_COST = 2 * PRICE_IN + 6 * PRICE_OUT  # two words, the session mocks' six chunks


@dataclass
class Cluster:
    nodes: list[Node] = field(default_factory=list)

    def owner(self, slot: int) -> Node:
        for start, end, primary, *_ in self.nodes[0].client().execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return next(node for node in self.nodes if node.port == primary[1])
        raise AssertionError(f"slot {slot} is not covered")

    def client(self) -> RedisCluster:
        return RedisCluster(host="127.0.0.1", port=self.nodes[0].port, socket_timeout=5)

    def move(self, slot: int, to: Node, meanwhile: Callable[[], object]) -> None:
        """Migrate one slot and its keys, as redis-cli --cluster reshard does, one slot only.

        meanwhile runs once the keys have moved but the slot is not yet the target's: the old
        owner answers ASK then.
        """
        source = self.owner(slot)
        to.client().execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source.id())
        source.client().execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", to.id())
        keys = source.client().execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000)
        assert keys, "the group's slot holds its buckets"
        source.client().execute_command("MIGRATE", "127.0.0.1", to.port, "", 0, 5000, "KEYS", *keys)
        meanwhile()
        for node in [to, source, *(n for n in self.nodes if n not in (to, source))]:
            node.client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", to.id())


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    nodes = Cluster()
    try:
        for _ in range(3):
            nodes.nodes.append(start_node(tmp_path))
        create_cluster(nodes.nodes)
        wait_until(
            "cluster_state:ok on all three",
            lambda: all(n.client().cluster("info")["cluster_state"] == "ok" for n in nodes.nodes),
            20,
        )
        yield nodes
    finally:
        for node in nodes.nodes:
            node.stop()


def groups_on_different_nodes(cluster: Cluster) -> dict[str, tuple[int, Node]]:
    """Three groups, each on its own primary."""
    picked: dict[int, str] = {}
    for i in range(200):
        name = f"team{i}"
        port = cluster.owner(slot_of(name)).port
        picked.setdefault(port, name)
        if len(picked) == 3:
            break
    assert len(picked) == 3
    return {name: (slot_of(name), cluster.owner(slot_of(name))) for name in picked.values()}


def gateway_config(mocks: Mocks, keys: dict[str, tuple[str, str, str]], groups: dict[str, str]) -> str:
    """keys: name -> (secret, group, extra TOML); groups: name -> its TOML lines."""
    return f"""
[redis]
mode = "cluster"
timeout_s = 1

[events]
sink = "redis"

[[providers]]
name = "beta"
base_url = "{mocks.beta.url}/v1"
models = ["mock-chat"]
first_byte_timeout_s = 5
idle_timeout_s = 5

[[prices]]
model = "mock-chat"
input = {PRICE_IN}
output = {PRICE_OUT}
currency = "EUR"
{limit_blocks(keys, groups)}"""


def chat(proc: Proc, secret: str, request_id: str = "") -> int:
    headers = {"Authorization": f"Bearer {secret}", **({"X-Request-ID": request_id} if request_id else {})}
    url = f"http://127.0.0.1:{proc.port}/v1/chat/completions"
    return httpx.post(url, json=SHORT, headers=headers, timeout=15).status_code


def burst(procs: list[Proc], secrets: list[str], n: int) -> list[int]:
    """n concurrent requests, spread over the gateways and the given keys."""
    with ThreadPoolExecutor(n) as pool:
        return sorted(pool.map(lambda i: chat(procs[i % len(procs)], secrets[i % len(secrets)]), range(n)))


def test_two_gateways_on_a_redis_cluster(tmp_path: Path, mocks: Mocks, cluster: Cluster) -> None:
    groups = groups_on_different_nodes(cluster)
    print("\ngroups: " + ", ".join(f"{g} slot {slot} on :{node.port}" for g, (slot, node) in groups.items()))
    keyed, pooled, paying = groups  # a key limit, a group limit, a money budget: one group on each primary
    secrets = {name: new_key() for name in ("k1", "k2", "g1", "g2", "money")}
    keys = {
        "k1": (secrets["k1"], keyed, "rpm = 5"),
        "k2": (secrets["k2"], keyed, "rpm = 3"),
        "g1": (secrets["g1"], pooled, ""),
        "g2": (secrets["g2"], pooled, ""),
        "money": (secrets["money"], paying, "budget = 0.0002"),
    }
    config = gateway_config(mocks, keys, {keyed: "", pooled: "rpm = 4", paying: ""})
    url = f"redis://127.0.0.1:{cluster.nodes[0].port}/0"  # any node: the gateways find the others
    procs = [start_gateway(tmp_path, mocks, config, redis_url=url, name=f"gateway{i}") for i in range(2)]
    client = cluster.client()
    try:
        # Exactly min(N, C) of N concurrent requests, over both gateways: a key limit, then a group's.
        assert burst(procs, [secrets["k1"]], 12) == [200] * 5 + [429] * 7
        assert burst(procs, [secrets["g1"], secrets["g2"]], 10) == [200] * 4 + [429] * 6
        # 200 micro-units, 64 a request: the fourth starts with 192 spent; the fifth is refused.
        statuses = []
        for i in range(5):
            statuses.append(chat(procs[i % 2], secrets["money"]))
            wait_until("the hold released", lambda: client.exists(f"sg:{{g:{paying}}}:k:money:money_held") == 0, 5)
        assert statuses == [200, 200, 200, 200, 402]
        assert client.hget(f"sg:{{g:{paying}}}:k:money:money", "total") == str(4 * SHORT_COST).encode()

        # The key-limited group's slot moves to another primary while both gateways run.
        slot, source = groups[keyed]
        target = next(node for node in cluster.nodes if node is not source)
        before = source.client().info("errorstats")
        asked: list[int] = []
        # Half-way, the old owner answers ASK: k1's spent bucket is found on the new one all the same.
        cluster.move(slot, target, lambda: asked.extend(chat(proc, secrets["k1"]) for proc in procs))
        assert asked == [429, 429]
        assert (
            source.client().info("errorstats")["errorstat_ASK"]["count"]
            - before.get("errorstat_ASK", {}).get("count", 0)
            >= 2
        )
        assert cluster.owner(slot) is target
        print(f"moved slot {slot} of {keyed} from :{source.port} to :{target.port}")
        # Limits hold: k1's spent bucket moved with the slot, k2 admits exactly its 3.
        assert [chat(proc, secrets["k1"]) for proc in procs] == [429, 429]
        assert burst(procs, [secrets["k2"]], 6) == [200] * 3 + [429] * 3
        moved = source.client().info("errorstats")["errorstat_MOVED"]["count"] - before.get("errorstat_MOVED", {}).get(
            "count", 0
        )
        assert moved >= 2, "each gateway's pipe was told MOVED by the old owner"
        assert target.client().keys(f"sg:{{g:{keyed}}}:*") and not source.client().keys(f"sg:{{g:{keyed}}}:*")

        for proc in procs:
            assert httpx.get(f"http://127.0.0.1:{proc.port}/readyz", timeout=5).status_code == 200
        # The redis event sink writes to its one stream, on whichever primary holds its slot.
        assert chat(procs[0], secrets["g1"], "in-the-cluster") in (200, 429)
        wait_until(
            "the record in the stream",
            lambda: any(b"in-the-cluster" in e[b"event"] for _, e in client.xrange(REDIS_STREAM)),
            5,
        )
        usage = run_keys_usage(tmp_path / "gateway0.toml", url)
        assert usage.returncode == 0, usage.stderr + usage.stdout
        rows = {line.split()[0]: line for line in usage.stdout.splitlines()[1:]}
        assert "key rpm 0/5" in rows["k1"] and "key rpm 0/3" in rows["k2"], usage.stdout
        assert "group rpm 0/4" in rows["g1"], usage.stdout
        assert "0.000256" in rows["money"], usage.stdout
    finally:
        client.close()
        for proc in procs:
            proc.stop()
