"""The limiter's Redis connections, built from `[redis] mode`.

Two kinds per worker: redis-py's pooled client (with per-call timeouts) for the
odd command (`keys usage`, event records, /readyz), and a pool whose
`make_connection` feeds the script pipe (pipe.py), which bounds its own
replies.

In sentinel mode both connect through redis-py's asyncio Sentinel: every new
connection asks the sentinels for the current primary of `service`, so after a
failover the next connection goes to the promoted replica with no restart. The
URL then gives only what the data nodes need (password, ACL user, db, TLS); its
host and port are not used. The sentinels themselves are reached without a
password, over plain TCP or, with `sentinel_tls`, over TLS with the URL's TLS
settings (CA, client certificate and key, checks).

In cluster mode `url` names any node of the cluster; the client is redis-py's
asyncio RedisCluster, which reads the slot map from it, and the script pipe is
one pipe per primary (cluster.py). TLS, password and ACL user come from
the URL and go to every node.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection, Connection, SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff

from ..config.settings import RedisSettings
from ..redact import safe_url
from . import slot_map
from .cluster import ClusterPipes, OnePipe, Pipes, ping_primaries

log = logging.getLogger("sluicegate")


@dataclass(frozen=True, slots=True)
class RedisClients:
    client: aioredis.Redis | RedisCluster
    pipe_pool: aioredis.ConnectionPool | None  # its make_connection opens the script pipe's connection
    sentinel: Sentinel | None = None
    connect_node: Callable[[str, int], AbstractConnection] | None = None  # cluster mode: a pipe's connection

    def open_pipes(self, timeout_s: float) -> Pipes:
        if isinstance(self.client, RedisCluster):
            assert self.connect_node is not None
            for problem in slot_map.problems():
                log.warning("%s: Redis Cluster's slot map may not be read (pin redis as pyproject.toml does)", problem)
            return ClusterPipes(self.client, self.connect_node, timeout_s)
        assert self.pipe_pool is not None
        return OnePipe(self.pipe_pool.make_connection, timeout_s)

    async def ping(self, timeout_s: float) -> None:
        """PING Redis; in cluster mode every primary of the slot map, each within timeout_s."""
        if isinstance(self.client, RedisCluster):
            await ping_primaries(self.client, timeout_s)
        else:
            await self.client.ping()

    async def close(self) -> None:
        await self.client.aclose()
        if self.pipe_pool is not None:
            await self.pipe_pool.aclose()
        if self.sentinel is not None:
            await self.sentinel.aclose()


def open_clients(settings: RedisSettings) -> RedisClients:
    timeout_s = settings.timeout_s
    # One immediate retry: a pooled connection may be stale after a Redis restart or a failover.
    client_options: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "retry": Retry(NoBackoff(), 1),
    }
    # The pipe's connection has no per-call timeout: the pipe bounds each write's replies instead.
    pipe_options: dict[str, Any] = {
        "socket_timeout": None,
        "socket_connect_timeout": timeout_s,
        "retry": Retry(NoBackoff(), 0),
    }
    if settings.mode == "single":
        return RedisClients(
            client=aioredis.Redis.from_url(settings.url, **client_options),
            pipe_pool=aioredis.ConnectionPool.from_url(settings.url, **pipe_options),
        )
    if settings.mode == "cluster":
        return RedisClients(
            client=RedisCluster.from_url(settings.url, **client_options),
            pipe_pool=None,
            connect_node=node_connector(settings.url, pipe_options),
        )
    sentinel = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
        settings.sentinels,
        # A sentinel that does not answer is skipped for the next one: no retries.
        sentinel_kwargs={
            "socket_timeout": timeout_s,
            "socket_connect_timeout": timeout_s,
            "retry": Retry(NoBackoff(), 0),
            **(tls_options(settings.url) if settings.sentinel_tls else {}),
        },
        **data_node_options(settings.url),
    )
    pipe_pool = SentinelConnectionPool(  # type: ignore[no-untyped-call]
        settings.service, sentinel, is_master=True, **{**sentinel.connection_kwargs, **pipe_options}
    )
    return RedisClients(
        client=sentinel.master_for(settings.service, **client_options), pipe_pool=pipe_pool, sentinel=sentinel
    )


def data_node_options(url: str) -> dict[str, Any]:
    """What the URL says about the data nodes besides where they are: password, ACL user, db, TLS."""
    options: dict[str, Any] = dict(parse_url(url))
    options.pop("host", None)
    options.pop("port", None)
    # The sentinel pool picks its own connection class (SentinelManagedSSLConnection for TLS).
    if options.pop("connection_class", None) is SSLConnection:
        options["ssl"] = True
    return options


def tls_options(url: str) -> dict[str, Any]:
    """Only what a rediss:// URL says about TLS (ssl and its ssl_* settings): for the sentinels."""
    return {name: value for name, value in data_node_options(url).items() if name == "ssl" or name.startswith("ssl_")}


def node_connector(url: str, options: dict[str, Any]) -> Callable[[str, int], AbstractConnection]:
    """Connections to cluster nodes named by the slot map, with what the URL says (password, ACL user, TLS)."""
    url_options: dict[str, Any] = dict(parse_url(url))
    url_options.pop("host", None)
    url_options.pop("port", None)
    connection_class: type[Connection] = url_options.pop("connection_class", Connection)

    def connect(host: str, port: int) -> AbstractConnection:
        return connection_class(host=host, port=port, **url_options, **options)

    return connect


def describe(settings: RedisSettings) -> str:
    """Which Redis, for messages: the URL without its password, or the service and its sentinels."""
    if settings.mode == "sentinel":
        sentinels = ", ".join(f"{host}:{port}" for host, port in settings.sentinels)
        return f"Redis primary of {settings.service!r} (sentinels {sentinels})"
    if settings.mode == "cluster":
        return f"Redis Cluster at {safe_url(settings.url)}"
    return f"Redis at {safe_url(settings.url)}"


def failure_name(exc: BaseException) -> str:
    """What went wrong, for /readyz and logs: the error's type, and what TLS said when a handshake failed.

    "ConnectionError (TLS: certificate verify failed: self-signed certificate in certificate chain)"
    for a CA that does not match, "... IP address mismatch ..." for a certificate of another host.
    Never the error's own text: redis-py's may carry the URL's options.
    """
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"{type(exc).__name__} (TLS: certificate verify failed: {cause.verify_message})"
        if isinstance(cause, ssl.SSLError):
            return f"{type(exc).__name__} (TLS: {cause.reason or type(cause).__name__})"
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return type(exc).__name__
