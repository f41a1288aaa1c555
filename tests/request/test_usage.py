from __future__ import annotations

import gzip
import subprocess
import sys
import textwrap
import zlib
from collections.abc import Callable

import pytest

from proxy.request import usage as usage_module
from proxy.request.usage import StreamUsageScanner, Usage, usage_from_body

CONTENT = (
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","model":"deepseek-chat",'
    b'"choices":[{"index":0,"delta":{"content":"Hello"},"finish_reason":null}]}\n\n'
)
FINISH = (
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","model":"deepseek-chat",'
    b'"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
)
USAGE_ONLY = (
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","model":"deepseek-chat","choices":[],'
    b'"usage":{"prompt_tokens":9,"completion_tokens":12,"total_tokens":21}}\n\n'
)
DONE = b"data: [DONE]\n\n"
USAGE = Usage(prompt_tokens=9, completion_tokens=12, total_tokens=21)


def feed_all(scanner: StreamUsageScanner, chunks: list[bytes]) -> list[bytes]:
    return [scanner.feed(chunk) for chunk in chunks]


def crlf(event: bytes) -> bytes:
    return event.replace(b"\n", b"\r\n")


LINE_ENDS = [pytest.param(lambda e: e, id="lf"), pytest.param(crlf, id="crlf")]


@pytest.mark.parametrize("strip", [True, False])
def test_events_without_usage_pass_through_as_the_same_object(strip: bool) -> None:
    scanner = StreamUsageScanner(strip_usage_event=strip)
    for chunk in (CONTENT, CONTENT[:10], CONTENT[10:], CONTENT + CONTENT[:10], CONTENT[10:] + FINISH):
        assert scanner.feed(chunk) is chunk
    assert scanner.usage is None


def test_after_the_finish_event_an_unfinished_event_is_held_only_when_stripping() -> None:
    keep = StreamUsageScanner(strip_usage_event=False)
    assert feed_all(keep, [FINISH, DONE[:7], DONE[7:]]) == [FINISH, DONE[:7], DONE[7:]]
    strip = StreamUsageScanner(strip_usage_event=True)
    assert feed_all(strip, [FINISH, DONE[:7], DONE[7:]]) == [FINISH, b"", DONE]
    assert strip.feed(DONE[:5]) == b""
    assert strip.flush() == DONE[:5]
    assert strip.flush() == b""


def test_mid_event_says_when_forwarded_bytes_lack_their_event_end() -> None:
    scanner = StreamUsageScanner(strip_usage_event=True)
    scanner.feed(CONTENT[:20])
    assert scanner.mid_event
    scanner.feed(CONTENT[20:])
    assert not scanner.mid_event


def test_whole_usage_event_is_cut_when_stripping() -> None:
    scanner = StreamUsageScanner(strip_usage_event=True)
    out = feed_all(scanner, [CONTENT, FINISH, USAGE_ONLY, DONE])
    assert out == [CONTENT, FINISH, b"", DONE]
    assert scanner.usage == USAGE


def test_whole_usage_event_is_kept_when_not_stripping() -> None:
    scanner = StreamUsageScanner(strip_usage_event=False)
    chunks = [CONTENT, FINISH, USAGE_ONLY, DONE]
    out = feed_all(scanner, chunks)
    assert out == chunks
    assert all(o is c for o, c in zip(out, chunks, strict=True))
    assert scanner.usage == USAGE


@pytest.mark.parametrize(
    ("chunk", "forwarded"),
    [
        (FINISH + USAGE_ONLY + DONE, FINISH + DONE),
        (USAGE_ONLY + DONE, DONE),
        (CONTENT + USAGE_ONLY, CONTENT),
        (USAGE_ONLY, b""),
        # An unfinished next event after the usage event is forwarded at once.
        (USAGE_ONLY + DONE[:7], DONE[:7]),
    ],
)
def test_usage_event_is_cut_out_of_the_middle_of_a_chunk(chunk: bytes, forwarded: bytes) -> None:
    scanner = StreamUsageScanner(strip_usage_event=True)
    assert scanner.feed(chunk) == forwarded
    assert scanner.usage == USAGE


def test_usage_event_after_a_carried_tail_is_cut() -> None:
    scanner = StreamUsageScanner(strip_usage_event=True)
    first, second = CONTENT[:50], CONTENT[50:] + USAGE_ONLY + DONE
    assert scanner.feed(first) is first
    assert scanner.feed(second) == CONTENT[50:] + DONE
    assert scanner.usage == USAGE


