"""The record filled along a request's path, and the event sink it ends up in.

Records go through a bounded queue to one writer task: a full queue drops and
counts, never blocks a request. Serialising and writing happen in the writer
(file and stdout writes in a thread), and the queue is drained on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any

import orjson

from .redact import clip
from .settings import EventSettings

log = logging.getLogger("sluicegate")

BATCH_MAX = 512
REDIS_STREAM = "sluicegate:events"
REDIS_MAXLEN = 100_000


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    method: str
    route: str = "other"
    started: float = 0.0  # perf_counter
    wall_started: float = 0.0  # time.time(), for ts
    key: str | None = None  # masked
    key_name: str | None = None
    group: str | None = None
    model: str | None = None
    provider: str | None = None
    upstream_model: str | None = None
    stream: bool = False
    status: int = 0
    error: str | None = None
    body_read_at: float | None = None  # the gateway's own time starts here, not while the client uploads
    upstream_sent_at: float | None = None
    first_byte_at: float | None = None
    ended_at: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    attempts: int = 0
    client_disconnected: bool = False
    ratelimit: tuple[str, str] | None = None  # (scope, limit) of a 429
    failures: list[tuple[str, str]] = field(default_factory=list)  # (provider, reason) per failed attempt

    @classmethod
    def start(cls, request_id: str, method: str) -> RequestRecord:
        return cls(request_id=request_id, method=method, started=time.perf_counter(), wall_started=time.time())

    @property
    def latency_s(self) -> float:
        return (self.ended_at or time.perf_counter()) - self.started

    def event(self, latency_bucket: str) -> dict[str, Any]:
        ts = datetime.fromtimestamp(self.wall_started, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return {
            "ts": ts,
            "request_id": self.request_id,
            "key": self.key,
            "key_name": self.key_name,
            "group": self.group,
            "route": self.route,
            "method": clip(self.method),
            "model": None if self.model is None else clip(self.model),
            "provider": self.provider,
            "upstream_model": None if self.upstream_model is None else clip(self.upstream_model),
            "stream": self.stream,
            "status": self.status or 499,
            "error": self.error,
            "latency_ms": round(self.latency_s * 1000, 3),
            "latency_bucket": latency_bucket,
            "ttfb_ms": None if self.first_byte_at is None else round((self.first_byte_at - self.started) * 1000, 3),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "attempts": self.attempts,
            "client_disconnected": self.client_disconnected,
        }


class EventSink:
    """A bounded queue and one writer task for the configured sink."""

    def __init__(
        self, settings: EventSettings, bucket_of: Callable[[float], str], on_drop: Callable[[], None], redis: Any = None
    ) -> None:
        self.settings = settings
        self.bucket_of = bucket_of
        self.on_drop = on_drop
        self.redis = redis
        self.queue: asyncio.Queue[RequestRecord | None] = asyncio.Queue(maxsize=settings.queue_size)
        self._file: IO[bytes] | None = None
        self._reopen = False
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self.settings.sink != "off"

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
        self._reopen = True

    async def close(self) -> None:
        """Write everything already accepted, then stop."""
        if self._task is None:
            return
        await self.queue.put(None)
        await self._task
        if self._file is not None:
            self._file.close()

    async def _run(self) -> None:
        done = False
        while not done:
            batch = [await self.queue.get()]
            while len(batch) < BATCH_MAX and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            if batch[-1] is None:
                done = True
            lines = [orjson.dumps(r.event(self.bucket_of(r.latency_s))) for r in batch if r is not None]
            if lines:
                try:
                    await self._write(lines)
                except Exception:
                    # The sink failing must not kill the writer; the records are lost and counted.
                    log.exception("event sink %s failed; %d records lost", self.settings.sink, len(lines))
                    for _ in lines:
                        self.on_drop()

    async def _write(self, lines: list[bytes]) -> None:
        if self.settings.sink == "redis" and self.redis is not None:
            pipe = self.redis.pipeline(transaction=False)
            for line in lines:
                pipe.xadd(REDIS_STREAM, {"event": line}, maxlen=REDIS_MAXLEN, approximate=True)
            await pipe.execute()
        elif self.settings.sink == "file":
            await asyncio.to_thread(self._write_file, lines)
        elif self.settings.sink == "stdout":
            await asyncio.to_thread(_write_lines, sys.stdout.buffer, lines)

    def _write_file(self, lines: list[bytes]) -> None:
        """In a thread: the file may sit on a slow disk."""
        if self._reopen or self._file is None:
            self._reopen = False
            if self._file is not None:
                self._file.close()
            self._file = open(self.settings.path, "ab")  # noqa: SIM115 (kept open until close or reopen)
        _write_lines(self._file, lines)


def _write_lines(out: IO[bytes], lines: list[bytes]) -> None:
    out.write(b"\n".join(lines) + b"\n")
    out.flush()
