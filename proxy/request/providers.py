"""Model -> provider choice: aliases, globs, X-AI-Provider, priority then weight."""

from __future__ import annotations

import difflib
import itertools
import random
from collections.abc import Iterable
from dataclasses import dataclass

from ..config.settings import KeySettings, ProviderSettings, Settings
from ..http.errors import ModelNotAllowed, ModelNotFound, NotFound
from ..redact import CLIENT_TEXT_LIMIT, clip

CACHE_LIMIT = 4096


@dataclass(frozen=True, slots=True)
class Route:
    model: str  # as the client named it
    upstream_model: str  # after aliases
    providers: tuple[ProviderSettings, ...]  # every provider serving it, by priority


class Router:
    """Built once per Settings; lookups are cached per model name."""

    def __init__(self, settings: Settings, rng: random.Random | None = None) -> None:
        self.settings = settings
        self.by_name = {p.name: p for p in settings.providers}
        self._rng = rng or random.Random()
        self._cache: dict[str, tuple[ProviderSettings, ...]] = {}
        exact = {m for p in settings.providers for m in p.patterns.exact}
        served_aliases = {a for a, target in settings.aliases.items() if self._serving(target)}
        self.known_models = sorted(exact | served_aliases)

    def _serving(self, upstream_model: str) -> tuple[ProviderSettings, ...]:
        found = self._cache.get(upstream_model)
        if found is None:
            found = tuple(
                sorted(
                    (p for p in self.settings.providers if p.patterns.matches(upstream_model)),
                    key=lambda p: p.priority,
                )
            )
            # A client may send any name: a few thousand of a megabyte each must not stay in memory.
            if len(self._cache) < CACHE_LIMIT and len(upstream_model) <= CLIENT_TEXT_LIMIT:
                self._cache[upstream_model] = found
        return found

    def route(self, model: str, key: KeySettings, pinned: str | None = None) -> Route:
        upstream_model = self.settings.aliases.get(model, model)
        if key.models is not None and not (key.models.matches(model) or key.models.matches(upstream_model)):
            raise ModelNotAllowed(f"This API key may not use the model '{clip(model)}'.", param="model")
        serving = self._serving(upstream_model)
        if pinned is not None:
            provider = self.pinned(pinned)
            if provider not in serving:
                raise ModelNotFound(
                    f"The provider '{clip(pinned)}' (X-AI-Provider) does not serve the model '{clip(model)}'.",
                    param="model",
                )
            serving = (provider,)
        if not serving:
            raise ModelNotFound(self._not_found_message(model), param="model")
        return Route(model, upstream_model, serving)

    def pinned(self, name: str) -> ProviderSettings:
        provider = self.by_name.get(name)
        if provider is None:
            names = ", ".join(sorted(self.by_name))
            raise NotFound(f"Unknown provider '{clip(name)}' in X-AI-Provider. Configured providers: {names}.")
        return provider

    def _not_found_message(self, model: str) -> str:
        # difflib's cost grows with the name; no configured name is close to one this long anyway.
        close = [] if len(model) > CLIENT_TEXT_LIMIT else difflib.get_close_matches(model, self.known_models, 3, 0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        return f"The model '{clip(model)}' does not exist on this gateway.{hint}"

    def attempt_order(self, providers: tuple[ProviderSettings, ...]) -> list[ProviderSettings]:
        """Priority groups in order; inside a group a weighted shuffle."""
        if len(providers) == 1:
            return [providers[0]]
        order: list[ProviderSettings] = []
        start = 0
        while start < len(providers):
            end = start
            while end < len(providers) and providers[end].priority == providers[start].priority:
                end += 1
            order.extend(self._weighted_shuffle(list(providers[start:end])))
            start = end
        return order

    def _weighted_shuffle(self, group: list[ProviderSettings]) -> list[ProviderSettings]:
        # Efraimidis-Spirakis: sort by u ** (1 / weight), one random draw each.
        return sorted(group, key=lambda p: self._rng.random() ** (1.0 / p.weight), reverse=True)

    def models_for(self, key: KeySettings, fetched: Iterable[str] = ()) -> list[tuple[str, str]]:
        """(model id, owned_by) pairs this key may use, for GET /models, each once.

        The configured exact names and aliases, then the key's own exact names that a
        provider's glob serves, then `fetched`: names glob-only providers list themselves.
        """
        own = sorted(key.models.exact) if key.models is not None else []
        listed: dict[str, str] = {}
        for model in itertools.chain(self.known_models, own, fetched):
            if model not in listed:
                owner = self._owner(model, key)
                if owner is not None:
                    listed[model] = owner
        return list(listed.items())

    def _owner(self, model: str, key: KeySettings) -> str | None:
        """The provider a request for `model` goes to first, if this key may use it and one serves it."""
        upstream = self.settings.aliases.get(model, model)
        if key.models is not None and not (key.models.matches(model) or key.models.matches(upstream)):
            return None
        serving = self._serving(upstream)
        return serving[0].name if serving else None
