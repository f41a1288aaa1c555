"""The limiter's script calls, pipelined: what concurrent requests ask in one loop tick goes out in one write.

redis-py spends more on each call than Redis spends running the script: a pooled
connection taken and given back under a lock, a task for the write timeout, a
timer for the read, a socket write and a wakeup of Redis per call. Here the
calls queued while the event loop runs one turn go out together on one
connection that stays open, and its replies are handed back as they come off
the socket, in the order the calls were sent. A call that finds nothing on its
way goes out at once instead: a turn of a busy loop is milliseconds, and there
is nothing to share the trip with yet. Each call is still its own
EVALSHA, so every decision is as atomic and exact as before; only the trips are
shared.

redis-py opens the connection (TLS, AUTH, SELECT, whatever the URL asks for);
then the socket's protocol is swapped for `_Replies`, which parses replies with
hiredis right where asyncio delivers the bytes: no reader task, so a call's
answer reaches its request one turn of the loop sooner.

A connection that does not answer within `timeout_s` of a write, or breaks,
fails every call waiting on it and is dropped; the next call connects afresh
through the factory (in sentinel mode, to whichever primary the sentinels name
then). So is one that answers READONLY: its Redis was demoted to a replica.
Each such failure, a failed connect and a CLUSTERDOWN reply are told to
`on_failure` (cluster mode reads the slot map again then).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, cast

import hiredis
from redis.asyncio.connection import AbstractConnection
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ReadOnlyError, RedisError, ResponseError

ConnectionFactory = Callable[[], AbstractConnection]


class Script:
    """A Lua script, called by its SHA1 (EVALSHA)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


class Prepared:
    """One EVALSHA whose keys and leading arguments are packed once (RESP); a call appends the rest.

    What one request adds (a hold's size and id, the tokens used) is a few
    short strings; everything else is the same bytes every time.
    """

    __slots__ = ("head", "script", "slot")

    def __init__(self, script: Script, keys: Sequence[str], args: Sequence[Any], more: int = 0) -> None:
        parts = [b"EVALSHA", script.sha.encode(), b"%d" % len(keys), *map(_encode, keys), *map(_encode, args)]
        self.script = script
        # Redis Cluster's slot of the keys: they share one hash tag, so the first key's is everyone's.
        self.slot = key_slot(_encode(keys[0])) if keys else 0
        self.head = b"*%d\r\n" % (len(parts) + more) + b"".join(map(_bulk, parts))

    def pack(self, *more: Any) -> bytes:
        return self.head + b"".join(_bulk(_encode(value)) for value in more) if more else self.head


def pack_command(*parts: bytes) -> bytes:
    return b"*%d\r\n" % len(parts) + b"".join(map(_bulk, parts))


def _encode(value: Any) -> bytes:
    """As redis-py encodes arguments: numbers by repr, strings as UTF-8."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"cannot send {type(value).__name__} to Redis")
    return repr(value).encode()


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


class _Replies(asyncio.Protocol):
    """The socket's protocol once connected: each reply goes straight to the oldest waiting call."""

    def __init__(self, pipe: Pipe, conn: AbstractConnection, transport: asyncio.Transport) -> None:
        self._pipe = pipe
        self._parser = hiredis.Reader(replyError=ResponseError)
        # Kept: redis-py closes the socket of a connection object that is garbage-collected.
        self.conn = conn
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._parser.feed(data)
        while (reply := self._parser.gets()) is not False:
            demoted = False
            if isinstance(reply, ResponseError):
                message = str(reply)
                if message.startswith("NOSCRIPT"):
                    reply = NoScriptError(message)
                elif message.startswith("READONLY"):
                    reply, demoted = ReadOnlyError(message), True
                elif message.startswith("CLUSTERDOWN"):
                    self._pipe._failing()
            if not self._pipe._reply(self, reply):
                return
            if demoted:
                # The primary this connection reached is a replica now (it missed a failover):
                # connect afresh, which in sentinel mode asks the sentinels for the current primary.
                self._pipe._lost(self, RedisConnectionError("Redis was a primary and is now a replica"))
                return

    def connection_lost(self, exc: Exception | None) -> None:
        self._pipe._lost(self, exc or RedisConnectionError("Redis closed the connection"))


