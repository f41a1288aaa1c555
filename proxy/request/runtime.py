"""What one config becomes before any request: the router, the provider clients, each key's limits."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..config.settings import Settings
from ..limits.plan import KeyLimits
from .providers import Router
from .upstream import ProviderClient


@dataclass(frozen=True, slots=True, kw_only=True)
class Runtime:
    """Everything derived from one Settings, at start-up and each reload; a request keeps the one it started with."""

    settings: Settings
    router: Router
    clients: Mapping[str, ProviderClient]
    limits: Mapping[str, KeyLimits]  # by key sha256
    model_labels: frozenset[str]

    @classmethod
    def build(cls, settings: Settings) -> Runtime:
        """Built once per config, never per request."""
        router = Router(settings)
        return cls(
            settings=settings,
            router=router,
            clients={p.name: ProviderClient.build(p) for p in settings.providers},
            limits={
                k.sha256: KeyLimits.build(k, settings.groups[k.group], settings.limits) for k in settings.keys.values()
            },
            model_labels=frozenset(router.known_models),
        )
