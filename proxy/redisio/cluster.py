"""Which script pipe a call goes to: the one pipe, or in cluster mode the pipe of its slot's primary.

Every key of one script call shares the `{g:GROUP}` hash tag, so a call lives in
one slot, named by its first key (`Prepared.slot`). In cluster mode there is one
Pipe per primary, and the slot map is redis-py's (its cluster client's nodes
manager, read with CLUSTER SLOTS).

A slot that moved while the map was not looking is answered with a redirection:
- MOVED: the slot lives elsewhere for good. The map is read again, and the call
  goes once more, to the node named.
- ASK: the slot is being migrated and the call's keys have left already. The
  call goes once more to the node named, right after ASKING (which lets the
  importing node serve this one call); the map stays as it is.

A primary that dies answers nothing at all: its pipe's calls fail (on_error
applies) and the pipe tells of it. The slot map is then read again in the
background, one read at a time and at most every REFRESH_S, asking the node
that failed last; once the cluster has promoted the replica, the map names it
and calls go there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from .pipe import ConnectionFactory, Pipe, pack_command
from .slot_map import SlotMap

ASKING = pack_command(b"ASKING")
REFRESH_S = 0.5  # the slot map is read again at most this often after failures
log = logging.getLogger("sluicegate")


@dataclass(frozen=True, slots=True)
class Redirect:
    asking: bool  # ASK: for this call only; MOVED: for good
    slot: int
    host: str
    port: int


def redirection(reply: ResponseError) -> Redirect | None:
    """The MOVED or ASK in an error reply ("MOVED 3999 127.0.0.1:6381"), or None."""
    kind, _, rest = str(reply).partition(" ")
    if kind not in ("MOVED", "ASK"):
        return None
    slot, _, address = rest.partition(" ")
    host, _, port = address.rpartition(":")
    if not slot.isdigit() or not port.isdigit():
        return None
    return Redirect(kind == "ASK", int(slot), host, int(port))


class PrimaryDown(RedisError):
    """Primaries of the slot map that did not answer PING, named by host:port (never a password)."""


async def ping_primaries(cluster: RedisCluster, timeout_s: float) -> None:
    """PING every primary the slot map names, each within timeout_s; raise PrimaryDown naming the silent ones.

    A primary that died is named until the cluster has promoted its replica and the map is read again
    (the cluster client reads it at its next command after a failure).
    """
    await cluster.initialize()  # nothing to do unless the map is unread or a failure asked for it

    async def ping(node: ClusterNode) -> None:
        async with asyncio.timeout(timeout_s):
            await cluster.execute_command("PING", target_nodes=node)

    primaries = cluster.get_primaries()
    answers = await asyncio.gather(*map(ping, primaries), return_exceptions=True)
    silent = [
        f"{node.host}:{node.port} ({type(answer).__name__})"
        for node, answer in zip(primaries, answers, strict=True)
        if isinstance(answer, Exception)
    ]
    if silent:
        raise PrimaryDown(f"Redis Cluster primary {', '.join(silent)} did not answer PING")


class Pipes(Protocol):
    def now(self, slot: int) -> Pipe | None:
        """The pipe for the slot, or None while the slot map is not known yet."""

    async def route(self, slot: int) -> Pipe:
        """The pipe for the slot, reading the slot map first if need be."""

    async def redirected(self, to: Redirect) -> Pipe:
        """The pipe of the node a redirection names; after MOVED the slot map is read again."""

    async def close(self) -> None: ...


class OnePipe:
    """Single and sentinel mode: every call goes on one pipe, opened at the first call."""

    def __init__(self, make_connection: ConnectionFactory, timeout_s: float) -> None:
        self._make_connection = make_connection
        self._timeout_s = timeout_s
        self._pipe: Pipe | None = None

    def now(self, slot: int) -> Pipe:
        if self._pipe is None:
            self._pipe = Pipe(self._make_connection, self._timeout_s)
        return self._pipe

    async def route(self, slot: int) -> Pipe:
        return self.now(slot)

    async def redirected(self, to: Redirect) -> Pipe:
        return self.now(to.slot)  # a single Redis does not redirect; a reply saying so is sent again here

    async def close(self) -> None:
        if self._pipe is not None:
            await self._pipe.close()


class ClusterPipes:
    """One pipe per primary node, opened at its first call; the slot map is the cluster client's."""

    def __init__(
        self, cluster: RedisCluster, connect: Callable[[str, int], AbstractConnection], timeout_s: float
    ) -> None:
        self._cluster = cluster
        self._map = SlotMap(cluster)
        self._connect = connect
        self._timeout_s = timeout_s
        self._pipes: dict[tuple[str, int], Pipe] = {}
        self._refresh: asyncio.Task[None] | None = None  # the slot map's read after a failure, while on
        self._refreshed_at = -REFRESH_S  # loop time when the last one ended

    def now(self, slot: int) -> Pipe | None:
        node = self._map.node(slot)
        return None if node is None else self._pipe(*node)

    async def route(self, slot: int) -> Pipe:
        pipe = self.now(slot)
        if pipe is None:
            async with asyncio.timeout(self._timeout_s):
                await self._cluster.initialize()
            pipe = self.now(slot)
            assert pipe is not None  # initialize() covers every slot or raises
        return pipe

    async def redirected(self, to: Redirect) -> Pipe:
        if not to.asking:
            # Concurrent callers share one read: the nodes manager reads again only if nobody did meanwhile.
            async with asyncio.timeout(self._timeout_s):
                await self._map.read()
        return self._pipe(to.host, to.port)

    def _pipe(self, host: str, port: int) -> Pipe:
        pipe = self._pipes.get((host, port))
        if pipe is None:
            pipe = self._pipes[host, port] = Pipe(
                lambda: self._connect(host, port), self._timeout_s, on_failure=lambda: self.failing(host, port)
            )
        return pipe

    def failing(self, host: str, port: int) -> None:
        """A pipe's node failed a call or a connect, or said CLUSTERDOWN: read the slot map again soon."""
        if self._refresh is None:
            self._refresh = asyncio.get_running_loop().create_task(self._read_slot_map(f"{host}:{port}"))

    async def _read_slot_map(self, failed: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            await asyncio.sleep(max(0.0, self._refreshed_at + REFRESH_S - loop.time()))
            # Every node the map names is asked in turn, the one that failed last, each within timeout_s
            # (twice, with the one retry on connecting); a bound on the whole read besides.
            async with asyncio.timeout(self._timeout_s * 2 * (self._map.size + 1)):
                await self._map.read(failed)
        except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
            log.debug("reading the Redis Cluster slot map failed: %s", type(exc).__name__)
        finally:
            self._refreshed_at = loop.time()
            self._refresh = None

    async def close(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresh
        await asyncio.gather(*(pipe.close() for pipe in self._pipes.values()))
