"""Budget holds across real gateway processes sharing one real Redis.

Admission holds part of a key's budget in the same script that checks it; the
answer's real usage settles the hold. The mock upstream's usage is known in
advance: prompt tokens are the words of the prompt, completion tokens its chunk
count (`x-mock-chunks`).
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import orjson
import pytest
import redis

from proxy.request.auth import key_digest, new_key
from proxy.request.prompts import prompt_bound
from tests.conftest import SHORT, Budgets, Mocks, RedisServer, send_raw, start_gateway

ELEVEN_WORDS = "one two three four five six seven eight nine ten eleven"
CHAT: dict[str, Any] = {"model": "mock-chat", "messages": [{"role": "user", "content": ELEVEN_WORDS}]}
CHAT_BYTES = orjson.dumps(CHAT)
HELD_MESSAGE = "held by requests in flight"
DEFAULT_CHUNKS = 6  # the session mocks' --chunks


def holds_config(mocks: Mocks, keys: dict[str, tuple[str, str]], limits_toml: str = "") -> str:
    """One provider (mock-b), no event records; keys maps name -> (key, extra TOML lines)."""
    blocks = "".join(
        f'\n[[keys]]\nname = "{name}"\nsha256 = "{key_digest(key)}"\n{extra}\n' for name, (key, extra) in keys.items()
    )
    return f"""
{limits_toml}
[events]
sink = "off"

[[providers]]
name = "beta"
base_url = "{mocks.beta.url}/v1"
models = ["mock-chat", "mock-embed"]
first_byte_timeout_s = 5
idle_timeout_s = 5
{blocks}"""


@pytest.fixture
def budgets_factory(tmp_path: Path, mocks: Mocks, own_redis: RedisServer) -> Iterator[Callable[..., Budgets]]:
    """Gateways for one test on a flushed Redis: make(keys' extra TOML by name, [limits] TOML, processes)."""
    started: list[Budgets] = []

    def make(extras: dict[str, str], limits_toml: str = "", processes: int = 2) -> Budgets:
        own_redis.flush()
        keys = {name: new_key() for name in extras}
        config = holds_config(mocks, {name: (keys[name], extra) for name, extra in extras.items()}, limits_toml)
        procs = [
            start_gateway(tmp_path, mocks, config, redis_url=own_redis.url, name=f"gw{i}") for i in range(processes)
        ]
        budgets = Budgets(procs, keys, redis.Redis.from_url(own_redis.url))
        started.append(budgets)
        return budgets

    yield make
    for budgets in started:
        for proc in budgets.procs:
            proc.stop()
        budgets.redis.close()


async def burst(budgets: Budgets, name: str, n: int, **headers: str) -> list[tuple[int, Any, bytes]]:
    """n concurrent requests of CHAT_BYTES, alternating over the gateway processes."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(session.get(budgets.url(i, "/healthz")) for i in range(n)))

        async def one(i: int) -> tuple[int, Any, bytes]:
            async with session.post(budgets.url(i), data=CHAT_BYTES, headers={**budgets.auth(name), **headers}) as resp:
                return resp.status, resp.headers, await resp.read()

        return await asyncio.gather(*(one(i) for i in range(n)))


def keys_usage(budgets: Budgets, name: str) -> list[str]:
    """`sluicegate keys usage` for one key: its row's columns."""
    args = budgets.procs[0].args
    config = args[args.index("--config") + 1]
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "keys", "usage", "--config", config, "--name", name],
        env={**os.environ, "REDIS_URL": budgets.procs[0].env["REDIS_URL"]}, capture_output=True, text=True, check=True,
    )  # fmt: skip
    header, row = out.stdout.splitlines()
    assert header.split()[:5] == ["key", "group", "spent", "held", "budget"]
    return row.split()


def assert_held_429(headers: Any, body: bytes) -> None:
    assert headers["retry-after"] == "1"
    assert headers["retry-after-ms"] == "1000"
    error = orjson.loads(body)["error"]
    assert error["code"] == "rate_limit_exceeded"
    assert HELD_MESSAGE in error["message"]


