"""Token usage from upstream answers, read while the stream is forwarded.

A stream goes out chunk by chunk as it arrives. The scanner only parses events
whose "usage" holds an object (a memmem per chunk on the fast path) and keeps
the unfinished event at the end for parsing. When the gateway itself asked for
include_usage, the usage-only event must not reach the client: once an event
with a finish_reason has gone by, only that usage event and [DONE] can follow,
so from then on an unfinished event is held until its end is in and the
usage-only one is dropped. Content is never held. An answer compressed against
the gateway's wishes is read from a bounded decompressed copy.
"""

from __future__ import annotations

import re
import zlib
from collections import deque
from dataclasses import dataclass
from typing import Any

import orjson

USAGE_MARK = b'"usage"'
# An event ends at a blank line; SSE allows LF and CRLF line ends.
EVENT_END = re.compile(rb"\r?\n\r?\n")
# A "usage" key holding an object (OpenAI sends "usage":null on every chunk when asked for usage).
USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
FINISHED = re.compile(rb'"finish_reason"\s*:\s*"')
MAX_TAIL_BYTES = 1 << 20  # an event larger than this is not scanned
TAIL_BYTES = 8 * 1024  # without stripping, usage is read from at least the last this many bytes
# Of a passthrough answer (any shape: a Responses API object, an image's JSON, a stream): its usage
# sits before the fields that close it, which may be kilobytes (a Responses object's metadata).
PASSTHROUGH_TAIL_BYTES = 64 * 1024
FULL_PARSE_BYTES = 64 * 1024  # non-stream answers up to this size are parsed whole
INFLATE_LIMIT_BYTES = 16 << 20  # a compressed answer is inflated this far at most to read its usage
INFLATABLE = frozenset({"gzip", "x-gzip", "deflate"})


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0  # of the prompt tokens, those the provider served from its cache

    @classmethod
    def estimate(cls, request_bytes: int, content_events: int) -> Usage:
        """For an answer without usage: the prompt at about 4 bytes a token, one token an event."""
        prompt = prompt_estimate(request_bytes)
        return cls(prompt, content_events, prompt + content_events)

    @classmethod
    def from_json(cls, usage: Any) -> Usage | None:
        """OpenAI's usage object in either of its shapes: chat, completions and embeddings count
        prompt_tokens / completion_tokens, the Responses API (and image and audio answers) input_tokens /
        output_tokens. None when it holds no token count at all (an audio answer's {"seconds": 12})."""
        if not isinstance(usage, dict):
            return None
        if "input_tokens" in usage or "output_tokens" in usage:
            prompt, completion = usage.get("input_tokens"), usage.get("output_tokens")
            details = usage.get("input_tokens_details")
        else:
            prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
            details = usage.get("prompt_tokens_details")
        total = usage.get("total_tokens")
        # Written out, not in a loop over the three: this runs for every answer. -1: not a count (bools neither).
        prompt = prompt if type(prompt) is int and prompt >= 0 else -1
        completion = completion if type(completion) is int and completion >= 0 else -1
        total = total if type(total) is int and total >= 0 else -1
        if prompt < 0 and completion < 0:
            if total < 0:
                return None
            prompt = total  # a total alone (rerank, some embeddings): what was sent in
        prompt, completion = max(prompt, 0), max(completion, 0)
        cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else 0
        # A total below its parts is not believed: a budget is charged at least the parts.
        return cls(prompt, completion, max(total, prompt + completion), cached)


