"""Hostile or careless client input over real HTTP: repeated credentials, oversized text, odd paths.

A gateway of its own with a file sink, so each test can read the one record its request left.
"""

from __future__ import annotations

import socket
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from proxy.request.auth import key_digest, new_key
from tests.conftest import Mocks, Proc, RedisServer, event_lines, event_records, start_gateway

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
        return event_records(self.events_path)

    def event_line(self, request_id: str, timeout_s: float = 5.0) -> bytes:
        """The raw record line of one request, once written."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.events_path.exists():
                found = [line for line in event_lines(self.events_path) if request_id.encode() in line]
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


# Client text echoed or recorded: cut to 256 characters

SMALL = 2048  # bytes: an error body or a record line with every client string cut to 256 characters


def raw_request(port: int, request_line: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            f"{request_line}\r\nHost: x\r\nConnection: close\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode()
            + body
        )
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/images/generations"])
def test_a_900_kb_model_name_gets_a_small_404_and_a_small_record(sg: Setup, path: str) -> None:
    huge = "gpt-5-" + "x" * 900_000
    request_id = "huge-model-" + path.rsplit("/", 1)[-1]
    resp = httpx.post(
        sg.base + path,
        json={**CHAT, "model": huge},
        headers={"Authorization": sg.bearer(), "X-Request-ID": request_id},
        timeout=30,
    )
    message = assert_envelope(resp, 404, "model_not_found")
    assert len(resp.content) < SMALL
    assert f"'{huge[:255]}…'" in message
    line = sg.event_line(request_id)
    assert len(line) < SMALL, len(line)
    event = orjson.loads(line)
    assert event["model"] == huge[:255] + "…"
    assert event["error"] == "model_not_found"


def test_a_served_900_kb_model_name_is_recorded_cut(sg: Setup) -> None:
    huge = "alpha-" + "x" * 900_000
    resp = httpx.post(
        sg.base + "/v1/chat/completions",
        json={**CHAT, "model": huge},
        headers={"Authorization": sg.bearer(), "X-Request-ID": "huge-served"},
        timeout=30,
    )
    assert resp.status_code == 200, resp.text[:300]
    line = sg.event_line("huge-served")
    assert len(line) < SMALL
    event = orjson.loads(line)
    assert event["model"] == event["upstream_model"] == huge[:255] + "…"


@pytest.mark.parametrize("start", [0, 230, 250])
def test_a_key_pasted_where_the_cut_falls_stays_masked(sg: Setup, start: int) -> None:
    pasted = sg.keys["other"]
    model = "m" * start + pasted + "/" + "x" * 5000
    request_id = f"pasted-{start}"
    resp = chat(sg, [("Authorization", sg.bearer()), ("X-Request-ID", request_id)], {**CHAT, "model": model})
    assert_envelope(resp, 404, "model_not_found")
    line = sg.event_line(request_id)
    hidden = pasted[7:-4]
    for text in (resp.text, line.decode()):
        assert not any(hidden[i : i + 5] in text for i in range(len(hidden) - 4)), text


def test_a_long_x_ai_provider_is_cut_in_the_message(sg: Setup) -> None:
    name = "provider-" + "p" * 4000
    resp = chat(sg, [("Authorization", sg.bearer()), ("X-AI-Provider", name), ("X-Request-ID", "long-provider")])
    message = assert_envelope(resp, 404, "not_found")
    assert len(resp.content) < SMALL
    assert message.startswith(f"Unknown provider '{name[:255]}…' in X-AI-Provider. Configured providers: alpha, beta.")
    assert len(sg.event_line("long-provider")) < SMALL


@pytest.mark.parametrize(
    ("target", "fragment"),
    [
        ("/v1/files/" + "a" * 6000, "Cannot route /v1/files/aaa"),
        ("/" + "b" * 6000, "Unknown path '/bbb"),
    ],
    ids=["passthrough", "no prefix"],
)
def test_a_long_unknown_path_gets_a_small_404(sg: Setup, target: str, fragment: str) -> None:
    request_id = "long-path-" + target[1]
    answer = raw_request(
        sg.proc.port, f"GET {target} HTTP/1.1", {"Authorization": sg.bearer(), "X-Request-ID": request_id}
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404 "), answer[:300]
    assert len(body) < SMALL, len(body)
    assert fragment.encode() in body
    assert b"\xe2\x80\xa6" in body  # the cut is marked
    assert len(sg.event_line(request_id)) < SMALL


def test_a_long_method_is_cut_in_the_message_and_the_record(sg: Setup) -> None:
    method = "PATCH" + "X" * 6000
    answer = raw_request(
        sg.proc.port,
        f"{method} /v1/chat/completions HTTP/1.1",
        {"Authorization": sg.bearer(), "X-Request-ID": "long-method"},
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 405 "), answer[:300]
    assert len(body) < SMALL, len(body)
    line = sg.event_line("long-method")
    assert len(line) < SMALL
    assert orjson.loads(line)["method"] == method[:255] + "…"


# Passthrough paths


@pytest.mark.parametrize(
    ("method", "target", "problem"),
    [
        ("GET", "/v1//admin", "an empty segment"),
        ("GET", "/v1/files//admin", "an empty segment"),
        ("GET", "/v1/files/", "an empty segment"),
        ("GET", "/api/v1//files", "an empty segment"),
        ("POST", "/v1//chat/completions", "an empty segment"),
        ("POST", "/v1/chat/completions/", "an empty segment"),
        ("GET", "/v1/a%00b", "the control character '\\x00'"),
        ("GET", "/v1/files/a%00", "the control character '\\x00'"),
        ("GET", "/v1/files/a%0d%0aX-Injected:%201", "the control character '\\r'"),
        ("GET", "/v1/files/a%7Fb", "the control character '\\x7f'"),
        ("GET", "/v1/..;/x", "';'"),
        ("GET", "/v1/files/..;/admin", "';'"),
        ("GET", "/v1/files/a;b", "';'"),
        ("GET", "/v1/files/a%3Bb", "';'"),
        ("POST", "/v1/chat/completions;x", "';'"),
    ],
)
def test_passthrough_refuses_empty_segments_nul_and_semicolons(
    sg: Setup, method: str, target: str, problem: str
) -> None:
    request_id = f"path-{zlib.crc32(target.encode())}"
    headers = {"Authorization": sg.bearer(), "X-AI-Provider": "alpha", "X-Request-ID": request_id}
    headers["Content-Type"] = "application/json"
    answer = raw_request(sg.proc.port, f"{method} {target} HTTP/1.1", headers, orjson.dumps(CHAT))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), answer[:300]
    assert f"x-request-id: {request_id}".encode() in head.lower()
    error = orjson.loads(body)["error"]
    assert error["code"] == "invalid_request"
    assert error["message"].startswith(f"The path has {problem}")
    assert "it is not forwarded" in error["message"]
    assert sg.mocks.alpha.requests() == [] and sg.mocks.beta.requests() == []
    assert sg.event(request_id)["status"] == 400


def test_a_doubled_prefix_gets_a_404_that_says_so_and_reaches_no_provider(sg: Setup) -> None:
    # The SDK with a base URL that already ends in /v1, plus another /v1 a user added.
    client = openai.OpenAI(base_url=sg.base + "/v1/v1", api_key=sg.keys["main"], max_retries=0)
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="mock-chat", messages=[{"role": "user", "content": "hi"}])
    error = info.value.body
    assert isinstance(error, dict) and error["code"] == "not_found"
    assert error["message"].startswith(
        "Unknown path '/v1/v1/chat/completions': the prefix is there twice. The base URL must end in '/v1' once"
    )
    assert sg.mocks.alpha.requests() == [] and sg.mocks.beta.requests() == []


def test_a_trailing_slash_on_a_model_route_is_refused_with_the_path_to_use(sg: Setup) -> None:
    resp = httpx.post(sg.base + "/v1/chat/completions/", json=CHAT, headers={"Authorization": sg.bearer()}, timeout=10)
    message = assert_envelope(resp, 400, "invalid_request")
    assert message.startswith(
        "The path has an empty segment (a trailing '/'); it is not forwarded. "
        "Send it to /v1/chat/completions, without the '/'."
    )
    assert sg.mocks.alpha.requests() == [] and sg.mocks.beta.requests() == []


def test_a_normal_passthrough_path_still_goes_through(sg: Setup) -> None:
    headers = {"Authorization": sg.bearer(), "X-AI-Provider": "alpha"}
    answer = raw_request(sg.proc.port, "GET /v1/files/file-abc_1.2-x/content?purpose=a%26b HTTP/1.1", headers)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
    (entry,) = sg.mocks.alpha.requests()
    assert entry["raw_path"] == "/v1/files/file-abc_1.2-x/content?purpose=a%26b"
    resp = httpx.post(
        sg.base + "/v1/images/generations",
        json={"model": "beta-image", "prompt": "x"},
        headers={"Authorization": sg.bearer()},
    )
    assert resp.status_code == 200
    assert resp.json()["path"] == "/v1/images/generations"
