"""Each fault end to end: a real `sluicegate serve`, the mock upstreams on real ports, a Redis of the module's own.

Every fault is judged the same way: the client's exact answer, exactly one event
record saying what happened, the counters that moved (by exact delta, and no
others), and a gateway that is fine afterwards. A request the gateway refuses
before any upstream attempt must not reach either mock. A new fault is a new row
in CASES; a request no HTTP client library would send (a body that stops, two
framings, a path it would normalise) goes out as raw bytes (`Case.wire`). Only
faults that need a different driver (a client that leaves, a budget held by
another request, a paused Redis) have their own test, built from the same checks.
"""

from __future__ import annotations

import gzip
import secrets
import signal
import socket
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.request.auth import key_digest, mask_key, new_key
from tests.conftest import Mock, Mocks, Proc, RedisServer, event_lines, free_port, send_raw, start_gateway

MESSAGES = [{"role": "user", "content": "hi"}]
REDIS_TIMEOUT_S = 4.0
CIRCUIT_FAILURES = 3
CIRCUIT_COOLDOWN_S = 2.0  # longer than the few fast requests the circuit test sends while it is open
BODY_TIMEOUT_S = 1.5
ANSWER_MARGIN_S = 3.0  # an answer that waits out a deadline comes within this after it
SMALL = 2048  # bytes: an error body with every client string in it cut to 256 characters
HUGE_MODEL = "gpt-5-" + "x" * 900_000
WRONG_PROVIDER_KEY = "sk-wrong-" + "w" * 40
RECORD_WAIT_S = 5.0  # records are written by a background task: poll this long at most
NO_SECOND_RECORD_S = 0.3  # and after the first shows up, this long more for a second one
LEFT_NOTICED_S = 1.5  # a client that left is noticed (record written, upstream closed) within this
BIG_LINE = 1 << 20
WATCHED = (
    "sluicegate_requests_total",
    "sluicegate_upstream_errors_total",
    "sluicegate_tokens_total",
    "sluicegate_ratelimited_total",
    "sluicegate_limiter_errors_total",
    "sluicegate_upstream_auth_errors_total",
)
MetricKey = tuple[str, tuple[tuple[str, str], ...]]


def sample(name: str, **labels: str) -> MetricKey:
    return name, tuple(sorted(labels.items()))


def served(model: str, provider: str, status: int, route: str = "/chat/completions") -> MetricKey:
    labels = {"route": route, "model": model, "provider": provider, "status": str(status)}
    return sample("sluicegate_requests_total", **labels)


def upstream_error(provider: str, reason: str) -> MetricKey:
    return sample("sluicegate_upstream_errors_total", provider=provider, reason=reason)


def upstream_auth_error(provider: str) -> MetricKey:
    return sample("sluicegate_upstream_auth_errors_total", provider=provider)


def ratelimited(scope: str, limit: str) -> MetricKey:
    return sample("sluicegate_ratelimited_total", scope=scope, limit=limit)


LIMITER_ERRORS = sample("sluicegate_limiter_errors_total")


def tokens(model: str, provider: str, prompt: int, completion: int) -> dict[MetricKey, float]:
    return {
        sample("sluicegate_tokens_total", model=model, provider=provider, type="prompt"): prompt,
        sample("sluicegate_tokens_total", model=model, provider=provider, type="completion"): completion,
    }


def request_body(model: str, stream: bool) -> bytes:
    return orjson.dumps({"model": model, "messages": MESSAGES, "stream": stream})


def envelope(code: str, message: str, kind: str = "api_error", param: str | None = None) -> dict[str, Any]:
    return {"message": message, "type": kind, "param": param, "code": code}


@dataclass(frozen=True)
class Answer:
    """What the client must get."""

    status: int
    error: dict[str, Any] | None = None  # the gateway's own envelope, before the request id goes in
    stream_error: dict[str, Any] | None = None  # the last event of a stream that broke off after its headers
    headers: dict[str, str] = field(default_factory=dict)
    check: Callable[[bytes], None] | None = None  # anything more about the raw body
    cut: bool = False  # the connection closes before the body's end: where no error event can be said
    waits: float | None = None  # the answer comes once this deadline has passed, not before and not long after


@dataclass(frozen=True)
class Case:
    """One fault: the request that provokes it, and everything it must leave behind."""

    id: str
    model: str
    answer: Answer
    record: dict[str, Any]  # fields the one event record must have
    moved: dict[MetricKey, float]  # every watched counter that moves, by how much
    stream: bool = False
    path: str = "/chat/completions"
    headers: dict[str, str] = field(default_factory=dict)  # x-mock-* knobs on the request
    faults: dict[str, dict[str, Any]] = field(default_factory=dict)  # global mock knobs, by provider
    # (header, key name) pairs, sent in this order; Authorization gets its "Bearer "; "stranger" is unknown.
    credentials: tuple[tuple[str, str], ...] = (("Authorization", "main"),)
    wire: Callable[[Matrix, str], bytes] | None = None  # the whole request as raw bytes, given its request id


def record(status: int, error: str | None, attempts: int, provider: str | None, **more: Any) -> dict[str, Any]:
    return {"status": status, "error": error, "attempts": attempts, "provider": provider, **more}


def sse_lines(raw: bytes) -> list[bytes]:
    assert raw.endswith(b"\n\n"), raw[-200:]
    return raw[:-2].split(b"\n\n")


