from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from proxy.config.settings import (
    ConfigError,
    EventSettings,
    GroupSettings,
    LimitSettings,
    ProviderSettings,
    RedisSettings,
    ServerSettings,
    config_path,
    load_settings,
    parse_settings,
)
from proxy.request.auth import key_digest, new_key

PROVIDER: dict[str, Any] = {"name": "mock", "base_url": "http://127.0.0.1:8001/v1", "models": ["mock-chat"]}


def minimal(**sections: Any) -> dict[str, Any]:
    return {"providers": [dict(PROVIDER)], **sections}


def problems_of(raw: dict[str, Any], env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_settings(raw, env={} if env is None else env)
    assert str(info.value) == "; ".join(info.value.problems)
    return info.value.problems


def test_defaults() -> None:
    settings = parse_settings(minimal(), env={})
    assert settings.server == ServerSettings()
    assert settings.server.host == "127.0.0.1"
    assert settings.server.port == 9090
    assert settings.server.prefixes == ("/v1", "/api/v1")
    assert settings.server.max_body_bytes == 10485760
    assert settings.server.graceful_timeout_s == 120.0
    assert (settings.server.body_timeout_s, settings.server.drain_delay_s) == (30.0, 5.0)
    assert (settings.server.header_timeout_s, settings.server.keep_alive_timeout_s) == (10.0, 75.0)
    assert (settings.server.max_connections, settings.server.backlog) == (4096, 1024)
    assert settings.redis == RedisSettings(url="redis://127.0.0.1:6379/0", on_error="allow", timeout_s=0.25)
    assert (settings.redis.circuit_failures, settings.redis.circuit_cooldown_s) == (3, 5.0)
    assert settings.events == EventSettings(sink="stdout", path="events.jsonl", queue_size=10000)
    assert settings.limits == LimitSettings(reserve_tokens=1024, hold_ttl_s=600.0)
    assert settings.groups == {"default": GroupSettings("default")}
    assert settings.keys == {}
    assert settings.aliases == {}
    assert settings.warnings == ()
    assert settings.source == "<memory>"


def test_provider_defaults() -> None:
    (provider,) = parse_settings(minimal(), env={}).providers
    assert provider.name == "mock"
    assert provider.base_url == "http://127.0.0.1:8001/v1"
    assert (provider.api_key_env, provider.api_key) == (None, None)
    assert provider.models == ("mock-chat",)
    assert (provider.priority, provider.weight, provider.stream_usage) == (0, 1.0, True)
    assert (provider.connect_timeout_s, provider.first_byte_timeout_s, provider.idle_timeout_s) == (5.0, 120.0, 120.0)
    assert provider.models_cache_s == 300.0


def test_base_url_trailing_slash_is_dropped() -> None:
    raw = {"providers": [{**PROVIDER, "base_url": "https://api.deepseek.com/v1/"}]}
    assert parse_settings(raw, env={}).providers[0].base_url == "https://api.deepseek.com/v1"


def test_key_defaults_to_the_default_group_and_no_limits() -> None:
    digest = key_digest(new_key())
    settings = parse_settings(minimal(keys=[{"name": "alice", "sha256": digest}]), env={})
    key = settings.keys[digest]
    assert (key.name, key.sha256, key.group) == ("alice", digest, "default")
    limits = (key.rpm, key.tpm, key.burst, key.budget_tokens, key.models, key.enabled)
    assert limits == (None, None, None, None, None, True)


def test_keys_are_stored_by_lowercase_sha256() -> None:
    digest = key_digest(new_key())
    settings = parse_settings(minimal(keys=[{"name": "alice", "sha256": digest.upper()}]), env={})
    assert list(settings.keys) == [digest]


def test_key_with_every_field() -> None:
    digest = key_digest(new_key())
    raw = minimal(
        groups={"gold": {"rpm": 600, "tpm": 1000000, "burst": 50}},
        keys=[
            {
                "name": "alice",
                "sha256": digest,
                "group": "gold",
                "rpm": 60,
                "tpm": 100000,
                "burst": 10,
                "budget_tokens": 0,
                "models": ["deepseek-chat", "gpt-*"],
                "enabled": False,
            }
        ],
    )
    settings = parse_settings(raw, env={})
    assert settings.groups == {"default": GroupSettings("default"), "gold": GroupSettings("gold", 600, 1000000, 50)}
    key = settings.keys[digest]
    limits = (key.group, key.rpm, key.tpm, key.burst, key.budget_tokens, key.enabled)
    assert limits == ("gold", 60, 100000, 10, 0, False)
    assert key.models is not None
    assert key.models.exact == frozenset({"deepseek-chat"})
    assert (key.models.matches("gpt-4o"), key.models.matches("deepseek-coder")) == (True, False)


def test_default_group_limits_can_be_set() -> None:
    settings = parse_settings(minimal(groups={"default": {"rpm": 600, "tpm": 1000000}}), env={})
    assert settings.groups == {"default": GroupSettings("default", rpm=600, tpm=1000000)}


def test_server_values_from_the_file() -> None:
    raw = minimal(server={"bind": "0.0.0.0:8080", "prefixes": ["/v1"], "max_body_bytes": 1024, "graceful_timeout_s": 5})
    assert parse_settings(raw, env={}).server == ServerSettings("0.0.0.0", 8080, ("/v1",), 1024, 5.0)


def test_connection_settings_from_the_file_and_their_problems() -> None:
    values = {
        "body_timeout_s": 2, "header_timeout_s": 3, "keep_alive_timeout_s": 90,
        "drain_delay_s": 0, "max_connections": 50, "backlog": 64,
    }  # fmt: skip
    server = parse_settings(minimal(server=values), env={}).server
    assert (server.body_timeout_s, server.header_timeout_s, server.keep_alive_timeout_s) == (2.0, 3.0, 90.0)
    assert (server.drain_delay_s, server.max_connections, server.backlog) == (0.0, 50, 64)
    bad = {
        "body_timeout_s": 0, "header_timeout_s": -1, "keep_alive_timeout_s": "long",
        "drain_delay_s": -5, "max_connections": 0, "backlog": 1.5,
    }  # fmt: skip
    assert problems_of(minimal(server=bad)) == [
        "server.body_timeout_s: must be >= 0.001, got 0",
        "server.header_timeout_s: must be >= 0.001, got -1",
        "server.keep_alive_timeout_s: expected a number, got 'long'",
        "server.drain_delay_s: must be >= 0.0, got -5",
        "server.max_connections: must be >= 1, got 0",
        "server.backlog: expected a whole number, got 1.5",
    ]


@pytest.mark.parametrize(
    ("bind", "host", "port"),
    [("127.0.0.1:9090", "127.0.0.1", 9090), (":8080", "0.0.0.0", 8080), ("[::1]:9000", "::1", 9000)],
)
def test_bind_forms(bind: str, host: str, port: int) -> None:
    server = parse_settings(minimal(server={"bind": bind}), env={}).server
    assert (server.host, server.port) == (host, port)


def test_sluicegate_bind_overrides_the_file() -> None:
    raw = minimal(server={"bind": "127.0.0.1:9090"})
    server = parse_settings(raw, env={"SLUICEGATE_BIND": "0.0.0.0:8088"}).server
    assert (server.host, server.port) == ("0.0.0.0", 8088)


def test_bad_sluicegate_bind_is_named_by_the_variable() -> None:
    assert problems_of(minimal(), env={"SLUICEGATE_BIND": "0.0.0.0"}) == [
        "SLUICEGATE_BIND: expected HOST:PORT, got '0.0.0.0'"
    ]


def test_redis_url_overrides_the_file() -> None:
    raw = minimal(redis={"url": "redis://127.0.0.1:6379/0"})
    assert parse_settings(raw, env={"REDIS_URL": "rediss://cache.internal:6380/3"}).redis.url == (
        "rediss://cache.internal:6380/3"
    )


def test_empty_env_overrides_are_ignored() -> None:
    raw = minimal(server={"bind": "127.0.0.1:9191"}, redis={"url": "unix:///run/redis.sock"})
    settings = parse_settings(raw, env={"REDIS_URL": "", "SLUICEGATE_BIND": ""})
    assert (settings.server.port, settings.redis.url) == (9191, "unix:///run/redis.sock")


def test_provider_api_key_comes_from_the_named_env_var() -> None:
    raw = {"providers": [{**PROVIDER, "api_key_env": "MOCK_API_KEY"}]}
    (provider,) = parse_settings(raw, env={"MOCK_API_KEY": "upstream-secret-1"}).providers
    assert (provider.api_key_env, provider.api_key) == ("MOCK_API_KEY", "upstream-secret-1")


def test_provider_api_key_is_read_only_from_the_env_mapping_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOCK_API_KEY", "from-the-process-env")
    raw = {"providers": [{**PROVIDER, "api_key_env": "MOCK_API_KEY"}]}
    settings = parse_settings(raw, env={"OTHER": "x"})
    assert settings.providers[0].api_key is None


def test_unset_provider_api_key_env_is_a_warning_not_an_error() -> None:
    raw = {
        "providers": [
            {**PROVIDER, "api_key_env": "MOCK_API_KEY"},
            {**PROVIDER, "name": "mock2", "api_key_env": "MOCK2_API_KEY"},
        ]
    }
    settings = parse_settings(raw, env={"MOCK2_API_KEY": ""})
    # An empty variable counts as unset; upstream.py only sends a non-empty key.
    assert [p.api_key for p in settings.providers] == [None, ""]
    assert settings.warnings == (
        "providers[0].api_key_env: environment variable MOCK_API_KEY is not set",
        "providers[1].api_key_env: environment variable MOCK2_API_KEY is not set",
    )


def test_an_api_key_written_in_the_file_is_refused() -> None:
    raw = {"providers": [{**PROVIDER, "api_key": "upstream-secret-1"}]}
    assert problems_of(raw) == ["providers[0].api_key: unknown key (did you mean api_key_env?)"]


def test_every_problem_is_listed_at_once() -> None:
    raw = {
        "server": {"bind": "localhost", "max_body_bytes": -1, "graceful_timeout_s": -5, "port": 9090},
        "redis": {"url": "http://redis:6379", "on_error": "ignore", "timeout_s": 0},
        "events": {"sink": "kafka", "queue_size": 0},
        "limits": {"rpm": 5, "reserve_tokens": -1, "hold_ttl_s": 0},
        "budgets": {"rpm": 5},
        "providers": [
            {"name": "bad name!", "base_url": "ftp://files.example.com", "models": []},
            {"name": "ok", "base_url": "https://a.example.com/v1", "models": ["m"], "weight": 0, "timeout": 3},
            {"name": "ok", "base_url": "api.example.com", "models": ["m"], "weight": -2, "connect_timeout_s": -1},
        ],
        "aliases": {"fast": 5},
        "groups": {"gold": {"rpm": 0, "rpd": 5}},
        "keys": [
            {"name": "alice", "sha256": "not-hex"},
            {"name": "bob", "sha256": "a" * 64, "group": "silver", "rpm": -1},
            {"name": "bob", "sha256": "A" * 64, "secret": "x"},
        ],
    }
    assert problems_of(raw) == [
        "budgets: unknown section",
        "groups.gold.rpd: unknown key (did you mean rpm?)",
        "groups.gold.rpm: must be >= 1, got 0",
        "server.port: unknown key",
        "server.bind: expected HOST:PORT, got 'localhost'",
        "server.max_body_bytes: must be >= 1, got -1",
        "server.graceful_timeout_s: must be >= 0.0, got -5",
        "redis.url: expected a redis://, rediss:// or unix:// URL",
        "redis.on_error: expected one of allow, deny, got 'ignore'",
        "redis.timeout_s: must be >= 0.001, got 0",
        "events.sink: expected one of stdout, file, redis, off, got 'kafka'",
        "events.queue_size: must be >= 1, got 0",
        "limits.rpm: unknown key",
        "limits.reserve_tokens: must be >= 0, got -1",
        "limits.hold_ttl_s: must be >= 1.0, got 0",
        "providers[0].name: expected 1-64 of A-Z a-z 0-9 _ . -, got 'bad name!'",
        "providers[0].base_url: expected an http:// or https:// URL",
        "providers[0].models: expected a non-empty list of model names or globs",
        "providers[1].timeout: unknown key (did you mean idle_timeout_s?)",
        "providers[1].weight: must be > 0",
        "providers[2].name: 'ok' is used by another provider",
        "providers[2].base_url: expected an http:// or https:// URL",
        "providers[2].weight: must be >= 0.0, got -2",
        "providers[2].connect_timeout_s: must be >= 0.001, got -1",
        "aliases.fast: expected a model name string",
        "keys[0].sha256: expected 64 hex characters (sha256 of the full key)",
        "keys[1].group: no [groups.silver] table",
        "keys[1].rpm: must be >= 1, got -1",
        "keys[2].secret: unknown key",
        "keys[2].name: 'bob' is used by another key",
        "keys[2].sha256: the same key is configured twice",
    ]


def test_limits_values_from_the_file() -> None:
    settings = parse_settings(minimal(limits={"reserve_tokens": 256, "hold_ttl_s": 30}), env={})
    assert settings.limits == LimitSettings(reserve_tokens=256, hold_ttl_s=30.0)
    # 0 holds only the prompt estimate of a request that names no max_tokens.
    assert parse_settings(minimal(limits={"reserve_tokens": 0}), env={}).limits.reserve_tokens == 0


@pytest.mark.parametrize(
    ("raw", "problems"),
    [
        (minimal(server={"bind": "127.0.0.1:70000"}), ["server.bind: expected HOST:PORT, got '127.0.0.1:70000'"]),
        (minimal(server={"bind": "127.0.0.1:"}), ["server.bind: expected HOST:PORT, got '127.0.0.1:'"]),
        (minimal(server={"bind": 9090}), ["server.bind: expected a string, got 9090"]),
        (
            minimal(server={"prefixes": ["/v1/", "api"]}),
            [
                "server.prefixes: '/v1/' must start with '/' and not end with '/'",
                "server.prefixes: 'api' must start with '/' and not end with '/'",
            ],
        ),
        (minimal(server={"prefixes": ["/v1", ""]}), ["server.prefixes: expected a list of non-empty strings"]),
        (minimal(server={"max_body_bytes": 1.5}), ["server.max_body_bytes: expected a whole number, got 1.5"]),
        (minimal(server="fast"), ["server: expected a table"]),
        (minimal(redis={"on_error": "Deny"}), ["redis.on_error: expected one of allow, deny, got 'Deny'"]),
        (minimal(redis={"circuit_failures": 0}), ["redis.circuit_failures: must be >= 1, got 0"]),
        (minimal(redis={"circuit_cooldown_s": -1}), ["redis.circuit_cooldown_s: must be >= 0.001, got -1"]),
        (minimal(events={"sink": "stderr"}), ["events.sink: expected one of stdout, file, redis, off, got 'stderr'"]),
        (minimal(redis={"mode": "cluster", "url": "redis://h:7000/2"}), ["redis.url: a Redis Cluster has only db 0"]),
        (
            minimal(redis={"mode": "cluster", "url": "unix:///tmp/r.sock"}),
            ["redis.url: in cluster mode the nodes are reached over TCP; use redis:// or rediss://"],
        ),
        (
            minimal(redis={"mode": "replicas"}),
            ["redis.mode: expected one of single, sentinel, cluster, got 'replicas'"],
        ),
        (
            minimal(redis={"mode": "sentinel"}),
            [
                'redis.sentinels: mode = "sentinel" needs the sentinels, as ["host:port", ...]',
                'redis.service: mode = "sentinel" needs the name the sentinels monitor, e.g. "mymaster"',
            ],
        ),
        (
            minimal(redis={"mode": "sentinel", "sentinels": ["s1:26379", "s2", "s3:0"], "service": "m"}),
            ["redis.sentinels: expected HOST:PORT, got 's2'", "redis.sentinels: expected HOST:PORT, got 's3:0'"],
        ),
        (
            minimal(redis={"mode": "sentinel", "sentinels": ["s:1"], "service": "m", "url": "unix:///run/r.sock"}),
            ["redis.url: in sentinel mode the sentinels name the primary; use redis:// or rediss://"],
        ),
        (
            minimal(redis={"sentinels": ["s:26379"], "service": "m"}),
            ['redis.sentinels: only used with mode = "sentinel"', 'redis.service: only used with mode = "sentinel"'],
        ),
        (
            minimal(redis={"mode": "cluster", "sentinel_tls": True}),
            ['redis.sentinel_tls: only used with mode = "sentinel"'],
        ),
        (
            minimal(redis={"mode": "sentinel", "sentinels": ["s:1"], "service": "m", "sentinel_tls": True}),
            [
                "redis.sentinel_tls: the sentinels' TLS settings (CA, client certificate) come from redis.url; "
                "use a rediss:// URL"
            ],
        ),
        (
            minimal(redis={"mode": "sentinel", "sentinels": ["s:1"], "service": "m", "sentinel_tls": "yes"}),
            ["redis.sentinel_tls: expected true or false, got 'yes'"],
        ),
        ({"providers": []}, ["providers: at least one [[providers]] table is required"]),
        ({}, ["providers: at least one [[providers]] table is required"]),
        ({"providers": PROVIDER}, ["providers: expected an array of tables ([[providers]])"]),
        ({"providers": ["mock"]}, ["providers[0]: expected a table"]),
        (
            {"providers": [{"base_url": "http://x/v1", "models": ["m"]}]},
            ['providers[0].name: missing; every provider needs one, e.g. name = "deepseek"'],
        ),
        (
            {"providers": [{**PROVIDER, "name": "x" * 65}]},
            [f"providers[0].name: expected 1-64 of A-Z a-z 0-9 _ . -, got '{'x' * 65}'"],
        ),
        (
            {"providers": [{**PROVIDER, "base_url": "127.0.0.1:8001"}]},
            ["providers[0].base_url: expected an http:// or https:// URL"],
        ),
        (
            {"providers": [{"name": "mock", "base_url": "http://x/v1"}]},
            ['providers[0].models: missing; the models it serves, e.g. models = ["deepseek-*"]'],
        ),
        (
            {"providers": [{"name": "mock", "base_url": "http://x/v1", "models": []}]},
            ["providers[0].models: expected a non-empty list of model names or globs"],
        ),
        ({"providers": [{**PROVIDER, "weight": 0}]}, ["providers[0].weight: must be > 0"]),
        ({"providers": [{**PROVIDER, "weight": 0.0}]}, ["providers[0].weight: must be > 0"]),
        (
            {"providers": [{**PROVIDER, "stream_usage": "yes"}]},
            ["providers[0].stream_usage: expected true or false, got 'yes'"],
        ),
        (
            {"providers": [{**PROVIDER, "models_cache_s": 0}]},
            ["providers[0].models_cache_s: must be >= 0.1, got 0"],
        ),
        (
            minimal(keys=[{"name": "alice", "sha256": "ab" * 31}]),
            ["keys[0].sha256: expected 64 hex characters (sha256 of the full key)"],
        ),
        (
            minimal(keys=[{"name": "alice"}]),
            ["keys[0].sha256: missing; `sluicegate keys new` prints the block with it"],
        ),
        (
            minimal(keys=[{"name": "alice", "sha256": "g" * 64}]),
            ["keys[0].sha256: expected 64 hex characters (sha256 of the full key)"],
        ),
        (
            minimal(keys=[{"name": "a", "sha256": "b" * 64}, {"name": "c", "sha256": "b" * 64}]),
            ["keys[1].sha256: the same key is configured twice"],
        ),
        (minimal(keys=[{"name": "a", "sha256": "b" * 64, "group": "gold"}]), ["keys[0].group: no [groups.gold] table"]),
        (minimal(keys={"name": "a"}), ["keys: expected an array of tables ([[keys]])"]),
        (
            minimal(keys=[{"name": "a", "sha256": "b" * 64, "budget_tokens": -1}]),
            ["keys[0].budget_tokens: must be >= 0, got -1"],
        ),
        (minimal(groups={"gold": 5}), ["groups.gold: expected a table"]),
        (minimal(groups={"gold tier": {"rpm": 5}}), ["groups.gold tier: group names are 1-64 of A-Z a-z 0-9 _ . -"]),
        (minimal(aliases={"fast": ""}), ["aliases.fast: expected a model name string"]),
        (minimal(limits=[1]), ["limits: expected a table"]),
        (minimal(limits={"reserve_tokens": 1.5}), ["limits.reserve_tokens: expected a whole number, got 1.5"]),
        (minimal(limits={"reserve_tokens": "1k"}), ["limits.reserve_tokens: expected a whole number, got '1k'"]),
        (minimal(limits={"hold_ttl_s": 0.5}), ["limits.hold_ttl_s: must be >= 1.0, got 0.5"]),
        (minimal(limits={"hold_ttl_s": "10m"}), ["limits.hold_ttl_s: expected a number, got '10m'"]),
        (minimal(limits={"hold_ttl": 60}), ["limits.hold_ttl: unknown key (did you mean hold_ttl_s?)"]),
    ],
)
def test_single_problems(raw: dict[str, Any], problems: list[str]) -> None:
    assert problems_of(raw) == problems


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (minimal(server={"max_body_bytes": True}), "server.max_body_bytes: expected a whole number, got True"),
        (minimal(events={"sink": False}), "events.sink: expected a string, got False"),
        (minimal(limits={"reserve_tokens": True}), "limits.reserve_tokens: expected a whole number, got True"),
        ({"providers": [{**PROVIDER, "weight": True}]}, "providers[0].weight: expected a number, got True"),
    ],
)
def test_a_boolean_where_another_type_belongs_is_named_in_the_problem(raw: dict[str, Any], problem: str) -> None:
    # Regression: the bool was replaced by None before the message was written ("got None").
    assert problems_of(raw) == [problem]


