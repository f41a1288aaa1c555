"""A hanging Redis (a real redis-server under SIGSTOP) behind a real gateway process: the circuit breaker."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx

from proxy.request.auth import key_digest, new_key
from tests.conftest import Mocks, Proc, RedisServer, beta_config, free_port, start_gateway

CHAT = {"model": "mock-chat", "messages": [{"role": "user", "content": "hi"}]}
TIMEOUT_S = 1.0
COOLDOWN_S = 2.0


def chat(proc: Proc, key: str) -> tuple[int, float]:
    start = time.monotonic()
    resp = httpx.post(
        f"http://127.0.0.1:{proc.port}/v1/chat/completions",
        json=CHAT, headers={"Authorization": f"Bearer {key}"}, timeout=10,
    )  # fmt: skip
    return resp.status_code, time.monotonic() - start


def metric(proc: Proc, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{proc.port}/metrics").text
    return float(next(line for line in text.splitlines() if line.startswith(name + " ")).split()[1])


def test_paused_redis_opens_the_circuit_and_one_probe_closes_it(tmp_path: Path, mocks: Mocks) -> None:
    redis = RedisServer(free_port(), tmp_path / "redis.log").start()
    assert redis.proc is not None
    limited, load = new_key(), new_key()
    keys = (
        f'\n[[keys]]\nname = "limited"\nsha256 = "{key_digest(limited)}"\nrpm = 5\n'
        f'\n[[keys]]\nname = "load"\nsha256 = "{key_digest(load)}"\nrpm = 100000\n'
    )
    redis_toml = (
        f'[redis]\non_error = "allow"\ntimeout_s = {TIMEOUT_S}\n'
        f"circuit_failures = 3\ncircuit_cooldown_s = {COOLDOWN_S}\n"
    )
    proc = start_gateway(tmp_path, mocks, beta_config(mocks, keys, redis_toml), redis_url=redis.url)
    try:
        assert chat(proc, load)[0] == 200
        assert metric(proc, "sluicegate_limiter_circuit_open") == 0
        redis.proc.send_signal(signal.SIGSTOP)  # Redis hangs; it does not refuse
        # The first two wait out timeout_s each, and are admitted (on_error = "allow"). The first one's
        # settle (every key's spending is counted) times out too: three failures in a row.
        waited = [chat(proc, load) for _ in range(2)]
        assert [status for status, _ in waited] == [200] * 2
        assert all(took >= TIMEOUT_S * 0.9 for _, took in waited), waited
        # Then the circuit is open: no request waits on Redis.
        fast = [chat(proc, load) for _ in range(10)]
        assert [status for status, _ in fast] == [200] * 10
        assert all(took < TIMEOUT_S / 2 for _, took in fast), fast
        assert metric(proc, "sluicegate_limiter_circuit_open") == 1
        assert metric(proc, "sluicegate_limiter_errors_total") >= 13
        start = time.monotonic()
        ready = httpx.get(f"http://127.0.0.1:{proc.port}/readyz", timeout=5)
        assert ready.status_code == 503
        assert ready.json()["reason"] == "redis: circuit open"
        assert time.monotonic() - start < TIMEOUT_S / 2
        redis.proc.send_signal(signal.SIGCONT)
        # After the cool-down one request probes Redis, finds it back, and the circuit closes.
        time.sleep(COOLDOWN_S + 0.2)
        assert chat(proc, limited)[0] == 200
        assert metric(proc, "sluicegate_limiter_circuit_open") == 0
        assert httpx.get(f"http://127.0.0.1:{proc.port}/readyz", timeout=5).status_code == 200
        # Limits hold again, with no restart: the probe was the first of the five.
        assert [chat(proc, limited)[0] for _ in range(5)] == [200] * 4 + [429]
        log = proc.log.read_text()
        assert "for 2s no request waits on it" in log
        assert "Redis answers again" in log
    finally:
        redis.proc.send_signal(signal.SIGCONT)
        proc.stop()
        redis.stop()
