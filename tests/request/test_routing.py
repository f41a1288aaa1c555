from __future__ import annotations

import difflib
import random
from typing import Any

import pytest

from proxy.config.settings import KeySettings, ModelPatterns, ProviderSettings, parse_settings
from proxy.http.errors import ModelNotAllowed, ModelNotFound, NotFound
from proxy.request.providers import Route, Router

RAW: dict[str, Any] = {
    "providers": [
        {"name": "deepseek", "base_url": "https://api.deepseek.com/v1", "models": ["deepseek-chat", "deepseek-*"]},
        {"name": "openai", "base_url": "https://api.openai.com/v1", "models": ["gpt-4o", "o1-*"]},
        {
            "name": "backup",
            "base_url": "http://10.0.0.5:8000/v1",
            "models": ["deepseek-chat", "gpt-4o"],
            "priority": 10,
        },
        {"name": "local", "base_url": "http://127.0.0.1:8001/v1", "models": ["deepseek-chat"], "priority": -1},
    ],
    "aliases": {"gpt-4o-mini": "deepseek-chat", "smart": "gpt-4o", "ghost": "no-such-model"},
}

ANY_MODEL = KeySettings(name="any", sha256="0" * 64)


def make_router(raw: dict[str, Any] = RAW, seed: int = 1) -> Router:
    return Router(parse_settings(raw, env={}), rng=random.Random(seed))


def limited(*models: str) -> KeySettings:
    return KeySettings(name="limited", sha256="1" * 64, models=ModelPatterns.parse(models))


def names(providers: tuple[ProviderSettings, ...] | list[ProviderSettings]) -> list[str]:
    return [p.name for p in providers]


@pytest.mark.parametrize(
    ("model", "upstream", "providers"),
    [
        ("deepseek-chat", "deepseek-chat", ["local", "deepseek", "backup"]),
        ("gpt-4o-mini", "deepseek-chat", ["local", "deepseek", "backup"]),
        ("smart", "gpt-4o", ["openai", "backup"]),
        ("gpt-4o", "gpt-4o", ["openai", "backup"]),
        ("deepseek-reasoner", "deepseek-reasoner", ["deepseek"]),
        ("deepseek-", "deepseek-", ["deepseek"]),
        ("o1-mini", "o1-mini", ["openai"]),
        ("o1-preview-2024-09-12", "o1-preview-2024-09-12", ["openai"]),
    ],
)
def test_route_aliases_exact_names_globs_and_priority(model: str, upstream: str, providers: list[str]) -> None:
    route = make_router().route(model, ANY_MODEL)
    assert (route.model, route.upstream_model, names(route.providers)) == (model, upstream, providers)
    assert [p.priority for p in route.providers] == sorted(p.priority for p in route.providers)


def test_route_is_the_same_on_a_second_lookup() -> None:
    router = make_router()
    first = router.route("gpt-4o-mini", ANY_MODEL)
    assert router.route("gpt-4o-mini", ANY_MODEL) == first
    assert router.route("deepseek-chat", ANY_MODEL).providers == first.providers


@pytest.mark.parametrize("model", ["my-deepseek-chat", "gpt-4o-2024", "o1", "GPT-4O", "gpt-4o ", "xo1-mini"])
def test_globs_and_exact_names_match_the_whole_name(model: str) -> None:
    with pytest.raises(ModelNotFound):
        make_router().route(model, ANY_MODEL)


def test_unknown_model_suggests_close_names() -> None:
    with pytest.raises(ModelNotFound) as info:
        make_router().route("gpt4o-mini", ANY_MODEL)
    exc = info.value
    assert exc.message == (
        "The model 'gpt4o-mini' does not exist on this gateway. Did you mean 'gpt-4o-mini' or 'gpt-4o'?"
    )
    assert (exc.status, exc.code, exc.param) == (404, "model_not_found", "model")


def test_unknown_model_suggests_an_alias() -> None:
    with pytest.raises(ModelNotFound) as info:
        make_router().route("smrt", ANY_MODEL)
    assert info.value.message == "The model 'smrt' does not exist on this gateway. Did you mean 'smart'?"


def test_unknown_model_without_close_names_has_no_hint() -> None:
    with pytest.raises(ModelNotFound) as info:
        make_router().route("zzzz", ANY_MODEL)
    assert info.value.message == "The model 'zzzz' does not exist on this gateway."


