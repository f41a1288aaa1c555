"""What one answer is charged (charges.py), and the price table's per-request prices."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.config.prices import Price
from proxy.config.settings import ConfigError, parse_settings
from proxy.request.charges import NOTHING, Charge, charge_for
from proxy.request.usage import Usage

TOKENS = Price("m", input=2.0, output=10.0)  # micro-units per token: 2 in, 10 out
SPEECH = Price("tts-*", input=0.0, output=0.0, per_request=0.015, by_tokens=False)
BOTH = Price("img-*", input=2.0, output=10.0, per_request=0.04)
USAGE = Usage(100, 10, 110)
ESTIMATE = Usage(25, 3, 28)


@pytest.mark.parametrize(
    ("price", "status", "usage", "estimate", "expected"),
    [
        # The provider's usage at the price, whatever else is known.
        (TOKENS, 200, USAGE, None, Charge(USAGE, "provider", 0.0003, 300)),
        (BOTH, 200, USAGE, None, Charge(USAGE, "provider", 0.0003, 300)),
        (None, 200, USAGE, None, Charge(USAGE, "provider", None, 0)),
        # Tokens the total counts beyond its parts are charged as completion (here 40 more at 10 each).
        (TOKENS, 200, Usage(100, 10, 150), None, Charge(Usage(100, 10, 150), "provider", 0.0007, 700)),
        # Priced per request only: an answered request costs that, usage or not.
        (SPEECH, 200, USAGE, None, Charge(USAGE, "provider", 0.015, 15_000)),
        (SPEECH, 200, None, ESTIMATE, Charge(None, "none", 0.015, 15_000)),
        (BOTH, 201, None, ESTIMATE, Charge(None, "none", 0.04, 40_000)),
        # No usage, no price per request: the estimate, at the token price.
        (TOKENS, 200, None, ESTIMATE, Charge(ESTIMATE, "estimated", 0.00008, 80)),
        (None, 200, None, ESTIMATE, Charge(ESTIMATE, "estimated", None, 0)),
        # Not answered: nothing (a per-request price is for answered requests).
        (SPEECH, 500, None, None, NOTHING),
        (TOKENS, 400, None, None, NOTHING),
        (TOKENS, 200, None, None, NOTHING),
    ],
)
def test_charge_for(
    price: Price | None, status: int, usage: Usage | None, estimate: Usage | None, expected: Charge
) -> None:
    assert charge_for(price, status, usage, estimate) == expected


def test_the_most_a_request_may_cost_covers_its_price_per_request() -> None:
    assert TOKENS.hold_micros(100, 10) == 300
    assert SPEECH.hold_micros(100, 10) == 15_000
    assert BOTH.hold_micros(100, 10) == 40_000
    assert BOTH.hold_micros(10_000, 0) == 40_000
    assert BOTH.hold_micros(100_000, 0) == 200_000


PROVIDER = {"name": "mock", "base_url": "http://127.0.0.1:8001/v1", "models": ["mock-*"]}


def settings_of(**raw: Any) -> Any:
    return parse_settings({"providers": [PROVIDER], **raw}, env={})


def problems_of(**raw: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        settings_of(**raw)
    return info.value.problems


def test_a_price_per_request_alone_or_beside_token_prices() -> None:
    prices = settings_of(
        prices=[{"model": "tts-*", "per_request": 0.015}, {"model": "img", "input": 1, "output": 2, "per_request": 1}]
    ).prices
    assert prices.lookup("tts-1") == SPEECH
    assert prices.lookup("img") == Price("img", 1.0, 2.0, per_request=1.0)


def test_price_problems_name_the_key() -> None:
    assert problems_of(prices=[{"model": "a"}, {"model": "b", "per_request": -1}, {"model": "c", "input": 1}]) == [
        "prices[0].input: required (the price per million input tokens) "
        "(or only per_request, the price of an answered request)",
        "prices[0].output: required (the price per million output tokens) "
        "(or only per_request, the price of an answered request)",
        "prices[1].per_request: must be >= 0.0, got -1",
        "prices[1].input: required (the price per million input tokens) "
        "(or only per_request, the price of an answered request)",
        "prices[1].output: required (the price per million output tokens) "
        "(or only per_request, the price of an answered request)",
        "prices[2].output: required (the price per million output tokens)",
    ]


def test_unpriced_routes_is_refuse_unless_a_provider_allows_them() -> None:
    assert settings_of().providers[0].unpriced_routes == "refuse"
    allowing = settings_of(providers=[{**PROVIDER, "unpriced_routes": "allow"}])
    assert allowing.providers[0].unpriced_routes == "allow"
    assert problems_of(providers=[{**PROVIDER, "unpriced_routes": "sometimes"}]) == [
        "providers[0].unpriced_routes: expected one of refuse, allow, got 'sometimes'"
    ]
