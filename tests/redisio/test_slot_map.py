"""Redis Cluster's slot map as redis-py keeps it, read in one place (redisio/slot_map.py): the installed
redis-py has what is read, and a release without it is named. Following a failover for real is
tests/redisio/test_e2e_cluster_failover.py's."""

from __future__ import annotations

import pytest
from redis.asyncio.cluster import NodesManager

from proxy.redisio import slot_map


def test_the_installed_redis_py_has_what_the_slot_map_reads() -> None:
    assert slot_map.problems() == []


@pytest.mark.parametrize("name", slot_map.METHODS)
def test_a_redis_py_without_a_method_the_map_calls_is_named(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.delattr(NodesManager, name)
    assert slot_map.problems() == [f"redis-py's NodesManager has no {name}()"]


@pytest.mark.parametrize("name", slot_map.CACHES)
def test_a_redis_py_whose_map_is_kept_elsewhere_is_named(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    init = NodesManager.__init__

    def without(self: NodesManager, *args: object, **kwargs: object) -> None:
        init(self, *args, **kwargs)  # type: ignore[arg-type]
        delattr(self, name)

    monkeypatch.setattr(NodesManager, "__init__", without)
    assert slot_map.problems() == [f"redis-py's NodesManager has no {name}"]


def test_a_redis_py_that_cannot_name_the_failed_node_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    async def initialize(self: NodesManager) -> None: ...

    monkeypatch.setattr(NodesManager, "initialize", initialize)
    assert slot_map.problems() == [
        "redis-py's NodesManager.initialize() takes no last_failed_node_name (redis-py 8.0 does)"
    ]
