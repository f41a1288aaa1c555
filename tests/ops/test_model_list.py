"""GET /models in-process: which names a key is shown, and how a provider's own list is read."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from proxy.config.settings import KeySettings, ModelPatterns, parse_settings
from proxy.ops.model_list import FetchFailed, glob_only, parse_models
from proxy.request.providers import Router

RAW: dict[str, Any] = {
    "providers": [
        {"name": "exact", "base_url": "http://127.0.0.1:9/v1", "models": ["beta-chat"]},
        {"name": "globby", "base_url": "http://127.0.0.1:9/v1", "models": ["mock-*"]},
        {"name": "down", "base_url": "http://127.0.0.1:9/v1", "models": ["dead-*"], "priority": -1},
        {"name": "both", "base_url": "http://127.0.0.1:9/v1", "models": ["mock-chat", "both-*"], "priority": 5},
    ],
    "aliases": {"chat": "mock-chat", "nowhere": "unserved-model"},
}
SETTINGS = parse_settings(RAW, env={})
PROVIDERS = {p.name: p for p in SETTINGS.providers}


def key(*models: str) -> KeySettings:
    return KeySettings("k", "0" * 64, models=ModelPatterns.parse(models) if models else None)


@pytest.mark.parametrize(
    ("models", "fetched", "listed"),
    [
        # Configured exact names and served aliases, as before.
        ((), [], [("beta-chat", "exact"), ("chat", "globby"), ("mock-chat", "globby")]),
        # Then fetched names, once each, and only those a provider serves.
        (
            (),
            ["mock-large", "mock-chat", "unserved-x", "mock-large"],
            [("beta-chat", "exact"), ("chat", "globby"), ("mock-chat", "globby"), ("mock-large", "globby")],
        ),
        # The key's own exact names that a glob serves; not those nobody serves.
        (("mock-other", "dead-x", "nowhere-y"), [], [("dead-x", "down"), ("mock-other", "globby")]),
        # An alias is listed for a key that names its target, as a request for it is allowed.
        (("mock-chat",), [], [("chat", "globby"), ("mock-chat", "globby")]),
        # A key's glob filters the fetched names.
        (
            ("mock-l*",),
            ["mock-chat", "mock-large", "mock-little"],
            [("mock-large", "globby"), ("mock-little", "globby")],
        ),
    ],
    ids=["configured", "fetched", "own-exact", "alias-of-own", "own-glob"],
)
def test_models_for(models: tuple[str, ...], fetched: list[str], listed: list[tuple[str, str]]) -> None:
    assert Router(SETTINGS).models_for(key(*models), fetched) == listed


def test_glob_only() -> None:
    assert [p.name for p in SETTINGS.providers if glob_only(p)] == ["globby", "down"]


def answer(*ids: Any, **extra: Any) -> bytes:
    return orjson.dumps({"object": "list", "data": [{"id": i, "object": "model"} for i in ids], **extra})


def test_parse_keeps_the_providers_order_and_globs() -> None:
    body = answer("mock-b", "other", "mock-a", "mock-b", 7, None, "mock-" + "x" * 300)
    assert parse_models(body, PROVIDERS["globby"]) == ("mock-b", "mock-a")


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"<html>", "the answer is not JSON"),
        (b'{"object": "list"}', "the answer has no 'data' list"),
        (b"[]", "the answer has no 'data' list"),
        (b'{"data": {"id": "mock-a"}}', "the answer has no 'data' list"),
    ],
)
def test_parse_refuses_what_is_not_a_model_list(body: bytes, reason: str) -> None:
    with pytest.raises(FetchFailed, match=f"^{reason}$"):
        parse_models(body, PROVIDERS["globby"])
