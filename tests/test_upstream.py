"""The upstream boundary against a real mock on a real port."""

from __future__ import annotations

import time

import orjson
import pytest

from proxy import upstream
from proxy.settings import parse_settings
from proxy.upstream import ProviderClient, Retryable, create_session, open_upstream
from tests.conftest import Mocks

BODY = orjson.dumps({"model": "mock-chat", "messages": [{"role": "user", "content": "hi"}], "stream": True})


async def test_waiting_for_a_pooled_connection_is_bounded(mocks: Mocks, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = {
        "providers": [
            {"name": "beta", "base_url": f"{mocks.beta.url}/v1", "models": ["mock-chat"],
             "connect_timeout_s": 0.2, "first_byte_timeout_s": 0.3},
        ]
    }  # fmt: skip
    client = ProviderClient.build(parse_settings(raw, {}).providers[0])
    monkeypatch.setattr(upstream, "POOL_LIMIT", 1)
    session = create_session()
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
    finally:
        await session.close()