@pytest.mark.parametrize("line_end", LINE_ENDS)
@pytest.mark.parametrize("strip", [True, False])
def test_every_split_of_a_stream(strip: bool, line_end: Callable[[bytes], bytes]) -> None:
    content, finish, usage_only, done = (line_end(e) for e in (CONTENT, FINISH, USAGE_ONLY, DONE))
    stream = content + finish + usage_only + done
    for i in range(len(stream) + 1):
        scanner = StreamUsageScanner(strip_usage_event=strip)
        first, second = stream[:i], stream[i:]
        out_first = scanner.feed(first)
        out_second = scanner.feed(second)
        assert scanner.usage == USAGE, i
        assert out_first + out_second + scanner.flush() == (content + finish + done if strip else stream), i
        if not strip or i <= len(content + finish):
            # Content is never held: until the finish event everything goes out as it comes.
            assert out_first == first, i


def oversized_event(index: int) -> bytes:
    """A content event longer than the scanner ever holds (a long tool call, one choice of several)."""
    pad = b"x" * (2 * usage_module.MAX_TAIL_BYTES)
    return b'data: {"choices":[{"index":%d,"delta":{"content":"%s"},"finish_reason":null}]}\n\n' % (index, pad)


@pytest.mark.parametrize("size", [65536, 100_000, 1 << 20])
@pytest.mark.parametrize("strip", [True, False])
def test_an_oversized_event_after_the_finish_event_goes_out_whole(strip: bool, size: int) -> None:
    # With n > 1 choices, one choice finishes while another still streams.
    stream = CONTENT + FINISH + oversized_event(1) + FINISH + USAGE_ONLY + DONE
    scanner = StreamUsageScanner(strip_usage_event=strip)
    out = feed_all(scanner, [stream[i : i + size] for i in range(0, len(stream), size)])
    assert b"".join(out) + scanner.flush() == (stream.replace(USAGE_ONLY, b"") if strip else stream)
    assert scanner.usage == USAGE


@pytest.mark.parametrize("strip", [True, False])
def test_mid_event_holds_inside_an_event_too_large_to_keep(strip: bool) -> None:
    # An error event added now must start on a fresh line, or it is glued onto the cut one.
    event = oversized_event(0)
    scanner = StreamUsageScanner(strip_usage_event=strip)
    half = len(event) // 2
    assert b"".join(feed_all(scanner, [FINISH, event[:half], event[half:-10]])) == FINISH + event[:-10]
    assert scanner.mid_event
    assert scanner.feed(event[-10:]) == event[-10:]
    assert not scanner.mid_event


@pytest.mark.parametrize("line_end", LINE_ENDS)
def test_every_three_chunk_split_never_shows_the_usage_event(line_end: Callable[[bytes], bytes]) -> None:
    content, finish, usage_only, done = (line_end(e) for e in (CONTENT, FINISH, USAGE_ONLY, DONE))
    stream = content + finish + usage_only + done
    for i in range(len(stream) + 1):
        for j in range(i, len(stream) + 1):
            scanner = StreamUsageScanner(strip_usage_event=True)
            out = feed_all(scanner, [stream[:i], stream[i:j], stream[j:]])
            assert scanner.usage == USAGE, (i, j)
            assert b"".join(out) + scanner.flush() == content + finish + done, (i, j)


def test_usage_event_split_before_any_finish_event_still_counts() -> None:
    # No finish_reason went by (an unusual upstream): what already went out cannot be withdrawn.
    scanner = StreamUsageScanner(strip_usage_event=True)
    stream = CONTENT + USAGE_ONLY
    split = len(CONTENT) + 20
    assert scanner.feed(stream[:split]) == stream[:split]
    assert scanner.feed(stream[split:]) == stream[split:]
    assert scanner.usage == USAGE


def test_usage_on_a_content_chunk_is_read_but_never_cut() -> None:
    # DeepSeek-style: the last content chunk carries the usage object.
    last = (
        b'data: {"id":"1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":""},'
        b'"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}\n\n'
    )
    scanner = StreamUsageScanner(strip_usage_event=True)
    chunks = [CONTENT, last, DONE]
    out = feed_all(scanner, chunks)
    assert out == chunks
    assert out[1] is last
    assert scanner.usage == Usage(5, 7, 12)


