"""Connections for hypercorn: a cap per worker, a deadline for each request head, a drain.
What reaches into hypercorn's and h11's internals (the head deadline, the error envelope for a
head h11 refuses, the short ways out) is in internals.py, taken only when it checks out.

hypercorn's own worker_serve accepts without bound and runs one idle timer for an
idle keep-alive connection and a request head still arriving alike, so a client
trickling a header keeps its socket as long as nginx's pooled ones stay. Here the
accept loop stops at the cap (later connections wait in the kernel's listen queue,
where a worker with a free slot takes them) and each connection gets two timers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any, SupportsIndex

import hypercorn.typing
from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.asyncio.worker_context import WorkerContext
from hypercorn.config import Config
from hypercorn.typing import AppWrapper, LifespanState
from starlette.types import Receive, Send

from ..config.settings import ServerSettings
from . import internals
from .asgi import FAST_SEND, ChunkSend
from .internals import Connection, usable

log = logging.getLogger("sluicegate")

AT_CAP_LOG_INTERVAL_S = 60.0
# A connection holds the client's socket and its provider's; the spare is for Redis, the event file, logs.
FDS_PER_CONNECTION = 2
FDS_SPARE = 64


class _ArrivalReader(asyncio.StreamReader):
    """Notes when bytes arrive, so an idle connection can tell that a request head has begun."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop=loop)
        self.arrived = asyncio.Event()

    def feed_data(self, data: Iterable[SupportsIndex]) -> None:
        super().feed_data(data)
        self.arrived.set()


class Listener:
    """Accepts for one worker, at most `max_connections` at a time, until told to stop."""

    def __init__(self, app: AppWrapper, config: Config, server: ServerSettings) -> None:
        self.app = app
        self.config = config
        self.state: LifespanState = {}
        self.context = WorkerContext(None)
        self.header_timeout_s = server.header_timeout_s
        self.backlog = server.backlog
        self.max_connections = server.max_connections
        self.slots = asyncio.Semaphore(server.max_connections)
        self.connections: dict[asyncio.Task[None], _ArrivalReader] = {}
        self._accepting: list[asyncio.Task[None]] = []
        self._sockets: list[socket.socket] = []
        self._warned_at = -AT_CAP_LOG_INTERVAL_S
        self.fenced = False  # internals.py's ways taken: decided once, at start()

    def start(self, sockets: list[socket.socket]) -> None:
        _raise_fd_limit(self.max_connections * FDS_PER_CONNECTION + FDS_SPARE)
        self.fenced = usable()  # if not, said once, and hypercorn's own way
        if self.fenced:
            self.app = Offering(self.app)
        for sock in sockets:
            sock.setblocking(False)
            sock.listen(self.backlog)
            self._sockets.append(sock)
            self._accepting.append(asyncio.create_task(self._accept(sock)))

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self.slots.locked():
                self._at_cap()
            await self.slots.acquire()
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:
                self.slots.release()
                # Out of file descriptors and the like: pause as asyncio's own server does, not spin.
                log.warning("accepting a connection failed (%s); retrying in 1s", exc)
                await asyncio.sleep(1.0)
                continue
            except BaseException:
                self.slots.release()
                raise
            reader = _ArrivalReader(loop)
            task = loop.create_task(self._serve(conn, reader))
            self.connections[task] = reader
            task.add_done_callback(self._done)

    def _at_cap(self) -> None:
        now = time.monotonic()
        if now - self._warned_at >= AT_CAP_LOG_INTERVAL_S:
            self._warned_at = now
            log.warning(
                "worker at [server] max_connections (%d): new connections wait in the listen queue",
                self.max_connections,
            )

    def _done(self, task: asyncio.Task[None]) -> None:
        del self.connections[task]
        self.slots.release()

    async def _serve(self, conn: socket.socket, reader: _ArrivalReader) -> None:
        loop = asyncio.get_running_loop()
        protocol = asyncio.StreamReaderProtocol(reader)
        try:
            transport, _ = await loop.connect_accepted_socket(lambda: protocol, conn)
        except OSError:
            conn.close()
            return
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            # uvloop sets it on an accepted socket, asyncio's own loop does not (its create_server
            # does): without it a chunk waits for the client's ACK of the one before, up to 40 ms.
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        if self.fenced:
            await Connection(self, reader, writer, loop, arrived=reader.arrived)
        else:
            await TCPServer(self.app, loop, self.config, self.context, self.state, reader, writer)

    async def stop_accepting(self) -> None:
        """Close the listening sockets: from now on new connections are refused."""
        for task in self._accepting:
            task.cancel()
        # Closed only once no accept is pending on them.
        await asyncio.gather(*self._accepting, return_exceptions=True)
        for sock in self._sockets:
            sock.close()

    async def close(self, graceful_timeout_s: float) -> None:
        """Idle connections close now, busy ones after their response; what is left at the timeout is cut."""
        await self.context.terminated.set()
        for reader in self.connections.values():
            reader.arrived.set()
        tasks = set(self.connections)
        if not tasks:
            return
        _, cut = await asyncio.wait(tasks, timeout=graceful_timeout_s)
        for task in cut:
            task.cancel()
        # Cancelled requests still leave their event records on the way out.
        await asyncio.gather(*cut, return_exceptions=True)


@contextlib.asynccontextmanager
async def discarding_body(receive: Receive) -> AsyncIterator[None]:
    """For an answer sent before its request's body was read: meanwhile the body is taken and dropped.

    hypercorn 0.18 queues at most config.max_app_queue_size (10) messages for the app, and its
    reader waits for room; at the answer's end the stream queues one more (http.disconnect) and
    waits likewise. A client sending fast can fill the queue before the answer is out: with nobody
    taking from it, the answer's last send and hypercorn's reader then wait for each other for
    good, and the client has its answer on a connection that never closes, the worker a slot it
    never frees. Once the answer is out the stream is closed and hypercorn queues no more of it.
    """
    task = asyncio.create_task(_discard(receive))
    try:
        yield
    finally:
        task.cancel()


async def _discard(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            return


def _raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        soft = wanted
    if soft < needed:
        log.warning(
            "open file limit %d is below the %d that [server] max_connections needs; raise LimitNOFILE",
            soft,
            needed,
        )


class _FastSend:
    """The short ways, as offered to the app in its scope (asgi.FastSend)."""

    __slots__ = ()

    def chunks(self, send: Send) -> ChunkSend | None:
        return internals.chunk_sender(send)

    async def head(self, send: Send, status: int, headers: Sequence[tuple[bytes, bytes]]) -> bool:
        return await internals.send_head(send, status, headers)

    async def answer(self, send: Send, status: int, headers: Sequence[tuple[bytes, bytes]], body: bytes) -> bool:
        return await internals.send_answer(send, status, headers, body)


FAST = _FastSend()


class Offering:
    """hypercorn's app wrapper, with the short ways in each HTTP request's scope."""

    __slots__ = ("app",)

    def __init__(self, app: AppWrapper) -> None:
        self.app = app

    async def __call__(
        self,
        scope: hypercorn.typing.Scope,
        receive: hypercorn.typing.ASGIReceiveCallable,
        send: hypercorn.typing.ASGISendCallable,
        sync_spawn: Callable[..., Any],
        call_soon: Callable[..., Any],
    ) -> None:
        if scope["type"] == "http":
            extensions: dict[str, object] = scope["extensions"]  # type: ignore[assignment]
            extensions[FAST_SEND] = FAST
        await self.app(scope, receive, send, sync_spawn, call_soon)
