"""The ASGI app: `Gateway` reads each request's head and hands it to dispatch (ops/dispatch.py), and its
lifespan opens and closes what a worker holds (the upstream sessions, the limiter, the event sink)."""

from __future__ import annotations

import asyncio
import gc
import logging
import time

from starlette.types import Receive, Scope, Send

from .config.settings import ConfigError, KeySettings, Settings, load_settings
from .http.asgi import FAST_SEND
from .http.errors import GatewayError, RateLimited
from .http.head import CLOSE, read_head
from .limits.limiter import Limiter
from .ops.dispatch import dispatch
from .ops.model_list import ModelLists
from .ops.own_routes import answer_open, own_routes
from .ops.routes import Access
from .records.events import EventSink
from .records.metrics import Metrics, latency_bucket
from .records.record import RequestRecord
from .request import pools
from .request.exchange import AnswerState, Exchange
from .request.relay import ClientGone
from .request.runtime import Runtime
from .request.upstream import Sessions

log = logging.getLogger("sluicegate")

RUNTIME_SAMPLE_S = 5.0
# Young objects are collected every this many net allocations. With 1,000 streams open, the
# default (700) ran passes of 20-100 ms several times a second: TTFB p90 / p99 64 / 145 ms,
# against 13 / 31 ms with this and 7 / 22 ms with no automatic collection at all.
GC_YOUNG_THRESHOLD = 20_000


class Gateway:
    def __init__(self, settings: Settings, extra_keys: tuple[KeySettings, ...] = ()) -> None:
        """extra_keys: keys made at start-up (the demo's), kept across config reloads."""
        self.extra_keys = extra_keys
        self.runtime = Runtime.build(settings.with_keys(*extra_keys))
        self.sessions: Sessions | None = None
        self.limiter: Limiter | None = None
        self.events: EventSink | None = None
        self.model_lists: ModelLists | None = None
        self.metrics = Metrics()
        self.started_at = int(time.time())
        self.draining = False
        self._sampler: asyncio.Task[None] | None = None
        self.routes = own_routes(self)

    def reload(self) -> bool:
        """Re-read the config file; a broken file keeps the old config."""
        source = self.runtime.settings.source
        try:
            settings = load_settings(source).with_keys(*self.extra_keys)
        except ConfigError as exc:
            log.error("config reload rejected, keeping the old config: %s", "; ".join(exc.problems))
            return False
        for section in ("redis", "events"):
            if getattr(settings, section) != getattr(self.runtime.settings, section):
                log.warning("[%s] changed: the new settings take effect after a restart", section)
        self.runtime = Runtime.build(settings)
        if self.events is not None:
            self.events.reopen()
        if self.model_lists is not None:
            self.model_lists.wake()
        log.info("config reloaded from %s", source)
        return True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.handle_http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self.lifespan(receive, send)

    async def lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    # Said plainly and fatal: hypercorn would otherwise serve on without the lifespan.
                    log.exception("start-up failed")
                    await send({"type": "lifespan.startup.failed", "message": f"start-up failed: {exc}"})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._sampler is not None:
                    self._sampler.cancel()
                if self.model_lists is not None:
                    await self.model_lists.close()
                if self.events is not None:
                    await self.events.close()
                if self.sessions is not None:
                    await self.sessions.close()
                if self.limiter is not None:
                    await self.limiter.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def startup(self) -> None:
        settings = self.runtime.settings
        self.sessions = Sessions(on_wait=self.pool_waited)
        self.limiter = Limiter(
            settings.redis,
            on_error=self.metrics.limiter_errors.inc,
            on_circuit=self.circuit_changed,
            on_lost=self.metrics.settles_lost.inc,
        )
        self.events = EventSink(settings.events, latency_bucket, self.metrics.events_dropped.inc, self.limiter.client)
        self.events.start()
        self._sampler = asyncio.create_task(self._sample_runtime())
        self.model_lists = ModelLists(self.sessions, lambda: self.runtime.settings)
        self.model_lists.start()
        for warning in settings.warnings:
            log.warning("%s", warning)
        await pools.check()
        problem = await self.limiter.ping()
        if problem is not None:
            then = "requests are admitted unchecked" if settings.redis.on_error == "allow" else "requests get 503"
            log.warning("limits are NOT enforced: Redis does not answer (%s); %s until it does", problem, then)
        # What exists now lives as long as the worker: keep it out of every later GC pass.
        gc.freeze()
        # The young generation less often than Python's 700 allocations (see GC_YOUNG_THRESHOLD).
        gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])

    async def _sample_runtime(self) -> None:
        """Pool sizes, tasks and the event queue, for /metrics: sampled, so requests pay nothing for them."""
        while True:
            self.sample_runtime()
            await asyncio.sleep(RUNTIME_SAMPLE_S)

    def sample_runtime(self) -> None:
        if self.sessions is not None and self.events is not None:
            owed = self.limiter.owed if self.limiter is not None else 0
            self.metrics.sample_runtime(
                self.sessions.pool_stats(), len(asyncio.all_tasks()), self.events.queue.qsize(), owed
            )

    def pool_waited(self, provider: str) -> None:
        self.metrics.pool_waits.labels(provider if provider in self.runtime.clients else "other").inc()

    def circuit_changed(self, is_open: bool) -> None:
        self.metrics.limiter_circuit_open.set(1 if is_open else 0)
        redis = self.runtime.settings.redis
        if is_open:
            log.warning(
                "Redis failed %d times in a row: for %gs no request waits on it (on_error = %s), then one probes",
                redis.circuit_failures, redis.circuit_cooldown_s, redis.on_error,
            )  # fmt: skip
        else:
            log.info("Redis answers again: limits are enforced")

    async def handle_http(self, scope: Scope, receive: Receive, send: Send) -> None:
        head = read_head(scope["headers"])
        extra_headers = [(b"x-request-id", head.request_id.encode())]
        if self.draining:
            # Keep-alive connections are retired one response at a time while the balancer
            # moves away, so few are left idle when the listener closes.
            extra_headers.extend(CLOSE)
        found = self.routes.find(scope["path"], self.runtime.settings.server.prefixes)
        if found is not None and found.row.access is Access.OPEN and head.refused is None:
            return await answer_open(found, scope, self.runtime, send, extra_headers=extra_headers)
        record = RequestRecord.start(head.request_id, scope["method"])
        fast = scope["extensions"].get(FAST_SEND) if "extensions" in scope else None
        ex = Exchange(send, record, extra_headers, self.metrics.active_streams, fast=fast)
        runtime = self.runtime
        record.currency = runtime.settings.prices.currency
        self.metrics.inflight.inc()
        try:
            await dispatch(self, scope, receive, ex, runtime=runtime, head=head, found=found)
        except GatewayError as err:
            if isinstance(err, RateLimited):
                record.ratelimit = (err.scope, err.limit)
            if ex.state is AnswerState.REQUEST:
                await ex.error(err)
        except ClientGone:
            record.client_disconnected = True
        except Exception:
            # Never a traceback to the client; the log line has no headers or body.
            log.exception("unhandled error in request %s", head.request_id)
            if ex.state is AnswerState.REQUEST:
                await ex.error(GatewayError("Internal error in the gateway."))
        finally:
            record.ended_at = time.perf_counter()
            ex.check_ended()
            self.metrics.inflight.dec()
            self.metrics.observe(record, runtime.model_labels, runtime.clients.keys())
            if self.events is not None:
                self.events.emit(record)


def create_app(settings: Settings, extra_keys: tuple[KeySettings, ...] = ()) -> Gateway:
    return Gateway(settings, extra_keys)