@pytest.mark.parametrize("strip", [True, False])
def test_usage_null_chunks_are_returned_as_the_same_object(strip: bool) -> None:
    chunk = (
        b'data: {"id":"1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Hi"},'
        b'"finish_reason":null}],"usage":null}\n\n'
    )
    scanner = StreamUsageScanner(strip_usage_event=strip)
    for _ in range(3):
        out = scanner.feed(chunk)
        assert out is chunk
    assert scanner.usage is None


def test_the_last_usage_wins() -> None:
    later = USAGE_ONLY.replace(b'"completion_tokens":12,"total_tokens":21', b'"completion_tokens":30,"total_tokens":39')
    scanner = StreamUsageScanner(strip_usage_event=False)
    feed_all(scanner, [USAGE_ONLY, later])
    assert scanner.usage == Usage(9, 30, 39)


def test_without_stripping_only_a_short_tail_is_kept_and_the_usage_is_read_from_it() -> None:
    scanner = StreamUsageScanner(strip_usage_event=False)
    for _ in range(2000):
        assert scanner.feed(CONTENT) is CONTENT
        assert scanner._tail_bytes < usage_module.TAIL_BYTES + len(CONTENT)  # bounded, whatever the length
    assert scanner.usage is None
    for part in (USAGE_ONLY[:30], USAGE_ONLY[30:90], USAGE_ONLY[90:], DONE):
        scanner.feed(part)
    assert scanner.usage == USAGE
    assert scanner.events == 2002
    assert not scanner.mid_event


def test_a_usage_event_cut_off_at_the_end_of_a_stream_is_not_read() -> None:
    scanner = StreamUsageScanner(strip_usage_event=False)
    feed_all(scanner, [CONTENT, USAGE_ONLY, USAGE_ONLY.replace(b"9", b"7")[:-10]])
    assert scanner.usage == USAGE  # the earlier, whole one
    assert scanner.mid_event


def test_usage_event_with_data_and_comment_lines() -> None:
    event = (
        b': keep-alive "usage"\nevent: message\n'
        b'data:{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}\n\n'
    )
    scanner = StreamUsageScanner(strip_usage_event=True)
    assert scanner.feed(CONTENT + event) == CONTENT
    assert scanner.usage == Usage(1, 2, 3)


@pytest.mark.parametrize(
    "chunk",
    [
        b"garbage without any event end",
        b"\x00\xff\xfe binary\n\n",
        b'data: {"usage": not json\n\n',
        b'data: "usage"\n\n',
        b'data: ["usage", 1]\n\n',
        b'data: {"choices":[],"usage":"lots"}\n\n',
        b'data: {"choices":[],"usage":[1,2]}\n\n',
        b': comment mentioning "usage"\n\n',
        b'"usage"\n\n\n\n',
        b"\n\n",
        b"",
        DONE,
    ],
)
@pytest.mark.parametrize("strip", [True, False])
def test_garbage_does_not_raise(chunk: bytes, strip: bool) -> None:
    scanner = StreamUsageScanner(strip_usage_event=strip)
    assert scanner.feed(chunk) is chunk
    assert scanner.usage is None
    # The scanner still works after garbage.
    assert scanner.feed(b"\n\n" + USAGE_ONLY) == (b"\n\n" if strip else b"\n\n" + USAGE_ONLY)
    assert scanner.usage == USAGE


HANG_CHECK = textwrap.dedent(
    """
    from proxy.request.usage import StreamUsageScanner

    scanner = StreamUsageScanner(strip_usage_event=%s)
    print(repr(scanner.feed(%r)))
    print(repr(scanner.usage))
    """
)


USAGE_NULL = CONTENT.replace(b"]}\n\n", b'],"usage":null}\n\n')
PRINTED_USAGE = "Usage(prompt_tokens=9, completion_tokens=12, total_tokens=21, cached_tokens=0)"


@pytest.mark.parametrize(
    ("strip", "chunk", "printed"),
    [
        # OpenAI-style content chunk with "usage":null and one blank line too many.
        pytest.param(False, USAGE_NULL + b"\n", "None", id="usage-null-3-newlines"),
        pytest.param(False, USAGE_NULL + b"\n\n\n", "None", id="usage-null-5-newlines"),
        pytest.param(True, USAGE_ONLY + b"\n", PRINTED_USAGE, id="usage-only-3-newlines"),
        pytest.param(True, crlf(USAGE_ONLY) + b"\r\n", PRINTED_USAGE, id="usage-only-crlf-extra-blank-line"),
        pytest.param(True, USAGE_ONLY + b"\n" + DONE, PRINTED_USAGE, id="usage-only-3-newlines-then-done"),
    ],
)
def test_an_extra_blank_line_does_not_hang_the_scanner(strip: bool, chunk: bytes, printed: str) -> None:
    # Regression: an odd run of 3+ newlines at the last event end made the scan loop forever.
    # Run in a child process so that a regression fails the test instead of hanging the run.
    try:
        done = subprocess.run(
            [sys.executable, "-c", HANG_CHECK % (strip, chunk)],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"StreamUsageScanner.feed({chunk!r}) did not return within 5 s")
    out, usage = done.stdout.splitlines()
    assert usage == printed
    # The usage event itself may be cut when stripping; the extra newline and everything else is forwarded.
    assert out == repr(chunk.replace(crlf(USAGE_ONLY), b"").replace(USAGE_ONLY, b"") if strip else chunk)


