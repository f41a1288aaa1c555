"""The ASGI app in-process: request heads, body deadline and draining, message by message."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest

from proxy.app import MAX_HEAD_BYTES, MAX_HEADER_LINE_BYTES, MAX_HEADERS, Gateway
from proxy.auth import key_digest, new_key
from proxy.record import RequestRecord
from proxy.settings import parse_settings
from proxy.usage import StreamUsageScanner
from tests.conftest import Mocks

KEY = new_key()
Message = dict[str, Any]


def gateway(base_url: str = "http://127.0.0.1:9/v1", **server: Any) -> Gateway:
    raw = {
        "server": server,
        # Nothing listens on port 1: a started gateway finds Redis down, and the key has no limits to check.
        "redis": {"url": "redis://127.0.0.1:1/0", "timeout_s": 0.05},
        "events": {"sink": "off"},
        "providers": [{"name": "mock", "base_url": base_url, "models": ["mock-chat"]}],
        "keys": [{"name": "main", "sha256": key_digest(KEY)}],
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
