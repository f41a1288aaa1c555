"""aiohttp's connection pools, counted: the one place that reads aiohttp's private fields.

aiohttp has no public count of a connector's connections. Its BaseConnector keeps them in
`_acquired` (a set: in use), `_conns` (idle, by host) and `_waiters` (requests waiting for a
free connection, by host); `problems()` says whether the installed aiohttp still does, and the
gauges they feed (sluicegate_upstream_connections) read 0 where it does not.
"""

from __future__ import annotations

import logging

import aiohttp

from ..records.metrics import PoolStats

FIELDS = ("_acquired", "_conns", "_waiters")
log = logging.getLogger("sluicegate")


def pool_stats(connector: aiohttp.BaseConnector | None) -> PoolStats:
    idle = getattr(connector, "_conns", {})
    waiters = getattr(connector, "_waiters", {})
    return PoolStats(
        in_use=in_use(connector),
        idle=sum(len(conns) for conns in idle.values()),
        waiting=sum(len(queue) for queue in waiters.values()),
    )


def in_use(connector: aiohttp.BaseConnector | None) -> int:
    return len(getattr(connector, "_acquired", ()))


async def problems() -> list[str]:
    """The fields pool_stats reads that this aiohttp's connector does not have (checked at start-up)."""
    connector = aiohttp.TCPConnector()
    try:
        return [f"aiohttp's connector has no {name}" for name in FIELDS if not hasattr(connector, name)]
    finally:
        await connector.close()


async def check() -> None:
    """At start-up: said once if the gauges will read 0."""
    for problem in await problems():
        log.warning("%s: the upstream pool gauges read 0 (pin aiohttp to a tested release)", problem)
