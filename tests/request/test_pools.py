"""The upstream pool gauges' one reader of aiohttp's private fields (request/pools.py), against a real pool."""

from __future__ import annotations

import asyncio

import aiohttp

from proxy.records.metrics import PoolStats
from proxy.request import pools
from tests.conftest import Mocks

SLOW = {"x-mock-chunk-delay-ms": "200"}  # the answer's connection stays in use for a second


async def test_the_installed_aiohttp_has_the_fields_the_pool_gauges_read() -> None:
    assert await pools.problems() == []


async def test_a_connection_is_counted_in_use_while_an_answer_is_read_then_idle(mocks: Mocks) -> None:
    """Were aiohttp to move its fields, both counts would read 0 and this would fail."""
    connector = aiohttp.TCPConnector(limit=4)
    async with aiohttp.ClientSession(connector=connector) as session:
        assert pools.pool_stats(connector) == PoolStats(in_use=0, idle=0, waiting=0)
        body = {"model": "mock-chat", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        async with session.post(f"{mocks.beta.url}/v1/chat/completions", json=body, headers=SLOW) as answer:
            assert answer.status == 200
            assert pools.pool_stats(connector) == PoolStats(in_use=1, idle=0, waiting=0)
            assert pools.in_use(connector) == 1
            await answer.read()
        assert pools.pool_stats(connector) == PoolStats(in_use=0, idle=1, waiting=0)


async def test_requests_waiting_for_a_full_pool_are_counted(mocks: Mocks) -> None:
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        body = {"model": "mock-chat", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        async with session.post(f"{mocks.beta.url}/v1/chat/completions", json=body, headers=SLOW) as answer:
            waiting = asyncio.ensure_future(session.post(f"{mocks.beta.url}/v1/chat/completions", json=body))
            await asyncio.sleep(0.1)
            assert pools.pool_stats(connector) == PoolStats(in_use=1, idle=0, waiting=1)
            await answer.read()
        async with await waiting as second:
            await second.read()
