"""What a limit decision tells the client: x-ratelimit-* headers, Retry-After, and the refusal's words."""

from __future__ import annotations

import math

from ..http.errors import Header, InsufficientQuota, RateLimited
from .plan import Plan

HELD_WAIT_MS = 1000  # a settle frees held tokens within about an answer's time: ask again soon
HELD_HEADERS: tuple[Header, ...] = (
    (b"retry-after", str(math.ceil(HELD_WAIT_MS / 1000)).encode()),
    (b"retry-after-ms", str(HELD_WAIT_MS).encode()),
)


def format_duration(ms: int) -> str:
    """OpenAI's style for x-ratelimit-reset-*: 20ms, 1s, 6m0s, 1h2m3s."""
    if ms < 1000:
        return f"{max(ms, 0)}ms"
    seconds = math.ceil(ms / 1000)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{seconds}s"
    if minutes:
        return f"{minutes}m{seconds}s"
    return f"{seconds}s"


def ratelimit_headers(plan: Plan, result: list[int]) -> list[Header]:
    """The tightest bucket of each kind speaks for it."""
    headers: list[Header] = []
    first = 3 + len(plan.budgets)  # the levels follow the verdict, the refusal, the wait and the holds
    for (limit_name, remaining_name, reset_name), members in plan.header_rows:
        tightest: tuple[bytes, int, int] | None = None
        for i, limit in members:
            level = result[first + 2 * i]
            if tightest is None or level < tightest[1]:
                tightest = (limit, level, result[first + 1 + 2 * i])
        if tightest is not None:
            limit, level, reset_ms = tightest
            headers += [
                (limit_name, limit),
                (remaining_name, str(max(level, 0)).encode()),
                (reset_name, format_duration(reset_ms).encode()),
            ]
    return headers


def refusal(plan: Plan, result: list[int]) -> InsufficientQuota | RateLimited:
    """The error for an admission the script refused: its verdict, the limit that refused, and the wait."""
    verdict, worst, wait_ms = result[0], result[1], result[2]
    if verdict == -1:
        budget = plan.budgets[worst - 1]
        message = budget.kind.spent_message(budget.scope, plan.top_up)
        return InsufficientQuota(message, headers=((b"x-should-retry", b"false"),))
    if verdict == -2:
        budget = plan.budgets[worst - 1]
        return RateLimited(
            budget.kind.held_message(budget.scope, format_duration(HELD_WAIT_MS)),
            headers=HELD_HEADERS,
            scope=budget.scope,
            limit=budget.kind.limit_label,
        )
    bucket = plan.buckets[worst - 1]
    headers = [
        (b"retry-after", str(max(1, math.ceil(wait_ms / 1000))).encode()),
        (b"retry-after-ms", str(wait_ms).encode()),
        *ratelimit_headers(plan, result),
    ]
    return RateLimited(
        f"Rate limit reached: the {bucket.describe()} is used up. Retry in {format_duration(wait_ms)}.",
        headers=headers,
        scope=bucket.scope,
        limit=bucket.kind.limit_label,
    )
