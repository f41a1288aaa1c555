"""The script pipe against a real redis-server: batching, order, errors, timeouts and reconnects."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ReadOnlyError, ResponseError

from proxy.redisio.pipe import Pipe, Prepared, Script, pack_command
from tests.conftest import RedisServer, free_port

ECHO = Script("return {KEYS[1], ARGV[1], ARGV[2]}")
FAIL = Script("return redis.error_reply('ERR on purpose')")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    own = RedisServer(free_port(), tmp_path / "redis.log").start()
    try:
        yield own
    finally:
        if own.proc is not None:
            own.proc.send_signal(signal.SIGCONT)
        own.stop()


class Counted:
    """Real connections to the real server, counted as they are made."""

    def __init__(self, url: str) -> None:
        self.pool = aioredis.ConnectionPool.from_url(url, socket_timeout=None, socket_connect_timeout=1)
        self.made = 0

    def __call__(self) -> Any:
        self.made += 1
        return self.pool.make_connection()


async def reads_by_redis(admin: aioredis.Redis) -> int:
    """How many times Redis read from its clients' sockets so far (this question is one of them)."""
    stats = await admin.info("stats")
    return int(stats["total_reads_processed"])


@pytest.fixture
async def loaded(server: RedisServer) -> AsyncIterator[RedisServer]:
    client = aioredis.Redis.from_url(server.url)
    for script in (ECHO, FAIL):
        await client.script_load(script.source)
    await client.aclose()
    yield server


async def test_calls_of_one_tick_go_out_in_one_write_and_come_back_in_order(loaded: RedisServer) -> None:
    factory = Counted(loaded.url)
    pipe = Pipe(factory, 1.0)
    admin = aioredis.Redis.from_url(loaded.url)
    try:
        assert await pipe.call(Prepared(ECHO, ["x"], [0]).pack()) == [b"x", b"0"]  # connected (with its handshake)
        # The pipe's writes, counted where they are made: Redis's own count of its reads merges two
        # writes that reach its socket before it reads (it did on a loaded machine: 2 reads, not 3).
        writes: list[bytes] = []
        transport = pipe._replies.transport  # type: ignore[union-attr]
        write = transport.write
        transport.write = lambda data: (writes.append(data), write(data))[1]  # type: ignore[method-assign]
        calls = [Prepared(ECHO, [f"k{i}"], [i]) for i in range(100)]
        futures = [pipe.call(call.pack()) for call in calls]  # all within one turn of the loop
        replies = await asyncio.gather(*futures)
        assert replies == [[f"k{i}".encode(), str(i).encode()] for i in range(100)]
        # The first call found the pipe idle and went at once; the other 99 were one write after it.
        assert [len(w) for w in writes] == [len(calls[0].pack()), sum(len(c.pack()) for c in calls[1:])]
        # Later calls reuse the connection.
        assert await pipe.call(Prepared(ECHO, ["x"], [1], more=1).pack("more")) == [b"x", b"1", b"more"]
        assert factory.made == 1
    finally:
        await admin.aclose()
        await pipe.close()


async def test_a_call_on_an_idle_pipe_is_written_at_once_and_one_behind_a_reply_waits_for_the_turn(
    loaded: RedisServer,
) -> None:
    """An admission on a quiet pipe does not wait for the end of a busy loop's turn; later ones batch."""
    pipe = Pipe(Counted(loaded.url), 1.0, lazy_s=60.0)
    try:
        await pipe.call(Prepared(ECHO, ["x"], [0]).pack())  # connected
        lazy = pipe.call(Prepared(ECHO, ["settle"], [1]).pack(), lazy=True)
        first = pipe.call(Prepared(ECHO, ["admit"], [2]).pack())
        assert not pipe._queued  # written before this turn of the loop went on, the lazy call with it
        second = pipe.call(Prepared(ECHO, ["admit"], [3]).pack())
        third = pipe.call(Prepared(ECHO, ["admit"], [4]).pack())
        assert len(pipe._queued) == 2  # a reply is awaited: these two go together at the turn's end
        results = await asyncio.gather(lazy, first, second, third)
        assert [r[1] for r in results] == [b"1", b"2", b"3", b"4"]
    finally:
        await pipe.close()


async def test_an_error_reply_fails_only_its_own_call(loaded: RedisServer) -> None:
    pipe = Pipe(Counted(loaded.url), 1.0)
    try:
        unknown = Script("return 'never loaded'")
        futures = [
            pipe.call(Prepared(ECHO, ["a"], [1]).pack()),
            pipe.call(Prepared(FAIL, [], []).pack()),
            pipe.call(Prepared(unknown, [], []).pack()),
            pipe.call(Prepared(ECHO, ["b"], [2]).pack()),
        ]
        first, failed, missing, last = await asyncio.gather(*futures)
        assert first[0] == b"a" and last[0] == b"b"
        assert isinstance(failed, ResponseError) and "on purpose" in str(failed)
        assert isinstance(missing, NoScriptError)
        assert await pipe.call(pack_command(b"SCRIPT", b"LOAD", unknown.source.encode())) == unknown.sha.encode()
        assert await pipe.call(Prepared(unknown, [], []).pack()) == b"never loaded"
    finally:
        await pipe.close()


