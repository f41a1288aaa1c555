"""Connections for hypercorn: a cap per worker, a deadline for each request head, a drain,
the error envelope for a head hypercorn's parser refuses, and a short way out for an
answer's head and a stream's chunks.

hypercorn's own worker_serve accepts without bound and runs one idle timer for an
idle keep-alive connection and a request head still arriving alike, so a client
trickling a header keeps its socket as long as nginx's pooled ones stay. Here the
accept loop stops at the cap (later connections wait in the kernel's listen queue,
where a worker with a free slot takes them) and each connection gets two timers.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import re
import resource
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Sequence
from typing import Any, SupportsIndex
from wsgiref.handlers import format_date_time

import h11
from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.asyncio.worker_context import WorkerContext
from hypercorn.config import Config
from hypercorn.events import Closed
from hypercorn.protocol.events import StreamClosed
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.http_stream import ASGIHTTPState, HTTPStream
from hypercorn.typing import AppWrapper, LifespanState
from starlette.types import Receive, Send

from ..config.settings import ServerSettings
from .errors import HeadersTooLarge, InvalidRequest, error_body

CHUNKED_WRITER: type | None
try:  # h11's own module, not its public API: without it, every chunk takes hypercorn's way
    from h11._writers import ChunkedWriter as CHUNKED_WRITER
except ImportError:  # pragma: no cover
    CHUNKED_WRITER = None
# h11's state machine without its writer and its header checks (the short way for a head, below).
H11_PROCESS_EVENT = hasattr(h11.Connection, "_process_event")

log = logging.getLogger("sluicegate")

AT_CAP_LOG_INTERVAL_S = 60.0
# A connection holds the client's socket and its provider's; the spare is for Redis, the event file, logs.
FDS_PER_CONNECTION = 2
FDS_SPARE = 64


class _Reader(asyncio.StreamReader):
    """Notes when bytes arrive, so an idle connection can tell that a request head has begun."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop=loop)
        self.arrived = asyncio.Event()

    def feed_data(self, data: Iterable[SupportsIndex]) -> None:
        super().feed_data(data)
        self.arrived.set()


# What a client gets for a request h11 refuses to parse, by the status h11 hints: hypercorn would
# answer that status with an empty body. Fixed texts: h11's own message may quote the bad line,
# and a malformed Authorization line would put its key in the answer.
_MALFORMED = (
    InvalidRequest.code,
    "The request is not valid HTTP/1.1: its request line, a header or its chunked framing is malformed.",
)
_REFUSED_BY_PARSER: dict[int, tuple[str, str]] = {
    400: _MALFORMED,
    431: (HeadersTooLarge.code, "The request head is too large to read; send fewer or shorter headers."),
    501: (
        "not_implemented",
        "The request's Transfer-Encoding is not supported: only one 'Transfer-Encoding: chunked' header is.",
    ),
}


class _EnvelopeH11Protocol(H11Protocol):
    """hypercorn's HTTP/1.1 protocol, answering a request its parser refuses in the gateway's error envelope."""

    async def _send_error_response(self, status_code: int) -> None:
        code, message = _REFUSED_BY_PARSER.get(status_code, _MALFORMED)
        request_id = "req_" + secrets.token_hex(12)
        body = error_body(message, InvalidRequest.type, code, request_id)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)),
            (b"connection", b"close"),
            (b"x-request-id", request_id.encode()),
            *self.config.response_headers("h11"),
        ]
        await self._send_h11_event(h11.Response(status_code=status_code, headers=headers))
        await self._send_h11_event(h11.Data(data=body))
        await self._send_h11_event(h11.EndOfMessage())


def _error_response_hook() -> bool:
    """Whether hypercorn answers a request its parser refuses through the method overridden above (0.18's
    H11Protocol._send_error_response(self, status_code)). Without it those answers stay hypercorn's own,
    bare: the listener says so once at start-up, and serves on."""
    method = getattr(H11Protocol, "_send_error_response", None)
    return method is not None and list(inspect.signature(method).parameters) == ["self", "status_code"]


ENVELOPE_FOR_REFUSED_HEADS = _error_response_hook()


