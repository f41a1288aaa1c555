"""The types a request carries along its path: app -> endpoints -> relay.

A leaf, like starlette's types.py and hypercorn's typing.py: at run time it imports
nothing of ours, so every step of the path can import it and the arrows still run
one way. The classes named in annotations are imported for the type checker only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from starlette.types import Receive, Scope

    from ..config.settings import KeySettings
    from ..limits.limiter import Limiter
    from ..limits.plan import KeyLimits
    from .exchange import Exchange
    from .runtime import Runtime
    from .upstream import Sessions


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