@pytest.mark.parametrize("strip", [True, False])
def test_crlf_event_ends(strip: bool) -> None:
    # Regression: only LF event ends were known, so a CRLF upstream's usage was never read.
    stream = crlf(CONTENT + USAGE_ONLY + DONE)
    scanner = StreamUsageScanner(strip_usage_event=strip)
    out = scanner.feed(stream)
    assert scanner.usage == USAGE
    assert out == (crlf(CONTENT + DONE) if strip else stream)


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        ({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}, Usage(3, 4, 7)),
        ({"prompt_tokens": 3, "completion_tokens": 4}, Usage(3, 4, 7)),
        ({"prompt_tokens": 8, "total_tokens": 8}, Usage(8, 0, 8)),
        # No token count in it at all: not usage (so a price per request applies, not a cost of 0).
        ({"prompt_tokens": True, "completion_tokens": -2, "total_tokens": "9"}, None),
        ({"prompt_tokens": 1.5, "completion_tokens": 2}, Usage(0, 2, 2)),
        ({}, None),
        ({"type": "duration", "seconds": 12}, None),
        # The Responses API's shape (and images', audio's): input and output tokens.
        (
            {"input_tokens": 9, "input_tokens_details": {"cached_tokens": 4}, "output_tokens": 5, "total_tokens": 14},
            Usage(9, 5, 14, cached_tokens=4),
        ),
        ({"type": "tokens", "input_tokens": 7, "output_tokens": 2}, Usage(7, 2, 9)),
        # A total alone (rerank, some embeddings APIs): what was sent in.
        ({"total_tokens": 40}, Usage(40, 0, 40)),
        # A total below its parts is not believed.
        ({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 3}, Usage(10, 5, 15)),
        (None, None),
        ("12", None),
        ([1, 2], None),
    ],
)
def test_usage_from_json(usage: object, expected: Usage | None) -> None:
    assert Usage.from_json(usage) == expected


def test_usage_from_body_of_a_chat_completion() -> None:
    body = (
        b'{"id":"chatcmpl-1","object":"chat.completion","created":1700000000,"model":"deepseek-chat",'
        b'"choices":[{"index":0,"message":{"role":"assistant","content":"Hello"},"finish_reason":"stop"}],'
        b'"usage":{"prompt_tokens":11,"completion_tokens":5,"total_tokens":16}}'
    )
    assert usage_from_body(body) == Usage(11, 5, 16)


def test_usage_from_body_of_an_embedding() -> None:
    body = b'{"object":"list","data":[],"model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}}'
    assert usage_from_body(body) == Usage(8, 0, 8)


@pytest.mark.parametrize(
    "body",
    [
        b'{"id":"chatcmpl-1","object":"chat.completion","choices":[]}',
        b'{"id":"chatcmpl-1","choices":[],"usage":null}',
        b'["usage"]',
        b'"usage"',
    ],
)
def test_usage_from_body_without_usage(body: bytes) -> None:
    assert usage_from_body(body) is None


@pytest.mark.parametrize(
    "body", [b'{"id":"chatcmpl-1","usage":{"prompt_tokens":1', b"<html>502 Bad Gateway</html>", b""]
)
def test_usage_from_body_of_something_not_json(body: bytes) -> None:
    with pytest.raises(usage_module.NotJson):
        usage_from_body(body)


