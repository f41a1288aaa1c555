"""TOML file + environment -> one frozen Settings object.

Every problem is collected with the dotted name of the key that is wrong, so
`sluicegate check-config` can list them all at once.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from fnmatch import translate
from pathlib import Path
from typing import Any, Literal

from redis.connection import parse_url

from .limit_kinds import MONEY_BUDGET, Counts, LimitKind, Scope, kinds_for, setting_names
from .lines import with_lines
from .prices import Price, Prices

DEFAULT_CONFIG_PATH = "config/gateway.toml"
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
CURRENCY_RE = re.compile(r"^[A-Z]{3}$")
DEFAULT_CURRENCY = "USD"
# Shifts the clock that budget periods (the month) are read from, so a test can cross a month's end.
# Nothing else follows it (buckets, holds). For tests: a gateway that has it set says so at start-up.
CLOCK_OFFSET_ENV = "SLUICEGATE_TEST_CLOCK_OFFSET_S"
ADMIN_TOKEN_ENV = "SLUICEGATE_ADMIN_TOKEN"  # the operator's token for /admin/...; unset: no admin routes
ADMIN_TOKEN_MIN_CHARS = 24


class ConfigError(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 9090
    prefixes: tuple[str, ...] = ("/v1", "/api/v1")
    max_body_bytes: int = 10 * 1024 * 1024
    graceful_timeout_s: float = 120.0
    body_timeout_s: float = 30.0
    header_timeout_s: float = 10.0
    keep_alive_timeout_s: float = 75.0
    drain_delay_s: float = 5.0
    max_connections: int = 4096
    backlog: int = 1024


@dataclass(frozen=True, slots=True)
class RedisSettings:
    url: str = "redis://127.0.0.1:6379/0"
    on_error: Literal["allow", "deny"] = "allow"
    timeout_s: float = 0.25
    circuit_failures: int = 3  # consecutive failures that open the circuit
    circuit_cooldown_s: float = 5.0  # how long no request waits on Redis once it is open
    # "sentinel": the primary is whichever the sentinels name for `service`; `url` then gives only
    # the password, ACL user, db and TLS of the data nodes (its host and port are not used).
    # "cluster": `url` names any node of a Redis Cluster; the others are found from it.
    mode: Literal["single", "sentinel", "cluster"] = "single"
    sentinels: tuple[tuple[str, int], ...] = ()
    service: str = ""
    sentinel_tls: bool = False  # the sentinels over TLS too, with the URL's CA and client certificate


@dataclass(frozen=True, slots=True)
class EventSettings:
    sink: Literal["stdout", "file", "redis", "off"] = "stdout"
    path: str = "events.jsonl"
    queue_size: int = 10000


@dataclass(frozen=True, slots=True)
class LimitSettings:
    reserve_tokens: int = 1024  # held of a budget per request that names no max_tokens
    hold_ttl_s: float = 600.0  # a hold left by a worker that died is dropped after this
    clock_offset_s: int = 0  # added to Redis time for budget periods: tests only, from CLOCK_OFFSET_ENV
    budget_message: str = ""  # a spent budget's 402 says this (how to top up) instead of "ask the operators"


@dataclass(frozen=True, slots=True)
class ModelPatterns:
    """Exact names and globs, with the globs compiled once."""

    exact: frozenset[str]
    globs: tuple[re.Pattern[str], ...]

    @classmethod
    def parse(cls, names: tuple[str, ...]) -> ModelPatterns:
        is_glob = [any(c in n for c in "*?[") for n in names]
        return cls(
            exact=frozenset(n for n, g in zip(names, is_glob, strict=True) if not g),
            globs=tuple(re.compile(translate(n)) for n, g in zip(names, is_glob, strict=True) if g),
        )

    def matches(self, model: str) -> bool:
        return model in self.exact or any(g.match(model) for g in self.globs)


@dataclass(frozen=True, slots=True)
class ProviderSettings:
    name: str
    base_url: str
    api_key_env: str | None
    api_key: str | None = field(repr=False)
    models: tuple[str, ...]
    patterns: ModelPatterns
    priority: int = 0
    weight: float = 1.0
    connect_timeout_s: float = 5.0
    first_byte_timeout_s: float = 120.0
    idle_timeout_s: float = 120.0
    stream_usage: bool = True
    # A key or group with a money budget calling a route that cannot be priced (no [[prices]] for its model):
    # "refuse" answers 403 route_not_billable; "allow" relays it, charged nothing.
    unpriced_routes: Literal["refuse", "allow"] = "refuse"
    pool_connections: int = 4096  # open connections to this provider at most, per worker
    models_cache_s: float = 300.0  # a glob-only provider's own model list is fetched again after this


# The limits (limit_kinds.py) are fields of their own, so code and tests can name them;
# the reader below fills them from the table, and `limit(kind)` reads them by row.
@dataclass(frozen=True, slots=True)
class GroupSettings:
    name: str
    rpm: int | None = None
    tpm: int | None = None
    burst: int | None = None
    budget: float | None = None  # money, in the prices' currency
    budget_period: str | None = None  # "month"; None: lifetime

    def limit(self, kind: LimitKind) -> float | None:
        value: float | None = getattr(self, kind.name)
        return value


@dataclass(frozen=True, slots=True)
class KeySettings:
    name: str
    sha256: str = field(repr=False)
    group: str = "default"
    rpm: int | None = None
    tpm: int | None = None
    burst: int | None = None
    budget_tokens: int | None = None
    budget: float | None = None  # money, in the prices' currency
    budget_period: str | None = None  # "month"; None: lifetime
    models: ModelPatterns | None = None
    enabled: bool = True

    def limit(self, kind: LimitKind) -> float | None:
        value: float | None = getattr(self, kind.name)
        return value


@dataclass(frozen=True, slots=True)
class Settings:
    server: ServerSettings
    redis: RedisSettings
    events: EventSettings
    limits: LimitSettings
    providers: tuple[ProviderSettings, ...]
    aliases: Mapping[str, str]
    groups: Mapping[str, GroupSettings]
    keys: Mapping[str, KeySettings]  # by sha256 hex
    prices: Prices = field(default_factory=Prices)
    source: str = "<memory>"
    warnings: tuple[str, ...] = ()
    admin_token: str | None = field(default=None, repr=False)  # from ADMIN_TOKEN_ENV

    def with_keys(self, *keys: KeySettings) -> Settings:
        return replace(self, keys={**self.keys, **{k.sha256: k for k in keys}})


class _TableReader:
    """Typed access to one TOML table that records problems instead of raising."""

    def __init__(self, table: Mapping[str, Any], where: str, problems: list[str]) -> None:
        self.table = table
        self.where = where
        self.problems = problems

    def _name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def _get(self, key: str, default: Any, kinds: tuple[type, ...], what: str) -> Any:
        value = self.table.get(key, default)
        if value is default:
            return default
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            if isinstance(value, str) and str not in kinds and _looks_numeric(value):
                self.problems.append(f"{self._name(key)}: expected {what}, got the quoted string {value!r} "
                                     "(write it without quotes)")  # fmt: skip
            else:
                self.problems.append(f"{self._name(key)}: expected {what}, got {value!r}")
            return default
        return value

    def present(self, key: str, hint: str) -> bool:
        """False (and a problem saying so) when a required key is missing altogether."""
        if key in self.table:
            return True
        self.problems.append(f"{self._name(key)}: missing; {hint}")
        return False

    def text(self, key: str, default: str | None = None) -> str | None:
        value: str | None = self._get(key, default, (str,), "a string")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value: bool = self._get(key, default, (bool,), "true or false")
        return value

    def number(self, key: str, default: float, minimum: float = 0.0) -> float:
        value = self._get(key, default, (int, float), "a number")
        if not math.isfinite(value):
            self.problems.append(f"{self._name(key)}: expected a finite number, got {value!r}")
            return default
        if value < minimum:
            self.problems.append(f"{self._name(key)}: must be >= {minimum}, got {value!r}")
            return default
        return float(value)

    def amount(self, key: str, minimum: float = 0.0) -> float | None:
        """A number that may be absent (None)."""
        value = self._get(key, None, (int, float), "a number")
        if value is None:
            return None
        if not math.isfinite(value) or value < minimum:
            self.problems.append(f"{self._name(key)}: must be >= {minimum}, got {value!r}")
            return None
        return float(value)

    def count(self, key: str, default: int | None, minimum: int = 0) -> int | None:
        value = self._get(key, default, (int,), "a whole number")
        if value is not None and value < minimum:
            self.problems.append(f"{self._name(key)}: must be >= {minimum}, got {value!r}")
            return default
        return value  # type: ignore[no-any-return]

    def names(self, key: str) -> tuple[str, ...] | None:
        value = self._get(key, None, (list,), "a list of strings")
        if value is None:
            return None
        if not all(isinstance(v, str) and v for v in value):
            self.problems.append(f"{self._name(key)}: expected a list of non-empty strings")
            return None
        return tuple(value)

    def choice(self, key: str, default: str, options: tuple[str, ...]) -> Any:
        value = self.text(key, default)
        if value not in options:
            self.problems.append(f"{self._name(key)}: expected one of {', '.join(options)}, got {value!r}")
            return default
        return value

    def unknown(self, known: set[str]) -> None:
        for key in self.table:
            if key not in known:
                self.problems.append(f"{self._name(key)}: unknown key{did_you_mean(key, known)}")


def did_you_mean(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _array_of_tables(raw: Mapping[str, Any], name: str, problems: list[str]) -> Iterator[_TableReader]:
    """A reader for each table of a [[name]] array; what is not a table is a problem and skipped."""
    items = raw.get(name, [])
    if not isinstance(items, list):
        problems.append(f"{name}: expected an array of tables ([[{name}]])")
        return
    for i, item in enumerate(items):
        if isinstance(item, Mapping):
            yield _TableReader(item, f"{name}[{i}]", problems)
        else:
            problems.append(f"{name}[{i}]: expected a table")


def _table(raw: Mapping[str, Any], key: str, problems: list[str]) -> Mapping[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, Mapping):
        problems.append(f"{key}: expected a table")
        return {}
    return value


def _split_bind(bind: str, where: str, problems: list[str]) -> tuple[str, int]:
    host, sep, port = bind.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        problems.append(f"{where}: expected HOST:PORT, got {bind!r}")
        return "127.0.0.1", 9090
    return host.strip("[]") or "0.0.0.0", int(port)


def _server(raw: Mapping[str, Any], env: Mapping[str, str], problems: list[str]) -> ServerSettings:
    r = _TableReader(_table(raw, "server", problems), "server", problems)
    r.unknown(
        {
            "bind", "prefixes", "max_body_bytes", "graceful_timeout_s", "body_timeout_s",
            "header_timeout_s", "keep_alive_timeout_s", "drain_delay_s", "max_connections", "backlog",
        }
    )  # fmt: skip
    bind = env.get("SLUICEGATE_BIND") or r.text("bind", "127.0.0.1:9090") or "127.0.0.1:9090"
    where = "SLUICEGATE_BIND" if env.get("SLUICEGATE_BIND") else "server.bind"
    host, port = _split_bind(bind, where, problems)
    prefixes = r.names("prefixes") or ("/v1", "/api/v1")
    for p in prefixes:
        if not p.startswith("/") or p.endswith("/"):
            problems.append(f"server.prefixes: {p!r} must start with '/' and not end with '/'")
    return ServerSettings(
        host=host,
        port=port,
        prefixes=prefixes,
        max_body_bytes=r.count("max_body_bytes", 10 * 1024 * 1024, minimum=1) or 1,
        graceful_timeout_s=r.number("graceful_timeout_s", 120.0),
        body_timeout_s=r.number("body_timeout_s", 30.0, minimum=0.001),
        header_timeout_s=r.number("header_timeout_s", 10.0, minimum=0.001),
        keep_alive_timeout_s=r.number("keep_alive_timeout_s", 75.0, minimum=0.001),
        drain_delay_s=r.number("drain_delay_s", 5.0),
        max_connections=r.count("max_connections", 4096, minimum=1) or 1,
        backlog=r.count("backlog", 1024, minimum=1) or 1,
    )


def _redis(raw: Mapping[str, Any], env: Mapping[str, str], problems: list[str]) -> RedisSettings:
    r = _TableReader(_table(raw, "redis", problems), "redis", problems)
    of_modes = {"mode", "sentinels", "service", "sentinel_tls"}
    r.unknown({"url", "on_error", "timeout_s", "circuit_failures", "circuit_cooldown_s", *of_modes})
    default_url = "redis://127.0.0.1:6379/0"
    url = env.get("REDIS_URL") or r.text("url", default_url) or default_url
    where = "REDIS_URL" if env.get("REDIS_URL") else "redis.url"
    db = 0
    if not url.startswith(("redis://", "rediss://", "unix://")):
        problems.append(f"{where}: expected a redis://, rediss:// or unix:// URL")
    else:
        try:
            db = parse_url(url).get("db", 0)  # type: ignore[no-untyped-call]
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
    mode = r.choice("mode", "single", ("single", "sentinel", "cluster"))
    if mode == "cluster":
        if url.startswith("unix://"):
            problems.append(f"{where}: in cluster mode the nodes are reached over TCP; use redis:// or rediss://")
        elif db:
            problems.append(f"{where}: a Redis Cluster has only db 0")
    sentinels = r.names("sentinels")
    service = r.text("service")
    sentinel_tls = r.boolean("sentinel_tls", False)
    if mode == "sentinel":
        if not sentinels:
            problems.append('redis.sentinels: mode = "sentinel" needs the sentinels, as ["host:port", ...]')
        if not service:
            problems.append('redis.service: mode = "sentinel" needs the name the sentinels monitor, e.g. "mymaster"')
        if url.startswith("unix://"):
            problems.append(f"{where}: in sentinel mode the sentinels name the primary; use redis:// or rediss://")
        if sentinel_tls and not url.startswith("rediss://"):
            problems.append(
                f"redis.sentinel_tls: the sentinels' TLS settings (CA, client certificate) come from {where}; "
                "use a rediss:// URL"
            )
    else:
        for key, given in (("sentinels", sentinels), ("service", service)):
            if given is not None:
                problems.append(f'redis.{key}: only used with mode = "sentinel"')
        if "sentinel_tls" in r.table:
            problems.append('redis.sentinel_tls: only used with mode = "sentinel"')
    return RedisSettings(
        url=url,
        on_error=r.choice("on_error", "allow", ("allow", "deny")),
        timeout_s=r.number("timeout_s", 0.25, minimum=0.001),
        circuit_failures=r.count("circuit_failures", 3, minimum=1) or 3,
        circuit_cooldown_s=r.number("circuit_cooldown_s", 5.0, minimum=0.001),
        mode=mode,
        sentinels=tuple(_sentinel_address(s, problems) for s in sentinels or ()) if mode == "sentinel" else (),
        service=(service or "") if mode == "sentinel" else "",
        sentinel_tls=sentinel_tls and mode == "sentinel",
    )


def _sentinel_address(text: str, problems: list[str]) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        problems.append(f"redis.sentinels: expected HOST:PORT, got {text!r}")
        return "127.0.0.1", 26379
    return host.strip("[]"), int(port)


def _events(raw: Mapping[str, Any], problems: list[str]) -> EventSettings:
    r = _TableReader(_table(raw, "events", problems), "events", problems)
    r.unknown({"sink", "path", "queue_size"})
    return EventSettings(
        sink=r.choice("sink", "stdout", ("stdout", "file", "redis", "off")),
        path=r.text("path", "events.jsonl") or "events.jsonl",
        queue_size=r.count("queue_size", 10000, minimum=1) or 1,
    )


def _limits(raw: Mapping[str, Any], env: Mapping[str, str], problems: list[str], warnings: list[str]) -> LimitSettings:
    r = _TableReader(_table(raw, "limits", problems), "limits", problems)
    r.unknown({"reserve_tokens", "hold_ttl_s", "budget_message"})
    message = (r.text("budget_message") or "").strip()
    if len(message) > 500:
        problems.append(f"limits.budget_message: at most 500 characters, got {len(message)}")
        message = ""
    offset = 0
    shifted = env.get(CLOCK_OFFSET_ENV)
    if shifted:
        try:
            offset = int(shifted)
        except ValueError:
            problems.append(f"{CLOCK_OFFSET_ENV}: expected a whole number of seconds, got {shifted!r}")
        else:
            warnings.append(f"{CLOCK_OFFSET_ENV} is set: budget periods follow a clock {offset:+d} s off (for tests)")
    return LimitSettings(
        reserve_tokens=r.count("reserve_tokens", 1024) or 0,
        hold_ttl_s=r.number("hold_ttl_s", 600.0, minimum=1.0),
        clock_offset_s=offset,
        budget_message=message,
    )


def _providers(
    raw: Mapping[str, Any], env: Mapping[str, str], problems: list[str], warnings: list[str]
) -> tuple[ProviderSettings, ...]:
    providers: list[ProviderSettings] = []
    seen: set[str] = set()
    for r in _array_of_tables(raw, "providers", problems):
        r.unknown(
            {
                "name", "base_url", "api_key_env", "models", "priority", "weight",
                "connect_timeout_s", "first_byte_timeout_s", "idle_timeout_s", "stream_usage", "pool_connections",
                "models_cache_s", "unpriced_routes",
            }
        )  # fmt: skip
        name = r.text("name") or ""
        if not r.present("name", 'every provider needs one, e.g. name = "deepseek"'):
            pass
        elif not NAME_RE.match(name):
            problems.append(f"{r.where}.name: expected 1-64 of A-Z a-z 0-9 _ . -, got {name!r}")
        elif name in seen:
            problems.append(f"{r.where}.name: {name!r} is used by another provider")
        seen.add(name)
        base_url = (r.text("base_url") or "").rstrip("/")
        if not r.present("base_url", 'every provider needs one, e.g. base_url = "https://api.deepseek.com/v1"'):
            pass
        elif not base_url.startswith(("http://", "https://")):
            problems.append(f"{r.where}.base_url: expected an http:// or https:// URL")
        models = r.names("models")
        if not r.present("models", 'the models it serves, e.g. models = ["deepseek-*"]'):
            models = ()
        elif not models:
            problems.append(f"{r.where}.models: expected a non-empty list of model names or globs")
            models = ()
        key_env = r.text("api_key_env")
        if key_env and not ENV_NAME_RE.match(key_env):
            # Not echoed: people paste the key itself here.
            problems.append(f"{r.where}.api_key_env: expected the NAME of an environment variable (A-Z, 0-9, _)")
            key_env = None
        api_key = env.get(key_env) if key_env else None
        if key_env and not api_key:
            warnings.append(f"{r.where}.api_key_env: environment variable {key_env} is not set")
        weight = r.number("weight", 1.0)
        if weight <= 0:
            problems.append(f"{r.where}.weight: must be > 0")
        providers.append(
            ProviderSettings(
                name=name,
                base_url=base_url,
                api_key_env=key_env,
                api_key=api_key,
                models=models,
                patterns=ModelPatterns.parse(models),
                priority=int(r.count("priority", 0, minimum=-1000000) or 0),
                weight=weight,
                connect_timeout_s=r.number("connect_timeout_s", 5.0, minimum=0.001),
                first_byte_timeout_s=r.number("first_byte_timeout_s", 120.0, minimum=0.001),
                idle_timeout_s=r.number("idle_timeout_s", 120.0, minimum=0.001),
                stream_usage=r.boolean("stream_usage", True),
                unpriced_routes=r.choice("unpriced_routes", "refuse", ("refuse", "allow")),
                pool_connections=r.count("pool_connections", 4096, minimum=1) or 4096,
                models_cache_s=r.number("models_cache_s", 300.0, minimum=0.1),
            )
        )
    if not providers and not problems:
        problems.append("providers: at least one [[providers]] table is required")
    return tuple(providers)


def _aliases(raw: Mapping[str, Any], problems: list[str]) -> dict[str, str]:
    table = _table(raw, "aliases", problems)
    aliases: dict[str, str] = {}
    for name, target in table.items():
        if not isinstance(target, str) or not target:
            problems.append(f"aliases.{name}: expected a model name string")
        else:
            aliases[name] = target
    return aliases


def _groups(raw: Mapping[str, Any], problems: list[str]) -> dict[str, GroupSettings]:
    groups = {"default": GroupSettings("default")}
    for name, table in _table(raw, "groups", problems).items():
        where = f"groups.{name}"
        if not NAME_RE.match(name):
            problems.append(f"{where}: group names are 1-64 of A-Z a-z 0-9 _ . -")
        if not isinstance(table, Mapping):
            problems.append(f"{where}: expected a table")
            continue
        r = _TableReader(table, where, problems)
        r.unknown(set(setting_names("group")))
        groups[name] = GroupSettings(name=name, **_limit_values(r, "group"))
    return groups


def _limit_values(r: _TableReader, scope: Scope) -> dict[str, Any]:
    """The limits a key or group sets, by field name, read as the table declares them."""
    values: dict[str, Any] = {}
    for kind in kinds_for(scope):
        if kind.counts is Counts.MONEY:
            values[kind.name] = r.amount(kind.name, minimum=kind.minimum)
        else:
            values[kind.name] = r.count(kind.name, None, minimum=kind.minimum)
        if kind.burst_key is not None:
            values[kind.burst_key] = r.count(kind.burst_key, None, minimum=1)
        if kind.period_key is not None:
            period = r.text(kind.period_key)
            if period is not None and period not in kind.periods:
                expected = " or ".join(repr(p) for p in kind.periods)
                r.problems.append(
                    f"{r.where}.{kind.period_key}: expected {expected} (omitted: lifetime), got {period!r}"
                )
                period = None
            values[kind.period_key] = period
    return values


def _keys(raw: Mapping[str, Any], groups: Mapping[str, GroupSettings], problems: list[str]) -> dict[str, KeySettings]:
    keys: dict[str, KeySettings] = {}
    names: set[str] = set()
    for r in _array_of_tables(raw, "keys", problems):
        r.unknown({"name", "sha256", "group", "models", "enabled", *setting_names("key")})
        name = r.text("name") or ""
        if not r.present("name", 'every key needs one, e.g. name = "alice"'):
            pass
        elif not NAME_RE.match(name):
            problems.append(f"{r.where}.name: expected 1-64 of A-Z a-z 0-9 _ . -, got {name!r}")
        elif name in names:
            problems.append(f"{r.where}.name: {name!r} is used by another key")
        names.add(name)
        digest = (r.text("sha256") or "").lower()
        if not r.present("sha256", "`sluicegate keys new` prints the block with it"):
            pass
        elif not SHA256_RE.match(digest):
            problems.append(f"{r.where}.sha256: expected 64 hex characters (sha256 of the full key)")
        elif digest in keys:
            problems.append(f"{r.where}.sha256: the same key is configured twice")
        group = r.text("group", "default") or "default"
        if group not in groups:
            problems.append(f"{r.where}.group: no [groups.{group}] table")
        models = r.names("models")
        keys[digest] = KeySettings(
            name=name,
            sha256=digest,
            group=group,
            **_limit_values(r, "key"),
            models=ModelPatterns.parse(models) if models is not None else None,
            enabled=r.boolean("enabled", True),
        )
    return keys


def _prices(raw: Mapping[str, Any], problems: list[str]) -> Prices:
    prices: list[Price] = []
    seen: dict[str, str] = {}  # model -> where it is priced
    currency: tuple[str, str] | None = None  # the first one named, and where
    for r in _array_of_tables(raw, "prices", problems):
        r.unknown({"model", "input", "output", "cached_input", "per_request", "currency"})
        model = r.text("model") or ""
        if not model and isinstance(r.table.get("model", ""), str):
            problems.append(f"{r.where}.model: expected a model name or glob")
        elif model in seen:
            problems.append(f"{r.where}.model: {model!r} is priced already by {seen[model]}")
        else:
            seen[model] = r.where
        per_request = r.amount("per_request")
        by_tokens = "input" in r.table or "output" in r.table or per_request is None
        for side in ("input", "output") if by_tokens else ():
            if side not in r.table:
                neither = "input" not in r.table and "output" not in r.table
                also = " (or only per_request, the price of an answered request)" if neither else ""
                problems.append(f"{r.where}.{side}: required (the price per million {side} tokens){also}")
        code = r.text("currency")
        if code is not None and not CURRENCY_RE.match(code):
            problems.append(f"{r.where}.currency: expected a three-letter code such as USD, got {code!r}")
        elif code is not None and currency is None:
            currency = (code, r.where)
        elif code is not None and currency is not None and code != currency[0]:
            problems.append(
                f"{r.where}.currency: {code!r}, but {currency[1]} is in {currency[0]!r}: one currency per deployment"
            )
        prices.append(
            Price(
                model=model,
                input=r.number("input", 0.0),
                output=r.number("output", 0.0),
                cached_input=r.number("cached_input", 0.0) if "cached_input" in r.table else None,
                per_request=per_request,
                by_tokens=by_tokens,
            )
        )
    if not prices:
        return Prices()
    return Prices(prices, currency[0] if currency is not None else DEFAULT_CURRENCY)


def parse_settings(raw: Mapping[str, Any], env: Mapping[str, str], source: str = "<memory>") -> Settings:
    problems: list[str] = []
    warnings: list[str] = []
    known = {"server", "redis", "events", "limits", "providers", "aliases", "groups", "keys", "prices"}
    problems.extend(f"{key}: unknown section{did_you_mean(key, known)}" for key in raw if key not in known)
    groups = _groups(raw, problems)
    admin_token = env.get(ADMIN_TOKEN_ENV) or None
    if admin_token is not None and len(admin_token) < ADMIN_TOKEN_MIN_CHARS:
        warnings.append(f"{ADMIN_TOKEN_ENV} is shorter than {ADMIN_TOKEN_MIN_CHARS} characters: easy to guess")
    settings = Settings(
        server=_server(raw, env, problems),
        redis=_redis(raw, env, problems),
        events=_events(raw, problems),
        limits=_limits(raw, env, problems, warnings),
        providers=_providers(raw, env, problems, warnings),
        aliases=_aliases(raw, problems),
        groups=groups,
        keys=_keys(raw, groups, problems),
        prices=_prices(raw, problems),
        source=source,
        warnings=tuple(warnings),
        admin_token=admin_token,
    )
    if problems:
        raise ConfigError(problems)
    return replace(settings, warnings=(*settings.warnings, *unserved(settings), *_unpriced_models(settings)))


def unserved(settings: Settings) -> list[str]:
    """Aliases and keys' exact model names that no provider serves: requests for them could only get 404."""

    def served(model: str) -> bool:
        target = settings.aliases.get(model, model)
        return any(p.patterns.matches(target) for p in settings.providers)

    found = [f"aliases.{alias}: no provider serves its target {target!r}"
             for alias, target in settings.aliases.items() if not served(alias)]  # fmt: skip
    for i, key in enumerate(settings.keys.values()):
        for model in sorted(key.models.exact) if key.models is not None else ():
            if not served(model):
                found.append(f"keys[{i}].models: no provider serves {model!r}")
    return found


