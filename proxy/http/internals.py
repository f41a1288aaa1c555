"""Every use of hypercorn's and h11's private parts, in one module, behind one check at start-up.

The gateway reaches into both servers' internals for four things: the error envelope for a head
h11 refuses (an override of H11Protocol._send_error_response), a deadline for a request head
apart from the keep-alive wait (overrides of TCPServer._read_data and _idle_timeout), and the
short ways out for a stream's chunks, an answer's head and a whole small answer (h11's state
machine and writer driven directly). `problems()` checks, once, that the installed versions are
the tested ones and that every private name used here is present. If not, the listener serves
hypercorn's own way (`usable()` is False), says so once at start-up, and the app is offered no
short way: the answer goes out as ASGI messages.

The listener offers the short ways to the app in its ASGI scope (`scope["extensions"][FAST_SEND]`),
as servers offer `http.response.zerocopysend`: the answer's state machine (request/exchange.py)
never imports this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.metadata
import inspect
import logging
import secrets
import time
from collections.abc import Coroutine, Sequence
from typing import Any, Protocol

import h11
from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.asyncio.worker_context import WorkerContext
from hypercorn.config import Config
from hypercorn.events import Closed
from hypercorn.protocol.events import StreamClosed
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.http_stream import ASGIHTTPState, HTTPStream
from hypercorn.typing import AppWrapper, LifespanState
from starlette.types import Send

from .asgi import ChunkSend
from .errors import MALFORMED_HEAD, REFUSED_BY_PARSER, InvalidRequest, error_body
from .wire import CHUNKED, FRAMING_NAMES, HEADER_LINES, JOIN_UP_TO, NO_BODY, Date

try:  # h11's own module, not its public API
    from h11._writers import ChunkedWriter
except ImportError:  # pragma: no cover - problems() names it
    ChunkedWriter = None  # type: ignore[assignment,misc]

log = logging.getLogger("sluicegate")


class Listening(Protocol):
    """What a connection takes from its listener (connections.Listener)."""

    app: AppWrapper
    config: Config
    context: WorkerContext
    state: LifespanState
    header_timeout_s: float


# The releases these internals were read from and are tested with (pyproject.toml pins the same).
TESTED = (("hypercorn", "0.18."), ("h11", "0.16."))
# Private names used below, by owner: present as class attributes in the tested releases.
PRIVATE_NAMES: tuple[tuple[type, str], ...] = (
    (H11Protocol, "_send_error_response"),
    (H11Protocol, "_send_h11_event"),
    (TCPServer, "_read_data"),
    (TCPServer, "_idle_timeout"),
    (TCPServer, "_initiate_server_close"),
    (h11.Connection, "_process_event"),
)
# Set on each h11.Connection by its constructor.
H11_INSTANCE_NAMES = ("_cstate", "_request_method", "_writer")
# Read from hypercorn's objects: the config's (a Config()) and a stream's state names.
CONFIG_NAMES = ("alt_svc_headers", "include_date_header", "include_server_header", "keep_alive_max_requests")
STREAM_STATES = ("REQUEST", "RESPONSE", "CLOSED")


def problems() -> list[str]:
    """What differs from the tested hypercorn and h11: a version, a private name gone. Empty when none."""
    found = []
    for distribution, series in TESTED:
        version = importlib.metadata.version(distribution)
        if not version.startswith(series):
            found.append(f"{distribution} {version} is not the tested {series}x")
    for owner, name in PRIVATE_NAMES:
        if not callable(getattr(owner, name, None)):
            found.append(f"{owner.__module__}.{owner.__qualname__}.{name} is missing")
    method = getattr(H11Protocol, "_send_error_response", None)
    if method is not None and list(inspect.signature(method).parameters) != ["self", "status_code"]:
        found.append("H11Protocol._send_error_response no longer takes (self, status_code)")
    if ChunkedWriter is None:
        found.append("h11._writers.ChunkedWriter is missing")
    connection = h11.Connection(h11.SERVER)
    found += [f"h11.Connection has no {name}" for name in H11_INSTANCE_NAMES if not hasattr(connection, name)]
    if not hasattr(getattr(connection, "_cstate", None), "keep_alive"):
        found.append("h11.Connection._cstate has no keep_alive")
    config = Config()
    found += [f"hypercorn's Config has no {name}" for name in CONFIG_NAMES if not hasattr(config, name)]
    found += [f"ASGIHTTPState has no {name}" for name in STREAM_STATES if not hasattr(ASGIHTTPState, name)]
    return found


@functools.cache
def usable() -> bool:
    """Whether this module's ways may be taken: checked once per process, and said once if not."""
    found = problems()
    if found:
        log.warning(
            "serving hypercorn's own way (%s): heads h11 refuses get its bare answers, a slow request head "
            "shares the keep-alive timer, and answers go out as ASGI messages; pin hypercorn and h11 as "
            "pyproject.toml does",
            "; ".join(found),
        )
    return not found


class _EnvelopeH11Protocol(H11Protocol):
    """hypercorn's HTTP/1.1 protocol, answering a request its parser refuses in the gateway's error envelope."""

    async def _send_error_response(self, status_code: int) -> None:
        code, message = REFUSED_BY_PARSER.get(status_code, MALFORMED_HEAD)
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


class Connection(TCPServer):
    """hypercorn's connection, with a head deadline apart from the keep-alive wait.

    hypercorn runs `_idle_timeout` from accept and again after each response, and
    cancels it as soon as a request head has been parsed. Both methods overridden
    here are hypercorn 0.18's (pinned in pyproject.toml).
    """

    def __init__(
        self,
        listener: Listening,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        loop: asyncio.AbstractEventLoop,
        *,
        arrived: asyncio.Event,  # set by the reader as bytes arrive
    ) -> None:
        super().__init__(listener.app, loop, listener.config, listener.context, listener.state, reader, writer)
        self.arrived = arrived
        self.header_timeout_s = listener.header_timeout_s
        self.first = True

    async def _read_data(self) -> None:
        # hypercorn's run() builds the protocol and calls this next, before a byte is read: the one
        # point between the two, in a method already ours (a property over the attribute run()
        # assigns would catch the same moment with more machinery). The class is changed in place:
        # a protocol built anew would repeat ProtocolWrapper's construction and its choice of HTTP
        # version. A ProtocolWrapper without `protocol` fails here, on the first connection.
        protocol = self.protocol.protocol
        if type(protocol) is H11Protocol:
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
        or found[0].state is not ASGIHTTPState.RESPONSE
        or type(getattr(found[1].connection, "_writer", None)) is not ChunkedWriter
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
    found = _h11_stream(send)
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
        or status in NO_BODY
        or connection.writer.transport.is_closing()
    ):
        return None
    has_length = False
    for name, value in headers:
        lowered = name.lower()
        if lowered in FRAMING_NAMES:
            return None
        if lowered == b"content-length":
            if has_length or not value.isdigit():
                return None  # h11 would check or normalise it: hypercorn's way
            has_length = True
    if sized and not has_length:
        return None
    lines = b"".join([b"%s: %s\r\n" % header for header in headers])
    if HEADER_LINES.fullmatch(lines) is None:
        return None
    framed = list(headers) if has_length else [*headers, CHUNKED]
    try:
        event = h11.Response(status_code=status, headers=framed, _parsed=True)
    except h11.LocalProtocolError:
        return None  # a Content-Length h11 refuses: it says so on hypercorn's way
    if config.include_date_header:  # hypercorn's own headers, after the answer's
        lines += Date.now()
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
