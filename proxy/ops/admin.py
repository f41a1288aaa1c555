"""Operator commands: make a key, show what keys have spent."""

from __future__ import annotations

import argparse
import contextlib
import math
from collections.abc import Iterable, Iterator
from typing import Any

import orjson

from ..config.limit_kinds import TOKEN_BUDGET, kinds_for
from ..config.settings import NAME_RE, KeySettings, Settings
from ..limits.circuit import LimiterFailure
from ..limits.headers import format_duration
from ..limits.keys import budget_keys
from ..limits.limiter import Limiter
from ..limits.plan import Bucket, buckets_for
from ..records.events import REDIS_STREAM
from ..redisio.clients import describe
from ..request.auth import key_digest, new_key
from .billing import held_in, key_money, money


def keys_new(args: argparse.Namespace) -> str:
    """The key and its [[keys]] block; raises ValueError for a name the config would reject."""
    for label, value in (("--name", args.name), ("--group", args.group)):
        if value is not None and not NAME_RE.match(value):
            raise ValueError(f"{label}: expected 1-64 of A-Z a-z 0-9 _ . -, got {value!r}")
    if args.models and any(c in args.models for c in '"\\\n'):
        raise ValueError("--models: model names cannot contain quotes, backslashes or line breaks")
    key = new_key()
    lines = ["[[keys]]", f'name = "{args.name}"', f'sha256 = "{key_digest(key)}"']
    if args.group:
        lines.append(f'group = "{args.group}"')
    for kind in kinds_for("key"):
        value = getattr(args, kind.name)
        if value is not None:
            lines.append(f"{kind.name} = {value}")
    if args.models:
        models = ", ".join(f'"{m.strip()}"' for m in args.models.split(",") if m.strip())
        lines.append(f"models = [{models}]")
    block = "\n".join(lines)
    note = "# Give the key above to its user; it is not stored anywhere.\n# Add this block to the config:"
    return f"{key}\n\n{note}\n{block}\n"


def _bucket(bucket: Bucket, state: list[bytes | None], now: float) -> dict[str, Any]:
    level = float(bucket.capacity)
    if state[0] is not None and state[1] is not None:
        level = min(bucket.capacity, float(state[0]) + max(0.0, now - float(state[1])) * bucket.rate_per_s)
    full_in = max(0, math.ceil((bucket.capacity - level) / bucket.rate_per_s * 1000))
    return {
        "scope": bucket.scope, "limit": bucket.kind.name, "level": math.floor(level),
        "capacity": bucket.capacity, "full_in_ms": full_in,
    }  # fmt: skip


def _level(bucket: dict[str, Any]) -> str:
    shown = f"{bucket['level']}/{bucket['capacity']}"
    full_in = bucket["full_in_ms"]
    return shown if full_in <= 0 else f"{shown} (full in {format_duration(full_in)})"


async def key_usage(limiter: Limiter, settings: Settings, key: KeySettings) -> dict[str, Any]:
    """What one key has spent and holds, of tokens and of money, and its bucket levels: what `keys usage` prints."""
    seconds, micros = await limiter.call(limiter.client.time())
    now = seconds + micros / 1_000_000
    now_ms = seconds * 1000 + micros // 1000
    spent_key, holds_key, _ = budget_keys(key)
    raw = await limiter.call(limiter.client.get(spent_key))
    tokens_held = held_in(await limiter.call(limiter.client.zrangebyscore(holds_key, f"({now_ms}", "+inf")))
    found = await key_money(limiter, settings, key, (seconds, micros))
    tight = found.tightest()
    buckets = []
    for bucket in buckets_for(key, settings.groups[key.group]):
        state = await limiter.call(limiter.client.hmget(bucket.redis_key, ["t", "ts"]))
        buckets.append(_bucket(bucket, state, now))
    left = None if tight is None or tight.remaining is None else money(tight.remaining)
    return {
        "key": key.name,
        "group": key.group,
        "tokens": {"spent": int(raw or 0), "held": tokens_held, "budget": key.limit(TOKEN_BUDGET)},
        "currency": settings.prices.currency,
        "money": found.key.as_dict(),
        "group_money": found.group.as_dict(),
        "money_left": left,  # of the tighter of the key's and the group's budget; None without either
        "buckets": buckets,
    }


def _amount(value: float | None) -> str:
    return "-" if value is None else f"{value:.6f}"


def usage_line(usage: dict[str, Any]) -> str:
    tokens, money = usage["tokens"], usage["money"]
    budget = "unlimited" if tokens["budget"] is None else str(tokens["budget"])
    money_budget = "unlimited" if money["budget"] is None else _amount(money["budget"])
    row = f"{usage['key']:<20} {usage['group']:<12} {tokens['spent']:>12} {tokens['held']:>12} {budget:>12}"
    cost = _amount(money["spent"]) if usage["currency"] else "-"
    row += f" {cost:>14} {money_budget:>14} {_amount(usage['money_left']):>14}"
    row += f" {money['period']:>9}"
    levels = [f"{b['scope']} {b['limit']} {_level(b)}" for b in usage["buckets"]]
    return f"{row}  {'; '.join(levels) or '-'}"


def usage_header(currency: str | None) -> str:
    unit = currency or "money"
    money = f"{'spent_' + unit:>14} {'budget_' + unit:>14} {'left_' + unit:>14} {'period':>9}"
    return f"{'key':<20} {'group':<12} {'spent':>12} {'held':>12} {'budget':>12} {money}  buckets"


async def keys_usage(settings: Settings, name: str | None) -> tuple[list[str], int]:
    """One line per key: tokens and money spent and held, budgets, bucket levels. Exit code 2 when Redis fails."""
    keys = [k for k in settings.keys.values() if name is None or k.name == name]
    if not keys:
        return [f"no key named {name!r} in {settings.source}" if name else f"no [[keys]] in {settings.source}"], 2
    limiter = Limiter(settings.redis)
    lines = [usage_header(settings.prices.currency)]
    try:
        for key in sorted(keys, key=lambda k: k.name):
            lines.append(usage_line(await key_usage(limiter, settings, key)))
    except LimiterFailure as exc:
        return [f"{describe(settings.redis)} does not answer ({exc})"], 2
    finally:
        await limiter.close()
    return lines, 0


def find_events(lines: Iterable[bytes], request_id: str) -> Iterator[bytes]:
    """Event records (JSON lines) whose request_id is the one a user pasted."""
    needle = request_id.encode()
    for line in lines:
        if needle in line:
            with contextlib.suppress(orjson.JSONDecodeError):
                if orjson.loads(line).get("request_id") == request_id:
                    yield line.rstrip(b"\n")


def search_file(path: str, request_id: str) -> tuple[list[bytes], int]:
    """Exit code 1 when not found, 2 when the file cannot be read."""
    try:
        with open(path, "rb") as lines:
            found = list(find_events(lines, request_id))
    except OSError as exc:
        return [f"cannot read {path}: {exc.strerror}".encode()], 2
    return found, 0 if found else 1


async def search_redis(settings: Settings, request_id: str) -> tuple[list[bytes], int]:
    limiter = Limiter(settings.redis)
    try:
        entries = await limiter.call(limiter.client.xrange(REDIS_STREAM))
    except LimiterFailure as exc:
        return [f"{describe(settings.redis)} does not answer ({exc})".encode()], 2
    finally:
        await limiter.close()
    found = list(find_events((fields[b"event"] for _, fields in entries), request_id))
    return found, 0 if found else 1
