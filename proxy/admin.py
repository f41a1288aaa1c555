"""Operator commands: make a key, show what keys have spent."""

from __future__ import annotations

import argparse
import contextlib
import math
from collections.abc import Iterable, Iterator

import orjson

from .auth import key_digest, new_key
from .events import REDIS_STREAM
from .limit_kinds import TOKEN_BUDGET, kinds_for
from .limits import Bucket, Limiter, LimiterFailure, buckets_for, budget_keys, format_duration
from .redact import safe_url
from .settings import NAME_RE, Settings


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


def _level(bucket: Bucket, state: list[bytes | None], now: float) -> str:
    if state[0] is None or state[1] is None:
        return f"{bucket.capacity}/{bucket.capacity}"
    elapsed = max(0.0, now - float(state[1]))
    level = min(bucket.capacity, float(state[0]) + elapsed * bucket.rate_per_s)
    full_in = math.ceil((bucket.capacity - level) / bucket.rate_per_s * 1000)
    shown = f"{math.floor(level)}/{bucket.capacity}"
    return shown if full_in <= 0 else f"{shown} (full in {format_duration(full_in)})"


def _held(members: list[bytes]) -> int:
    """Tokens held by requests in flight: each hold's member is "id:tokens"."""
    return sum(int(member.rpartition(b":")[2]) for member in members)


async def keys_usage(settings: Settings, name: str | None) -> tuple[list[str], int]:
    """One line per key: budget spent and held, current bucket levels. Exit code 2 when Redis fails."""
    keys = [k for k in settings.keys.values() if name is None or k.name == name]
    if not keys:
        return [f"no key named {name!r} in {settings.source}" if name else f"no [[keys]] in {settings.source}"], 2
    limiter = Limiter(settings.redis)
    lines = [f"{'key':<20} {'group':<12} {'spent':>12} {'held':>12} {'budget':>12}  buckets"]
    try:
        seconds, micros = await limiter.call(limiter.client.time())
        now = seconds + micros / 1_000_000
        now_ms = seconds * 1000 + micros // 1000
        for key in sorted(keys, key=lambda k: k.name):
            spent_key, holds_key, _ = budget_keys(key)
            raw = await limiter.call(limiter.client.get(spent_key))
            spent = int(raw) if raw is not None else 0
            # Holds not yet expired: an expired one is only dropped at the key's next admission.
            held = _held(await limiter.call(limiter.client.zrangebyscore(holds_key, f"({now_ms}", "+inf")))
            limit = key.limit(TOKEN_BUDGET)
            budget = "unlimited" if limit is None else str(limit)
            levels = []
            for bucket in buckets_for(key, settings.groups[key.group]):
                state = await limiter.call(limiter.client.hmget(bucket.redis_key, ["t", "ts"]))
                levels.append(f"{bucket.scope} {bucket.kind.name} {_level(bucket, state, now)}")
            row = f"{key.name:<20} {key.group:<12} {spent:>12} {held:>12} {budget:>12}"
            lines.append(f"{row}  {'; '.join(levels) or '-'}")
    except LimiterFailure as exc:
        return [f"Redis at {safe_url(settings.redis.url)} does not answer ({exc})"], 2
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
        return [f"Redis at {safe_url(settings.redis.url)} does not answer ({exc})".encode()], 2
    finally:
        await limiter.close()
    found = list(find_events((fields[b"event"] for _, fields in entries), request_id))
    return found, 0 if found else 1
