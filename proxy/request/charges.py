"""What one answer is charged, and where the numbers came from.

The provider's usage at the model's price when the answer reports it; the price per request for an
answered request without usage (speech, images) where the config sets one; otherwise the gateway's
estimate of a successful answer (a stream cut short, a provider that reports nothing). A request
the gateway refused itself, or one whose provider failed, is charged nothing.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

from ..config.prices import Price
from .usage import Usage

UsageSource = Literal["provider", "estimated", "none"]


class Charge(NamedTuple):  # a tuple: made for every answer, and a frozen dataclass costs thrice as much
    usage: Usage | None  # the tokens counted: token buckets, token budgets, the record
    source: UsageSource
    cost: float | None  # in the prices' currency; None for tokens of a model without a price
    micros: int  # the cost as the budgets count it


NOTHING = Charge(None, "none", 0.0, 0)


def charge_for(price: Price | None, status: int, usage: Usage | None, estimate: Usage | None) -> Charge:
    """status, usage, estimate: as the relay reports the answer that went to the client."""
    answered = 200 <= status < 300
    if usage is not None:
        if price is None:
            return Charge(usage, "provider", None, 0)
        if price.by_tokens:
            prompt, cached = usage.prompt_tokens, usage.cached_tokens
            # Tokens the total counts beyond its parts are not left out: they are charged as completion.
            completion = max(usage.completion_tokens, usage.total_tokens - prompt)
            return Charge(
                usage, "provider", price.cost(prompt, completion, cached), price.micros(prompt, completion, cached)
            )
        if answered:
            return Charge(usage, "provider", price.per_request, price.request_micros())
        return Charge(usage, "provider", 0.0, 0)
    if answered and price is not None and price.per_request is not None:
        return Charge(None, "none", price.per_request, price.request_micros())
    if estimate is not None:
        if price is None or not price.by_tokens:
            return Charge(estimate, "estimated", None if price is None else 0.0, 0)
        prompt, completion = estimate.prompt_tokens, estimate.completion_tokens
        return Charge(estimate, "estimated", price.cost(prompt, completion), price.micros(prompt, completion))
    return NOTHING
