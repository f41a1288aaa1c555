"""The hostile upstream itself: each route's shape, its worst-case usage, its leaks and its request log."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import HOSTILE_KEY as KEY
from tests.hostile_upstream import Hostile, start_hostile

AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def client(hostile: Hostile) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=hostile.url, headers=AUTH, timeout=5) as session:
        yield session


def data_lines(body: bytes) -> list[Any]:
    """The data: payloads of an SSE body, "[DONE]" as a string."""
    lines = [line[6:] for line in body.split(b"\n") if line.startswith(b"data: ")]
    return ["[DONE]" if line == b"[DONE]" else orjson.loads(line) for line in lines]


def test_a_wrong_key_gets_401_that_quotes_the_expected_key(hostile: Hostile) -> None:
    resp = httpx.post(f"{hostile.url}/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer nope"})
    assert resp.status_code == 401
    assert resp.json()["error"]["message"] == f"Incorrect API key provided: expected key {KEY}"


def test_chat_counts_every_utf8_byte_of_strings_and_parts(client: httpx.Client) -> None:
    parts = [{"type": "text", "text": "你好"}, {"type": "image_url", "image_url": {"url": "x"}}]
    messages = [
        {"role": "system", "content": "hé"},
        {"role": "user", "content": parts},
        {"role": "user", "content": "👋"},
    ]
    body = {"model": "m", "messages": messages, "max_tokens": 5, "n": 2}
    answer = client.post("/v1/chat/completions", json=body, headers={"x-hostile-cached-tokens": "4"}).json()
    assert answer["object"] == "chat.completion"
    assert [c["message"]["content"] for c in answer["choices"]] == ["t " * 5, "t " * 5]
    # 3 + 6 + 4 bytes; the cap times n; cached at most the prompt.
    details = {"prompt_tokens_details": {"cached_tokens": 4}}
    assert answer["usage"] == {"prompt_tokens": 13, "completion_tokens": 10, "total_tokens": 23, **details}


def test_chat_stream_sends_a_token_per_event_then_the_usage_event(client: httpx.Client) -> None:
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}, "max_completion_tokens": 3}
    resp = client.post("/v1/chat/completions", json=body)
    assert resp.headers["content-type"] == "text/event-stream"
    events = data_lines(resp.content)
    first, *rest = (e["choices"][0]["delta"] for e in events[:3])
    assert (first, rest) == ({"role": "assistant", "content": "t "}, [{"content": "t "}] * 2)
    assert events[3]["choices"][0]["finish_reason"] == "stop"
    assert all(e["usage"] is None for e in events[:4])
    assert events[4]["choices"] == []
    assert events[4]["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    assert events[5:] == ["[DONE]"]


def test_chat_stream_without_include_usage_has_no_usage(client: httpx.Client) -> None:
    resp = client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers={"x-hostile-prompt-tokens": "9"})
    events = data_lines(resp.content)
    assert len(events) == 20 + 2
    assert not any("usage" in e for e in events[:-1])


def test_completions_and_embeddings(client: httpx.Client) -> None:
    body = {"model": "m", "prompt": ["ab", "日本"], "max_tokens": 4}
    answer = client.post("/v1/completions", json=body).json()
    assert answer["object"] == "text_completion"
    assert answer["choices"][0]["text"] == "t " * 4
    assert answer["usage"] == {"prompt_tokens": 8, "completion_tokens": 4, "total_tokens": 12}
    answer = client.post("/v1/embeddings", json={"model": "e", "input": ["a", "ü", "😀"]}).json()
    assert [d["index"] for d in answer["data"]] == [0, 1, 2]
    assert answer["usage"] == {"prompt_tokens": 7, "total_tokens": 7}


RESPONSES_BODY = {
    "model": "r",
    "instructions": "be brief",
    "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "こんにちは"}]},
        {"role": "user", "content": "x"},
    ],
    "max_output_tokens": 3,
}


def test_responses_answer_in_openai_field_order(client: httpx.Client) -> None:
    answer = client.post("/v1/responses", json=RESPONSES_BODY, headers={"x-hostile-cached-tokens": "99"}).json()
    assert list(answer)[:4] == ["id", "object", "created_at", "status"]
    assert list(answer)[-3:] == ["usage", "user", "metadata"]
    assert answer["id"].startswith("resp_") and answer["object"] == "response" and answer["status"] == "completed"
    assert answer["output"][0]["content"] == [{"type": "output_text", "text": "t t t ", "annotations": []}]
    # 8 + 15 + 1 bytes of prompt; the cached count is cut to the prompt.
    assert answer["usage"] == {
        "input_tokens": 24,
        "input_tokens_details": {"cached_tokens": 24},
        "output_tokens": 3,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 27,
    }


def test_responses_stream_ends_with_the_whole_response(client: httpx.Client) -> None:
    resp = client.post("/v1/responses", json={**RESPONSES_BODY, "stream": True})
    names = [line[7:].decode() for line in resp.content.split(b"\n") if line.startswith(b"event: ")]
    deltas = ["response.output_text.delta"] * 3
    assert names == [
        "response.created",
        "response.in_progress",
        *deltas,
        "response.output_text.done",
        "response.completed",
    ]
    events = data_lines(resp.content)
    assert [e["type"] for e in events] == names
    assert [e["sequence_number"] for e in events] == list(range(7))
    assert events[0]["response"]["usage"] is None
    done = events[-1]["response"]
    assert done["status"] == "completed" and done["output"][0]["content"][0]["text"] == "t t t "
    assert (done["usage"]["input_tokens"], done["usage"]["output_tokens"]) == (24, 3)


def test_other_routes_echo_with_usage(client: httpx.Client) -> None:
    answer = client.post("/v1/images/generations", json={"prompt": "🎨 cat"}).json()
    assert answer == {
        "object": "hostile.echo",
        "path": "/v1/images/generations",
        "usage": {"prompt_tokens": 8, "completion_tokens": 20, "total_tokens": 28},
    }
    answer = client.get("/v1/anything", headers={"x-hostile-completion-tokens": "0"}).json()
    assert answer["usage"] == {"prompt_tokens": 1, "completion_tokens": 0, "total_tokens": 1}


def test_no_usage_leaves_usage_out_everywhere(client: httpx.Client) -> None:
    off = {"x-hostile-no-usage": "1"}
    assert "usage" not in client.post("/v1/chat/completions", json=CHAT, headers=off).json()
    assert "usage" not in client.post("/v1/audio/speech", json={"input": "hi"}, headers=off).json()
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 2}
    events = data_lines(client.post("/v1/chat/completions", json=body, headers=off).content)
    assert len(events) == 4 and not any("usage" in e for e in events[:-1])
    events = data_lines(client.post("/v1/responses", json={**RESPONSES_BODY, "stream": True}, headers=off).content)
    assert events[-1]["type"] == "response.completed" and "usage" not in events[-1]["response"]


@pytest.mark.parametrize(("status", "expected"), [(None, 400), ("429", 429), ("404", 404), ("422", 422)])
def test_leak_in_the_error_body(client: httpx.Client, status: str | None, expected: int) -> None:
    headers = {"x-hostile-leak": "body", **({"x-hostile-status": status} if status else {})}
    resp = client.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert resp.status_code == expected
    assert resp.json()["error"]["message"] == f"request rejected for key {KEY}"
    assert resp.headers.get("retry-after") == ("1" if expected == 429 else None)


@pytest.mark.parametrize("split", ["0", "1"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/responses"])
def test_leak_in_a_stream_event_after_two_tokens(client: httpx.Client, path: str, split: str) -> None:
    headers = {"x-hostile-leak": "event", "x-hostile-split": split}
    with client.stream("POST", path, json={**CHAT, "stream": True}, headers=headers) as resp:
        assert resp.status_code == 200
        chunks = list(resp.iter_raw())
    body = b"".join(chunks)
    error = {"message": f"upstream broke for key {KEY}", "type": "server_error", "code": "boom"}
    assert body.endswith(b"data: " + orjson.dumps({"error": error}) + b"\n\n")
    assert body.count(b'"t "') == 2 and b"[DONE]" not in body
    # Written 20 ms apart, the halves arrive apart: no read holds the whole key.
    assert any(KEY.encode() in chunk for chunk in chunks) == (split == "0")


def test_leak_in_a_response_header(client: httpx.Client) -> None:
    resp = client.post("/v1/chat/completions", json=CHAT, headers={"x-hostile-leak": "header"})
    assert resp.status_code == 200 and resp.json()["object"] == "chat.completion"
    assert (resp.headers["x-upstream-debug"], resp.headers["x-upstream-trace"]) == (f"key={KEY}", "ok")
    failing = {"x-hostile-leak": "header", "x-hostile-status": "503"}
    resp = client.post("/v1/embeddings", json={"input": "x"}, headers=failing)
    assert resp.status_code == 503 and resp.headers["x-upstream-debug"] == f"key={KEY}"


def test_ttfb_and_delay(client: httpx.Client) -> None:
    started = time.monotonic()
    body = {**CHAT, "stream": True, "max_tokens": 3}
    client.post("/v1/chat/completions", json=body, headers={"x-hostile-ttfb-ms": "100", "x-hostile-delay-ms": "50"})
    # 100 ms before the headers, then 4 gaps of 50 ms between the 5 events.
    assert time.monotonic() - started >= 0.3


def test_request_log_keeps_what_came_and_clears(hostile: Hostile, client: httpx.Client) -> None:
    hostile.clear()
    client.post("/v1/moderations", content=b"not json", headers={"X-Trace": "T"})
    client.post("/v1/chat/completions", json=CHAT)
    first, second = hostile.requests()
    assert (first["path"], first["method"], first["body"], first["raw_size"]) == ("/v1/moderations", "POST", None, 8)
    assert first["headers"]["x-trace"] == "T" and first["headers"]["authorization"] == f"Bearer {KEY}"
    assert second["body"] == CHAT
    hostile.clear()
    assert hostile.requests() == []


def test_sigterm_stops_it_cleanly(tmp_path: Path) -> None:
    server = start_hostile(tmp_path, KEY)
    started = time.monotonic()
    server.stop()
    assert server.proc.returncode == 0
    assert time.monotonic() - started < 3
