"""The ASGI app in-process: request heads, body deadline and draining, message by message."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest

from proxy.app import MAX_HEAD_BYTES, MAX_HEADER_LINE_BYTES, MAX_HEADERS, Gateway
from proxy.auth import key_digest, new_key
from proxy.settings import parse_settings

KEY = new_key()
Message = dict[str, Any]


def gateway(**server: Any) -> Gateway:
    raw = {
        "server": server,
        "providers": [{"name": "mock", "base_url": "http://127.0.0.1:9/v1", "models": ["mock-chat"]}],
        "keys": [{"name": "main", "sha256": key_digest(KEY)}],
    }
    return Gateway(parse_settings(raw, env={}))


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
