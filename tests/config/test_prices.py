"""[[prices]]: the table read from the config, the lookup by model name, the cost of a usage."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.config.prices import CACHE_LIMIT, Price, Prices
from proxy.config.settings import ConfigError, parse_settings
from proxy.request.usage import Usage

PROVIDER = {"name": "mock", "base_url": "http://127.0.0.1:8001/v1", "models": ["mock-*"]}


def prices_of(*entries: dict[str, Any]) -> Prices:
    return parse_settings({"providers": [PROVIDER], "prices": list(entries)}, env={}).prices


def problems_of(*entries: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_settings({"providers": [PROVIDER], "prices": list(entries)}, env={})
    return info.value.problems


def test_no_prices_means_no_price_and_no_currency() -> None:
    prices = parse_settings({"providers": [PROVIDER]}, env={}).prices
    assert not prices
    assert (prices.lookup("mock-chat"), prices.currency) == (None, None)


def test_an_entry_from_the_config() -> None:
    prices = prices_of(
        {"model": "deepseek-*", "input": 0.27, "output": 1.10, "cached_input": 0.07, "currency": "USD"},
        {"model": "gpt-4o", "input": 2.5, "output": 10},
    )
    assert prices.currency == "USD"
    assert prices.lookup("deepseek-chat") == Price("deepseek-*", 0.27, 1.10, 0.07)
    # Prices may be written as whole numbers; no cached_input means the input price for cached tokens.
    assert prices.lookup("gpt-4o") == Price("gpt-4o", 2.5, 10.0, None)
    assert prices.lookup("gpt-4o-mini") is None


def test_the_currency_is_usd_unless_an_entry_names_one() -> None:
    assert prices_of({"model": "m", "input": 1, "output": 2}).currency == "USD"
    two = prices_of({"model": "m", "input": 1, "output": 2}, {"model": "n", "input": 1, "output": 2, "currency": "CNY"})
    assert two.currency == "CNY"


def test_an_exact_name_wins_over_globs_and_the_first_glob_in_file_order_wins() -> None:
    prices = Prices(
        [Price("mock-*", 1, 1), Price("mock-c*", 2, 2), Price("mock-chat", 3, 3), Price("mock-chat-?", 4, 4)], "USD"
    )
    assert prices.lookup("mock-chat").input == 3  # type: ignore[union-attr]
    assert prices.lookup("mock-code").input == 1  # type: ignore[union-attr]
    assert prices.lookup("mock-chat-2").input == 1  # type: ignore[union-attr]
    assert prices.lookup("other") is None
    assert Prices([Price("mock-c*", 2, 2), Price("mock-*", 1, 1)]).lookup("mock-code").input == 2  # type: ignore[union-attr]


def test_a_request_is_priced_by_its_upstream_model_then_by_the_name_it_used() -> None:
    prices = Prices([Price("deepseek-chat", 1, 1), Price("fast", 2, 2)], "USD")
    assert prices.for_request("deepseek-chat", "chat").input == 1  # type: ignore[union-attr]
    assert prices.for_request("qwen-turbo", "fast").input == 2  # type: ignore[union-attr]
    assert prices.for_request("qwen-turbo", "qwen-turbo") is None


def test_glob_lookups_are_cached_but_bounded() -> None:
    prices = Prices([Price("mock-*", 1, 1)], "USD")
    for i in range(CACHE_LIMIT + 10):
        assert prices.lookup(f"mock-{i}") is not None
    assert prices.lookup("mock-" + "x" * 10_000) is not None
    assert len(prices._cache) == CACHE_LIMIT


def test_cost_is_per_million_tokens() -> None:
    price = Price("m", input=0.27, output=1.10)
    assert price.cost(1_000_000, 0) == 0.27
    assert price.cost(0, 1_000_000) == 1.1
    assert price.cost(12, 8) == pytest.approx((12 * 0.27 + 8 * 1.10) / 1e6, abs=1e-15)
    assert price.cost(12, 8) == 1.204e-05  # rounded: no float noise in records
    assert price.cost(0, 0) == 0


def test_cached_prompt_tokens_use_the_cached_price_when_there_is_one() -> None:
    price = Price("m", input=2.0, output=8.0, cached_input=0.5)
    assert price.cost(1000, 100, cached_tokens=400) == (600 * 2.0 + 400 * 0.5 + 100 * 8.0) / 1e6
    assert Price("m", 2.0, 8.0).cost(1000, 100, cached_tokens=400) == (1000 * 2.0 + 100 * 8.0) / 1e6
    # A provider's cached count above its prompt count is not trusted further than the prompt.
    assert price.cost(10, 0, cached_tokens=50) == 10 * 0.5 / 1e6


def test_every_problem_names_its_key() -> None:
    assert problems_of(
        {"model": "a", "input": 1, "output": 2, "currency": "USD"},
        {"model": "b", "input": -1, "output": "cheap", "currency": "EUR"},
        {"model": "a", "output": 2, "cached_input": -0.1, "cents": 3},
        {"input": 1, "output": 1, "currency": "dollars"},
        "gpt-4o",
    ) == [
        "prices[1].currency: 'EUR', but prices[0] is in 'USD': one currency per deployment",
        "prices[1].input: must be >= 0.0, got -1",
        "prices[1].output: expected a number, got 'cheap'",
        "prices[2].cents: unknown key",
        "prices[2].model: 'a' is priced already by prices[0]",
        "prices[2].input: required (the price per million input tokens)",
        "prices[2].cached_input: must be >= 0.0, got -0.1",
        "prices[3].model: expected a model name or glob",
        "prices[3].currency: expected a three-letter code such as USD, got 'dollars'",
        "prices[4]: expected a table",
    ]
    assert parse_problems({"prices": {"model": "a"}}) == ["prices: expected an array of tables ([[prices]])"]


def parse_problems(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_settings({"providers": [PROVIDER], **raw}, env={})
    return info.value.problems


def test_cached_tokens_are_read_from_the_usage_when_reported() -> None:
    details = {"prompt_tokens": 10, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 4}}
    assert Usage.from_json(details) == Usage(10, 2, 12, cached_tokens=4)
    assert Usage.from_json({"prompt_tokens": 10, "completion_tokens": 2}) == Usage(10, 2, 12, cached_tokens=0)
    assert Usage.from_json({"prompt_tokens": 10, "prompt_tokens_details": None}) == Usage(10, 0, 10)