def test_provider_repr_hides_the_api_key() -> None:
    raw = {"providers": [{**PROVIDER, "api_key_env": "MOCK_API_KEY"}]}
    secret = "upstream-secret-" + new_key()[3:19]
    settings = parse_settings(raw, env={"MOCK_API_KEY": secret})
    provider: ProviderSettings = settings.providers[0]
    assert provider.api_key == secret
    assert secret not in repr(provider)
    assert "MOCK_API_KEY" in repr(provider)
    assert secret not in repr(settings)


def test_key_repr_hides_the_sha256() -> None:
    digest = key_digest(new_key())
    key = parse_settings(minimal(keys=[{"name": "alice", "sha256": digest}]), env={}).keys[digest]
    assert digest not in repr(key)
    assert "alice" in repr(key)


def test_with_keys_adds_keys_by_sha256() -> None:
    first, second = key_digest(new_key()), key_digest(new_key())
    settings = parse_settings(minimal(keys=[{"name": "alice", "sha256": first}]), env={})
    demo = parse_settings(minimal(keys=[{"name": "demo", "sha256": second}]), env={}).keys[second]
    added = settings.with_keys(demo)
    assert list(added.keys) == [first, second]
    assert list(settings.keys) == [first]


GOOD_TOML = """
[server]
bind = "127.0.0.1:9191"

[[providers]]
name = "deepseek"
base_url = "https://api.deepseek.com/v1"
api_key_env = "DEEPSEEK_API_KEY"
models = ["deepseek-chat", "deepseek-*"]
priority = 1
weight = 2.5

[aliases]
"gpt-4o-mini" = "deepseek-chat"
"""


