"""The provider refusing the gateway's own credential is the gateway's fault, not the client's key.

Real processes: mock-a requires the provider key, so the provider `locked` (mock-a
with a wrong key) is refused for real; `alpha` (mock-a with the right key) is told
to answer 401/403 through the mock's fault knobs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.request.auth import key_digest, new_key
from tests.conftest import Mocks, Proc, RedisServer, event_records, start_gateway

CHAT: dict[str, Any] = {"model": "mock-chat", "messages": [{"role": "user", "content": "hi"}]}
WRONG_PROVIDER_KEY = "sk-wrong-" + "w" * 40


def auth_config(mocks: Mocks, key: str, events: Path) -> str:
    return f"""
[events]
sink = "file"
path = "{events}"

[[providers]]
name = "locked"
base_url = "{mocks.alpha.url}/v1"
api_key_env = "SG_TEST_WRONG_KEY"
models = ["locked-*", "fallback-*"]
priority = 0

[[providers]]
name = "alpha"
base_url = "{mocks.alpha.url}/v1"
api_key_env = "SG_TEST_ALPHA_KEY"
models = ["alpha-*", "spare-*"]
priority = 0

[[providers]]
name = "beta"
base_url = "{mocks.beta.url}/v1"
models = ["fallback-*", "spare-*"]
priority = 1

[[keys]]
name = "main"
sha256 = "{key_digest(key)}"
"""


@dataclass
class Setup:
    proc: Proc
    key: str
    events_path: Path
    mocks: Mocks

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.proc.port}"

    def post(self, model: str, request_id: str, path: str = "/v1/chat/completions", **headers: str) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.key}", "X-Request-ID": request_id, **headers}
        return httpx.post(self.base + path, json={**CHAT, "model": model}, headers=headers, timeout=10)

    def auth_errors(self, provider: str) -> float:
        return self._sample("sluicegate_upstream_auth_errors_total", provider=provider)

    def upstream_errors(self, provider: str, reason: str) -> float:
        return self._sample("sluicegate_upstream_errors_total", provider=provider, reason=reason)

    def _sample(self, name: str, **labels: str) -> float:
        text = httpx.get(self.base + "/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name and s.labels == labels:
                    return float(s.value)
        return 0.0

    def event(self, request_id: str, timeout_s: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.events_path.exists():
                found = [e for e in event_records(self.events_path) if e["request_id"] == request_id]
                if found:
                    assert len(found) == 1, found
                    event: dict[str, Any] = found[0]
                    return event
            time.sleep(0.05)
        raise AssertionError(f"no event record for {request_id}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, mocks: Mocks, redis_server: RedisServer) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("upstream-auth")
    key = new_key()
    events = tmp / "events.jsonl"
    proc = start_gateway(
        tmp, mocks, auth_config(mocks, key, events), redis_url=redis_server.url,
        env={"SG_TEST_WRONG_KEY": WRONG_PROVIDER_KEY},
    )  # fmt: skip
    try:
        yield Setup(proc, key, events, mocks)
    finally:
        proc.stop()


@pytest.fixture
def sg(setup: Setup) -> Iterator[Setup]:
    for mock in (setup.mocks.alpha, setup.mocks.beta):
        mock.reset()
    yield setup
    for mock in (setup.mocks.alpha, setup.mocks.beta):
        mock.reset()


def assert_upstream_auth_error(resp: httpx.Response, provider: str, status: int) -> None:
    assert resp.status_code == 502, resp.text
    error = resp.json()["error"]
    assert error["code"] == "upstream_auth_error"
    assert error["type"] == "api_error"
    assert error["request_id"] == resp.headers["x-request-id"]
    message = error["message"]
    assert f"Provider '{provider}' rejected the gateway's own credential (HTTP {status})" in message
    assert "Your API key is fine" in message
    assert "operators must fix" in message
    # Nothing of the provider's own answer: it may quote the provider key.
    for provider_text in ("Incorrect API key provided", "mock_error", "injected status", "invalid_api_key"):
        assert provider_text not in resp.text
    assert WRONG_PROVIDER_KEY not in resp.text
    assert WRONG_PROVIDER_KEY[3:12] not in resp.text


def test_provider_refusing_our_key_is_502_not_401(sg: Setup) -> None:
    before = sg.auth_errors("locked")
    resp = sg.post("locked-chat", "ua-locked")
    assert_upstream_auth_error(resp, "locked", 401)
    # The mock really saw the wrong key and refused it.
    assert sg.mocks.alpha.request("ua-locked")["headers"]["authorization"] == f"Bearer {WRONG_PROVIDER_KEY}"
    event = sg.event("ua-locked")
    assert (event["status"], event["error"], event["provider"], event["attempts"]) == (
        502, "upstream_auth_error", "locked", 1,
    )  # fmt: skip
    assert sg.auth_errors("locked") == before + 1
    assert sg.upstream_errors("locked", "auth_error") >= 1


@pytest.mark.parametrize("status", [401, 403])
def test_injected_401_and_403_are_502(sg: Setup, status: int) -> None:
    before = sg.auth_errors("alpha")
    resp = sg.post("alpha-chat", f"ua-injected-{status}", **{"x-mock-status": str(status)})
    assert_upstream_auth_error(resp, "alpha", status)
    assert sg.event(f"ua-injected-{status}")["error"] == "upstream_auth_error"
    assert sg.auth_errors("alpha") == before + 1


def test_stream_request_gets_the_same_502(sg: Setup) -> None:
    body = {**CHAT, "model": "locked-chat", "stream": True}
    resp = httpx.post(
        sg.base + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {sg.key}"}, timeout=10
    )
    assert_upstream_auth_error(resp, "locked", 401)


def test_refused_credential_falls_back_to_the_next_provider(sg: Setup) -> None:
    before = sg.auth_errors("locked")
    resp = sg.post("fallback-chat", "ua-fallback")
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"].startswith("[mock-b]")
    event = sg.event("ua-fallback")
    assert (event["status"], event["error"], event["provider"], event["attempts"]) == (200, None, "beta", 2)
    assert sg.auth_errors("locked") == before + 1


def test_403_falls_back_too(sg: Setup) -> None:
    sg.mocks.alpha.faults(status=403)
    before = sg.auth_errors("alpha")
    resp = sg.post("spare-chat", "ua-403-fallback")
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"].startswith("[mock-b]")
    assert len(sg.mocks.alpha.requests()) == 1
    assert sg.auth_errors("alpha") == before + 1


def test_passthrough_gets_the_same_answer(sg: Setup) -> None:
    # The provider credential goes out on passthrough routes too.
    headers = {"Authorization": f"Bearer {sg.key}", "X-AI-Provider": "locked", "X-Request-ID": "ua-pass"}
    resp = httpx.get(sg.base + "/v1/files", headers=headers, timeout=10)
    assert_upstream_auth_error(resp, "locked", 401)
    assert sg.event("ua-pass")["error"] == "upstream_auth_error"
    ok = httpx.get(sg.base + "/v1/files", headers={**headers, "X-AI-Provider": "alpha"}, timeout=10)
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("status", [400, 404, 422, 429])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/images/generations"])
def test_other_upstream_4xx_still_pass_through(sg: Setup, status: int, path: str) -> None:
    request_id = f"ua-4xx-{status}-{path.rsplit('/', 1)[-1]}"
    resp = sg.post("alpha-chat", request_id, path=path, **{"x-mock-status": str(status)})
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["code"] == "mock_error"
    assert sg.event(request_id)["status"] == status
