"""The upstream boundary: the pool against a real mock on a real port, and the one map of its failures."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson
import pytest

from proxy.config.settings import parse_settings
from proxy.request.upstream import (
    AttemptFailed,
    ErrorMap,
    Phase,
    ProviderClient,
    Retryable,
    Sessions,
    open_upstream,
    raise_for_status,
)
from proxy.request.usage import NotJson
from tests.conftest import Mocks

BODY = orjson.dumps({"model": "mock-chat", "messages": [{"role": "user", "content": "hi"}], "stream": True})


async def test_waiting_for_a_pooled_connection_is_bounded(mocks: Mocks, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = {
        "providers": [
            {"name": "beta", "base_url": f"{mocks.beta.url}/v1", "models": ["mock-chat"],
             "connect_timeout_s": 0.2, "first_byte_timeout_s": 0.3, "pool_connections": 1},
        ]
    }  # fmt: skip
    provider = parse_settings(raw, {}).providers[0]
    client = ProviderClient.build(provider)
    waits: list[str] = []
    sessions = Sessions(on_wait=waits.append)
    session = sessions.get(provider)
    url = client.base_url + "/chat/completions"
    slow = {"x-mock-chunks": "100", "x-mock-chunk-delay-ms": "50", "content-type": "application/json"}
    try:
        async with open_upstream(session, client, "POST", url, slow, BODY) as busy:
            assert busy.status == 200
            started = time.monotonic()
            with pytest.raises(Retryable) as info:
                async with open_upstream(session, client, "POST", url, slow, BODY):
                    pass
            # The one connection stays busy for 5 s; the wait gives up after connect + first byte (0.5 s).
            assert time.monotonic() - started < 2.0
            assert info.value.reason == "connect_timeout"
            # The pool is full: the next request through it is counted as waiting.
            assert sessions.get(provider) is session
            assert waits == ["beta"]
    finally:
        await sessions.close()


ALPHA_RAW = {"name": "alpha", "base_url": "http://127.0.0.1:9/v1", "models": ["m"], "first_byte_timeout_s": 2.5}
ALPHA = parse_settings({"providers": [ALPHA_RAW]}, {}).providers[0]


@pytest.mark.parametrize(
    ("phase", "raised", "status", "message", "reason"),
    [
        (Phase.CONNECT, aiohttp.ConnectionTimeoutError(), 504, "Timed out connecting to provider 'alpha'.",
         "connect_timeout"),
        (Phase.CONNECT, aiohttp.ServerTimeoutError(), 504, "Provider 'alpha' sent no response within 2.5s.",
         "first_byte_timeout"),
        (Phase.CONNECT, aiohttp.ServerDisconnectedError(), 502,
         "Provider 'alpha' closed the connection before answering.", "disconnected"),
        (Phase.CONNECT, ConnectionResetError(), 502, "Provider 'alpha' closed the connection before answering.",
         "disconnected"),
        (Phase.READ, aiohttp.SocketTimeoutError(), 504, "Provider 'alpha' stopped sending (idle timeout).",
         "read_error"),
        (Phase.READ, aiohttp.ClientPayloadError(), 502, "Provider 'alpha' broke off the response.", "read_error"),
        (Phase.READ, NotJson(), 502, "Provider 'alpha' answered something that is not JSON.", "bad_json"),
        (Phase.STREAM, aiohttp.SocketTimeoutError(), 504, "Provider 'alpha' stopped sending (idle timeout).",
         "upstream_timeout"),
        (Phase.STREAM, aiohttp.ClientPayloadError(), 502, "Provider 'alpha' broke off the response.",
         "upstream_error"),
        (Phase.STREAM, ConnectionResetError(), 502, "Provider 'alpha' broke off the response.", "upstream_error"),
    ],
)  # fmt: skip
def test_each_phase_maps_what_aiohttp_raises(
    phase: Phase, raised: BaseException, status: int, message: str, reason: str
) -> None:
    with pytest.raises(AttemptFailed) as info, ErrorMap(ALPHA, phase):
        raise raised
    assert (info.value.error.status, info.value.error.message, info.value.reason) == (status, message, reason)
    assert info.value.__cause__ is raised
    # Only before the client has its headers can another provider still answer instead.
    assert isinstance(info.value, Retryable) is (phase is not Phase.STREAM)


@pytest.mark.parametrize("phase", list(Phase))
@pytest.mark.parametrize("raised", [asyncio.CancelledError(), ValueError("a bug of ours")])
def test_what_is_not_the_providers_fault_passes_through(phase: Phase, raised: BaseException) -> None:
    with pytest.raises(type(raised)), ErrorMap(ALPHA, phase):
        raise raised


@pytest.mark.parametrize(
    ("status", "last_attempt", "code", "reason"),
    [
        (401, False, "upstream_auth_error", "auth_error"),
        (403, True, "upstream_auth_error", "auth_error"),
        (500, True, "upstream_error", "http_5xx"),
        (503, False, "upstream_error", "http_5xx"),
        (429, False, "upstream_error", "http_429"),
    ],
)
def test_answers_not_to_pass_on_fail_the_attempt(status: int, last_attempt: bool, code: str, reason: str) -> None:
    with pytest.raises(Retryable) as info:
        raise_for_status(status, ALPHA, last_attempt=last_attempt)
    assert (info.value.error.code, info.value.reason) == (code, reason)
    if code == "upstream_error":
        assert info.value.error.message == f"Provider 'alpha' answered HTTP {status}."


@pytest.mark.parametrize("status", [200, 400, 404, 422])
def test_answers_passed_on(status: int) -> None:
    raise_for_status(status, ALPHA, last_attempt=False)
    # The last provider's 429 reaches the client, Retry-After and all.
    raise_for_status(429, ALPHA, last_attempt=True)
