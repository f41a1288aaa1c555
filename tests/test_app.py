"""The ASGI app in-process, message by message: request heads, the fast error paths, draining, how answers end."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
from prometheus_client import CONTENT_TYPE_LATEST

from proxy.app import GC_YOUNG_THRESHOLD, Gateway
from proxy.config.settings import parse_settings
from proxy.http.head import MAX_HEAD_BYTES, MAX_HEADER_LINE_BYTES, MAX_HEADERS
from proxy.records.record import RequestRecord
from proxy.request.auth import key_digest, new_key
from proxy.request.usage import StreamUsageScanner
from tests.conftest import Mocks

KEY = new_key()
DISABLED_KEY = new_key()
Message = dict[str, Any]


def gateway(base_url: str = "http://127.0.0.1:9/v1", **server: Any) -> Gateway:
    raw = {
        "server": server,
        # Nothing listens on port 1: a started gateway finds Redis down, and the key has no limits to check.
        "redis": {"url": "redis://127.0.0.1:1/0", "timeout_s": 0.05},
        "events": {"sink": "off"},
        "providers": [{"name": "mock", "base_url": base_url, "models": ["mock-chat"]}],
        "keys": [
            {"name": "main", "sha256": key_digest(KEY)},
            {"name": "off", "sha256": key_digest(DISABLED_KEY), "enabled": False},
        ],
    }
    return Gateway(parse_settings(raw, env={}))


@contextlib.asynccontextmanager
async def serving(app: Gateway) -> AsyncIterator[list[RequestRecord]]:
    """The app between its lifespan's start-up and shut-down; yields the records it leaves."""
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    outbox: asyncio.Queue[Message] = asyncio.Queue()
    lifespan = asyncio.create_task(app({"type": "lifespan"}, inbox.get, outbox.put))  # type: ignore[arg-type]
    await inbox.put({"type": "lifespan.startup"})
    assert (await outbox.get())["type"] == "lifespan.startup.complete"
    records: list[RequestRecord] = []
    assert app.events is not None
    app.events.emit = records.append  # type: ignore[method-assign]
    try:
        yield records
    finally:
        await inbox.put({"type": "lifespan.shutdown"})
        assert (await outbox.get())["type"] == "lifespan.shutdown.complete"
        await lifespan


def scope(path: str, headers: list[tuple[bytes, bytes]], method: str = "GET") -> dict[str, Any]:
    return {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "headers": headers}


def body_of(chunks: list[bytes], complete: bool = True) -> Callable[[], Awaitable[Message]]:
    """A receive() that hands out the chunks, then waits forever, like a client that stopped sending."""
    ends = len(chunks) - 1 if complete else len(chunks)
    queue = [{"type": "http.request", "body": c, "more_body": i < ends} for i, c in enumerate(chunks)]

    async def receive() -> Message:
        if queue:
            return queue.pop(0)
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    return receive


async def call(app: Gateway, request: dict[str, Any], receive: Callable[[], Awaitable[Message]]) -> list[Message]:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    await app(request, receive, send)  # type: ignore[arg-type]
    return sent


def answer(sent: list[Message]) -> tuple[int, dict[bytes, bytes], dict[str, Any]]:
    start, body = sent
    assert start["type"] == "http.response.start"
    assert body["more_body"] is False
    return start["status"], dict(start["headers"]), orjson.loads(body["body"])


def padded(count: int, line_bytes: int = 20) -> list[tuple[bytes, bytes]]:
    """count headers, each line (name, ': ', value, CRLF) exactly line_bytes long."""
    names = [f"x-pad-{i:04d}".encode() for i in range(count)]
    return [(name, b"v" * (line_bytes - len(name) - 4)) for name in names]


