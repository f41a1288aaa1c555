"""[[prices]]: what a model's tokens cost, per million, in the deployment's one currency, and what an
answered request costs where its answer reports no usage (`per_request`).

Compiled once per config (settings.py): exact names in a dict, globs in file
order. A request looks its model up once, and its cost is worked out once from
its usage, never per chunk. A leaf: it imports nothing of ours.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import translate

PER_MILLION = 1_000_000
COST_DIGITS = 10  # a cost is rounded to 1e-10 of the currency: far below a cent, above float noise
MICRO_DIGITS = 6  # float noise below 1e-12 of the currency is dropped before rounding up to a micro-unit
CACHE_LIMIT = 4096  # model names remembered; a glob provider lets clients send any name
CACHED_NAME_LIMIT = 256  # longer names are looked up each time, never kept


def is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


@dataclass(frozen=True, slots=True)
class Price:
    model: str  # as written in the config: an exact name or a glob
    input: float  # per million prompt tokens
    output: float  # per million completion tokens
    cached_input: float | None = None  # per million prompt tokens the provider served from its cache
    per_request: float | None = None  # an answered request that reports no usage (speech, images) costs this
    by_tokens: bool = True  # input and output were given; a per_request-only price counts no tokens

    def cost(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> float:
        """The cost of one answer's usage. Cached tokens are part of the prompt tokens, as OpenAI counts them."""
        return round(self._per_million(prompt_tokens, completion_tokens, cached_tokens) / PER_MILLION, COST_DIGITS)

    def micros(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> int:
        """The same cost in micro-units of the currency, as Redis counts spend: rounded up, so a budget
        is never undercounted (a price per million tokens times tokens is micro-units already)."""
        return math.ceil(round(self._per_million(prompt_tokens, completion_tokens, cached_tokens), MICRO_DIGITS))

    def hold_micros(self, prompt_tokens: int, completion_tokens: int) -> int:
        """The most one request may cost: its tokens at this price, or the price per request if larger."""
        by_tokens = self.micros(prompt_tokens, completion_tokens) if self.by_tokens else 0
        return max(by_tokens, self.request_micros())

    def request_micros(self) -> int:
        """per_request in micro-units, rounded up as micros() rounds."""
        return math.ceil(round((self.per_request or 0.0) * PER_MILLION, MICRO_DIGITS))

    def _per_million(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> float:
        cached = min(max(cached_tokens, 0), prompt_tokens)
        cached_rate = self.input if self.cached_input is None else self.cached_input
        return (prompt_tokens - cached) * self.input + cached * cached_rate + completion_tokens * self.output


class Prices:
    """The price table: an exact name wins over any glob; among globs, the first in file order."""

    __slots__ = ("_cache", "currency", "exact", "globs", "prices")

    def __init__(self, prices: Iterable[Price] = (), currency: str | None = None) -> None:
        self.prices = tuple(prices)
        self.currency = currency  # None without any [[prices]]
        self.exact = {p.model: p for p in self.prices if not is_glob(p.model)}
        self.globs = tuple((re.compile(translate(p.model)), p) for p in self.prices if is_glob(p.model))
        self._cache: dict[str, Price | None] = {}

    def __bool__(self) -> bool:
        return bool(self.prices)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Prices) and (self.prices, self.currency) == (other.prices, other.currency)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Prices({list(self.prices)!r}, currency={self.currency!r})"

    def lookup(self, model: str) -> Price | None:
        price = self.exact.get(model)
        if price is not None or not self.globs:
            return price
        if model in self._cache:
            return self._cache[model]
        price = next((p for pattern, p in self.globs if pattern.match(model)), None)
        if len(self._cache) < CACHE_LIMIT and len(model) <= CACHED_NAME_LIMIT:
            self._cache[model] = price
        return price

    def for_request(self, upstream_model: str, model: str) -> Price | None:
        """The price of what the provider bills (the model after aliases), else of the name the client used."""
        price = self.lookup(upstream_model)
        if price is None and model != upstream_model:
            price = self.lookup(model)
        return price
