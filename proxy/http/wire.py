"""An answer's head as HTTP/1.1 puts it on the wire, byte for byte as h11 writes it: the checks a header
line must pass, the framing h11 adds, hypercorn's date line. For the short ways in internals.py."""

from __future__ import annotations

import re
import time
from wsgiref.handlers import format_date_time

# A head's header lines as h11 would let them out: a token, ": ", a value without CR, LF,
# NUL or other controls and without space at either end.
HEADER_LINES = re.compile(
    rb"(?:[-!#$%&'*+.^_`|~0-9A-Za-z]+: (?:[\x21-\x7e\x80-\xff](?:[\t\x20-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?\r\n)*"
)
# Names whose meaning h11 acts on beyond framing a body of known or unknown length: hypercorn's way.
FRAMING_NAMES = frozenset({b"connection", b"transfer-encoding"})
CHUNKED = (b"Transfer-Encoding", b"chunked")  # as h11 adds it, after the others
NO_BODY = frozenset({204, 304})
JOIN_UP_TO = 64 * 1024  # a whole answer's body up to this size goes out in one write with its head


class Date:
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
