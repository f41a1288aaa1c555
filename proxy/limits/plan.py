"""What a request's admission and settle send, built once per key when the config is read.

A `Plan` is one admission script call with its keys and arguments packed; `KeyLimits` holds a key's
plans (model routes, passthrough) and its settle call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

from ..config.limit_kinds import BUCKET_KINDS, BUDGET_KINDS, Counts, LimitKind, Scope
from ..config.settings import GroupSettings, KeySettings, LimitSettings
from ..redisio.pipe import Prepared, Script
from .keys import budget_keys, group_prefix, key_prefix, limit_sources, money_keys, settled_key, to_micros

_MONTH_LUA = files(__package__).joinpath("month.lua").read_text()  # month_of(), shared by both scripts
ADMIT = Script(_MONTH_LUA + files(__package__).joinpath("token_bucket.lua").read_text())
SETTLE = Script(_MONTH_LUA + files(__package__).joinpath("charge.lua").read_text())
# How long Redis remembers a settled hold id (charge.lua): a settle sent again, or an admission that comes
# after its settle, within this long does nothing. Both follow a Redis stall by seconds, not minutes.
SETTLED_MEMORY_S = 120.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Bucket:
    redis_key: str
    scope: Scope
    owner: str
    kind: LimitKind
    per_minute: int
    capacity: int

    @property
    def rate_per_s(self) -> float:
        return self.per_minute / 60.0

    @property
    def at_admission(self) -> bool:
        """Taken from when the request is admitted (one request), rather than charged after the answer."""
        return self.kind.counts is Counts.REQUESTS

    def describe(self) -> str:
        return f"{self.kind.name} limit of {self.scope} '{self.owner}' ({self.per_minute} per minute)"


def buckets_for(key: KeySettings, group: GroupSettings) -> tuple[Bucket, ...]:
    found: list[Bucket] = []
    sources = limit_sources(key, group)
    for scope, owner, source, prefix in sources:
        for kind in BUCKET_KINDS:
            value = source.limit(kind) if scope in kind.scopes else None
            if value is not None:
                per_minute = int(value)  # the config reads bucket kinds as whole numbers
                burst = getattr(source, kind.burst_key) if kind.burst_key is not None else None
                capacity = burst if burst is not None else per_minute
                found.append(
                    Bucket(
                        redis_key=f"{prefix}:{kind.name}",
                        scope=scope,
                        owner=owner,
                        kind=kind,
                        per_minute=per_minute,
                        capacity=capacity,
                    )
                )
    return tuple(found)


@dataclass(frozen=True, slots=True, kw_only=True)
class Budget:
    """A total a request holds from at admission and its answer spends: a key's tokens, a key's or group's money."""

    kind: LimitKind
    scope: Scope
    owner: str
    amount: int  # tokens, or micro-units of the currency
    keys: tuple[str, str, str]  # what is spent, the holds, the total they hold
    counted: str  # what of keys[0] counts: "" the counter; "total" or "month" of a money hash

    @property
    def in_money(self) -> bool:
        return self.kind.counts is Counts.MONEY