async def test_thirty_concurrent_requests_over_two_processes_stay_within_the_budget(
    budgets_factory: Callable[..., Budgets],
) -> None:
    """The reported case: budget 300, 30 concurrent requests of 51 tokens, until the budget is spent.

    With the default reserve each admitted request holds all that is left, so only
    the last one, holding less than it uses, can overrun: spent <= budget + its excess.
    """
    budgets = budgets_factory({"b300": "budget_tokens = 300"})
    usage = 11 + 40
    statuses: list[int] = []
    for _ in range(15):
        results = await burst(budgets, "b300", 30, **{"x-mock-chunks": "40"})
        statuses += [status for status, _, _ in results]
        for status, headers, body in results:
            assert status in (200, 402, 429), (status, body)
            if status == 429:
                assert_held_429(headers, body)
            if status == 402:
                assert headers["x-should-retry"] == "false"
        if all(status == 402 for status, _, _ in results):
            break
        budgets.settled("b300")  # while a hold is out, no request may take what is left
    budgets.settled("b300")
    admitted = statuses.count(200)
    print(f"{admitted} admitted; spent {budgets.spent('b300')}")
    assert statuses[-30:] == [402] * 30
    # Every admitted answer is charged once.
    assert budgets.spent("b300") == admitted * usage
    assert budgets.spent("b300") <= 300 + usage - 1


async def test_a_small_reserve_admits_several_at_once_and_the_holds_cap_them(
    budgets_factory: Callable[..., Budgets],
) -> None:
    """reserve_tokens = 4: each request holds its prompt's bound + 4 and overruns it when it is answered.

    Requests in flight together each add their own excess, so spent can pass the
    budget by more than one answer's excess here; what the holds bound is how
    many get in.
    """
    budgets = budgets_factory({"b300": "budget_tokens = 300"}, "[limits]\nreserve_tokens = 4\n")
    hold = prompt_bound(CHAT) + 4
    usage = 11 + 200
    assert hold < usage
    # Answers wait half a second, so the whole burst meets holds still outstanding.
    results = await burst(budgets, "b300", 30, **{"x-mock-chunks": "200", "x-mock-ttfb-ms": "500"})
    for status, headers, body in results:
        assert status in (200, 402, 429), (status, body)
        if status == 429:
            assert_held_429(headers, body)
    budgets.settled("b300")
    admitted = [status for status, _, _ in results].count(200)
    spent = budgets.spent("b300")
    print(f"{admitted} admitted holding {hold} each; spent {spent}")
    assert admitted >= 2
    # The holds fill the budget: at most ceil(300 / hold) requests get in, whatever the timing.
    assert admitted <= math.ceil(300 / hold)
    assert spent == admitted * usage


def test_held_budget_is_429_then_spent_budget_is_402(budgets_factory: Callable[..., Budgets]) -> None:
    budgets = budgets_factory({"b30": "budget_tokens = 30"}, processes=1)
    body = {**SHORT, "stream": True}
    headers = {**budgets.auth("b30"), "x-mock-chunks": "100", "x-mock-chunk-delay-ms": "50"}
    with httpx.stream("POST", budgets.url(), content=orjson.dumps(body), headers=headers, timeout=15) as resp:
        assert resp.status_code == 200
        chunks = resp.iter_raw()
        next(chunks)
        # With the default reserve the first request holds all 30 tokens.
        assert budgets.held("b30") == 30
        [(member, expires_ms)] = budgets.holds("b30")
        assert member.endswith(":30")
        ttl_ms = 600_000
        assert ttl_ms - 5000 < expires_ms - budgets.server_ms() <= ttl_ms
        pttl = budgets.redis.pttl("sg:{g:default}:k:b30:holds")
        assert ttl_ms - 5000 < pttl <= ttl_ms + 1000
        assert 0 < budgets.redis.pttl("sg:{g:default}:k:b30:held") <= ttl_ms + 1000
        refused = budgets.post("b30")
        assert refused.status_code == 429
        assert_held_429(refused.headers, refused.content)
        assert budgets.spent("b30") == 0
        assert keys_usage(budgets, "b30")[2:5] == ["0", "30", "30"]
        metrics = httpx.get(budgets.url(0, "/metrics"), timeout=5).text
        assert 'sluicegate_ratelimited_total{limit="budget",scope="key"} 1.0' in metrics
        for _ in chunks:
            pass
    budgets.settled("b30")
    assert budgets.spent("b30") == 2 + 100
    assert keys_usage(budgets, "b30")[2:5] == ["102", "0", "30"]
    # An idle budget leaves only its spent counter in Redis.
    assert not budgets.redis.exists("sg:{g:default}:k:b30:holds", "sg:{g:default}:k:b30:held")
    spent = budgets.post("b30")
    assert spent.status_code == 402
    assert spent.headers["x-should-retry"] == "false"
    assert spent.json()["error"]["code"] == "insufficient_quota"


def read_until(sock: Any, marker: bytes, count: int) -> bytes:
    received = b""
    while received.count(marker) < count:
        part = sock.recv(65536)
        assert part, received
        received += part
    return received


