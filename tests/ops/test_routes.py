"""The route table: which row a path finds, under a prefix or at the root."""

from __future__ import annotations

import pytest

from proxy.ops.routes import Access, Answer, Asked, RouteTable, Row

PREFIXES = ("/v1", "/api/v1")


async def nothing(asked: Asked) -> Answer:
    return Answer(204, b"")


TABLE = RouteTable(
    Row("/healthz", nothing, access=Access.OPEN),
    Row("/models", nothing),
    Row("/keys/{name}/usage", nothing),
    Row("/admin/keys/{name}/usage", nothing, access=Access.ADMIN),
)


@pytest.mark.parametrize(
    ("path", "row", "params"),
    [
        ("/healthz", "/healthz", {}),
        ("/v1/healthz", "/healthz", {}),
        ("/api/v1/healthz", "/healthz", {}),
        ("/v1/models", "/models", {}),
        ("/api/v1/models", "/models", {}),
        ("/v1/keys/alice/usage", "/keys/{name}/usage", {"name": "alice"}),
        # A KEY row is only under a prefix.
        ("/models", None, None),
        ("/keys/alice/usage", None, None),
        # An ADMIN row only at the root.
        ("/admin/keys/alice/usage", "/admin/keys/{name}/usage", {"name": "alice"}),
        ("/v1/admin/keys/alice/usage", None, None),
        # Not the row's shape: left to passthrough.
        ("/v1/models/", None, None),
        ("/v1/models/mock-chat", None, None),
        ("/v1/keys//usage", None, None),
        ("/v1/keys/alice/usage/x", None, None),
        ("/admin/keys//usage", None, None),
        ("/v2/healthz", None, None),
        ("/v1", None, None),
    ],
)
def test_find(path: str, row: str | None, params: dict[str, str] | None) -> None:
    found = TABLE.find(path, PREFIXES)
    if row is None:
        assert found is None
    else:
        assert found is not None
        assert (found.row.path, dict(found.params)) == (row, params)
