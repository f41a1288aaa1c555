"""Limits and budgets across real gateway processes sharing one real Redis."""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import openai
import orjson
import pytest

from proxy.request.auth import key_digest, new_key
from tests.conftest import Mocks, Proc, RedisServer, beta_config, free_port, start_gateway

CHAT: dict[str, Any] = {"model": "mock-chat", "messages": [{"role": "user", "content": "say something"}]}
KEY_LIMITS = {
    "r50": 'rpm = 50\nburst = 50\ngroup = "free"',
    "s1": 'group = "shared"',
    "s2": 'group = "shared"',
    "refill": "rpm = 60\nburst = 1",
    "tok1": "tpm = 10",
    "tok2": "tpm = 10",
    "tokh": "tpm = 10",
    "budget": "budget_tokens = 10",
    "sdk": "rpm = 1",
    "free": "",
    "both": 'rpm = 100\ngroup = "tiny"',
    "broke": "budget_tokens = 0",
}


def limits_config(mocks: Mocks, keys: dict[str, str]) -> str:
    blocks = "".join(
        f'\n[[keys]]\nname = "{name}"\nsha256 = "{key_digest(keys[name])}"\n{extra}\n'
        for name, extra in KEY_LIMITS.items()
    )
    groups = "\n[groups.free]\n\n[groups.shared]\nrpm = 50\nburst = 50\n\n[groups.tiny]\nrpm = 1\n"
    # "deny" and a long timeout: on a loaded machine a Redis call slower than the default 0.25 s would be
    # admitted unchecked under "allow", and an exactness test must not pass or fail by such luck.
    return beta_config(mocks, blocks + groups, '[redis]\non_error = "deny"\ntimeout_s = 5')


@dataclass
class Pair:
    """Two gateway processes sharing one Redis."""

    procs: tuple[Proc, Proc]
    keys: dict[str, str]
    redis: RedisServer

    def url(self, i: int = 0) -> str:
        return f"http://127.0.0.1:{self.procs[i % 2].port}/v1/chat/completions"

    def auth(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[name]}"}

    def post(self, name: str, body: dict[str, Any] | None = None, **headers: str) -> httpx.Response:
        return httpx.post(self.url(), json=body or CHAT, headers={**self.auth(name), **headers}, timeout=10)

    def bucket(self, redis_key: str) -> float:
        out = subprocess.run(
            ["redis-cli", "-p", str(self.redis.port), "HGET", redis_key, "t"],
            capture_output=True,
            text=True,
            check=True,
        )
        return float(out.stdout.strip())


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, mocks: Mocks, redis_server: RedisServer) -> Iterator[Pair]:
    redis_server.flush()
    tmp = tmp_path_factory.mktemp("limits")
    keys = {name: new_key() for name in KEY_LIMITS}
    config = limits_config(mocks, keys)
    first = start_gateway(tmp, mocks, config, redis_url=redis_server.url, name="gw1")
    second = start_gateway(tmp, mocks, config, redis_url=redis_server.url, name="gw2")
    try:
        yield Pair((first, second), keys, redis_server)
    finally:
        first.stop()
        second.stop()