class _Connection(TCPServer):
    """hypercorn's connection, with a head deadline apart from the keep-alive wait.

    hypercorn runs `_idle_timeout` from accept and again after each response, and
    cancels it as soon as a request head has been parsed. Both methods overridden
    here are hypercorn 0.18's (pinned in pyproject.toml).
    """

    def __init__(
        self, listener: Listener, reader: _Reader, writer: asyncio.StreamWriter, loop: asyncio.AbstractEventLoop
    ) -> None:
        super().__init__(listener.app, loop, listener.config, listener.context, listener.state, reader, writer)
        self.arrived = reader.arrived
        self.header_timeout_s = listener.header_timeout_s
        self.first = True

    async def _read_data(self) -> None:
        # hypercorn's run() builds the protocol and calls this next, before a byte is read: the one
        # point between the two, in a method already ours (a property over the attribute run()
        # assigns would catch the same moment with more machinery). The class is changed in place:
        # a protocol built anew would repeat ProtocolWrapper's construction and its choice of HTTP
        # version. A ProtocolWrapper without `protocol` fails here, on the first connection.
        protocol = self.protocol.protocol
        if ENVELOPE_FOR_REFUSED_HEADS and type(protocol) is H11Protocol:
            protocol.__class__ = _EnvelopeH11Protocol
        await super()._read_data()
        # The client is gone. hypercorn would keep the idle timer, and with it this task and
        # its socket (and here a connection slot), until the timer ran out.
        await self.idle_task.stop()

    def _idle_timeout(self) -> Coroutine[Any, Any, None]:
        # Called as hypercorn (re)starts the timer, which it may cancel before the coroutine
        # first runs (a head that came with the connection): so the state is taken here.
        first, self.first = self.first, False
        self.arrived.clear()
        return self._await_head(first)

    async def _await_head(self, first: bool) -> None:
        with contextlib.suppress(TimeoutError):
            if not first:
                # Keep-alive: an idle connection may wait this long for the next request to begin.
                async with asyncio.timeout(self.config.keep_alive_timeout):
                    await self.arrived.wait()
            # A head, once begun (on a new connection: once accepted), must be complete by then.
            async with asyncio.timeout(self.header_timeout_s):
                while not self.context.terminated.is_set():
                    self.arrived.clear()
                    await self.arrived.wait()
        await asyncio.shield(self._initiate_server_close())


