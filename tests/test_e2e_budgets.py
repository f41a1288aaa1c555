"""Spending and money budgets across real gateway processes sharing one real Redis.

The mock upstream's usage is known in advance: prompt tokens are the words of the
prompt, completion tokens its chunk count (`x-mock-chunks`). mock-chat costs
PRICE_IN and PRICE_OUT per million tokens, so one token is PRICE_* micro-units.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis

from proxy.auth import key_digest, new_key
from tests.conftest import Mocks, Proc, RedisServer, free_port, start_gateway

PRICE_IN, PRICE_OUT = 2, 10  # EUR per million tokens: micro-units per token
SHORT: dict[str, Any] = {"model": "mock-chat", "messages": [{"role": "user", "content": "say something"}]}
SHORT_COST = 2 * PRICE_IN + 6 * PRICE_OUT  # two words, the session mocks' six chunks


def budgets_config(mocks: Mocks, keys: dict[str, tuple[str, str]], groups_toml: str = "") -> str:
    """One provider (mock-b), mock-chat priced; keys maps name -> (key, extra TOML lines)."""
    blocks = "".join(
        f'\n[[keys]]\nname = "{name}"\nsha256 = "{key_digest(key)}"\n{extra}\n' for name, (key, extra) in keys.items()
    )
    return f"""
[events]
sink = "off"

[[providers]]
name = "beta"
base_url = "{mocks.beta.url}/v1"
models = ["mock-chat", "free-chat"]
first_byte_timeout_s = 5
idle_timeout_s = 5

[[prices]]
model = "mock-chat"
input = {PRICE_IN}
output = {PRICE_OUT}
currency = "EUR"
{groups_toml}
{blocks}"""


@dataclass
class Budgets:
    """Gateway processes on one Redis, and a view of the spending in it."""

    procs: list[Proc]
    keys: dict[str, str]
    redis: redis.Redis

    def url(self, i: int = 0, route: str = "/chat/completions") -> str:
        return f"http://127.0.0.1:{self.procs[i % len(self.procs)].port}/v1{route}"

    def auth(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[name]}", "Content-Type": "application/json"}

    def post(self, name: str, body: dict[str, Any] | None = None, i: int = 0, **headers: str) -> httpx.Response:
        content = orjson.dumps(body or SHORT)
        return httpx.post(self.url(i), content=content, headers={**self.auth(name), **headers}, timeout=15)

    def money(self, prefix: str) -> dict[str, str]:
        raw: dict[bytes, bytes] = self.redis.hgetall(f"{prefix}:money")
        return {k.decode(): v.decode() for k, v in raw.items()}

    def usage(self, name: str) -> list[str]:
        """`sluicegate keys usage --name NAME`: the row's columns."""
        header, row = keys_usage(self.procs[0], "--name", name).splitlines()
        assert header.split()[:9] == [
            "key", "group", "spent", "held", "budget", "spent_EUR", "budget_EUR", "left_EUR", "period",
        ]  # fmt: skip
        return row.split()


def keys_usage(proc: Proc, *args: str) -> str:
    config = proc.args[proc.args.index("--config") + 1]
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "keys", "usage", "--config", config, *args],
        env={**os.environ, **proc.env}, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return out.stdout


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), tmp_path_factory.mktemp("budgets-redis") / "redis.log").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def budgets_factory(tmp_path: Path, mocks: Mocks, own_redis: RedisServer) -> Iterator[Callable[..., Budgets]]:
    """make(keys' extra TOML by name, [groups] TOML, processes, env) on a flushed Redis."""
    started: list[Budgets] = []

    def make(
        extras: dict[str, str], groups_toml: str = "", processes: int = 1, env: dict[str, str] | None = None
    ) -> Budgets:
        own_redis.flush()
        keys = {name: new_key() for name in extras}
        config = budgets_config(mocks, {name: (keys[name], extra) for name, extra in extras.items()}, groups_toml)
        procs = [
            start_gateway(tmp_path, mocks, config, redis_url=own_redis.url, name=f"gw{i}", env=env)
            for i in range(processes)
        ]
        budgets = Budgets(procs, keys, redis.Redis.from_url(own_redis.url))
        started.append(budgets)
        return budgets

    yield make
    for budgets in started:
        for proc in budgets.procs:
            proc.stop()
        budgets.redis.close()


def wait_for(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Settles go out just after the answer: poll until they landed."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_every_key_spends_tokens_and_money_and_keys_usage_shows_it(budgets_factory: Callable[..., Budgets]) -> None:
    """The reported case: `keys usage` said `spent 0` for a key without a budget that had used tokens."""
    budgets = budgets_factory({"plain": "", "rpm": "rpm = 1000", "unpriced": ""})
    for _ in range(3):
        assert budgets.post("plain").status_code == 200
        assert budgets.post("rpm").status_code == 200
    assert budgets.post("unpriced", {**SHORT, "model": "free-chat"}).status_code == 200
    wait_for(lambda: budgets.money("sg:{g:default}:k:rpm").get("total") == str(3 * SHORT_COST))
    assert budgets.money("sg:{g:default}:k:plain")["total"] == str(3 * SHORT_COST)
    # The group counts what all its keys spend.
    assert budgets.money("sg:{g:default}:g")["total"] == str(6 * SHORT_COST)
    spent = f"{3 * SHORT_COST / 1e6:.6f}"
    assert budgets.usage("plain")[2:] == ["24", "0", "unlimited", spent, "unlimited", "-", "lifetime", "-"]
    assert budgets.usage("rpm")[2:9] == ["24", "0", "unlimited", spent, "unlimited", "-", "lifetime"]
    # No price for free-chat: its tokens are counted, its cost is unknown and not counted.
    assert budgets.usage("unpriced")[2:9] == ["8", "0", "unlimited", "0.000000", "unlimited", "-", "lifetime"]
