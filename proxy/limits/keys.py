"""The Redis key schema of limits and spending: one place for every key name.

The group is the hash tag, so one decision's keys (a key's and its group's) share a Redis Cluster slot.
"""

from __future__ import annotations

from ..config.limit_kinds import Scope
from ..config.settings import GroupSettings, KeySettings

MICROS = 1_000_000  # money is counted in micro-units of the currency, as integers, to stay exact


def to_micros(amount: float) -> int:
    return round(amount * MICROS)


def key_prefix(key: KeySettings) -> str:
    # The group is the hash tag, so one decision's keys share a Redis Cluster slot.
    return f"sg:{{g:{key.group}}}:k:{key.name}"


def group_prefix(group: str) -> str:
    return f"sg:{{g:{group}}}:g"


def settled_key(key: KeySettings) -> str:
    """The hold ids the key's settles counted lately (charge.lua), so none counts twice."""
    return key_prefix(key) + ":settled"


def budget_keys(key: KeySettings) -> tuple[str, str, str]:
    """The spent tokens, the holds (a ZSET of "id:tokens" scored by expiry in ms) and the total they hold."""
    prefix = key_prefix(key)
    return prefix + ":spent", prefix + ":holds", prefix + ":held"


def money_keys(prefix: str) -> tuple[str, str, str]:
    """The spent money (a hash of micro-units: total, month, period), its holds and the total they hold."""
    return prefix + ":money", prefix + ":money_holds", prefix + ":money_held"


def limit_sources(
    key: KeySettings, group: GroupSettings
) -> tuple[tuple[Scope, str, KeySettings | GroupSettings, str], ...]:
    """Where a request's limits come from: (scope, owner's name, its settings, its Redis key prefix)."""
    return (("key", key.name, key, key_prefix(key)), ("group", group.name, group, group_prefix(group.name)))