def chat_text(lines: list[bytes]) -> str:
    text = ""
    for line in lines:
        if line != b"data: [DONE]":
            for choice in orjson.loads(line[len(b"data: ") :])["choices"]:
                text += choice["delta"].get("content") or ""
    return text


def gzip_json_answer(raw: bytes) -> None:
    answer = orjson.loads(gzip.decompress(raw))
    assert answer["choices"][0]["message"]["content"] == "[mock-a] tok0 tok1 tok2 tok3 tok4 tok5 "
    assert answer["usage"] == {"prompt_tokens": 1, "completion_tokens": 6, "total_tokens": 7}


def gzip_stream(raw: bytes) -> None:
    unpack = zlib.decompressobj(wbits=31)
    lines = sse_lines(unpack.decompress(raw))
    assert unpack.eof and not unpack.unused_data
    assert chat_text(lines) == "[mock-a] tok0 tok1 tok2 tok3 tok4 tok5 "
    assert lines[-1] == b"data: [DONE]"
    # Bytes the gateway cannot read are not edited: the usage-only event it asked for stays in.
    assert orjson.loads(lines[-2][len(b"data: ") :])["usage"]["total_tokens"] == 7


def one_big_line(size: int, at: int) -> Callable[[bytes], None]:
    """The stream with its one big line at index `at`, whole; the usage-only event still withheld."""

    def check(raw: bytes) -> None:
        lines = sse_lines(raw)
        big = [line for line in lines if len(line) > 1000]
        assert [len(line) for line in big] == [size]
        assert lines.index(big[0]) == at
        content = orjson.loads(big[0][len(b"data: ") :])["choices"][0]["delta"]["content"]
        assert content == "x" * len(content)
        assert chat_text([line for line in lines if line is not big[0]]) == "[mock-a] tok0 tok1 tok2 tok3 tok4 tok5 "
        assert lines[-1] == b"data: [DONE]"
        assert b'"choices":[]' not in raw

    return check


def gzip_stream_cut(raw: bytes) -> None:
    # What came is good compressed data up to the cut, with no error event pasted into it.
    lines = zlib.decompressobj(wbits=31).decompress(raw).split(b"\n\n")
    assert lines[-1] == b""
    assert chat_text(lines[:-1]) == "[mock-a] tok0 tok1 tok2 "


def mock_refusal(status: int) -> Callable[[bytes], None]:
    def check(raw: bytes) -> None:
        assert orjson.loads(raw) == {
            "error": envelope("mock_error", f"mock mock-a injected status {status}", "mock_error")
        }

    return check


def smaller_than(size: int) -> Callable[[bytes], None]:
    def check(raw: bytes) -> None:
        assert len(raw) < size, len(raw)

    return check


def chunked(body: bytes) -> bytes:
    return f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"


def wire(
    target: str = "/v1/chat/completions",
    extra: Sequence[tuple[str, str]] = (),
    body: bytes = request_body("alpha-chat", False),
    length: int | None = None,
) -> Callable[[Matrix, str], bytes]:
    """A request as raw bytes: WIRE_HEADERS headers, then `extra`, then `body`; Content-Length says
    `length` if given, else the body's."""

    def build(matrix: Matrix, request_id: str) -> bytes:
        headers = [
            ("Host", "gw"),
            ("Connection", "close"),
            ("Content-Type", "application/json"),
            *matrix.credentials(),
            ("X-Request-ID", request_id),
            ("Content-Length", str(len(body) if length is None else length)),
            *extra,
        ]
        lines = "".join(f"{name}: {value}\r\n" for name, value in headers)
        return f"POST {target} HTTP/1.1\r\n{lines}\r\n".encode("latin-1") + body

    return build


# Every `wire` request's own: Host, Connection, Content-Type, Authorization, X-Request-ID, Content-Length.
WIRE_HEADERS = 6


def refused(status: int, error: str, route: str = "other", **more: Any) -> dict[str, Any]:
    """The record of a request the gateway refused before choosing a provider or reading a model."""
    return record(status, error, 0, None, route=route, model=None, **more)


def two_credentials(what: str) -> dict[str, Any]:
    message = (
        f"Two credentials were sent: {what}. Send exactly one key, "
        "as 'Authorization: Bearer sk-...' or as 'X-API-Key: sk-...'."
    )
    return envelope("invalid_request", message, "invalid_request_error")


def auth_refused(provider: str, status: int) -> dict[str, Any]:
    message = (
        f"Provider '{provider}' rejected the gateway's own credential (HTTP {status}). "
        "Your API key is fine: the gateway's operators must fix the provider key or its access."
    )
    return envelope("upstream_auth_error", message)


def bad_path(problem: str) -> dict[str, Any]:
    return envelope("invalid_request", f"The path has {problem}", "invalid_request_error")


