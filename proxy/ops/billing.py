"""What keys and groups have spent in money, read from Redis, and the billing routes clients read it from.

`keys usage`, `GET /admin/keys/{name}/usage` and OpenAI's old billing endpoints
(`/dashboard/billing/subscription`, `/dashboard/billing/usage`, which chat clients
show as a balance) all read the same hashes the settle script writes. Not on the
request path of model calls: these are a few reads per call of their own.
"""

from __future__ import annotations

import calendar
import re
import time
from dataclasses import dataclass
from datetime import date
from typing import Any

from ..config.limit_kinds import MONEY_BUDGET
from ..config.settings import KeySettings, Settings
from ..http.errors import InvalidRequest, LimiterUnavailable
from ..limits.circuit import LimiterFailure
from ..limits.keys import MICROS, group_prefix, key_prefix, money_keys, to_micros
from ..limits.limiter import Limiter

UNLIMITED_USD = 100_000_000  # what a key without a money budget reports as its limit, as other gateways do
FAR_FUTURE = 4_102_444_800  # 2100-01-01T00:00:00Z: access_until of a budget that never renews
DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def current_month(now_s: float, offset_s: int) -> str:
    """The month budget periods are in, as the scripts read it: Redis time plus the tests' offset."""
    return time.strftime("%Y-%m", time.gmtime(now_s + offset_s))


def period_end(month: str) -> int:
    """Unix seconds of the next month's 1st, 00:00 UTC: when a monthly budget renews."""
    year, number = map(int, month.split("-"))
    year, number = (year + 1, 1) if number == 12 else (year, number + 1)
    return calendar.timegm((year, number, 1, 0, 0, 0))


def held_in(members: list[bytes]) -> int:
    """What requests in flight hold: each hold's member is "id:amount"."""
    return sum(int(member.rpartition(b":")[2]) for member in members)


def money(micros: int) -> float:
    return round(micros / MICROS, 6)


@dataclass(frozen=True, slots=True, kw_only=True)
class Spend:
    """A key's or a group's money: its budget, and what it has spent and holds, in micro-units."""

    budget: float | None
    monthly: bool
    month: str  # the current one
    total: int  # lifetime
    this_month: int
    held: int

    @property
    def used(self) -> int:
        """What counts against the budget: this month's spend, or all of it for a lifetime budget."""
        return self.this_month if self.monthly else self.total

    @property
    def remaining(self) -> int | None:
        return None if self.budget is None else max(0, to_micros(self.budget) - self.used)

    @property
    def renews_at(self) -> int | None:
        return period_end(self.month) if self.monthly else None

    def as_dict(self) -> dict[str, Any]:
        remaining = self.remaining
        return {
            "spent": money(self.used),
            "held": money(self.held),
            "budget": self.budget,
            "remaining": None if remaining is None else money(remaining),
            "period": self.month if self.monthly else "lifetime",
            "renews_at": self.renews_at,
            "spent_lifetime": money(self.total),
        }


@dataclass(frozen=True, slots=True)
class KeyMoney:
    key: Spend
    group: Spend

    def tightest(self) -> Spend | None:
        """The key's or its group's budget, whichever has less left; None when neither has one."""
        budgeted = [s for s in (self.key, self.group) if s.remaining is not None]
        return min(budgeted, key=lambda s: s.remaining or 0) if budgeted else None


async def _spend(
    limiter: Limiter, prefix: str, *, budget: float | None, monthly: bool, month: str, now_ms: int
) -> Spend:
    spent_key, holds_key, _ = money_keys(prefix)
    total, this_month, period = await limiter.call(limiter.client.hmget(spent_key, ["total", "month", "period"]))
    # A month's spend counts while its period is the current one (or later: a clock behind the writer's).
    current = int(this_month or 0) if period is not None and period.decode() >= month else 0
    # Holds not yet expired: an expired one is only dropped at the next admission.
    held = held_in(await limiter.call(limiter.client.zrangebyscore(holds_key, f"({now_ms}", "+inf")))
    return Spend(budget=budget, monthly=monthly, month=month, total=int(total or 0), this_month=current, held=held)


async def key_money(limiter: Limiter, settings: Settings, key: KeySettings, now: tuple[int, int]) -> KeyMoney:
    """now: Redis TIME (seconds, microseconds)."""
    seconds, micros = now
    month = current_month(seconds + micros / 1_000_000, settings.limits.clock_offset_s)
    now_ms = seconds * 1000 + micros // 1000
    group = settings.groups[key.group]
    key_budget, group_budget = key.limit(MONEY_BUDGET), group.limit(MONEY_BUDGET)
    # A key without a budget of its own shows its spend over its group's budget period.
    key_monthly = (key.budget_period if key_budget is not None else group.budget_period) == "month"
    return KeyMoney(
        key=await _spend(limiter, key_prefix(key), budget=key_budget, monthly=key_monthly, month=month, now_ms=now_ms),
        group=await _spend(
            limiter,
            group_prefix(group.name),
            budget=group_budget,
            monthly=group.budget_period == "month",
            month=month,
            now_ms=now_ms,
        ),
    )


async def _read(limiter: Limiter, settings: Settings, key: KeySettings) -> tuple[KeyMoney, Spend | None]:
    try:
        found = await key_money(limiter, settings, key, await limiter.call(limiter.client.time()))
    except LimiterFailure as exc:
        raise LimiterUnavailable("The usage store is unavailable; retry shortly.") from exc
    return found, found.tightest()


async def subscription(limiter: Limiter, settings: Settings, key: KeySettings) -> dict[str, Any]:
    """OpenAI's old GET /dashboard/billing/subscription, for the calling key: its limit is the tighter budget."""
    _, tight = await _read(limiter, settings, key)
    limit = UNLIMITED_USD if tight is None or tight.budget is None else tight.budget
    renews = tight.renews_at if tight is not None else None
    return {
        "object": "billing_subscription",
        "hard_limit_usd": limit,
        "soft_limit_usd": limit,
        "system_hard_limit_usd": limit,
        "has_payment_method": True,
        "access_until": renews if renews is not None else FAR_FUTURE,
    }


async def usage(limiter: Limiter, settings: Settings, key: KeySettings, query: bytes) -> dict[str, Any]:
    """OpenAI's old GET /dashboard/billing/usage: what counts against the limit above, in cents.

    start_date and end_date are checked (clients always send them) but do not pick the
    period: the spend is kept per budget period, not per day.
    """
    _dates(query)
    found, tight = await _read(limiter, settings, key)
    used = (tight or found.key).used
    return {"object": "list", "total_usage": round(used / (MICROS / 100), 4)}


def _dates(query: bytes) -> None:
    params: dict[str, str] = {}
    for pair in query.decode("latin-1").split("&"):
        name, _, value = pair.partition("=")
        if name in ("start_date", "end_date"):
            params[name] = value
    parsed: dict[str, date] = {}
    for name, value in params.items():
        try:
            if not DATE_RE.match(value):
                raise ValueError(value)
            parsed[name] = date.fromisoformat(value)
        except ValueError:
            raise InvalidRequest(
                f"Expected '{name}' as YYYY-MM-DD, but got {value[:32]!r}.", param=name, code="invalid_date"
            ) from None
    if len(parsed) == 2 and parsed["start_date"] > parsed["end_date"]:
        raise InvalidRequest("Expected 'start_date' on or before 'end_date'.", param="start_date", code="invalid_date")