def test_a_huge_unknown_name_is_cut_in_the_message_and_not_compared(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[str] = []
    real = difflib.get_close_matches

    def spy(word: str, *args: Any) -> list[str]:
        compared.append(word)
        return real(word, *args)

    monkeypatch.setattr(difflib, "get_close_matches", spy)
    huge = "gpt-4o-mini" + "x" * 900_000
    with pytest.raises(ModelNotFound) as info:
        make_router().route(huge, ANY_MODEL)
    assert info.value.message == f"The model '{huge[:255]}…' does not exist on this gateway."
    assert compared == []
    # A name of the longest length echoed whole is still compared.
    with pytest.raises(ModelNotFound):
        make_router().route("gpt-4o-mini" + "x" * 245, ANY_MODEL)
    assert len(compared) == 1


def test_huge_names_are_cut_in_every_routing_message() -> None:
    huge = "deepseek-" + "y" * 900_000
    with pytest.raises(ModelNotAllowed) as not_allowed:
        make_router().route(huge, limited("gpt-4o"))
    assert not_allowed.value.message == f"This API key may not use the model '{huge[:255]}…'."
    with pytest.raises(ModelNotFound) as not_served:
        make_router().route(huge, ANY_MODEL, pinned="openai")
    assert (
        not_served.value.message == f"The provider 'openai' (X-AI-Provider) does not serve the model '{huge[:255]}…'."
    )
    with pytest.raises(NotFound) as unknown:
        make_router().pinned("p" * 100_000)
    assert unknown.value.message.startswith(f"Unknown provider '{'p' * 255}…' in X-AI-Provider.")


def test_huge_names_are_served_but_not_cached() -> None:
    router = make_router()
    huge = "deepseek-" + "z" * 900_000
    assert names(router.route(huge, ANY_MODEL).providers) == ["deepseek"]
    assert names(router.route(huge, ANY_MODEL).providers) == ["deepseek"]
    long_but_kept = "deepseek-" + "z" * 247
    router.route(long_but_kept, ANY_MODEL)
    assert huge not in router._cache
    assert long_but_kept in router._cache


def test_alias_to_an_unserved_model_does_not_suggest_itself() -> None:
    # Regression: every alias used to be a suggestion, so this 404 said "Did you mean 'ghost'?".
    with pytest.raises(ModelNotFound) as info:
        make_router().route("ghost", ANY_MODEL)
    assert info.value.message == "The model 'ghost' does not exist on this gateway."


def test_aliases_to_unserved_models_are_not_suggested() -> None:
    with pytest.raises(ModelNotFound) as info:
        make_router().route("ghots", ANY_MODEL)
    assert info.value.message == "The model 'ghots' does not exist on this gateway."


def test_pinned_provider() -> None:
    route = make_router().route("gpt-4o-mini", ANY_MODEL, pinned="backup")
    assert route == Route("gpt-4o-mini", "deepseek-chat", route.providers)
    assert names(route.providers) == ["backup"]


def test_pinned_provider_serving_by_glob() -> None:
    route = make_router().route("deepseek-coder", ANY_MODEL, pinned="deepseek")
    assert names(route.providers) == ["deepseek"]


def test_pinned_unknown_provider_is_not_found() -> None:
    with pytest.raises(NotFound) as info:
        make_router().route("deepseek-chat", ANY_MODEL, pinned="anthropic")
    exc = info.value
    assert type(exc) is NotFound
    assert exc.message == (
        "Unknown provider 'anthropic' in X-AI-Provider. Configured providers: backup, deepseek, local, openai."
    )
    assert (exc.status, exc.code) == (404, "not_found")


def test_pinned_provider_that_does_not_serve_the_model() -> None:
    with pytest.raises(ModelNotFound) as info:
        make_router().route("gpt-4o-mini", ANY_MODEL, pinned="openai")
    exc = info.value
    assert exc.message == "The provider 'openai' (X-AI-Provider) does not serve the model 'gpt-4o-mini'."
    assert (exc.status, exc.code, exc.param) == (404, "model_not_found", "model")


def test_pinned_provider_with_an_unknown_model() -> None:
    with pytest.raises(ModelNotFound) as info:
        make_router().route("zzzz", ANY_MODEL, pinned="openai")
    assert info.value.message == "The provider 'openai' (X-AI-Provider) does not serve the model 'zzzz'."


def test_pinned_lookup_by_name() -> None:
    router = make_router()
    assert router.pinned("local").base_url == "http://127.0.0.1:8001/v1"
    with pytest.raises(NotFound):
        router.pinned("LOCAL")


@pytest.mark.parametrize(
    ("allowed", "model"),
    [
        (("gpt-4o-mini",), "gpt-4o-mini"),  # the client's name
        (("deepseek-chat",), "gpt-4o-mini"),  # the alias target
        (("deepseek-chat",), "deepseek-chat"),
        (("deepseek-*",), "deepseek-reasoner"),
        (("gpt-*",), "smart"),  # alias whose target matches the glob
    ],
)
def test_key_models_allow_the_client_name_or_the_alias_target(allowed: tuple[str, ...], model: str) -> None:
    assert make_router().route(model, limited(*allowed)).model == model


@pytest.mark.parametrize(
    ("allowed", "model"),
    [
        (("gpt-4o-mini",), "deepseek-chat"),
        (("gpt-4o-mini",), "gpt-4o"),
        (("deepseek-*",), "gpt-4o"),
        (("smart",), "gpt-4o"),
        ((), "deepseek-chat"),
    ],
)
def test_key_models_refuse_other_models(allowed: tuple[str, ...], model: str) -> None:
    with pytest.raises(ModelNotAllowed) as info:
        make_router().route(model, limited(*allowed))
    exc = info.value
    assert exc.message == f"This API key may not use the model '{model}'."
    assert (exc.status, exc.code, exc.param) == (403, "model_not_allowed", "model")


def test_attempt_order_single_provider() -> None:
    router = make_router()
    route = router.route("o1-mini", ANY_MODEL)
    assert names(router.attempt_order(route.providers)) == ["openai"]


def test_attempt_order_keeps_distinct_priorities_in_order() -> None:
    router = make_router()
    route = router.route("deepseek-chat", ANY_MODEL)
    for _ in range(200):
        assert names(router.attempt_order(route.providers)) == ["local", "deepseek", "backup"]


WEIGHTED: dict[str, Any] = {
    "providers": [
        {"name": "light", "base_url": "http://light/v1", "models": ["m"], "weight": 1},
        {"name": "spare", "base_url": "http://spare/v1", "models": ["m"], "priority": 1, "weight": 100},
        {"name": "heavy", "base_url": "http://heavy/v1", "models": ["m"], "weight": 3},
        {"name": "first", "base_url": "http://first/v1", "models": ["m"], "priority": -5},
    ]
}


def test_attempt_order_weighted_shuffle_within_a_priority() -> None:
    router = make_router(WEIGHTED, seed=20240501)
    providers = router.route("m", ANY_MODEL).providers
    assert sorted(names(providers[1:3])) == ["heavy", "light"]
    heavy_first = 0
    draws = 4000
    for _ in range(draws):
        order = names(router.attempt_order(providers))
        assert order[0] == "first"
        assert sorted(order[1:3]) == ["heavy", "light"]
        assert order[3] == "spare"
        heavy_first += order[1] == "heavy"
    assert 0.70 <= heavy_first / draws <= 0.80


def test_attempt_order_equal_weights_share_evenly() -> None:
    raw = {
        "providers": [
            {"name": "a", "base_url": "http://a/v1", "models": ["m"]},
            {"name": "b", "base_url": "http://b/v1", "models": ["m"]},
        ]
    }
    router = make_router(raw, seed=7)
    providers = router.route("m", ANY_MODEL).providers
    a_first = sum(router.attempt_order(providers)[0].name == "a" for _ in range(4000))
    assert 0.45 <= a_first / 4000 <= 0.55


def test_attempt_order_is_reproducible_with_a_seeded_rng() -> None:
    first, second = make_router(WEIGHTED, seed=3), make_router(WEIGHTED, seed=3)
    providers = first.route("m", ANY_MODEL).providers
    assert [names(first.attempt_order(providers)) for _ in range(50)] == [
        names(second.attempt_order(providers)) for _ in range(50)
    ]


def test_models_for_a_key_without_a_model_list() -> None:
    # Aliases and exact names only (globs cannot be listed); an alias to an unserved model is left out;
    # owned_by is the first provider by priority.
    assert make_router().models_for(ANY_MODEL) == [
        ("deepseek-chat", "local"),
        ("gpt-4o", "openai"),
        ("gpt-4o-mini", "local"),
        ("smart", "openai"),
    ]


@pytest.mark.parametrize(
    ("allowed", "listed"),
    [
        (("gpt-4o-mini",), [("gpt-4o-mini", "local")]),
        (("deepseek-chat",), [("deepseek-chat", "local"), ("gpt-4o-mini", "local")]),
        (("gpt-*",), [("gpt-4o", "openai"), ("gpt-4o-mini", "local"), ("smart", "openai")]),
        (("smart",), [("smart", "openai")]),
        # The key's own exact name, served by a glob (issue 10: it was left out, so pickers showed nothing).
        (("deepseek-reasoner",), [("deepseek-reasoner", "deepseek")]),
        (("no-such-model",), []),
        ((), []),
    ],
)
def test_models_for_a_key_with_a_model_list(allowed: tuple[str, ...], listed: list[tuple[str, str]]) -> None:
    assert make_router().models_for(limited(*allowed)) == listed
