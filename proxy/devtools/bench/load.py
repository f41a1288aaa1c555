"""The load itself: one request measured, and the closed and open loops that send them.

Closed loop: `concurrency` workers, each sending its next request when the last one ends.
Open loop: requests start at scheduled times (Poisson or constant arrivals), whatever the answers
do, and every latency is measured from the scheduled time, so a stall cannot hide behind the
requests it delayed (coordinated omission).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from yarl import URL

from .stats import LIMIT_HEADERS, Recorder, us
from .workload import Workload

MAX_RETRY_AFTER_S = 60.0  # the longest wait --respect-retry-after honours
MAX_RETRIES = 2  # as the openai SDK
ERROR_BODY_BYTES = 4096


@dataclass(frozen=True, kw_only=True)
class Target:
    label: str
    base_url: str
    headers: dict[str, str]


@dataclass(kw_only=True)
class Bounds:
    """When a round ends: at `deadline` (perf_counter) or after `requests` requests, whichever first."""

    deadline: float
    requests: int | None
    stop: asyncio.Event


@dataclass(frozen=True, kw_only=True)
class Arrivals:
    rate: float  # requests per second
    poisson: bool
    burstiness: float = 1.0  # gamma shape: 1 is Poisson, below 1 burstier, above 1 steadier

    def gaps(self, rng: random.Random) -> itertools.count[int] | Any:
        if not self.poisson:
            return itertools.repeat(1 / self.rate)
        shape, scale = self.burstiness, 1 / (self.rate * self.burstiness)
        return (rng.gammavariate(shape, scale) for _ in itertools.count())


class Client:
    """Sends one workload to one target and records each request into the target's recorder."""

    def __init__(
        self, session: aiohttp.ClientSession, target: Target, *, workload: Workload, rec: Recorder, respect_retry: bool
    ) -> None:
        self.session, self.workload, self.rec = session, workload, rec
        self.url = URL(target.base_url.rstrip("/") + workload.path)  # parsed once, not per request
        self.headers = {"Content-Type": "application/json", **target.headers}
        self.respect_retry = respect_retry
        self.bodies = itertools.cycle(workload.bodies)

    async def send(self, started: float, bounds: Bounds) -> None:
        """One request (with its 429 retries when asked), its latencies measured from `started`."""
        body = next(self.bodies)
        for attempt in range(MAX_RETRIES + 1):
            final = not self.respect_retry or attempt == MAX_RETRIES
            wait = await self.attempt(body, started, None if final else bounds.deadline)
            if wait is None:
                return
            await asyncio.sleep(wait)

    async def attempt(self, body: bytes, started: float, retry_until: float | None) -> float | None:
        """Returns the seconds to wait before a retry, or None when the request was recorded."""
        rec = self.rec
        try:
            async with self.session.post(self.url, data=body, headers=self.headers) as resp:
                if resp.status != 200:
                    return await self.refused(resp, retry_until)
                if self.workload.stream:
                    await self.stream(resp, started)
                else:
                    await self.whole(resp, started)
        except TimeoutError:
            rec.failure(time.perf_counter(), "timeout")
        except aiohttp.ClientConnectorError:
            rec.failure(time.perf_counter(), "connect_error")
        except aiohttp.ClientError:
            rec.failure(time.perf_counter(), "read_error")
        return None

    async def refused(self, resp: aiohttp.ClientResponse, retry_until: float | None) -> float | None:
        """Records a refusal, or for a 429 that may be retried before `retry_until`, returns the wait."""
        text = await resp.content.read(ERROR_BODY_BYTES)
        code = error_code(text)
        now = time.perf_counter()
        if resp.status == 429:
            retry_after = seconds(resp.headers.get("retry-after"))
            wait = min(MAX_RETRY_AFTER_S, retry_after if retry_after is not None else 1.0)
            retry = retry_until is not None and now + wait < retry_until
            limits = {h: resp.headers[h] for h in LIMIT_HEADERS if h in resp.headers}
            self.rec.rate_limited(retry_after, limits, retried=retry)
            if retry:
                return wait
        self.rec.failure(now, str(resp.status), code)
        return None

    async def whole(self, resp: aiohttp.ClientResponse, started: float) -> None:
        data = await resp.read()
        now = time.perf_counter()
        try:
            usage = orjson.loads(data).get("usage") or {}
        except (orjson.JSONDecodeError, AttributeError):
            self.rec.failure(now, "invalid_json")
            return
        self.rec.success(now, now - started, None, usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))

    async def stream(self, resp: aiohttp.ClientResponse, started: float) -> None:
        """Reads SSE as it arrives: first content, gaps between content events and between reads."""
        rec = self.rec
        name = b'"content":' if self.workload.endpoint == "chat" else b'"text":'
        itl, chunk_gap = rec.hist["itl"], rec.hist["chunk_gap"]
        first = last_read = last_content = 0.0
        events = 0
        pending = b""
        done = errored = False
        usage: dict[str, Any] = {}
        async for chunk in resp.content.iter_any():
            now = time.perf_counter()
            if last_read:
                chunk_gap.record_value(us(now - last_read))
            last_read = now
            pending += chunk
            cut = pending.rfind(b"\n\n")
            if cut < 0:
                continue
            whole, pending = pending[: cut + 2], pending[cut + 2 :]
            content = tokens(whole, name)
            if content > 0:
                if not first:
                    first = now
                    content -= 1
                else:
                    itl.record_value(us(now - last_content))
                    content -= 1
                if content:
                    itl.record_value(0, content)  # events that came in the same read
                last_content = now
                events += tokens(whole, name)
            if b'"usage":{' in whole:
                usage = last_usage(whole) or usage
            if b'data: {"error"' in whole:
                errored = True
            if b"data: [DONE]" in whole:
                done = True
        now = time.perf_counter()
        rec.streams["count"] += 1
        rec.streams["done" if done else "missing_done"] += 1
        if errored:
            rec.streams["error_events"] += 1
            rec.failure(now, "stream_error")
            return
        if not first:
            rec.failure(now, "no_content" if done else "cut_stream")
            return
        if not done:
            rec.failure(now, "cut_stream")
            return
        output = usage.get("completion_tokens") or events
        rec.success(now, now - started, first - started, usage.get("prompt_tokens", 0), output)


