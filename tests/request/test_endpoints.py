"""What a request holds of a budget, from its route and body."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.request.endpoints import hold_wanted
from proxy.request.prompts import prompt_bound

RESERVE = 1024


@pytest.mark.parametrize(
    ("route", "payload", "completion"),
    [
        ("/chat/completions", {}, RESERVE),
        ("/chat/completions", {"max_tokens": 50}, 50),
        ("/chat/completions", {"max_completion_tokens": 30}, 30),
        # The newer field wins where a provider reads both.
        ("/chat/completions", {"max_completion_tokens": 30, "max_tokens": 50}, 30),
        ("/chat/completions", {"max_completion_tokens": None, "max_tokens": 50}, 50),
        ("/completions", {"max_tokens": 7}, 7),
        # Only chat has max_completion_tokens.
        ("/completions", {"max_completion_tokens": 7}, RESERVE),
        # Not a positive whole number: the reserve stands in.
        ("/chat/completions", {"max_tokens": 0}, RESERVE),
        ("/chat/completions", {"max_tokens": -5}, RESERVE),
        ("/chat/completions", {"max_tokens": "50"}, RESERVE),
        ("/chat/completions", {"max_tokens": 50.0}, RESERVE),
        ("/chat/completions", {"max_tokens": True}, RESERVE),
        # n answers at once, each up to the cap; completions generate best_of of them.
        ("/chat/completions", {"max_tokens": 50, "n": 4}, 200),
        ("/chat/completions", {"n": 2}, 2 * RESERVE),
        ("/chat/completions", {"max_tokens": 50, "n": True}, 50),
        ("/completions", {"max_tokens": 10, "n": 2, "best_of": 5}, 50),
        ("/embeddings", {"max_tokens": 50}, 0),
        ("/embeddings", {}, 0),
    ],
)
def test_hold_is_the_prompt_bound_plus_the_completion_cap(route: str, payload: dict[str, Any], completion: int) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hello"}], **payload}
    assert hold_wanted(route, body, RESERVE) == (prompt_bound(body), completion)


@pytest.mark.parametrize(
    "text",
    [
        "hi",
        "a " * 500,  # the reported case: 500 one-letter words held as 267 tokens, charged as 500
        "中文的提示" * 200,  # CJK: 3 bytes a character, one token a character or two
        "👍🏽🎉" * 300,  # emoji: 4 bytes a code point, up to a token a byte
        "def f(x):\n    return {'k': [x, x]}\n" * 50,  # code: many tokens of one or two bytes
    ],
)
def test_the_prompt_bound_is_at_least_one_token_a_byte_of_text(text: str) -> None:
    """No tokenizer makes more tokens of a text than it has UTF-8 bytes: the bound covers any provider's count."""
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]
    bound = prompt_bound({"model": "m", "messages": messages})
    assert bound >= sum(len(m["content"].encode()) for m in messages) + 2 * 4
    # ...and it is not wildly more: the JSON around the text adds little.
    assert bound <= len(text.encode()) + 200


def test_the_prompt_bound_counts_every_text_of_the_body() -> None:
    tool = {
        "type": "function",
        "function": {"name": "weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
    }
    parts = [{"type": "text", "text": "x" * 100}, {"type": "text", "text": "ü" * 50}]
    plain = prompt_bound({"messages": [{"role": "user", "content": "hi"}]})
    assert prompt_bound({"messages": [{"role": "user", "content": "hi"}], "tools": [tool]}) > plain + len("weathercity")
    assert prompt_bound({"messages": [{"role": "user", "content": parts}]}) >= 100 + 100
    # The Responses API and embeddings: input, instructions.
    assert prompt_bound({"input": "y" * 300, "instructions": "z" * 40}) >= 340
    assert prompt_bound({"input": ["a" * 10, "b" * 10]}) >= 20
