"""What is left behind after each request: the record filled along the path."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    method: str
    route: str = "other"
    started: float = 0.0  # perf_counter
    key: str | None = None  # masked
    key_name: str | None = None
    group: str | None = None
    model: str | None = None
    provider: str | None = None
    upstream_model: str | None = None
    stream: bool = False
    status: int = 0
    error: str | None = None
    upstream_sent_at: float | None = None
    first_byte_at: float | None = None
    ended_at: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    attempts: int = 0
    client_disconnected: bool = False

    @classmethod
    def start(cls, request_id: str, method: str) -> RequestRecord:
        return cls(request_id=request_id, method=method, started=time.perf_counter())
