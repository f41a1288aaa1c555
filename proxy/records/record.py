"""The record filled along a request's path: what events and metrics are made of.

Data only, like hypercorn's protocol/events.py: the modules that fill it and the sink
that writes it import it from here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ..redact import clip


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
    # Nothing billed costs 0; usage with no price for its model, None. See charges.py.
    cost: float | None = 0.0
    currency: str | None = None  # the deployment's, from [[prices]]
    usage_source: str = "none"  # where the charged tokens came from: "provider", "estimated" or "none"
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
            "cost": self.cost,
            "currency": self.currency,
            "usage_source": self.usage_source,
            "attempts": self.attempts,
            "client_disconnected": self.client_disconnected,
        }