def prompt_estimate(request_bytes: int) -> int:
    """Prompt tokens of a request without reading it: about 4 bytes a token. What is charged when a provider
    reports no usage; never what is held (see prompts.prompt_bound)."""
    return max(1, request_bytes // 4)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _int(value: Any) -> int:
    return value if _is_count(value) else 0


class NotJson(ValueError):
    """An answer that should be JSON and is not."""


def usage_from_body(body: bytes) -> Usage | None:
    """Usage of a JSON answer; raises NotJson for one that is not JSON.

    Small answers are parsed whole. A large one (embeddings run to megabytes) is only
    checked for JSON's outline, and just its top-level usage object is parsed: a full
    parse would hold the event loop for tens of milliseconds.
    """
    if len(body) <= FULL_PARSE_BYTES:
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise NotJson(str(exc)) from exc
        return Usage.from_json(parsed.get("usage")) if isinstance(parsed, dict) else None
    if body.lstrip()[:1] not in (b"{", b"[") or body.rstrip()[-1:] not in (b"}", b"]"):
        raise NotJson("not a JSON object or array")
    at = body.rfind(USAGE_MARK)
    start = body.find(b"{", at, at + 64) if at >= 0 else -1
    end = _object_end(body, start) if start >= 0 else -1
    if end < 0:
        return None
    try:
        return Usage.from_json(orjson.loads(body[start:end]))
    except orjson.JSONDecodeError:
        return None


class Inflater:
    """A bounded decompressed copy of an answer the provider compressed although asked not to.

    The client gets the bytes as they came; this copy is only read for usage. It
    stops at INFLATE_LIMIT_BYTES, so a zip bomb costs that much memory and time at most.
    """

    def __init__(self, content_encoding: str) -> None:
        self.readable = content_encoding.strip().lower() in INFLATABLE
        self.broken = False  # not valid gzip or zlib data
        self.room = INFLATE_LIMIT_BYTES
        # 32 + 15: gzip or zlib framing, told apart by the header ("deflate" is zlib framed).
        self._z = zlib.decompressobj(wbits=47)

    @classmethod
    def of(cls, content_encoding: str | None) -> Inflater | None:
        """None for an answer that is not compressed."""
        if content_encoding is None or content_encoding.strip().lower() in ("", "identity"):
            return None
        return cls(content_encoding)

    @property
    def whole(self) -> bool:
        """Everything came out within the limit: the copy is the whole answer."""
        return self.readable and not self.broken and self._z.eof

    def feed(self, data: bytes) -> bytes:
        out = b""
        while data and self.readable and not self.broken and self.room > 0:
            try:
                part = self._z.decompress(data, self.room)
            except zlib.error:
                self.broken = True
                break
            self.room -= len(part)
            out += part
            data = b""
            if self._z.eof and self._z.unused_data:
                # Several gzip members one after the other are one valid answer.
                data = self._z.unused_data
                self._z = zlib.decompressobj(wbits=47)
        return out


def usage_from_answer(body: bytes, content_encoding: str | None) -> Usage | None:
    """usage_from_body of an answer as the provider sent it, compressed or not.

    A compressed answer too large to inflate, or in an encoding that cannot be
    read here (br, zstd), is passed on without its usage; a corrupt one is NotJson.
    """
    inflater = Inflater.of(content_encoding)
    if inflater is None:
        return usage_from_body(body)
    copy = inflater.feed(body)
    if inflater.broken:
        raise NotJson("the compressed answer is corrupt")
    return usage_from_body(copy) if inflater.whole else None


def _object_end(body: bytes, start: int) -> int:
    """Just past the object opening at `start` (usage objects are small: a plain scan)."""
    depth = 0
    in_string = False
    i = start
    while i < len(body) and i - start < 4096:
        c = body[i]
        if in_string:
            if c == 0x5C:  # backslash: skip the escaped byte
                i += 1
            elif c == 0x22:
                in_string = False
        elif c == 0x22:
            in_string = True
        elif c == 0x7B:
            depth += 1
        elif c == 0x7D:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return -1


class StreamUsageScanner:
    """Usage of a stream as it is forwarded; with strip_usage_event, the usage-only event is withheld.

    Without stripping nothing is ever held, so a chunk needs no look: it is counted and kept
    in a short tail (the last chunks, TAIL_BYTES or more), and usage is read from that tail
    when asked, at the end. Providers send usage in the last events, or in every event as a
    running total, so the last usage object of the tail is the stream's. Per chunk that is a
    count and an append: at thousands of chunks a second the scan was a few points of a core.
    """

    def __init__(self, strip_usage_event: bool, tail_bytes: int = TAIL_BYTES, sse: bool = True) -> None:
        """sse: False for an answer that is not an event stream (JSON, audio): its "data:" are not events."""
        self.strip_usage_event = strip_usage_event
        self.tail_limit = tail_bytes
        self.sse = sse
        self._usage: Usage | None = None
        self.events = 0  # data: lines seen, for an estimate when no usage arrives
        self._pending = b""  # the unfinished event at the end of what came so far
        self._sent = 0  # how many of its bytes already went to the client
        self._finished = False  # an event with a finish_reason went by
        self._oversized = False  # inside an event too large to keep: its bytes go out as they come
        self._tail: deque[bytes] = deque()  # without stripping: the last chunks, read for usage when asked
        self._tail_bytes = 0
        self._tail_read = True  # the tail has not changed since usage was last read from it

    @property
    def usage(self) -> Usage | None:
        if not self._tail_read:
            self._tail_read = True
            found = _last_usage(b"".join(self._tail))
            if found is not None:
                self._usage = found
        return self._usage

    @property
    def mid_event(self) -> bool:
        """Part of an event went out without its end: anything we add must start on a fresh line."""
        if self._tail:
            # Nothing is held without stripping: what went out ends where the stream so far ends.
            last = self._tail[-1][-4:]
            if len(last) < 4 and len(self._tail) > 1:
                last = (self._tail[-2] + last)[-4:]
            return _last_event_end(last) != len(last)
        return self._sent > 0 or self._oversized

    def feed(self, chunk: bytes) -> bytes:
        """Return the bytes to forward now: `chunk` itself on the fast path."""
        if self.sse:
            self.events += chunk.count(b"data:")
        if not self.strip_usage_event:
            if chunk:
                tail = self._tail
                tail.append(chunk)
                self._tail_bytes += len(chunk)
                while self._tail_bytes - len(tail[0]) >= self.tail_limit:
                    self._tail_bytes -= len(tail.popleft())
                self._tail_read = False
            return chunk
        if (
            # The common chunk: whole events, nothing held, no usage object, nothing to watch for.
            not self._pending
            and not self._oversized
            and chunk.endswith(b"\n\n")
            and not (self.strip_usage_event and (self._finished or FINISHED.search(chunk)))
            and not USAGE_OBJECT.search(chunk)
        ):
            return chunk
        sent = self._sent
        data = self._pending + chunk if self._pending else chunk
        end = _last_event_end(data)
        if self.strip_usage_event and not self._finished and FINISHED.search(data, 0, end):
            self._finished = True
        rest = len(data) - end
        # An event this large is neither parsed nor held: what was held of it goes out now.
        oversized = rest > MAX_TAIL_BYTES or (self._oversized and end == 0)
        hold = self._finished and self.strip_usage_event and not oversized
        scan = _has_usage_object(data, end)
        self._oversized = oversized
        if hold:
            self._pending, self._sent = data[end:], (sent if end == 0 else 0)
        else:
            self._pending, self._sent = (b"", 0) if oversized else (data[end:], rest)
            if not scan:
                return chunk if sent == len(data) - len(chunk) else data[sent:]
        out = self._scan(data, end, sent) if scan else data[sent:end]
        if not hold:
            out += data[max(end, sent) :]
        return chunk if out == chunk else out

    def flush(self) -> bytes:
        """At the end of the stream: held bytes that never got their event end."""
        held = self._pending[self._sent :]
        self._pending, self._sent = b"", 0
        return held

    def _scan(self, data: bytes, end: int, sent: int) -> bytes:
        """data[sent:end] without the usage-only event, reading usage on the way."""
        kept = bytearray()
        start = 0
        for stop in _event_ends(data, end):
            event = data[start:stop]
            cut = False
            if _has_usage_object(event, len(event)):
                payload = _event_json(event)
                if isinstance(payload, dict):
                    usage = Usage.from_json(payload.get("usage"))
                    if usage is not None:
                        self._usage = usage
                        # An event part of which already went out cannot be withheld.
                        cut = self.strip_usage_event and payload.get("choices") == [] and start >= sent
            if not cut and stop > sent:
                kept += data[max(start, sent) : stop]
            start = stop
        return bytes(kept)


def _last_usage(tail: bytes) -> Usage | None:
    """The last whole usage object in a stream's or an answer's tail, looked for from the end.

    Read as an object, wherever it sits: at the top of a chat chunk, inside the `response` of a
    Responses API `response.completed` event (an event that repeats the whole answer, so its start
    may be long gone from the tail), at the end of a JSON answer. One cut off at the end is skipped.
    """
    at = tail.rfind(USAGE_MARK)
    while at >= 0:
        found = USAGE_OBJECT.match(tail, at)
        if found is not None:
            start = found.end() - 1
            end = _object_end(tail, start)
            if end > 0:
                try:
                    usage = Usage.from_json(orjson.loads(tail[start:end]))
                except orjson.JSONDecodeError:
                    usage = None
                if usage is not None:
                    return usage
        at = tail.rfind(USAGE_MARK, 0, at)
    return None


def _last_event_end(data: bytes, before: int | None = None) -> int:
    """Just past the last blank line in data (ending before `before`), or 0."""
    lf, crlf = data.rfind(b"\n\n", 0, before), data.rfind(b"\n\r\n", 0, before)
    return max(lf + 2 if lf >= 0 else 0, crlf + 3 if crlf >= 0 else 0)


def _event_ends(data: bytes, end: int) -> list[int]:
    bounds = [m.end() for m in EVENT_END.finditer(data, 0, end)]
    if end and (not bounds or bounds[-1] < end):
        bounds.append(end)
    return bounds


def _has_usage_object(data: bytes, end: int) -> bool:
    """True when some "usage" key before `end` holds an object: OpenAI sends "usage":null on every chunk."""
    return USAGE_OBJECT.search(data, 0, end) is not None


def _event_json(event: bytes) -> Any:
    lines = [line[5:].strip() for line in event.splitlines() if line.startswith(b"data:")]
    if not lines:
        return None
    try:
        return orjson.loads(b"\n".join(lines))
    except orjson.JSONDecodeError:
        return None
