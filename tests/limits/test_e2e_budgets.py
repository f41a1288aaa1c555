"""Spending and money budgets across real gateway processes sharing one real Redis.

The mock upstream's usage is known in advance: prompt tokens are the words of the
prompt, completion tokens its chunk count (`x-mock-chunks`). mock-chat costs
PRICE_IN and PRICE_OUT per million tokens, so one token is PRICE_* micro-units.
"""

from __future__ import annotations

import asyncio
import calendar
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import orjson
import pytest
import redis

from proxy.request.auth import key_digest, new_key
from tests.conftest import SHORT, Mocks, Proc, RedisServer, start_gateway
from tests.conftest import Budgets as SharedBudgets

PRICE_IN, PRICE_OUT = 2, 10  # EUR per million tokens: micro-units per token
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
class Budgets(SharedBudgets):
    """The shared view, and `keys usage` in this file's currency."""

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


@pytest.fixture
def budgets_factory(tmp_path: Path, mocks: Mocks, own_redis: RedisServer) -> Iterator[Callable[..., Budgets]]:
    """make(keys' extra TOML by name, [groups] TOML, one environment per process) on a flushed Redis."""
    started: list[Budgets] = []

    def make(extras: dict[str, str], groups_toml: str = "", envs: tuple[dict[str, str], ...] = ({},)) -> Budgets:
        own_redis.flush()
        keys = {name: new_key() for name in extras}
        config = budgets_config(mocks, {name: (keys[name], extra) for name, extra in extras.items()}, groups_toml)
        procs = [
            start_gateway(tmp_path, mocks, config, redis_url=own_redis.url, name=f"gw{i}", env=env)
            for i, env in enumerate(envs)
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


def micros(row: list[str], column: int) -> int:
    """A money column of `keys usage` in micro-units."""
    return round(float(row[column]) * 1_000_000)


def test_a_spent_budget_says_how_to_top_up_in_the_operators_words(budgets_factory: Callable[..., Budgets]) -> None:
    words = "Top up at https://billing.example.test/keys (cards and invoices)."
    budgets = budgets_factory({"tiny": "budget = 0.000001"}, f'[limits]\nbudget_message = "{words}"\n')
    answers = [budgets.post("tiny") for _ in range(3)]
    refused = [a for a in answers if a.status_code == 402]
    assert refused, [a.status_code for a in answers]
    error = refused[0].json()["error"]
    assert error["message"].startswith(f"This API key's budget is spent. {words}")
    assert (error["code"], refused[0].headers["x-should-retry"]) == ("insufficient_quota", "false")


def assert_spent_402(resp: httpx.Response, whose: str) -> dict[str, Any]:
    assert resp.status_code == 402
    assert resp.headers["x-should-retry"] == "false"
    error: dict[str, Any] = resp.json()["error"]
    assert error["code"] == error["type"] == "insufficient_quota"
    assert error["message"].startswith(f"This {whose} budget is spent. Ask the gateway's operators to raise it.")
    return error


def test_a_money_budget_blocks_at_the_request_that_finds_it_spent(budgets_factory: Callable[..., Budgets]) -> None:
    """200 micro-units, 64 a request: the fourth starts with 192 spent and ends at 256; the fifth is refused."""
    budgets = budgets_factory({"money": "budget = 0.0002", "tokens": "budget_tokens = 1"})
    statuses = []
    for _ in range(5):
        statuses.append(budgets.post("money").status_code)
        wait_for(lambda: budgets.redis.exists("sg:{g:default}:k:money:money_held") == 0)
    assert statuses == [200, 200, 200, 200, 402]
    assert budgets.money("sg:{g:default}:k:money") == {"total": "256", "month": "256", "period": budgets.period()}
    error = assert_spent_402(budgets.post("money"), "API key's")
    # The same shape as a spent token budget's 402, but for the message.
    assert budgets.post("tokens").status_code == 200
    wait_for(lambda: budgets.redis.get("sg:{g:default}:k:tokens:spent") is not None)
    tokens_error = budgets.post("tokens").json()["error"]
    assert tokens_error["message"].startswith("This API key's token budget is spent.")
    assert {k: v for k, v in error.items() if k not in ("message", "request_id")} == {
        k: v for k, v in tokens_error.items() if k not in ("message", "request_id")
    }
    row = budgets.usage("money")
    assert row[5:9] == ["0.000256", "0.000200", "0.000000", "lifetime"]


async def burst(budgets: Budgets, name: str, n: int, body: bytes) -> list[int]:
    """n concurrent requests, alternating over the gateway processes."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one(i: int) -> int:
            async with session.post(budgets.url(i), data=body, headers=budgets.auth(name)) as resp:
                await resp.read()
                return resp.status

        return await asyncio.gather(*(one(i) for i in range(n)))


async def test_thirty_concurrent_requests_over_two_processes_stay_within_the_money_budget(
    budgets_factory: Callable[..., Budgets],
) -> None:
    """Each request holds the cost of its prompt's bound and max_tokens (at least what it uses): whole while others
    are in flight, or all that is left with none; so only that one can go over, by at most its own cost."""
    budgets = budgets_factory({"m": "budget = 0.001"}, envs=({}, {}))
    body = orjson.dumps({**SHORT, "max_tokens": 6})
    statuses: list[int] = []
    for _ in range(30):  # near the end of the budget, one request a burst gets in
        results = await burst(budgets, "m", 30, body)
        assert set(results) <= {200, 402, 429}, results
        statuses += results
        if all(status == 402 for status in results):
            break
        # Let the last settles land: while a hold is out, no request may take what is left.
        wait_for(lambda: budgets.redis.exists("sg:{g:default}:k:m:money_held") == 0)
    admitted = statuses.count(200)
    spent = int(budgets.money("sg:{g:default}:k:m")["total"])
    print(f"{admitted} admitted of {len(statuses)}; spent {spent} of 1000")
    assert statuses[-30:] == [402] * 30
    assert spent == admitted * SHORT_COST
    assert 1000 <= spent <= 1000 + SHORT_COST - 1


def offset_env(budgets_redis: redis.Redis, moment: str) -> dict[str, str]:
    """SLUICEGATE_TEST_CLOCK_OFFSET_S that puts the budget clock at this UTC moment."""
    seconds, _ = budgets_redis.time()
    target = calendar.timegm(time.strptime(moment, "%Y-%m-%dT%H:%M:%S"))
    return {"SLUICEGATE_TEST_CLOCK_OFFSET_S": str(target - int(seconds))}


def test_a_monthly_budget_renews_on_the_first_at_midnight_utc(
    budgets_factory: Callable[..., Budgets], own_redis: RedisServer
) -> None:
    """Two processes on one Redis, one clock on 31 January, the other ten minutes into February."""
    view = redis.Redis.from_url(own_redis.url)
    january, february = offset_env(view, "2030-01-31T23:50:00"), offset_env(view, "2030-02-01T00:10:00")
    view.close()
    extras = {"monthly": 'budget = 0.0002\nbudget_period = "month"', "lifetime": "budget = 0.0002"}
    budgets = budgets_factory(extras, envs=(january, february))
    for name in extras:
        for _ in range(4):
            assert budgets.post(name, i=0).status_code == 200
        wait_for(lambda: budgets.money(f"sg:{{g:default}}:k:{name}").get("total") == "256")  # noqa: B023
        assert_spent_402(budgets.post(name, i=0), "API key's")
    row = budgets.usage("monthly")  # the CLI with January's clock
    assert row[5:9] == ["0.000256", "0.000200", "0.000000", "2030-01"]
    # February: the month's spend starts again; a lifetime budget stays spent.
    assert budgets.post("monthly", i=1).status_code == 200
    assert_spent_402(budgets.post("lifetime", i=1), "API key's")
    wait_for(lambda: budgets.money("sg:{g:default}:k:monthly").get("period") == "2030-02")
    assert budgets.money("sg:{g:default}:k:monthly") == {"total": "320", "month": "64", "period": "2030-02"}
    february_row = keys_usage(budgets.procs[1], "--name", "monthly").splitlines()[1].split()
    assert february_row[5:9] == ["0.000064", "0.000200", "0.000136", "2030-02"]
    # The process still in January spends in the later month stored with the spend: it never undoes a renewal.
    assert budgets.post("monthly", i=0).status_code == 200
    wait_for(lambda: budgets.money("sg:{g:default}:k:monthly").get("month") == "128")
    assert budgets.money("sg:{g:default}:k:monthly")["period"] == "2030-02"


def test_a_group_budget_holds_across_the_keys_of_the_group(budgets_factory: Callable[..., Budgets]) -> None:
    group = "\n[groups.team]\nbudget = 0.0002\n"
    budgets = budgets_factory({"a": 'group = "team"', "b": 'group = "team"', "outside": ""}, group, envs=({}, {}))
    statuses = []
    for i in range(5):
        statuses.append(budgets.post("ab"[i % 2], i=i).status_code)
        wait_for(lambda: budgets.redis.exists("sg:{g:team}:g:money_held") == 0)
    assert statuses == [200, 200, 200, 200, 402]
    assert_spent_402(budgets.post("a"), "key group's")
    assert_spent_402(budgets.post("b", i=1), "key group's")
    assert budgets.post("outside").status_code == 200
    assert budgets.money("sg:{g:team}:g")["total"] == "256"
    assert budgets.money("sg:{g:team}:k:a")["total"] == budgets.money("sg:{g:team}:k:b")["total"] == "128"
    # keys usage: each key's own spend, no budget of its own, and what is left of the group's.
    assert budgets.usage("a")[5:9] == ["0.000128", "unlimited", "0.000000", "lifetime"]


def test_check_config_flags_a_model_a_money_budget_may_use_without_a_price(tmp_path: Path, mocks: Mocks) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(budgets_config(mocks, {"m": (new_key(), "budget = 1"), "free": (new_key(), "")}))
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", "--config", str(config)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr == (
        "warning: key 'm' has a budget in money, but these models it may use have no [[prices]]: 'free-chat'; "
        'their requests get 403 route_not_billable (with unpriced_routes = "allow" on their provider, '
        "they spend nothing of it)\n"
    )


def test_billing_endpoints_show_what_a_chat_client_displays(
    budgets_factory: Callable[..., Budgets], own_redis: RedisServer
) -> None:
    """Chat clients show hard_limit_usd - total_usage / 100 as the balance, and access_until as its end."""
    extras = {
        "monthly": 'budget = 0.0002\nbudget_period = "month"',
        "member": 'group = "team"\nbudget = 1',  # the group's budget is the tighter one
        "lifetime": "budget = 0.01",
        "free": "",
    }
    groups = '\n[groups.team]\nbudget = 0.0005\nbudget_period = "month"\n'
    view = redis.Redis.from_url(own_redis.url)
    january = offset_env(view, "2030-01-15T12:00:00")
    view.close()
    budgets = budgets_factory(extras, groups, envs=(january,))
    for name, times in (("monthly", 2), ("member", 1), ("lifetime", 1), ("free", 1)):
        for _ in range(times):
            assert budgets.post(name).status_code == 200
    wait_for(lambda: budgets.money("sg:{g:default}:k:free").get("total") == str(SHORT_COST))
    february = calendar.timegm((2030, 2, 1, 0, 0, 0))
    far = calendar.timegm((2100, 1, 1, 0, 0, 0))
    expected = {  # limit, access_until, total_usage in cents
        "monthly": (0.0002, february, 2 * SHORT_COST / 10_000),
        "member": (0.0005, february, SHORT_COST / 10_000),
        "lifetime": (0.01, far, SHORT_COST / 10_000),
        "free": (100_000_000, far, SHORT_COST / 10_000),
    }
    base = f"http://127.0.0.1:{budgets.procs[0].port}/v1/dashboard/billing"
    dates = {"start_date": "2030-01-01", "end_date": "2030-01-31"}
    for name, (limit, until, cents) in expected.items():
        auth = budgets.auth(name)
        sub = httpx.get(f"{base}/subscription", headers=auth)
        assert sub.status_code == 200
        assert sub.json() == {
            "object": "billing_subscription", "hard_limit_usd": limit, "soft_limit_usd": limit,
            "system_hard_limit_usd": limit, "has_payment_method": True, "access_until": until,
        }  # fmt: skip
        used = httpx.get(f"{base}/usage", params=dates, headers=auth)
        assert used.status_code == 200
        assert used.json() == {"object": "list", "total_usage": pytest.approx(cents)}
    # What the client shows for the monthly key: 0.0002 - 0.000128 left.
    balance = (
        0.0002 - httpx.get(f"{base}/usage", params=dates, headers=budgets.auth("monthly")).json()["total_usage"] / 100
    )
    assert balance == pytest.approx(0.000072)


def test_billing_endpoints_refuse_bad_dates_other_methods_and_missing_keys(
    budgets_factory: Callable[..., Budgets],
) -> None:
    budgets = budgets_factory({"k": "budget = 1"})
    base = f"http://127.0.0.1:{budgets.procs[0].port}"
    auth = budgets.auth("k")
    for query, param in (
        ({"start_date": "2030-13-01", "end_date": "2030-12-31"}, "start_date"),
        ({"start_date": "2030-01-01", "end_date": "tomorrow"}, "end_date"),
        ({"start_date": "2030-02-01", "end_date": "2030-01-01"}, "start_date"),
    ):
        resp = httpx.get(f"{base}/v1/dashboard/billing/usage", params=query, headers=auth)
        assert resp.status_code == 400
        error = resp.json()["error"]
        assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "invalid_date", param)
    assert httpx.get(f"{base}/v1/dashboard/billing/usage", headers=auth).status_code == 200  # dates are optional
    assert httpx.post(f"{base}/v1/dashboard/billing/subscription", headers=auth).status_code == 405
    assert httpx.get(f"{base}/v1/dashboard/billing/subscription").status_code == 401
    # Like /models: under a prefix only.
    assert httpx.get(f"{base}/dashboard/billing/subscription", headers=auth).status_code == 404
    assert httpx.get(f"{base}/api/v1/dashboard/billing/subscription", headers=auth).status_code == 200


def test_admin_usage_route_answers_the_admin_token_only(
    budgets_factory: Callable[..., Budgets], own_redis: RedisServer
) -> None:
    token = "adm-" + new_key()[3:]
    view = redis.Redis.from_url(own_redis.url)
    january = offset_env(view, "2030-01-15T12:00:00")
    view.close()
    extras = {"m": 'budget = 0.001\nbudget_period = "month"\nrpm = 100', "other": ""}
    budgets = budgets_factory(extras, envs=({"SLUICEGATE_ADMIN_TOKEN": token, **january}, january))
    for _ in range(2):
        assert budgets.post("m").status_code == 200
    wait_for(lambda: budgets.money("sg:{g:default}:k:m").get("total") == str(2 * SHORT_COST))
    admin = f"http://127.0.0.1:{budgets.procs[0].port}/admin/keys"
    bearer = {"Authorization": f"Bearer {token}"}
    resp = httpx.get(f"{admin}/m/usage", headers=bearer)
    assert resp.status_code == 200
    usage = resp.json()
    assert usage["key"] == "m" and usage["group"] == "default" and usage["currency"] == "EUR"
    assert usage["tokens"] == {"spent": 16, "held": 0, "budget": None}
    assert usage["money"] == {
        "spent": 0.000128, "held": 0.0, "budget": 0.001, "remaining": 0.000872, "period": "2030-01",
        "renews_at": calendar.timegm((2030, 2, 1, 0, 0, 0)), "spent_lifetime": 0.000128,
    }  # fmt: skip
    assert usage["money_left"] == 0.000872
    assert [(b["scope"], b["limit"], b["capacity"]) for b in usage["buckets"]] == [("key", "rpm", 100)]
    # The same as `keys usage` prints.
    row = keys_usage(budgets.procs[0], "--name", "m").splitlines()[1].split()
    assert row[2:9] == ["16", "0", "unlimited", "0.000128", "0.001000", "0.000872", "2030-01"]
    # Refused: a client key (403), a wrong or missing token (401); an unknown key 404; only GET.
    client = httpx.get(f"{admin}/m/usage", headers=budgets.auth("other"))
    assert client.status_code == 403
    assert client.json()["error"]["type"] == "permission_error"
    for headers in ({"Authorization": f"Bearer {token}x"}, {"Authorization": token}, {}):
        wrong = httpx.get(f"{admin}/m/usage", headers=headers)
        assert wrong.status_code == 401
        assert wrong.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{admin}/nobody/usage", headers=bearer).status_code == 404
    assert httpx.post(f"{admin}/m/usage", headers=bearer).status_code == 405
    # Admin routes live at the root: under a prefix the token is not a client key.
    assert (
        httpx.get(f"http://127.0.0.1:{budgets.procs[0].port}/v1/admin/keys/m/usage", headers=bearer).status_code == 401
    )
    # Without the variable (the second process), there are no admin routes at all.
    unset = httpx.get(f"http://127.0.0.1:{budgets.procs[1].port}/admin/keys/m/usage", headers=bearer)
    assert unset.status_code == 404
    assert unset.json()["error"]["code"] == "not_found"
    for proc in budgets.procs:
        assert token not in proc.log.read_text()
