"""The limiter against a real redis-server: the admit and settle scripts called through `Limiter`, and the
circuit breaker in front of a paused Redis."""

from __future__ import annotations

import asyncio
import calendar
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis

from proxy.config.settings import GroupSettings, KeySettings, LimitSettings, RedisSettings
from proxy.http.errors import InsufficientQuota, RateLimited
from proxy.limits.circuit import Circuit, LimiterFailure
from proxy.limits.limiter import HoldIds, Limiter
from proxy.limits.plan import SETTLED_MEMORY_S, KeyLimits
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
        "sg:{g:default}:k:k:settled",
    )
    assert budgeted.model.args == (1, 1, 600_000, 0, 5, 5 / 60, 1, 100, "")
    spent = ("sg:{g:default}:k:k:spent", "sg:{g:default}:k:k:money", "sg:{g:default}:g:money")
    assert budgeted.charge_keys == (
        *spent,
        "sg:{g:default}:k:k:holds",
        "sg:{g:default}:k:k:held",
        "sg:{g:default}:k:k:settled",
    )
    plain = limits_for(None, rpm=5)
    assert plain.model is not None and not plain.model.budgeted
    assert plain.model.keys == ("sg:{g:default}:k:k:rpm",)
    # Every key's spending is counted, with or without a budget.
    assert plain.charge_keys == spent
    assert limits_for(None).model is None


def test_hold_ids_differ_across_processes_and_requests() -> None:
    first, second = HoldIds(), HoldIds()
    ids = [first.next(), first.next(), second.next()]
    assert len(set(ids)) == 3
    assert ids[0].split(".")[0] != ids[2].split(".")[0]


async def test_admission_holds_at_most_what_is_available(limiter: Limiter, view: redis.Redis) -> None:
    limits = limits_for(100)
    assert limits.model is not None
    first = await limiter.admit(limits.model, (60,), "h1")
    assert first.held == ("60",)
    # 40 left, less than the next request may use, while another is in flight: 429, not a hold cut short
    # (two cut holds in flight could each overrun theirs).
    with pytest.raises(RateLimited) as info:
        await limiter.admit(limits.model, (60,), "h2")
    assert "held by requests in flight" in info.value.message
    assert dict(info.value.headers) == {b"retry-after": b"1", b"retry-after-ms": b"1000"}
    assert (info.value.scope, info.value.limit) == ("key", "budget")
    second = await limiter.admit(limits.model, (40,), "h3")  # what fits whole is held whole
    assert second.held == ("40",)
    assert held(view) == 100
    with pytest.raises(RateLimited):
        await limiter.admit(limits.model, (1,), "h2b")
    # Settles: 70 used of 60 held (10 over), 5 used of 40 held (35 released).
    await limiter.settle(limits, "h1", first.held, 70)
    await limiter.settle(limits, "h3", second.held, 5)
    assert int(view.get("sg:{g:default}:k:k:spent") or 0) == 75
    assert held(view) == 0
    assert not view.exists("sg:{g:default}:k:k:holds", "sg:{g:default}:k:k:held")
    # Nothing in flight: the request that may cross the budget gets all that is left.
    third = await limiter.admit(limits.model, (60,), "h4")
    assert third.held == ("25",)
    with pytest.raises(RateLimited):
        await limiter.admit(limits.model, (1,), "h4b")
    await limiter.settle(limits, "h4", third.held, 30)
    with pytest.raises(InsufficientQuota):
        await limiter.admit(limits.model, (60,), "h5")


async def test_a_request_refused_by_a_bucket_holds_nothing(limiter: Limiter, view: redis.Redis) -> None:
    limits = limits_for(1000, rpm=1)
    assert limits.model is not None
    admitted = await limiter.admit(limits.model, (10,), "h6")
    with pytest.raises(RateLimited) as info:
        await limiter.admit(limits.model, (10,), "h7")
    assert info.value.limit == "rpm"
    assert held(view) == 10
    assert view.zcard("sg:{g:default}:k:k:holds") == 1
    await limiter.settle(limits, "h6", admitted.held, 0)
    assert held(view) == 0


