"""Property-based tests of body, header and path handling (hypothesis).

The gateway runs in process (`Gateway(scope, receive, send)` on one event loop) in front of the real mock
upstream on a real port. Whatever method, path, headers and body a client sends, the answer is either the
request forwarded to the provider or the gateway's own OpenAI envelope with a 4xx status and the request id;
never a 500, a traceback in the log or a hang, and exactly one event record is left behind.
"""

from __future__ import annotations

import asyncio
import logging
import os
import string
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from proxy.app import Gateway
from proxy.config.settings import parse_settings
from proxy.http.errors import Header
from proxy.records.record import RequestRecord
from proxy.request.auth import key_digest, new_key
from tests.conftest import Mocks

KEY = new_key()
# CI runs the same examples every time, so a red build is never luck; SLUICEGATE_PROPERTY_EXAMPLES=20000 explores.
EXAMPLES = int(os.environ.get("SLUICEGATE_PROPERTY_EXAMPLES", "400"))
DERANDOMIZE = "SLUICEGATE_PROPERTY_EXAMPLES" not in os.environ
ANSWER_WITHIN_S = 10.0
# Header names the gateway reads; the rest are opaque to it and are drawn at random.
INTERNAL = {p + route for p in ("", "/v1", "/api/v1") for route in ("/healthz", "/readyz", "/metrics")}
KNOWN_HEADERS = ("authorization", "x-api-key", "x-request-id", "x-ai-provider", "content-type", "transfer-encoding")


@dataclass
class Harness:
    loop: asyncio.AbstractEventLoop
    gateway: Gateway
    records: list[RequestRecord] = field(default_factory=list)
    errors: list[logging.LogRecord] = field(default_factory=list)


class _Collect(logging.Handler):
    def __init__(self, into: list[logging.LogRecord]) -> None:
        super().__init__(logging.ERROR)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record)


@pytest.fixture(scope="module")
def harness(mocks: Mocks) -> Iterator[Harness]:
    raw = {
        "server": {"max_body_bytes": 4096},
        # Nothing listens on port 1: the one key with limits finds Redis down and is admitted (on_error allow).
        "redis": {"url": "redis://127.0.0.1:1/0", "timeout_s": 0.05},
        "events": {"sink": "off"},
        "providers": [{"name": "beta", "base_url": f"{mocks.beta.url}/v1", "models": ["mock-chat", "mock-*"]}],
        "aliases": {"alias-chat": "mock-chat"},
        "keys": [{"name": "prop", "sha256": key_digest(KEY)}],
    }
    loop = asyncio.new_event_loop()
    gateway = Gateway(parse_settings(raw, env={}))
    loop.run_until_complete(gateway.startup())
    h = Harness(loop, gateway)
    assert gateway.events is not None
    gateway.events.emit = h.records.append  # type: ignore[method-assign]
    handler = _Collect(h.errors)
    logging.getLogger("sluicegate").addHandler(handler)
    try:
        yield h
    finally:
        logging.getLogger("sluicegate").removeHandler(handler)
        if gateway.sessions is not None:
            loop.run_until_complete(gateway.sessions.close())
        if gateway.limiter is not None:
            loop.run_until_complete(gateway.limiter.close())
        loop.close()


