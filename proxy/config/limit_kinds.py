"""The kinds of limit a key or its group can carry: one row each.

settings.py reads them, limits/plan.py builds the Redis calls and the x-ratelimit-*
headers from them, 429 and 402 messages and the ratelimited metric name them,
`keys new` offers them: a new kind is a row here and its handling in the Lua
scripts. A leaf: it imports nothing of ours.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, auto
from typing import Literal

Scope = Literal["key", "group"]


class Shape(Enum):
    BUCKET = auto()  # refills at its rate per minute (token_bucket.lua's buckets)
    BUDGET = auto()  # a total that is spent: held at admission, settled from the answer


class Counts(Enum):
    REQUESTS = auto()  # one per request, taken at admission
    TOKENS = auto()  # the answer's real usage, charged when it settles
    MONEY = auto()  # the answer's cost at the model's price, charged when it settles


ASK_OPERATORS = "Ask the gateway's operators to raise it."  # a 402's last words without [limits] budget_message


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitKind:
    name: str  # the config key and `keys new --NAME`; a bucket's name in 429 messages
    shape: Shape
    counts: Counts
    unit: str  # what the number counts, for people: "requests", "tokens", "money" (in the prices' currency)
    scopes: tuple[Scope, ...]  # who may carry it
    minimum: int = 1  # the smallest value the config takes
    header: bytes = b""  # a bucket's x-ratelimit-{limit,remaining,reset}-HEADER
    burst_key: str | None = None  # the setting that sets a bucket's capacity (default: the per-minute amount)
    period_key: str | None = None  # the setting that makes a budget renew ("month"; default: lifetime)
    label: str = ""  # the `limit` of a 429 (RateLimited.limit, sluicegate_ratelimited_total); default: name
    noun: str = ""  # a budget in messages: "token budget"
    periods: tuple[str, ...] = ("month",)  # what period_key takes

    @property
    def limit_label(self) -> str:
        return self.label or self.name

    def spent_message(self, scope: Scope, top_up: str = "") -> str:
        """A budget's 402; `top_up` is the operator's own words from [limits] budget_message."""
        return f"This {_OWNER[scope]} {self.noun} is spent. {top_up or ASK_OPERATORS}"

    def held_message(self, scope: Scope, retry_in: str) -> str:
        """A budget's 429: all that is left is held by requests in flight."""
        return f"The rest of this {_OWNER[scope]} {self.noun} is held by requests in flight. Retry in {retry_in}."


_OWNER: dict[Scope, str] = {"key": "API key's", "group": "key group's"}

RPM = LimitKind(
    name="rpm",
    shape=Shape.BUCKET,
    counts=Counts.REQUESTS,
    unit="requests",
    scopes=("key", "group"),
    header=b"requests",
    burst_key="burst",
)
TPM = LimitKind(
    name="tpm", shape=Shape.BUCKET, counts=Counts.TOKENS, unit="tokens", scopes=("key", "group"), header=b"tokens"
)
# The one budget token_bucket.lua and charge.lua know: a key's lifetime total of tokens.
TOKEN_BUDGET = LimitKind(
    name="budget_tokens",
    shape=Shape.BUDGET,
    counts=Counts.TOKENS,
    unit="tokens",
    scopes=("key",),
    minimum=0,
    label="budget",
    noun="token budget",
)

# Money, in the prices' currency, for a key and for its whole group: lifetime, or renewed each month.
MONEY_BUDGET = LimitKind(
    name="budget",
    shape=Shape.BUDGET,
    counts=Counts.MONEY,
    unit="money",
    scopes=("key", "group"),
    minimum=0,
    period_key="budget_period",
    label="money_budget",
    noun="budget",
)

LIMIT_KINDS: tuple[LimitKind, ...] = (RPM, TPM, TOKEN_BUDGET, MONEY_BUDGET)
BUCKET_KINDS = tuple(k for k in LIMIT_KINDS if k.shape is Shape.BUCKET)
BUDGET_KINDS = tuple(k for k in LIMIT_KINDS if k.shape is Shape.BUDGET)


def kinds_for(scope: Scope) -> tuple[LimitKind, ...]:
    return tuple(k for k in LIMIT_KINDS if scope in k.scopes)


def setting_names(scope: Scope) -> tuple[str, ...]:
    """The config keys of the limits a key or group may set, in table order."""
    names: list[str] = []
    for kind in kinds_for(scope):
        names.append(kind.name)
        names += [k for k in (kind.burst_key, kind.period_key) if k is not None]
    return tuple(names)
