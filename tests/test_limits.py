"""The admit and settle scripts against a real redis-server, called through `Limiter`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
import redis

from proxy.errors import InsufficientQuota, RateLimited
from proxy.limits import HoldIds, KeyLimits, Limiter
from proxy.settings import GroupSettings, KeySettings, LimitSettings, RedisSettings
from tests.conftest import RedisServer, free_port

DEFAULT = GroupSettings("default")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), tmp_path_factory.mktemp("limits-redis") / "redis.log").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def limiter(server: RedisServer) -> AsyncIterator[Limiter]:
    server.flush()
    limiter = Limiter(RedisSettings(url=server.url, timeout_s=2.0))
    try:
        yield limiter
    finally:
        await limiter.close()


@pytest.fixture
def view(server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(server.url)
    try:
        yield client
    finally:
        client.close()


def limits_for(budget: int | None, rpm: int | None = None, hold_ttl_s: float = 600.0) -> KeyLimits:
    key = KeySettings(name="k", sha256="0" * 64, rpm=rpm, budget_tokens=budget)
    return KeyLimits.build(key, DEFAULT, LimitSettings(reserve_tokens=1024, hold_ttl_s=hold_ttl_s))


def held(view: redis.Redis) -> int:
    return int(view.get("sg:{g:default}:k:k:held") or 0)


def test_plans_precompute_the_budget_keys_in_the_groups_slot() -> None:
    budgeted = limits_for(100, rpm=5)
    assert budgeted.model is not None and budgeted.model.budgeted
    assert budgeted.model.keys == (
        "sg:{g:default}:k:k:rpm",
        "sg:{g:default}:k:k:spent",
        "sg:{g:default}:k:k:holds",
        "sg:{g:default}:k:k:held",
    )
    assert budgeted.model.args == (1, 100, 600_000, 5, 5 / 60, 1)
    assert budgeted.charge_keys == ("sg:{g:default}:k:k:spent", "sg:{g:default}:k:k:holds", "sg:{g:default}:k:k:held")
    plain = limits_for(None, rpm=5)
    assert plain.model is not None and not plain.model.budgeted
    assert plain.model.keys == ("sg:{g:default}:k:k:rpm",)
    assert not plain.charges_tokens
    assert limits_for(None).model is None


def test_hold_ids_differ_across_processes_and_requests() -> None:
    first, second = HoldIds(), HoldIds()
    ids = [first.next(), first.next(), second.next()]
    assert len(set(ids)) == 3
    assert ids[0].split(".")[0] != ids[2].split(".")[0]


async def test_admission_holds_at_most_what_is_available(limiter: Limiter, view: redis.Redis) -> None:
    limits = limits_for(100)
    assert limits.model is not None
    first = await limiter.admit(limits.model, 60)
    second = await limiter.admit(limits.model, 60)
    assert first.hold is not None and first.hold.endswith(":60")
    assert second.hold is not None and second.hold.endswith(":40")
    assert held(view) == 100
    with pytest.raises(RateLimited) as info:
        await limiter.admit(limits.model, 60)
    assert "held by requests in flight" in info.value.message
    assert dict(info.value.headers) == {b"retry-after": b"1", b"retry-after-ms": b"1000"}
    assert (info.value.scope, info.value.limit) == ("key", "budget")
    # Settles: 70 used of 60 held (10 over), 5 used of 40 held (35 released).
    await limiter.settle(limits, first.hold, 70)
    await limiter.settle(limits, second.hold, 5)
    assert int(view.get("sg:{g:default}:k:k:spent") or 0) == 75
    assert held(view) == 0
    assert not view.exists("sg:{g:default}:k:k:holds", "sg:{g:default}:k:k:held")
    third = await limiter.admit(limits.model, 60)
    assert third.hold is not None and third.hold.endswith(":25")
    await limiter.settle(limits, third.hold, 30)
    with pytest.raises(InsufficientQuota):
        await limiter.admit(limits.model, 60)


async def test_a_request_refused_by_a_bucket_holds_nothing(limiter: Limiter, view: redis.Redis) -> None:
    limits = limits_for(1000, rpm=1)
    assert limits.model is not None
    admitted = await limiter.admit(limits.model, 10)
    with pytest.raises(RateLimited) as info:
        await limiter.admit(limits.model, 10)
    assert info.value.limit == "rpm"
    assert held(view) == 10
    assert view.zcard("sg:{g:default}:k:k:holds") == 1
    await limiter.settle(limits, admitted.hold, 0)
    assert held(view) == 0


async def test_expired_holds_are_dropped_once_and_their_late_settle_only_charges(
    limiter: Limiter, view: redis.Redis
) -> None:
    limits = limits_for(100, hold_ttl_s=0.2)
    assert limits.model is not None
    late = await limiter.admit(limits.model, 100)
    assert 0 < view.pttl("sg:{g:default}:k:k:holds") <= 1200
    with pytest.raises(RateLimited):
        await limiter.admit(limits.model, 100)
    await asyncio.sleep(0.3)
    fresh = await limiter.admit(limits.model, 30)
    assert fresh.hold is not None and fresh.hold.endswith(":30")
    assert held(view) == 30
    await limiter.settle(limits, late.hold, 50)
    assert held(view) == 30
    await limiter.settle(limits, fresh.hold, 20)
    assert held(view) == 0
    assert int(view.get("sg:{g:default}:k:k:spent") or 0) == 70


async def test_a_settle_without_a_hold_or_usage_writes_nothing(limiter: Limiter, view: redis.Redis) -> None:
    limits = limits_for(100)
    await limiter.settle(limits, None, 0)
    assert view.keys("*") == []
