"""Hostile or careless client input over real HTTP: repeated credentials, oversized text, odd paths.

A gateway of its own with a file sink, so each test can read the one record its request left.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from proxy.auth import key_digest, new_key
from tests.conftest import Mocks, Proc, RedisServer, start_gateway

CHAT: dict[str, Any] = {"model": "mock-chat", "messages": [{"role": "user", "content": "hi"}]}
TWO_CREDENTIALS = "Two credentials were sent: "


def input_config(mocks: Mocks, keys: dict[str, str], events: Path) -> str:
    return f"""
[server]
max_body_bytes = 2097152

[events]
sink = "file"
path = "{events}"

[[providers]]
name = "alpha"
base_url = "{mocks.alpha.url}/v1"
api_key_env = "SG_TEST_ALPHA_KEY"
models = ["mock-chat", "alpha-*"]

[[providers]]
name = "beta"
base_url = "{mocks.beta.url}/v1"
models = ["beta-*"]

[[keys]]
name = "main"
sha256 = "{key_digest(keys["main"])}"

[[keys]]
name = "other"
sha256 = "{key_digest(keys["other"])}"
"""


@dataclass
class Setup:
    proc: Proc
    keys: dict[str, str]
    events_path: Path
    mocks: Mocks

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.proc.port}"

    def bearer(self, name: str = "main") -> str:
        return f"Bearer {self.keys[name]}"

    def events(self) -> list[dict[str, Any]]:
        if not self.events_path.exists():
            return []
        return [orjson.loads(line) for line in self.events_path.read_bytes().splitlines() if line]

    def event_line(self, request_id: str, timeout_s: float = 5.0) -> bytes:
        """The raw record line of one request, once written."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.events_path.exists():
                found = [line for line in self.events_path.read_bytes().splitlines() if request_id.encode() in line]
                if found:
                    assert len(found) == 1, found
                    return found[0]
            time.sleep(0.05)
        raise AssertionError(f"no event record for {request_id}")

    def event(self, request_id: str) -> dict[str, Any]:
        event: dict[str, Any] = orjson.loads(self.event_line(request_id))
        assert event["request_id"] == request_id
        return event


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, mocks: Mocks, redis_server: RedisServer) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("client-input")
    keys = {"main": new_key(), "other": new_key()}
    events = tmp / "events.jsonl"
    proc = start_gateway(tmp, mocks, input_config(mocks, keys, events), redis_url=redis_server.url)
    try:
        yield Setup(proc, keys, events, mocks)
    finally:
        proc.stop()


@pytest.fixture
def sg(setup: Setup) -> Iterator[Setup]:
    for mock in (setup.mocks.alpha, setup.mocks.beta):
        mock.reset()
    yield setup
    for mock in (setup.mocks.alpha, setup.mocks.beta):
        mock.reset()


def assert_envelope(resp: httpx.Response, status: int, code: str) -> str:
    assert resp.status_code == status, resp.text[:500]
    error = resp.json()["error"]
    assert error["code"] == code
    assert error["request_id"] == resp.headers["x-request-id"]
    assert "Traceback" not in resp.text
    message: str = error["message"]
    return message


def chat(sg: Setup, headers: list[tuple[str, str]], body: dict[str, Any] | None = None) -> httpx.Response:
    # A list of pairs: httpx sends each, repeated names included, in this order.
    return httpx.post(sg.base + "/v1/chat/completions", json=body or CHAT, headers=headers, timeout=10)


# Repeated credentials


@pytest.mark.parametrize("valid_first", [True, False], ids=["valid first", "valid last"])
def test_two_authorization_headers_are_refused_in_either_order(sg: Setup, valid_first: bool) -> None:
    unknown = "Bearer " + new_key()
    pair = [sg.bearer(), unknown] if valid_first else [unknown, sg.bearer()]
    resp = chat(sg, [("Authorization", pair[0]), ("Authorization", pair[1]), ("X-Request-ID", f"dup-{valid_first}")])
    message = assert_envelope(resp, 400, "invalid_request")
    assert message.startswith(TWO_CREDENTIALS + "two Authorization headers with different values. Send exactly one")
    assert sg.keys["main"][3:] not in resp.text and unknown[10:] not in resp.text
    assert sg.mocks.alpha.requests() == []
    event = sg.event(f"dup-{valid_first}")
    assert (event["status"], event["error"], event["key"]) == (400, "invalid_request", None)


def test_two_authorization_headers_on_a_raw_socket(sg: Setup) -> None:
    """The same over a bare socket, so no client library merges or reorders the headers."""
    body = orjson.dumps(CHAT)
    for first, second in ((sg.bearer(), sg.bearer("other")), (sg.bearer("other"), sg.bearer())):
        with socket.create_connection(("127.0.0.1", sg.proc.port), timeout=10) as sock:
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                + f"Authorization: {first}\r\nContent-Type: application/json\r\n".encode()
                + f"Authorization: {second}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 400 "), answer
        assert b"two Authorization headers with different values" in answer
    assert sg.mocks.alpha.requests() == []


def test_two_different_x_api_keys_are_refused(sg: Setup) -> None:
    resp = chat(sg, [("X-API-Key", sg.keys["main"]), ("X-API-Key", sg.keys["other"])])
    message = assert_envelope(resp, 400, "invalid_request")
    assert message.startswith(TWO_CREDENTIALS + "two X-API-Key headers with different values.")


@pytest.mark.parametrize("authorization_first", [True, False])
def test_authorization_and_x_api_key_naming_different_keys_are_refused(sg: Setup, authorization_first: bool) -> None:
    pair = [("Authorization", sg.bearer()), ("X-API-Key", sg.keys["other"])]
    resp = chat(sg, pair if authorization_first else pair[::-1])
    message = assert_envelope(resp, 400, "invalid_request")
    assert message.startswith(TWO_CREDENTIALS + "an Authorization header and an X-API-Key header with different keys.")
    assert sg.mocks.alpha.requests() == []


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(lambda sg: [("Authorization", sg.bearer()), ("X-API-Key", sg.keys["main"])], id="both, same key"),
        pytest.param(lambda sg: [("Authorization", sg.bearer()), ("Authorization", sg.bearer())], id="same twice"),
        pytest.param(
            lambda sg: [("X-API-Key", sg.keys["main"]), ("X-API-Key", sg.keys["main"])], id="same x-api-key twice"
        ),
        pytest.param(
            lambda sg: [("Authorization", "Basic dXNlcjpwYXNz"), ("X-API-Key", sg.keys["main"])], id="nginx basic"
        ),
    ],
)
def test_one_key_sent_in_more_than_one_header_is_fine(sg: Setup, headers: Any) -> None:
    resp = chat(sg, headers(sg))
    assert resp.status_code == 200, resp.text
