"""What ops sees: /metrics after real requests, event records, and no secret anywhere."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.records.metrics import DURATION_BUCKETS
from proxy.request.auth import key_digest, mask_key, new_key
from tests.conftest import Mocks, Proc, RedisServer, event_records, send_raw, start_gateway

CHAT: dict[str, Any] = {"model": "mock-chat", "messages": [{"role": "user", "content": "say something"}]}
EVENT_FIELDS = [
    "ts", "request_id", "key", "key_name", "group", "route", "method", "model", "provider", "upstream_model",
    "stream", "status", "error", "latency_ms", "latency_bucket", "ttfb_ms", "prompt_tokens", "completion_tokens",
    "total_tokens", "cost", "currency", "usage_source", "attempts", "client_disconnected",
]  # fmt: skip


def obs_config(mocks: Mocks, keys: dict[str, str], sink: str, path: Path, queue_size: int = 10000) -> str:
    return f"""
[server]
drain_delay_s = 0  # SIGTERM tests here are about records; the delay is tested in test_e2e_server.py

[events]
sink = "{sink}"
path = "{path}"
queue_size = {queue_size}

[[providers]]
name = "alpha"
base_url = "{mocks.alpha.url}/v1"
api_key_env = "SG_TEST_ALPHA_KEY"
models = ["mock-chat", "alpha-*"]
idle_timeout_s = 1

[[providers]]
name = "beta"
base_url = "{mocks.beta.url}/v1"
models = ["beta-*"]

[[keys]]
name = "main"
sha256 = "{key_digest(keys["main"])}"

