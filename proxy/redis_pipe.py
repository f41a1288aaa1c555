"""The limiter's script calls, pipelined: what concurrent requests ask in one loop tick goes out in one write.

redis-py spends more on each call than Redis spends running the script: a pooled
connection taken and given back under a lock, a task for the write timeout, a
timer for the read, a socket write and a wakeup of Redis per call. Here the
calls queued while the event loop runs one turn go out together on one
connection that stays open, and one reader task hands the replies back in the
order they were sent. Each call is still its own EVALSHA, so every decision is
as atomic and exact as before; only the trips are shared.

A connection that does not answer within `timeout_s` of a write, or breaks,
fails every call waiting on it and is dropped; the next call connects afresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ResponseError

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

    __slots__ = ("head", "script")

    def __init__(self, script: Script, keys: Sequence[str], args: Sequence[Any], more: int = 0) -> None:
        parts = [b"EVALSHA", script.sha.encode(), b"%d" % len(keys), *map(_encode, keys), *map(_encode, args)]
        self.script = script
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


class Pipe:
    def __init__(self, make_connection: ConnectionFactory, timeout_s: float, lazy_s: float = 0.01) -> None:
        self._make_connection = make_connection
        self._timeout_s = timeout_s
        self._lazy_s = lazy_s
        self._queued: list[bytes] = []
        self._queued_futures: list[asyncio.Future[Any]] = []
        self._sent: deque[tuple[asyncio.Future[Any], float]] = deque()  # awaiting a reply, with its deadline
        self._wake = asyncio.Event()
        self._conn: AbstractConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._lazy: asyncio.TimerHandle | None = None
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
        if self._writer is None:
            self._writer = self._loop.create_task(self._write_loop())
        if not lazy:
            self._wake.set()
        elif self._lazy is None and not self._wake.is_set():
            self._lazy = self._loop.call_later(self._lazy_s, self._wake.set)
        return future

    async def close(self) -> None:
        """Send what is queued and wait for its replies (at most timeout_s), then close."""
        pending = [*self._queued_futures, *(future for future, _ in self._sent)]
        if pending:
            self._wake.set()
            await asyncio.wait(pending, timeout=self._timeout_s * 2)
        if self._lazy is not None:
            self._lazy.cancel()
            self._lazy = None
        for task in (self._writer, self._reader):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._writer = None
        self._drop(ConnectionError("closed"))
        await asyncio.gather(*self._closing, return_exceptions=True)

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._lazy is not None:
                self._lazy.cancel()
                self._lazy = None
            batch, futures = self._queued, self._queued_futures
            self._queued, self._queued_futures = [], []
            try:
                conn = await self._connected()
                deadline = self._loop.time() + self._timeout_s
                # In the reply queue before the write: the replies may come back before it returns.
                self._sent.extend((future, deadline) for future in futures)
                await conn.send_packed_command(batch, check_health=False)
            except Exception as exc:  # any failure to connect or write fails these calls
                _fail(futures, exc)
                self._drop(exc)
                continue
            if self._watchdog is None:
                self._watchdog = self._loop.call_at(deadline, self._check_deadline)

    async def _connected(self) -> AbstractConnection:
        if self._conn is not None and self._conn.is_connected:
            return self._conn
        self._drop(ConnectionError("reconnecting"))
        conn = self._make_connection()
        async with asyncio.timeout(self._timeout_s):
            await conn.connect()  # type: ignore[no-untyped-call]
        self._conn = conn
        self._reader = self._loop.create_task(self._read_loop(conn))
        return conn

    async def _read_loop(self, conn: AbstractConnection) -> None:
        try:
            while True:
                try:
                    reply: Any = await conn.read_response(disconnect_on_error=False)
                except ResponseError as exc:
                    reply = exc  # one call's error reply; the connection is fine
                if not self._sent:
                    raise ConnectionError("a reply nobody asked for")
                future, _ = self._sent.popleft()
                if not future.done():
                    future.set_result(reply)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the connection broke: every waiting call fails
            if self._conn is conn:
                self._reader = None
                self._drop(exc)

    def _check_deadline(self) -> None:
        self._watchdog = None
        if not self._sent:
            return
        if self._sent[0][1] <= self._loop.time():
            self._drop(TimeoutError(f"Redis did not answer within {self._timeout_s:g}s"))
        else:
            self._watchdog = self._loop.call_at(self._sent[0][1], self._check_deadline)

    def _drop(self, exc: BaseException) -> None:
        """Fail every call sent on the current connection and close it."""
        _fail([future for future, _ in self._sent], exc)
        self._sent.clear()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        conn, self._conn = self._conn, None
        reader, self._reader = self._reader, None
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
        if conn is not None:
            closing = self._loop.create_task(conn.disconnect(nowait=True))
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)


def _fail(futures: Sequence[asyncio.Future[Any]], exc: BaseException) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(exc)
