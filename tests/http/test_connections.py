"""The short ways out for an answer's head and a stream's chunks (internals.send_head and chunk_sender),
under hypercorn's own connection in-process.

A small ASGI app stands in for the gateway and answers through the gateway's own
Exchange, so each case can choose its answer's framing and ending; the client is a raw
socket, so the bytes on the wire are what is checked. Every case runs on asyncio's loop
and on uvloop, the one the gateway serves with.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from typing import Any

import pytest
import uvloop
from hypercorn.config import Config
from hypercorn.utils import wrap_app
from prometheus_client import CollectorRegistry, Gauge

from proxy.config.settings import ServerSettings
from proxy.http import internals
from proxy.http.asgi import FAST_SEND
from proxy.http.connections import Listener
from proxy.http.internals import _ChunkSender, chunk_sender
from proxy.records.record import RequestRecord
from proxy.request.exchange import Exchange

PARTS = (b"data: one\n\n", b"", b"data: two\n\n", b"data: three\n\n")  # an empty part is no chunk
ON_WIRE = [part for part in PARTS if part]
DONE = b"data: [DONE]\n\n"
WHOLE = b'{"id": "x", "choices": []}'
LARGE = b'{"pad": "' + b"x" * (internals.JOIN_UP_TO + 1) + b'"}'  # written apart from its head
HEAD = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"


def on_both_loops(case: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[str], None]:
    """The case as a test run once on asyncio's loop and once on uvloop's."""

    @pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
    def test(loop: str) -> None:
        (uvloop.run if loop == "uvloop" else asyncio.run)(case())

    test.__name__, test.__doc__ = case.__name__, case.__doc__
    return test


class App:
    """Answers each request with its parts through Exchange.body_sender(), then ends (or, on /cut, cuts)."""

    def __init__(self, parts: tuple[bytes, ...] = PARTS) -> None:
        self.parts = parts
        self.fast: list[bool] = []  # per request: did the Exchange take the short way
        self.nodelay: list[int] = []  # per request: TCP_NODELAY of the client's socket
        self.sent = 0  # parts sent so far, over all requests
        self.finished = asyncio.Event()
        self.active = Gauge("active", "streams", registry=CollectorRegistry())

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        record = RequestRecord.start("req_test", scope["method"])
        fast = scope["extensions"].get(FAST_SEND)
        ex = Exchange(send, record, [(b"x-request-id", b"req_test")], self.active, fast=fast)
        if scope["path"] in ("/whole", "/large"):
            body = WHOLE if scope["path"] == "/whole" else LARGE
            await ex.respond(200, [(b"content-type", b"application/json")], body)
            return
        headers = [(b"content-type", b"text/event-stream"), (b"x-ratelimit-reset-requests", b"1ms")]
        if scope["path"] == "/sized":
            headers.append((b"content-length", str(sum(map(len, self.parts)) + len(DONE)).encode()))
        if scope["path"] == "/padded":
            headers.append((b"x-note", b"padded "))  # h11 refuses the space; hypercorn's way strips it
        await ex.start(200, headers)
        part_sender = ex.body_sender()
        fast = isinstance(getattr(part_sender, "__self__", None), _ChunkSender)
        self.fast.append(fast)
        if fast:
            writer = send.__self__.send.__self__.send.__self__.writer  # the stream's protocol's connection
            self.nodelay.append(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        for part in self.parts:
            await part_sender(part)
            self.sent += 1
        if scope["path"] == "/cut":
            ex.cut()
        else:
            await ex.end(DONE)
        self.finished.set()


@contextlib.contextmanager
def recording_heads(short_way: bool = True) -> Iterator[list[bool]]:
    """Whether each head took the short way; with short_way=False, none may (hypercorn's way, to compare)."""
    taken: list[bool] = []
    head, whole = internals.send_head, internals.send_answer

    async def recorded_head(send: Any, status: int, headers: Sequence[tuple[bytes, bytes]]) -> bool:
        taken.append(short_way and await head(send, status, headers))
        return taken[-1]

    async def recorded_whole(send: Any, status: int, headers: Sequence[tuple[bytes, bytes]], body: bytes) -> bool:
        taken.append(short_way and await whole(send, status, headers, body))
        return taken[-1]

    internals.send_head, internals.send_answer = recorded_head, recorded_whole  # type: ignore[assignment]
    try:
        yield taken
    finally:
        internals.send_head, internals.send_answer = head, whole


@contextlib.asynccontextmanager
async def listening(app: App) -> AsyncIterator[int]:
    server = ServerSettings(port=0, graceful_timeout_s=1.0)
    config = Config()
    listener = Listener(wrap_app(app, config.wsgi_max_body_size, "asgi"), config, server)  # type: ignore[arg-type]
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    listener.start([sock])
    try:
        yield sock.getsockname()[1]
    finally:
        await listener.stop_accepting()
        await listener.close(1.0)


async def ask(port: int, head: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    return reader, writer


async def read_chunked(reader: asyncio.StreamReader) -> tuple[bytes, list[bytes]]:
    """One whole chunked answer: its head and its chunks, each as framed on the wire."""
    head = await reader.readuntil(b"\r\n\r\n")
    chunks = []
    while True:
        size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
        data = await reader.readexactly(size + 2)
        assert data.endswith(b"\r\n")
        if size == 0:
            return head, chunks
        chunks.append(data[:-2])


async def two_streams_on_one_connection(app: App) -> None:
    """Two chunked answers, one after the other on one keep-alive connection, each whole on the wire."""
    async with listening(app) as port:
        reader, writer = await ask(port, HEAD)
        head, chunks = await asyncio.wait_for(read_chunked(reader), 5)
        assert b"transfer-encoding: chunked" in head.lower()
        assert chunks == [*ON_WIRE, b"data: [DONE]\n\n"]
        # h11 and hypercorn never saw those parts: the keep-alive connection must still be in step.
        writer.write(HEAD.replace(b"/a", b"/b"))
        _, chunks = await asyncio.wait_for(read_chunked(reader), 5)
        assert chunks == [*ON_WIRE, b"data: [DONE]\n\n"]
        writer.close()


@on_both_loops
async def test_a_chunked_answer_takes_the_short_way_and_the_connection_serves_the_next_request() -> None:
    app = App()
    await two_streams_on_one_connection(app)
    assert app.fast == [True, True]
    # Set by the listener on every event loop (asyncio's leaves it off on an accepted socket): each
    # chunk goes out at once, not after the client's ACK of the one before.
    assert app.nodelay == [1, 1]


@on_both_loops
async def test_a_cut_after_short_way_chunks_closes_the_connection_without_the_last_chunk() -> None:
    app = App()
    async with listening(app) as port:
        reader, writer = await ask(port, HEAD.replace(b"/a", b"/cut"))
        answer = await asyncio.wait_for(reader.read(), 5)  # EOF: hypercorn closed it
        assert answer.endswith(b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in ON_WIRE))
        assert not answer.endswith(b"0\r\n\r\n")  # the client can tell the answer is cut
        writer.close()
    assert app.fast == [True]


@on_both_loops
async def test_an_http10_client_a_sized_answer_and_a_test_send_take_the_ordinary_way() -> None:
    app = App()
    async with listening(app) as port:
        reader, writer = await ask(port, b"POST /a HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}")
        answer = await asyncio.wait_for(reader.read(), 5)  # HTTP/1.0: no chunks, the close ends it
        assert answer.endswith(b"\r\n\r\n" + b"".join(PARTS) + b"data: [DONE]\n\n")
        writer.close()
        reader, writer = await ask(port, HEAD.replace(b"/a", b"/sized"))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        body = await asyncio.wait_for(reader.readexactly(sum(map(len, PARTS))), 5)
        assert b"content-length" in head.lower()
        assert body == b"".join(PARTS)
        writer.close()
    assert app.fast == [False, False]

    async def collect(message: dict[str, Any]) -> None:
        pass

    assert chunk_sender(collect) is None  # type: ignore[arg-type]


@on_both_loops
async def test_a_client_that_does_not_read_holds_the_stream_back() -> None:
    """Flow control as hypercorn's: what waits for a slow client is bounded, not the whole stream."""
    part = b"x" * 65536
    app = App((part,) * 1000)  # 64 MiB
    async with listening(app) as port:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            writer.write(HEAD)
            await asyncio.sleep(1.0)
            held_back = app.sent
            # The kernel's buffers take a few MiB; without flow control all 1,000 parts were gone at once.
            assert held_back < 250, f"{held_back} parts of 64 KiB sent to a client that read nothing"
            _, chunks = await asyncio.wait_for(read_chunked(reader), 60)
            assert chunks == [part] * 1000 + [b"data: [DONE]\n\n"]
        finally:
            writer.transport.abort()  # or the server would wait on what it holds for this client
    assert app.fast == [True]


@on_both_loops
async def test_a_client_gone_mid_stream_ends_the_app_without_an_error() -> None:
    part = b"x" * 65536
    app = App((part,) * 400)
    async with listening(app) as port:
        reader, writer = await ask(port, HEAD)
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        await reader.readexactly(65536)
        writer.transport.abort()
        # hypercorn's way on a broken socket: the parts still sent go nowhere, the app runs to its end.
        await asyncio.wait_for(app.finished.wait(), 10)
    assert app.fast == [True]


async def read_sized(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    return head, await reader.readexactly(length)


def undated(head: bytes) -> bytes:
    return b"\r\n".join(line for line in head.split(b"\r\n") if not line.startswith(b"date: "))


async def four_answers(short_way: bool) -> list[bytes]:
    """A chunked, a sized, a whole, a large whole and a chunked answer on one keep-alive connection: four heads."""
    app = App()
    with recording_heads(short_way) as taken:
        async with listening(app) as port:
            reader, writer = await ask(port, HEAD)
            first, chunks = await asyncio.wait_for(read_chunked(reader), 5)
            assert chunks == [*ON_WIRE, b"data: [DONE]\n\n"]
            writer.write(HEAD.replace(b"/a", b"/sized"))
            second, body = await asyncio.wait_for(read_sized(reader), 5)
            assert body == b"".join(PARTS) + b"data: [DONE]\n\n"
            writer.write(HEAD.replace(b"/a", b"/whole"))
            third, body = await asyncio.wait_for(read_sized(reader), 5)
            assert body == WHOLE
            writer.write(HEAD.replace(b"/a", b"/large"))
            _, body = await asyncio.wait_for(read_sized(reader), 5)
            assert body == LARGE
            writer.write(HEAD.replace(b"/a", b"/b"))
            fourth, chunks = await asyncio.wait_for(read_chunked(reader), 5)
            assert chunks == [*ON_WIRE, b"data: [DONE]\n\n"]
            writer.close()
    # A whole answer is one choice: send_answer; without it (short_way=False) start, then end.
    assert taken == ([True] * 5 if short_way else [False] * 7)
    assert app.fast == [True, False, True]  # the sized answer's parts go hypercorn's way
    return [first, second, third, fourth]


@on_both_loops
async def test_a_head_takes_the_short_way_with_the_bytes_hypercorns_way_writes() -> None:
    """The connection stays in step for the body, the end and the next request, chunked or sized."""
    short = await four_answers(short_way=True)
    ordinary = await four_answers(short_way=False)
    assert [undated(head) for head in short] == [undated(head) for head in ordinary]
    assert short[0].startswith(b"HTTP/1.1 200 \r\ncontent-type: text/event-stream\r\n")
    assert short[0].endswith(b"\r\nTransfer-Encoding: chunked\r\n\r\n") and b"\r\ndate: " in short[0]
    assert b"content-length: 49\r\n" in short[1] and b"Transfer-Encoding" not in short[1]
    assert short[2].startswith(b"HTTP/1.1 200 \r\ncontent-type: application/json\r\ncontent-length: 26\r\n")


@on_both_loops
async def test_heads_h11_would_treat_otherwise_take_hypercorns_way() -> None:
    """HTTP/1.0, HEAD, a client closing after this answer, a header h11 refuses as it stands."""
    app = App()
    with recording_heads() as taken:
        async with listening(app) as port:
            reader, writer = await ask(port, b"POST /a HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}")
            answer = await asyncio.wait_for(reader.read(), 5)
            assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"data: [DONE]\n\n")
            writer.close()
            reader, writer = await ask(port, b"HEAD /a HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200 ")
            writer.write(HEAD.replace(b"/a", b"/padded").replace(b"Host: x", b"Host: x\r\nConnection: close"))
            answer = await asyncio.wait_for(reader.read(), 5)  # the HEAD answer had no body; then EOF
            assert b"\r\nx-note: padded\r\n" in answer and b"connection: close" in answer.lower()
            writer.close()
            reader, writer = await ask(port, HEAD.replace(b"/a", b"/padded"))
            head, _ = await asyncio.wait_for(read_chunked(reader), 5)
            assert b"\r\nx-note: padded\r\n" in head
            writer.close()
    assert taken == [False, False, False, False]


def test_a_send_that_is_not_hypercorns_gets_no_short_way() -> None:
    async def collect(message: dict[str, Any]) -> None:
        pass

    assert asyncio.run(internals.send_head(collect, 200, [])) is False  # type: ignore[arg-type]


@on_both_loops
async def test_internals_not_as_tested_serve_hypercorns_own_way() -> None:
    """The start-up check failed (another hypercorn or h11): no short way is offered, the bytes are the same."""
    internals.usable.cache_clear()
    problems = internals.problems
    internals.problems = lambda: ["h11 0.99.0 is not the tested 0.16.x"]  # type: ignore[assignment]
    try:
        app = App()
        await two_streams_on_one_connection(app)
        assert app.fast == [False, False]
    finally:
        internals.problems = problems  # type: ignore[method-assign]
        internals.usable.cache_clear()