[[keys]]
# Its own name: the Redis server is shared by the session, and test_e2e_secrets.py's "tight" spends
# the same bucket when it runs first.
name = "obs-tight"
sha256 = "{key_digest(keys["tight"])}"
rpm = 1
"""


@dataclass
class Observed:
    proc: Proc
    keys: dict[str, str]
    events_path: Path
    mocks: Mocks

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.proc.port}"

    def post(self, key: str = "main", body: dict[str, Any] | None = None, **headers: str) -> httpx.Response:
        auth = {"Authorization": f"Bearer {self.keys[key]}"}
        return httpx.post(
            self.base + "/v1/chat/completions", json=body or CHAT, headers={**auth, **headers}, timeout=10
        )

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = httpx.get(self.base + "/metrics").text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def events(self) -> list[dict[str, Any]]:
        if not self.events_path.exists():
            return []
        return event_records(self.events_path)

    def event(self, request_id: str, timeout_s: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = [e for e in self.events() if e["request_id"] == request_id]
            if found:
                assert len(found) == 1, found
                return found[0]
            time.sleep(0.05)
        raise AssertionError(f"no event record for {request_id}")


def sample(metrics: dict[Any, float], name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def obs(tmp_path_factory: pytest.TempPathFactory, mocks: Mocks, redis_server: RedisServer) -> Iterator[Observed]:
    tmp = tmp_path_factory.mktemp("obs")
    keys = {"main": new_key(), "tight": new_key()}
    events = tmp / "events.jsonl"
    proc = start_gateway(tmp, mocks, obs_config(mocks, keys, "file", events), redis_url=redis_server.url)
    try:
        yield Observed(proc, keys, events, mocks)
    finally:
        proc.stop()


def test_metrics_move_for_each_outcome(obs: Observed) -> None:
    before = obs.metrics()
    assert obs.post().status_code == 200
    assert obs.post(body={**CHAT, "model": "nope"}).status_code == 404
    assert obs.post("tight").status_code == 200
    assert obs.post("tight").status_code == 429
    with httpx.stream(
        "POST",
        obs.base + "/v1/chat/completions",
        json={**CHAT, "stream": True},
        headers={"Authorization": f"Bearer {obs.keys['main']}", "x-mock-reset-after": "2"},
    ) as resp:
        resp.read()  # fmt: skip
    time.sleep(0.2)
    after = obs.metrics()

    def moved(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    chat = {"route": "/chat/completions"}
    assert moved("sluicegate_requests_total", **chat, model="mock-chat", provider="alpha", status="200") == 3
    assert moved("sluicegate_requests_total", **chat, model="other", provider="other", status="404") == 1
    assert moved("sluicegate_requests_total", **chat, model="mock-chat", provider="other", status="429") == 1
    assert moved("sluicegate_ratelimited_total", scope="key", limit="rpm") == 1
    assert moved("sluicegate_request_duration_seconds_count", **chat, provider="alpha", stream="false") == 2
    assert moved("sluicegate_request_duration_seconds_count", **chat, provider="alpha", stream="true") == 1
    assert moved("sluicegate_time_to_first_byte_seconds_count", **chat, provider="alpha") == 3
    assert moved("sluicegate_overhead_seconds_count", **chat) == 3
    assert moved("sluicegate_tokens_total", model="mock-chat", provider="alpha", type="completion") >= 12
    assert moved("sluicegate_tokens_total", model="mock-chat", provider="alpha", type="prompt") >= 4
    assert moved("sluicegate_upstream_errors_total", provider="alpha", reason="upstream_error") == 1
    assert sample(after, "sluicegate_active_streams") == 0
    assert sample(after, "sluicegate_inflight_requests") == 0


def test_pools_tasks_and_the_event_queue_are_sampled(obs: Observed) -> None:
    """What a leak would show: connections per provider pool, waiters, tasks, queued records."""
    with httpx.stream(
        "POST", obs.base + "/v1/chat/completions", json={**CHAT, "stream": True},
        headers={"Authorization": f"Bearer {obs.keys['main']}", "x-mock-chunks": "20", "x-mock-chunk-delay-ms": "50"},
    ) as resp:  # fmt: skip
        chunks = resp.iter_raw()  # kept: a dropped iterator closes the response
        next(chunks)
        during = obs.metrics()  # sampled at each scrape: the stream holds one connection now
        for _ in chunks:
            pass
    assert sample(during, "sluicegate_upstream_connections", provider="alpha", state="in_use") == 1
    assert sample(during, "sluicegate_upstream_pool_waiting", provider="alpha") == 0
    tasks_during = sample(during, "sluicegate_event_loop_tasks")
    deadline = time.monotonic() + 5
    while sample(after := obs.metrics(), "sluicegate_inflight_requests") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sample(after, "sluicegate_upstream_connections", provider="alpha", state="in_use") == 0
    assert sample(after, "sluicegate_upstream_connections", provider="alpha", state="idle") >= 1
    # The stream's own tasks (its request, its disconnect watcher) are gone with it.
    assert 0 < sample(after, "sluicegate_event_loop_tasks") < tasks_during
    assert sample(after, "sluicegate_event_queue_depth") >= 0


def test_client_disconnect_is_counted_and_recorded(obs: Observed) -> None:
    before = obs.metrics()
    headers = {"Authorization": f"Bearer {obs.keys['main']}", "X-Request-ID": "obs-gone"}
    sock = send_raw(obs.proc.port, {**CHAT, "stream": True}, {**headers, "x-mock-chunks": "100"})
    received = b""
    while b"tok1" not in received:
        received += sock.recv(65536)
    sock.close()
    event = obs.event("obs-gone")
    assert event["client_disconnected"] is True
    assert event["status"] == 200
    after = obs.metrics()
    labels = {"route": "/chat/completions", "provider": "alpha", "stream": "true"}
    assert (
        sample(after, "sluicegate_request_duration_seconds_count", **labels)
        - sample(before, "sluicegate_request_duration_seconds_count", **labels)
        == 1
    )
    assert sample(after, "sluicegate_active_streams") == 0


def test_overhead_excludes_the_clients_upload(obs: Observed) -> None:
    """A body trickled in over ~1 s is the client's time, not the gateway's."""
    before = obs.metrics()
    payload = orjson.dumps(CHAT)
    with socket.create_connection(("127.0.0.1", obs.proc.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
            + f"Authorization: Bearer {obs.keys['main']}\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
        )
        for i in range(0, len(payload), len(payload) // 4 + 1):
            sock.sendall(payload[i : i + len(payload) // 4 + 1])
            time.sleep(0.3)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200")
    after = obs.metrics()
    chat = {"route": "/chat/completions"}
    added = {
        name: sample(after, name, **labels) - sample(before, name, **labels)
        for name, labels in (
            ("sluicegate_overhead_seconds_sum", chat),
            ("sluicegate_overhead_seconds_count", chat),
            ("sluicegate_request_duration_seconds_sum", {**chat, "provider": "alpha", "stream": "false"}),
        )
    }
    assert added["sluicegate_overhead_seconds_count"] == 1
    # Three 0.3 s pauses after the head: the gateway's clock starts a moment after the head is sent, so a
    # little under 0.9 s (0.89998 s was seen in CI).
    assert added["sluicegate_request_duration_seconds_sum"] > 0.85
    assert added["sluicegate_overhead_seconds_sum"] < 0.1


def test_labels_stay_bounded(obs: Observed) -> None:
    names = [f"random-{os.urandom(4).hex()}" for _ in range(15)]
    for name in names:
        assert obs.post(body={**CHAT, "model": name}).status_code == 404
    text = httpx.get(obs.base + "/metrics").text
    assert not any(name in text for name in names)
    for line in text.splitlines():
        if line.startswith("sluicegate_") and 'model="' in line:
            model = line.split('model="')[1].split('"')[0]
            assert model in {"mock-chat", "other"}, line


def test_event_records_fields_and_types(obs: Observed) -> None:
    ok = obs.post(**{"X-Request-ID": "obs-ok"})
    assert ok.status_code == 200
    event = obs.event("obs-ok")
    assert list(event) == EVENT_FIELDS
    key = obs.keys["main"]
    assert event["key"] == mask_key(key) == f"sk-{key[3:7]}…{key[-4:]}"
    assert event["ts"].endswith("Z") and len(event["ts"]) == len("2026-01-01T00:00:00.000Z")
    assert (event["key_name"], event["group"], event["route"], event["method"]) == (
        "main", "default", "/chat/completions", "POST",
    )  # fmt: skip
    assert (event["model"], event["provider"], event["upstream_model"]) == ("mock-chat", "alpha", "mock-chat")
    assert (event["stream"], event["status"], event["error"], event["attempts"]) == (False, 200, None, 1)
    assert (event["prompt_tokens"], event["completion_tokens"], event["total_tokens"]) == (2, 6, 8)
    assert event["usage_source"] == "provider"
    assert isinstance(event["latency_ms"], float) and isinstance(event["ttfb_ms"], float)
    assert event["client_disconnected"] is False
    seconds = event["latency_ms"] / 1000
    le = event["latency_bucket"]
    bounds = [float(b) for b in DURATION_BUCKETS]
    assert le == "+Inf" or float(le) in bounds
    assert float(le) >= seconds
    below = [b for b in bounds if b < float(le)]
    assert not below or below[-1] < seconds


def test_one_record_per_request_including_errors(obs: Observed) -> None:
    no_key = {"X-Request-ID": "obs-e3"}
    fault = {"X-Request-ID": "obs-e4", "x-mock-status": "503"}
    outcomes = {
        "obs-e1": obs.post(**{"X-Request-ID": "obs-e1"}).status_code,
        "obs-e2": obs.post(body={"messages": []}, **{"X-Request-ID": "obs-e2"}).status_code,
        "obs-e3": httpx.post(obs.base + "/v1/chat/completions", json=CHAT, headers=no_key).status_code,
        "obs-e4": obs.post(body={**CHAT, "model": "alpha-x"}, **fault).status_code,
    }  # fmt: skip
    assert outcomes == {"obs-e1": 200, "obs-e2": 400, "obs-e3": 401, "obs-e4": 502}
    errors = {rid: obs.event(rid)["error"] for rid in outcomes}
    assert errors == {
        "obs-e1": None,
        "obs-e2": "missing_model",
        "obs-e3": "invalid_api_key",
        "obs-e4": "upstream_error",
    }
    assert obs.event("obs-e3")["key"] is None


def test_find_an_event_by_request_id(obs: Observed) -> None:
    resp = obs.post()
    request_id = resp.headers["x-request-id"]
    obs.event(request_id)
    out = subprocess.run(
        ["python3", "-m", "proxy", "events", "--file", str(obs.events_path), "--request-id", request_id],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert orjson.loads(out.stdout)["request_id"] == request_id


def test_events_file_reopened_on_sighup(obs: Observed) -> None:
    obs.post(**{"X-Request-ID": "obs-before-rotate"})
    obs.event("obs-before-rotate")
    rotated = obs.events_path.with_suffix(".1")
    obs.events_path.rename(rotated)
    obs.proc.signal(signal.SIGHUP)
    time.sleep(0.3)
    obs.post(**{"X-Request-ID": "obs-after-rotate"})
    assert obs.event("obs-after-rotate")["status"] == 200
    assert b"obs-after-rotate" not in rotated.read_bytes()


def test_nothing_lost_on_sigterm(tmp_path: Path, mocks: Mocks, redis_server: RedisServer) -> None:
    keys = {"main": new_key(), "tight": new_key()}
    events = tmp_path / "events.jsonl"
    proc = start_gateway(tmp_path, mocks, obs_config(mocks, keys, "file", events), redis_url=redis_server.url)
    url = f"http://127.0.0.1:{proc.port}/v1/chat/completions"
    auth = {"Authorization": f"Bearer {keys['main']}"}
    with httpx.Client(headers=auth) as client:
        ids = [client.post(url, json=CHAT).headers["x-request-id"] for _ in range(100)]

    def slow_stream(i: int) -> bytes:
        headers = {**auth, "X-Request-ID": f"drain-{i}", "x-mock-chunks": "15", "x-mock-chunk-delay-ms": "60"}
        with httpx.stream("POST", url, json={**CHAT, "stream": True}, headers=headers, timeout=15) as resp:
            return resp.read()

    # Streams still running at SIGTERM finish, and their records (written last of all) are kept.
    with ThreadPoolExecutor(10) as pool:
        streams = [pool.submit(slow_stream, i) for i in range(10)]
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            started = [e for e in mocks.alpha.requests() if e["id"].startswith("drain-") and e["chunk_sent_at"]]
            if len(started) == 10:
                break
            time.sleep(0.02)
        proc.signal(signal.SIGTERM)
        bodies = [stream.result() for stream in streams]
    assert all(body.endswith(b"data: [DONE]\n\n") and body.count(b"tok") == 15 for body in bodies)
    assert proc.proc is not None
    assert proc.proc.wait(timeout=15) == 0
    recorded = [orjson.loads(line)["request_id"] for line in events.read_bytes().splitlines()]
    assert sorted(recorded) == sorted(ids + [f"drain-{i}" for i in range(10)])


def test_redis_stream_sink(tmp_path: Path, mocks: Mocks, redis_server: RedisServer) -> None:
    keys = {"main": new_key(), "tight": new_key()}
    proc = start_gateway(tmp_path, mocks, obs_config(mocks, keys, "redis", tmp_path / "x"), redis_url=redis_server.url)
    try:
        url = f"http://127.0.0.1:{proc.port}/v1/chat/completions"
        headers = {"Authorization": f"Bearer {keys['main']}", "X-Request-ID": "obs-redis-1"}
        assert httpx.post(url, json=CHAT, headers=headers).status_code == 200
        deadline = time.monotonic() + 5
        found: list[str] = []
        while not found and time.monotonic() < deadline:
            out = subprocess.run(
                ["redis-cli", "-p", str(redis_server.port), "XRANGE", "sluicegate:events", "-", "+"],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            found = [line for line in out.stdout.splitlines() if "obs-redis-1" in line]
            time.sleep(0.05)
        assert found
        assert orjson.loads(found[0])["status"] == 200
    finally:
        proc.stop()


def test_full_queue_drops_and_counts_without_blocking(tmp_path: Path, mocks: Mocks, redis_server: RedisServer) -> None:
    # A FIFO nobody reads: the writer blocks opening it, so the queue (2 places) fills.
    fifo = tmp_path / "events.fifo"
    os.mkfifo(fifo)
    keys = {"main": new_key(), "tight": new_key()}
    proc = start_gateway(tmp_path, mocks, obs_config(mocks, keys, "file", fifo, 2), redis_url=redis_server.url)
    try:
        url = f"http://127.0.0.1:{proc.port}"
        auth = {"Authorization": f"Bearer {keys['main']}"}
        statuses = [httpx.post(url + "/v1/chat/completions", json=CHAT, headers=auth).status_code for _ in range(10)]
        assert statuses == [200] * 10
        text = httpx.get(url + "/metrics").text
        dropped = [line for line in text.splitlines() if line.startswith("sluicegate_events_dropped_total ")]
        # The writer holds one batch (its first record and what queued while the batch gathered, at most
        # the queue's 2), and the queue 2 more: everything else was dropped.
        assert float(dropped[0].split()[1]) >= 10 - 3 - 2
    finally:
        assert proc.proc is not None
        proc.proc.kill()
        proc.proc.wait()


def test_workers_aggregate_metrics(tmp_path: Path, mocks: Mocks, redis_server: RedisServer) -> None:
    keys = {"main": new_key(), "tight": new_key()}
    config = obs_config(mocks, keys, "off", tmp_path / "x")
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "counter_999999.db").write_bytes(b"left over from an earlier run")
    env = {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    proc = start_gateway(tmp_path, mocks, config, "--workers", "2", redis_url=redis_server.url, env=env)
    try:
        url = f"http://127.0.0.1:{proc.port}"
        for _ in range(30):
            with httpx.Client(headers={"Authorization": f"Bearer {keys['main']}"}) as client:  # new connection each
                assert client.post(url + "/v1/chat/completions", json=CHAT).status_code == 200
        for _ in range(4):
            metrics = {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)
                for s in f.samples
            }
            labels = {"route": "/chat/completions", "model": "mock-chat", "provider": "alpha", "status": "200"}
            assert sample(metrics, "sluicegate_requests_total", **labels) == 30
        # One file per worker, aggregated above; the left-over file was cleaned away at start.
        assert len(list(metrics_dir.glob("counter_*.db"))) == 2
    finally:
        proc.stop()
