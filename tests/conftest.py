"""Real processes on real ports: two mock upstreams and a `sluicegate serve`.

Keys are made at run time; the config file is written into a temp folder.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis

from proxy.request.auth import key_digest, new_key
from tests.hostile_upstream import Hostile, start_hostile

START_TIMEOUT_S = 15.0
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open within {START_TIMEOUT_S}s:\n{log.read_text()}")


def wait_until(what: str, check: Callable[[], object], timeout_s: float) -> None:
    """Polls `check` (a Redis error counts as not yet) until it holds, or fails naming `what`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except redis.RedisError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout_s}s")


def run_keys_usage(config: Path, redis_url: str) -> subprocess.CompletedProcess[str]:
    """`sluicegate keys usage` for a gateway's config file, with REDIS_URL set as the gateway had it."""
    return subprocess.run(
        [sys.executable, "-m", "proxy", "keys", "usage", "--config", str(config)],
        cwd=ROOT, capture_output=True, text=True, timeout=30, env={**os.environ, "REDIS_URL": redis_url},
    )  # fmt: skip


@dataclass
class Proc:
    """A child process whose stdout+stderr go to a file the tests can read."""

    args: list[str]
    port: int
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    cwd: Path = ROOT  # elsewhere, PYTHONPATH=ROOT in env finds this checkout's proxy/

    def start(self) -> Proc:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "proxy", *self.args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
                cwd=self.cwd,
            )
        wait_for_port(self.port, self.proc, self.log)
        return self

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self) -> None:
        # SIGINT drains like SIGTERM but skips [server] drain_delay_s: a test's gateway has no
        # balancer to wait for. The drain itself is tested with SIGTERM (test_e2e_server.py).
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Mock:
    proc: Proc
    name: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.proc.port}"

    def faults(self, **knobs: Any) -> None:
        httpx.post(
            f"{self.url}/_mock/faults", json={k.replace("_", "-"): v for k, v in knobs.items()}
        ).raise_for_status()

    def reset(self) -> None:
        httpx.delete(f"{self.url}/_mock/faults").raise_for_status()
        httpx.delete(f"{self.url}/_mock/requests").raise_for_status()

    def requests(self) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = httpx.get(f"{self.url}/_mock/requests").json()
        return entries

    def request(self, request_id: str, timeout_s: float = 5.0, done: bool = True) -> dict[str, Any]:
        """The log entry for one request id, once it has ended (or at once if done=False)."""
        deadline = time.monotonic() + timeout_s
        while True:
            for entry in self.requests():
                if entry["id"] == request_id and (not done or entry["outcome"] != "in_progress"):
                    return entry
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} saw no finished request {request_id}")
            time.sleep(0.02)


def start_mock(tmp: Path, name: str, env: dict[str, str] | None = None, *extra: str) -> Mock:
    port = free_port()
    args = ["mock-upstream", "--bind", f"127.0.0.1:{port}", "--name", name, "--chunks", "6", "--chunk-delay-ms", "5"]
    return Mock(Proc([*args, *extra], port, tmp / f"{name}.log", env or {}).start(), name)


@dataclass
class Gateway:
    proc: Proc
    config: Path
    keys: dict[str, str]
    mocks: dict[str, Mock]
    provider_key: str

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.proc.port}"

    @property
    def v1(self) -> str:
        return self.base + "/v1"

    def auth(self, name: str = "main") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[name]}"}

    def output(self) -> str:
        return self.proc.log.read_text(errors="replace")


def gateway_config(alpha: str, beta: str, dead_port: int, keys: dict[str, str]) -> str:
    return f"""
[server]
bind = "127.0.0.1:9"
max_body_bytes = 65536
graceful_timeout_s = 5

[events]
sink = "off"

[[providers]]
name = "alpha"
base_url = "{alpha}/v1"
api_key_env = "SG_TEST_ALPHA_KEY"
models = ["mock-chat", "mock-embed", "dead-chat", "alpha-*"]
priority = 0
connect_timeout_s = 1
first_byte_timeout_s = 1
idle_timeout_s = 1

[[providers]]
name = "beta"
base_url = "{beta}/v1"
models = ["mock-chat", "beta-*", "dead-chat"]
priority = 1
first_byte_timeout_s = 2
idle_timeout_s = 2

[[providers]]
name = "dead"
base_url = "http://127.0.0.1:{dead_port}/v1"
models = ["dead-chat", "only-dead"]
priority = -1
connect_timeout_s = 1

[aliases]
"gpt-4o-mini" = "mock-chat"

[[keys]]
name = "main"
sha256 = "{key_digest(keys["main"])}"

[[keys]]
name = "limited"
sha256 = "{key_digest(keys["limited"])}"
models = ["gpt-4o-mini"]

[[keys]]
name = "disabled"
sha256 = "{key_digest(keys["disabled"])}"
enabled = false
"""


