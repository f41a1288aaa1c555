"""What the server offers the app beyond ASGI's messages: the short ways out, as a scope extension.

hypercorn offers nothing of the kind; our listener does (connections.Offering, over http/internals.py), as servers offer
`http.response.zerocopysend`. An app finds it in `scope["extensions"][FAST_SEND]`, or not there
(another server, an in-process test, internals not as tested): then it sends ASGI messages.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from starlette.types import Send

FAST_SEND = "sluicegate.fast_send"

ChunkSend = Callable[[bytes], Awaitable[None]]


class FastSend(Protocol):
    def chunks(self, send: Send) -> ChunkSend | None:
        """A started chunked answer's body parts, written straight to the socket; None where it may not."""

    async def head(self, send: Send, status: int, headers: Sequence[tuple[bytes, bytes]]) -> bool:
        """The answer's head written at once; False, with nothing sent, where it may not."""

    async def answer(self, send: Send, status: int, headers: Sequence[tuple[bytes, bytes]], body: bytes) -> bool:
        """A whole answer of known length in one write; False, with nothing sent, where it may not."""
