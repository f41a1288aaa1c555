"""The provider's credential scrubbed from bodies, streams and headers (scrub.py)."""

from __future__ import annotations

import pytest

from proxy.request.scrub import SCRUBBED, Scrubber

KEY = "sk-provider-0123456789abcdefghijklmnop"
# A DeepSeek-style key (hex: every byte of it is common in answers) and an OpenAI-style one (with capitals).
KEYS = ["sk-0f3a9c2b7e1d4a5b8c6d0e2f4a6b8c0d", "sk-proj-Q7vRt2XpLm9KzN4wYb8HcJ3sFd6Ga1Ue", KEY]


def event(key: str) -> bytes:
    return b'data: {"error":{"message":"upstream broke for key ' + key.encode() + b'","code":"boom"}}\n\n'


def test_no_scrubber_for_a_missing_or_placeholder_key() -> None:
    assert Scrubber.of(None) is None
    assert Scrubber.of("x") is None
    assert Scrubber.of(KEY) is not None


def test_a_whole_body_and_headers() -> None:
    scrubber = Scrubber(KEY)
    assert scrubber.whole(b'{"error":"bad key ' + KEY.encode() + b'"}') == b'{"error":"bad key ' + SCRUBBED + b'"}'
    body = b'{"ok":true}'
    assert scrubber.whole(body) is body
    headers = [(b"x-debug", b"key=" + KEY.encode()), (b"x-trace", b"ok"), (b"authorization", b"Bearer " + KEY.encode())]
    assert scrubber.headers(headers) == [(b"x-trace", b"ok")]


@pytest.mark.parametrize("key", KEYS)
def test_a_stream_split_anywhere_never_lets_the_key_out(key: str) -> None:
    """Chunks go through feed() only where may_hold() says so, as the relay's loop does."""
    stream = b'data: {"id":"chatcmpl-9f8e","choices":[]}\n\n' + event(key) + b"data: [DONE]\n\n"
    expected = stream.replace(key.encode(), SCRUBBED)
    for i in range(len(stream) + 1):
        for j in range(i, len(stream) + 1, 7):
            scrub = Scrubber(key).stream()
            parts = [scrub.feed(p) if p and scrub.may_hold(p) else p for p in (stream[:i], stream[i:j], stream[j:])]
            out = b"".join(parts) + scrub.flush()
            assert out == expected, (i, j)
            assert all(key[: len(key) // 2].encode() not in p for p in parts)


@pytest.mark.parametrize("key", KEYS)
def test_a_whole_event_without_the_key_needs_no_look(key: str) -> None:
    scrub = Scrubber(key).stream()
    chunk = b'data: {"id":"chatcmpl-1","choices":[{"delta":{"content":"hello"}}]}\n\n'
    assert not scrub.may_hold(chunk)
    assert scrub.may_hold(event(key))
    assert scrub.may_hold(chunk[:-3])  # the middle of an event: its end could be the key's beginning


def test_a_chunk_is_held_back_only_where_the_key_could_begin() -> None:
    scrub = Scrubber(KEY).stream()
    whole = b'data: {"choices":[{"delta":{"content":"ask"}}]}\n\n'
    assert scrub.feed(whole) is whole  # SSE chunks end with a blank line: nothing to hold
    assert scrub.feed(b"key sk-prov") == b"key "
    assert scrub.feed(b"ince") == b"sk-province"  # not the key after all
    assert scrub.feed(b"ends with s") == b"ends with "
    assert scrub.flush() == b"s"
