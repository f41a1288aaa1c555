"""Cost in every event record, end to end: a real gateway, the mock upstreams, a real Redis.

The costs in the records must be the price table applied to the usage the record
shows: non-stream and stream, globs, cached prompt tokens, a client gone mid-stream
(what was delivered), a fallback (only the attempt that answered). A request the
upstream never billed costs 0; usage of a model without a price costs null.
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
from tests.conftest import Mock, Proc, RedisServer, event_records, free_port, send_raw, start_mock

CHAT: dict[str, Any] = {"model": "mock-chat", "messages": [{"role": "user", "content": "how much is this"}]}
# What the config below says, per million tokens.
MOCK_CHAT = (0.27, 1.10, 0.07)  # input, output, cached_input
ALPHA_GLOB = (3.0, 15.0)


def expected_cost(
    input_price: float, output_price: float, record: dict[str, Any], cached: int = 0, cached_price: float = 0.0
) -> float:
    prompt, completion = record["prompt_tokens"], record["completion_tokens"]
    total = (prompt - cached) * input_price + cached * cached_price + completion * output_price
    return round(total / 1_000_000, 10)


def prices_config(a: Mock, b: Mock, events: Path, keys: dict[str, str]) -> str:
    return f"""
[events]
sink = "file"
path = "{events}"

[[providers]]
name = "alpha"
base_url = "{a.url}/v1"
models = ["mock-chat", "alpha-*"]
priority = 0

[[providers]]
name = "beta"
base_url = "{b.url}/v1"
models = ["mock-chat", "free-*"]
priority = 1

[[prices]]
model = "mock-chat"
input = {MOCK_CHAT[0]}
output = {MOCK_CHAT[1]}
cached_input = {MOCK_CHAT[2]}
currency = "EUR"

[[prices]]
model = "alpha-*"
input = {ALPHA_GLOB[0]}
output = {ALPHA_GLOB[1]}

[[prices]]
model = "alpha-*-mini"  # shadowed: the first glob in file order wins
input = 0
output = 0

[[keys]]
name = "main"
sha256 = "{key_digest(keys["main"])}"

