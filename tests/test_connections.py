"""The short way out for a stream's chunks (connections.chunk_sender), under hypercorn's own connection in-process.

A small ASGI app stands in for the gateway so that each case can choose its answer's
framing; the client is a raw socket, so the bytes on the wire are what is checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

from hypercorn.config import Config
from hypercorn.utils import wrap_app

from proxy.connections import Listener, chunk_sender
from proxy.settings import ServerSettings

PARTS = (b"data: one\n\n", b"data: two\n\n", b"data: three\n\n")


class App:
    """Answers each request with PARTS, sent through chunk_sender where it offers itself."""

    def __init__(self, parts: tuple[bytes, ...] = PARTS) -> None:
        self.parts = parts
        self.fast: list[bool] = []  # per request: did chunk_sender offer the short way
        self.nodelay: list[int] = []  # per request: TCP_NODELAY of the client's socket
        self.sent = 0  # parts sent so far, over all requests
        self.finished = asyncio.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        headers = [(b"content-type", b"text/event-stream")]
        if scope["path"] == "/sized":
            headers.append((b"content-length", str(sum(map(len, self.parts))).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        fast = chunk_sender(send)
        self.fast.append(fast is not None)
        if fast is not None:
            writer = send.__self__.send.__self__.send.__self__.writer  # the stream's protocol's connection
            self.nodelay.append(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        for part in self.parts:
            if fast is not None:
                await fast(part)
            else:
                await send({"type": "http.response.body", "body": part, "more_body": True})
            self.sent += 1
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        self.finished.set()


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


async def test_a_chunked_answer_takes_the_short_way_and_the_connection_serves_the_next_request() -> None:
    app = App()
    async with listening(app) as port:
        reader, writer = await ask(port, b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        head, chunks = await asyncio.wait_for(read_chunked(reader), 5)
        assert b"transfer-encoding: chunked" in head.lower()
        assert chunks == list(PARTS)
        # h11 and hypercorn never saw those parts: the keep-alive connection must still be in step.
        writer.write(b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        _, chunks = await asyncio.wait_for(read_chunked(reader), 5)
        assert chunks == list(PARTS)
        writer.close()
    assert app.fast == [True, True]
    # Set by the listener on every event loop (this one is asyncio's, which leaves it off): each
    # chunk goes out at once, not after the client's ACK of the one before.
    assert all(app.nodelay) and app.nodelay


async def test_an_http10_client_a_sized_answer_and_a_test_send_take_the_ordinary_way() -> None:
    app = App()
    async with listening(app) as port:
        reader, writer = await ask(port, b"POST /a HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}")
        answer = await asyncio.wait_for(reader.read(), 5)  # HTTP/1.0: no chunks, the close ends it
        assert answer.endswith(b"\r\n\r\n" + b"".join(PARTS))
        writer.close()
        reader, writer = await ask(port, b"POST /sized HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        body = await asyncio.wait_for(reader.readexactly(sum(map(len, PARTS))), 5)
        assert b"content-length" in head.lower()
        assert body == b"".join(PARTS)
        writer.close()
    assert app.fast == [False, False]

    async def collect(message: dict[str, Any]) -> None:
        pass

    assert chunk_sender(collect) is None  # type: ignore[arg-type]


async def test_a_client_that_does_not_read_holds_the_stream_back() -> None:
    """Flow control as hypercorn's: what waits for a slow client is bounded, not the whole stream."""
    part = b"x" * 65536
    app = App((part,) * 400)  # 25 MiB
    async with listening(app) as port:
        rcvbuf = 4096
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            writer.write(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
            await asyncio.sleep(1.0)
            held_back = app.sent
            assert held_back < 100, f"{held_back} parts of 64 KiB sent to a client that read nothing"
            _, chunks = await asyncio.wait_for(read_chunked(reader), 30)
            assert chunks == [part] * 400
        finally:
            writer.transport.abort()  # or the server would wait on what it holds for this client
    assert app.fast == [True]


async def test_a_client_gone_mid_stream_ends_the_app_without_an_error() -> None:
    part = b"x" * 65536
    app = App((part,) * 400)
    async with listening(app) as port:
        reader, writer = await ask(port, b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        await reader.readexactly(65536)
        writer.transport.abort()
        # hypercorn's way on a broken socket: the parts still sent go nowhere, the app runs to its end.
        await asyncio.wait_for(app.finished.wait(), 10)
    assert app.fast == [True]
