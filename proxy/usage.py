"""Token usage from upstream answers, read without holding bytes back.

A stream is forwarded chunk by chunk as it arrives. The scanner only looks at
events that mention "usage" (one memmem per chunk on the fast path), keeps the
unfinished tail of the current event for parsing, and, when the gateway itself
asked for include_usage, cuts the usage-only event out of the chunk that
carries it so the client never sees an event it did not ask for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

USAGE_MARK = b'"usage"'
# An event ends at a blank line; SSE allows LF and CRLF line ends.
EVENT_END = re.compile(rb"\r?\n\r?\n")
MAX_TAIL_BYTES = 1 << 20  # an event larger than this is not scanned


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def estimate(cls, request_bytes: int, content_events: int) -> Usage:
        """For a stream cut short before its usage event: ~4 bytes a prompt token, one token an event."""
        prompt = max(1, request_bytes // 4)
        return cls(prompt, content_events, prompt + content_events)

    @classmethod
    def from_json(cls, usage: Any) -> Usage | None:
        if not isinstance(usage, dict):
            return None
        prompt = _int(usage.get("prompt_tokens"))
        completion = _int(usage.get("completion_tokens"))
        total = _int(usage.get("total_tokens")) or prompt + completion
        return cls(prompt, completion, total)


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def usage_from_body(body: bytes) -> Usage | None:
    if USAGE_MARK not in body:
        return None
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return Usage.from_json(parsed.get("usage")) if isinstance(parsed, dict) else None


class StreamUsageScanner:
    def __init__(self, strip_usage_event: bool) -> None:
        self.strip_usage_event = strip_usage_event
        self.usage: Usage | None = None
        self.events = 0  # data: lines seen, for an estimate when no usage arrives
        self._tail = b""

    def feed(self, chunk: bytes) -> bytes:
        """Return the bytes of `chunk` to forward (the chunk itself, or less)."""
        self.events += chunk.count(b"data:")
        carried = len(self._tail)
        data = self._tail + chunk if carried else chunk
        lf, crlf = data.rfind(b"\n\n"), data.rfind(b"\n\r\n")
        end = max(lf + 2 if lf >= 0 else 0, crlf + 3 if crlf >= 0 else 0)
        if end == 0:
            self._tail = data if len(data) <= MAX_TAIL_BYTES else b""
            return chunk
        self._tail = data[end:] if len(data) - end <= MAX_TAIL_BYTES else b""
        if not _has_usage_object(data, end):
            return chunk
        return self._scan(data, end, carried, chunk)

    def _scan(self, data: bytes, end: int, carried: int, chunk: bytes) -> bytes:
        cut: list[tuple[int, int]] = []
        bounds = [m.end() for m in EVENT_END.finditer(data, 0, end)]
        if not bounds or bounds[-1] < end:
            bounds.append(end)
        start = 0
        for stop in bounds:
            event = data[start:stop]
            if _has_usage_object(event, len(event)):
                payload = _event_json(event)
                if isinstance(payload, dict):
                    usage = Usage.from_json(payload.get("usage"))
                    if usage is not None:
                        self.usage = usage
                        # Only an event wholly inside this chunk can still be withheld.
                        if self.strip_usage_event and payload.get("choices") == [] and start >= carried:
                            cut.append((start - carried, stop - carried))
            start = stop
        if not cut:
            return chunk
        kept = bytearray()
        pos = 0
        for a, b in cut:
            kept += chunk[pos:a]
            pos = b
        kept += chunk[pos:]
        return bytes(kept)


def _has_usage_object(data: bytes, end: int) -> bool:
    """True when some "usage" key before `end` holds an object: OpenAI sends "usage":null on every chunk."""
    at = data.find(USAGE_MARK, 0, end)
    while at >= 0:
        rest = data[at + len(USAGE_MARK) : at + len(USAGE_MARK) + 8].lstrip(b" \t:")
        if rest.startswith(b"{"):
            return True
        at = data.find(USAGE_MARK, at + 1, end)
    return False


def _event_json(event: bytes) -> Any:
    lines = [line[5:].strip() for line in event.splitlines() if line.startswith(b"data:")]
    if not lines:
        return None
    try:
        return orjson.loads(b"\n".join(lines))
    except orjson.JSONDecodeError:
        return None