class Listener:
    """Accepts for one worker, at most `max_connections` at a time, until told to stop."""

    def __init__(self, app: AppWrapper, config: Config, server: ServerSettings) -> None:
        self.app = app
        self.config = config
        self.state: LifespanState = {}
        self.context = WorkerContext(None)
        self.header_timeout_s = server.header_timeout_s
        self.backlog = server.backlog
        self.max_connections = server.max_connections
        self.slots = asyncio.Semaphore(server.max_connections)
        self.connections: dict[asyncio.Task[None], _Reader] = {}
        self._accepting: list[asyncio.Task[None]] = []
        self._sockets: list[socket.socket] = []
        self._warned_at = -AT_CAP_LOG_INTERVAL_S

    def start(self, sockets: list[socket.socket]) -> None:
        _raise_fd_limit(self.max_connections * FDS_PER_CONNECTION + FDS_SPARE)
        if not ENVELOPE_FOR_REFUSED_HEADS:
            log.warning(
                "this hypercorn has no H11Protocol._send_error_response(self, status_code): requests its "
                "parser refuses get its bare answers, not the error envelope (pin hypercorn as pyproject.toml does)"
            )
        for sock in sockets:
            sock.setblocking(False)
            sock.listen(self.backlog)
            self._sockets.append(sock)
            self._accepting.append(asyncio.create_task(self._accept(sock)))

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self.slots.locked():
                self._at_cap()
            await self.slots.acquire()
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:
                self.slots.release()
                # Out of file descriptors and the like: pause as asyncio's own server does, not spin.
                log.warning("accepting a connection failed (%s); retrying in 1s", exc)
                await asyncio.sleep(1.0)
                continue
            except BaseException:
                self.slots.release()
                raise
            reader = _Reader(loop)
            task = loop.create_task(self._serve(conn, reader))
            self.connections[task] = reader
            task.add_done_callback(self._done)

    def _at_cap(self) -> None:
        now = time.monotonic()
        if now - self._warned_at >= AT_CAP_LOG_INTERVAL_S:
            self._warned_at = now
            log.warning(
                "worker at [server] max_connections (%d): new connections wait in the listen queue",
                self.max_connections,
            )

    def _done(self, task: asyncio.Task[None]) -> None:
        del self.connections[task]
        self.slots.release()

    async def _serve(self, conn: socket.socket, reader: _Reader) -> None:
        loop = asyncio.get_running_loop()
        protocol = asyncio.StreamReaderProtocol(reader)
        try:
            transport, _ = await loop.connect_accepted_socket(lambda: protocol, conn)
        except OSError:
            conn.close()
            return
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            # uvloop sets it on an accepted socket, asyncio's own loop does not (its create_server
            # does): without it a chunk waits for the client's ACK of the one before, up to 40 ms.
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        await _Connection(self, reader, writer, loop)

    async def stop_accepting(self) -> None:
        """Close the listening sockets: from now on new connections are refused."""
        for task in self._accepting:
            task.cancel()
        # Closed only once no accept is pending on them.
        await asyncio.gather(*self._accepting, return_exceptions=True)
        for sock in self._sockets:
            sock.close()

    async def close(self, graceful_timeout_s: float) -> None:
        """Idle connections close now, busy ones after their response; what is left at the timeout is cut."""
        await self.context.terminated.set()
        for reader in self.connections.values():
            reader.arrived.set()
        tasks = set(self.connections)
        if not tasks:
            return
        _, cut = await asyncio.wait(tasks, timeout=graceful_timeout_s)
        for task in cut:
            task.cancel()
        # Cancelled requests still leave their event records on the way out.
        await asyncio.gather(*cut, return_exceptions=True)


@contextlib.asynccontextmanager
async def discarding_body(receive: Receive) -> AsyncIterator[None]:
    """For an answer sent before its request's body was read: meanwhile the body is taken and dropped.

    hypercorn 0.18 queues at most config.max_app_queue_size (10) messages for the app, and its
    reader waits for room; at the answer's end the stream queues one more (http.disconnect) and
    waits likewise. A client sending fast can fill the queue before the answer is out: with nobody
    taking from it, the answer's last send and hypercorn's reader then wait for each other for
    good, and the client has its answer on a connection that never closes, the worker a slot it
    never frees. Once the answer is out the stream is closed and hypercorn queues no more of it.
    """
    task = asyncio.create_task(_discard(receive))
    try:
        yield
    finally:
        task.cancel()


