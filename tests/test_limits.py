"""The limiter's Redis boundary: the circuit breaker, in process, against a real redis-server."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.limits import Circuit, Limiter, LimiterFailure
from proxy.settings import RedisSettings
from tests.conftest import RedisServer, free_port


def test_circuit_opens_after_consecutive_failures_only() -> None:
    changes: list[bool] = []
    circuit = Circuit(3, 60.0, changes.append)
    for _ in range(2):
        assert circuit.allow()
        circuit.failure()
    assert circuit.allow()
    circuit.success()  # a success in between starts the count again
    for _ in range(2):
        circuit.failure()
    assert circuit.allow() and not circuit.is_open
    circuit.failure()
    assert circuit.is_open
    assert not circuit.allow()
    assert changes == [True]


def test_one_probe_after_the_cool_down_closes_it() -> None:
    changes: list[bool] = []
    circuit = Circuit(1, 0.05, changes.append)
    circuit.failure()
    assert not circuit.allow()
    time.sleep(0.06)
    assert circuit.allow()  # the probe
    assert not circuit.allow()  # everyone else while it is out
    circuit.success()
    assert circuit.allow() and circuit.allow()
    assert changes == [True, False]


def test_a_failed_probe_opens_it_for_another_cool_down() -> None:
    circuit = Circuit(1, 0.05)
    circuit.failure()
    time.sleep(0.06)
    assert circuit.allow()
    circuit.failure()
    assert not circuit.allow()
    time.sleep(0.06)
    assert circuit.allow()


def test_an_abandoned_probe_frees_the_slot() -> None:
    circuit = Circuit(1, 0.0)
    circuit.failure()
    assert circuit.allow()
    assert not circuit.allow()
    circuit.abandon()  # its request was cancelled: neither success nor failure
    assert circuit.allow()


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), tmp_path / "redis.log").start()
    try:
        yield server
    finally:
        if server.proc is not None:
            server.proc.send_signal(signal.SIGCONT)
        server.stop()


async def test_a_paused_redis_is_not_waited_on_once_the_circuit_opens(redis: RedisServer) -> None:
    errors: list[int] = []
    settings = RedisSettings(url=redis.url, timeout_s=0.3, circuit_failures=2, circuit_cooldown_s=0.5)
    limiter = Limiter(settings, on_error=lambda: errors.append(1))
    assert redis.proc is not None
    try:
        assert await limiter.ping() is None
        redis.proc.send_signal(signal.SIGSTOP)
        for _ in range(2):
            start = time.monotonic()
            assert await limiter.ping() == "redis: TimeoutError"
            assert time.monotonic() - start >= 0.25
        # Open: nothing is sent, so nothing waits.
        start = time.monotonic()
        for _ in range(20):
            assert await limiter.ping() == "redis: circuit open"
        assert time.monotonic() - start < 0.25
        assert len(errors) == 22
        # After the cool-down one probe goes out; it fails while Redis is still paused.
        await asyncio.sleep(0.55)
        assert await limiter.ping() == "redis: TimeoutError"
        assert await limiter.ping() == "redis: circuit open"
        redis.proc.send_signal(signal.SIGCONT)
        await asyncio.sleep(0.55)
        assert await limiter.ping() is None  # the probe closes it
        assert not limiter.circuit.is_open
        assert await limiter.ping() is None
    finally:
        await limiter.close()


async def test_a_cancelled_probe_does_not_leave_the_circuit_stuck(redis: RedisServer) -> None:
    settings = RedisSettings(url=redis.url, timeout_s=5.0, circuit_failures=1, circuit_cooldown_s=0.05)
    limiter = Limiter(settings)
    assert redis.proc is not None
    try:
        redis.proc.send_signal(signal.SIGSTOP)
        limiter.circuit.failure()
        await asyncio.sleep(0.06)
        probe = asyncio.create_task(limiter.ping())
        await asyncio.sleep(0.05)
        probe.cancel()  # the client of the probing request left
        with pytest.raises(asyncio.CancelledError):
            await probe
        redis.proc.send_signal(signal.SIGCONT)
        assert await limiter.ping() is None
    finally:
        await limiter.close()


async def test_call_while_open_raises_without_sending(redis: RedisServer) -> None:
    limiter = Limiter(RedisSettings(url=redis.url, circuit_failures=1, circuit_cooldown_s=60.0))
    try:
        limiter.circuit.failure()
        with pytest.raises(LimiterFailure, match="circuit open"):
            await limiter.call(limiter.client.set("sg:test:written", "1"))
        limiter.circuit.success()
        assert await limiter.call(limiter.client.get("sg:test:written")) is None
    finally:
        await limiter.close()
