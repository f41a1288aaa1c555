"""redis-py's Redis Cluster slot map: the one place that reads its cluster client's internals.

redis-py keeps the map in its cluster client's `nodes_manager` (`slots_cache`, `nodes_cache`,
`get_node_from_slot`, `initialize`), none of it documented API. Reading it again after a failure
names the node that failed (`initialize(last_failed_node_name=)`, since redis-py 8.0), so it is
asked last. `problems()` says what the installed release lacks; pyproject.toml's floor (8.1) is
the release .ci/run tests besides the newest.
"""

from __future__ import annotations

import inspect

from redis.asyncio.cluster import NodesManager, RedisCluster

METHODS = ("initialize", "get_node_from_slot")
CACHES = ("slots_cache", "nodes_cache")


class SlotMap:
    __slots__ = ("_nodes",)

    def __init__(self, cluster: RedisCluster) -> None:
        self._nodes = cluster.nodes_manager

    def node(self, slot: int) -> tuple[str, int] | None:
        """The primary serving the slot, or None while the map has not been read."""
        if not self._nodes.slots_cache:
            return None
        node = self._nodes.get_node_from_slot(slot)
        return node.host, int(node.port)

    @property
    def size(self) -> int:
        """How many nodes the map names."""
        return len(self._nodes.nodes_cache)

    async def read(self, failed: str | None = None) -> None:
        """Read the map again; `failed` (host:port), the node that failed last, is asked last."""
        if failed is None:
            await self._nodes.initialize()
        else:
            await self._nodes.initialize(last_failed_node_name=failed)


def problems() -> list[str]:
    """What SlotMap reads that this redis-py's cluster client lacks."""
    found = [
        f"redis-py's NodesManager has no {name}()"
        for name in METHODS
        if not callable(getattr(NodesManager, name, None))
    ]
    initialize = getattr(NodesManager, "initialize", None)
    if initialize is not None and "last_failed_node_name" not in inspect.signature(initialize).parameters:
        found.append("redis-py's NodesManager.initialize() takes no last_failed_node_name (redis-py 8.0 does)")
    nodes = RedisCluster(host="127.0.0.1", port=6379).nodes_manager  # constructed, never connected
    found += [f"redis-py's NodesManager has no {name}" for name in CACHES if not hasattr(nodes, name)]
    return found