async def test_expired_holds_are_dropped_once_and_their_late_settle_only_charges(
    limiter: Limiter, view: redis.Redis
) -> None:
    limits = limits_for(100, hold_ttl_s=0.2)
    assert limits.model is not None
    late = await limiter.admit(limits.model, (100,), "h8")
    assert 0 < view.pttl("sg:{g:default}:k:k:holds") <= 1200
    with pytest.raises(RateLimited):
        await limiter.admit(limits.model, (100,), "h9")
    await asyncio.sleep(0.3)
    fresh = await limiter.admit(limits.model, (30,), "h10")
    assert fresh.held == ("30",)
    assert held(view) == 30
    await limiter.settle(limits, "h8", late.held, 50)
    assert held(view) == 30
    await limiter.settle(limits, "h10", fresh.held, 20)
    assert held(view) == 0
    assert int(view.get("sg:{g:default}:k:k:spent") or 0) == 70


async def test_a_settle_without_a_hold_or_usage_writes_nothing(limiter: Limiter, view: redis.Redis) -> None:
    limits = limits_for(100)
    await limiter.settle(limits, "", limits.nothing_held, 0)
    assert view.keys("*") == []


async def test_a_settle_counts_once_however_often_it_is_sent(limiter: Limiter, view: redis.Redis) -> None:
    """A settle whose answer was lost in a Redis stall is sent again: the second one finds its id and does nothing."""
    limits = limits_for(1000)
    assert limits.model is not None
    admitted = await limiter.admit(limits.model, (100,), "once")
    for _ in range(3):
        await limiter.settle(limits, "once", admitted.held, 40)
    assert int(view.get("sg:{g:default}:k:k:spent") or 0) == 40
    assert held(view) == 0
    remembered_ms = view.pttl("sg:{g:default}:k:k:settled")
    assert 0 < remembered_ms <= (SETTLED_MEMORY_S + 1) * 1000


async def test_an_admission_that_comes_after_its_release_takes_nothing(limiter: Limiter, view: redis.Redis) -> None:
    """The gateway gave up on an admission (a stall) and released its hold by id ("?") before the script ran:
    when it runs, it finds the id settled and holds nothing, so no phantom hold is left for hold_ttl_s."""
    limits = limits_for(1000, rpm=10)
    assert limits.model is not None
    await limiter.settle(limits, "late", ("?",), 0)
    # Nobody waits for this answer in the gateway; were it heard, it would count as a limiter failure.
    assert (await limiter.admit(limits.model, (100,), "late")).held == ("?",)
    assert held(view) == 0
    assert view.zcard("sg:{g:default}:k:k:holds") == 0
    assert view.hget("sg:{g:default}:k:k:rpm", "t") is None  # not even the request's rpm was taken


async def test_a_release_by_id_finds_an_admission_whose_answer_was_lost(limiter: Limiter, view: redis.Redis) -> None:
    limits = limits_for(1000)
    assert limits.model is not None
    await limiter.admit(limits.model, (300,), "lost")  # ran, but the gateway never heard back
    assert held(view) == 300
    await limiter.settle(limits, "lost", ("?",), 12)  # served under on_error = "allow": its usage comes with it
    assert held(view) == 0
    assert int(view.get("sg:{g:default}:k:k:spent") or 0) == 12


async def test_settles_redis_could_not_take_are_sent_once_it_answers_again(own_redis: RedisServer) -> None:
    """A stall: one settle times out after it was sent (it may have run), one is never sent (the circuit is open).
    Both are owed and sent again once Redis answers; each is counted exactly once."""
    settings = RedisSettings(url=own_redis.url, timeout_s=0.2, circuit_failures=1, circuit_cooldown_s=0.3)
    limiter = Limiter(settings)
    view = redis.Redis.from_url(own_redis.url)
    limits = limits_for(1000)
    assert limits.model is not None and own_redis.proc is not None
    try:
        own_redis.flush()
        first = await limiter.admit(limits.model, (100,), "a")
        second = await limiter.admit(limits.model, (100,), "b")
        own_redis.proc.send_signal(signal.SIGSTOP)
        sent = limiter.settle_soon(limits, "a", first.held, 30, 0)
        assert sent is not None
        with pytest.raises(TimeoutError):
            await sent
        await asyncio.sleep(0.01)  # the done-callback: the failure opens the circuit
        assert limiter.circuit.is_open
        assert limiter.settle_soon(limits, "b", second.held, 20, 0) is None
        assert limiter.owed == 2
        await asyncio.sleep(0.5)
        own_redis.proc.send_signal(signal.SIGCONT)  # the first settle, queued in Redis' socket, runs now
        for _ in range(100):  # 5 s at most
            if not limiter.owed:
                break
            await asyncio.sleep(0.05)
        assert limiter.owed == 0
        assert int(view.get("sg:{g:default}:k:k:spent") or 0) == 50
        assert int(view.get("sg:{g:default}:k:k:held") or 0) == 0
    finally:
        own_redis.proc.send_signal(signal.SIGCONT)
        view.close()
        await limiter.close()