def test_large_bodies_have_only_their_usage_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    vectors = b",".join(
        b'{"object":"embedding","index":%d,"embedding":[%s]}' % (i, b"0.125," * 1500 + b"1") for i in range(40)
    )
    body = b'{"object":"list","data":[' + vectors + b'],"model":"e","usage":{"prompt_tokens":8,"total_tokens":8}}'
    assert len(body) > usage_module.FULL_PARSE_BYTES
    parsed: list[int] = []
    real_loads = usage_module.orjson.loads

    def loads(data: bytes) -> object:
        parsed.append(len(data))
        return real_loads(data)

    monkeypatch.setattr(usage_module.orjson, "loads", loads)
    assert usage_from_body(body) == Usage(8, 0, 8)
    assert parsed == [len(b'{"prompt_tokens":8,"total_tokens":8}')]
    with pytest.raises(usage_module.NotJson):
        usage_from_body(b"<html>" + body)


def test_usage_null_chunks_are_never_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_parse(_event: bytes) -> None:
        raise AssertionError("a chunk without a usage object was parsed")

    monkeypatch.setattr(usage_module, "_event_json", no_parse)
    chunk = b'data: {"choices":[{"delta":{"content":"hi"}}],"usage":null}\n\ndata: {"usage": null}\n\n'
    scanner = StreamUsageScanner(strip_usage_event=True)
    assert scanner.feed(chunk) is chunk
    assert scanner.usage is None


ANSWER = (
    b'{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"content":"Hi"}}],'
    b'"usage":{"prompt_tokens":11,"completion_tokens":5,"total_tokens":16}}'
)


@pytest.mark.parametrize(
    ("encoding", "body"),
    [
        ("gzip", gzip.compress(ANSWER, mtime=0)),
        ("x-gzip", gzip.compress(ANSWER, mtime=0)),
        ("GZIP", gzip.compress(ANSWER, mtime=0)),
        ("deflate", zlib.compress(ANSWER)),
        # Several gzip members one after the other are one answer.
        ("gzip", gzip.compress(ANSWER[:40], mtime=0) + gzip.compress(ANSWER[40:], mtime=0)),
        ("identity", ANSWER),
        (None, ANSWER),
    ],
)
def test_usage_of_a_compressed_answer(encoding: str | None, body: bytes) -> None:
    assert usage_module.usage_from_answer(body, encoding) == Usage(11, 5, 16)


@pytest.mark.parametrize(
    ("encoding", "body"),
    [
        ("br", b"\x1b\x00\x00\x00"),  # not readable here: passed on uncounted
        ("gzip", gzip.compress(ANSWER, mtime=0)[:-12]),  # cut short
    ],
)
def test_unreadable_compressed_answers_have_no_usage(encoding: str, body: bytes) -> None:
    assert usage_module.usage_from_answer(body, encoding) is None


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_a_corrupt_compressed_answer_is_not_json(encoding: str) -> None:
    with pytest.raises(usage_module.NotJson):
        usage_module.usage_from_answer(b"<html>502 Bad Gateway</html>", encoding)
    with pytest.raises(usage_module.NotJson):
        usage_module.usage_from_answer(gzip.compress(b"<html>502 Bad Gateway</html>"), encoding)


def one_member_bomb() -> bytes:
    pack = zlib.compressobj(wbits=31)
    return b"".join(pack.compress(bytes(1 << 20)) for _ in range(48)) + pack.flush()


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(one_member_bomb, id="one-member"),
        pytest.param(lambda: gzip.compress(bytes(1 << 20)) * 500, id="many-members"),
    ],
)
def test_a_zip_bomb_is_inflated_only_up_to_the_limit(make: Callable[[], bytes]) -> None:
    # Tens or hundreds of MB of zeros in well under one: only the limit is ever inflated.
    bomb = make()
    assert len(bomb) < 1 << 20
    inflater = usage_module.Inflater("gzip")
    copy = inflater.feed(bomb)
    assert len(copy) == usage_module.INFLATE_LIMIT_BYTES
    assert not inflater.whole
    assert inflater.feed(bomb) == b""
    assert usage_module.usage_from_answer(bomb, "gzip") is None


def test_a_compressed_stream_inflated_chunk_by_chunk() -> None:
    pack = zlib.compressobj(wbits=31)
    events = [CONTENT, FINISH, USAGE_ONLY, DONE]
    packed = b"".join(pack.compress(e) + pack.flush(zlib.Z_SYNC_FLUSH) for e in events) + pack.flush()
    for size in (1, 7, 100, len(packed)):
        inflater = usage_module.Inflater("gzip")
        scanner = StreamUsageScanner(strip_usage_event=False)
        copy = b""
        for i in range(0, len(packed), size):
            part = inflater.feed(packed[i : i + size])
            scanner.feed(part)
            copy += part
        assert copy == b"".join(events)
        assert inflater.whole
        assert scanner.usage == USAGE