AUTH = [(b"authorization", f"Bearer {KEY}".encode())]


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        (AUTH + padded(MAX_HEADERS - 1), 200),
        (AUTH + padded(MAX_HEADERS), 431),
        (AUTH + padded(1, MAX_HEADER_LINE_BYTES), 200),
        (AUTH + padded(1, MAX_HEADER_LINE_BYTES + 1), 431),
        (AUTH + padded(4, MAX_HEAD_BYTES // 4 - 20), 200),
        (AUTH + padded(4, MAX_HEAD_BYTES // 4), 431),
    ],
    ids=["count-at-limit", "count-over", "line-at-limit", "line-over", "total-at-limit", "total-over"],
)
async def test_header_limits(headers: list[tuple[bytes, bytes]], status: int) -> None:
    sent = await call(gateway(), scope("/v1/models", headers), body_of([b""]))
    got, response_headers, body = answer(sent)
    assert got == status, body
    assert b"x-request-id" in response_headers
    if status == 431:
        assert body["error"]["code"] == "request_header_fields_too_large"
        assert body["error"]["request_id"] == response_headers[b"x-request-id"].decode()


async def test_431_even_on_an_internal_path() -> None:
    sent = await call(gateway(), scope("/healthz", padded(MAX_HEADERS + 1)), body_of([b""]))
    assert answer(sent)[0] == 431


async def test_transfer_encoding_with_content_length_is_refused_and_closed() -> None:
    headers = [*AUTH, (b"transfer-encoding", b"chunked"), (b"content-length", b"99999999999")]
    status, response_headers, body = answer(await call(gateway(), scope("/v1/models", headers), body_of([b""])))
    assert (status, body["error"]["code"]) == (400, "invalid_request")
    assert "Transfer-Encoding and Content-Length" in body["error"]["message"]
    assert response_headers[b"connection"] == b"close"


async def test_a_body_past_the_deadline_gets_408_and_close() -> None:
    app = gateway(body_timeout_s=0.05)
    headers = [(b"content-length", b"1000")]
    request = scope("/v1/chat/completions", headers, "POST")
    sent = await asyncio.wait_for(call(app, request, body_of([b"12345", b"6"], complete=False)), 2)
    status, response_headers, body = answer(sent)
    assert (status, body["error"]["code"]) == (408, "request_timeout")
    assert response_headers[b"connection"] == b"close"


async def test_the_body_deadline_is_for_the_whole_body_not_each_read() -> None:
    app = gateway(body_timeout_s=0.2)

    async def trickle() -> Message:
        await asyncio.sleep(0.05)
        return {"type": "http.request", "body": b"x", "more_body": True}

    sent = await asyncio.wait_for(call(app, scope("/v1/chat/completions", [], "POST"), trickle), 2)
    assert answer(sent)[0] == 408


async def test_while_draining_readyz_says_so_and_requests_are_still_served() -> None:
    app = gateway()
    app.draining = True
    status, headers, body = answer(await call(app, scope("/readyz", []), body_of([b""])))
    assert (status, body) == (503, {"status": "unavailable", "reason": "draining"})
    status, headers, body = answer(await call(app, scope("/v1/models", AUTH), body_of([b""])))
    assert status == 200
    assert body["data"][0]["id"] == "mock-chat"
    # Keep-alive connections are retired as they answer, so few are idle when the listener closes.
    assert headers[b"connection"] == b"close"


# The answer's state through the whole gateway, against the real mock upstream: every way a stream ends.
STREAM_BODY = orjson.dumps({"model": "mock-chat", "messages": [{"role": "user", "content": "hi"}], "stream": True})


def stream_request(**knobs: str) -> dict[str, Any]:
    headers = [*AUTH, (b"x-request-id", b"req-stream"), (b"content-type", b"application/json")]
    headers += [(f"x-mock-{name}".encode(), value.encode()) for name, value in knobs.items()]
    return scope("/v1/chat/completions", headers, "POST")


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "sluicegate" and r.levelname != "INFO"]


def body_parts(sent: list[Message]) -> tuple[list[Message], Message | None]:
    """The body messages with more to come, and the last one if it was sent."""
    assert sent[0]["type"] == "http.response.start"
    assert all(m["type"] == "http.response.body" for m in sent[1:])
    more = [m for m in sent[1:] if m["more_body"]]
    last = [m for m in sent[1:] if not m["more_body"]]
    assert sent[1:] == more + last and len(last) <= 1
    return more, last[0] if last else None


async def stream(
    app: Gateway, request: dict[str, Any], receive: Callable[[], Awaitable[Message]] | None = None
) -> list[Message]:
    return await asyncio.wait_for(call(app, request, receive or body_of([STREAM_BODY])), 10)


async def test_a_stream_that_ends_well_leaves_no_warning(mocks: Mocks, caplog: pytest.LogCaptureFixture) -> None:
    app = gateway(f"{mocks.beta.url}/v1")
    async with serving(app) as records:
        caplog.clear()
        sent = await stream(app, stream_request(chunks="3"))
    more, last = body_parts(sent)
    assert sent[0]["status"] == 200
    assert more and last is not None
    assert b"data: [DONE]" in b"".join(m["body"] for m in sent[1:])
    assert (records[0].status, records[0].error, records[0].client_disconnected) == (200, None, False)
    assert warnings_of(caplog) == []


async def test_a_provider_that_breaks_off_gets_an_error_event_as_the_last_message(
    mocks: Mocks, caplog: pytest.LogCaptureFixture
) -> None:
    app = gateway(f"{mocks.beta.url}/v1")
    async with serving(app) as records:
        caplog.clear()
        sent = await stream(app, stream_request(chunks="6", **{"reset-after": "2"}))
    more, last = body_parts(sent)
    assert more and last is not None
    event = orjson.loads(last["body"].strip().removeprefix(b"data: "))
    assert event["error"]["code"] == "upstream_error"
    assert event["error"]["request_id"] == "req-stream"
    assert records[0].error == "upstream_error"
    # Ended with its error event: a finished answer, nothing to warn about.
    assert warnings_of(caplog) == []


async def test_a_compressed_stream_that_breaks_off_is_cut_on_purpose(
    mocks: Mocks, caplog: pytest.LogCaptureFixture
) -> None:
    app = gateway(f"{mocks.beta.url}/v1")
    async with serving(app) as records:
        caplog.clear()
        sent = await stream(app, stream_request(chunks="6", gzip="1", **{"reset-after": "2"}))
    more, last = body_parts(sent)
    # No error fits inside gzip bytes: no last message, so the server closes the connection.
    assert more and last is None
    assert (records[0].error, records[0].client_disconnected) == ("upstream_error", False)
    assert warnings_of(caplog) == []


async def test_a_client_that_leaves_mid_stream_leaves_no_warning(
    mocks: Mocks, caplog: pytest.LogCaptureFixture
) -> None:
    app = gateway(f"{mocks.beta.url}/v1")
    sent: list[Message] = []
    some_came = asyncio.Event()
    request_body = [{"type": "http.request", "body": STREAM_BODY, "more_body": False}]

    async def send(message: Message) -> None:
        sent.append(message)
        if message["type"] == "http.response.body":
            some_came.set()

    async def receive() -> Message:
        """The client sends its request, then leaves once a piece of the stream has reached it."""
        if request_body:
            return request_body.pop()
        await some_came.wait()
        return {"type": "http.disconnect"}

    async with serving(app) as records:
        caplog.clear()
        request = stream_request(chunks="50", **{"chunk-delay-ms": "20"})
        await asyncio.wait_for(app(request, receive, send), 10)  # type: ignore[arg-type]
    more, last = body_parts(sent)
    assert more and last is None
    assert records[0].client_disconnected is True
    assert warnings_of(caplog) == []


async def test_a_half_sent_answer_is_logged(
    mocks: Mocks, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    feed = StreamUsageScanner.feed
    calls = 0

    def buggy_feed(self: StreamUsageScanner, chunk: bytes) -> bytes:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("a bug of ours, mid-stream")
        return feed(self, chunk)

    monkeypatch.setattr(StreamUsageScanner, "feed", buggy_feed)
    app = gateway(f"{mocks.beta.url}/v1")
    async with serving(app) as records:
        caplog.clear()
        sent = await stream(app, stream_request(chunks="6", **{"chunk-delay-ms": "20"}))
    more, last = body_parts(sent)
    assert more and last is None
    assert records[0].client_disconnected is False
    assert warnings_of(caplog) == [
        "unhandled error in request req-stream",
        "request req-stream ended with its answer half-sent",
    ]


# The fast error paths, message by message: each is one start and one last body, headers in order.
RID = "req-fast-1"
WITH_ID = [(b"x-request-id", RID.encode())]
HOW_TO_SEND = "Send it as 'Authorization: Bearer sk-...' or 'X-API-Key: sk-...'."
CLOSE = [(b"connection", b"close")]


def answered(
    status: int, body: bytes, content_type: bytes = b"application/json", after: list[tuple[bytes, bytes]] | None = None
) -> list[Message]:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *WITH_ID, *(after or [])]
    return [
        {"type": "http.response.start", "status": status, "headers": headers},
        {"type": "http.response.body", "body": body, "more_body": False},
    ]


def refused(
    status: int,
    kind: str,
    code: str,
    message: str,
    param: str | None = None,
    after: list[tuple[bytes, bytes]] | None = None,
) -> list[Message]:
    error = {"message": f"{message} (request id: {RID})", "type": kind, "param": param, "code": code, "request_id": RID}
    return answered(status, orjson.dumps({"error": error}), after=after)


async def ask(
    app: Gateway, path: str, method: str = "GET", headers: list[tuple[bytes, bytes]] | None = None, body: bytes = b""
) -> list[Message]:
    request = scope(path, [*WITH_ID, *(AUTH if headers is None else headers)], method)
    return await asyncio.wait_for(call(app, request, body_of([body])), 5)


@pytest.mark.parametrize(
    ("method", "path", "wanted"),
    [
        ("GET", "/v1/chat/completions", "POST"),
        ("PUT", "/v1/embeddings", "POST"),
        ("DELETE", "/api/v1/completions", "POST"),
        ("POST", "/v1/models", "GET"),
    ],
)
async def test_405_names_the_method_wanted(method: str, path: str, wanted: str) -> None:
    assert await ask(gateway(), path, method) == refused(
        405, "invalid_request_error", "method_not_allowed", f"Expected {wanted} for {path}, but got {method}."
    )


@pytest.mark.parametrize("path", ["/chat/completions", "/", "/v2/chat/completions", "/v1"])
async def test_404_without_the_prefix_says_what_the_base_url_must_end_in(path: str) -> None:
    assert await ask(gateway(), path, "POST") == refused(
        404, "invalid_request_error", "not_found",
        f"Unknown path '{path}'. The base URL must end in '/v1' (for example http://HOST:PORT/v1), "
        "so requests go to /v1/chat/completions.",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("path", "prefix", "rest"),
    [
        ("/v1/v1/chat/completions", "/v1", "/v1/chat/completions"),
        ("/api/v1/v1/models", "/api/v1", "/v1/models"),
        ("/v1/api/v1/embeddings", "/v1", "/api/v1/embeddings"),
    ],
)
@pytest.mark.parametrize("headers", [AUTH, []], ids=["key", "no-key"])
async def test_404_for_a_doubled_prefix_says_the_base_url_ends_in_it_once(
    path: str, prefix: str, rest: str, headers: list[tuple[bytes, bytes]]
) -> None:
    app = gateway()
    async with serving(app) as records:
        sent = await ask(app, path, "POST", headers, b'{"model":"mock-chat"}')
    assert sent == refused(
        404, "invalid_request_error", "not_found",
        f"Unknown path '{path}': the prefix is there twice. The base URL must end in '{prefix}' once "
        f"(for example http://HOST:PORT{prefix}), so this request goes to {rest}.",
    )  # fmt: skip
    assert [(r.status, r.error) for r in records] == [(404, "not_found")]


@pytest.mark.parametrize("path", ["/v1/chat/completions/", "/api/v1/embeddings/", "/v1/models/", "/v1/files/"])
async def test_400_for_a_trailing_slash_names_the_path_without_it(path: str) -> None:
    app = gateway()
    async with serving(app) as records:
        sent = await ask(app, path, "POST", body=b'{"model":"mock-chat"}')
    assert sent == refused(
        400, "invalid_request_error", "invalid_request",
        "The path has an empty segment (a trailing '/'); it is not forwarded. "
        f"Send it to {path.rstrip('/')}, without the '/'.",
    )  # fmt: skip
    assert [(r.status, r.error) for r in records] == [(400, "invalid_request")]


async def test_404_for_a_path_under_the_prefix_that_cannot_be_routed() -> None:
    app = gateway()
    async with serving(app) as records:
        sent = await ask(app, "/v1/nothing/here", "POST")
    assert sent == refused(
        404, "invalid_request_error", "not_found",
        "Cannot route /v1/nothing/here: the body has no 'model' field and there is no X-AI-Provider header.",
    )  # fmt: skip
    assert [(r.status, r.error, r.route) for r in records] == [(404, "not_found", "passthrough")]


@pytest.mark.parametrize("path", ["/healthz", "/v1/healthz", "/api/v1/healthz"])
async def test_healthz_needs_no_key(path: str) -> None:
    assert await ask(gateway(), path, headers=[]) == answered(200, b'{"status":"ok"}')


async def test_readyz_before_start_up_completed() -> None:
    body = b'{"status":"unavailable","reason":"start-up did not complete"}'
    assert await ask(gateway(), "/readyz", headers=[]) == answered(503, body)


async def test_metrics_in_the_prometheus_text_format() -> None:
    sent = await ask(gateway(), "/metrics", headers=[])
    body = sent[1]["body"]
    assert sent == answered(200, body, content_type=CONTENT_TYPE_LATEST.encode())
    assert b"# TYPE sluicegate_inflight_requests gauge" in body


@pytest.mark.parametrize(
    ("headers", "chunks", "message"),
    [
        ([(b"content-length", b"101")], [], "The request body is 101 bytes; this gateway takes at most 100."),
        ([], [b"x" * 60, b"x" * 41], "The request body is over 100 bytes, the most this gateway takes."),
        # A Content-Length that understates the body does not get it past the limit.
        (
            [(b"content-length", b"10")],
            [b"x" * 101],
            "The request body is over 100 bytes, the most this gateway takes.",
        ),
    ],
    ids=["by-content-length", "streamed", "content-length-lies"],
)
async def test_413_for_a_body_over_the_limit(
    headers: list[tuple[bytes, bytes]], chunks: list[bytes], message: str
) -> None:
    request = scope("/v1/chat/completions", [*WITH_ID, *AUTH, *headers], "POST")
    sent = await asyncio.wait_for(call(gateway(max_body_bytes=100), request, body_of(chunks)), 5)
    assert sent == refused(413, "invalid_request_error", "request_too_large", message)


async def test_a_body_at_the_limit_is_read() -> None:
    request = scope("/v1/chat/completions", [*WITH_ID, (b"content-length", b"100")], "POST")
    sent = await asyncio.wait_for(call(gateway(max_body_bytes=100), request, body_of([b"x" * 100])), 5)
    # Read in full and on to the next check: the key.
    assert sent == refused(401, "authentication_error", "invalid_api_key", "Missing API key. " + HOW_TO_SEND)


async def test_while_draining_every_answer_closes_its_connection() -> None:
    app = gateway()
    app.draining = True
    body = b'{"status":"unavailable","reason":"draining"}'
    assert await ask(app, "/readyz", headers=[]) == answered(503, body, after=CLOSE)
    models = {
        "object": "list",
        "data": [{"id": "mock-chat", "object": "model", "created": app.started_at, "owned_by": "mock"}],
    }
    assert await ask(app, "/v1/models") == answered(200, orjson.dumps(models), after=CLOSE)
    assert await ask(app, "/v1/models", headers=[]) == refused(
        401, "authentication_error", "invalid_api_key", "Missing API key. " + HOW_TO_SEND, after=CLOSE
    )


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ([], "Missing API key. " + HOW_TO_SEND),
        ([(b"authorization", b"Bearer sk-unknown")], "Incorrect API key provided: this gateway does not know it."),
        ([(b"authorization", KEY.encode())],
         "The Authorization header is missing the 'Bearer ' prefix: send 'Authorization: Bearer sk-...'."),
        ([(b"authorization", b"Basic dXNlcjpwYXNz")],
         "The Authorization header must use the Bearer scheme. " + HOW_TO_SEND),
        ([(b"authorization", b"Bearer ")], "The Authorization: Bearer header has no key after it. " + HOW_TO_SEND),
        ([(b"x-api-key", b"pk-123")],
         "The key in the X-API-Key header does not start with 'sk-': use the key this gateway issued, "
         "not a provider's key."),
        ([(b"authorization", f"Bearer {DISABLED_KEY}".encode())],
         "This API key is disabled. Ask the gateway's operators to enable it."),
    ],
    ids=["missing", "unknown", "no-bearer", "basic", "empty-bearer", "not-sk", "disabled"],
)  # fmt: skip
async def test_401_says_what_is_wrong_with_the_key(headers: list[tuple[bytes, bytes]], message: str) -> None:
    sent = await ask(gateway(), "/v1/models", headers=headers)
    assert sent == refused(401, "authentication_error", "invalid_api_key", message)
    assert KEY.encode() not in sent[1]["body"] and DISABLED_KEY.encode() not in sent[1]["body"]