CASES = [
    Case(
        "connection-refused",
        "dead-chat",
        Answer(502, envelope("upstream_error", "Cannot connect to provider 'dead'.")),
        record(502, "upstream_error", 1, "dead"),
        {served("dead-chat", "dead", 502): 1, upstream_error("dead", "connect_error"): 1},
    ),
    Case(
        "hang-before-headers",
        "alpha-chat",
        Answer(504, envelope("upstream_timeout", "Provider 'alpha' sent no response within 1s.")),
        record(504, "upstream_timeout", 1, "alpha"),
        {served("alpha-chat", "alpha", 504): 1, upstream_error("alpha", "first_byte_timeout"): 1},
        headers={"x-mock-hang": "headers"},
    ),
    Case(
        "reset-mid-stream",
        "alpha-chat",
        Answer(200, stream_error=envelope("upstream_error", "Provider 'alpha' broke off the response.")),
        # A stream cut short is charged an estimate: a token per event seen (the role event and 3 tokens).
        record(200, "upstream_error", 1, "alpha", completion_tokens=4),
        {
            served("alpha-chat", "alpha", 200): 1,
            upstream_error("alpha", "upstream_error"): 1,
            **tokens("alpha-chat", "alpha", len(request_body("alpha-chat", True)) // 4, 4),
        },
        stream=True,
        headers={"x-mock-reset-after": "3"},
    ),
    Case(
        "invalid-json",
        "alpha-chat",
        Answer(502, envelope("upstream_error", "Provider 'alpha' answered something that is not JSON.")),
        record(502, "upstream_error", 1, "alpha"),
        {served("alpha-chat", "alpha", 502): 1, upstream_error("alpha", "bad_json"): 1},
        headers={"x-mock-garbage": "1"},
    ),
    Case(
        "gzip-body",
        "alpha-chat",
        Answer(200, headers={"content-encoding": "gzip"}, check=gzip_json_answer),
        record(200, None, 1, "alpha", prompt_tokens=1, completion_tokens=6, total_tokens=7),
        {served("alpha-chat", "alpha", 200): 1, **tokens("alpha-chat", "alpha", 1, 6)},
        headers={"x-mock-gzip": "1"},
    ),
    Case(
        "gzip-stream",
        "alpha-chat",
        Answer(200, headers={"content-encoding": "gzip", "content-type": "text/event-stream"}, check=gzip_stream),
        record(200, None, 1, "alpha", prompt_tokens=1, completion_tokens=6, total_tokens=7),
        {served("alpha-chat", "alpha", 200): 1, **tokens("alpha-chat", "alpha", 1, 6)},
        stream=True,
        headers={"x-mock-gzip": "1"},
    ),
    Case(
        "gzip-stream-reset",
        "alpha-chat",
        Answer(200, headers={"content-encoding": "gzip"}, check=gzip_stream_cut, cut=True),
        record(200, "upstream_error", 1, "alpha", completion_tokens=4),
        {
            served("alpha-chat", "alpha", 200): 1,
            upstream_error("alpha", "upstream_error"): 1,
            **tokens("alpha-chat", "alpha", len(request_body("alpha-chat", True)) // 4, 4),
        },
        stream=True,
        headers={"x-mock-gzip": "1", "x-mock-reset-after": "3"},
    ),
    Case(
        "sse-line-of-1mb",
        "alpha-chat",
        Answer(200, headers={"content-type": "text/event-stream"}, check=one_big_line(BIG_LINE, 1)),
        record(200, None, 1, "alpha", prompt_tokens=1, completion_tokens=6, total_tokens=7),
        {served("alpha-chat", "alpha", 200): 1, **tokens("alpha-chat", "alpha", 1, 6)},
        stream=True,
        headers={"x-mock-big-event": str(BIG_LINE)},
    ),
    Case(
        # After the finish event the gateway holds each event until its end, to withhold the
        # usage-only one; an event larger than it holds must still go out whole.
        "sse-line-of-2mb-after-finish",
        "alpha-chat",
        Answer(200, headers={"content-type": "text/event-stream"}, check=one_big_line(2 * BIG_LINE, 8)),
        record(200, None, 1, "alpha", prompt_tokens=1, completion_tokens=6, total_tokens=7),
        {served("alpha-chat", "alpha", 200): 1, **tokens("alpha-chat", "alpha", 1, 6)},
        stream=True,
        headers={"x-mock-big-event": f"{2 * BIG_LINE}:after-finish"},
    ),
    Case(
        "5xx-then-fallback",
        "mock-chat",
        Answer(200),
        record(200, None, 2, "beta", total_tokens=7),
        {
            served("mock-chat", "beta", 200): 1,
            upstream_error("alpha", "http_5xx"): 1,
            **tokens("mock-chat", "beta", 1, 6),
        },
        faults={"alpha": {"status": 503}},
    ),
    Case(
        # The provider's own limit: passed on as it came (SPEC: upstream 4xx pass through), so the
        # client backs off as told; it is not one of the gateway's limits, but ops sees the refusal.
        "429-single-provider",
        "alpha-chat",
        Answer(429, headers={"retry-after": "1"}, check=mock_refusal(429)),
        record(429, None, 1, "alpha", total_tokens=None),
        {served("alpha-chat", "alpha", 429): 1, upstream_error("alpha", "http_429"): 1},
        headers={"x-mock-status": "429"},
    ),
    Case(
        "429-passthrough-route",
        "alpha-chat",
        Answer(429, headers={"retry-after": "1"}, check=mock_refusal(429)),
        record(429, None, 1, "alpha", route="passthrough"),
        {served("alpha-chat", "alpha", 429, "passthrough"): 1, upstream_error("alpha", "http_429"): 1},
        path="/images/generations",
        headers={"x-mock-status": "429"},
    ),
    Case(
        "429-then-fallback",
        "mock-chat",
        Answer(200),
        record(200, None, 2, "beta", total_tokens=7),
        {
            served("mock-chat", "beta", 200): 1,
            upstream_error("alpha", "http_429"): 1,
            **tokens("mock-chat", "beta", 1, 6),
        },
        faults={"alpha": {"status": 429}},
    ),
    # The provider refuses the gateway's own credential: the client's key is fine, so never its 401.
    Case(
        "upstream-401-wrong-provider-key",
        "locked-chat",
        Answer(502, auth_refused("locked", 401)),
        record(502, "upstream_auth_error", 1, "locked"),
        {
            served("locked-chat", "locked", 502): 1,
            upstream_error("locked", "auth_error"): 1,
            upstream_auth_error("locked"): 1,
        },
    ),
    *(
        Case(
            f"upstream-{status}",
            "alpha-chat",
            Answer(502, auth_refused("alpha", status)),
            record(502, "upstream_auth_error", 1, "alpha"),
            {
                served("alpha-chat", "alpha", 502): 1,
                upstream_error("alpha", "auth_error"): 1,
                upstream_auth_error("alpha"): 1,
            },
            headers={"x-mock-status": str(status)},
        )
        for status in (401, 403)
    ),
    Case(
        "upstream-401-wrong-provider-key-then-fallback",
        "spare-chat",
        Answer(200),
        record(200, None, 2, "beta", total_tokens=7),
        {
            served("spare-chat", "beta", 200): 1,
            upstream_error("locked", "auth_error"): 1,
            upstream_auth_error("locked"): 1,
            **tokens("spare-chat", "beta", 1, 6),
        },
    ),
    Case(
        "upstream-403-then-fallback",
        "mock-chat",
        Answer(200),
        record(200, None, 2, "beta", total_tokens=7),
        {
            served("mock-chat", "beta", 200): 1,
            upstream_error("alpha", "auth_error"): 1,
            upstream_auth_error("alpha"): 1,
            **tokens("mock-chat", "beta", 1, 6),
        },
        faults={"alpha": {"status": 403}},
    ),
    # Client faults the gateway refuses before any upstream attempt.
    Case(
        "slow-body",
        "alpha-chat",
        Answer(
            408,
            envelope(
                "request_timeout",
                f"The request body did not arrive within {BODY_TIMEOUT_S:g}s.",
                "invalid_request_error",
            ),
            headers={"connection": "close"},
            waits=BODY_TIMEOUT_S,
        ),
        # Nothing is known of a request whose body never came: not even its key is looked at.
        refused(408, "request_timeout", key=None),
        {served("other", "other", 408, "other"): 1},
        wire=wire(body=b'{"mod', length=1000),
    ),
    *(
        Case(
            f"two-authorization-headers-valid-{'first' if valid_first else 'last'}",
            "alpha-chat",
            Answer(400, two_credentials("two Authorization headers with different values")),
            refused(400, "invalid_request", "/chat/completions", key=None),
            {served("other", "other", 400): 1},
            credentials=(("Authorization", "main"), ("Authorization", "stranger"))[:: 1 if valid_first else -1],
        )
        for valid_first in (True, False)
    ),
    *(
        Case(
            f"authorization-and-x-api-key-{order}",
            "alpha-chat",
            Answer(400, two_credentials("an Authorization header and an X-API-Key header with different keys")),
            refused(400, "invalid_request", "/chat/completions", key=None),
            {served("other", "other", 400): 1},
            credentials=pair,
        )
        for order, pair in (
            ("authorization-first", (("Authorization", "main"), ("X-API-Key", "limited"))),
            ("x-api-key-first", (("X-API-Key", "limited"), ("Authorization", "main"))),
        )
    ),
    *(
        Case(
            f"900kb-model-name-{name}",
            HUGE_MODEL,
            Answer(
                404,
                envelope(
                    "model_not_found",
                    f"The model '{HUGE_MODEL[:255]}…' does not exist on this gateway.",
                    "invalid_request_error",
                    "model",
                ),
                check=smaller_than(SMALL),
            ),
            record(404, "model_not_found", 0, None, route=route, model=HUGE_MODEL[:255] + "…"),
            {served("other", "other", 404, route): 1},
            path=path,
        )
        for name, route, path in (
            ("chat", "/chat/completions", "/chat/completions"),
            ("passthrough", "passthrough", "/images/generations"),
        )
    ),
    Case(
        "64kb-header",
        "alpha-chat",
        Answer(
            431,
            envelope(
                "request_header_fields_too_large",
                "The header 'x-big' is over 8192 bytes, the most for one header.",
                "invalid_request_error",
            ),
        ),
        refused(431, "request_header_fields_too_large", key=None),
        {served("other", "other", 431, "other"): 1},
        wire=wire(extra=[("X-Big", "a" * 65536)]),
    ),
    Case(
        "200-headers",
        "alpha-chat",
        Answer(
            431,
            envelope(
                "request_header_fields_too_large",
                f"The request has {WIRE_HEADERS + 200} headers; this gateway takes at most 100.",
                "invalid_request_error",
            ),
        ),
        refused(431, "request_header_fields_too_large", key=None),
        {served("other", "other", 431, "other"): 1},
        wire=wire(extra=[(f"X-Custom-{i}", str(i)) for i in range(200)]),
    ),
    Case(
        "transfer-encoding-and-content-length",
        "alpha-chat",
        Answer(
            400,
            envelope(
                "invalid_request", "The request has both Transfer-Encoding and Content-Length.", "invalid_request_error"
            ),
            headers={"connection": "close"},
        ),
        refused(400, "invalid_request", key=None),
        {served("other", "other", 400, "other"): 1},
        wire=wire(extra=[("Transfer-Encoding", "chunked")], body=chunked(request_body("alpha-chat", False)), length=5),
    ),
    # Passthrough paths that a provider might read as another path, sent with the provider pinned
    # and a model it serves, so that anything forwarded would reach mock-a.
    *(
        Case(
            f"passthrough-path-{name}",
            "alpha-chat",
            Answer(400, bad_path(problem)),
            refused(400, "invalid_request", "passthrough", key_name="main"),
            {served("other", "other", 400, "passthrough"): 1},
            wire=wire(target, [("X-AI-Provider", "alpha")]),
        )
        for name, target, problem in (
            (
                "empty-segment",
                "/v1//admin",
                "an empty segment ('//' or a trailing '/'); it is not forwarded. "
                "If the base URL ends in '/', drop that '/'.",
            ),
            ("nul", "/v1/a%00b", "the control character '\\x00' once decoded; it is not forwarded."),
            ("dot-dot-semicolon", "/v1/..;/x", "';' once decoded; it is not forwarded."),
        )
    ),
]


def matrix_config(mocks: Mocks, keys: dict[str, str], events: Path, dead_port: int) -> str:
    return f"""
[server]
bind = "127.0.0.1:9"
graceful_timeout_s = 5
body_timeout_s = {BODY_TIMEOUT_S}

[redis]
on_error = "allow"
timeout_s = {REDIS_TIMEOUT_S}
circuit_failures = {CIRCUIT_FAILURES}
circuit_cooldown_s = {CIRCUIT_COOLDOWN_S}

[events]
sink = "file"
path = "{events}"

[[providers]]
name = "alpha"
base_url = "{mocks.alpha.url}/v1"
api_key_env = "SG_TEST_ALPHA_KEY"
models = ["mock-chat", "alpha-chat"]
priority = 0
connect_timeout_s = 1
first_byte_timeout_s = 1
idle_timeout_s = 2

[[providers]]
name = "beta"
base_url = "{mocks.beta.url}/v1"
models = ["mock-chat", "beta-chat", "spare-chat"]
priority = 1
first_byte_timeout_s = 10

# mock-a with a key it does not take: the provider refuses the gateway's credential for real.
[[providers]]
name = "locked"
base_url = "{mocks.alpha.url}/v1"
api_key_env = "SG_TEST_WRONG_KEY"
models = ["locked-chat", "spare-chat"]
priority = 0

[[providers]]
name = "dead"
base_url = "http://127.0.0.1:{dead_port}/v1"
models = ["dead-chat"]
connect_timeout_s = 1

[[keys]]
name = "main"
sha256 = "{key_digest(keys["main"])}"

[[keys]]
name = "limited"
sha256 = "{key_digest(keys["limited"])}"
rpm = 100000

[[keys]]
name = "held"
sha256 = "{key_digest(keys["held"])}"
budget_tokens = 30

[[keys]]
name = "spent"
sha256 = "{key_digest(keys["spent"])}"
budget_tokens = 5
"""


@dataclass
class Matrix:
    proc: Proc
    keys: dict[str, str]
    events: Path
    mocks: dict[str, Mock]
    redis: RedisServer
    # For the checks (metrics, health, mock logs): one client, not a new one and its TLS setup each time.
    http: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=5))

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.proc.port}"

    def auth(self, key: str = "main") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[key]}"}

    def credentials(self, pairs: tuple[tuple[str, str], ...] = (("Authorization", "main"),)) -> list[tuple[str, str]]:
        """(header, key name) pairs as the client sends them."""
        return [
            (header, f"Bearer {self.keys[name]}" if header == "Authorization" else self.keys[name])
            for header, name in pairs
        ]

    def gauge(self, name: str) -> float:
        text = self.http.get(self.base + "/metrics").text
        return next(
            s.value for family in text_string_to_metric_families(text) for s in family.samples if s.name == name
        )

    def counters(self) -> dict[MetricKey, float]:
        text = self.http.get(self.base + "/metrics").text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name in WATCHED
        }

    def moved_since(self, before: dict[MetricKey, float]) -> dict[MetricKey, float]:
        after = self.counters()
        deltas = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in {*before, *after}}
        return {k: v for k, v in deltas.items() if v}

    def records(self, request_id: str) -> list[dict[str, Any]]:
        if not self.events.exists():
            return []
        needle = f'"request_id":"{request_id}"'.encode()
        return [orjson.loads(line) for line in event_lines(self.events) if needle in line]

    def one_record(
        self, request_id: str, within_s: float = RECORD_WAIT_S, quiet_s: float = NO_SECOND_RECORD_S
    ) -> dict[str, Any]:
        """quiet_s: how long to watch for a second record (0 when a caller already waited for it)."""
        deadline = time.monotonic() + within_s
        while not (found := self.records(request_id)):
            if time.monotonic() > deadline:
                raise AssertionError(f"no event record for {request_id} within {within_s}s")
            time.sleep(0.02)
        time.sleep(quiet_s)
        found = self.records(request_id)
        assert len(found) == 1, found
        return found[0]

    def reset_mocks(self) -> None:
        """Mock.reset, over the one client."""
        for mock in self.mocks.values():
            for what in ("faults", "requests"):
                self.http.delete(f"{mock.url}/_mock/{what}").raise_for_status()

    def upstream_ids(self) -> list[str]:
        """The request id of everything either mock has seen since its log was cleared."""
        return [e["id"] for m in self.mocks.values() for e in self.http.get(f"{m.url}/_mock/requests").json()]

    def assert_healthy(self) -> None:
        resp = self.http.get(self.base + "/healthz")
        assert resp.status_code == 200
        assert resp.json() == {"status": "ok"}
        gauges = {
            s.name: s.value
            for family in text_string_to_metric_families(self.http.get(self.base + "/metrics").text)
            for s in family.samples
        }
        assert gauges["sluicegate_inflight_requests"] == 0
        assert gauges["sluicegate_active_streams"] == 0
        assert gauges["sluicegate_limiter_circuit_open"] == 0


