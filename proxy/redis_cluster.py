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
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ResponseError

from .redis_pipe import ConnectionFactory, Pipe, pack_command

ASKING = pack_command(b"ASKING")


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
        self._connect = connect
        self._timeout_s = timeout_s
        self._pipes: dict[tuple[str, int], Pipe] = {}

    def now(self, slot: int) -> Pipe | None:
        slots = self._cluster.nodes_manager.slots_cache
        if not slots:
            return None
        node = self._cluster.nodes_manager.get_node_from_slot(slot)
        return self._pipe(node.host, int(node.port))

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
                await self._cluster.nodes_manager.initialize()
        return self._pipe(to.host, to.port)

    def _pipe(self, host: str, port: int) -> Pipe:
        pipe = self._pipes.get((host, port))
        if pipe is None:
            pipe = self._pipes[host, port] = Pipe(lambda: self._connect(host, port), self._timeout_s)
        return pipe

    async def close(self) -> None:
        await asyncio.gather(*(pipe.close() for pipe in self._pipes.values()))
