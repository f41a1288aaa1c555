"""The gateway's own routes (probes, the model list): one table of rows, built once per app.

The model routes and passthrough go to the upstream; everything else the gateway answers
itself, and each such route is one Row. A new one (billing, admin) is a row, not a branch
in dispatch, the way uvicorn picks implementations from name -> class tables.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from enum import Enum, auto
from typing import TYPE_CHECKING

from ..http.errors import Header
from ..request.exchange import JSON_HEADERS
from ..request.paths import strip_prefix

__all__ = ["AT_ROOT", "Access", "Answer", "Asked", "Found", "Handler", "RouteTable", "Row", "strip_prefix"]

if TYPE_CHECKING:
    from starlette.types import Scope

    from ..config.settings import KeySettings
    from ..request.runtime import Runtime


class Access(Enum):
    """What a route asks of a request before its handler runs."""

    # No key, no body read, no record: probes and scrapes. Any method (balancers probe with HEAD),
    # and answered at the root as well as under each prefix (/healthz, /v1/healthz).
    OPEN = auto()
    # A client key: the body is read, the key checked, the method checked, the request recorded.
    KEY = auto()
    # The operator's token from SLUICEGATE_ADMIN_TOKEN, never a client key: at the root only
    # (/admin/...), body read, method checked, recorded without a key. Without the variable
    # every ADMIN row answers 404, as a path the gateway does not have.
    ADMIN = auto()


AT_ROOT = frozenset({Access.OPEN, Access.ADMIN})


@dataclass(frozen=True, slots=True, kw_only=True)
class Asked:
    """What a handler gets to answer from."""

    scope: Scope
    runtime: Runtime
    key: KeySettings | None  # the caller's, on KEY routes; None on OPEN and ADMIN routes
    params: Mapping[str, str]  # the row's {name} segments, as found in the path


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes
    headers: tuple[Header, ...] = JSON_HEADERS  # content-length and x-request-id are added


Handler = Callable[[Asked], Awaitable[Answer]]


@dataclass(frozen=True, slots=True)
class Row:
    path: str  # after the prefix; a segment "{name}" matches any one segment
    handler: Handler
    access: Access = Access.KEY
    method: str = "GET"  # on KEY rows; another gets 405


@dataclass(frozen=True, slots=True)
class Found:
    row: Row
    params: Mapping[str, str]


class RouteTable:
    def __init__(self, *rows: Row) -> None:
        self.rows = rows
        self._exact = {row.path: row for row in rows if "{" not in row.path}
        self._templates = [(row, row.path.split("/")) for row in rows if "{" in row.path]

    def find(self, path: str, prefixes: tuple[str, ...]) -> Found | None:
        """The row for a request path: OPEN rows at the root and under each prefix, KEY rows under a
        prefix, ADMIN rows at the root."""
        rest = strip_prefix(path, prefixes)
        found = self._match(rest) if rest is not None else None
        if found is not None and found.row.access is Access.ADMIN:
            found = None
        if found is None:
            at_root = self._match(path)
            if at_root is not None and at_root.row.access in AT_ROOT:
                return at_root
        return found

    def _match(self, path: str) -> Found | None:
        row = self._exact.get(path)
        if row is not None:
            return Found(row, {})
        segments = path.split("/")
        for row, template in self._templates:
            if len(template) == len(segments):
                params = _params(template, segments)
                if params is not None:
                    return Found(row, params)
        return None


def _params(template: list[str], segments: list[str]) -> dict[str, str] | None:
    params: dict[str, str] = {}
    for want, got in zip(template, segments, strict=True):
        if want.startswith("{") and want.endswith("}"):
            if not got:
                return None
            params[want[1:-1]] = got
        elif want != got:
            return None
    return params