@pytest.fixture(scope="module")
def matrix_gateway(tmp_path_factory: pytest.TempPathFactory, mocks: Mocks) -> Iterator[Matrix]:
    tmp = tmp_path_factory.mktemp("fault-matrix")
    redis = RedisServer(free_port(), tmp / "redis.log").start()
    # "stranger" is well formed but not in the config: an unknown key.
    keys = {name: new_key() for name in ("main", "limited", "held", "spent", "stranger")}
    events = tmp / "events.jsonl"
    config = matrix_config(mocks, keys, events, free_port())
    try:
        proc = start_gateway(tmp, mocks, config, redis_url=redis.url, env={"SG_TEST_WRONG_KEY": WRONG_PROVIDER_KEY})
    except BaseException:
        redis.stop()
        raise
    matrix = Matrix(proc, keys, events, {"alpha": mocks.alpha, "beta": mocks.beta}, redis)
    try:
        yield matrix
    finally:
        matrix.http.close()
        proc.stop()
        if redis.proc is not None:
            redis.proc.send_signal(signal.SIGCONT)
        redis.stop()


@pytest.fixture
def matrix(matrix_gateway: Matrix) -> Iterator[Matrix]:
    matrix_gateway.reset_mocks()
    yield matrix_gateway
    matrix_gateway.reset_mocks()