def tokens(events: bytes, name: bytes) -> int:
    """How many events carry a non-empty content (or text) string: one token each, for want of usage."""
    if name not in events:
        return 0
    found = 0
    for sep in (b'"', b' "'):  # compact JSON, and json.dumps's default ": "
        found += events.count(name + sep) - events.count(name + sep + b'"')
    return found


def last_usage(events: bytes) -> dict[str, Any] | None:
    for line in reversed(events.split(b"\n")):
        if line.startswith(b"data: {") and b'"usage":{' in line:
            try:
                usage = orjson.loads(line[6:]).get("usage")
            except orjson.JSONDecodeError:
                return None
            return usage if isinstance(usage, dict) else None
    return None


def error_code(body: bytes) -> str | None:
    """The OpenAI envelope's error code (or type), if the body is one."""
    try:
        error = orjson.loads(body).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    if not isinstance(error, dict):
        return None
    code = error.get("code") or error.get("type")
    return str(code)[:64] if code else None


def seconds(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


async def closed_loop(client: Client, concurrency: int, bounds: Bounds) -> None:
    sent = itertools.count()

    async def worker() -> None:
        while not bounds.stop.is_set() and time.perf_counter() < bounds.deadline:
            if bounds.requests is not None and next(sent) >= bounds.requests:
                return
            await client.send(time.perf_counter(), bounds)

    await run_until(bounds, [asyncio.ensure_future(worker()) for _ in range(concurrency)])


async def open_loop(client: Client, arrivals: Arrivals, max_concurrency: int | None, bounds: Bounds) -> None:
    """Starts requests at their scheduled times; with max_concurrency, late ones queue (and it shows)."""
    rng = random.Random()
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    tasks: set[asyncio.Future[None]] = set()

    async def one(scheduled: float) -> None:
        if gate is None:
            await client.send(scheduled, bounds)
            return
        async with gate:
            await client.send(scheduled, bounds)

    async def schedule() -> None:
        at = time.perf_counter()
        for n, gap in enumerate(arrivals.gaps(rng)):
            if bounds.requests is not None and n >= bounds.requests:
                return
            at += gap
            if at >= bounds.deadline:
                return
            delay = at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if bounds.stop.is_set():
                return
            task = asyncio.ensure_future(one(at))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    scheduler = asyncio.ensure_future(schedule())
    await run_until(bounds, [scheduler])
    if tasks:
        await run_until(bounds, list(tasks))


async def run_until(bounds: Bounds, tasks: list[asyncio.Future[None]]) -> None:
    """Waits for the tasks (requests in flight at the deadline finish, each within the client's
    timeout); on stop (Ctrl-C) cancels them, and what they had not finished is not counted."""
    stop: asyncio.Future[Any] = asyncio.ensure_future(bounds.stop.wait())
    try:
        pending: set[asyncio.Future[Any]] = set(tasks)
        while pending and not bounds.stop.is_set():
            _, pending = await asyncio.wait([*pending, stop], return_when=asyncio.FIRST_COMPLETED)
            pending.discard(stop)
    finally:
        stop.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
