"""One request's answer on its way to the client: what went out, and in which state.

Like hypercorn's HTTPStream, the state is explicit and a send it does not allow raises;
an answer begun and not ended is logged, like uvicorn's "ASGI callable returned without
completing response".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from enum import Enum, auto

from prometheus_client import Gauge
from starlette.types import Send

from ..http.asgi import ChunkSend, FastSend
from ..http.errors import GatewayError, Header
from ..records.record import RequestRecord

log = logging.getLogger("sluicegate")

JSON_HEADERS: tuple[Header, ...] = ((b"content-type", b"application/json"),)


class AnswerState(Enum):
    """Where one request's answer is, like hypercorn's ASGIHTTPState."""

    REQUEST = auto()  # nothing sent: an error can still have its own status
    RESPONSE = auto()  # http.response.start sent: body messages only, until the last one
    CLOSED = auto()  # the last body message sent
    CUT = auto()  # broken off on purpose without the last message, so the server closes the connection


# The per-chunk check reads module globals: an Enum member looked up on its class costs about
# 100 ns in Python 3.11, a global a few.
_REQUEST = AnswerState.REQUEST
_RESPONSE = AnswerState.RESPONSE
_CLOSED = AnswerState.CLOSED
_CUT = AnswerState.CUT
_EXPECTED = {
    _REQUEST: "http.response.start",
    _RESPONSE: "http.response.body",
    _CLOSED: "nothing more (the answer has ended)",
    _CUT: "nothing more (the answer was cut off)",
}
_UNFINISHED = {_REQUEST: "without an answer", _RESPONSE: "with its answer half-sent"}


class UnexpectedMessage(Exception):
    """A send the answer's state does not allow: a bug in the gateway, never the client's doing."""

    def __init__(self, state: AnswerState, got: str) -> None:
        super().__init__(f"Expected {_EXPECTED[state]}, but got {got}.")


class Exchange:
    """One client request's response side: what went out, and the record."""

    __slots__ = ("active_streams", "extra_headers", "fast", "record", "send", "state")

    def __init__(
        self,
        send: Send,
        record: RequestRecord,
        extra_headers: list[Header],
        active_streams: Gauge,
        *,
        fast: FastSend | None = None,
    ) -> None:
        """fast: the server's short ways out, where it offers them (scope["extensions"][asgi.FAST_SEND])."""
        self.send = send
        self.fast = fast
        self.record = record
        self.extra_headers = extra_headers
        self.active_streams = active_streams
        self.state = _REQUEST

    async def start(self, status: int, headers: Sequence[Header]) -> None:
        if self.state is not _REQUEST:
            raise UnexpectedMessage(self.state, "http.response.start")
        self.state = _RESPONSE
        self.record.status = status
        headers = [*headers, *self.extra_headers]
        if self.fast is None or not await self.fast.head(self.send, status, headers):
            await self.send({"type": "http.response.start", "status": status, "headers": headers})

    async def body(self, chunk: bytes) -> None:
        """A part of the answer, more to come."""
        if self.state is not _RESPONSE:
            raise UnexpectedMessage(self.state, "http.response.body")
        if self.record.first_byte_at is None and chunk:
            self.record.first_byte_at = time.perf_counter()
        await self.send({"type": "http.response.body", "body": chunk, "more_body": True})

    def body_sender(self) -> ChunkSend:
        """For a stream's loop: each part straight to the socket where the server allows (FastSend.chunks).

        The loop owns the answer from start() until it calls end(), so the state
        stays RESPONSE throughout; it sends only non-empty parts with more to come.
        """
        if self.state is not _RESPONSE:
            raise UnexpectedMessage(self.state, "a stream of http.response.body")
        fast = self.fast.chunks(self.send) if self.fast is not None else None
        return fast or self._send_part

    async def _send_part(self, chunk: bytes) -> None:
        await self.send({"type": "http.response.body", "body": chunk, "more_body": True})

    async def end(self, chunk: bytes) -> None:
        """The last part of the answer."""
        if self.state is not _RESPONSE:
            raise UnexpectedMessage(self.state, "the last http.response.body")
        self.state = _CLOSED
        if self.record.first_byte_at is None and chunk:
            self.record.first_byte_at = time.perf_counter()
        await self.send({"type": "http.response.body", "body": chunk, "more_body": False})

    def cut(self) -> None:
        """End a started answer on purpose without its last message.

        The server then closes the connection, so the client sees the answer cut short, not whole.
        """
        if self.state is not _RESPONSE:
            raise UnexpectedMessage(self.state, "a cut")
        self.state = _CUT

    async def respond(self, status: int, headers: Sequence[Header], body: bytes) -> None:
        """A whole answer of known length: one write where the server allows (FastSend.answer)."""
        if self.state is not _REQUEST:
            raise UnexpectedMessage(self.state, "http.response.start")
        sized = [*headers, (b"content-length", str(len(body)).encode())]
        if self.fast is not None and await self.fast.answer(self.send, status, [*sized, *self.extra_headers], body):
            self.state = _CLOSED
            self.record.status = status
            if body and self.record.first_byte_at is None:
                self.record.first_byte_at = time.perf_counter()
            return
        await self.start(status, sized)
        await self.end(body)

    async def error(self, err: GatewayError) -> None:
        self.record.error = err.code
        body = err.body(self.record.request_id)
        await self.respond(err.status, [*JSON_HEADERS, *err.headers], body)

    def check_ended(self) -> None:
        """At the request's end: an answer not ended is a bug of ours, and its client saw a cut or a bare 500.

        A client that left is no such case: its answer had nowhere to go.
        """
        state = self.state
        if (state is _RESPONSE or state is _REQUEST) and not self.record.client_disconnected:
            log.warning("request %s ended %s", self.record.request_id, _UNFINISHED[state])
