"""aiohttp session factory, per-provider request templates, timeouts, error mapping."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from enum import Enum, auto
from types import TracebackType

import aiohttp
from yarl import URL

from ..config.settings import ProviderSettings
from ..http.errors import Header, UpstreamAuthError, UpstreamError, UpstreamTimeout
from ..records.metrics import PoolStats
from . import pools
from .scrub import Scrubber
from .usage import NotJson

IDLE_TICKS = 4  # IdleWatch looks this many times per idle limit
REASON_429 = "http_429"  # a provider's 429 counts under this reason, retried or passed on
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


class AttemptFailed(Exception):
    """One attempt at a provider failed: what the client is told, and the reason it is counted under."""

    def __init__(self, error: UpstreamError | UpstreamTimeout, reason: str) -> None:
        super().__init__(error.message)
        self.error = error
        self.reason = reason


class Retryable(AttemptFailed):
    """An attempt that failed before any byte reached the client; try the next provider."""


class Phase(Enum):
    CONNECT = auto()  # until the response headers are in
    READ = auto()  # reading a whole answer, before any of it is passed on
    STREAM = auto()  # passing an answer on as it comes: the client has its headers


ErrorRow = tuple[type[BaseException] | tuple[type[BaseException], ...], type[UpstreamError | UpstreamTimeout], str, str]
# What aiohttp raises, what the client is told and the reason the failed attempt is counted under (records,
# metrics), by phase; the first row that matches wins. Messages are filled with the provider's settings `p`.
# The reasons after the headers are the errors' codes: records and dashboards already count those.
UPSTREAM_ERRORS: dict[Phase, tuple[ErrorRow, ...]] = {
    Phase.CONNECT: (
        (aiohttp.ConnectionTimeoutError, UpstreamTimeout, "Timed out connecting to provider '{p.name}'.",
         "connect_timeout"),
        (aiohttp.ServerTimeoutError, UpstreamTimeout,
         "Provider '{p.name}' sent no response within {p.first_byte_timeout_s:g}s.", "first_byte_timeout"),
        (aiohttp.ClientConnectorError, UpstreamError, "Cannot connect to provider '{p.name}'.", "connect_error"),
        ((aiohttp.ClientError, OSError), UpstreamError,
         "Provider '{p.name}' closed the connection before answering.", "disconnected"),
    ),
    Phase.READ: (
        (TimeoutError, UpstreamTimeout, "Provider '{p.name}' stopped sending (idle timeout).", "read_error"),
        ((aiohttp.ClientError, OSError), UpstreamError, "Provider '{p.name}' broke off the response.", "read_error"),
        (NotJson, UpstreamError, "Provider '{p.name}' answered something that is not JSON.", "bad_json"),
    ),
    Phase.STREAM: (
        (TimeoutError, UpstreamTimeout, "Provider '{p.name}' stopped sending (idle timeout).", "upstream_timeout"),
        ((aiohttp.ClientError, OSError), UpstreamError, "Provider '{p.name}' broke off the response.",
         "upstream_error"),
    ),
}  # fmt: skip


class ErrorMap:
    """`with` it around one phase of an attempt: what aiohttp raises there leaves as an AttemptFailed.

    httpx's map_httpcore_exceptions(), as an object: it holds no state of a request, so one per
    provider and phase is built with the ProviderClient and a request allocates nothing for it.
    Before the headers reached the client the failure is Retryable; after, it is not.
    """

    __slots__ = ("failed", "provider", "rows")

    def __init__(self, provider: ProviderSettings, phase: Phase) -> None:
        self.provider = provider
        self.rows = UPSTREAM_ERRORS[phase]
        self.failed = AttemptFailed if phase is Phase.STREAM else Retryable

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if exc is None:
            return
        for raised, error, message, reason in self.rows:
            if isinstance(exc, raised):
                raise self.failed(error(message.format(p=self.provider)), reason) from exc


@dataclass(frozen=True, slots=True)
class ProviderClient:
    """What can be computed once per provider: URL base, auth header, timeouts."""

    settings: ProviderSettings
    base_url: str
    auth: dict[str, str]  # the provider's credential, added to every request
    scrub: Scrubber | None  # ... and kept out of every answer
    timeout: aiohttp.ClientTimeout
    connect_errors: ErrorMap
    read_errors: ErrorMap
    stream_errors: ErrorMap

    @classmethod
    def build(cls, provider: ProviderSettings) -> ProviderClient:
        return cls(
            settings=provider,
            base_url=provider.base_url,
            auth={"Authorization": f"Bearer {provider.api_key}"} if provider.api_key else {},
            scrub=Scrubber.of(provider.api_key),
            # aiohttp starts sock_read once the request is written: until the headers
            # are in it is the first-byte limit, then stop_read_timer() ends it (IdleWatch).
            # `connect` also bounds the wait for a free pooled connection.
            timeout=aiohttp.ClientTimeout(
                total=None,
                connect=provider.connect_timeout_s + provider.first_byte_timeout_s,
                sock_connect=provider.connect_timeout_s,
                sock_read=provider.first_byte_timeout_s,
            ),
            connect_errors=ErrorMap(provider, Phase.CONNECT),
            read_errors=ErrorMap(provider, Phase.READ),
            stream_errors=ErrorMap(provider, Phase.STREAM),
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


class Sessions:
    """One aiohttp session, so one connection pool, per provider: a slow provider's
    streams cannot take the connections another provider needs."""

    def __init__(self, on_wait: Callable[[str], object] | None = None) -> None:
        self._by_provider: dict[str, aiohttp.ClientSession] = {}
        self._on_wait = on_wait

    def pool_stats(self) -> dict[str, PoolStats]:
        """What each provider's pool holds now (pools.py reads what aiohttp does not count publicly)."""
        return {name: pools.pool_stats(session.connector) for name, session in self._by_provider.items()}

    def get(self, provider: ProviderSettings) -> aiohttp.ClientSession:
        """The provider's session; a request that will wait for a free pooled connection is counted."""
        session = self._by_provider.get(provider.name)
        if session is None or session.connector is None or session.connector.limit != provider.pool_connections:
            # New, or its pool size changed in a reload: requests in flight keep the old one.
            session = self._by_provider[provider.name] = create_session(provider.pool_connections)
        elif self._on_wait is not None and pools.in_use(session.connector) >= provider.pool_connections:
            self._on_wait(provider.name)
        return session

    async def close(self) -> None:
        for session in self._by_provider.values():
            await session.close()