# An ACL user with what the gateway runs on Redis and nothing else: the script calls and their
# loading, PING (/readyz), XADD (the redis event sink), the admin reads (`keys usage`, `events`, the
# billing routes), the commands the two scripts call (Redis checks those against the user too), and
# in cluster mode CLUSTER SLOTS, COMMAND (redis-py's cluster client reads it once) and ASKING. Keys:
# the limiter's `sg:` prefix and the event stream. The README gives the same line.
GATEWAY_COMMANDS = (
    "+ping +evalsha +script|load +xadd +xrange +time +get +hmget +zrangebyscore "
    "+decrby +del +hget +hincrby +hset +incrby +pexpire +pexpireat +zadd +zcard +zrange +zrem +zremrangebyscore +zscan "
    "+zscore "
    "+cluster|slots +command +asking"
)
GATEWAY_ACL = f"on >{{password}} resetchannels ~sg:* ~sluicegate:events -@all {GATEWAY_COMMANDS}"


@dataclass
class RedisServer:
    """A redis-server of the tests' own on a free port, so tests can kill and restart it."""

    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        wait_for_port(self.port, self.proc, self.log)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def flush(self) -> None:
        subprocess.run(["redis-cli", "-p", str(self.port), "FLUSHALL"], check=True, capture_output=True)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis") / "redis.log").start()
    try:
        yield server
    finally:
        server.stop()


# The hostile upstream's own key (tests/hostile_upstream.py), shaped like OpenAI's keys and made at run time.
# Kept in the environment: pytest loads this file as `conftest`, and tests import it again as
# `tests.conftest`; both must see the one key of this process.
HOSTILE_KEY = os.environ.setdefault("SG_TEST_HOSTILE_UPSTREAM_KEY", "sk-hostile-" + new_key()[3:])


@pytest.fixture(scope="session")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    """An upstream that reports usage on every route and quotes HOSTILE_KEY wherever it can."""
    upstream = start_hostile(tmp_path_factory.mktemp("hostile"), HOSTILE_KEY)
    try:
        yield upstream
    finally:
        upstream.stop()


@dataclass
class Mocks:
    alpha: Mock
    beta: Mock
    provider_key: str


@pytest.fixture(scope="session")
def mocks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mocks]:
    """Two mock upstreams; alpha requires the provider key that the gateway holds."""
    tmp = tmp_path_factory.mktemp("mocks")
    provider_key = "sk-provider-" + new_key()[3:]  # shaped like OpenAI's and DeepSeek's keys
    alpha = start_mock(tmp, "mock-a", {"SG_TEST_ALPHA_KEY": provider_key}, "--api-key-env", "SG_TEST_ALPHA_KEY")
    beta = start_mock(tmp, "mock-b")
    try:
        yield Mocks(alpha, beta, provider_key)
    finally:
        alpha.proc.stop()
        beta.proc.stop()


def start_gateway(
    tmp: Path,
    mocks: Mocks,
    config_text: str,
    *extra: str,
    redis_url: str = "redis://127.0.0.1:1/0",
    name: str = "gateway",
    env: dict[str, str] | None = None,
) -> Proc:
    """A `sluicegate serve` process; REDIS_URL points at the tests' own Redis (or nowhere)."""
    config = tmp / f"{name}.toml"
    config.write_text(config_text)
    port = free_port()
    args = ["serve", "--config", str(config), "--bind", f"127.0.0.1:{port}", *extra]
    env = {"SG_TEST_ALPHA_KEY": mocks.provider_key, "REDIS_URL": redis_url, **(env or {})}
    return Proc(args, port, tmp / f"{name}.log", env).start()


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory, mocks: Mocks, redis_server: RedisServer) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("e2e")
    keys = {name: new_key() for name in ("main", "limited", "disabled")}
    config = gateway_config(mocks.alpha.url, mocks.beta.url, free_port(), keys)
    proc = start_gateway(tmp, mocks, config, redis_url=redis_server.url)
    try:
        yield Gateway(proc, tmp / "gateway.toml", keys, {"alpha": mocks.alpha, "beta": mocks.beta}, mocks.provider_key)
    finally:
        proc.stop()


@pytest.fixture
def gw(gateway: Gateway) -> Iterator[Gateway]:
    """The shared gateway, with both mocks' faults and logs cleared around each test."""
    for mock in gateway.mocks.values():
        mock.reset()
    yield gateway
    for mock in gateway.mocks.values():
        mock.reset()


def beta_config(mocks: Mocks, keys_toml: str, redis_toml: str = "") -> str:
    """One provider (mock-b serving mock-chat), no event records, and the given keys."""
    return f"""
{redis_toml}
[events]
sink = "off"

[[providers]]
name = "beta"
base_url = "{mocks.beta.url}/v1"
models = ["mock-chat"]
{keys_toml}"""


def event_lines(path: Path) -> list[bytes]:
    """The complete lines of an events file: the writer may be half-way through a line right now."""
    if not path.exists():
        return []
    data = path.read_bytes()
    return [line for line in data[: data.rfind(b"\n") + 1].splitlines() if line]


def event_records(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in event_lines(path)]