def _unpriced_models(settings: Settings) -> list[str]:
    """Models a key with a money budget (its own or its group's) may use but that have no price: their
    requests are refused, or with unpriced_routes = "allow" spend nothing of it. Provider globs are checked
    as written ("deepseek-*" is priced by a price for "deepseek-*" or a glob that matches that text)."""
    served = sorted({m for p in settings.providers for m in p.models} | set(settings.aliases))
    warnings: list[str] = []
    for key in settings.keys.values():
        group = settings.groups.get(key.group)
        if key.limit(MONEY_BUDGET) is None and (group is None or group.limit(MONEY_BUDGET) is None):
            continue
        names = (
            served if key.models is None else sorted({m for m in served if key.models.matches(m)} | key.models.exact)
        )
        missing = [m for m in names if settings.prices.for_request(settings.aliases.get(m, m), m) is None]
        if missing:
            shown = ", ".join(repr(m) for m in missing)
            warnings.append(
                f"key {key.name!r} has a budget in money, but these models it may use have no [[prices]]: {shown}; "
                'their requests get 403 route_not_billable (with unpriced_routes = "allow" on their provider, '
                "they spend nothing of it)"
            )
    return warnings


def config_path(explicit: str | None, env: Mapping[str, str] = os.environ) -> str:
    return explicit or env.get("SLUICEGATE_CONFIG") or DEFAULT_CONFIG_PATH


def load_settings(path: str, env: Mapping[str, str] = os.environ) -> Settings:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the file ({exc.strerror})"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})"]) from exc
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML ({exc})"]) from exc
    try:
        settings = parse_settings(raw, env, source=path)
    except ConfigError as exc:
        raise ConfigError(with_lines(path, text, exc.problems)) from None
    return replace(settings, warnings=tuple(with_lines(path, text, settings.warnings)))