class Pipe:
    def __init__(
        self,
        make_connection: ConnectionFactory,
        timeout_s: float,
        lazy_s: float = 0.01,
        on_failure: Callable[[], object] | None = None,
    ) -> None:
        self._make_connection = make_connection
        self._on_failure = on_failure
        self._timeout_s = timeout_s
        self._lazy_s = lazy_s
        self._queued: list[bytes] = []
        self._queued_futures: list[asyncio.Future[Any]] = []
        self._sent: deque[tuple[asyncio.Future[Any], float]] = deque()  # awaiting a reply, with its deadline
        self._replies: _Replies | None = None  # the connected socket, when there is one
        self._connecting: asyncio.Task[None] | None = None
        self._flush_soon: asyncio.Handle | None = None
        self._lazy: asyncio.TimerHandle | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()

    def call(self, packed: bytes, lazy: bool = False) -> asyncio.Future[Any]:
        """Queue one packed command; the future gets its reply (a ResponseError for an error reply) or fails.

        A lazy call (nobody waits on it) goes out with the next call that is not, or within lazy_s:
        at a few hundred requests a second that halves the writes to Redis and Redis's wakeups.
        Calls still go out in the order they were made.
        """
        future: asyncio.Future[Any] = self._loop.create_future()
        self._queued.append(packed)
        self._queued_futures.append(future)
        if not lazy:
            if self._flush_soon is None:  # else it goes with this turn's others
                if self._sent:
                    # Replies are awaited: the rest of this turn's calls go together after it.
                    self._flush_soon = self._loop.call_soon(self._flush)
                else:
                    # Nothing on its way: waiting for the loop's turn would only make this call a
                    # turn later, and a turn is long when the worker is busy. Out now, with any lazy calls.
                    self._flush()
        elif self._lazy is None and self._flush_soon is None:
            self._lazy = self._loop.call_later(self._lazy_s, self._flush)
        return future

    async def close(self) -> None:
        """Send what is queued and wait for its replies (at most about timeout_s), then close."""
        pending = [*self._queued_futures, *(future for future, _ in self._sent)]
        if pending:
            self._flush()
            await asyncio.wait(pending, timeout=self._timeout_s * 2)
        for handle in (self._flush_soon, self._lazy):
            if handle is not None:
                handle.cancel()
        self._flush_soon = self._lazy = None
        if self._connecting is not None:
            self._connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._connecting
        self._drop(RedisConnectionError("closed"))
        _fail(self._queued_futures, RedisConnectionError("closed"))
        self._queued, self._queued_futures = [], []

    def _flush(self) -> None:
        for handle in (self._flush_soon, self._lazy):
            if handle is not None:
                handle.cancel()
        self._flush_soon = self._lazy = None
        if not self._queued:
            return
        replies = self._replies
        if replies is None:
            if self._connecting is None:
                self._connecting = self._loop.create_task(self._connect())
            return  # sent once connected
        batch, futures = self._queued, self._queued_futures
        self._queued, self._queued_futures = [], []
        deadline = self._loop.time() + self._timeout_s
        self._sent.extend((future, deadline) for future in futures)
        replies.transport.write(b"".join(batch))
        if self._watchdog is None:
            self._watchdog = self._loop.call_at(deadline, self._check_deadline)

    async def _connect(self) -> None:
        try:
            conn = self._make_connection()
            async with asyncio.timeout(self._timeout_s):
                await conn.connect()  # type: ignore[no-untyped-call]
            transport = _transport_of(conn)
            replies = _Replies(self, conn, transport)
            transport.set_protocol(replies)
            self._replies = replies
        except Exception as exc:  # no connection: the calls waiting for one fail, as Redis errors
            futures, self._queued, self._queued_futures = self._queued_futures, [], []
            failure = exc if isinstance(exc, (RedisError, OSError)) else RedisConnectionError(repr(exc))
            _fail(futures, failure)
            self._failing()
            return
        finally:
            self._connecting = None
        self._flush()

    def _reply(self, replies: _Replies, reply: Any) -> bool:
        """One reply off the socket; False once this connection is no longer ours."""
        if replies is not self._replies:
            return False
        if not self._sent:
            self._drop(RedisConnectionError("a reply nobody asked for"))
            return False
        future, _ = self._sent.popleft()
        if not future.done():
            future.set_result(reply)
        return True

    def _lost(self, replies: _Replies, exc: Exception) -> None:
        if replies is self._replies:
            self._drop(exc)
            self._failing()

    def _check_deadline(self) -> None:
        self._watchdog = None
        if not self._sent:
            return
        if self._sent[0][1] <= self._loop.time():
            self._drop(TimeoutError(f"Redis did not answer within {self._timeout_s:g}s"))
            self._failing()
        else:
            self._watchdog = self._loop.call_at(self._sent[0][1], self._check_deadline)

    def _failing(self) -> None:
        if self._on_failure is not None:
            self._on_failure()

    def _drop(self, exc: BaseException) -> None:
        """Fail every call sent on the current connection and close it."""
        _fail([future for future, _ in self._sent], exc)
        self._sent.clear()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        replies, self._replies = self._replies, None
        if replies is not None:
            replies.transport.close()


def _transport_of(conn: AbstractConnection) -> asyncio.Transport:
    """The socket redis-py connected: its own reader and writer are not used again."""
    writer: asyncio.StreamWriter | None = getattr(conn, "_writer", None)
    if writer is None:
        raise RedisConnectionError("no connection")
    # uvloop's transports are not asyncio.Transport subclasses, but have the same methods.
    return cast(asyncio.Transport, writer.transport)


def _fail(futures: Sequence[asyncio.Future[Any]], exc: BaseException) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(exc)
