"""The event sink that each request's record ends up in.

Records go through a bounded queue to one writer task: a full queue drops and
counts, never blocks a request. Serialising and writing happen in the writer
(file and stdout writes in a thread, in batches gathered for LINGER_S), and the
queue is drained on shutdown.
Where the lines go is a Writer, picked by name from WRITERS: a new sink is a
class and a row.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from typing import IO, Any, Protocol

import orjson

from ..config.settings import EventSettings
from .record import RequestRecord

log = logging.getLogger("sluicegate")

BATCH_MAX = 512
LINGER_S = 0.05  # how long the writer lets a batch gather after its first record
REDIS_STREAM = "sluicegate:events"
REDIS_MAXLEN = 100_000


class Writer(Protocol):
    """Where a sink's lines go. Only the writer task calls write() and close()."""

    async def write(self, lines: list[bytes]) -> None: ...

    def reopen(self) -> None:
        """For logrotate (SIGHUP): open the destination afresh before the next write."""

    def close(self) -> None: ...


class StdoutWriter:
    async def write(self, lines: list[bytes]) -> None:
        await asyncio.to_thread(_write_lines, sys.stdout.buffer, lines)

    def reopen(self) -> None:
        pass

    def close(self) -> None:
        pass


class FileWriter:
    def __init__(self, path: str) -> None:
        self.path = path
        self._file: IO[bytes] | None = None
        self._reopen = False

    async def write(self, lines: list[bytes]) -> None:
        await asyncio.to_thread(self._write, lines)

    def _write(self, lines: list[bytes]) -> None:
        """In a thread: the file may sit on a slow disk."""
        if self._reopen or self._file is None:
            self._reopen = False
            if self._file is not None:
                self._file.close()
            self._file = open(self.path, "ab")  # noqa: SIM115 (kept open until close or reopen)
        _write_lines(self._file, lines)

    def reopen(self) -> None:
        self._reopen = True

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class RedisWriter:
    """Appends to the REDIS_STREAM stream, capped near REDIS_MAXLEN entries."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis

    async def write(self, lines: list[bytes]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for line in lines:
            pipe.xadd(REDIS_STREAM, {"event": line}, maxlen=REDIS_MAXLEN, approximate=True)
        await pipe.execute()

    def reopen(self) -> None:
        pass

    def close(self) -> None:
        pass


# [events] sink -> its writer, given the settings and the worker's Redis client; "off" has none.
WRITERS: dict[str, Callable[[EventSettings, Any], Writer]] = {
    "stdout": lambda settings, redis: StdoutWriter(),
    "file": lambda settings, redis: FileWriter(settings.path),
    "redis": lambda settings, redis: RedisWriter(redis),
}


class EventSink:
    """A bounded queue and one writer task for the configured sink."""

    def __init__(
        self, settings: EventSettings, bucket_of: Callable[[float], str], on_drop: Callable[[], None], redis: Any = None
    ) -> None:
        self.settings = settings
        self.bucket_of = bucket_of
        self.on_drop = on_drop
        make = WRITERS.get(settings.sink)
        self.writer: Writer | None = make(settings, redis) if make is not None else None
        self.queue: asyncio.Queue[RequestRecord | None] = asyncio.Queue(maxsize=settings.queue_size)
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    def start(self) -> None:
        if self.enabled:
            self._task = asyncio.create_task(self._run())

    def emit(self, record: RequestRecord) -> None:
        if not self.enabled:
            return
        try:
            self.queue.put_nowait(record)
        except asyncio.QueueFull:
            self.on_drop()

    def reopen(self) -> None:
        """For logrotate: the writer opens the path afresh before its next batch."""
        if self.writer is not None:
            self.writer.reopen()

    async def close(self) -> None:
        """Write everything already accepted, then stop."""
        if self._task is None or self.writer is None:
            return
        await self.queue.put(None)
        await self._task
        self.writer.close()

    async def _run(self) -> None:
        writer = self.writer
        assert writer is not None  # started only when enabled
        done = False
        while not done:
            batch = [await self.queue.get()]
            if batch[0] is not None and self.queue.qsize() < BATCH_MAX:
                # Let a batch gather: each write is a hand-off to a thread, and every hand-off makes the
                # event loop's thread give up the GIL. At a few hundred records a second, one write per
                # LINGER_S instead of one per record or two takes that off the requests' path.
                await asyncio.sleep(LINGER_S)
            while len(batch) < BATCH_MAX and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            if batch[-1] is None:
                done = True
            lines = [orjson.dumps(r.event(self.bucket_of(r.latency_s))) for r in batch if r is not None]
            if lines:
                try:
                    await writer.write(lines)
                except Exception as exc:
                    # The sink failing must not kill the writer; the records are lost and counted. One line
                    # per batch: while Redis or a disk is down, a traceback per batch would bury the log.
                    log.warning("event sink %s failed (%s: %s); %d records lost",
                                self.settings.sink, type(exc).__name__, str(exc)[:200], len(lines))  # fmt: skip
                    for _ in lines:
                        self.on_drop()


def _write_lines(out: IO[bytes], lines: list[bytes]) -> None:
    out.write(b"\n".join(lines) + b"\n")
    out.flush()
