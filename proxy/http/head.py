"""The request head as the gateway reads it: the few headers it uses, its limits, the request id.

One pass over the headers, before the route is known: what is wrong with the head is found here
and answered later (after the body is read, so the connection outlives the answer).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from ..redact import KEY_LIKE
from .errors import GatewayError, Header, HeadersTooLarge, InvalidRequest

WANTED_HEADERS = frozenset(
    {b"authorization", b"x-api-key", b"x-request-id", b"x-ai-provider", b"content-length", b"transfer-encoding"}
)
CREDENTIAL_HEADERS = {b"authorization": "Authorization", b"x-api-key": "X-API-Key"}
# Lines counted as they go on the wire ("name: value\r\n"). Below what providers' servers take
# (aiohttp: 128 headers, 8190 bytes a field; nginx: 8 KiB a line, 4 x 8 KiB in all), so what passes
# here can be forwarded; hypercorn's own parser limit sits above these (server.py).
MAX_HEADERS = 100
MAX_HEADER_LINE_BYTES = 8 * 1024
MAX_HEAD_BYTES = 32 * 1024
SANE_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:@/+=-]{1,128}$")
CLOSE: tuple[Header, ...] = ((b"connection", b"close"),)


@dataclass(slots=True)
class Head:
    wanted: dict[bytes, bytes]  # the headers of WANTED_HEADERS, by lower-case name
    repeated: bytes | None  # a credential header sent twice with different values
    refused: GatewayError | None  # what is wrong with the head, if anything
    request_id: str  # the client's X-Request-ID if it is sane, else a new one


def read_head(headers: Iterable[tuple[bytes, bytes]]) -> Head:
    wanted: dict[bytes, bytes] = {}
    repeated: bytes | None = None
    count = head_bytes = 0
    too_long: bytes | None = None
    for name, value in headers:
        count += 1
        line = len(name) + len(value) + 4  # with ': ' and CRLF
        head_bytes += line
        if line > MAX_HEADER_LINE_BYTES:
            too_long = name
        if name in WANTED_HEADERS:
            # A second, different credential must not be settled by header order.
            if name in CREDENTIAL_HEADERS and wanted.get(name, value) != value:
                repeated = name
            wanted[name] = value
    given_id = wanted.get(b"x-request-id")
    # An id is echoed everywhere (headers, errors, events, upstream): never one that holds a key.
    sane = given_id is not None and SANE_REQUEST_ID.match(given_id) and not KEY_LIKE.search(given_id.decode())
    request_id = given_id.decode() if sane and given_id else "req_" + secrets.token_hex(12)
    return Head(wanted, repeated, _refusal(count, head_bytes, too_long, wanted), request_id)


def _refusal(count: int, head_bytes: int, too_long: bytes | None, wanted: dict[bytes, bytes]) -> GatewayError | None:
    """What is wrong with the request head, if anything."""
    if count > MAX_HEADERS:
        return HeadersTooLarge(f"The request has {count} headers; this gateway takes at most {MAX_HEADERS}.")
    if too_long is not None:
        name = too_long[:64].decode("latin-1")
        return HeadersTooLarge(f"The header {name!r} is over {MAX_HEADER_LINE_BYTES} bytes, the most for one header.")
    if head_bytes > MAX_HEAD_BYTES:
        return HeadersTooLarge(
            f"The request headers are {head_bytes} bytes; this gateway takes at most {MAX_HEAD_BYTES}."
        )
    if b"transfer-encoding" in wanted and b"content-length" in wanted:
        # Two framings: a proxy in front may have read this request differently (request smuggling).
        return InvalidRequest("The request has both Transfer-Encoding and Content-Length.", headers=CLOSE)
    return None
