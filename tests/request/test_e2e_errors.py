"""Every error row of SPEC section 4 that belongs to the request path, over real HTTP."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import Gateway

CHAT = {"model": "mock-chat", "messages": [{"role": "user", "content": "hi"}]}


def post(gw: Gateway, path: str, body: Any = None, headers: dict[str, str] | None = None, **kw: Any) -> httpx.Response:
    return httpx.post(gw.v1 + path, json=body, headers=headers if headers is not None else gw.auth(), timeout=10, **kw)


def assert_envelope(resp: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    request_id = resp.headers["x-request-id"]
    error: dict[str, Any] = resp.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["code"] == code
    assert error["request_id"] == request_id
    assert request_id in error["message"]
    assert "Traceback" not in resp.text
    return error


def test_invalid_json(gw: Gateway) -> None:
    resp = post(
        gw, "/chat/completions", content=b"{not json", headers={**gw.auth(), "content-type": "application/json"}
    )
    assert_envelope(resp, 400, "invalid_json")


def test_missing_model(gw: Gateway) -> None:
    error = assert_envelope(post(gw, "/chat/completions", {"messages": []}), 400, "missing_model")
    assert error["param"] == "model"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ([1, 2], None),
        ({"model": 5, "messages": []}, "model"),
        ({"model": "mock-chat", "messages": [], "stream": "yes"}, "stream"),
        ({"model": "mock-chat"}, "messages"),
    ],
)
def test_wrong_shape(gw: Gateway, body: Any, param: str | None) -> None:
    error = assert_envelope(post(gw, "/chat/completions", body), 400, "invalid_request")
    assert error["param"] == param


@pytest.mark.parametrize(
    ("headers", "fragment"),
    [
        ({}, "Missing API key"),
        ({"Authorization": ""}, "is empty"),
        ({"Authorization": "KEY"}, "missing the 'Bearer ' prefix"),
        ({"Authorization": "Bearer  KEY"}, "whitespace"),
        ({"Authorization": "Bearer"}, "no key after it"),
        ({"Authorization": "Bearer pk-not-ours"}, "does not start with 'sk-'"),
        ({"X-API-Key": ""}, "no key after it"),
        ({"X-API-Key": "KEY extra"}, "whitespace"),
        ({"Authorization": "Bearer UNKNOWN"}, "does not know it"),
        ({"Authorization": "Bearer DISABLED"}, "disabled"),
    ],
)
def test_invalid_api_key(gw: Gateway, headers: dict[str, str], fragment: str | None) -> None:
    key = gw.keys["main"]
    unknown = "sk-" + "x" * 48
    filled = {
        k: v.replace("UNKNOWN", unknown).replace("DISABLED", gw.keys["disabled"]).replace("KEY", key)
        for k, v in headers.items()
    }
    resp = post(gw, "/chat/completions", CHAT, headers=filled)
    error = assert_envelope(resp, 401, "invalid_api_key")
    if fragment is not None:
        assert fragment in error["message"]
    for secret in (key, unknown, gw.keys["disabled"]):
        assert secret not in resp.text
        assert secret[3:20] not in resp.text


def test_model_not_allowed(gw: Gateway) -> None:
    resp = post(gw, "/chat/completions", {**CHAT, "model": "beta-chat"}, headers=gw.auth("limited"))
    assert_envelope(resp, 403, "model_not_allowed")
    # The same key may use its alias.
    assert (
        post(gw, "/chat/completions", {**CHAT, "model": "gpt-4o-mini"}, headers=gw.auth("limited")).status_code == 200
    )


def test_model_not_found_suggests(gw: Gateway) -> None:
    error = assert_envelope(post(gw, "/chat/completions", {**CHAT, "model": "gpt4o-mini"}), 404, "model_not_found")
    assert "'gpt-4o-mini'" in error["message"]


@pytest.mark.parametrize("path", ["/chat/completions", "/models", "/v2/chat/completions"])
def test_path_without_prefix(gw: Gateway, path: str) -> None:
    resp = httpx.post(gw.base + path, json=CHAT, headers=gw.auth())
    error = assert_envelope(resp, 404, "not_found")
    assert "must end in '/v1'" in error["message"]


def test_request_too_large(gw: Gateway) -> None:
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 70000}]}
    assert_envelope(post(gw, "/chat/completions", big), 413, "request_too_large")


def test_request_too_large_chunked(gw: Gateway) -> None:
    def body() -> Any:
        for _ in range(20):
            yield b"x" * 8192

    resp = httpx.post(gw.v1 + "/chat/completions", content=body(), headers=gw.auth(), timeout=10)
    assert_envelope(resp, 413, "request_too_large")


def test_every_provider_down_is_502(gw: Gateway) -> None:
    error = assert_envelope(post(gw, "/chat/completions", {**CHAT, "model": "only-dead"}), 502, "upstream_error")
    assert "dead" in error["message"]


def test_garbage_answer_is_502(gw: Gateway) -> None:
    resp = post(gw, "/chat/completions", {**CHAT, "model": "alpha-chat"}, headers={**gw.auth(), "x-mock-garbage": "1"})
    assert_envelope(resp, 502, "upstream_error")


def test_upstream_5xx_after_fallbacks_is_502(gw: Gateway) -> None:
    gw.mocks["alpha"].faults(status=503)
    gw.mocks["beta"].faults(status=500)
    error = assert_envelope(post(gw, "/chat/completions", CHAT), 502, "upstream_error")
    assert "HTTP 500" in error["message"]


def test_first_byte_timeout_is_504(gw: Gateway) -> None:
    headers = {**gw.auth(), "x-mock-hang": "headers"}
    resp = post(gw, "/chat/completions", {**CHAT, "model": "alpha-chat"}, headers=headers)
    assert_envelope(resp, 504, "upstream_timeout")


@pytest.mark.parametrize("status", [400, 404, 422])
def test_upstream_4xx_passes_through(gw: Gateway, status: int) -> None:
    resp = post(
        gw, "/chat/completions", {**CHAT, "model": "alpha-chat"}, headers={**gw.auth(), "x-mock-status": str(status)}
    )
    assert resp.status_code == status
    assert resp.json()["error"]["code"] == "mock_error"
    assert resp.headers["x-request-id"]


def test_upstream_429_passes_through_after_fallback(gw: Gateway) -> None:
    gw.mocks["alpha"].faults(status=429)
    gw.mocks["beta"].faults(status=429)
    resp = post(gw, "/chat/completions", CHAT)
    assert resp.status_code == 429
    assert resp.json()["error"]["code"] == "mock_error"
    assert len(gw.mocks["alpha"].requests()) == 1
    assert len(gw.mocks["beta"].requests()) == 1


def test_wrong_method(gw: Gateway) -> None:
    resp = httpx.get(gw.v1 + "/chat/completions", headers=gw.auth())
    assert_envelope(resp, 405, "method_not_allowed")


def test_passthrough_without_model_or_provider_is_404(gw: Gateway) -> None:
    resp = httpx.get(gw.v1 + "/files", headers=gw.auth())
    assert_envelope(resp, 404, "not_found")


def test_request_id_is_kept_when_sane(gw: Gateway) -> None:
    resp = post(gw, "/chat/completions", {"messages": []}, headers={**gw.auth(), "X-Request-ID": "support-123"})
    assert resp.headers["x-request-id"] == "support-123"
    assert resp.json()["error"]["request_id"] == "support-123"
    odd = post(gw, "/chat/completions", {"messages": []}, headers={**gw.auth(), "X-Request-ID": "a b<script>"})
    assert odd.headers["x-request-id"].startswith("req_")
