"""The table of limit kinds is the one place a kind is declared: settings, `keys new` and buckets follow it."""

from __future__ import annotations

from dataclasses import fields

import pytest

from proxy.cli import build_parser
from proxy.config.limit_kinds import BUCKET_KINDS, LIMIT_KINDS, RPM, TOKEN_BUDGET, TPM, Scope, kinds_for, setting_names
from proxy.config.settings import ConfigError, GroupSettings, KeySettings, LimitSettings, parse_settings
from proxy.limits.plan import KeyLimits, buckets_for

PROVIDER = {"name": "mock", "base_url": "http://127.0.0.1:8001/v1", "models": ["mock-chat"]}
SETTINGS_OF: dict[Scope, type[KeySettings | GroupSettings]] = {"key": KeySettings, "group": GroupSettings}


@pytest.mark.parametrize("scope", ["key", "group"])
def test_every_kind_of_a_scope_is_a_setting_of_that_scope(scope: Scope) -> None:
    names = {f.name for f in fields(SETTINGS_OF[scope])}
    assert set(setting_names(scope)) <= names
    for kind in LIMIT_KINDS:
        assert (kind.name in names) == (scope in kind.scopes)


def test_each_kind_is_read_from_the_config_with_its_minimum() -> None:
    key = {"name": "alice", "sha256": "a" * 64, **{k.name: k.minimum - 1 for k in kinds_for("key")}}
    with pytest.raises(ConfigError) as info:
        parse_settings({"providers": [PROVIDER], "keys": [key]}, env={})
    assert info.value.problems == [
        f"keys[0].{k.name}: must be >= {k.minimum}, got {k.minimum - 1}" for k in kinds_for("key")
    ]


def test_keys_new_offers_every_kind_a_key_may_carry() -> None:
    argv = ["keys", "new", "--name", "n"]
    for kind in kinds_for("key"):
        argv += ["--" + kind.name.replace("_", "-"), "7"]
    args = build_parser().parse_args(argv)
    assert [getattr(args, k.name) for k in kinds_for("key")] == [7] * len(kinds_for("key"))


def test_buckets_follow_the_table_in_order_and_rows_decide_admission() -> None:
    key = KeySettings(name="k", sha256="0" * 64, group="g", rpm=60, tpm=1000, burst=5, budget_tokens=10)
    group = GroupSettings("g", rpm=600, tpm=10000)
    buckets = buckets_for(key, group)
    assert [(b.scope, b.kind, b.capacity) for b in buckets] == [
        ("key", RPM, 5), ("key", TPM, 1000), ("group", RPM, 600), ("group", TPM, 10000),
    ]  # fmt: skip
    assert [b.redis_key.rpartition("}:")[2] for b in buckets] == ["k:k:rpm", "k:k:tpm", "g:rpm", "g:tpm"]
    limits = KeyLimits.build(key, group, LimitSettings())
    assert limits.passthrough is not None and [b.kind for b in limits.passthrough.buckets] == [RPM, RPM]
    assert [b.kind for b in limits.token_buckets] == [TPM, TPM]
    assert BUCKET_KINDS == (RPM, TPM)
    assert limits.model is not None and limits.model.budgeted
    assert TOKEN_BUDGET.spent_message("key") == (
        "This API key's token budget is spent. Ask the gateway's operators to raise it."
    )