async def _discard(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            return


ChunkSend = Callable[[bytes], Awaitable[None]]


def chunk_sender(send: Send) -> ChunkSend | None:
    """A started HTTP/1.1 chunked answer's body parts, written by the gateway itself, or None.

    Each part of a stream costs hypercorn and h11 about a dozen Python calls on the
    way to the socket (the ASGI message, a Body event, h11's state machine and
    writer, a RawData event, the connection's lock): at 200 streams that was a third
    of the worker's time, and the socket write itself a sixth. A part in the middle
    of a chunked body changes no state in either, so it is framed here and written
    to the transport at once; start, end and every other message still go through
    hypercorn. None when `send` is not hypercorn 0.18's HTTP/1.1 stream of a chunked
    body (HTTP/2, an HTTP/1.0 client, a Content-Length answer, a test's send): the
    caller then sends ASGI messages as usual.
    """
    found = _h11_stream(send)
    if (
        found is None
        or CHUNKED_WRITER is None
        or found[0].state is not ASGIHTTPState.RESPONSE
        or type(getattr(found[1].connection, "_writer", None)) is not CHUNKED_WRITER
    ):
        return None
    return _ChunkSender(send, found[2]).send


def _h11_stream(send: Send) -> tuple[HTTPStream, H11Protocol, TCPServer] | None:
    """hypercorn 0.18's HTTP/1.1 stream behind an ASGI `send`, its protocol and connection, or None."""
    stream = getattr(send, "__self__", None)
    protocol = getattr(getattr(stream, "send", None), "__self__", None)
    connection = getattr(getattr(protocol, "send", None), "__self__", None)
    if isinstance(stream, HTTPStream) and isinstance(protocol, H11Protocol) and isinstance(connection, TCPServer):
        return stream, protocol, connection
    return None


# A head's header lines as h11 would let them out: a token, ": ", a value without CR, LF,
# NUL or other controls and without space at either end.
_HEADER_LINES = re.compile(
    rb"(?:[-!#$%&'*+.^_`|~0-9A-Za-z]+: (?:[\x21-\x7e\x80-\xff](?:[\t\x20-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?\r\n)*"
)
# Names whose meaning h11 acts on beyond framing a body of known or unknown length: hypercorn's way.
_FRAMING_NAMES = frozenset({b"connection", b"transfer-encoding"})
_CHUNKED = (b"Transfer-Encoding", b"chunked")  # as h11 adds it, after the others
_NO_BODY = frozenset({204, 304})
JOIN_UP_TO = 64 * 1024  # a whole answer's body up to this size goes out in one write with its head


class _Date:
    """hypercorn's date header, formatted once a second rather than for every answer."""

    second = -1
    line = b""

    @classmethod
    def now(cls) -> bytes:
        second = int(time.time())
        if second != cls.second:
            cls.line = b"date: " + format_date_time(second).encode("ascii") + b"\r\n"
            cls.second = second
        return cls.line


async def send_head(send: Send, status: int, headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """Write an answer's head on an HTTP/1.1 keep-alive connection of hypercorn 0.18, or return False.

    hypercorn and h11 check every header of a head three or four times (hypercorn's strip,
    h11's Response, then twice more as h11 adds Transfer-Encoding and builds the Response
    again): 60 µs for the dozen headers of a stream, twice the bare relay's head, at every
    request. Here the lines are built and checked once, with one regular expression for all
    of them; h11's state machine takes the same Response event (with the framing h11 would
    add, headers marked parsed) and hypercorn's stream the same state, so the body, the end
    and the next request on the connection go on as if hypercorn had sent the head. The
    bytes are the ones h11 writes. False, with nothing changed, for whatever h11 would treat
    otherwise or refuse: HTTP/1.0, HEAD, a connection closing after this answer, a header
    about connection or framing, 204 and 304, a line h11's checks would refuse (hypercorn's
    way then raises as before), a closing socket.
    """
    started = _head(send, status, headers)
    if started is None:
        return False
    (_, _, connection), head = started
    await _write(connection, head)
    return True


async def send_answer(send: Send, status: int, headers: Sequence[tuple[bytes, bytes]], body: bytes) -> bool:
    """A whole answer of known length (its headers hold its Content-Length) in one write, or False.

    hypercorn's way writes the head, the body and the body's empty end one by one, each
    through its connection's lock and a drain. Here h11's state machine and writer take
    the body and its end as there (so they count the length as always), the bytes go out
    together, and the stream closes as hypercorn closes it: the access log, then the
    connection ready for the next request. False, with nothing changed, where send_head
    would say so or the headers hold no Content-Length.
    """
    started = _head(send, status, headers, sized=True)
    if started is None:
        return False
    (stream, protocol, connection), head = started
    conn = protocol.connection
    if body:
        conn.send(h11.Data(data=body))  # checks the length against the head's; the bytes are ours
    conn.send(h11.EndOfMessage())
    # Together when small, in one send; a large body is not copied just to join its head.
    await _write(connection, *((head + body,) if len(body) <= JOIN_UP_TO else (head, body)))
    stream.state = ASGIHTTPState.CLOSED
    await stream.config.log.access(stream.scope, stream.response, time.time() - stream.start_time)
    await stream.send(StreamClosed(stream_id=stream.stream_id))
    return True


def _head(
    send: Send, status: int, headers: Sequence[tuple[bytes, bytes]], sized: bool = False
) -> tuple[tuple[HTTPStream, H11Protocol, TCPServer], bytes] | None:
    """hypercorn's stream behind `send` and the head's bytes, with h11 and the stream moved on as if
    hypercorn had sent it; None, with nothing changed, where it may not."""
    found = _h11_stream(send) if H11_PROCESS_EVENT else None
    if found is None:
        return None
    stream, protocol, connection = found
    conn = protocol.connection
    config = protocol.config
    if (
        type(conn) is not h11.Connection
        or stream.state is not ASGIHTTPState.REQUEST
        or conn.our_state is not h11.SEND_RESPONSE
        or conn.their_http_version != b"1.1"
        or conn._request_method == b"HEAD"
        or not conn._cstate.keep_alive
        or protocol.keep_alive_requests >= config.keep_alive_max_requests
        or config.alt_svc_headers
        or getattr(config, "_quic_addresses", None)  # hypercorn then adds alt-svc headers itself
        or status < 200
        or status in _NO_BODY
        or connection.writer.transport.is_closing()
    ):
        return None
    has_length = False
    for name, value in headers:
        lowered = name.lower()
        if lowered in _FRAMING_NAMES:
            return None
        if lowered == b"content-length":
            if has_length or not value.isdigit():
                return None  # h11 would check or normalise it: hypercorn's way
            has_length = True
    if sized and not has_length:
        return None
    lines = b"".join([b"%s: %s\r\n" % header for header in headers])
    if _HEADER_LINES.fullmatch(lines) is None:
        return None
    framed = list(headers) if has_length else [*headers, _CHUNKED]
    try:
        event = h11.Response(status_code=status, headers=framed, _parsed=True)
    except h11.LocalProtocolError:
        return None  # a Content-Length h11 refuses: it says so on hypercorn's way
    if config.include_date_header:  # hypercorn's own headers, after the answer's
        lines += _Date.now()
    if config.include_server_header:
        lines += b"server: hypercorn-h11\r\n"
    if not has_length:
        lines += b"Transfer-Encoding: chunked\r\n"
    conn._process_event(h11.SERVER, event)  # SEND_BODY, with the writer for this framing
    stream.response = {"type": "http.response.start", "status": status, "headers": list(headers)}
    stream.state = ASGIHTTPState.RESPONSE
    return found, b"HTTP/1.1 %d \r\n%b\r\n" % (status, lines)


async def _write(connection: TCPServer, *parts: bytes) -> None:
    """As hypercorn's connection writes: at once, then a drain while the client lags."""
    transport = connection.writer.transport
    for part in parts:
        transport.write(part)
    if transport.get_write_buffer_size():
        await _drain(connection)


async def _drain(connection: TCPServer) -> None:
    """The client reads slower than the answer comes: wait as hypercorn would (asyncio's flow
    control), so what waits for it stays bounded by the transport's high-water mark."""
    try:
        await connection.writer.drain()
    except (OSError, RuntimeError):
        # A reset, or a client gone without one (ETIMEDOUT): the client's loss, never the provider's.
        await connection.protocol.handle(Closed())


class _ChunkSender:
    __slots__ = ("connection", "send_message", "transport")

    def __init__(self, send: Send, connection: TCPServer) -> None:
        self.send_message = send
        self.connection = connection
        self.transport = connection.writer.transport

    async def send(self, chunk: bytes) -> None:
        """One part, more to come. A closing socket takes hypercorn's own way, which knows what to do."""
        if not chunk:
            return  # framed, an empty part would be the body's end (h11 skips them too)
        transport = self.transport
        # hypercorn writes nothing else while the body is ours (its send lock is never held here),
        # and each part is one transport.write: parts cannot interleave with other bytes.
        if transport.is_closing():
            await self.send_message({"type": "http.response.body", "body": chunk, "more_body": True})
            return
        transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        if transport.get_write_buffer_size():
            await _drain(self.connection)


def _raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        soft = wanted
    if soft < needed:
        log.warning(
            "open file limit %d is below the %d that [server] max_connections needs; raise LimitNOFILE",
            soft,
            needed,
        )
