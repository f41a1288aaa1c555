"""Slow, oversized and ambiguous requests against a real `sluicegate serve`, on bare sockets."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from proxy.request.auth import key_digest, new_key
from tests.conftest import Mocks, Proc, event_records, start_gateway

BODY_TIMEOUT_S = 1.0
HEADER_TIMEOUT_S = 1.0
KEEP_ALIVE_TIMEOUT_S = 3.0
MARGIN_S = 2.0
CHAT = orjson.dumps({"model": "mock-chat", "messages": [{"role": "user", "content": "hi"}]})


def config_text(mocks: Mocks, key: str, events: Path, server: str = "") -> str:
    return f"""
[server]
body_timeout_s = {BODY_TIMEOUT_S}
header_timeout_s = {HEADER_TIMEOUT_S}
keep_alive_timeout_s = {KEEP_ALIVE_TIMEOUT_S}
{server}

[events]
sink = "file"
path = "{events}"

[[providers]]
name = "beta"
base_url = "{mocks.beta.url}/v1"
models = ["mock-chat"]

[[keys]]
name = "main"
sha256 = "{key_digest(key)}"
"""


@dataclass
class Hostile:
    proc: Proc
    key: str
    events: Path
    mocks: Mocks

    @property
    def port(self) -> int:
        return self.proc.port

    def record(self, request_id: str, timeout_s: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.events.exists():
                lines = event_records(self.events)
                found = [r for r in lines if r["request_id"] == request_id]
                if found:
                    assert len(found) == 1, found
                    return found[0]
            time.sleep(0.05)
        raise AssertionError(f"no event record for {request_id}")


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory, mocks: Mocks) -> Iterator[Hostile]:
    tmp = tmp_path_factory.mktemp("hostile")
    key = new_key()
    events = tmp / "events.jsonl"
    proc = start_gateway(tmp, mocks, config_text(mocks, key, events))
    try:
        yield Hostile(proc, key, events, mocks)
    finally:
        proc.stop()


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def head(headers: dict[str, str], path: str = "/v1/chat/completions", method: str = "POST") -> bytes:
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return f"{method} {path} HTTP/1.1\r\nHost: gw\r\n{lines}\r\n".encode("latin-1")


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    raw_head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = raw_head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, value in (line.split(":", 1) for line in lines)}
    while len(body) < int(headers.get("content-length", "0")):
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the body"
        body += chunk
    return int(status_line.split()[1]), headers, body


def closed_after(sock: socket.socket, started: float, timeout_s: float) -> float:
    """Seconds from `started` until the server closed the socket (EOF or reset)."""
    sock.settimeout(timeout_s)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError as exc:
        raise AssertionError(f"still open {timeout_s}s later") from exc
    return time.monotonic() - started


def assert_envelope(status: int, headers: dict[str, str], body: bytes, want: int, code: str) -> None:
    assert status == want, body
    error = orjson.loads(body)["error"]
    assert error["code"] == code
    assert error["request_id"] == headers["x-request-id"]
    assert headers["content-type"] == "application/json"


# --- slow bodies ---------------------------------------------------------------------------------


@pytest.mark.parametrize("with_key", [True, False])
def test_a_body_that_stops_coming_gets_408_and_the_connection_closes(hostile: Hostile, with_key: bool) -> None:
    request_id = f"slow-body-{with_key}"
    auth = {"Authorization": f"Bearer {hostile.key}"} if with_key else {}
    sock = connect(hostile.port)
    started = time.monotonic()
    sock.sendall(head({"Content-Length": "1000", "X-Request-ID": request_id, **auth}) + b'{"mod')
    status, headers, body = read_response(sock)
    answered = time.monotonic() - started
    assert_envelope(status, headers, body, 408, "request_timeout")
    assert headers["x-request-id"] == request_id
    assert headers["connection"] == "close"
    assert BODY_TIMEOUT_S * 0.8 <= answered < BODY_TIMEOUT_S + MARGIN_S
    assert closed_after(sock, started, MARGIN_S) < BODY_TIMEOUT_S + MARGIN_S
    record = hostile.record(request_id)
    assert (record["status"], record["error"]) == (408, "request_timeout")


def test_a_trickled_body_gets_no_more_time_than_a_stalled_one(hostile: Hostile) -> None:
    sock = connect(hostile.port)
    started = time.monotonic()
    sock.sendall(head({"Content-Length": "1000", "X-Request-ID": "trickle-body"}))
    answered: list[float] = []

    def trickle() -> None:
        # A byte every 0.2 s: each read is quick, the body as a whole never completes.
        while not answered and time.monotonic() - started < BODY_TIMEOUT_S + MARGIN_S:
            try:
                sock.sendall(b"x")
            except OSError:
                return
            time.sleep(0.2)

    sender = threading.Thread(target=trickle)
    sender.start()
    try:
        status, headers, body = read_response(sock)
        answered.append(time.monotonic() - started)
    finally:
        answered.append(0.0)
        sender.join()
    assert_envelope(status, headers, body, 408, "request_timeout")
    assert answered[0] < BODY_TIMEOUT_S + MARGIN_S


def test_fifty_slow_bodies_are_all_answered_and_closed_in_time(hostile: Hostile) -> None:
    socks = [connect(hostile.port) for _ in range(50)]
    started = time.monotonic()
    for i, sock in enumerate(socks):
        sock.sendall(head({"Content-Length": "1000", "X-Request-ID": f"slow-many-{i}"}) + b"12345")
    for sock in socks:
        status, headers, body = read_response(sock)
        assert_envelope(status, headers, body, 408, "request_timeout")
    for sock in socks:
        assert closed_after(sock, started, BODY_TIMEOUT_S + MARGIN_S) < BODY_TIMEOUT_S + MARGIN_S
        sock.close()
    for i in (0, 49):
        assert hostile.record(f"slow-many-{i}")["error"] == "request_timeout"


# --- slow heads and idle connections ---------------------------------------------------------------


def test_a_head_that_trickles_is_closed_at_the_header_timeout(hostile: Hostile) -> None:
    sock = connect(hostile.port)
    started = time.monotonic()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n")

    def trickle() -> None:
        for _ in range(int((HEADER_TIMEOUT_S + MARGIN_S) / 0.2)):
            try:
                sock.sendall(b"x-slow: 1\r\n")
            except OSError:
                return
            time.sleep(0.2)

    sender = threading.Thread(target=trickle)
    sender.start()
    try:
        closed = closed_after(sock, started, HEADER_TIMEOUT_S + MARGIN_S)
    finally:
        sender.join()
        sock.close()
    assert HEADER_TIMEOUT_S * 0.8 <= closed < HEADER_TIMEOUT_S + MARGIN_S


def test_a_silent_new_connection_is_closed_at_the_header_timeout(hostile: Hostile) -> None:
    sock = connect(hostile.port)
    closed = closed_after(sock, time.monotonic(), HEADER_TIMEOUT_S + MARGIN_S)
    sock.close()
    assert HEADER_TIMEOUT_S * 0.8 <= closed < HEADER_TIMEOUT_S + MARGIN_S


def test_keep_alive_outlasts_the_header_timeout_and_then_closes(hostile: Hostile) -> None:
    sock = connect(hostile.port)
    auth = {"Authorization": f"Bearer {hostile.key}", "Content-Type": "application/json"}
    for i in range(2):
        sock.sendall(head({**auth, "Content-Length": str(len(CHAT)), "X-Request-ID": f"keep-{i}"}) + CHAT)
        status, _, body = read_response(sock)
        assert status == 200, body
        idle_from = time.monotonic()
        if i == 0:
            # Idle for longer than a head may take: an idle pooled connection is not a slow head.
            time.sleep(HEADER_TIMEOUT_S + 0.5)
    closed = closed_after(sock, idle_from, KEEP_ALIVE_TIMEOUT_S + MARGIN_S)
    sock.close()
    assert KEEP_ALIVE_TIMEOUT_S * 0.8 <= closed < KEEP_ALIVE_TIMEOUT_S + MARGIN_S


# --- header limits and framing -----------------------------------------------------------------------


def test_a_64kb_header_gets_431_in_the_envelope(hostile: Hostile) -> None:
    sock = connect(hostile.port)
    headers = {"X-Request-ID": "big-header", "X-Big": "a" * 65536, "Content-Length": str(len(CHAT))}
    sock.sendall(head(headers) + CHAT)
    status, resp_headers, body = read_response(sock)
    sock.close()
    assert_envelope(status, resp_headers, body, 431, "request_header_fields_too_large")
    assert resp_headers["x-request-id"] == "big-header"
    assert "x-big" in orjson.loads(body)["error"]["message"]
    assert hostile.record("big-header")["status"] == 431


def test_200_headers_get_431_and_nothing_is_forwarded(hostile: Hostile) -> None:
    request_id = "many-headers"
    headers = {"Authorization": f"Bearer {hostile.key}", "Content-Type": "application/json"}
    headers |= {f"X-Custom-{i}": str(i) for i in range(200)}
    resp = httpx.post(
        f"http://127.0.0.1:{hostile.port}/v1/chat/completions",
        content=CHAT,
        headers={**headers, "X-Request-ID": request_id},
        timeout=10,
    )
    assert resp.status_code == 431
    assert resp.json()["error"]["code"] == "request_header_fields_too_large"
    assert resp.headers["x-request-id"] == request_id
    assert hostile.record(request_id)["error"] == "request_header_fields_too_large"
    assert [e for e in hostile.mocks.beta.requests() if e["id"] == request_id] == []


def test_a_head_just_under_the_limits_is_forwarded(hostile: Hostile) -> None:
    request_id = "under-limits"
    headers = {
        "Authorization": f"Bearer {hostile.key}",
        "Content-Type": "application/json",
        "Content-Length": str(len(CHAT)),
        "X-Request-ID": request_id,
        "OpenAI-Beta": "assistants=v2",
        "X-Stainless-Lang": "python",
        "X-Stainless-Package-Version": "1.40.0",
    }
    # 100 headers in all (Host included), one line of exactly 8 KiB, under 32 KiB together.
    headers |= {f"X-Pad-{i}": "p" * 100 for i in range(100 - 1 - len(headers) - 1)}
    headers["X-Big"] = "b" * (8 * 1024 - len("X-Big: \r\n"))
    raw = head(headers)
    assert raw.count(b"\r\n") - 2 == 100 and len(raw) < 32 * 1024
    sock = connect(hostile.port)
    sock.sendall(raw + CHAT)
    status, _, body = read_response(sock)
    sock.close()
    assert status == 200, body
    seen = hostile.mocks.beta.request(request_id)["headers"]
    assert seen["openai-beta"] == "assistants=v2"
    assert seen["x-stainless-lang"] == "python"
    assert seen["x-pad-0"] == "p" * 100
    assert len(seen["x-big"]) == len(headers["X-Big"])
    assert "authorization" not in seen


def test_transfer_encoding_with_content_length_gets_400_and_close(hostile: Hostile) -> None:
    sock = connect(hostile.port)
    chunked = f"{len(CHAT):x}\r\n".encode() + CHAT + b"\r\n0\r\n\r\n"
    headers = {
        "Authorization": f"Bearer {hostile.key}",
        "Transfer-Encoding": "chunked",
        "Content-Length": "5",
        "X-Request-ID": "te-and-cl",
    }
    sock.sendall(head(headers) + chunked)
    status, resp_headers, body = read_response(sock)
    assert_envelope(status, resp_headers, body, 400, "invalid_request")
    assert resp_headers["connection"] == "close"
    assert closed_after(sock, time.monotonic(), MARGIN_S) < MARGIN_S
    sock.close()
    assert hostile.record("te-and-cl")["error"] == "invalid_request"
    # Chunked alone is a fine way to send a body.
    sock = connect(hostile.port)
    del headers["Content-Length"]
    sock.sendall(head({**headers, "X-Request-ID": "te-only"}) + chunked)
    status, _, body = read_response(sock)
    sock.close()
    assert status == 200, body


# --- connection cap ------------------------------------------------------------------------------------


def test_at_the_connection_cap_new_connections_wait_until_a_slot_frees(tmp_path: Path, mocks: Mocks) -> None:
    key = new_key()
    config = config_text(mocks, key, tmp_path / "events.jsonl").replace(
        f"header_timeout_s = {HEADER_TIMEOUT_S}", "header_timeout_s = 30\nmax_connections = 3"
    )
    proc = start_gateway(tmp_path, mocks, config)
    held = [connect(proc.port) for _ in range(3)]
    try:
        time.sleep(0.3)
        waiting = connect(proc.port)  # the kernel completes the handshake; the worker does not take it
        waiting.sendall(head({}, "/healthz", "GET"))
        waiting.settimeout(1.0)
        with pytest.raises(TimeoutError):
            waiting.recv(65536)
        held.pop().close()
        waiting.settimeout(5.0)
        status, _, body = read_response(waiting)
        assert (status, body) == (200, b'{"status":"ok"}')
        waiting.close()
        assert "max_connections (3)" in proc.log.read_text()
    finally:
        for sock in held:
            sock.close()
        proc.stop()