async def burst(pair: Pair, names: list[str], n: int) -> tuple[list[tuple[int, Any]], float]:
    """n concurrent requests, alternating over both processes and the given keys."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(i: int) -> tuple[int, Any]:
            headers = pair.auth(names[i % len(names)])
            async with session.post(pair.url(i), json=CHAT, headers=headers) as resp:
                await resp.read()
                return resp.status, resp.headers

        # Open connections first, so the burst itself is only the decisions.
        await asyncio.gather(*(session.get(pair.url(i).replace("/v1/chat/completions", "/healthz")) for i in range(64)))
        start = time.monotonic()
        results = await asyncio.gather(*(one(i) for i in range(n)))
        return results, time.monotonic() - start


def assert_exact(results: list[tuple[int, Any]], elapsed_s: float, capacity: int, per_minute: int) -> None:
    statuses = [status for status, _ in results]
    assert set(statuses) <= {200, 429}, statuses
    admitted = statuses.count(200)
    # A token bucket refills while the burst runs: over a window under 60/per_minute s, nothing.
    refilled = math.floor(elapsed_s * per_minute / 60)
    assert capacity <= admitted <= capacity + refilled, (admitted, elapsed_s)
    for status, headers in results:
        if status == 429:
            assert int(headers["retry-after"]) >= 1
            assert int(headers["retry-after-ms"]) > 0
            assert headers["x-ratelimit-limit-requests"] == str(per_minute)
            assert headers["x-ratelimit-remaining-requests"] == "0"
            assert headers["x-ratelimit-reset-requests"]


async def test_key_rpm_exact_across_two_processes(pair: Pair) -> None:
    results, elapsed = await burst(pair, ["r50"], 200)
    print(f"200 requests in {elapsed:.3f}s")
    assert_exact(results, elapsed, 50, 50)


async def test_group_rpm_exact_across_two_keys_and_processes(pair: Pair) -> None:
    results, elapsed = await burst(pair, ["s1", "s2"], 200)
    print(f"200 requests in {elapsed:.3f}s")
    assert_exact(results, elapsed, 50, 50)
    refused = [h for s, h in results if s == 429]
    assert refused
    body_429 = pair.post("s1")
    assert body_429.status_code == 429
    message = body_429.json()["error"]["message"]
    assert "rpm limit of group 'shared'" in message


def test_admitted_responses_carry_ratelimit_headers(pair: Pair) -> None:
    resp = pair.post("tokh")
    assert resp.status_code == 200
    assert resp.headers["x-ratelimit-limit-tokens"] == "10"
    assert resp.headers["x-ratelimit-remaining-tokens"] == "10"
    assert resp.headers["x-ratelimit-reset-tokens"] == "0ms"
    assert "x-ratelimit-limit-requests" not in resp.headers


def test_refill_after_retry_after_ms(pair: Pair) -> None:
    assert pair.post("refill").status_code == 200
    refused = pair.post("refill")
    assert refused.status_code == 429
    wait_ms = int(refused.headers["retry-after-ms"])
    assert 0 < wait_ms <= 1000
    assert refused.headers["retry-after"] == "1"
    assert "rpm limit of key 'refill'" in refused.json()["error"]["message"]
    time.sleep(wait_ms / 1000)
    assert pair.post("refill").status_code == 200


def stream(pair: Pair, name: str, chunks: int, asked: bool) -> list[Any]:
    body: dict[str, Any] = {**CHAT, "stream": True}
    if asked:
        body["stream_options"] = {"include_usage": True}
    headers = {**pair.auth(name), "x-mock-chunks": str(chunks)}
    with httpx.stream("POST", pair.url(), json=body, headers=headers, timeout=10) as resp:
        assert resp.status_code == 200
        raw = resp.read()
    return [orjson.loads(e[6:]) for e in raw.split(b"\n\n") if e.startswith(b"data: {")]


@pytest.mark.parametrize(("name", "asked"), [("tok1", False), ("tok2", True)])
def test_tpm_charged_from_streamed_usage(pair: Pair, name: str, asked: bool) -> None:
    events = stream(pair, name, 20, asked)
    usage_events = [e for e in events if e.get("choices") == []]
    assert len(usage_events) == (1 if asked else 0)
    # 2 prompt words + 20 chunks = 22 tokens against a bucket of 10: into debt.
    time.sleep(0.2)
    level = pair.bucket(f"sg:{{g:default}}:k:{name}:tpm")
    assert -12.5 < level < -11
    refused = pair.post(name)
    assert refused.status_code == 429
    assert "tpm limit of key" in refused.json()["error"]["message"]
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"


def test_budget_crossing_request_completes_then_402(pair: Pair) -> None:
    first = pair.post("budget")  # 2 + 6 = 8 tokens, budget 10
    assert first.status_code == 200
    time.sleep(0.1)
    crossing = pair.post("budget")  # spent 8 < 10: admitted, ends at 16
    assert crossing.status_code == 200
    assert crossing.json()["usage"]["total_tokens"] == 8
    time.sleep(0.1)
    spent = pair.post("budget")
    assert spent.status_code == 402
    assert spent.headers["x-should-retry"] == "false"
    assert spent.json()["error"]["code"] == "insufficient_quota"


def test_spent_budget_blocks_passthrough_too(pair: Pair) -> None:
    assert pair.post("broke").status_code == 402
    url = pair.url().replace("/chat/completions", "/responses")
    resp = httpx.post(url, json={"model": "mock-chat", "input": "hi"}, headers=pair.auth("broke"), timeout=10)
    assert resp.status_code == 402
    assert resp.json()["error"]["code"] == "insufficient_quota"


def test_sdk_gets_rate_limit_error_with_retry_after_ms(pair: Pair) -> None:
    client = openai.OpenAI(
        base_url=pair.url().removesuffix("/chat/completions"), api_key=pair.keys["sdk"], max_retries=0
    )
    client.chat.completions.create(model="mock-chat", messages=CHAT["messages"])
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="mock-chat", messages=CHAT["messages"])
    assert int(info.value.response.headers["retry-after-ms"]) > 0
    assert info.value.code == "rate_limit_exceeded"


def redis_cli(pair: Pair, *args: str) -> str:
    return subprocess.run(
        ["redis-cli", "-p", str(pair.redis.port), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_refused_request_takes_nothing_and_keys_share_a_hash_tag(pair: Pair) -> None:
    assert pair.post("both").status_code == 200  # key bucket 100 -> 99, group bucket 1 -> 0
    refused = [pair.post("both") for _ in range(5)]
    assert [r.status_code for r in refused] == [429] * 5
    assert "rpm limit of group 'tiny'" in refused[0].json()["error"]["message"]
    # The key's own bucket gave nothing to the five refused requests.
    assert 99 <= pair.bucket("sg:{g:tiny}:k:both:rpm") < 99.5
    assert refused[0].headers["x-ratelimit-remaining-requests"] == "0"
    names = redis_cli(pair, "--scan", "--pattern", "sg:*tiny*").split()
    # With the spent tokens, counted for every key.
    assert sorted(names) == ["sg:{g:tiny}:g:rpm", "sg:{g:tiny}:k:both:rpm", "sg:{g:tiny}:k:both:spent"]
    # Keys expire once the bucket would be full again: the group's in about a minute, plus a second.
    assert 0 < int(redis_cli(pair, "PTTL", "sg:{g:tiny}:g:rpm")) <= 61_000
    assert 0 < int(redis_cli(pair, "PTTL", "sg:{g:tiny}:k:both:rpm")) <= 1_600


def test_unlimited_key_has_no_ratelimit_headers(pair: Pair) -> None:
    resp = pair.post("free")
    assert resp.status_code == 200
    assert not [h for h in resp.headers if h.startswith("x-ratelimit")]


# Redis faults: each test has its own Redis and gateway, so killing them disturbs nothing else.


def fault_config(mocks: Mocks, key: str, on_error: str, load_key: str | None = None) -> str:
    keys = f'\n[[keys]]\nname = "f"\nsha256 = "{key_digest(key)}"\nrpm = 5\n'
    if load_key:
        keys += f'\n[[keys]]\nname = "load"\nsha256 = "{key_digest(load_key)}"\nrpm = 1000000\n'
    redis_toml = f'[redis]\non_error = "{on_error}"\ntimeout_s = 0.25\ncircuit_cooldown_s = 0.5\n'
    return beta_config(mocks, keys, redis_toml)


def chat(proc: Proc, key: str) -> httpx.Response:
    url = f"http://127.0.0.1:{proc.port}/v1/chat/completions"
    return httpx.post(url, json=CHAT, headers={"Authorization": f"Bearer {key}"}, timeout=10)


def ready(proc: Proc) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{proc.port}/readyz", timeout=5)


def limiter_errors(proc: Proc) -> float:
    text = httpx.get(f"http://127.0.0.1:{proc.port}/metrics").text
    return float(
        next(line for line in text.splitlines() if line.startswith("sluicegate_limiter_errors_total ")).split()[1]
    )


def test_redis_down_with_allow_admits_and_recovers(tmp_path: Path, mocks: Mocks) -> None:
    redis = RedisServer(free_port(), tmp_path / "redis.log").start()
    key, load_key = new_key(), new_key()
    proc = start_gateway(tmp_path, mocks, fault_config(mocks, key, "allow", load_key), redis_url=redis.url)
    try:
        assert [chat(proc, key).status_code for _ in range(6)] == [200] * 5 + [429]
        assert limiter_errors(proc) == 0
        # Kill Redis while four clients keep sending: every request still succeeds.
        stop_at = time.monotonic() + 1.5
        with ThreadPoolExecutor(4) as pool:

            def load() -> list[int]:
                return [chat(proc, load_key).status_code for _ in range(400) if time.monotonic() < stop_at]

            loads = [pool.submit(load) for _ in range(4)]
            time.sleep(0.4)
            redis.stop()
            statuses = [status for load in loads for status in load.result()]
        assert set(statuses) == {200}, statuses
        assert [chat(proc, key).status_code for _ in range(10)] == [200] * 10
        assert limiter_errors(proc) >= 10
        down = ready(proc)
        assert down.status_code == 503
        assert down.json()["reason"].startswith("redis:")
        redis.start()
        # The circuit opened while Redis was down: the first probe after its cool-down finds it back.
        deadline = time.monotonic() + 5
        while ready(proc).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ready(proc).status_code == 200
        assert [chat(proc, key).status_code for _ in range(6)] == [200] * 5 + [429]
    finally:
        proc.stop()
        redis.stop()


def test_redis_down_with_deny_is_503_without_hanging(tmp_path: Path, mocks: Mocks) -> None:
    redis = RedisServer(free_port(), tmp_path / "redis.log").start()
    key = new_key()
    proc = start_gateway(tmp_path, mocks, fault_config(mocks, key, "deny"), redis_url=redis.url)
    assert redis.proc is not None
    try:
        assert chat(proc, key).status_code == 200
        redis.proc.send_signal(19)  # SIGSTOP: Redis hangs, it does not refuse
        for _ in range(3):
            start = time.monotonic()
            resp = chat(proc, key)
            took = time.monotonic() - start
            assert resp.status_code == 503
            assert resp.json()["error"]["code"] == "limiter_unavailable"
            assert took < 0.25 + 1.0, took  # timeout_s plus a margin for a busy machine
        redis.proc.send_signal(18)  # SIGCONT
        redis.stop()
        resp = chat(proc, key)
        assert resp.status_code == 503
    finally:
        proc.stop()
        redis.stop()


def test_keys_usage_command(pair: Pair) -> None:
    assert pair.post("free").status_code == 200  # a key without any limit: its spending is counted all the same
    config = pair.procs[0].args[pair.procs[0].args.index("--config") + 1]
    env = {**os.environ, "REDIS_URL": pair.redis.url}
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "keys", "usage", "--config", config], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line for line in out.stdout.splitlines()[1:]}
    assert set(rows) == set(KEY_LIMITS)
    assert rows["budget"].split()[2:5] == ["16", "0", "10"]
    assert "key rpm " in rows["r50"]
    assert "group rpm" in rows["s1"]
    spent, *rest = rows["free"].split()[2:]
    assert int(spent) >= 2 + 6  # the prompt's two words, the mock's six chunks
    # No [[prices]] here: no money spent to show, no money budget, nothing left to count down, no buckets.
    assert rest == ["0", "unlimited", "-", "unlimited", "-", "lifetime", "-"]
    one = subprocess.run(
        [sys.executable, "-m", "proxy", "keys", "usage", "--config", config, "--name", "nobody"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert one.returncode == 2
    down = subprocess.run(
        [sys.executable, "-m", "proxy", "keys", "usage", "--config", config],
        env={**env, "REDIS_URL": "redis://127.0.0.1:1/0"}, capture_output=True, text=True,
    )  # fmt: skip
    assert down.returncode == 2
    assert "does not answer" in down.stderr