def send_raw(port: int, body: dict[str, Any], headers: dict[str, str]) -> socket.socket:
    """A POST on a bare socket, so a test can close it mid-stream like a client that left."""
    payload = orjson.dumps(body)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n{head}\r\n".encode()
        + payload
    )
    return sock


def assert_unbuffered(url: str, gw: Gateway, request_id: str) -> None:
    """20 chunks 50 ms apart: each reaches the client about when the mock sent it."""
    body = {"model": "mock-chat", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    headers = {**gw.auth(), "x-mock-chunks": "20", "x-mock-chunk-delay-ms": "50", "X-Request-ID": request_id}
    arrivals: dict[int, float] = {}
    buffer = b""
    with httpx.stream("POST", url, json=body, headers=headers, timeout=10) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"] == "text/event-stream"
        for raw in resp.iter_raw():
            now = time.time()
            buffer += raw
            *complete, buffer = buffer.split(b"\n\n")
            for event in complete:
                if b"tok" in event:
                    content = orjson.loads(event[6:])["choices"][0]["delta"]["content"]
                    arrivals[int(content.split("tok")[1].split()[0])] = now
    sent = gw.mocks["alpha"].request(request_id)["chunk_sent_at"]
    assert len(sent) == 20
    assert sorted(arrivals) == list(range(20))
    # The first token is on the client's screen long before the upstream is done.
    assert arrivals[0] < sent[-1] - 0.5
    # Each chunk tracks its send time; a buffering proxy would deliver them in a burst at the end.
    lags = [arrivals[i] - sent[i] for i in range(20)]
    assert max(lags) < 0.25, lags


def assert_upstream_closed_on_leave(port: int, gw: Gateway, request_id: str) -> dict[str, Any]:
    """Leave a long stream after three tokens: the mock sees its request closed within a second."""
    body = {"model": "mock-chat", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    headers = {**gw.auth(), "x-mock-chunks": "200", "x-mock-chunk-delay-ms": "50", "X-Request-ID": request_id}
    sock = send_raw(port, body, headers)
    received = b""
    while received.count(b"tok") < 3:
        received += sock.recv(65536)
    sock.close()
    closed_at = time.time()
    entry = gw.mocks["alpha"].request(request_id, timeout_s=5)
    assert entry["outcome"] == "disconnected"
    assert entry["disconnected_at"] - closed_at < 1.0
    return entry


# --- budgets on a Redis of a test module's own: the harness of tests/limits/ -----------------------

SHORT: dict[str, Any] = {"model": "mock-chat", "messages": [{"role": "user", "content": "say something"}]}


@dataclass
class Budgets:
    """Gateway processes on one Redis, and a view of each key's spending and holds in it."""

    procs: list[Proc]
    keys: dict[str, str]
    redis: redis.Redis

    def url(self, i: int = 0, route: str = "/chat/completions") -> str:
        return f"http://127.0.0.1:{self.procs[i % len(self.procs)].port}/v1{route}"

    def auth(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[name]}", "Content-Type": "application/json"}

    def post(
        self,
        name: str,
        body: dict[str, Any] | None = None,
        i: int = 0,
        route: str = "/chat/completions",
        **headers: str,
    ) -> httpx.Response:
        content = orjson.dumps(body or SHORT)
        return httpx.post(self.url(i, route), content=content, headers={**self.auth(name), **headers}, timeout=15)

    def spent(self, name: str) -> int:
        raw = self.redis.get(f"sg:{{g:default}}:k:{name}:spent")
        return int(raw) if raw is not None else 0

    def held(self, name: str) -> int:
        raw = self.redis.get(f"sg:{{g:default}}:k:{name}:held")
        return int(raw) if raw is not None else 0

    def holds(self, name: str) -> list[tuple[str, float]]:
        entries: list[tuple[bytes, float]] = self.redis.zrange(
            f"sg:{{g:default}}:k:{name}:holds", 0, -1, withscores=True
        )
        return [(member.decode(), score) for member, score in entries]

    def settled(self, name: str, timeout_s: float = 5.0) -> None:
        """Wait until nothing of the key's budget is held (a settle may land just after the answer)."""
        deadline = time.monotonic() + timeout_s
        while self.held(name) or self.holds(name):
            assert time.monotonic() < deadline, (self.held(name), self.holds(name))
            time.sleep(0.02)

    def server_ms(self) -> float:
        seconds, micros = self.redis.time()
        return seconds * 1000 + micros / 1000

    def period(self) -> str:
        seconds, _ = self.redis.time()
        return time.strftime("%Y-%m", time.gmtime(seconds))

    def money(self, prefix: str) -> dict[str, str]:
        raw: dict[bytes, bytes] = self.redis.hgetall(f"{prefix}:money")
        return {k.decode(): v.decode() for k, v in raw.items()}


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis of the test module's own, so it can flush it between tests."""
    server = RedisServer(free_port(), tmp_path_factory.mktemp("own-redis") / "redis.log").start()
    try:
        yield server
    finally:
        server.stop()