def budgets_for(key: KeySettings, group: GroupSettings) -> tuple[Budget, ...]:
    found: list[Budget] = []
    sources = limit_sources(key, group)
    for scope, owner, source, prefix in sources:
        for kind in BUDGET_KINDS:
            amount = source.limit(kind) if scope in kind.scopes else None
            if amount is None:
                continue
            if kind.counts is Counts.MONEY:
                counted = "month" if kind.period_key and getattr(source, kind.period_key) == "month" else "total"
                found.append(
                    Budget(
                        kind=kind,
                        scope=scope,
                        owner=owner,
                        amount=to_micros(amount),
                        keys=money_keys(prefix),
                        counted=counted,
                    )
                )
            else:
                found.append(
                    Budget(kind=kind, scope=scope, owner=owner, amount=int(amount), keys=budget_keys(key), counted="")
                )
    return tuple(found)


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """The admit script call for one kind of request, precomputed.

    With budgets, a request adds what it would hold of each and its hold id to `args`.
    """

    buckets: tuple[Bucket, ...]
    budgets: tuple[Budget, ...]
    keys: tuple[str, ...]
    args: tuple[Any, ...]
    call: Prepared  # the EVALSHA, packed once
    top_up: str = ""  # [limits] budget_message, for a spent budget's 402
    # Per bucket kind with buckets here: its three x-ratelimit-* names, and (index, limit as text) of each bucket.
    header_rows: tuple[tuple[tuple[bytes, bytes, bytes], tuple[tuple[int, bytes], ...]], ...] = ()
    money_scope: Scope | None = None  # whose budget in money this request draws on, if any: "key" before "group"

    @property
    def budgeted(self) -> bool:
        return bool(self.budgets)

    @classmethod
    def build(
        cls, buckets: tuple[Bucket, ...], budgets: tuple[Budget, ...], limits: LimitSettings, settled: str = ""
    ) -> Plan:
        """settled: with budgets, the key's settled hold ids (settled_key), which an admission checks first."""
        args: list[Any] = [len(buckets), len(budgets), math.ceil(limits.hold_ttl_s * 1000), limits.clock_offset_s]
        for b in buckets:
            args += [b.capacity, b.rate_per_s, 1 if b.at_admission else 0]
        for budget in budgets:
            args += [budget.amount, budget.counted]
        keys = [b.redis_key for b in buckets] + [k for budget in budgets for k in budget.keys]
        if budgets:
            keys.append(settled)
        call = Prepared(ADMIT, keys, args, more=len(budgets) + 1 if budgets else 0)
        rows = []
        for kind in BUCKET_KINDS:
            members = tuple((i, str(b.per_minute).encode()) for i, b in enumerate(buckets) if b.kind is kind)
            if members:
                label = kind.header
                names = (
                    b"x-ratelimit-limit-" + label,
                    b"x-ratelimit-remaining-" + label,
                    b"x-ratelimit-reset-" + label,
                )
                rows.append((names, members))
        money = next((b.scope for b in budgets if b.in_money), None)
        return cls(
            buckets=buckets,
            budgets=budgets,
            keys=tuple(keys),
            args=tuple(args),
            call=call,
            top_up=limits.budget_message,
            header_rows=tuple(rows),
            money_scope=money,
        )


@dataclass(frozen=True, slots=True)
class KeyLimits:
    key: KeySettings
    model: Plan | None  # chat, completions, embeddings: every bucket, the budgets
    passthrough: Plan | None  # other routes: the buckets taken at admission (rpm) and the budgets
    reserve_tokens: int  # held of a budget for a completion of unknown length
    budgets: tuple[Budget, ...]
    token_buckets: tuple[Bucket, ...]  # charged from the answer's usage
    charge_keys: tuple[str, ...]
    charge_args: tuple[Any, ...]  # a settle adds the usage, the hold id and what each budget held
    settle_call: Prepared  # the EVALSHA, packed once

    @classmethod
    def build(cls, key: KeySettings, group: GroupSettings, limits: LimitSettings) -> KeyLimits:
        buckets = buckets_for(key, group)
        budgets = budgets_for(key, group)
        admitted = tuple(b for b in buckets if b.at_admission)
        charged = tuple(b for b in buckets if not b.at_admission)
        args: list[Any] = [len(charged), len(budgets), limits.clock_offset_s, math.ceil(SETTLED_MEMORY_S * 1000)]
        for b in charged:
            args += [b.capacity, b.rate_per_s]
        # Spending is counted for every key, so `keys usage` and the billing routes show it without a budget too.
        spent = (budget_keys(key)[0], money_keys(key_prefix(key))[0], money_keys(group_prefix(group.name))[0])
        settled = settled_key(key)
        charge_keys = (
            *(b.redis_key for b in charged),
            *spent,
            *(k for budget in budgets for k in budget.keys[1:]),
            *((settled,) if budgets else ()),
        )
        return cls(
            key=key,
            model=Plan.build(buckets, budgets, limits, settled) if buckets or budgets else None,
            passthrough=Plan.build(admitted, budgets, limits, settled) if admitted or budgets else None,
            reserve_tokens=limits.reserve_tokens,
            budgets=budgets,
            token_buckets=charged,
            charge_keys=charge_keys,
            charge_args=tuple(args),
            settle_call=Prepared(SETTLE, charge_keys, args, more=3 + len(budgets)),
        )

    @property
    def nothing_held(self) -> tuple[str, ...]:
        return ("0",) * len(self.budgets)
