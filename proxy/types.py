"""The types a request carries along its path: app -> endpoints -> relay.

A leaf, like starlette's types.py and hypercorn's typing.py: at run time it imports
nothing of ours, so every step of the path can import it and the arrows still run
one way. The classes named in annotations are imported for the type checker only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from starlette.types import Receive, Scope

    from .exchange import Exchange
    from .limits import KeyLimits, Limiter
    from .routing import Router
    from .settings import KeySettings, Settings
    from .upstream import ProviderClient, Sessions


@dataclass(frozen=True, slots=True, kw_only=True)
class Runtime:
    """Everything derived from one Settings (app.build_runtime); a request keeps the one it started with."""

    settings: Settings
    router: Router
    clients: Mapping[str, ProviderClient]
    limits: Mapping[str, KeyLimits]  # by key sha256
    model_labels: frozenset[str]


@dataclass(slots=True, kw_only=True)
class Call:
    """One authenticated request whose body has been read."""

    scope: Scope
    receive: Receive
    ex: Exchange
    runtime: Runtime
    key: KeySettings
    limits: KeyLimits
    route: str
    path_and_query: str
    body: bytes
    pinned: str | None
    sessions: Sessions
    limiter: Limiter
