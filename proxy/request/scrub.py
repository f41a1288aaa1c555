"""The provider's credential, scrubbed from everything of the provider's that goes back to the client.

A provider may quote the key it was sent: in an error body ("request rejected for key sk-..."), in an
error event inside a stream, in a debugging header. Whatever the status, the bytes are replaced and
the header dropped before the client sees them. Built once per provider (upstream.ProviderClient).

Looking for the key in every chunk would cost a tenth of what relaying the chunk does (CPython's
substring search walks the bytes one by one). So the key's rarest byte is looked for first, with
memchr: a chunk without it cannot hold the key; where it is found, only the key's place around it
is compared. A chunk that ends a line cannot end in the middle of the key either (a key has no
line break), so most chunks cost a memchr and a comparison or two.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

Header = tuple[bytes, bytes]

SCRUBBED = b"[provider credential removed]"
NEWLINE = 0x0A
MIN_SECRET_CHARS = 8  # shorter "keys" (tests' placeholders) would match ordinary text
# What answers are made of, to tell a key's rare bytes from its common ones: a stream's chunk and some prose.
_SAMPLE = (
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,"model":"gpt-4o-mini",'
    b'"choices":[{"index":0,"delta":{"content":"The quick brown fox jumps over the lazy dog, then rests."},'
    b'"finish_reason":null}],"usage":{"prompt_tokens":12,"completion_tokens":34,"total_tokens":46}}\n\n'
)
_FREQUENCY = Counter(_SAMPLE)


class Scrubber:
    """One provider's credential; none of it leaves in bodies, streams or headers."""

    __slots__ = ("common", "head", "rare", "rare_at", "search", "secret")

    def __init__(self, secret: str) -> None:
        self.secret = secret.encode()
        self.head = self.secret[:2]
        # The byte of the key least often seen in answers: where it is missing, so is the key. An int:
        # `int in bytes` is a memchr, while `bytes in bytes` costs five times as much even for one byte.
        self.rare = min(self.secret, key=lambda byte: _FREQUENCY[byte])
        self.rare_at = self.secret.index(self.rare)
        self.common = _FREQUENCY[self.rare] > 0
        # re's literal search walks bytes in fewer instructions than `bytes in bytes` (a fifth less here).
        self.search = re.compile(re.escape(self.secret)).search

    def within(self, data: bytes) -> bool:
        """Whether the key is in `data`: compared only where its rare byte is.

        For a key made only of bytes that answers are full of (a hex key: ids are hex too), the
        rare byte is everywhere, and a plain search is cheaper than a comparison at each.
        """
        rare, secret, offset = self.rare, self.secret, self.rare_at
        if self.common:
            return self.search(data) is not None
        at = data.find(rare)
        while at >= 0:
            if at >= offset and data.startswith(secret, at - offset):
                return True
            at = data.find(rare, at + 1)
        return False

    @classmethod
    def of(cls, secret: str | None) -> Scrubber | None:
        return cls(secret) if secret is not None and len(secret) >= MIN_SECRET_CHARS else None

    def whole(self, body: bytes) -> bytes:
        return body.replace(self.secret, SCRUBBED) if self.rare in body and self.within(body) else body

    def headers(self, headers: Sequence[Header]) -> list[Header]:
        rare = self.rare
        return [(name, value) for name, value in headers if rare not in value or not self.within(value)]

    def stream(self) -> StreamScrub:
        return StreamScrub(self)


class StreamScrub:
    """One answer's stream: the credential replaced, also when it arrives split over two chunks.

    A chunk that ends with the credential's first bytes keeps them back until the next chunk shows
    whether the credential follows (an SSE chunk ends with a blank line, so in practice only the
    middle of an event is ever held, and never for longer than the next read).

    The relay calls `feed` only for a chunk that `may_hold` the key (the common chunk, a whole
    event without the key's rare byte, needs no look): the test is written out there, in the
    loop over chunks, where a call would cost more than the test.
    """

    __slots__ = ("_scrubber", "held", "overlap", "rare", "within")

    def __init__(self, scrubber: Scrubber) -> None:
        self._scrubber = scrubber
        self.rare = scrubber.rare
        self.within = scrubber.within
        self.overlap = len(scrubber.secret) - 1  # what of one piece the next one's key may have begun in
        self.held = b""  # the end of the last chunk, kept back: it may be the key's beginning

    def may_hold(self, chunk: bytes) -> bool:
        """Whether `feed` could change this (non-empty) chunk; the relay's loop writes the same test inline."""
        return bool(self.held) or chunk[-1] != NEWLINE or (self.rare in chunk and self.within(chunk))

    def feed(self, chunk: bytes) -> bytes:
        scrubber = self._scrubber
        secret = scrubber.secret
        if self.held:
            chunk, self.held = self.held + chunk, b""
        if secret in chunk:
            chunk = chunk.replace(secret, SCRUBBED)
        size = len(chunk)
        start = max(size - len(secret) + 1, 0)
        # Where the chunk's end could be the credential's beginning: its first two bytes, or its first one last.
        at = chunk.find(scrubber.head, start)
        while at >= 0:
            if secret.startswith(chunk[at:]):
                self.held = chunk[at:]
                return chunk[:at]
            at = chunk.find(scrubber.head, at + 1)
        if size and chunk[-1] == secret[0]:
            self.held = chunk[-1:]
            return chunk[:-1]
        return chunk

    def flush(self) -> bytes:
        """At the stream's end: what was kept back was not the credential after all."""
        held, self.held = self.held, b""
        return held