async def test_a_settle_without_a_hold_id_never_counts_twice_over_a_long_stall(own_redis: RedisServer) -> None:
    """A key without a budget: its settles carry no id. One owed while the circuit was open goes out as a probe
    after each cool-down; a probe that times out may still run when Redis resumes, so it is not sent again."""
    settings = RedisSettings(url=own_redis.url, timeout_s=0.2, circuit_failures=1, circuit_cooldown_s=0.3)
    limiter = Limiter(settings)
    view = redis.Redis.from_url(own_redis.url)
    limits = limits_for(None, rpm=1000)
    assert limits.model is not None and own_redis.proc is not None
    try:
        own_redis.flush()
        await limiter.admit(limits.model)  # connected, scripts loaded
        own_redis.proc.send_signal(signal.SIGSTOP)
        limiter.circuit.failure()  # open: the settle is owed, never sent
        assert limiter.settle_soon(limits, "", limits.nothing_held, 30, 0) is None
        await asyncio.sleep(1.5)  # several cool-downs: the owed settle goes out as a probe and times out
        own_redis.proc.send_signal(signal.SIGCONT)
        await asyncio.sleep(1.0)
        assert limiter.owed == 0
        assert int(view.get("sg:{g:default}:k:k:spent") or 0) <= 30
    finally:
        own_redis.proc.send_signal(signal.SIGCONT)
        view.close()
        await limiter.close()


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
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), tmp_path / "redis.log").start()
    try:
        yield server
    finally:
        if server.proc is not None:
            server.proc.send_signal(signal.SIGCONT)
        server.stop()


async def test_a_paused_redis_is_not_waited_on_once_the_circuit_opens(own_redis: RedisServer) -> None:
    errors: list[int] = []
    settings = RedisSettings(url=own_redis.url, timeout_s=0.3, circuit_failures=2, circuit_cooldown_s=0.5)
    limiter = Limiter(settings, on_error=lambda: errors.append(1))
    assert own_redis.proc is not None
    try:
        assert await limiter.ping() is None
        own_redis.proc.send_signal(signal.SIGSTOP)
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
        own_redis.proc.send_signal(signal.SIGCONT)
        await asyncio.sleep(0.55)
        assert await limiter.ping() is None  # the probe closes it
        assert not limiter.circuit.is_open
        assert await limiter.ping() is None
    finally:
        await limiter.close()


async def test_a_cancelled_probe_does_not_leave_the_circuit_stuck(own_redis: RedisServer) -> None:
    settings = RedisSettings(url=own_redis.url, timeout_s=5.0, circuit_failures=1, circuit_cooldown_s=0.05)
    limiter = Limiter(settings)
    assert own_redis.proc is not None
    try:
        own_redis.proc.send_signal(signal.SIGSTOP)
        limiter.circuit.failure()
        await asyncio.sleep(0.06)
        probe = asyncio.create_task(limiter.ping())
        await asyncio.sleep(0.05)
        probe.cancel()  # the client of the probing request left
        with pytest.raises(asyncio.CancelledError):
            await probe
        own_redis.proc.send_signal(signal.SIGCONT)
        assert await limiter.ping() is None
    finally:
        await limiter.close()


async def test_call_while_open_raises_without_sending(own_redis: RedisServer) -> None:
    limiter = Limiter(RedisSettings(url=own_redis.url, circuit_failures=1, circuit_cooldown_s=60.0))
    try:
        limiter.circuit.failure()
        with pytest.raises(LimiterFailure, match="circuit open"):
            await limiter.call(limiter.client.set("sg:test:written", "1"))
        limiter.circuit.success()
        assert await limiter.call(limiter.client.get("sg:test:written")) is None
    finally:
        await limiter.close()


def money_limits(
    budget: float | None, period: str | None = None, offset_s: int = 0, group_budget: float | None = None
) -> KeyLimits:
    key = KeySettings(name="k", sha256="0" * 64, group="g", budget=budget, budget_period=period)
    group = GroupSettings("g", budget=group_budget, budget_period=period)
    return KeyLimits.build(key, group, LimitSettings(reserve_tokens=1024, clock_offset_s=offset_s))


def offset_to(view: redis.Redis, moment: str) -> int:
    """The clock offset that puts Redis' clock at this UTC moment (give or take the second this takes)."""
    target = calendar.timegm(time.strptime(moment, "%Y-%m-%dT%H:%M:%S"))
    seconds, _ = view.time()
    return target - int(seconds)