async def test_a_paused_redis_fails_the_waiting_calls_in_time_and_the_pipe_recovers(loaded: RedisServer) -> None:
    factory = Counted(loaded.url)
    pipe = Pipe(factory, 0.3)
    assert loaded.proc is not None
    try:
        assert (await pipe.call(Prepared(ECHO, ["a"], [1]).pack()))[0] == b"a"
        loaded.proc.send_signal(signal.SIGSTOP)
        start = time.monotonic()
        futures = [pipe.call(Prepared(ECHO, ["a"], [i]).pack()) for i in range(5)]
        results = await asyncio.gather(*futures, return_exceptions=True)
        took = time.monotonic() - start
        assert all(isinstance(r, TimeoutError) for r in results), results
        assert 0.25 < took < 0.3 + 1.0, took
        loaded.proc.send_signal(signal.SIGCONT)
        # The stuck connection was dropped; the next call connects afresh.
        assert (await pipe.call(Prepared(ECHO, ["b"], [2]).pack()))[0] == b"b"
        assert factory.made == 2
    finally:
        await pipe.close()


async def test_a_connection_that_breaks_fails_the_calls_after_the_break_and_the_next_ones_reconnect(
    loaded: RedisServer,
) -> None:
    factory = Counted(loaded.url)
    pipe = Pipe(factory, 1.0)
    try:
        # In one write: a call, the server killing this very connection, a call that gets no answer.
        before = pipe.call(Prepared(ECHO, ["a"], [1]).pack())
        kill = pipe.call(pack_command(b"CLIENT", b"KILL", b"TYPE", b"normal", b"SKIPME", b"no"))
        after = pipe.call(Prepared(ECHO, ["b"], [2]).pack())
        results = await asyncio.wait_for(asyncio.gather(before, kill, after, return_exceptions=True), 2)
        assert results[0] == [b"a", b"1"]
        assert isinstance(results[2], (RedisConnectionError, ConnectionError, OSError)), results
        assert (await pipe.call(Prepared(ECHO, ["c"], [3]).pack()))[0] == b"c"
        assert factory.made == 2
    finally:
        await pipe.close()


async def test_no_redis_fails_fast_and_a_caller_that_left_is_skipped(tmp_path: Path) -> None:
    pipe = Pipe(Counted(f"redis://127.0.0.1:{free_port()}/0"), 1.0)
    try:
        with pytest.raises((RedisConnectionError, OSError)):
            await pipe.call(Prepared(ECHO, ["a"], [1]).pack())
        gone = pipe.call(Prepared(ECHO, ["a"], [1]).pack())
        gone.cancel()
        await asyncio.sleep(0.1)  # the failure does not raise into a cancelled caller
    finally:
        await pipe.close()


def test_arguments_are_packed_as_redis_py_packs_them() -> None:
    call = Prepared(ECHO, ["k"], [1, 0.5, "s"], more=2)
    packed = call.pack(7, "id.1")
    parts = [b"EVALSHA", ECHO.sha.encode(), b"1", b"k", b"1", b"0.5", b"s", b"7", b"id.1"]
    assert packed == b"*9\r\n" + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
    with pytest.raises(TypeError):
        Prepared(ECHO, ["k"], [True])


async def test_a_lazy_call_rides_with_the_next_urgent_one_or_goes_within_lazy_s(loaded: RedisServer) -> None:
    factory = Counted(loaded.url)
    pipe = Pipe(factory, 1.0, lazy_s=0.2)
    try:
        await pipe.call(Prepared(ECHO, ["x"], [0]).pack())  # connected
        lazy = pipe.call(Prepared(ECHO, ["settle"], [1]).pack(), lazy=True)
        await asyncio.sleep(0.05)
        assert not lazy.done()  # not sent yet
        urgent = pipe.call(Prepared(ECHO, ["admit"], [2]).pack())
        assert await urgent == [b"admit", b"2"]
        assert lazy.done() and lazy.result() == [b"settle", b"1"]  # together, the lazy one first
        alone = pipe.call(Prepared(ECHO, ["settle"], [3]).pack(), lazy=True)
        start = time.monotonic()
        assert await alone == [b"settle", b"3"]
        assert 0.15 < time.monotonic() - start < 1.0
    finally:
        await pipe.close()


async def test_close_sends_what_is_still_queued(loaded: RedisServer) -> None:
    pipe = Pipe(Counted(loaded.url), 1.0, lazy_s=60.0)
    await pipe.call(Prepared(ECHO, ["x"], [0]).pack())
    lazy = pipe.call(Prepared(ECHO, ["last"], [1]).pack(), lazy=True)
    await pipe.close()
    assert lazy.result() == [b"last", b"1"]


async def test_a_primary_demoted_to_replica_is_left_for_the_one_the_factory_names_now(tmp_path: Path) -> None:
    """As in a failover the old primary missed: READONLY fails that call, and the next connects afresh."""
    old = RedisServer(free_port(), tmp_path / "old.log").start()
    new = RedisServer(free_port(), tmp_path / "new.log").start()
    pools = {
        server.port: aioredis.ConnectionPool.from_url(server.url, socket_connect_timeout=1) for server in (old, new)
    }
    primary = [old.port]  # what a sentinel would answer
    made: list[int] = []

    def factory() -> Any:
        made.append(primary[0])
        return pools[primary[0]].make_connection()

    pipe = Pipe(factory, 1.0)
    admin = aioredis.Redis.from_url(old.url)
    write = pack_command(b"SET", b"k", b"v")
    try:
        assert await pipe.call(write) == b"OK"
        await admin.replicaof("127.0.0.1", new.port)
        primary[0] = new.port
        demoted = await pipe.call(write)
        assert isinstance(demoted, ReadOnlyError)
        assert await pipe.call(write) == b"OK"
        assert made == [old.port, new.port]
    finally:
        await admin.aclose()
        await pipe.close()
        old.stop()
        new.stop()
