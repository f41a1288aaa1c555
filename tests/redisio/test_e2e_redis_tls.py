"""TLS (`rediss://`) to real redis-servers in every [redis] mode, with a throwaway CA made at test time.

The servers listen on TLS only (`--port 0 --tls-port P`) and ask clients for a certificate of the
same CA (Redis's default, `tls-auth-clients yes`); the gateway's URL names the CA, its client
certificate and key in its query (`ssl_ca_certs`, `ssl_certfile`, `ssl_keyfile`, as redis-py reads
them). Each mode: limits exact, the redis event sink writes, /readyz 200. A gateway given another
CA gets /readyz 503 naming the failed verification, on_error ("deny") answers its requests, and
its log has no traceback. Cluster and Sentinel run with an ACL user and the default user off.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot

from proxy.records.events import REDIS_STREAM
from proxy.request.auth import key_digest, new_key
from tests.conftest import GATEWAY_ACL, ROOT, Mocks, Proc, free_port, start_gateway, wait_for_port, wait_until

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None or shutil.which("redis-cli") is None or shutil.which("openssl") is None,
    reason="redis-server, redis-cli and openssl are needed: the test makes a CA and runs TLS-only Redis servers",
)

PASSWORD = "tlspw-" + secrets.token_hex(8)  # distinctive, so a leak is found by grep
ADMIN_PASSWORD = "tlsadmin-" + secrets.token_hex(8)
SERVICE = "mymaster"
CHAT = {"model": "mock-chat", "messages": [{"role": "user", "content": "hi"}]}


@dataclass(frozen=True)
class Tls:
    """A CA, a certificate for 127.0.0.1 that the servers and the gateway both use, and a stranger CA."""

    ca: Path
    cert: Path
    key: Path
    other_ca: Path

    def server_args(self) -> list[str]:
        return ["--tls-cert-file", str(self.cert), "--tls-key-file", str(self.key), "--tls-ca-cert-file", str(self.ca)]

    def conf(self) -> str:
        return f"tls-cert-file {self.cert}\ntls-key-file {self.key}\ntls-ca-cert-file {self.ca}\n"

    def query(self, ca: Path | None = None) -> str:
        return f"ssl_ca_certs={ca or self.ca}&ssl_certfile={self.cert}&ssl_keyfile={self.key}"

    def client_options(self) -> dict[str, object]:
        return {"ssl": True, "ssl_ca_certs": str(self.ca), "ssl_certfile": str(self.cert), "ssl_keyfile": str(self.key)}

    def cli(self) -> list[str]:
        return ["--tls", "--cacert", str(self.ca), "--cert", str(self.cert), "--key", str(self.key)]


def openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    tmp = tmp_path_factory.mktemp("tls")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for name in ("ca", "other-ca"):
        openssl("req", "-x509", *ec, "-keyout", tmp / f"{name}.key", "-out", tmp / f"{name}.pem", "-days", "2",
                "-subj", f"/CN=sluicegate test {name}")  # fmt: skip
    openssl("req", *ec, "-keyout", tmp / "node.key", "-out", tmp / "node.csr", "-subj", "/CN=127.0.0.1")
    (tmp / "node.ext").write_text(
        "subjectAltName = IP:127.0.0.1, DNS:localhost\nbasicConstraints = CA:FALSE\n"
        "authorityKeyIdentifier = keyid,issuer\nsubjectKeyIdentifier = hash\n"
    )
    openssl("x509", "-req", "-in", tmp / "node.csr", "-CA", tmp / "ca.pem", "-CAkey", tmp / "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", tmp / "node.ext", "-out", tmp / "node.pem")  # fmt: skip
    return Tls(tmp / "ca.pem", tmp / "node.pem", tmp / "node.key", tmp / "other-ca.pem")


@dataclass
class Server:
    port: int
    proc: subprocess.Popen[bytes]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def start_server(tmp: Path, name: str, args: list[str], port: int) -> Server:
    log = tmp / f"{name}.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(["redis-server", *args], stdout=out, stderr=subprocess.STDOUT)
    server = Server(port, proc)
    try:
        wait_for_port(port, proc, log)
    except BaseException:
        server.stop()
        raise
    return server


def acl_conf(tls: Tls, port: int) -> str:
    """A TLS-only node whose only users are an admin (for the test) and the gateway's."""
    return (
        f'port 0\ntls-port {port}\nbind 127.0.0.1\nsave ""\nappendonly no\n{tls.conf()}'
        f"user default off\nuser admin on >{ADMIN_PASSWORD} ~* &* +@all\n"
        f"user gateway {GATEWAY_ACL.format(password=PASSWORD)}\n"
    )


