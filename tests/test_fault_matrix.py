"""Each fault end to end: a real `sluicegate serve`, the mock upstreams on real ports, a Redis of the module's own.

Every fault is judged the same way: the client's exact answer, exactly one event
record saying what happened, the counters that moved (by exact delta, and no
others), and a gateway that is fine afterwards. A new fault is a new row in
CASES; only faults that need a different driver (a client that leaves) have
their own test, built from the same checks.
"""

from __future__ import annotations

import gzip
import secrets
import signal
import socket
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.auth import key_digest, new_key
from tests.conftest import Mock, Mocks, Proc, RedisServer, free_port, send_raw, start_gateway

MESSAGES = [{"role": "user", "content": "hi"}]
REDIS_TIMEOUT_S = 4.0
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
)
MetricKey = tuple[str, tuple[tuple[str, str], ...]]


def sample(name: str, **labels: str) -> MetricKey:
    return name, tuple(sorted(labels.items()))


def served(model: str, provider: str, status: int, route: str = "/chat/completions") -> MetricKey:
    labels = {"route": route, "model": model, "provider": provider, "status": str(status)}
    return sample("sluicegate_requests_total", **labels)


def upstream_error(provider: str, reason: str) -> MetricKey:
    return sample("sluicegate_upstream_errors_total", provider=provider, reason=reason)


def tokens(model: str, provider: str, prompt: int, completion: int) -> dict[MetricKey, float]:
    return {
        sample("sluicegate_tokens_total", model=model, provider=provider, type="prompt"): prompt,
        sample("sluicegate_tokens_total", model=model, provider=provider, type="completion"): completion,
    }


def request_body(model: str, stream: bool) -> bytes:
    return orjson.dumps({"model": model, "messages": MESSAGES, "stream": stream})


def envelope(code: str, message: str, kind: str = "api_error") -> dict[str, Any]:
    return {"message": message, "type": kind, "param": None, "code": code}


@dataclass(frozen=True)
class Answer:
    """What the client must get."""

    status: int
    error: dict[str, Any] | None = None  # the gateway's own envelope, before the request id goes in
    stream_error: dict[str, Any] | None = None  # the last event of a stream that broke off after its headers
    headers: dict[str, str] = field(default_factory=dict)
    check: Callable[[bytes], None] | None = None  # anything more about the raw body
    cut: bool = False  # the connection closes before the body's end: where no error event can be said


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
]


def matrix_config(mocks: Mocks, keys: dict[str, str], events: Path, dead_port: int) -> str:
    return f"""
[server]
bind = "127.0.0.1:9"
graceful_timeout_s = 5

[redis]
on_error = "allow"
timeout_s = {REDIS_TIMEOUT_S}

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
models = ["mock-chat", "beta-chat"]
priority = 1
first_byte_timeout_s = 10

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
"""


@dataclass
class Matrix:
    proc: Proc
    keys: dict[str, str]
    events: Path
    mocks: dict[str, Mock]
    redis: RedisServer

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.proc.port}"

    def auth(self, key: str = "main") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[key]}"}

    def counters(self) -> dict[MetricKey, float]:
        text = httpx.get(self.base + "/metrics", timeout=5).text
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
        return [orjson.loads(line) for line in self.events.read_bytes().splitlines() if needle in line]

    def one_record(self, request_id: str, within_s: float = RECORD_WAIT_S) -> dict[str, Any]:
        deadline = time.monotonic() + within_s
        while not (found := self.records(request_id)):
            if time.monotonic() > deadline:
                raise AssertionError(f"no event record for {request_id} within {within_s}s")
            time.sleep(0.02)
        time.sleep(NO_SECOND_RECORD_S)
        found = self.records(request_id)
        assert len(found) == 1, found
        return found[0]

    def assert_healthy(self) -> None:
        resp = httpx.get(self.base + "/healthz", timeout=5)
        assert resp.status_code == 200
        assert resp.json() == {"status": "ok"}
        gauges = {
            s.name: s.value
            for family in text_string_to_metric_families(httpx.get(self.base + "/metrics", timeout=5).text)
            for s in family.samples
        }
        assert gauges["sluicegate_inflight_requests"] == 0
        assert gauges["sluicegate_active_streams"] == 0


@pytest.fixture(scope="module")
def matrix_gateway(tmp_path_factory: pytest.TempPathFactory, mocks: Mocks) -> Iterator[Matrix]:
    tmp = tmp_path_factory.mktemp("fault-matrix")
    redis = RedisServer(free_port(), tmp / "redis.log").start()
    keys = {"main": new_key(), "limited": new_key()}
    events = tmp / "events.jsonl"
    config = matrix_config(mocks, keys, events, free_port())
    try:
        proc = start_gateway(tmp, mocks, config, redis_url=redis.url)
    except BaseException:
        redis.stop()
        raise
    try:
        yield Matrix(proc, keys, events, {"alpha": mocks.alpha, "beta": mocks.beta}, redis)
    finally:
        proc.stop()
        if redis.proc is not None:
            redis.proc.send_signal(signal.SIGCONT)
        redis.stop()


@pytest.fixture
def matrix(matrix_gateway: Matrix) -> Iterator[Matrix]:
    for mock in matrix_gateway.mocks.values():
        mock.reset()
    yield matrix_gateway
    for mock in matrix_gateway.mocks.values():
        mock.reset()


def new_request_id(case: str) -> str:
    return f"fm-{case}-{secrets.token_hex(4)}"


@dataclass
class Received:
    status: int
    headers: httpx.Headers
    raw: bytes  # as it came over the wire, never decompressed by the client
    cut: bool  # the connection closed before the end of the body


def send(matrix: Matrix, case: Case, request_id: str) -> Received:
    headers = {**matrix.auth(), **case.headers, "X-Request-ID": request_id, "Content-Type": "application/json"}
    raw = b""
    cut = False
    with httpx.stream(
        "POST", matrix.base + "/v1" + case.path, content=request_body(case.model, case.stream),
        headers=headers, timeout=15,
    ) as resp:  # fmt: skip
        try:
            for part in resp.iter_raw():
                raw += part
        except httpx.RemoteProtocolError:
            cut = True
    return Received(resp.status_code, resp.headers, raw, cut)


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


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fault(matrix: Matrix, case: Case) -> None:
    for provider, knobs in case.faults.items():
        matrix.mocks[provider].faults(**knobs)
    before = matrix.counters()
    request_id = new_request_id(case.id)
    assert_answer(case.answer, send(matrix, case, request_id), request_id)
    found = matrix.one_record(request_id)
    assert {k: found[k] for k in case.record} == case.record
    assert found["client_disconnected"] is False
    assert found["model"] == case.model
    assert matrix.moved_since(before) == case.moved
    matrix.assert_healthy()


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