def new_request_id(case: str) -> str:
    return f"fm-{case}-{secrets.token_hex(4)}"


@dataclass
class Received:
    status: int
    headers: httpx.Headers
    raw: bytes  # as it came over the wire, never decompressed by the client
    cut: bool  # the connection closed before the end of the body
    took: float  # seconds from sending the request to the end of the answer


def send(matrix: Matrix, case: Case, request_id: str) -> Received:
    if case.wire is not None:
        return send_wire(matrix, case.wire(matrix, request_id))
    # A list of pairs: httpx sends each, repeated names included, in this order.
    headers = [
        *matrix.credentials(case.credentials),
        *case.headers.items(),
        ("X-Request-ID", request_id),
        ("Content-Type", "application/json"),
    ]
    raw = b""
    cut = False
    started = time.monotonic()
    with httpx.stream(
        "POST", matrix.base + "/v1" + case.path, content=request_body(case.model, case.stream),
        headers=headers, timeout=15,
    ) as resp:  # fmt: skip
        try:
            for part in resp.iter_raw():
                raw += part
        except httpx.RemoteProtocolError:
            cut = True
    return Received(resp.status_code, resp.headers, raw, cut, time.monotonic() - started)


def send_wire(matrix: Matrix, request: bytes) -> Received:
    """Raw bytes out, and everything that comes back until the gateway closes (the request says close)."""
    answer = b""
    with socket.create_connection(("127.0.0.1", matrix.proc.port), timeout=15) as sock:
        started = time.monotonic()
        sock.sendall(request)
        while part := sock.recv(65536):
            answer += part
        took = time.monotonic() - started
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = httpx.Headers([tuple(line.split(": ", 1)) for line in lines])
    cut = len(body) < int(headers.get("content-length", len(body)))
    return Received(int(status_line.split()[1]), headers, body, cut, took)


