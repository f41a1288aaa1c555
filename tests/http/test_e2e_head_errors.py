"""Requests refused on their head alone, against a real `sluicegate serve` on bare sockets.

A head that hypercorn's parser (h11) refuses never reaches the gateway's app: hypercorn used to
answer it with a bare status and an empty body. A head with two framings (Transfer-Encoding and
Content-Length) reaches the app and was answered only once its body had been read. Each now gets
the gateway's error envelope at once, and the connection closes after it.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import socket
import ssl
import threading
import time
from typing import Any

import orjson
import pytest
from hypercorn.protocol.h11 import H11Protocol

from proxy.http import internals
from proxy.request.auth import new_key
from proxy.server import H11_MAX_HEAD_BYTES
from tests.conftest import Gateway

ANSWER_TIMEOUT_S = 5.0  # well under the gateway's 30 s body timeout
HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
CHAT = orjson.dumps({"model": "mock-chat", "messages": [{"role": "user", "content": "hi"}]})
CHUNKED_CHAT = b"%x\r\n%b\r\n0\r\n\r\n" % (len(CHAT), CHAT)
TWO_FRAMINGS = HEAD + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n"
FRESH_ID = re.compile(r"req_[0-9a-f]{24}")


def client_hello() -> bytes:
    """The first bytes of a real TLS handshake: what a client told https:// sends to this plain port."""
    outgoing = ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname="gw")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