def test_load_settings_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(GOOD_TOML, encoding="utf-8")
    settings = load_settings(str(path), env={"DEEPSEEK_API_KEY": "upstream-secret-1"})
    assert settings.source == str(path)
    assert settings.server.port == 9191
    (provider,) = settings.providers
    assert (provider.name, provider.priority, provider.weight, provider.api_key) == (
        "deepseek",
        1,
        2.5,
        "upstream-secret-1",
    )
    assert dict(settings.aliases) == {"gpt-4o-mini": "deepseek-chat"}


def test_the_shipped_demo_config_loads() -> None:
    settings = load_settings(str(Path(__file__).resolve().parents[2] / "config" / "demo.toml"), env={})
    assert [p.name for p in settings.providers] == ["mock"]


def test_load_settings_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "missing.toml")
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert info.value.problems == [f"{path}: cannot read the file (No such file or directory)"]


def test_load_settings_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(str(tmp_path), env={})
    assert info.value.problems == [f"{tmp_path}: cannot read the file (Is a directory)"]


def test_load_settings_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text('[server]\nbind = "127.0.0.1:9090\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_settings(str(path), env={})
    assert info.value.problems == [f"{path}: not valid TOML (Illegal character '\\n' (at line 2, column 23))"]


def test_load_settings_file_that_is_not_utf8(tmp_path: Path) -> None:
    # Regression: UnicodeDecodeError is not an OSError and used to escape as a traceback.
    path = tmp_path / "gateway.toml"
    path.write_bytes(b'[server]\nbind = "caf\xe9:9090"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(str(path), env={})
    assert info.value.problems == [f"{path}: not UTF-8 text (invalid continuation byte at byte 20)"]


def test_config_path_order() -> None:
    assert config_path("a.toml", env={"SLUICEGATE_CONFIG": "b.toml"}) == "a.toml"
    assert config_path(None, env={"SLUICEGATE_CONFIG": "b.toml"}) == "b.toml"
    assert config_path(None, env={}) == "config/gateway.toml"


def test_api_key_env_holding_a_key_is_refused_without_echo() -> None:
    pasted = "sk-proj-" + "A1b2" * 10
    raw = {"providers": [{"name": "p", "base_url": "http://x/v1", "models": ["m"], "api_key_env": pasted}]}
    with pytest.raises(ConfigError) as info:
        parse_settings(raw, {})
    assert info.value.problems == [
        "providers[0].api_key_env: expected the NAME of an environment variable (A-Z, 0-9, _)"
    ]
    assert pasted not in str(info.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_numbers_must_be_finite(value: float) -> None:
    raw = {"providers": [{"name": "p", "base_url": "http://x/v1", "models": ["m"], "weight": value}]}
    with pytest.raises(ConfigError) as info:
        parse_settings(raw, {})
    assert info.value.problems == [f"providers[0].weight: expected a finite number, got {value!r}"]


def test_bad_redis_url_names_the_variable_it_came_from() -> None:
    raw = {"providers": [{"name": "p", "base_url": "http://x/v1", "models": ["m"]}]}
    with pytest.raises(ConfigError) as info:
        parse_settings(raw, {"REDIS_URL": "redis://127.0.0.1:notaport/0"})
    assert info.value.problems == ["REDIS_URL: Port could not be cast to integer value as 'notaport'"]
    with pytest.raises(ConfigError) as info:
        parse_settings({**raw, "redis": {"url": "redis://h:99999/0"}}, {})
    assert info.value.problems == ["redis.url: Port out of range 0-65535"]


def test_money_budgets_for_keys_and_groups_with_an_optional_month() -> None:
    raw = minimal(
        groups={"team": {"budget": 25, "budget_period": "month"}},
        keys=[
            {"name": "a", "sha256": "a" * 64, "group": "team", "budget": 2.5},
            {"name": "b", "sha256": "b" * 64, "budget": 0, "budget_period": "month"},
        ],
        prices=[{"model": "mock-*", "input": 1, "output": 2}],
    )
    settings = parse_settings(raw, env={})
    assert settings.groups["team"] == GroupSettings("team", budget=25.0, budget_period="month")
    a, b = settings.keys["a" * 64], settings.keys["b" * 64]
    assert (a.budget, a.budget_period, b.budget, b.budget_period) == (2.5, None, 0.0, "month")
    assert settings.warnings == ()


def test_money_budget_problems_name_the_key() -> None:
    raw = minimal(
        groups={"team": {"budget": -1, "budget_period": "week"}},
        keys=[{"name": "a", "sha256": "a" * 64, "budget": "5"}],
    )
    assert problems_of(raw) == [
        "groups.team.budget: must be >= 0, got -1",
        "groups.team.budget_period: expected 'month' (omitted: lifetime), got 'week'",
        "keys[0].budget: expected a number, got the quoted string '5' (write it without quotes)",
    ]


def test_a_model_a_money_budget_may_use_without_a_price_is_flagged() -> None:
    providers = [{**PROVIDER, "models": ["mock-chat", "deepseek-*", "other"]}]
    raw = {
        "providers": providers,
        "aliases": {"cheap": "mock-chat"},
        "groups": {"team": {"budget": 10}},
        "keys": [
            {"name": "narrow", "sha256": "a" * 64, "budget": 1, "models": ["cheap", "deepseek-chat"]},
            {"name": "member", "sha256": "b" * 64, "group": "team", "models": ["other"]},
            {"name": "free", "sha256": "c" * 64},  # no money budget: nothing to flag
        ],
        "prices": [{"model": "mock-chat", "input": 1, "output": 2}],
    }
    settings = parse_settings(raw, env={})
    assert settings.warnings == (
        # Its own exact name, that the provider's glob serves; not the glob itself, which it may not use.
        "key 'narrow' has a budget in money, but these models it may use have no [[prices]]: 'deepseek-chat'; "
        'their requests get 403 route_not_billable (with unpriced_routes = "allow" on their provider, '
        "they spend nothing of it)",
        "key 'member' has a budget in money, but these models it may use have no [[prices]]: 'other'; "
        'their requests get 403 route_not_billable (with unpriced_routes = "allow" on their provider, '
        "they spend nothing of it)",
    )
    priced = {**raw, "prices": [*raw["prices"], {"model": "deepseek-*", "input": 1, "output": 2}]}
    assert (
        parse_settings(priced, env={})
        .warnings[0]
        .endswith(
            "no [[prices]]: 'other'; their requests get 403 route_not_billable (with unpriced_routes = "
            '"allow" on their provider, they spend nothing of it)'
        )
    )


def test_the_tests_clock_offset_is_read_from_the_environment_and_said_out_loud() -> None:
    settings = parse_settings(minimal(), env={"SLUICEGATE_TEST_CLOCK_OFFSET_S": "-3600"})
    assert settings.limits.clock_offset_s == -3600
    assert settings.warnings == (
        "SLUICEGATE_TEST_CLOCK_OFFSET_S is set: budget periods follow a clock -3600 s off (for tests)",
    )
    assert problems_of(minimal(), env={"SLUICEGATE_TEST_CLOCK_OFFSET_S": "soon"}) == [
        "SLUICEGATE_TEST_CLOCK_OFFSET_S: expected a whole number of seconds, got 'soon'"
    ]


def test_sentinel_mode_reads_the_sentinels_and_the_service_and_keeps_the_url_for_credentials() -> None:
    redis = {
        "mode": "sentinel",
        "sentinels": ["10.0.0.1:26379", "[::1]:26380"],
        "service": "mymaster",
        "url": "rediss://gateway:secret@ignored:6379/2",
    }
    settings = parse_settings(minimal(redis=redis), env={})
    assert (settings.redis.mode, settings.redis.service) == ("sentinel", "mymaster")
    assert settings.redis.sentinels == (("10.0.0.1", 26379), ("::1", 26380))
    assert settings.redis.url == "rediss://gateway:secret@ignored:6379/2"
    assert parse_settings(minimal(), env={}).redis.mode == "single"


def test_sentinel_tls_is_read_in_sentinel_mode_with_a_rediss_url() -> None:
    redis = {
        "mode": "sentinel",
        "sentinels": ["s:1"],
        "service": "m",
        "url": "rediss://gw:pw@x/0",
        "sentinel_tls": True,
    }
    assert parse_settings(minimal(redis=redis), env={}).redis.sentinel_tls is True
    assert parse_settings(minimal(redis={**redis, "sentinel_tls": False}), env={}).redis.sentinel_tls is False
    assert parse_settings(minimal(), env={}).redis.sentinel_tls is False


def test_the_shipped_redis_snippets_are_valid_redis_tables() -> None:
    deploy = Path(__file__).resolve().parents[2] / "deploy"
    sentinel = parse_settings(minimal(**tomllib.loads((deploy / "redis-sentinel.toml").read_text())), env={}).redis
    assert (sentinel.mode, sentinel.service, len(sentinel.sentinels)) == ("sentinel", "mymaster", 3)
    cluster = parse_settings(minimal(**tomllib.loads((deploy / "redis-cluster.toml").read_text())), env={}).redis
    assert cluster.mode == "cluster" and cluster.url.startswith("rediss://")