# Paths: the prefixes and routes the gateway knows, glued to random segments that may hold %-escapes,
# dots, semicolons, NULs and empty segments.
SEGMENT_CHARS = string.ascii_letters + string.digits + "-._~;:@!$&'()*+,=%"
segment = st.one_of(
    st.sampled_from(["v1", "api", "chat", "completions", "embeddings", "models", "images", "..", ".", "", "healthz"]),
    st.text(SEGMENT_CHARS, max_size=12),
    st.sampled_from(["%2F", "%2e%2e", "%00", "..;", "%3F", "%23", "%", "%zz", "%C3%A9", "a%20b"]),
)
MODEL_PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/api/v1/chat/completions"]
raw_path = st.one_of(
    st.sampled_from(MODEL_PATHS),  # most examples: a model route, so bodies and headers get far enough to matter
    st.sampled_from(MODEL_PATHS),
    st.sampled_from(["/v1/models", "/v1/images/generations", "/readyz", "/v1/v1/chat/completions",
                     "/v1/chat/completions/", "/v1/audio/speech"]),
    st.lists(segment, min_size=1, max_size=6).map(lambda parts: "/" + "/".join(parts)),
    st.lists(segment, max_size=4).map(lambda parts: "/v1/" + "/".join(parts)),
)  # fmt: skip
header_value = st.binary(max_size=64).map(lambda b: bytes(c for c in b if c >= 0x20 and c != 0x7F))
auth_value = st.one_of(
    st.sampled_from([f"Bearer {KEY}", f"Bearer  {KEY}", KEY, "Bearer ", "Bearer sk-unknown", f"Basic {KEY}"]),
    header_value.map(lambda v: "Bearer " + v.decode("latin-1")),
).map(lambda s: s.encode("latin-1"))
opaque_header = st.tuples(st.text(string.ascii_lowercase + "-", min_size=1, max_size=20).map(str.encode), header_value)
extra_header = st.one_of(
    opaque_header,
    opaque_header,
    opaque_header,
    st.tuples(st.sampled_from([h.encode() for h in KNOWN_HEADERS]), header_value),
    st.tuples(st.just(b"authorization"), auth_value),
    st.tuples(st.just(b"x-api-key"), st.one_of(st.just(KEY.encode()), header_value)),
)
good_auth = [(b"authorization", f"Bearer {KEY}".encode())]
headers_strategy = st.tuples(
    st.sampled_from([good_auth, good_auth, good_auth, [(b"x-api-key", KEY.encode())], []]),
    st.lists(extra_header, max_size=4),
).map(lambda parts: [*parts[0], *parts[1]])
json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
chat_body = st.fixed_dictionaries(
    {},
    optional={
        "model": st.one_of(st.sampled_from(["mock-chat", "alias-chat", "mock-x", "nope", ""]), json_value),
        "x": json_value,
        "messages": st.one_of(st.just([{"role": "user", "content": "hi"}]), json_value),
        "prompt": json_value,
        "input": json_value,
        "stream": st.one_of(st.booleans(), json_value),
        "stream_options": st.one_of(st.just({"include_usage": True}), json_value),
        "max_tokens": json_value,
    },
).map(orjson.dumps)
# A request that names a served model and has each route's required field, with the rest drawn at random.
model_body = st.fixed_dictionaries(
    {
        "model": st.sampled_from(["mock-chat", "alias-chat", "mock-embed"]),
        "messages": st.one_of(st.just([{"role": "user", "content": "hi"}]), json_value),
        "prompt": st.one_of(st.just("hi"), json_value),
        "input": st.one_of(st.just("hi"), json_value),
    },
    optional={
        "stream": st.one_of(st.booleans(), json_value),
        "stream_options": st.one_of(st.just({"include_usage": True}), json_value),
        "max_tokens": json_value,
        "user": json_value,
    },
).map(orjson.dumps)
odd_json = st.sampled_from(
    [b'{"model": "mock-chat", "messages": [], "max_tokens": 123456789012345678901234567890}', b"[]", b"null",
     b'{"model": "mock-chat"', b'\xef\xbb\xbf{"model": "mock-chat", "messages": []}', b'{"model": "\\ud800"}']
)  # fmt: skip
body = st.one_of(
    chat_body, chat_body, chat_body, odd_json, st.binary(max_size=256), st.just(b""),
    st.binary(min_size=4097, max_size=5000),
)  # fmt: skip