def assert_answer(answer: Answer, got: Received, request_id: str) -> None:
    status, headers, raw = got.status, got.headers, got.raw
    assert status == answer.status, raw[:500]
    assert got.cut == answer.cut
    assert headers["x-request-id"] == request_id
    assert b"Traceback" not in raw
    for name, value in answer.headers.items():
        assert headers.get(name) == value, (name, headers)
    if answer.error is not None:
        message = f"{answer.error['message']} (request id: {request_id})"
        assert orjson.loads(raw) == {"error": {**answer.error, "message": message, "request_id": request_id}}
    if answer.stream_error is not None:
        event = b"data: " + orjson.dumps({"error": {**answer.stream_error, "request_id": request_id}}) + b"\n\n"
        # The one error event is the last thing on the wire: nothing follows it.
        assert raw.endswith(event), raw[-500:]
        assert raw.count(b'data: {"error"') == 1
    if answer.check is not None:
        answer.check(raw)
    if answer.waits is not None:
        assert answer.waits * 0.9 <= got.took < answer.waits + ANSWER_MARGIN_S, got.took


def assert_request(
    matrix: Matrix, case: Case, got: Received, request_id: str, quiet_s: float = NO_SECOND_RECORD_S
) -> None:
    """The answer, and the one record it left; a request refused before any attempt reached no upstream."""
    assert_answer(case.answer, got, request_id)
    found = matrix.one_record(request_id, quiet_s=quiet_s)
    assert {k: found[k] for k in case.record} == case.record
    assert found["client_disconnected"] is False
    if "model" not in case.record:
        assert found["model"] == case.model
    if found["key_name"] is not None:
        assert found["key"] == mask_key(matrix.keys[found["key_name"]])
    if found["attempts"] == 0:
        assert request_id not in matrix.upstream_ids()