def create_session(pool_connections: int) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=pool_connections, limit_per_host=0, ttl_dns_cache=300)
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        timeout=aiohttp.ClientTimeout(total=None),
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("User-Agent",),
        raise_for_status=False,
    )


def response_headers(resp: aiohttp.ClientResponse, scrub: Scrubber | None) -> list[Header]:
    """The provider's headers fit to pass on: none about the connection, none of ours, none quoting its key."""
    headers = [(k.lower(), v) for k, v in resp.raw_headers]
    kept = [(k, v) for k, v in headers if k not in RESPONSE_DROP]
    return kept if scrub is None else scrub.headers(kept)


def stop_read_timer(resp: aiohttp.ClientResponse) -> None:
    """End aiohttp's per-read timer (the first-byte limit until now): IdleWatch keeps the idle limit."""
    connection = resp.connection
    if connection is not None and connection.protocol is not None:
        connection.protocol.read_timeout = None
        connection.protocol.start_timeout()


class IdleWatch:
    """The provider's idle limit on an answer's body: a few timer ticks per limit, not a timer per read.

    aiohttp's sock_read cancels and re-arms a timer on every read, about 3% of the gateway's
    CPU at thousands of stream chunks a second. Here a tick every idle_s / IDLE_TICKS reads how
    many bytes the provider sent: when none came for IDLE_TICKS ticks in a row while the relay
    waited on the provider, the read fails as aiohttp's would (a TimeoutError). Time spent waiting
    on a slow client does not count: the relay sets `waiting` around its reads. So the limit is
    never cut short, and fires at most one tick late.
    """

    __slots__ = ("_content", "_handle", "_loop", "_period", "_seen", "_still", "waiting")

    def __init__(self, content: aiohttp.StreamReader, idle_s: float) -> None:
        self.waiting = True
        self._content = content
        self._period = idle_s / IDLE_TICKS
        self._seen = content.total_bytes
        self._still = 0
        self._loop = asyncio.get_running_loop()
        self._handle: asyncio.TimerHandle | None = self._loop.call_later(self._period, self._tick)

    def _tick(self) -> None:
        seen = self._content.total_bytes
        if seen != self._seen or not self.waiting:
            self._seen, self._still = seen, 0
        else:
            self._still += 1
            if self._still >= IDLE_TICKS:
                # The byte before the silence came before the tick that saw it, IDLE_TICKS ticks ago.
                self._handle = None
                self._content.set_exception(aiohttp.SocketTimeoutError("Timeout on reading data from socket"))
                return
        self._handle = self._loop.call_later(self._period, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


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

    Failures before the headers are Retryable. A response left with unread
    bytes (client gone, error) has its connection closed, not pooled.
    """
    with client.connect_errors:
        # encoded=True: the path goes out byte for byte as the client sent it, never re-normalised.
        resp = await session.request(
            method, URL(url, encoded=True), headers=headers, data=body, allow_redirects=False, timeout=client.timeout
        )
    try:
        stop_read_timer(resp)
        yield resp
    finally:
        # release() keeps a fully read connection for reuse and closes one with unread bytes.
        resp.release()


def raise_for_status(status: int, provider: ProviderSettings, *, last_attempt: bool) -> None:
    """An answer not to pass on while another provider may do better is a Retryable failure.

    The last provider's 429 is passed on: its Retry-After is the client's best hint.
    """
    if status == 401 or status == 403:
        # The client's key never goes upstream, so a 401/403 there is about ours: passing it on
        # would send the user after their own key. The provider's body may quote our key: dropped.
        rejected = UpstreamAuthError(
            f"Provider '{provider.name}' rejected the gateway's own credential (HTTP {status}). "
            "Your API key is fine: the gateway's operators must fix the provider key or its access."
        )
        raise Retryable(rejected, UpstreamAuthError.reason)
    if status >= 500 or (status == 429 and not last_attempt):
        failed = UpstreamError(f"Provider '{provider.name}' answered HTTP {status}.")
        raise Retryable(failed, REASON_429 if status == 429 else "http_5xx")