# h11 refuses a head that is still incomplete past the size hypercorn reads (a complete one may pass).
PAD_LINE = b"X-Pad: " + b"p" * 8000 + b"\r\n"
UNENDING_HEAD = HEAD + PAD_LINE * (H11_MAX_HEAD_BYTES // len(PAD_LINE) + 1)

REFUSED_BY_PARSER = {
    "two-content-lengths": (HEAD + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}", 400, "invalid_request"),
    "negative-content-length": (HEAD + b"Content-Length: -1\r\n\r\n", 400, "invalid_request"),
    "space-before-colon": (HEAD + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n", 400, "invalid_request"),
    "two-hosts": (b"GET /v1/models HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "invalid_request"),
    "nul-in-path": (b"GET /v1/mo\x00dels HTTP/1.1\r\nHost: gw\r\n\r\n", 400, "invalid_request"),
    "tab-in-path": (b"GET /v1/mo\tdels HTTP/1.1\r\nHost: gw\r\n\r\n", 400, "invalid_request"),
    "tls-client-hello": (client_hello(), 400, "invalid_request"),
    "chunked-then-identity": (HEAD + b"Transfer-Encoding: chunked, identity\r\n\r\n", 501, "not_implemented"),
    "head-over-the-parser-limit": (UNENDING_HEAD, 431, "request_header_fields_too_large"),
    # Not a head, but refused by the same parser once the app reads the body: the same answer.
    "malformed-chunk-size": (HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", 400, "invalid_request"),
}


def connect(gw: Gateway) -> socket.socket:
    return socket.create_connection(("127.0.0.1", gw.proc.port), timeout=ANSWER_TIMEOUT_S)


def send(sock: socket.socket, *parts: bytes) -> None:
    """Each part in a write of its own, as a client writes a body while it makes it.

    The gateway may answer and close before a long request is all sent; the answer is still there to read.
    """
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        for part in parts:
            sock.sendall(part)


def read_to_close(sock: socket.socket) -> bytes:
    """All the gateway sends until it closes the connection (EOF, or a reset once request bytes were left unread)."""
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    except TimeoutError as exc:
        raise AssertionError(f"not closed within {ANSWER_TIMEOUT_S}s; received {received[:300]!r}") from exc
    return received


def answer_to(gw: Gateway, data: bytes) -> bytes:
    with connect(gw) as sock:
        send(sock, data)
        return read_to_close(sock)


def assert_closing_envelope(received: bytes, status: int, code: str) -> dict[str, Any]:
    """One whole answer in the error envelope and nothing after it: its body runs to the close."""
    head, blank, body = received.partition(b"\r\n\r\n")
    assert blank, f"no complete answer: {received!r}"
    status_line, *lines = head.decode("latin-1").split("\r\n")
    assert int(status_line.split()[1]) == status, received
    names = [line.split(":", 1)[0].lower() for line in lines]
    assert len(names) == len(set(names)), lines
    headers = {name.lower(): value.strip() for name, value in (line.split(":", 1) for line in lines)}
    assert headers.get("content-type") == "application/json", received
    assert headers.get("connection") == "close"
    assert headers.get("content-length") == str(len(body))
    assert "date" in headers  # hypercorn's own header still goes out
    error: dict[str, Any] = orjson.loads(body)["error"]
    assert (error["code"], error["type"], error["param"]) == (code, "invalid_request_error", None)
    assert error["request_id"] == headers["x-request-id"]
    assert error["message"].endswith(f" (request id: {error['request_id']})")
    return error


# --- heads hypercorn's parser refuses ------------------------------------------------------------------


@pytest.mark.parametrize(("request_bytes", "status", "code"), REFUSED_BY_PARSER.values(), ids=REFUSED_BY_PARSER)
def test_a_head_the_parser_refuses_gets_the_envelope_and_the_close(
    gw: Gateway, request_bytes: bytes, status: int, code: str
) -> None:
    error = assert_closing_envelope(answer_to(gw, request_bytes), status, code)
    assert FRESH_ID.fullmatch(error["request_id"])


def test_the_answer_to_a_malformed_line_never_quotes_it(gw: Gateway) -> None:
    key = new_key()
    received = answer_to(gw, HEAD + f"Authorization : Bearer {key}\r\n\r\n".encode())
    error = assert_closing_envelope(received, 400, "invalid_request")
    assert key[3:].encode() not in received
    assert "authorization" not in error["message"].lower()


def test_hypercorn_answers_a_refused_head_through_the_method_the_gateway_overrides() -> None:
    """Renamed or no longer called, it would let refused heads go out bare again without a sound."""
    assert list(inspect.signature(H11Protocol._send_error_response).parameters) == ["self", "status_code"]
    assert "self._send_error_response(error.error_status_hint)" in inspect.getsource(H11Protocol._handle_events)
    assert "_send_error_response" in vars(internals._EnvelopeH11Protocol)


def test_a_hypercorn_without_that_method_is_noticed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway then serves on with hypercorn's bare answers, and the listener says so at start-up."""

    def hook() -> bool:  # what the start-up check says of that method
        return not any("_send_error_response" in problem for problem in internals.problems())

    assert hook()
    monkeypatch.delattr(H11Protocol, "_send_error_response")
    assert not hook()


# --- two framings: answered on the head, the body unread ----------------------------------------------


@pytest.mark.parametrize(
    "body", [b'a\r\n{"mod', CHUNKED_CHAT], ids=["chunked-framing-never-completes", "whole-body-sent"]
)
def test_transfer_encoding_with_content_length_is_answered_without_waiting_for_the_body(
    gw: Gateway, body: bytes
) -> None:
    with connect(gw) as sock:
        started = time.monotonic()
        send(sock, TWO_FRAMINGS + b"X-Request-ID: two-framings\r\n\r\n" + body)
        received = read_to_close(sock)
        closed = time.monotonic() - started
    error = assert_closing_envelope(received, 400, "invalid_request")
    assert error["request_id"] == "two-framings"
    assert "Transfer-Encoding and Content-Length" in error["message"]
    assert closed < 2.0


def test_a_body_still_coming_keeps_neither_the_answer_nor_the_close_waiting(gw: Gateway) -> None:
    """4 MiB of chunks sent as fast as the socket takes them while the client reads.

    The gateway answers on the head and closes with request bytes unread, so the close is a reset
    and the client's send fails; on Linux what had arrived before the reset stays readable, and
    the whole answer is read (checked here). Without the body taken and dropped meanwhile
    (connections.discarding_body), the answer came but the connection was never closed.
    """
    chunk = b"%x\r\n%b\r\n" % (64 * 1024, b"a" * 64 * 1024)
    # Whether hypercorn's queue filled before the answer went out depended on timing: about half of
    # single tries hung without the fix, so eight make a hang all but certain.
    for _ in range(8):
        with connect(gw) as sock:
            sender = threading.Thread(target=send, args=(sock, TWO_FRAMINGS + b"\r\n", *[chunk] * 64))
            started = time.monotonic()
            sender.start()
            try:
                received = read_to_close(sock)
                closed = time.monotonic() - started
            finally:
                with contextlib.suppress(OSError):  # a reset socket is no longer connected
                    sock.shutdown(socket.SHUT_RDWR)  # a sender still blocked in sendall stops here
                sender.join()
        assert_closing_envelope(received, 400, "invalid_request")
        assert closed < 2.0
