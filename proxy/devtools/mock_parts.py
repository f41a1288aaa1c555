"""The mock upstream's parts: its options and knobs, what it logs of each request, and the exchange
that answers one request (see mock_upstream.py for the server)."""

from __future__ import annotations

import gzip
import hashlib
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

TIMING_KNOBS = ("chunks", "chunk-delay-ms", "ttfb-ms", "slow-chunk")
FAULT_KNOBS = ("status", "hang", "reset-after", "reset-mid-event", "split-events", "garbage", "gzip", "big-event")
USAGE_KNOBS = ("cached-tokens",)
KNOBS = TIMING_KNOBS + FAULT_KNOBS + USAGE_KNOBS
OFF = ("", "none", "off")
HANG_LIMIT_S = 600.0
BIG_EVENT_LIMIT = 64 << 20
LOG_SIZE = 1000


@dataclass(frozen=True)
class MockOptions:
    host: str = "127.0.0.1"
    port: int = 8001
    chunks: int = 8
    chunk_delay_ms: float = 20.0
    ttfb_ms: float = 0.0
    models: tuple[str, ...] = ("mock-chat", "mock-embed")
    name: str = "mock"
    api_key: str | None = None


@dataclass
class MockRecord:
    id: str
    path: str
    raw_path: str
    method: str
    headers: dict[str, str]
    started_at: float
    body: Any = None
    stream: bool = False
    headers_sent_at: float | None = None
    chunk_sent_at: list[float] = field(default_factory=list)
    ended_at: float | None = None
    outcome: str = "in_progress"
    disconnected_at: float | None = None

    def finish(self, outcome: str) -> None:
        # A late cancellation must not relabel a request that already ended.
        if self.outcome == "in_progress":
            self.outcome = outcome
            self.ended_at = time.time()
            if outcome == "disconnected":
                self.disconnected_at = self.ended_at


@dataclass(frozen=True)
class Knobs:
    chunks: int
    chunk_delay_ms: float
    ttfb_ms: float
    slow_chunk: tuple[int, float] | None = None
    status: int | None = None
    hang: bool = False
    reset_after: int | None = None
    reset_mid_event: int | None = None  # like reset_after, but half of the next event goes out first
    split_events: bool = False  # every event in two writes 5 ms apart, as TCP may deliver it
    garbage: bool = False
    gzip: bool = False  # Content-Encoding: gzip whatever the request's Accept-Encoding, as some CDNs do
    big_event: int | None = None  # one extra stream event whose data: line is this many bytes
    big_event_late: bool = False  # ... sent after the finish event, as a second choice may still stream
    cached_tokens: int | None = None  # reported as usage.prompt_tokens_details.cached_tokens (at most the prompt)


def _flag(raw: Mapping[str, str], knob: str) -> bool:
    return raw.get(knob, "0").strip().lower() in ("1", "true", "yes")


def resolve_knobs(headers: Mapping[str, str], faults: Mapping[str, str], options: MockOptions) -> Knobs:
    """Merge header knobs over global faults over options; ValueError if bad."""
    raw = dict(faults)
    raw.update({k: headers[f"x-mock-{k}"] for k in KNOBS if f"x-mock-{k}" in headers})
    # "none"/"off" lets one request opt out of a global fault.
    raw = {k: v for k, v in raw.items() if v.strip().lower() not in OFF}
    status = int(raw["status"]) if "status" in raw else None
    if status is not None and not 200 <= status <= 599:
        raise ValueError(f"status must be within 200-599, got {status}")
    hang = raw.get("hang", "").strip().lower()
    if hang not in ("", "0", "headers"):
        raise ValueError(f"unsupported hang mode {hang!r}, only 'headers'")
    slow_chunk = None
    if "slow-chunk" in raw:
        index, _, delay = raw["slow-chunk"].partition(":")
        slow_chunk = (int(index), float(delay))
    size, _, where = raw.get("big-event", "").partition(":")
    big_event = int(size) if size else None
    if big_event is not None and not 0 < big_event <= BIG_EVENT_LIMIT:
        raise ValueError(f"big-event must be within 1-{BIG_EVENT_LIMIT} bytes, got {big_event}")
    if where not in ("", "after-finish"):
        raise ValueError(f"unsupported big-event place {where!r}, only 'after-finish'")
    return Knobs(
        chunks=max(0, int(raw.get("chunks", options.chunks))),
        chunk_delay_ms=float(raw.get("chunk-delay-ms", options.chunk_delay_ms)),
        ttfb_ms=float(raw.get("ttfb-ms", options.ttfb_ms)),
        slow_chunk=slow_chunk,
        status=status,
        hang=hang == "headers",
        reset_after=int(raw["reset-after"]) if "reset-after" in raw else None,
        reset_mid_event=int(raw["reset-mid-event"]) if "reset-mid-event" in raw else None,
        split_events=_flag(raw, "split-events"),
        garbage=_flag(raw, "garbage"),
        gzip=_flag(raw, "gzip"),
        big_event=big_event,
        big_event_late=where == "after-finish",
        cached_tokens=max(0, int(raw["cached-tokens"])) if "cached-tokens" in raw else None,
    )


def error_envelope(message: str, code: str, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def json_response(payload: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(payload),
        content_type="application/json",
        headers=headers,
    )


def count_words(value: Any) -> int:
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(count_words(item) for item in value)
    if isinstance(value, dict):
        # Multimodal content parts keep their words under "text".
        return count_words(value.get("text"))
    return 0


def fake_embedding(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [round(byte / 127.5 - 1.0, 6) for byte in digest[:8]]


def sse(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def big_event(size: int, event_with: Callable[[str], bytes]) -> bytes:
    """A content event padded with "x" so its data: line is `size` bytes (or as short as it can be)."""
    bare = len(event_with("")) - 2
    return event_with("x" * max(0, size - bare))


@dataclass
class MockExchange:
    """One /v1 request being answered, with its log entry."""

    request: web.Request
    record: MockRecord
    body: dict[str, Any] = field(default_factory=dict)
    gzip: bool = False

    async def send(self, resp: web.Response) -> web.Response:
        if self.gzip and isinstance(resp.body, bytes):
            resp.body = gzip.compress(resp.body)
            resp.headers["Content-Encoding"] = "gzip"
        # Preparing here rather than returning the response to aiohttp lets
        # the log say when the headers actually left.
        await resp.prepare(self.request)
        self.record.headers_sent_at = time.time()
        await resp.write_eof()
        self.record.finish("completed" if resp.status < 400 else "error")
        return resp

    async def reply(self, payload: Any) -> web.Response:
        return await self.send(json_response(payload))

    async def fail(self, status: int, message: str, code: str, kind: str = "invalid_request_error") -> web.Response:
        headers = {"retry-after": "1"} if status == 429 else None
        error = error_envelope(message, code, kind)
        return await self.send(json_response(error, status, headers))

    def reset(self) -> None:
        # abort() drops the socket without the terminating chunk, so the
        # client sees a truncated body rather than a clean end of stream.
        if self.request.transport is not None:
            self.request.transport.abort()
        self.record.finish("reset")


Route = Callable[[MockExchange, Knobs], Awaitable[web.StreamResponse]]
