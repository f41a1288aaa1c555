"""How [redis] mode becomes clients: which connection class, with which credentials, to where."""

from __future__ import annotations

import ssl
from dataclasses import replace

from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import Connection, SSLConnection
from redis.asyncio.sentinel import SentinelManagedConnection, SentinelManagedSSLConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from proxy.config.settings import GroupSettings, KeySettings, LimitSettings, RedisSettings
from proxy.limits.limiter import Limiter
from proxy.limits.plan import KeyLimits
from proxy.redisio.clients import data_node_options, describe, failure_name, node_connector, open_clients
from proxy.redisio.cluster import ClusterPipes, Redirect, redirection
from tests.conftest import free_port

SENTINEL = RedisSettings(mode="sentinel", sentinels=(("127.0.0.1", 26379), ("127.0.0.1", 26380)), service="mymaster")


def test_the_url_gives_the_data_nodes_their_credentials_db_and_tls_but_not_an_address() -> None:
    options = data_node_options("rediss://gateway:secret@ignored:6379/2?ssl_cert_reqs=none")
    assert options == {"username": "gateway", "password": "secret", "db": 2, "ssl": True, "ssl_cert_reqs": "none"}
    assert data_node_options("redis://:pw@h/0") == {"password": "pw", "db": 0}


async def test_sentinel_mode_connects_through_sentinel_managed_connections() -> None:
    clients = open_clients(SENTINEL)
    try:
        for pool in (clients.client.connection_pool, clients.pipe_pool):
            conn = pool.make_connection()
            assert type(conn) is SentinelManagedConnection
        assert clients.sentinel is not None and len(clients.sentinel.sentinels) == 2
    finally:
        await clients.close()
    tls = open_clients(replace(SENTINEL, url="rediss://:pw@x:1/3"))
    try:
        conn = tls.pipe_pool.make_connection()
        assert type(conn) is SentinelManagedSSLConnection
        assert (conn.password, conn.db) == ("pw", 3)
    finally:
        await tls.close()


async def test_sentinels_are_reached_over_tls_with_the_urls_tls_settings_only_when_asked() -> None:
    url = "rediss://gw:secret@x:1/3?ssl_ca_certs=/etc/ca.pem&ssl_certfile=/etc/gw.pem&ssl_keyfile=/etc/gw.key"
    tls = open_clients(replace(SENTINEL, url=url, sentinel_tls=True))
    try:
        assert tls.sentinel is not None
        for sentinel in tls.sentinel.sentinels:
            pool = sentinel.connection_pool
            assert pool.connection_class is SSLConnection
            options = pool.connection_kwargs
            assert (options["ssl_ca_certs"], options["ssl_certfile"], options["ssl_keyfile"]) == (
                "/etc/ca.pem", "/etc/gw.pem", "/etc/gw.key"
            )  # fmt: skip
            # The data nodes' user, password and db are theirs: sentinels are asked without them.
            assert (options["username"], options["password"], options["db"]) == (None, None, 0)
        assert type(tls.pipe_pool.make_connection()) is SentinelManagedSSLConnection
    finally:
        await tls.close()
    plain = open_clients(replace(SENTINEL, url=url))
    try:
        assert plain.sentinel is not None
        assert all(s.connection_pool.connection_class is Connection for s in plain.sentinel.sentinels)
    finally:
        await plain.close()


def test_a_failed_tls_handshake_is_named_with_what_tls_said_and_nothing_of_the_url() -> None:
    verify = ssl.SSLCertVerificationError(1, "certificate verify failed")
    verify.verify_message = "self-signed certificate in certificate chain"
    try:
        try:
            raise verify
        except ssl.SSLError:
            raise RedisConnectionError("Error 1 connecting to h:6379 with rediss://:secret@h") from None
    except RedisConnectionError as exc:
        assert failure_name(exc) == (
            "ConnectionError (TLS: certificate verify failed: self-signed certificate in certificate chain)"
        )
    other = ssl.SSLError(1, "wrong version number")
    other.reason = "WRONG_VERSION_NUMBER"
    wrapped = RedisConnectionError("x")
    wrapped.__cause__ = other
    assert failure_name(wrapped) == "ConnectionError (TLS: WRONG_VERSION_NUMBER)"
    assert failure_name(TimeoutError()) == "TimeoutError"


async def test_single_mode_connects_where_the_url_says() -> None:
    clients = open_clients(RedisSettings(url="rediss://h:6390/1"))
    try:
        conn = clients.pipe_pool.make_connection()
        assert type(conn) is SSLConnection and (conn.host, conn.port, conn.db) == ("h", 6390, 1)
        assert type(clients.client.connection_pool.make_connection()) is SSLConnection
    finally:
        await clients.close()
    plain = open_clients(RedisSettings())
    assert type(plain.pipe_pool.make_connection()) is Connection
    await plain.close()


def test_messages_name_the_service_and_its_sentinels_or_the_url_without_its_password() -> None:
    assert describe(SENTINEL) == "Redis primary of 'mymaster' (sentinels 127.0.0.1:26379, 127.0.0.1:26380)"
    assert "secret" not in describe(RedisSettings(url="redis://:secret@h:1/0"))


async def test_cluster_mode_connects_each_node_with_the_urls_credentials_and_tls() -> None:
    clients = open_clients(RedisSettings(mode="cluster", url="rediss://gw:secret@any-node:7000/0"))
    try:
        assert isinstance(clients.client, RedisCluster) and clients.pipe_pool is None
        assert isinstance(clients.open_pipes(0.5), ClusterPipes)
    finally:
        await clients.close()
    conn = node_connector("rediss://gw:secret@any-node:7000/0", {"socket_timeout": None})("10.0.0.2", 7001)
    assert type(conn) is SSLConnection
    assert (conn.host, conn.port, conn.username, conn.password) == ("10.0.0.2", 7001, "gw", "secret")
    assert type(node_connector("redis://n:7000", {})("n", 7002)) is Connection
    assert (
        describe(RedisSettings(mode="cluster", url="redis://:secret@n:7000/0"))
        == "Redis Cluster at redis://:***@n:7000/0"
    )


def test_a_moved_or_ask_reply_names_the_node_to_ask() -> None:
    assert redirection(ResponseError("MOVED 3999 127.0.0.1:6381")) == Redirect(False, 3999, "127.0.0.1", 6381)
    assert redirection(ResponseError("ASK 12 ::1:7000")) == Redirect(True, 12, "::1", 7000)
    for other in ("NOSCRIPT No matching script", "TRYAGAIN Multiple keys request", "MOVED nonsense"):
        assert redirection(ResponseError(other)) is None


async def test_a_cluster_with_no_node_reachable_is_a_limiter_failure_not_a_crash() -> None:
    errors: list[int] = []
    settings = RedisSettings(mode="cluster", url=f"redis://:secret@127.0.0.1:{free_port()}/0", timeout_s=0.5)
    limiter = Limiter(settings, on_error=lambda: errors.append(1))
    plan = KeyLimits.build(KeySettings("k", "", rpm=5), GroupSettings("default"), LimitSettings()).model
    assert plan is not None
    try:
        problem = await limiter.ping()
        assert problem is not None and problem.startswith("redis: ") and "secret" not in problem
        admission = await limiter.admit(plan)  # on_error = "allow": admitted unchecked
        assert admission.headers == []
        assert len(errors) == 2
    finally:
        await limiter.close()