def config(mocks: Mocks, redis_toml: str, keys: dict[str, tuple[str, str]]) -> str:
    """keys: name -> (secret, group); each with rpm = 3."""
    blocks = "".join(
        f'\n[[keys]]\nname = "{name}"\nsha256 = "{key_digest(secret)}"\ngroup = "{group}"\nrpm = 3\n'
        for name, (secret, group) in keys.items()
    )
    blocks += "".join(f"\n[groups.{group}]\n" for group in sorted({group for _, group in keys.values()} - {"default"}))
    return f"""
[redis]
on_error = "deny"
timeout_s = 1
{redis_toml}

[events]
sink = "redis"

[[providers]]
name = "beta"
base_url = "{mocks.beta.url}/v1"
models = ["mock-chat"]
{blocks}"""


def chat(proc: Proc, secret: str, request_id: str = "") -> httpx.Response:
    headers = {"Authorization": f"Bearer {secret}", **({"X-Request-ID": request_id} if request_id else {})}
    return httpx.post(f"http://127.0.0.1:{proc.port}/v1/chat/completions", json=CHAT, headers=headers, timeout=10)


def exactly_three_of_six(proc: Proc, secrets: list[str]) -> None:
    """Six concurrent requests for each key (rpm = 3 each): exactly three admitted per key."""
    sent = [secret for secret in secrets for _ in range(6)]
    with ThreadPoolExecutor(len(sent)) as pool:
        statuses = list(pool.map(lambda secret: chat(proc, secret).status_code, sent))
    for secret in secrets:
        assert sorted(s for s, to in zip(statuses, sent, strict=True) if to == secret) == [200] * 3 + [429] * 3


def assert_refused_by_tls(proc: Proc, secret: str) -> None:
    """The stranger CA's gateway: /readyz 503 saying why, on_error = "deny" answers, no traceback."""
    ready = httpx.get(f"http://127.0.0.1:{proc.port}/readyz", timeout=10)
    assert ready.status_code == 503
    reason = ready.json()["reason"]
    assert reason.startswith("redis: ") and "certificate verify failed" in reason, reason
    assert chat(proc, secret).status_code == 503
    output = proc.log.read_text(errors="replace")
    assert "certificate verify failed" in output and "Traceback" not in output


def assert_no_secrets(procs: list[Proc], *texts: str) -> None:
    for text in [*texts, *(proc.log.read_text(errors="replace") for proc in procs)]:
        assert PASSWORD not in text and ADMIN_PASSWORD not in text


