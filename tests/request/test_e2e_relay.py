"""The relay seen by real clients: the openai SDK, raw HTTP, timing of chunks."""

from __future__ import annotations

import socket
import time
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.conftest import Gateway, assert_unbuffered, assert_upstream_closed_on_leave, send_raw

MESSAGES: list[Any] = [{"role": "user", "content": "say something"}]


def sdk(gw: Gateway, prefix: str = "/v1", key: str = "main") -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base + prefix, api_key=gw.keys[key], max_retries=0, timeout=10)


def sse_events(raw: bytes) -> list[bytes]:
    return [e[len(b"data: ") :] for e in raw.split(b"\n\n") if e.startswith(b"data: ")]


@pytest.mark.parametrize("prefix", ["/v1", "/api/v1"])
def test_sdk_non_stream(gw: Gateway, prefix: str) -> None:
    result = sdk(gw, prefix).chat.completions.create(model="mock-chat", messages=MESSAGES)
    assert result.choices[0].message.content is not None
    assert result.choices[0].message.content.startswith("[mock-a] tok0")
    assert result.usage is not None
    assert result.usage.completion_tokens == 6


@pytest.mark.parametrize("prefix", ["/v1", "/api/v1"])
def test_sdk_stream(gw: Gateway, prefix: str) -> None:
    stream = sdk(gw, prefix).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "[mock-a] tok0 tok1 tok2 tok3 tok4 tok5 "
    # The gateway asked upstream for usage; a client that did not ask never sees the usage-only event.
    assert all(c.choices for c in chunks)
    upstream = gw.mocks["alpha"].requests()[-1]
    assert upstream["body"]["model"] == "mock-chat"
    assert upstream["body"]["stream_options"] == {"include_usage": True}


