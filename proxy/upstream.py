"""aiohttp session factory, per-provider request templates, timeouts, error mapping."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp
from yarl import URL

from .errors import Header, UpstreamAuthError, UpstreamError, UpstreamTimeout
from .settings import ProviderSettings

POOL_LIMIT = 1000
REQUEST_DROP = frozenset(
    name.encode()
    for name in {
        # hop-by-hop (RFC 9110 7.6.1) and framing the client connection owned
        "connection", "keep-alive", "proxy-connection", "proxy-authenticate",
        "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade",
        "host", "content-length", "expect",
        # the client's credentials and identity stay here
        "authorization", "x-api-key", "api-key", "cookie",
        "openai-organization", "openai-project",
        "x-forwarded-for", "x-real-ip", "forwarded",
        # gateway controls and ours to set
        "x-ai-provider", "accept-encoding", "x-request-id",
    }
)  # fmt: skip
RESPONSE_DROP = frozenset(
    name.encode()
    for name in {
        "connection", "keep-alive", "proxy-connection", "te", "trailer",
        "transfer-encoding", "upgrade", "content-length", "date", "server",
        "set-cookie", "x-request-id", "openai-organization", "openai-project",
        "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests", "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens",
    }
)  # fmt: skip


class Retryable(Exception):
    """An attempt that failed before any byte reached the client; try the next provider."""

    def __init__(self, error: UpstreamError | UpstreamTimeout, reason: str) -> None:
        super().__init__(error.message)
        self.error = error
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ProviderClient:
    """What can be computed once per provider: URL base, auth header, timeouts."""

    settings: ProviderSettings
    base_url: str
    auth: dict[str, str]  # the provider's credential, added to every request
    timeout: aiohttp.ClientTimeout

    @classmethod
    def build(cls, provider: ProviderSettings) -> ProviderClient:
        return cls(
            settings=provider,
            base_url=provider.base_url,
            auth={"Authorization": f"Bearer {provider.api_key}"} if provider.api_key else {},
            # aiohttp starts sock_read once the request is written: until the headers
            # are in it is the first-byte limit, then start_idle_timeout() re-arms it.
            # `connect` also bounds the wait for a free pooled connection.
            timeout=aiohttp.ClientTimeout(
                total=None,
                connect=provider.connect_timeout_s + provider.first_byte_timeout_s,
                sock_connect=provider.connect_timeout_s,
                sock_read=provider.first_byte_timeout_s,
            ),
        )


def forwarded_headers(client_headers: Iterable[Header], request_id: str) -> dict[str, str]:
    """The client's headers fit to go upstream, once per request; each attempt adds its provider's auth."""
    # ASGI header names arrive lowercased.
    out = {
        name.decode("latin-1"): value.decode("latin-1") for name, value in client_headers if name not in REQUEST_DROP
    }
    out["Accept-Encoding"] = "identity"
    out["X-Request-ID"] = request_id
    return out


@dataclass(frozen=True, slots=True)
class PoolStats:
    in_use: int
    idle: int
    waiting: int  # requests waiting for a free connection: the pool is too small for the load


class Sessions:
    """One aiohttp session, so one connection pool, per provider: a slow provider's
    streams cannot take the connections another provider needs."""

    def __init__(self) -> None:
        self._by_provider: dict[str, aiohttp.ClientSession] = {}

    def pool_stats(self) -> dict[str, PoolStats]:
        """What each provider's pool holds now. aiohttp has no public counts: its own fields, read defensively."""
        stats = {}
        for name, session in self._by_provider.items():
            connector = session.connector
            acquired = getattr(connector, "_acquired", ())
            idle = getattr(connector, "_conns", {})
            waiters = getattr(connector, "_waiters", {})
            stats[name] = PoolStats(
                in_use=len(acquired),
                idle=sum(len(conns) for conns in idle.values()),
                waiting=sum(len(queue) for queue in waiters.values()),
            )
        return stats

    def get(self, provider: str) -> aiohttp.ClientSession:
        session = self._by_provider.get(provider)
        if session is None:
            session = self._by_provider[provider] = create_session()
        return session

    async def close(self) -> None:
        for session in self._by_provider.values():
            await session.close()


def create_session() -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=POOL_LIMIT, limit_per_host=0, ttl_dns_cache=300)
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        timeout=aiohttp.ClientTimeout(total=None),
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("User-Agent",),
        raise_for_status=False,
    )


def response_headers(resp: aiohttp.ClientResponse) -> list[Header]:
    headers = [(k.lower(), v) for k, v in resp.raw_headers]
    return [(k, v) for k, v in headers if k not in RESPONSE_DROP]


def start_idle_timeout(resp: aiohttp.ClientResponse, idle_timeout_s: float) -> None:
    """Switch aiohttp's per-read timer from the first-byte limit to the idle limit."""
    connection = resp.connection
    if connection is not None and connection.protocol is not None:
        connection.protocol.read_timeout = idle_timeout_s
        connection.protocol.start_timeout()


@asynccontextmanager
async def open_upstream(
    session: aiohttp.ClientSession,
    client: ProviderClient,
    method: str,
    url: str,
    headers: dict[str, str],
    body: bytes,
) -> AsyncIterator[aiohttp.ClientResponse]:
    """Send the request and yield once the response headers are in.

    Failures before the headers become Retryable. A response left with unread
    bytes (client gone, error) has its connection closed, not pooled.
    """
    name = client.settings.name
    try:
        # encoded=True: the path goes out byte for byte as the client sent it, never re-normalised.
        resp = await session.request(
            method, URL(url, encoded=True), headers=headers, data=body, allow_redirects=False, timeout=client.timeout
        )
    except aiohttp.ConnectionTimeoutError as exc:
        raise Retryable(UpstreamTimeout(f"Timed out connecting to provider '{name}'."), "connect_timeout") from exc
    except aiohttp.ServerTimeoutError as exc:
        wait = client.settings.first_byte_timeout_s
        raise Retryable(
            UpstreamTimeout(f"Provider '{name}' sent no response within {wait:g}s."), "first_byte_timeout"
        ) from exc
    except aiohttp.ClientConnectorError as exc:
        raise Retryable(UpstreamError(f"Cannot connect to provider '{name}'."), "connect_error") from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise Retryable(
            UpstreamError(f"Provider '{name}' closed the connection before answering."), "disconnected"
        ) from exc
    try:
        start_idle_timeout(resp, client.settings.idle_timeout_s)
        yield resp
    finally:
        # release() keeps a fully read connection for reuse and closes one with unread bytes.
        resp.release()


def mid_stream_error(exc: BaseException, provider: str) -> UpstreamError | UpstreamTimeout:
    if isinstance(exc, (aiohttp.SocketTimeoutError, TimeoutError)):
        return UpstreamTimeout(f"Provider '{provider}' stopped sending (idle timeout).")
    return UpstreamError(f"Provider '{provider}' broke off the response.")


def rejected_credential(provider: str, status: int) -> UpstreamAuthError:
    # The client's key never goes upstream, so a 401/403 there is about ours: passing it on
    # would send the user after their own key. The provider's body may quote our key: dropped.
    return UpstreamAuthError(
        f"Provider '{provider}' rejected the gateway's own credential (HTTP {status}). "
        "Your API key is fine: the gateway's operators must fix the provider key or its access."
    )
