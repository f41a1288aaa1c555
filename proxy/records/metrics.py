"""Prometheus metrics, recorded once per request from its RequestRecord.

Labels stay bounded: models and providers come from config, anything else is
"other". With --workers N, PROMETHEUS_MULTIPROC_DIR is set before the workers
start and /metrics aggregates their files.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.utils import floatToGoString

from ..http.errors import UpstreamAuthError
from .record import RequestRecord

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TTFB_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
BUCKET_NAMES = tuple(floatToGoString(b) for b in DURATION_BUCKETS)  # type: ignore[no-untyped-call]
OTHER = "other"
CLIENT_CLOSED = 499  # nginx's code for a client that left before the status line


@dataclass(frozen=True, slots=True)
class PoolStats:
    """One provider's connection pool as sampled for the gauges (request.upstream.Sessions.pool_stats)."""

    in_use: int
    idle: int
    waiting: int  # requests waiting for a free connection: the pool is too small for the load


def latency_bucket(seconds: float) -> str:
    """The `le` of the duration histogram bucket this latency is counted in."""
    i = bisect.bisect_left(DURATION_BUCKETS, seconds)
    return BUCKET_NAMES[i] if i < len(BUCKET_NAMES) else "+Inf"


def multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "sluicegate_requests", "Requests answered", ["route", "model", "provider", "status"], registry=r
        )
        self.duration = Histogram(
            "sluicegate_request_duration_seconds", "Time from request to the last byte of the answer",
            ["route", "provider", "stream"], buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.ttfb = Histogram(
            "sluicegate_time_to_first_byte_seconds", "Time from request to the first byte of the answer body",
            ["route", "provider"], buckets=TTFB_BUCKETS, registry=r,
        )  # fmt: skip
        self.overhead = Histogram(
            "sluicegate_overhead_seconds", "Time in the gateway before the upstream request is sent",
            ["route"], buckets=OVERHEAD_BUCKETS, registry=r,
        )  # fmt: skip
        self.tokens = Counter("sluicegate_tokens", "Tokens used", ["model", "provider", "type"], registry=r)
        self.cost = Counter(
            "sluicegate_cost", "Cost of the tokens used, in the [[prices]] currency", ["model", "provider"], registry=r
        )
        self.ratelimited = Counter(
            "sluicegate_ratelimited", "Requests refused by a rate limit", ["scope", "limit"], registry=r
        )
        self.upstream_errors = Counter(
            "sluicegate_upstream_errors", "Failed upstream attempts", ["provider", "reason"], registry=r
        )
        self.upstream_auth_errors = Counter(
            "sluicegate_upstream_auth_errors", "Upstream attempts refused for the gateway's own credential (401/403)",
            ["provider"], registry=r,
        )  # fmt: skip
        self.inflight = Gauge(
            "sluicegate_inflight_requests", "Requests in progress", registry=r, multiprocess_mode="livesum"
        )
        self.active_streams = Gauge(
            "sluicegate_active_streams", "Streams being relayed", registry=r, multiprocess_mode="livesum"
        )
        self.events_dropped = Counter("sluicegate_events_dropped", "Event records dropped: queue full", registry=r)
        self.limiter_errors = Counter(
            "sluicegate_limiter_errors", "Redis calls that failed, timed out or were skipped by the open circuit",
            registry=r,
        )  # fmt: skip
        self.limiter_circuit_open = Gauge(
            "sluicegate_limiter_circuit_open", "1 while Redis calls are skipped after repeated failures, per worker",
            registry=r, multiprocess_mode="livesum",
        )  # fmt: skip
        self.settles_lost = Counter(
            "sluicegate_limiter_settles_lost", "Settles given up: Redis away past the owed limit, or at a stop",
            registry=r,
        )  # fmt: skip
        self.pool_waits = Counter(
            "sluicegate_upstream_pool_waits", "Requests that waited for a free connection to their provider",
            ["provider"], registry=r,
        )  # fmt: skip
        # Sampled (every few seconds, and at each scrape of this worker), not counted per request.
        self.upstream_connections = Gauge(
            "sluicegate_upstream_connections", "Connections in each provider's pool (sampled)",
            ["provider", "state"], registry=r, multiprocess_mode="livesum",
        )  # fmt: skip
        self.pool_waiting = Gauge(
            "sluicegate_upstream_pool_waiting", "Requests waiting for a free connection to their provider (sampled)",
            ["provider"], registry=r, multiprocess_mode="livesum",
        )  # fmt: skip
        self.loop_tasks = Gauge(
            "sluicegate_event_loop_tasks", "asyncio tasks alive (sampled)", registry=r, multiprocess_mode="livesum"
        )
        self.event_queue = Gauge(
            "sluicegate_event_queue_depth", "Event records waiting to be written (sampled)",
            registry=r, multiprocess_mode="livesum",
        )  # fmt: skip
        self.settles_owed = Gauge(
            "sluicegate_limiter_settles_owed", "Settles waiting for Redis to answer again (sampled)",
            registry=r, multiprocess_mode="livesum",
        )  # fmt: skip
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        """metric.labels(...) takes a lock and validates each time; label sets are few, so keep them."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe(self, record: RequestRecord, models: Collection[str], providers: Collection[str]) -> None:
        route = record.route
        model = record.model if record.model is not None and record.model in models else OTHER
        provider = record.provider if record.provider is not None and record.provider in providers else OTHER
        child = self._child
        child(self.requests, route, model, provider, str(record.status or CLIENT_CLOSED)).inc()
        child(self.duration, route, provider, "true" if record.stream else "false").observe(record.latency_s)
        if record.first_byte_at is not None:
            child(self.ttfb, route, provider).observe(record.first_byte_at - record.started)
        if record.upstream_sent_at is not None and record.body_read_at is not None:
            child(self.overhead, route).observe(record.upstream_sent_at - record.body_read_at)
        if record.prompt_tokens:
            child(self.tokens, model, provider, "prompt").inc(record.prompt_tokens)
        if record.completion_tokens:
            child(self.tokens, model, provider, "completion").inc(record.completion_tokens)
        if record.cost:
            child(self.cost, model, provider).inc(record.cost)
        if record.ratelimit is not None:
            child(self.ratelimited, *record.ratelimit).inc()
        for failed_provider, reason in record.failures:
            label = failed_provider if failed_provider in providers else OTHER
            child(self.upstream_errors, label, reason).inc()
            if reason == UpstreamAuthError.reason:
                child(self.upstream_auth_errors, label).inc()

    def sample_runtime(self, pools: Mapping[str, PoolStats], tasks: int, queued: int, owed: int = 0) -> None:
        for provider, pool in pools.items():
            self._child(self.upstream_connections, provider, "in_use").set(pool.in_use)
            self._child(self.upstream_connections, provider, "idle").set(pool.idle)
            self._child(self.pool_waiting, provider).set(pool.waiting)
        self.loop_tasks.set(tasks)
        self.event_queue.set(queued)
        self.settles_owed.set(owed)

    def exposition(self) -> bytes:
        if multiprocess():
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)
