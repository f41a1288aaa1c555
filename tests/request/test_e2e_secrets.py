"""No secret anywhere: every byte the gateway wrote is searched for every full key."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from proxy.request.auth import key_digest, new_key
from tests.conftest import Mocks, RedisServer, start_gateway

CHAT = {"model": "mock-chat", "messages": [{"role": "user", "content": "hi"}]}


def secrets_config(mocks: Mocks, keys: dict[str, str], sink: str, events: Path) -> str:
    return f"""
[events]
sink = "{sink}"
path = "{events}"

[[providers]]
name = "alpha"
base_url = "{mocks.alpha.url}/v1"
api_key_env = "SG_TEST_ALPHA_KEY"
models = ["mock-chat", "alpha-*"]

[[keys]]
name = "good"
sha256 = "{key_digest(keys["good"])}"

[[keys]]
name = "tight"
sha256 = "{key_digest(keys["tight"])}"
rpm = 1
budget_tokens = 1

[[keys]]
name = "off"
sha256 = "{key_digest(keys["off"])}"
enabled = false
"""


def session_of_requests(base: str, keys: dict[str, str], provider_key: str) -> list[str]:
    """Good and bad uses of every key; returns everything the clients saw."""
    seen: list[str] = []
    url = base + "/v1/chat/completions"
    good, unknown = keys["good"], keys["unknown"]
    attempts: list[dict[str, str]] = [
        {"Authorization": f"Bearer {good}"},
        {"Authorization": f"Bearer {good}", "x-mock-status": "400"},
        {"Authorization": f"Bearer {good}", "x-mock-reset-after": "1"},
        {"Authorization": f"Bearer {unknown}"},
        {"Authorization": f"Bearer  {good}"},
        {"Authorization": good},
        {"Authorization": f"Token {good}"},
        {"X-API-Key": f"{good} {good}"},
        {"X-API-Key": good + "x"},
        {"Authorization": f"Bearer {provider_key}"},
        {"X-API-Key": provider_key},
        {"Authorization": f"Bearer {keys['off']}"},
        {"Authorization": f"Bearer {keys['tight']}"},
        {"Authorization": f"Bearer {keys['tight']}"},
        {"Authorization": f"Bearer {good}", "X-Request-ID": good},
        {"Authorization": f"Bearer {good}", "X-Request-ID": f"id-{good}"},
        {"Authorization": f"Bearer {good}", "X-Request-ID": f"x/{provider_key}"},
    ]
    with httpx.Client(timeout=10) as client:
        for headers in attempts:
            for body in (CHAT, {**CHAT, "stream": True}, {**CHAT, "model": good}):
                resp = client.post(url, json=body, headers=headers)
                seen.append(str(resp.status_code) + repr(resp.headers.multi_items()) + resp.text)
            resp = client.get(base + "/v1/models", headers=headers)
            seen.append(repr(resp.headers.multi_items()) + resp.text)
        seen.append(client.get(base + "/metrics").text)
    return seen


@pytest.mark.parametrize("sink", ["file", "stdout", "redis"])
def test_no_key_in_any_output(tmp_path: Path, mocks: Mocks, redis_server: RedisServer, sink: str) -> None:
    keys = {name: new_key() for name in ("good", "tight", "off", "unknown")}
    events = tmp_path / "events.jsonl"
    redis_server.flush()
    proc = start_gateway(tmp_path, mocks, secrets_config(mocks, keys, sink, events), redis_url=redis_server.url)
    try:
        seen = session_of_requests(f"http://127.0.0.1:{proc.port}", keys, mocks.provider_key)
        proc.signal(signal.SIGHUP)  # a reload logs too
        time.sleep(0.3)
    finally:
        proc.stop()
    stream = subprocess.run(
        ["redis-cli", "-p", str(redis_server.port), "XRANGE", "sluicegate:events", "-", "+"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    dump = subprocess.run(
        ["redis-cli", "-p", str(redis_server.port), "--scan"], capture_output=True, text=True, check=True
    ).stdout
    written = {
        "gateway stdout+stderr": proc.log.read_text(errors="replace"),
        "events file": events.read_text(errors="replace") if events.exists() else "",
        "redis stream": stream,
        "redis key names": dump,
        "responses": "\n".join(seen),
    }
    if sink == "redis":
        assert "req_" in stream
    elif sink == "file":
        assert "req_" in written["events file"]
    else:
        assert '"request_id"' in written["gateway stdout+stderr"]
    for name, secret in {**keys, "provider": mocks.provider_key}.items():
        for where, text in written.items():
            assert secret not in text, f"the {name} key appears in {where}"
            assert secret[3:] not in text, f"the body of the {name} key appears in {where}"