def test_sdk_stream_with_usage_when_asked(gw: Gateway) -> None:
    stream = sdk(gw).chat.completions.create(
        model="mock-chat", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6


def test_sdk_completions_and_embeddings(gw: Gateway) -> None:
    client = sdk(gw)
    completion = client.completions.create(model="mock-chat", prompt="one two three")
    assert completion.choices[0].text.startswith("[mock-a]")
    embedding = client.embeddings.create(model="mock-embed", input=["a", "b"])
    assert [d.index for d in embedding.data] == [0, 1]
    assert len(embedding.data[0].embedding) == 8


def test_sdk_models_lists_what_the_key_may_use(gw: Gateway) -> None:
    ids = [m.id for m in sdk(gw).models.list()]
    assert ids == ["dead-chat", "gpt-4o-mini", "mock-chat", "mock-embed", "only-dead"]
    assert [m.id for m in sdk(gw, key="limited").models.list()] == ["gpt-4o-mini"]


def test_sdk_errors_map_to_sdk_exceptions(gw: Gateway) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        sdk(gw).chat.completions.create(model="nope-model", messages=MESSAGES)
    assert not_found.value.code == "model_not_found"
    bad = openai.OpenAI(base_url=gw.v1, api_key="sk-" + "z" * 48, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="mock-chat", messages=MESSAGES)


def test_x_api_key_header(gw: Gateway) -> None:
    resp = httpx.post(
        gw.v1 + "/chat/completions",
        json={"model": "mock-chat", "messages": MESSAGES},
        headers={"X-API-Key": gw.keys["main"]},
    )
    assert resp.status_code == 200


def test_provider_key_added_and_client_credentials_not_forwarded(gw: Gateway) -> None:
    headers = {
        **gw.auth(),
        "X-API-Key": gw.keys["main"],
        "Cookie": "session=1",
        "X-Custom": "kept",
        "X-Request-ID": "cred-1",
    }
    resp = httpx.post(gw.v1 + "/chat/completions", json={"model": "mock-chat", "messages": MESSAGES}, headers=headers)
    assert resp.status_code == 200
    seen = gw.mocks["alpha"].request("cred-1")["headers"]
    assert seen["authorization"] == f"Bearer {gw.provider_key}"
    assert "x-api-key" not in seen
    assert "cookie" not in seen
    assert seen["x-custom"] == "kept"
    assert seen["x-request-id"] == "cred-1"
    assert all(gw.keys["main"] not in v for v in seen.values())


def test_pinned_provider(gw: Gateway) -> None:
    body = {"model": "mock-chat", "messages": MESSAGES}
    resp = httpx.post(gw.v1 + "/chat/completions", json=body, headers={**gw.auth(), "X-AI-Provider": "beta"})
    assert resp.json()["choices"][0]["message"]["content"].startswith("[mock-b]")
    assert gw.mocks["alpha"].requests() == []
    unknown = httpx.post(gw.v1 + "/chat/completions", json=body, headers={**gw.auth(), "X-AI-Provider": "nope"})
    assert unknown.status_code == 404
    assert "alpha, beta, dead" in unknown.json()["error"]["message"]


@pytest.mark.parametrize(
    ("fault", "value"), [("status", 503), ("status", 429), ("hang", "headers"), ("reset-after", 0)]
)
def test_fallback_to_second_provider(gw: Gateway, fault: str, value: Any) -> None:
    gw.mocks["alpha"].faults(**{fault: value})
    result = sdk(gw).chat.completions.create(model="mock-chat", messages=MESSAGES)
    assert result.choices[0].message.content is not None
    assert result.choices[0].message.content.startswith("[mock-b]")


def test_fallback_on_connect_error(gw: Gateway) -> None:
    # "dead" (priority -1) refuses connections; alpha answers next.
    result = sdk(gw).chat.completions.create(model="dead-chat", messages=MESSAGES)
    assert result.choices[0].message.content is not None
    assert result.choices[0].message.content.startswith("[mock-a]")


def test_stream_fallback_before_first_byte(gw: Gateway) -> None:
    gw.mocks["alpha"].faults(status=502)
    stream = sdk(gw).chat.completions.create(model="mock-chat", messages=MESSAGES, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text.startswith("[mock-b]")


def test_stream_headers(gw: Gateway) -> None:
    body = {"model": "mock-chat", "messages": MESSAGES, "stream": True}
    with httpx.stream("POST", gw.v1 + "/chat/completions", json=body, headers=gw.auth()) as resp:
        resp.read()
    assert resp.headers["content-type"] == "text/event-stream"
    assert resp.headers["cache-control"] == "no-cache"
    assert resp.headers["x-accel-buffering"] == "no"
    assert resp.headers["x-request-id"].startswith("req_")
    assert "content-encoding" not in resp.headers
    events = sse_events(resp.content)
    assert events[-1] == b"[DONE]"


def test_streaming_is_unbuffered(gw: Gateway) -> None:
    assert_unbuffered(gw.v1 + "/chat/completions", gw, "unbuffered-1")


def test_client_disconnect_mid_stream_closes_upstream(gw: Gateway) -> None:
    entry = assert_upstream_closed_on_leave(gw.proc.port, gw, "gone-1")
    assert len(entry["chunk_sent_at"]) < 200


def test_client_disconnect_while_waiting_for_headers(gw: Gateway) -> None:
    body = {"model": "beta-chat", "messages": MESSAGES}
    sock = send_raw(gw.proc.port, body, {**gw.auth(), "x-mock-hang": "headers", "X-Request-ID": "gone-2"})
    gw.mocks["beta"].request("gone-2", done=False)
    time.sleep(0.2)
    sock.close()
    closed_at = time.time()
    entry = gw.mocks["beta"].request("gone-2", timeout_s=5)
    assert entry["outcome"] == "disconnected"
    assert entry["disconnected_at"] - closed_at < 1.0


def test_upstream_reset_mid_stream_ends_with_one_error_event(gw: Gateway) -> None:
    body = {"model": "mock-chat", "messages": MESSAGES, "stream": True}
    headers = {**gw.auth(), "x-mock-reset-after": "3"}
    with httpx.stream("POST", gw.v1 + "/chat/completions", json=body, headers=headers, timeout=10) as resp:
        raw = resp.read()  # a clean end of the chunked body: no exception here
    assert resp.status_code == 200
    events = sse_events(raw)
    errors = [orjson.loads(e) for e in events if e.startswith(b'{"error"')]
    assert len(errors) == 1
    assert events[-1].startswith(b'{"error"')
    assert errors[0]["error"]["code"] == "upstream_error"
    assert errors[0]["error"]["request_id"] == resp.headers["x-request-id"]
    assert b"Traceback" not in raw
    assert sum(b"tok" in e for e in events) == 3


def test_idle_timeout_mid_stream_is_an_error_event(gw: Gateway) -> None:
    body = {"model": "alpha-chat", "messages": MESSAGES, "stream": True}
    headers = {**gw.auth(), "x-mock-slow-chunk": "2:3000"}
    with httpx.stream("POST", gw.v1 + "/chat/completions", json=body, headers=headers, timeout=10) as resp:
        raw = resp.read()
    events = sse_events(raw)
    assert orjson.loads(events[-1])["error"]["code"] == "upstream_timeout"


def test_a_gap_within_the_idle_limit_is_no_timeout(gw: Gateway) -> None:
    # alpha's idle limit is 1 s; the gateway keeps it with a few ticks per second, never early.
    body = {"model": "alpha-chat", "messages": MESSAGES, "stream": True}
    headers = {**gw.auth(), "x-mock-slow-chunk": "2:750"}
    with httpx.stream("POST", gw.v1 + "/chat/completions", json=body, headers=headers, timeout=10) as resp:
        raw = resp.read()
    events = sse_events(raw)
    assert events[-1] == b"[DONE]"
    assert not any(e.startswith(b'{"error"') for e in events)


def test_a_client_that_reads_slowly_is_not_an_idle_provider(gw: Gateway) -> None:
    # alpha's idle limit is 1 s. The answer is far larger than the socket buffers, so the gateway
    # waits on this client for seconds while the provider, held back by it, sends nothing.
    body = {"model": "alpha-chat", "messages": MESSAGES, "stream": True}
    headers = {**gw.auth(), "x-mock-big-event": str(16 << 20), "Connection": "close"}
    sock = send_raw(gw.proc.port, body, headers)
    time.sleep(3)
    raw = bytearray()
    with sock:
        sock.settimeout(10)
        while part := sock.recv(1 << 20):
            raw += part
    assert raw.startswith(b"HTTP/1.1 200")
    assert len(raw) > 16 << 20
    assert raw.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")  # the whole answer, its chunked framing closed
    assert b'"upstream_timeout"' not in raw[-4096:]


def test_sdk_sees_mid_stream_error(gw: Gateway) -> None:
    client = openai.OpenAI(
        base_url=gw.v1, api_key=gw.keys["main"], max_retries=0, default_headers={"x-mock-reset-after": "2"}
    )
    with pytest.raises(openai.APIError):
        list(client.chat.completions.create(model="mock-chat", messages=MESSAGES, stream=True))


def test_passthrough_routes(gw: Gateway) -> None:
    by_model = httpx.post(gw.v1 + "/images/generations", json={"model": "beta-image", "prompt": "x"}, headers=gw.auth())
    assert by_model.status_code == 200
    assert by_model.json() == {
        "object": "mock.echo",
        "path": "/v1/images/generations",
        "method": "POST",
        "model": "beta-image",
        "mock": "mock-b",
    }
    by_header = httpx.get(gw.base + "/api/v1/files?purpose=x", headers={**gw.auth(), "X-AI-Provider": "alpha"})
    assert by_header.json()["path"] == "/v1/files"
    assert gw.mocks["alpha"].requests()[-1]["path"] == "/v1/files"


def test_x_api_key_wins_over_someone_elses_authorization(gw: Gateway) -> None:
    # nginx auth_basic in front forwards its own Authorization header.
    headers = {"Authorization": "Basic dXNlcjpwYXNz", "X-API-Key": gw.keys["main"]}
    assert (
        httpx.post(
            gw.v1 + "/chat/completions", json={"model": "mock-chat", "messages": MESSAGES}, headers=headers
        ).status_code
        == 200
    )


def test_health_ready_and_metrics_carry_a_request_id(gw: Gateway) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/v1/healthz", "/api/v1/readyz"):
        resp = httpx.get(gw.base + path, headers={"X-Request-ID": "probe-1"})
        assert resp.status_code == 200
        assert resp.headers["x-request-id"] == "probe-1"


def raw_get(port: int, target: str, headers: dict[str, str]) -> tuple[int, bytes]:
    """A GET whose target goes out byte for byte (clients normalise '..' and escapes)."""
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{head}\r\n".encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1]), answer


@pytest.mark.parametrize(
    "target",
    [
        "/v1/files/a%2F..%2F..%2Fadmin",
        "/v1/files/file-abc%3Fpurpose%3Devil%23frag",
        "/v1/..%2Finternal%2Fmetrics",
        "/v1/files/../../admin",
        "/v1/files/%252e%252e/admin",
        "/v1/files/a%5Cb",
    ],
)
def test_passthrough_never_forwards_a_path_that_escapes(gw: Gateway, target: str) -> None:
    status, answer = raw_get(gw.proc.port, target, {**gw.auth(), "X-AI-Provider": "alpha"})
    assert status in (400, 404), answer
    assert gw.mocks["alpha"].requests() == []


def test_passthrough_keeps_the_path_encoded(gw: Gateway) -> None:
    target = "/v1/files/my%20file%7E1?purpose=a%26b"
    status, _ = raw_get(gw.proc.port, target, {**gw.auth(), "X-AI-Provider": "alpha"})
    assert status == 200
    entry = gw.mocks["alpha"].requests()[-1]
    assert entry["path"] == "/v1/files/my file~1"
    assert entry["raw_path"] == target


def test_usage_event_split_across_writes_never_reaches_a_client_that_did_not_ask(gw: Gateway) -> None:
    headers = {**gw.auth(), "x-mock-split-events": "1"}
    client = openai.OpenAI(base_url=gw.v1, api_key=gw.keys["main"], max_retries=0, default_headers=headers)
    chunks = list(client.chat.completions.create(model="mock-chat", messages=MESSAGES, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).startswith("[mock-a] tok0")
    assert all(c.choices for c in chunks)
    with httpx.stream(
        "POST",
        gw.v1 + "/chat/completions",
        json={"model": "mock-chat", "messages": MESSAGES, "stream": True},
        headers=headers,
    ) as resp:
        raw = resp.read()  # fmt: skip
    assert b'"choices":[]' not in raw
    assert raw.endswith(b"data: [DONE]\n\n")


def test_reset_in_the_middle_of_an_event_still_gives_a_parseable_error_event(gw: Gateway) -> None:
    body = {"model": "mock-chat", "messages": MESSAGES, "stream": True}
    with httpx.stream(
        "POST", gw.v1 + "/chat/completions", json=body, headers={**gw.auth(), "x-mock-reset-mid-event": "2"}
    ) as resp:
        raw = resp.read()
    last = raw.rstrip(b"\n").split(b"\n\n")[-1]
    assert last.startswith(b"data: {")
    assert orjson.loads(last[len(b"data: ") :])["error"]["code"] == "upstream_error"
    # The half event already went out (SPEC: no line buffering), so the SDK fails on it before it reaches
    # the error event; what matters is that the stream fails loudly instead of ending as if complete.
    client = openai.OpenAI(
        base_url=gw.v1, api_key=gw.keys["main"], max_retries=0, default_headers={"x-mock-reset-mid-event": "2"}
    )
    with pytest.raises((openai.APIError, ValueError)):
        list(client.chat.completions.create(model="mock-chat", messages=MESSAGES, stream=True))
