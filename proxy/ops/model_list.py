"""The model lists of glob-only providers: fetched from the provider in the background, cached.

A provider configured as `models = ["deepseek-*"]` names no model the gateway could list.
Its own `GET {base_url}/models` does; that answer, cut to the provider's globs, is kept
for `models_cache_s` and fetched again by one task of the app's lifespan. A request never
fetches: before the first fill has ended it waits at most the provider's connect timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import orjson

from ..config.settings import KeySettings, ProviderSettings, Settings
from ..redact import CLIENT_TEXT_LIMIT
from ..request.upstream import ProviderClient, Sessions
from ..request.usage import Inflater

log = logging.getLogger("sluicegate")

RETRY_S = 30.0  # a failed fetch is tried again this soon, or after models_cache_s if that is shorter
MAX_BODY_BYTES = 16 << 20  # an answer larger than this is refused, compressed or not
IDLE_S = 3600.0  # with nothing due, the task sleeps this long or until woken (a reload)


class FetchFailed(Exception):
    """Why a provider's list was not refreshed, in words fit for the log: no URL, key or body."""


def glob_only(provider: ProviderSettings) -> bool:
    return not provider.patterns.exact


def parse_models(body: bytes, provider: ProviderSettings) -> tuple[str, ...]:
    """The ids of an OpenAI model list that the provider's globs let through, in its order, each once."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise FetchFailed("the answer is not JSON") from exc
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list):
        raise FetchFailed("the answer has no 'data' list")
    ids = (item.get("id") for item in data if isinstance(item, dict))
    wanted = (i for i in ids if isinstance(i, str) and 0 < len(i) <= CLIENT_TEXT_LIMIT and provider.patterns.matches(i))
    return tuple(dict.fromkeys(wanted))


async def fetch_models(session: aiohttp.ClientSession, client: ProviderClient) -> tuple[str, ...]:
    """GET {base_url}/models with the provider's credential, as the relay sends it."""
    provider = client.settings
    timeout = aiohttp.ClientTimeout(
        total=provider.connect_timeout_s + provider.first_byte_timeout_s, sock_connect=provider.connect_timeout_s
    )
    headers = {**client.auth, "Accept-Encoding": "identity"}
    try:
        async with session.get(
            provider.base_url + "/models", headers=headers, timeout=timeout, allow_redirects=False
        ) as resp:
            if resp.status != 200:
                raise FetchFailed(f"HTTP {resp.status}")
            body = bytearray()
            async for chunk in resp.content.iter_chunked(64 << 10):
                body += chunk
                if len(body) > MAX_BODY_BYTES:
                    raise FetchFailed(f"the answer is over {MAX_BODY_BYTES >> 20} MiB")
            encoding = resp.headers.get("Content-Encoding")
    except TimeoutError as exc:
        raise FetchFailed("timed out") from exc
    except aiohttp.ClientConnectorError as exc:
        raise FetchFailed("cannot connect") from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise FetchFailed("the connection broke off") from exc
    inflater = Inflater.of(encoding)
    if inflater is None:
        return parse_models(bytes(body), provider)
    copy = inflater.feed(bytes(body))
    if not inflater.whole:
        raise FetchFailed(f"the answer is compressed ({encoding}) and cannot be read")
    return parse_models(copy, provider)


@dataclass(slots=True)
class _Entry:
    provider: ProviderSettings  # the settings it was fetched with: a reload that changes them starts afresh
    models: tuple[str, ...] = ()
    filled: asyncio.Event = field(default_factory=asyncio.Event)  # the first fetch ended, well or not
    due_at: float = 0.0  # monotonic
    fetching: asyncio.Task[None] | None = None


class ModelLists:
    """The cached lists, and the lifespan's task that keeps them fresh."""

    def __init__(self, sessions: Sessions, settings: Callable[[], Settings]) -> None:
        self._sessions = sessions
        self._settings = settings  # the config now: a reload changes the providers
        self._entries: dict[str, _Entry] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """The first fill starts now."""
        self._task = asyncio.create_task(self._refresh())

    def wake(self) -> None:
        """Look at the providers again (after a reload)."""
        self._wake.set()

    async def close(self) -> None:
        tasks = [t for t in (self._task, *(e.fetching for e in self._entries.values())) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def fetched(self, settings: Settings, key: KeySettings) -> list[str]:
        """The cached names of the glob-only providers, in config order, for this key's list."""
        if key.models is not None and not key.models.globs:
            # Exact names only: the key's own names are listed already, a provider's list adds none.
            return []
        entries = [self._entry(p) for p in settings.providers if glob_only(p)]
        waits = [
            asyncio.wait_for(e.filled.wait(), e.provider.connect_timeout_s) for e in entries if not e.filled.is_set()
        ]
        if waits:
            await asyncio.gather(*waits, return_exceptions=True)
        return [model for e in entries for model in e.models]

    def _entry(self, provider: ProviderSettings) -> _Entry:
        entry = self._entries.get(provider.name)
        if entry is None or entry.provider != provider:
            if entry is not None and entry.fetching is not None:
                entry.fetching.cancel()
            entry = self._entries[provider.name] = _Entry(provider)
            self._wake.set()
        return entry

    async def _refresh(self) -> None:
        while True:
            wanted = {p.name: p for p in self._settings().providers if glob_only(p)}
            for name in self._entries.keys() - wanted.keys():
                gone = self._entries.pop(name)
                if gone.fetching is not None:
                    gone.fetching.cancel()
            now = time.monotonic()
            wake_at = now + IDLE_S
            for provider in wanted.values():
                entry = self._entry(provider)
                if entry.fetching is not None:
                    continue  # it wakes this loop when it ends
                if entry.due_at <= now:
                    entry.fetching = asyncio.create_task(self._fetch(entry))
                else:
                    wake_at = min(wake_at, entry.due_at)
            self._wake.clear()  # _entry above may have set it; what it asked for is done
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wake_at - now)

    async def _fetch(self, entry: _Entry) -> None:
        provider = entry.provider
        client = ProviderClient.build(provider)
        try:
            entry.models = await fetch_models(self._sessions.get(provider), client)
            entry.due_at = time.monotonic() + provider.models_cache_s
        except FetchFailed as exc:
            kept = f"keeping the {len(entry.models)} listed before" if entry.models else "none listed yet"
            log.warning("model list of provider '%s' not refreshed (%s): %s", provider.name, exc, kept)
            entry.due_at = time.monotonic() + min(provider.models_cache_s, RETRY_S)
        except Exception:
            # A bug of ours: said once per try, and tried again no sooner than a failure would be.
            log.exception("model list of provider '%s' not refreshed", provider.name)
            entry.due_at = time.monotonic() + min(provider.models_cache_s, RETRY_S)
        finally:
            entry.fetching = None
            entry.filled.set()
            self._wake.set()