def wait_for(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_every_way_an_answer_ends_settles_its_hold_once(budgets_factory: Callable[..., Budgets]) -> None:
    budgets = budgets_factory({"big": "budget_tokens = 1000000"}, processes=1)
    port = budgets.procs[0].port
    stream_body = {**SHORT, "stream": True}

    def moved(expected: int, action: Callable[[], None]) -> None:
        before = budgets.spent("big")
        action()
        budgets.settled("big")
        assert budgets.spent("big") - before == expected

    # Whole answer and stream (the gateway asks for the stream's usage): 2 prompt words, 6 chunks.
    moved(2 + DEFAULT_CHUNKS, lambda: budgets.post("big").raise_for_status())

    def whole_stream() -> None:
        with httpx.stream("POST", budgets.url(), json=stream_body, headers=budgets.auth("big"), timeout=15) as resp:
            assert resp.status_code == 200
            resp.read()

    moved(2 + DEFAULT_CHUNKS, whole_stream)

    # max_tokens sizes the hold; an answer longer than it is charged in full.
    capped = {**stream_body, "max_tokens": 7}

    def capped_stream() -> None:
        headers = {**budgets.auth("big"), "x-mock-chunks": "20", "x-mock-chunk-delay-ms": "50"}
        with httpx.stream("POST", budgets.url(), content=orjson.dumps(capped), headers=headers, timeout=15) as resp:
            chunks = resp.iter_raw()
            next(chunks)
            assert budgets.held("big") == prompt_bound(capped) + 7
            for _ in chunks:
                pass

    moved(2 + 20, capped_stream)

    # The client leaves mid-stream: what was delivered is charged, as estimated (prompt bytes / 4, one token an event).
    estimate = len(orjson.dumps(stream_body)) // 4
    before = budgets.spent("big")
    sock = send_raw(port, stream_body, {**budgets.auth("big"), "x-mock-chunks": "200", "x-mock-chunk-delay-ms": "50"})
    read_until(sock, b"tok", 3)
    assert budgets.held("big") == prompt_bound(stream_body) + 1024
    sock.close()
    budgets.settled("big")
    assert estimate + 3 <= budgets.spent("big") - before <= estimate + 200 + 2

    # The client leaves before any answer: nothing billed, the hold released.
    def gone_before_the_answer() -> None:
        sock = send_raw(port, SHORT, {**budgets.auth("big"), "x-mock-ttfb-ms": "3000"})
        wait_for(lambda: budgets.held("big") > 0)
        sock.close()

    moved(0, gone_before_the_answer)

    # The only provider fails: 502, nothing billed.
    def upstream_fails() -> None:
        resp = budgets.post("big", **{"x-mock-status": "503"})
        assert resp.status_code == 502
        assert resp.json()["error"]["code"] == "upstream_error"

    moved(0, upstream_fails)

    # Embeddings hold their prompt estimate only; their usage is the mock's word count.
    embed = {"model": "mock-embed", "input": "three more words"}

    def embeddings() -> None:
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(budgets.post, "big", embed, 0, "/embeddings", **{"x-mock-ttfb-ms": "1000"})
            wait_for(lambda: budgets.held("big") > 0)
            assert budgets.held("big") == prompt_bound(embed)
            assert answer.result().status_code == 200

    moved(3, embeddings)

    # Passthrough holds its bound and the reserve; an answer without usage is charged the estimate of its
    # prompt (bytes / 4), and the rest of the hold is released.
    echo = {"model": "mock-chat", "input": "hi"}
    moved(len(orjson.dumps(echo)) // 4, lambda: budgets.post("big", echo, 0, "/responses").raise_for_status())


def test_a_killed_worker_leaks_its_hold_only_until_it_expires(budgets_factory: Callable[..., Budgets]) -> None:
    budgets = budgets_factory({"b300": "budget_tokens = 300"}, "[limits]\nhold_ttl_s = 3\n")
    doomed, survivor = budgets.procs
    headers = {**budgets.auth("b300"), "x-mock-chunks": "200", "x-mock-chunk-delay-ms": "50"}
    sock = send_raw(doomed.port, {**SHORT, "stream": True}, headers)
    read_until(sock, b"tok", 1)
    assert doomed.proc is not None
    doomed.signal(signal.SIGKILL)
    doomed.proc.wait(timeout=10)
    sock.close()
    # Nobody will settle this hold.
    assert budgets.held("b300") == 300
    [(dead, expires_ms)] = budgets.holds("b300")
    refused = 0
    deadline = time.monotonic() + 15
    while True:
        sent_ms = budgets.server_ms()
        resp = budgets.post("b300", i=1)
        if resp.status_code == 200:
            break
        assert resp.status_code == 429, resp.text
        assert HELD_MESSAGE in resp.json()["error"]["message"]
        # Refused only while the dead hold had not expired.
        assert sent_ms < expires_ms
        refused += 1
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert refused >= 1
    assert budgets.server_ms() >= expires_ms
    budgets.settled("b300")
    assert dead not in dict(budgets.holds("b300"))
    # The killed worker's answer was never charged; the new one was, once.
    assert budgets.spent("b300") == 2 + DEFAULT_CHUNKS
    assert survivor.proc is not None and survivor.proc.poll() is None


def test_a_request_that_outlives_its_hold_still_charges_its_usage(budgets_factory: Callable[..., Budgets]) -> None:
    budgets = budgets_factory({"b300": "budget_tokens = 300"}, "[limits]\nhold_ttl_s = 2\n", processes=1)
    headers = {**budgets.auth("b300"), "x-mock-chunks": "100", "x-mock-chunk-delay-ms": "50"}

    def long_stream() -> int:
        with httpx.stream("POST", budgets.url(), json={**SHORT, "stream": True}, headers=headers, timeout=30) as resp:
            resp.read()
            return resp.status_code

    with ThreadPoolExecutor(1) as pool:
        long = pool.submit(long_stream)
        wait_for(lambda: bool(budgets.holds("b300")))
        [(_, expires_ms)] = budgets.holds("b300")
        assert budgets.post("b300").status_code == 429
        wait_for(lambda: budgets.server_ms() > expires_ms)
        # The expired hold is dropped at this admission, while its request still streams.
        assert budgets.post("b300").status_code == 200
        assert not long.done()
        assert long.result() == 200
    budgets.settled("b300")
    # Settles go out within a few ms of the answer.
    wait_for(lambda: budgets.spent("b300") == (2 + 100) + (2 + DEFAULT_CHUNKS))
    # Its settle found no hold to release, so the held total did not go below zero.
    assert budgets.redis.get("sg:{g:default}:k:b300:held") is None


def evalsha_calls(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def test_keys_without_a_budget_cost_the_same_round_trips(budgets_factory: Callable[..., Budgets]) -> None:
    """Per request: one admit when a key has limits, and one settle that counts what it spent; never more."""
    extras = {
        "none": "",
        "rpm": "rpm = 100000",
        "tpm": "tpm = 1000000",
        "budget": "budget_tokens = 1000000",
        "all": "rpm = 100000\ntpm = 1000000\nbudget_tokens = 1000000",
    }
    expected = {"none": 1, "rpm": 2, "tpm": 2, "budget": 2, "all": 2}
    budgets = budgets_factory(extras, processes=1)
    for name in extras:
        budgets.post(name).raise_for_status()  # loads the scripts
    time.sleep(0.2)  # settles go out within 10 ms of an answer: let the warm-up's land before counting
    for name, calls in expected.items():
        budgets.redis.config_resetstat()
        for _ in range(3):
            assert budgets.post(name).status_code == 200
        wait_for(lambda: evalsha_calls(budgets.redis) >= 3 * calls)  # noqa: B023
        time.sleep(0.2)
        assert evalsha_calls(budgets.redis) == 3 * calls, name


def test_a_hold_whose_admission_answer_was_lost_is_released_by_its_settle(
    budgets_factory: Callable[..., Budgets], own_redis: RedisServer
) -> None:
    """Admission times out on a paused Redis (on_error = "allow"), but the script is already on its way: once
    Redis resumes it runs and holds. The request's settle does not know how much; it finds the hold by id."""
    limits = '[redis]\non_error = "allow"\ntimeout_s = 0.5\ncircuit_failures = 100\n'
    budgets = budgets_factory({"lost": "budget_tokens = 100000"}, limits, processes=1)
    assert budgets.post("lost").status_code == 200  # scripts loaded, connections open
    budgets.settled("lost")
    spent = budgets.spent("lost")
    assert own_redis.proc is not None
    own_redis.proc.send_signal(signal.SIGSTOP)
    try:
        # A stream of 30 chunks 100 ms apart: admission gives up after 0.5 s, the answer runs about 3 s more.
        headers = {**budgets.auth("lost"), "x-mock-chunks": "30", "x-mock-chunk-delay-ms": "100"}
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(
                httpx.post, budgets.url(), content=orjson.dumps({**CHAT, "stream": True}), headers=headers, timeout=15
            )
            time.sleep(1.2)
            own_redis.proc.send_signal(signal.SIGCONT)
            # The admit script that timed out ran once Redis resumed: its hold is there, unknown to the gateway.
            deadline = time.monotonic() + 2
            while not budgets.holds("lost") and time.monotonic() < deadline:
                time.sleep(0.02)
            assert len(budgets.holds("lost")) == 1
            assert answer.result().status_code == 200
    finally:
        own_redis.proc.send_signal(signal.SIGCONT)
    budgets.settled("lost")
    assert budgets.spent("lost") == spent + 11 + 30