@pytest.mark.parametrize(
    ("moment", "month"),
    [
        ("2028-02-29T23:59:50", "2028-02"),  # a leap day
        ("2028-03-01T00:00:10", "2028-03"),
        ("2029-12-31T23:59:50", "2029-12"),
        ("2030-01-01T00:00:10", "2030-01"),
        ("2100-02-28T23:59:50", "2100-02"),  # no leap day in 2100
        ("2100-03-01T00:00:10", "2100-03"),
        ("1999-12-31T23:59:50", "1999-12"),
    ],
)
async def test_spending_goes_to_the_month_of_the_redis_clock(
    limiter: Limiter, view: redis.Redis, moment: str, month: str
) -> None:
    limits = money_limits(1.0, "month", offset_to(view, moment))
    await limiter.settle(limits, "", limits.nothing_held, 10, 123)
    assert view.hgetall("sg:{g:g}:k:k:money") == {b"total": b"123", b"month": b"123", b"period": month.encode()}
    assert view.hgetall("sg:{g:g}:g:money") == {b"total": b"123", b"month": b"123", b"period": month.encode()}


async def test_a_monthly_money_budget_renews_on_the_first_and_a_lifetime_one_does_not(
    limiter: Limiter, view: redis.Redis
) -> None:
    january = money_limits(1.0, "month", offset_to(view, "2030-01-31T23:50:00"))
    february = money_limits(1.0, "month", offset_to(view, "2030-02-01T00:10:00"))
    lifetime = money_limits(1.0, None, offset_to(view, "2030-02-01T00:10:00"))
    assert january.model is not None and february.model is not None and lifetime.model is not None
    first = await limiter.admit(january.model, (600_000,), "a")
    await limiter.settle(january, "a", first.held, 10, 700_000)  # over its hold: charged all the same
    second = await limiter.admit(january.model, (600_000,), "b")
    assert (first.held, second.held) == (("600000",), ("300000",))  # all that is left
    await limiter.settle(january, "b", second.held, 10, 300_000)
    with pytest.raises(InsufficientQuota) as info:
        await limiter.admit(january.model, (1,), "c")
    assert info.value.message == "This API key's budget is spent. Ask the gateway's operators to raise it."
    with pytest.raises(InsufficientQuota):
        await limiter.admit(lifetime.model, (1,), "d")
    # February: the month's spend starts from nothing; the reset is written by the first settle in it.
    renewed = await limiter.admit(february.model, (600_000,), "e")
    assert renewed.held == ("600000",)
    await limiter.settle(february, "e", renewed.held, 10, 50_000)
    assert view.hgetall("sg:{g:g}:k:k:money") == {b"total": b"1050000", b"month": b"50000", b"period": b"2030-02"}
    # A process whose clock is still in January spends in the stored, later month: it never resets it back.
    late = await limiter.admit(january.model, (1_000_000,), "f")
    assert late.held == ("950000",)
    await limiter.settle(january, "f", late.held, 10, 1)
    assert view.hget("sg:{g:g}:k:k:money", "month") == b"50001"
    assert view.hget("sg:{g:g}:k:k:money", "period") == b"2030-02"


async def test_a_group_money_budget_holds_across_its_keys(limiter: Limiter, view: redis.Redis) -> None:
    one = money_limits(None, group_budget=0.001)
    other = KeyLimits.build(
        KeySettings(name="other", sha256="1" * 64, group="g"), GroupSettings("g", budget=0.001), LimitSettings()
    )
    assert one.model is not None and other.model is not None
    first = await limiter.admit(one.model, (800,), "a")
    with pytest.raises(RateLimited) as info:
        await limiter.admit(other.model, (800,), "b")
    assert info.value.message.startswith("The rest of this key group's budget is held by requests in flight.")
    assert (info.value.scope, info.value.limit) == ("group", "money_budget")
    second = await limiter.admit(other.model, (200,), "b")
    assert second.held == ("200",)
    await limiter.settle(one, "a", first.held, 10, 900)
    await limiter.settle(other, "b", second.held, 10, 150)
    assert view.hget("sg:{g:g}:g:money", "total") == b"1050"
    with pytest.raises(InsufficientQuota) as spent:
        await limiter.admit(one.model, (1,), "d")
    assert "key group's budget is spent" in spent.value.message
    assert not view.exists("sg:{g:g}:g:money_holds", "sg:{g:g}:g:money_held")
