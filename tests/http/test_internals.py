"""The one check of hypercorn's and h11's internals (http/internals.py): the installed releases pass it,
and a release that moved any private name the gateway uses is caught before a request is served."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import h11
import pytest

from proxy.http import internals


@pytest.fixture(autouse=True)
def fresh_check() -> Iterator[None]:
    internals.usable.cache_clear()
    yield
    internals.usable.cache_clear()


def test_the_installed_hypercorn_and_h11_are_the_tested_ones_with_every_private_name() -> None:
    assert internals.problems() == []
    assert internals.usable()


@pytest.mark.parametrize(
    ("owner", "name"), internals.PRIVATE_NAMES, ids=[f"{o.__name__}.{n}" for o, n in internals.PRIVATE_NAMES]
)
def test_a_private_method_gone_is_named(monkeypatch: pytest.MonkeyPatch, owner: type, name: str) -> None:
    monkeypatch.delattr(owner, name)
    assert [p for p in internals.problems() if name in p] == [
        f"{owner.__module__}.{owner.__qualname__}.{name} is missing"
    ]
    assert not internals.usable()


@pytest.mark.parametrize("name", internals.H11_INSTANCE_NAMES)
def test_an_attribute_h11_no_longer_sets_is_named(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    init = h11.Connection.__init__

    def without(self: h11.Connection, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        delattr(self, name)

    monkeypatch.setattr(h11.Connection, "__init__", without)
    assert f"h11.Connection has no {name}" in internals.problems()


def test_another_release_is_named_even_with_every_name_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(internals.importlib.metadata, "version", lambda name: "0.99.0")
    assert internals.problems() == ["hypercorn 0.99.0 is not the tested 0.18.x", "h11 0.99.0 is not the tested 0.16.x"]


def test_a_failed_check_is_said_once(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delattr(h11.Connection, "_process_event")
    with caplog.at_level(logging.WARNING, logger="sluicegate"):
        assert not internals.usable()
        assert not internals.usable()
    said = [r.getMessage() for r in caplog.records if "serving hypercorn's own way" in r.getMessage()]
    assert len(said) == 1
    assert "h11._connection.Connection._process_event is missing" in said[0]
