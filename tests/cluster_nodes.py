"""Redis Cluster nodes for the cluster tests: redis-server processes on free ports, joined by redis-cli."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import redis
from redis.crc import key_slot

from proxy.request.auth import key_digest
from tests.conftest import free_port, wait_for_port


@dataclass
class Node:
    port: int
    proc: subprocess.Popen[bytes]
    password: str | None = None
    timeout_s: float = 5

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, password=self.password, socket_timeout=self.timeout_s)

    def id(self) -> str:
        return str(self.client().execute_command("CLUSTER", "MYID").decode())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def start_node(tmp_path: Path, extra: Sequence[str] = (), password: str | None = None, timeout_s: float = 5) -> Node:
    """One cluster-enabled redis-server, answering on its port; `extra` adds to its command line."""
    port = free_port()
    log = tmp_path / f"redis-{port}.log"
    args = [
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path),
        "--cluster-enabled", "yes", "--cluster-config-file", str(tmp_path / f"nodes-{port}.conf"),
        "--save", "", "--appendonly", "no",
        # The bus port is port + 10000 unless named: above 55535 that is no port at all.
        "--cluster-port", str(free_port()),
        *(["--requirepass", password, "--masterauth", password] if password is not None else []),
        *extra,
    ]  # fmt: skip
    with log.open("ab") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    node = Node(port, proc, password, timeout_s)
    wait_for_port(port, proc, log)
    return node


def create_cluster(nodes: Sequence[Node], replicas: int = 0) -> None:
    """`redis-cli --cluster create` over the nodes, with `replicas` replicas per primary."""
    password = nodes[0].password
    auth = ["--no-auth-warning", "-a", password] if password is not None else []
    subprocess.run(
        ["redis-cli", *auth, "--cluster", "create", *(f"127.0.0.1:{node.port}" for node in nodes),
         *(["--cluster-replicas", str(replicas)] if replicas else []), "--cluster-yes"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip


def slot_of(group: str) -> int:
    return key_slot(f"g:{group}".encode())  # the hash tag of every key of the group: {g:GROUP}


def limit_blocks(keys: dict[str, tuple[str, str, str]], groups: dict[str, str]) -> str:
    """A gateway's [groups.*] and [[keys]] TOML.

    keys: name -> (secret, group, extra TOML); groups: name -> its TOML lines.
    """
    group_blocks = "".join(f"\n[groups.{name}]\n{extra}\n" for name, extra in groups.items())
    key_blocks = "".join(
        f'\n[[keys]]\nname = "{name}"\nsha256 = "{key_digest(secret)}"\ngroup = "{group}"\n{extra}\n'
        for name, (secret, group, extra) in keys.items()
    )
    return group_blocks + key_blocks
