"""The billing helpers in process: periods, the spend that counts, the dates clients send."""

from __future__ import annotations

import calendar

import pytest

from proxy.http.errors import InvalidRequest
from proxy.ops.billing import KeyMoney, Spend, _dates, current_month, period_end


def test_a_month_ends_at_midnight_utc_on_the_next_first() -> None:
    assert period_end("2030-01") == calendar.timegm((2030, 2, 1, 0, 0, 0))
    assert period_end("2030-12") == calendar.timegm((2031, 1, 1, 0, 0, 0))
    assert current_month(calendar.timegm((2030, 1, 31, 23, 59, 59)), 0) == "2030-01"
    assert current_month(calendar.timegm((2030, 1, 31, 23, 59, 59)), 1) == "2030-02"


def test_the_tighter_budget_is_the_one_with_less_left() -> None:
    key = Spend(budget=1.0, monthly=False, month="2030-01", total=900_000, this_month=0, held=0)
    group = Spend(budget=5.0, monthly=True, month="2030-01", total=9_000_000, this_month=4_500_000, held=0)
    assert (key.used, key.remaining, group.used, group.remaining) == (900_000, 100_000, 4_500_000, 500_000)
    assert KeyMoney(key, group).tightest() is key
    unlimited = Spend(budget=None, monthly=False, month="2030-01", total=5, this_month=5, held=0)
    assert KeyMoney(unlimited, group).tightest() is group
    assert KeyMoney(unlimited, unlimited).tightest() is None
    assert group.as_dict() == {
        "spent": 4.5, "held": 0.0, "budget": 5.0, "remaining": 0.5, "period": "2030-01",
        "renews_at": period_end("2030-01"), "spent_lifetime": 9.0,
    }  # fmt: skip


@pytest.mark.parametrize(
    "query",
    [b"", b"start_date=2030-01-01&end_date=2030-01-31", b"end_date=2030-01-31", b"other=1&start_date=2030-01-01"],
)
def test_dates_are_optional_and_checked_when_given(query: bytes) -> None:
    _dates(query)


@pytest.mark.parametrize(
    ("query", "param"),
    [
        (b"start_date=2030-02-30", "start_date"),
        (b"start_date=2030-1-1", "start_date"),
        (b"end_date=%27", "end_date"),
        (b"start_date=2030-02-01&end_date=2030-01-31", "start_date"),
    ],
)
def test_a_bad_date_is_a_400_naming_it(query: bytes, param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        _dates(query)
    assert (info.value.status, info.value.code, info.value.param) == (400, "invalid_date", param)