def test_single_redis_over_tls(tmp_path: Path, mocks: Mocks, tls: Tls) -> None:
    port = free_port()
    args = ["--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    server = start_server(tmp_path, "redis", [*args, *tls.server_args(), "--requirepass", PASSWORD], port)
    client = redis.Redis(port=port, password=PASSWORD, socket_timeout=5, **tls.client_options())  # type: ignore[arg-type]
    secret = new_key()
    text = config(mocks, "", {"k": (secret, "default")})
    procs: list[Proc] = []
    try:
        for name, ca in (("right", tls.ca), ("stranger", tls.other_ca)):
            url = f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?{tls.query(ca)}"
            procs.append(start_gateway(tmp_path, mocks, text, redis_url=url, name=name))
        right, stranger = procs
        exactly_three_of_six(right, [secret])
        ready = httpx.get(f"http://127.0.0.1:{right.port}/readyz", timeout=5)
        assert ready.status_code == 200
        assert chat(right, secret, "over-tls").status_code == 429
        wait_until(
            "the record in the stream",
            lambda: any(b"over-tls" in e[b"event"] for _, e in client.xrange(REDIS_STREAM)),
            5,
        )
        usage = subprocess.run(
            [sys.executable, "-m", "proxy", "keys", "usage", "--config", str(tmp_path / "right.toml")],
            cwd=ROOT, capture_output=True, text=True, timeout=30,
            env={**os.environ, "REDIS_URL": f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?{tls.query()}"},
        )  # fmt: skip
        assert usage.returncode == 0 and "key rpm 0/3" in usage.stdout, usage.stdout + usage.stderr
        assert_refused_by_tls(stranger, secret)
    finally:
        for proc in procs:
            proc.stop()
        client.close()
        server.stop()
    assert_no_secrets(procs, ready.text, usage.stdout + usage.stderr)


@pytest.fixture
def tls_cluster(tmp_path: Path, tls: Tls) -> Iterator[list[Server]]:
    """Three TLS-only primaries, the cluster bus over TLS too, joined by redis-cli over TLS as admin."""
    nodes: list[Server] = []
    try:
        for i in range(3):
            port = free_port()
            conf = tmp_path / f"node{i}.conf"
            conf.write_text(
                acl_conf(tls, port) + f"dir {tmp_path}\ntls-cluster yes\ncluster-enabled yes\n"
                f"cluster-config-file {tmp_path / f'nodes-{i}.conf'}\ncluster-port {free_port()}\n"
            )
            nodes.append(start_server(tmp_path, f"node{i}", [str(conf)], port))
        subprocess.run(
            ["redis-cli", *tls.cli(), "--user", "admin", "--pass", ADMIN_PASSWORD, "--no-auth-warning",
             "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes), "--cluster-yes"],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        admins = [admin(tls, node.port) for node in nodes]
        wait_until(
            "cluster_state:ok on all three", lambda: all(a.cluster("info")["cluster_state"] == "ok" for a in admins), 20
        )
        for client in admins:
            client.close()
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def admin(tls: Tls, port: int) -> redis.Redis:
    return redis.Redis(port=port, username="admin", password=ADMIN_PASSWORD, socket_timeout=5, **tls.client_options())  # type: ignore[arg-type]


def test_redis_cluster_over_tls_with_an_acl_user(
    tmp_path: Path, mocks: Mocks, tls: Tls, tls_cluster: list[Server]
) -> None:
    nodes = tls_cluster
    cluster = RedisCluster(
        host="127.0.0.1", port=nodes[0].port, username="admin", password=ADMIN_PASSWORD, socket_timeout=5,
        **tls.client_options(),  # type: ignore[arg-type]
    )  # fmt: skip
    # Two groups whose slots are on different primaries: the gateway keeps a TLS pipe to each.
    owners: dict[int, str] = {}
    for i in range(200):
        owner = cluster.get_node_from_key(f"{{g:team{i}}}")
        owners.setdefault(owner.port, f"team{i}")
        if len(owners) == 2:
            break
    groups = list(owners.values())
    print("\ngroups: " + ", ".join(f"{g} slot {key_slot(f'g:{g}'.encode())} on :{p}" for p, g in owners.items()))
    keys = {f"k{i}": (new_key(), group) for i, group in enumerate(groups)}
    text = config(mocks, 'mode = "cluster"', keys)
    procs: list[Proc] = []
    try:
        for name, ca in (("right", tls.ca), ("stranger", tls.other_ca)):
            url = f"rediss://gateway:{PASSWORD}@127.0.0.1:{nodes[0].port}/0?{tls.query(ca)}"
            procs.append(start_gateway(tmp_path, mocks, text, redis_url=url, name=name))
        right, stranger = procs
        exactly_three_of_six(right, [secret for secret, _ in keys.values()])
        for group in groups:
            assert cluster.keys(f"sg:{{g:{group}}}:*", target_nodes=cluster.get_node_from_key(f"{{g:{group}}}"))
        ready = httpx.get(f"http://127.0.0.1:{right.port}/readyz", timeout=5)
        assert ready.status_code == 200
        assert chat(right, keys["k0"][0], "cluster-over-tls").status_code == 429
        wait_until(
            "the record in the stream",
            lambda: any(b"cluster-over-tls" in e[b"event"] for _, e in cluster.xrange(REDIS_STREAM)),
            5,
        )
        # keys usage and events read the cluster over TLS as the ACL user too.
        env = {**os.environ, "REDIS_URL": f"rediss://gateway:{PASSWORD}@127.0.0.1:{nodes[1].port}/0?{tls.query()}"}
        outputs = []
        for command in (["keys", "usage"], ["events", "--request-id", "cluster-over-tls"]):
            ran = subprocess.run(
                [sys.executable, "-m", "proxy", *command, "--config", str(tmp_path / "right.toml")],
                cwd=ROOT, capture_output=True, text=True, timeout=30, env=env,
            )  # fmt: skip
            assert ran.returncode == 0, ran.stdout + ran.stderr
            outputs.append(ran.stdout + ran.stderr)
        assert "key rpm 0/3" in outputs[0] and "cluster-over-tls" in outputs[1], outputs
        assert_refused_by_tls(stranger, keys["k0"][0])
        # Redis refused the gateway user nothing on any node: its ACL has every command it sends.
        for node in nodes:
            with admin(tls, node.port) as client:
                assert [e for e in client.acl_log() if e["username"] == "gateway"] == []
    finally:
        for proc in procs:
            proc.stop()
        cluster.close()
    assert_no_secrets(procs, ready.text, *outputs)


@dataclass
class TlsSentinel:
    primary: Server
    replica: Server
    sentinel: Server


@pytest.fixture
def tls_sentinel(tmp_path: Path, tls: Tls) -> Iterator[TlsSentinel]:
    """A primary and a replica on TLS only, replicating over TLS; one sentinel, on TLS only too."""
    servers: list[Server] = []
    try:
        ports = [free_port() for _ in range(3)]
        for i, name in enumerate(("primary", "replica")):
            conf = tmp_path / f"{name}.conf"
            conf.write_text(
                acl_conf(tls, ports[i]) + f"dir {tmp_path}\ntls-replication yes\n"
                f"masteruser admin\nmasterauth {ADMIN_PASSWORD}\n"
                + (f"replicaof 127.0.0.1 {ports[0]}\n" if name == "replica" else "")
            )
            servers.append(start_server(tmp_path, name, [str(conf)], ports[i]))
        conf = tmp_path / "sentinel.conf"  # a sentinel rewrites its own config file
        conf.write_text(
            f"port 0\ntls-port {ports[2]}\nbind 127.0.0.1\ndir {tmp_path}\n{tls.conf()}tls-replication yes\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {ports[0]} 1\n"
            f"sentinel auth-user {SERVICE} admin\nsentinel auth-pass {SERVICE} {ADMIN_PASSWORD}\n"
            f"sentinel down-after-milliseconds {SERVICE} 1000\nsentinel failover-timeout {SERVICE} 3000\n"
        )
        servers.append(start_server(tmp_path, "sentinel", [str(conf), "--sentinel"], ports[2]))
        nodes = TlsSentinel(*servers)
        with admin(tls, ports[1]) as replica:
            wait_until("the replica in sync", lambda: replica.info("replication")["master_link_status"] == "up", 10)
        with sentinel_client(tls, ports[2]) as sentinel:
            wait_until(
                "the sentinel sees the replica", lambda: sentinel.sentinel_master(SERVICE)["num-slaves"] == 1, 10
            )
        yield nodes
    finally:
        for server in servers:
            server.stop()


def sentinel_client(tls: Tls, port: int) -> redis.Redis:
    return redis.Redis(port=port, socket_timeout=5, **tls.client_options())  # type: ignore[arg-type]


def test_sentinel_and_data_nodes_over_tls_with_an_acl_user(
    tmp_path: Path, mocks: Mocks, tls: Tls, tls_sentinel: TlsSentinel
) -> None:
    nodes = tls_sentinel
    secrets = {name: new_key() for name in ("before", "after")}
    redis_toml = f'mode = "sentinel"\nsentinels = ["127.0.0.1:{nodes.sentinel.port}"]\nservice = "{SERVICE}"\n'
    url = f"rediss://gateway:{PASSWORD}@127.0.0.1:1/0?{tls.query()}"  # its host and port are not used
    keys = {name: (secret, "default") for name, secret in secrets.items()}
    procs: list[Proc] = []
    try:
        # The sentinel listens on TLS only: without sentinel_tls the gateway cannot ask it anything.
        procs.append(start_gateway(tmp_path, mocks, config(mocks, redis_toml, keys), redis_url=url, name="plain"))
        text = config(mocks, redis_toml + "sentinel_tls = true", keys)
        procs.append(start_gateway(tmp_path, mocks, text, redis_url=url, name="tls"))
        plain, gateway = procs
        refused = httpx.get(f"http://127.0.0.1:{plain.port}/readyz", timeout=10)
        assert refused.status_code == 503 and refused.json()["reason"].startswith("redis: "), refused.text

        exactly_three_of_six(gateway, [secrets["before"]])
        ready = httpx.get(f"http://127.0.0.1:{gateway.port}/readyz", timeout=5)
        assert ready.status_code == 200
        with admin(tls, nodes.primary.port) as primary:
            assert primary.keys("sg:*:k:before:*")

        # A failover, over TLS all the way: the primary dies, the sentinel promotes the replica, and
        # the gateway follows the sentinel to it.
        nodes.primary.stop()
        with sentinel_client(tls, nodes.sentinel.port) as sentinel:
            wait_until(
                "the sentinel names the replica",
                lambda: int(sentinel.sentinel_get_master_addr_by_name(SERVICE)[1]) == nodes.replica.port,
                15,
            )
        wait_until(
            "an admission through the new primary", lambda: chat(gateway, secrets["after"]).status_code == 200, 10
        )
        with admin(tls, nodes.replica.port) as promoted:
            assert promoted.role()[0] == b"master" and promoted.keys("sg:*:k:after:*")
            # The first admission there went through; two more of its three remain, exactly.
            with ThreadPoolExecutor(6) as pool:
                statuses = sorted(pool.map(lambda _: chat(gateway, secrets["after"]).status_code, range(6)))
            assert statuses == [200] * 2 + [429] * 4
            assert chat(gateway, secrets["before"], "after-failover").status_code in (200, 429)
            wait_until(
                "the record in the new primary's stream",
                lambda: any(b"after-failover" in e[b"event"] for _, e in promoted.xrange(REDIS_STREAM)),
                5,
            )
            assert [e for e in promoted.acl_log() if e["username"] == "gateway"] == []
        assert httpx.get(f"http://127.0.0.1:{gateway.port}/readyz", timeout=5).status_code == 200
    finally:
        for proc in procs:
            proc.stop()
    assert_no_secrets(procs, ready.text, refused.text)