@pytest.mark.parametrize(
    ("headers", "what"),
    [
        ([*AUTH, (b"x-api-key", new_key().encode())],
         "an Authorization header and an X-API-Key header with different keys"),
        ([*AUTH, (b"authorization", f"Bearer {new_key()}".encode())],
         "two Authorization headers with different values"),
    ],
    ids=["authorization-and-x-api-key", "two-authorization"],
)  # fmt: skip
async def test_400_for_two_different_credentials(headers: list[tuple[bytes, bytes]], what: str) -> None:
    assert await ask(gateway(), "/v1/models", headers=headers) == refused(
        400, "invalid_request_error", "invalid_request",
        f"Two credentials were sent: {what}. Send exactly one key, "
        "as 'Authorization: Bearer sk-...' or as 'X-API-Key: sk-...'.",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("body", "code", "message", "param"),
    [
        (b"{", "invalid_json", "The request body is not valid JSON.", None),
        (b"", "invalid_json", "The request body is not valid JSON.", None),
        (b"[]", "invalid_request", "Expected the request body to be a JSON object.", None),
        (b'{"messages": []}', "missing_model", "The request has no 'model' field.", "model"),
        (b'{"model": "", "messages": []}', "missing_model", "The request has no 'model' field.", "model"),
        (b'{"model": 5, "messages": []}', "invalid_request", "Expected 'model' to be a string.", "model"),
        (b'{"model": "mock-chat", "messages": [], "stream": "yes"}', "invalid_request",
         "Expected 'stream' to be true or false.", "stream"),
        (b'{"model": "mock-chat"}', "invalid_request", "The request has no 'messages' field.", "messages"),
    ],
    ids=["cut-json", "empty", "array", "no-model", "empty-model", "number-model", "stream-string", "no-messages"],
)  # fmt: skip
async def test_400_for_a_chat_body_that_cannot_be_sent_on(
    body: bytes, code: str, message: str, param: str | None
) -> None:
    app = gateway()
    async with serving(app) as records:
        sent = await ask(app, "/v1/chat/completions", "POST", body=body)
    assert sent == refused(400, "invalid_request_error", code, message, param)
    assert [(r.status, r.error, r.route) for r in records] == [(400, code, "/chat/completions")]


async def test_a_started_worker_collects_its_young_objects_less_often() -> None:
    """The default (700) ran GC passes of tens of ms several times a second under 1,000 streams."""
    saved = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    try:
        async with serving(gateway()):
            assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, 10, 10)
    finally:
        gc.set_threshold(*saved)