def assert_moved(matrix: Matrix, before: dict[MetricKey, float], moved: dict[MetricKey, float]) -> None:
    assert matrix.moved_since(before) == moved
    matrix.assert_healthy()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fault(matrix: Matrix, case: Case) -> None:
    for provider, knobs in case.faults.items():
        matrix.mocks[provider].faults(**knobs)
    before = matrix.counters()
    request_id = new_request_id(case.id)
    assert_request(matrix, case, send(matrix, case, request_id), request_id)
    if case.record["attempts"] == 0:
        # Alone on the mocks: nothing at all reached them, under this request id or another.
        assert matrix.upstream_ids() == []
    assert_moved(matrix, before, case.moved)


def leave_after(sock: socket.socket, wait_s: float) -> None:
    time.sleep(wait_s)
    sock.close()


def test_client_leaves_while_waiting_for_the_upstream_headers(matrix: Matrix) -> None:
    before = matrix.counters()
    request_id = new_request_id("left-before-headers")
    headers = {**matrix.auth(), "x-mock-ttfb-ms": "8000", "X-Request-ID": request_id}
    sock = send_raw(matrix.proc.port, {"model": "beta-chat", "messages": MESSAGES, "stream": True}, headers)
    matrix.mocks["beta"].request(request_id, done=False)
    leave_after(sock, 0.2)
    left_at = time.time()
    entry = matrix.mocks["beta"].request(request_id, timeout_s=RECORD_WAIT_S)
    assert entry["outcome"] == "disconnected"
    assert entry["disconnected_at"] - left_at < LEFT_NOTICED_S
    found = matrix.one_record(request_id)
    assert {k: found[k] for k in ("status", "error", "attempts", "provider", "client_disconnected")} == {
        "status": 499, "error": None, "attempts": 1, "provider": "beta", "client_disconnected": True,
    }  # fmt: skip
    assert found["ttfb_ms"] is None
    assert matrix.moved_since(before) == {served("beta-chat", "beta", 499): 1}
    matrix.assert_healthy()


def test_client_leaves_while_waiting_on_redis(matrix: Matrix) -> None:
    assert matrix.redis.proc is not None
    before = matrix.counters()
    request_id = new_request_id("left-on-redis")
    headers = {**matrix.auth("limited"), "X-Request-ID": request_id}
    matrix.redis.proc.send_signal(signal.SIGSTOP)  # Redis hangs; it does not refuse
    try:
        sock = send_raw(matrix.proc.port, {"model": "mock-chat", "messages": MESSAGES}, headers)
        leave_after(sock, 0.5)  # the admission call is waiting on the paused Redis by now
        found = matrix.one_record(request_id, within_s=LEFT_NOTICED_S)
        assert {k: found[k] for k in ("status", "error", "attempts", "provider", "client_disconnected")} == {
            "status": 499, "error": None, "attempts": 0, "provider": None, "client_disconnected": True,
        }  # fmt: skip
        # No upstream call is made for a client that is gone, and Redis is not blamed for it.
        assert matrix.mocks["alpha"].requests() == []
        assert matrix.mocks["beta"].requests() == []
        assert matrix.moved_since(before) == {served("mock-chat", "other", 499): 1}
    finally:
        matrix.redis.proc.send_signal(signal.SIGCONT)
        # Let a late record land here, not in the next test's counters.
        deadline = time.monotonic() + REDIS_TIMEOUT_S + RECORD_WAIT_S
        while not matrix.records(request_id) and time.monotonic() < deadline:
            time.sleep(0.05)
    matrix.assert_healthy()


# A budget: held by a request in flight, then spent. Each key is used by one test only.

HOLDER = Case(
    "budget-holder",
    "beta-chat",
    Answer(200),
    record(200, None, 1, "beta", total_tokens=7, key_name="held"),
    {},
    headers={"x-mock-ttfb-ms": "1000"},  # in flight this long after the mock has it, holding all of the budget
    credentials=(("Authorization", "held"),),
)
HELD = Case(
    "budget-held-in-flight",
    "beta-chat",
    Answer(
        429,
        envelope(
            "rate_limit_exceeded",
            "The rest of this API key's token budget is held by requests in flight. Retry in 1s.",
            "rate_limit_error",
        ),
        headers={"retry-after": "1", "retry-after-ms": "1000"},
    ),
    record(429, "rate_limit_exceeded", 0, None, key_name="held"),
    {
        served("beta-chat", "other", 429): 1,
        ratelimited("key", "budget"): 1,
        # and the holder's own, once it is answered
        served("beta-chat", "beta", 200): 1,
        **tokens("beta-chat", "beta", 1, 6),
    },
    credentials=(("Authorization", "held"),),
)


def test_a_budget_held_by_a_request_in_flight_is_429(matrix: Matrix) -> None:
    before = matrix.counters()
    holder_id, request_id = new_request_id(HOLDER.id), new_request_id(HELD.id)
    with ThreadPoolExecutor(1) as pool:
        holder = pool.submit(send, matrix, HOLDER, holder_id)
        # The mock has it, so its admission (and hold: min(estimate + reserve, 30) = all 30) is done.
        matrix.mocks["beta"].request(holder_id, done=False)
        got = send(matrix, HELD, request_id)
        assert not holder.done()
        held_by = holder.result()
    assert_request(matrix, HELD, got, request_id)
    assert_request(matrix, HOLDER, held_by, holder_id)
    assert_moved(matrix, before, HELD.moved)