def scope_for(method: str, raw: str, query: bytes, headers: list[tuple[bytes, bytes]], length: int) -> dict[str, Any]:
    # As hypercorn builds it: `path` is the percent-decoded raw path.
    if not any(name == b"content-length" for name, _ in headers) and length:
        headers = [*headers, (b"content-length", str(length).encode())]
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": method, "scheme": "http", "path": unquote(raw), "raw_path": raw.encode("ascii"),
        "query_string": query, "root_path": "", "headers": headers,
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 9090), "extensions": {},
    }  # fmt: skip


async def call(gateway: Gateway, scope: dict[str, Any], payload: bytes) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []
    delivered = False
    hang = asyncio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": payload, "more_body": False}
        await hang.wait()  # the client stays connected
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await asyncio.wait_for(gateway(scope, receive, send), ANSWER_WITHIN_S)
    return sent


SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, derandomize=DERANDOMIZE,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)  # fmt: skip
methods = st.sampled_from(["POST", "POST", "POST", "POST", "GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
queries = st.binary(max_size=16).map(lambda b: bytes(c for c in b if 0x21 <= c < 0x7F and c != ord("#")))


@SETTINGS
@given(method=methods, raw=raw_path, query=queries, headers=headers_strategy, payload=body)
def test_any_request_is_forwarded_or_refused_in_the_envelope(
    harness: Harness, mocks: Mocks, method: str, raw: str, query: bytes, headers: list[Header], payload: bytes
) -> None:
    check(harness, mocks, method, raw, query, headers, payload)


@SETTINGS
@given(
    raw=st.sampled_from(MODEL_PATHS),
    headers=st.lists(st.one_of(opaque_header, st.tuples(st.just(b"content-type"), header_value)), max_size=4),
    payload=model_body,
)
def test_an_authenticated_model_request_with_any_body_is_forwarded_or_refused_in_the_envelope(
    harness: Harness, mocks: Mocks, raw: str, headers: list[Header], payload: bytes
) -> None:
    """The same property where most requests get past auth and routing, so the body handling behind them is hit."""
    check(harness, mocks, "POST", raw, b"", [*good_auth, *headers], payload)


def check(
    harness: Harness, mocks: Mocks, method: str, raw: str, query: bytes, headers: list[Header], payload: bytes
) -> None:
    harness.records.clear()
    harness.errors.clear()
    scope = scope_for(method, raw, query, headers, len(payload))
    sent = harness.loop.run_until_complete(call(harness.gateway, scope, payload))
    assert not harness.errors, [r.getMessage() for r in harness.errors]
    assert sent and sent[0]["type"] == "http.response.start", sent
    assert sent[-1]["type"] == "http.response.body" and not sent[-1].get("more_body", False)
    status: int = sent[0]["status"]
    response_headers = dict(sent[0]["headers"])
    request_id = response_headers[b"x-request-id"].decode()
    body_bytes = b"".join(m.get("body", b"") for m in sent[1:])
    internal = unquote(raw) in INTERNAL
    if not internal:
        assert len(harness.records) == 1
        assert harness.records[0].request_id == request_id
    assert status < 500 or (internal and status == 503), (status, body_bytes[:300])
    own = _envelope(body_bytes)
    event(f"{status} {own.get('code') if own else 'forwarded or internal'}")
    if own is not None and own.get("request_id") == request_id:
        assert 400 <= status < 500
        assert response_headers[b"content-type"] == b"application/json"
        assert request_id in own["message"]
    elif status == 200 and unquote(raw) in ("/v1/models", "/api/v1/models"):
        assert orjson.loads(body_bytes)["object"] == "list"  # the gateway's own model list
    elif not internal:
        # Not ours: it must be the provider's answer to the forwarded request.
        seen = httpx.get(f"{mocks.beta.url}/_mock/requests").json()
        assert any(entry["id"] == request_id for entry in seen), (status, body_bytes[:300])


def _envelope(body: bytes) -> dict[str, Any] | None:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    return error if isinstance(error, dict) else None