[[keys]]
name = "tight-priced"  # bucket names are per key name; other modules have a "tight" in the same Redis
sha256 = "{key_digest(keys["tight"])}"
rpm = 1
"""


@dataclass
class Priced:
    proc: Proc
    alpha: Mock
    beta: Mock
    keys: dict[str, str]
    events: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.proc.port}"

    def auth(self, key: str = "main") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[key]}"}

    def post(self, body: dict[str, Any] | None = None, key: str = "main", **headers: str) -> httpx.Response:
        return httpx.post(
            self.base + "/v1/chat/completions", json=body or CHAT, headers={**self.auth(key), **headers}, timeout=10
        )

    def record(self, request_id: str, timeout_s: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = [e for e in event_records(self.events) if e["request_id"] == request_id]
            if found:
                assert len(found) == 1, found
                return found[0]
            time.sleep(0.05)
        raise AssertionError(f"no event record for {request_id}")

    def cost_total(self, model: str, provider: str) -> float:
        text = httpx.get(self.base + "/metrics", timeout=5).text
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "sluicegate_cost_total" and s.labels == {"model": model, "provider": provider}:
                    return float(s.value)
        return 0.0


@pytest.fixture(scope="module")
def priced(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[Priced]:
    tmp = tmp_path_factory.mktemp("prices")
    alpha, beta = start_mock(tmp, "price-a"), start_mock(tmp, "price-b")
    keys = {"main": new_key(), "tight": new_key()}
    events = tmp / "events.jsonl"
    config = tmp / "gateway.toml"
    config.write_text(prices_config(alpha, beta, events, keys))
    # Mocks of its own (start_gateway wants the session's): a fault set here reaches no other test.
    port = free_port()
    args = ["serve", "--config", str(config), "--bind", f"127.0.0.1:{port}"]
    proc = Proc(args, port, tmp / "gateway.log", {"REDIS_URL": redis_server.url}).start()
    try:
        yield Priced(proc, alpha, beta, keys, events)
    finally:
        proc.stop()
        alpha.proc.stop()
        beta.proc.stop()


@pytest.fixture
def pr(priced: Priced) -> Iterator[Priced]:
    for mock in (priced.alpha, priced.beta):
        mock.reset()
    yield priced
    for mock in (priced.alpha, priced.beta):
        mock.reset()


def test_a_non_stream_answer_costs_its_usage_at_the_table_price(pr: Priced) -> None:
    before = pr.cost_total("mock-chat", "alpha")
    resp = pr.post(**{"x-mock-chunks": "7"})
    assert resp.status_code == 200
    usage = resp.json()["usage"]
    record = pr.record(resp.headers["x-request-id"])
    assert (record["prompt_tokens"], record["completion_tokens"]) == (usage["prompt_tokens"], 7)
    assert record["cost"] == expected_cost(*MOCK_CHAT[:2], record) > 0
    assert record["currency"] == "EUR"
    assert pr.cost_total("mock-chat", "alpha") == pytest.approx(before + record["cost"], abs=1e-12)


def test_a_stream_costs_its_usage_at_the_table_price(pr: Priced) -> None:
    before = pr.cost_total("mock-chat", "alpha")
    body = {**CHAT, "stream": True}
    with httpx.stream(
        "POST", pr.base + "/v1/chat/completions", json=body, headers={**pr.auth(), "x-mock-chunks": "12"}, timeout=10
    ) as resp:
        assert resp.status_code == 200
        text = resp.read().decode()
        request_id = resp.headers["x-request-id"]
    assert text.rstrip().endswith("data: [DONE]")
    record = pr.record(request_id)
    assert (record["stream"], record["completion_tokens"]) == (True, 12)
    assert record["cost"] == expected_cost(*MOCK_CHAT[:2], record) > 0
    assert pr.cost_total("mock-chat", "alpha") == pytest.approx(before + record["cost"], abs=1e-12)


def test_cached_prompt_tokens_are_costed_at_the_cached_price(pr: Priced) -> None:
    resp = pr.post(**{"x-mock-cached-tokens": "2"})
    assert resp.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": 2}
    record = pr.record(resp.headers["x-request-id"])
    assert record["cost"] == expected_cost(*MOCK_CHAT[:2], record, cached=2, cached_price=MOCK_CHAT[2])
    assert record["cost"] < expected_cost(*MOCK_CHAT[:2], record)


def test_a_glob_price_applies_and_the_first_glob_wins(pr: Priced) -> None:
    before = pr.cost_total("other", "alpha")
    resp = pr.post({**CHAT, "model": "alpha-big-mini"})
    record = pr.record(resp.headers["x-request-id"])
    assert record["cost"] == expected_cost(*ALPHA_GLOB, record) > 0
    # Model names not in the config count under "other", as in every metric.
    assert pr.cost_total("other", "alpha") == pytest.approx(before + record["cost"], abs=1e-12)


def test_usage_without_a_price_costs_null(pr: Priced) -> None:
    resp = pr.post({**CHAT, "model": "free-chat"})
    assert resp.status_code == 200
    record = pr.record(resp.headers["x-request-id"])
    assert record["total_tokens"] > 0
    assert (record["cost"], record["currency"], record["provider"]) == (None, "EUR", "beta")


def test_what_the_upstream_never_billed_costs_zero(pr: Priced) -> None:
    before = pr.cost_total("mock-chat", "alpha")
    failed = pr.post(**{"x-mock-status": "503"})  # both providers answer 503
    assert failed.status_code == 502
    refused = pr.post({**CHAT, "model": "nope"})
    assert refused.status_code == 404
    unknown_key = httpx.post(pr.base + "/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer sk-x"})
    assert unknown_key.status_code == 401
    admitted = pr.post(key="tight")
    assert admitted.status_code == 200
    limited = pr.post(key="tight")
    assert limited.status_code == 429
    for resp in (failed, refused, unknown_key, limited):
        record = pr.record(resp.headers["x-request-id"])
        assert (record["cost"], record["currency"], record["total_tokens"]) == (0, "EUR", None), record
    # Only the one answer moved the metric.
    paid = pr.record(admitted.headers["x-request-id"])["cost"]
    assert pr.cost_total("mock-chat", "alpha") == pytest.approx(before + paid, abs=1e-12)


def test_after_a_fallback_only_the_attempt_that_answered_is_costed(pr: Priced) -> None:
    pr.alpha.faults(status=500)
    resp = pr.post(**{"x-mock-chunks": "5"})
    assert resp.status_code == 200
    record = pr.record(resp.headers["x-request-id"])
    assert (record["provider"], record["attempts"], record["completion_tokens"]) == ("beta", 2, 5)
    assert record["cost"] == expected_cost(*MOCK_CHAT[:2], record) > 0


def test_a_client_gone_mid_stream_is_costed_what_was_delivered(pr: Priced) -> None:
    body = {**CHAT, "stream": True}
    request_id = "price-disconnect-1"
    headers = {**pr.auth(), "x-request-id": request_id, "x-mock-chunks": "200", "x-mock-chunk-delay-ms": "20"}
    sock = send_raw(pr.proc.port, body, headers)
    received = b""
    deadline = time.monotonic() + 5
    while received.count(b"data:") < 5 and time.monotonic() < deadline:
        received += sock.recv(65536)
    sock.close()
    record = pr.record(request_id)
    assert record["client_disconnected"] is True
    # No usage event came: the gateway's estimate of what went out is what is charged, and costed.
    assert 5 <= record["completion_tokens"] < 200
    assert record["cost"] == expected_cost(*MOCK_CHAT[:2], record) > 0
