"""What a request holds of a budget, from its route and body."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.endpoints import hold_wanted

RESERVE = 1024


@pytest.mark.parametrize(
    ("route", "payload", "expected"),
    [
        ("/chat/completions", {}, 100 + RESERVE),
        ("/chat/completions", {"max_tokens": 50}, 150),
        ("/chat/completions", {"max_completion_tokens": 30}, 130),
        # The newer field wins where a provider reads both.
        ("/chat/completions", {"max_completion_tokens": 30, "max_tokens": 50}, 130),
        ("/chat/completions", {"max_completion_tokens": None, "max_tokens": 50}, 150),
        ("/completions", {"max_tokens": 7}, 107),
        # Only chat has max_completion_tokens.
        ("/completions", {"max_completion_tokens": 7}, 100 + RESERVE),
        # Not a positive whole number: the reserve stands in.
        ("/chat/completions", {"max_tokens": 0}, 100 + RESERVE),
        ("/chat/completions", {"max_tokens": -5}, 100 + RESERVE),
        ("/chat/completions", {"max_tokens": "50"}, 100 + RESERVE),
        ("/chat/completions", {"max_tokens": 50.0}, 100 + RESERVE),
        ("/chat/completions", {"max_tokens": True}, 100 + RESERVE),
        ("/embeddings", {"max_tokens": 50}, 100),
        ("/embeddings", {}, 100),
    ],
)
def test_hold_is_the_prompt_estimate_plus_the_completion_cap(
    route: str, payload: dict[str, Any], expected: int
) -> None:
    assert sum(hold_wanted(route, payload, 400, RESERVE)) == expected


def test_a_tiny_body_still_holds_a_prompt_token() -> None:
    assert hold_wanted("/embeddings", {}, 3, RESERVE) == (1, 0)
    assert hold_wanted("/chat/completions", {}, 3, 0) == (1, 0)