SPENDER = Case(
    "budget-spender",
    "mock-chat",
    Answer(200),
    # It holds all 5 tokens of the budget and uses 7: the overrun is charged, and nothing is left.
    record(200, None, 1, "alpha", total_tokens=7, key_name="spent"),
    {},
    credentials=(("Authorization", "spent"),),
)
SPENT = Case(
    "budget-spent",
    "mock-chat",
    Answer(
        402,
        envelope(
            "insufficient_quota",
            "This API key's token budget is spent. Ask the gateway's operators to raise it.",
            "insufficient_quota",
        ),
        headers={"x-should-retry": "false"},
    ),
    record(402, "insufficient_quota", 0, None, key_name="spent"),
    {
        served("mock-chat", "other", 402): 1,
        # and the spender's own
        served("mock-chat", "alpha", 200): 1,
        **tokens("mock-chat", "alpha", 1, 6),
    },
    credentials=(("Authorization", "spent"),),
)


def test_a_spent_budget_is_402(matrix: Matrix) -> None:
    before = matrix.counters()
    spender_id, request_id = new_request_id(SPENDER.id), new_request_id(SPENT.id)
    # Its record is written once its usage is settled, so the next request sees the budget spent.
    assert_request(matrix, SPENDER, send(matrix, SPENDER, spender_id), spender_id)
    assert_request(matrix, SPENT, send(matrix, SPENT, request_id), request_id)
    assert_moved(matrix, before, SPENT.moved)


# A paused Redis (SIGSTOP on the module's own redis-server): it hangs, it does not refuse.

UNCHECKED = Case(
    "redis-paused",
    "mock-chat",
    Answer(200),  # on_error = "allow": admitted, unchecked
    record(200, None, 1, "alpha", total_tokens=7, key_name="limited"),
    {},
    credentials=(("Authorization", "limited"),),  # rpm only: one Redis call a request, the admission
)
FAST_WHILE_OPEN = 5


def close_circuit(matrix: Matrix) -> None:
    """Once Redis is back: after the cool-down one request probes and closes the circuit (no-op if closed)."""
    deadline = time.monotonic() + CIRCUIT_COOLDOWN_S + REDIS_TIMEOUT_S + RECORD_WAIT_S
    while matrix.gauge("sluicegate_limiter_circuit_open") and time.monotonic() < deadline:
        time.sleep(0.2)
        httpx.post(
            matrix.base + "/v1/chat/completions", json={"model": "mock-chat", "messages": MESSAGES},
            headers=matrix.auth("limited"), timeout=REDIS_TIMEOUT_S + 5,
        )  # fmt: skip


def test_paused_redis_opens_the_circuit_and_one_probe_closes_it(matrix: Matrix) -> None:
    redis = matrix.redis.proc
    assert redis is not None
    assert matrix.gauge("sluicegate_limiter_circuit_open") == 0
    before = matrix.counters()

    def one(_: object = None) -> tuple[str, Received]:
        request_id = new_request_id(UNCHECKED.id)
        return request_id, send(matrix, UNCHECKED, request_id)

    try:
        redis.send_signal(signal.SIGSTOP)
        try:
            # As many at once as it takes to open the circuit: each waits out timeout_s, then is let in.
            with ThreadPoolExecutor(CIRCUIT_FAILURES) as pool:
                waited = list(pool.map(one, range(CIRCUIT_FAILURES)))
            opened_by = time.monotonic()
            for _, got in waited:
                assert REDIS_TIMEOUT_S * 0.9 <= got.took < REDIS_TIMEOUT_S + ANSWER_MARGIN_S, got.took
            assert matrix.gauge("sluicegate_limiter_circuit_open") == 1
            # Open: no request waits on Redis, on_error applies at once.
            fast = [one() for _ in range(FAST_WHILE_OPEN)]
            for _, got in fast:
                assert got.took < REDIS_TIMEOUT_S / 2, got.took
            assert matrix.gauge("sluicegate_limiter_circuit_open") == 1
        finally:
            redis.send_signal(signal.SIGCONT)
        time.sleep(max(0.0, opened_by + CIRCUIT_COOLDOWN_S + 0.2 - time.monotonic()))
        probe = one()
        assert probe[1].took < REDIS_TIMEOUT_S / 2
        assert matrix.gauge("sluicegate_limiter_circuit_open") == 0
    finally:
        close_circuit(matrix)  # for the tests after this one, whatever happened here
    sent = [*waited, *fast, probe]
    for request_id, _ in sent:
        matrix.one_record(request_id, quiet_s=0)
    time.sleep(NO_SECOND_RECORD_S)  # once for all of them
    for request_id, got in sent:
        assert_request(matrix, UNCHECKED, got, request_id, quiet_s=0)
    assert_moved(
        matrix,
        before,
        {
            served("mock-chat", "alpha", 200): len(sent),
            **{k: v * len(sent) for k, v in tokens("mock-chat", "alpha", 1, 6).items()},
            # The timed-out admissions and the skipped ones, and as many settles (every key's spending is
            # counted) skipped while the circuit was open; the probe's succeeded.
            LIMITER_ERRORS: 2 * (CIRCUIT_FAILURES + FAST_WHILE_OPEN),
        },
    )
    assert "Redis failed 3 times in a row" in matrix.proc.log.read_text()
