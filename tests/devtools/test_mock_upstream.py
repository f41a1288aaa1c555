from __future__ import annotations

import asyncio
import gzip
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
import pytest_asyncio

from proxy.devtools.mock_upstream import MockOptions, bound_port, start_mock

pytestmark = pytest.mark.asyncio

StartMock = Callable[..., Awaitable[str]]
CHAT = {
    "model": "mock-chat",
    "messages": [{"role": "user", "content": "hello there mock"}],
}


@pytest_asyncio.fixture
async def start() -> AsyncIterator[StartMock]:
    runners = []

    async def _start(**overrides: Any) -> str:
        settings: dict[str, Any] = {"port": 0, "chunks": 4, "chunk_delay_ms": 5.0}
        settings.update(overrides)
        runner = await start_mock(MockOptions(**settings))
        runners.append(runner)
        return f"http://127.0.0.1:{bound_port(runner)}"

    yield _start
    for runner in runners:
        await runner.cleanup()


@pytest_asyncio.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def sse_payloads(resp: aiohttp.ClientResponse) -> list[Any]:
    payloads: list[Any] = []
    async for line in resp.content:
        if line.startswith(b"data: "):
            data = line[len(b"data: ") :].strip()
            payloads.append("[DONE]" if data == b"[DONE]" else orjson.loads(data))
    return payloads


async def request_log(session: aiohttp.ClientSession, base: str) -> list[dict[str, Any]]:
    async with session.get(f"{base}/_mock/requests") as resp:
        entries: list[dict[str, Any]] = await resp.json()
        return entries


async def settled_entry(session: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    # The server may record the outcome a moment after the client gave up.
    for _ in range(40):
        entry = (await request_log(session, base))[-1]
        if entry["outcome"] != "in_progress":
            return entry
        await asyncio.sleep(0.05)
    raise AssertionError("request never settled")


async def test_chat_non_stream_shape_and_usage(start: StartMock, session: aiohttp.ClientSession) -> None:
    base = await start(name="mock-a")
    async with session.post(f"{base}/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == "mock-chat"
    choice = body["choices"][0]
    assert choice["message"] == {
        "role": "assistant",
        "content": "[mock-a] tok0 tok1 tok2 tok3 ",
    }
    assert choice["finish_reason"] == "stop"
    assert body["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "total_tokens": 7,
    }
    entry = (await request_log(session, base))[-1]
    assert entry["outcome"] == "completed"
    assert entry["body"] == CHAT
    assert entry["stream"] is False
    assert entry["started_at"] <= entry["headers_sent_at"] <= entry["ended_at"]


async def test_chat_stream_events_in_order(start: StartMock, session: aiohttp.ClientSession) -> None:
    base = await start(name="mock-b")
    async with session.post(f"{base}/v1/chat/completions", json={**CHAT, "stream": True}) as resp:
        assert resp.headers["content-type"] == "text/event-stream"
        assert resp.headers["cache-control"] == "no-cache"
        events = await sse_payloads(resp)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    contents = [c["choices"][0]["delta"]["content"] for c in chunks[1:-1]]
    assert contents == ["[mock-b] tok0 ", "tok1 ", "tok2 ", "tok3 "]
    assert chunks[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "finish_reason": "stop",
    }
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert len({c["id"] for c in chunks}) == 1


async def test_chat_stream_include_usage(start: StartMock, session: aiohttp.ClientSession) -> None:
    base = await start()
    payload = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    async with session.post(f"{base}/v1/chat/completions", json=payload) as resp:
        events = await sse_payloads(resp)
    assert events[-1] == "[DONE]"
    usage_event = events[-2]
    assert usage_event["choices"] == []
    assert usage_event["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "total_tokens": 7,
    }
    assert all(e["usage"] is None for e in events[:-2])


async def test_chunk_timestamps_follow_chunk_delay(start: StartMock, session: aiohttp.ClientSession) -> None:
    base = await start(chunks=5, chunk_delay_ms=40.0)
    async with session.post(f"{base}/v1/chat/completions", json={**CHAT, "stream": True}) as resp:
        await resp.read()
    entry = (await request_log(session, base))[-1]
    sent = entry["chunk_sent_at"]
    assert len(sent) == 5
    assert sent[-1] - sent[0] >= 4 * 0.040 * 0.8
    assert entry["headers_sent_at"] <= sent[0] <= entry["ended_at"]


async def test_header_knobs_override_options(start: StartMock, session: aiohttp.ClientSession) -> None:
    base = await start(chunks=8)
    headers = {
        "x-mock-chunks": "2",
        "x-mock-ttfb-ms": "150",
        "x-mock-slow-chunk": "1:200",
    }
    async with session.post(f"{base}/v1/chat/completions", json={**CHAT, "stream": True}, headers=headers) as resp:
        await resp.read()
    entry = (await request_log(session, base))[-1]
    assert entry["headers_sent_at"] - entry["started_at"] >= 0.12
    first, second = entry["chunk_sent_at"]
    assert second - first >= 0.2


async def test_legacy_completions(start: StartMock, session: aiohttp.ClientSession) -> None:
    base = await start(chunks=3)
    payload = {"model": "mock-chat", "prompt": "one two"}
    async with session.post(f"{base}/v1/completions", json=payload) as resp:
        body = await resp.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "[mock] tok0 tok1 tok2 "
    assert body["usage"] == {
        "prompt_tokens": 2,
        "completion_tokens": 3,
        "total_tokens": 5,
    }
    async with session.post(f"{base}/v1/completions", json={**payload, "stream": True}) as resp:
        events = await sse_payloads(resp)
    assert [e["choices"][0]["text"] for e in events[:-1]] == [
        "[mock] tok0 ",
        "tok1 ",
        "tok2 ",
        "",
    ]
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert events[-1] == "[DONE]"


async def test_status_fault_envelope(start: StartMock, session: aiohttp.ClientSession) -> None:
    base = await start()
    async with session.post(f"{base}/v1/chat/completions", json=CHAT, headers={"x-mock-status": "503"}) as resp:
        assert resp.status == 503
        body = await resp.json()
    assert body["error"]["code"] == "mock_error"
    assert set(body["error"]) == {"message", "type", "param", "code"}
    async with session.post(f"{base}/v1/chat/completions", json=CHAT, headers={"x-mock-status": "429"}) as resp:
        assert resp.status == 429
        assert resp.headers["retry-after"] == "1"
    assert (await request_log(session, base))[-1]["outcome"] == "error"


async def test_reset_after_breaks_stream(start: StartMock, session: aiohttp.ClientSession) -> None:
    base = await start()
    received: list[bytes] = []
    headers = {"x-mock-reset-after": "2"}
    with pytest.raises(aiohttp.ClientPayloadError):
        async with session.post(
            f"{base}/v1/chat/completions",
            json={**CHAT, "stream": True},
            headers=headers,
        ) as resp:
            assert resp.status == 200
            async for line in resp.content:
                received.append(line)
    assert any(b"tok1" in line for line in received)
    entry = await settled_entry(session, base)
    assert entry["outcome"] == "reset"
    assert len(entry["chunk_sent_at"]) == 2


async def test_reset_after_non_stream(start: StartMock, session: aiohttp.ClientSession) -> None:
    base = await start()
    with pytest.raises(aiohttp.ClientConnectionError):
        async with session.post(
            f"{base}/v1/chat/completions",
            json=CHAT,
            headers={"x-mock-reset-after": "0"},
        ):
            pass
    entry = await settled_entry(session, base)
    assert entry["outcome"] == "reset"
    assert entry["headers_sent_at"] is None


async def test_client_disconnect_mid_stream(start: StartMock, session: aiohttp.ClientSession) -> None:
    base = await start(chunks=50, chunk_delay_ms=100.0)
    async with session.post(f"{base}/v1/chat/completions", json={**CHAT, "stream": True}) as resp:
        await resp.content.readline()
        closed_at = time.time()
        resp.close()
    entry = await settled_entry(session, base)
    assert entry["outcome"] == "disconnected"
    assert 0 <= entry["disconnected_at"] - closed_at < 1.0
    assert len(entry["chunk_sent_at"]) < 50


@pytest.mark.parametrize("knob", [("x-mock-hang", "headers"), ("x-mock-ttfb-ms", "5000")])
async def test_disconnect_before_headers(
    start: StartMock, session: aiohttp.ClientSession, knob: tuple[str, str]
) -> None:
    base = await start()
    timeout = aiohttp.ClientTimeout(total=0.3)
    with pytest.raises(asyncio.TimeoutError):
        async with session.post(
            f"{base}/v1/chat/completions",
            json=CHAT,
            headers=dict([knob]),
            timeout=timeout,
        ):
            pass
    gave_up_at = time.time()
    entry = await settled_entry(session, base)
    assert entry["outcome"] == "disconnected"
    assert entry["headers_sent_at"] is None
    assert abs(entry["disconnected_at"] - gave_up_at) < 1.0


async def test_global_faults(start: StartMock, session: aiohttp.ClientSession) -> None:
    base = await start()
    async with session.post(f"{base}/_mock/faults", json={"status": 503}) as resp:
        assert resp.status == 200
    async with session.get(f"{base}/v1/models") as resp:
        assert resp.status == 503
    async with session.get(f"{base}/v1/models", headers={"x-mock-status": "none"}) as resp:
        assert resp.status == 200, "per-request headers win over global faults"
    async with session.post(f"{base}/_mock/faults", json={"reset-after": 0}) as resp:
        assert (await resp.json()) == {"reset-after": "0"}
    with pytest.raises(aiohttp.ClientConnectionError):
        async with session.post(f"{base}/v1/chat/completions", json=CHAT):
            pass
    async with session.post(f"{base}/_mock/faults", json={"nonsense": 1}) as resp:
        assert resp.status == 400
    async with session.delete(f"{base}/_mock/faults") as resp:
        assert resp.status == 204
    async with session.post(f"{base}/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 200


async def test_garbage_body(start: StartMock, session: aiohttp.ClientSession) -> None:
    base = await start()
    async with session.post(f"{base}/v1/chat/completions", json=CHAT, headers={"x-mock-garbage": "1"}) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        with pytest.raises(orjson.JSONDecodeError):
            orjson.loads(await resp.read())


async def test_api_key_enforced(start: StartMock, session: aiohttp.ClientSession) -> None:
    base = await start(api_key="sk-mock")
    async with session.post(f"{base}/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"]["code"] == "invalid_api_key"
    auth = {"Authorization": "Bearer sk-mock"}
    async with session.post(f"{base}/v1/chat/completions", json=CHAT, headers=auth) as resp:
        assert resp.status == 200


async def test_embeddings(start: StartMock, session: aiohttp.ClientSession) -> None:
    base = await start()
    payload = {"model": "mock-embed", "input": ["a b", "c"]}
    async with session.post(f"{base}/v1/embeddings", json=payload) as resp:
        body = await resp.json()
    assert body["object"] == "list"
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert all(len(d["embedding"]) == 8 for d in body["data"])
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    async with session.post(f"{base}/v1/embeddings", json={"model": "mock-embed", "input": "a b"}) as resp:
        single = await resp.json()
    assert single["data"][0]["embedding"] == body["data"][0]["embedding"]


async def test_models(start: StartMock, session: aiohttp.ClientSession) -> None:
    base = await start(name="mock-z", models=("m1", "m2"))
    async with session.get(f"{base}/v1/models") as resp:
        body = await resp.json()
    assert body["object"] == "list"
    assert [(m["id"], m["owned_by"]) for m in body["data"]] == [
        ("m1", "mock-z"),
        ("m2", "mock-z"),
    ]


async def test_models_log_apart_and_replaced(start: StartMock, session: aiohttp.ClientSession) -> None:
    base = await start(models=("m1",))
    async with session.get(f"{base}/v1/models", headers={"Authorization": "Bearer sk-x"}) as resp:
        assert resp.status == 200
    async with session.get(f"{base}/_mock/requests") as resp:
        assert await resp.json() == []
    async with session.post(f"{base}/_mock/models", json=["m2", "m3"]) as resp:
        assert resp.status == 200
    async with session.get(f"{base}/v1/models") as resp:
        assert [m["id"] for m in (await resp.json())["data"]] == ["m2", "m3"]
    async with session.get(f"{base}/_mock/models") as resp:
        log = await resp.json()
    assert log["models"] == ["m2", "m3"]
    assert [r["headers"].get("authorization") for r in log["requests"]] == ["Bearer sk-x", None]
    async with session.post(f"{base}/_mock/models", json=["m4", ""]) as resp:
        assert resp.status == 400


async def test_echo_route_and_request_log(start: StartMock, session: aiohttp.ClientSession) -> None:
    base = await start(name="mock-e")
    headers = {"x-request-id": "req-42"}
    async with session.post(f"{base}/v1/images/generations", json={"model": "img"}, headers=headers) as resp:
        body = await resp.json()
    assert body == {
        "object": "mock.echo",
        "path": "/v1/images/generations",
        "method": "POST",
        "model": "img",
        "mock": "mock-e",
    }
    async with session.get(f"{base}/v1/responses/abc") as resp:
        assert (await resp.json())["model"] is None
    entries = await request_log(session, base)
    assert entries[0]["id"] == "req-42"
    assert entries[0]["headers"]["x-request-id"] == "req-42"
    async with session.delete(f"{base}/_mock/requests") as resp:
        assert resp.status == 204
    assert await request_log(session, base) == []


async def test_bad_json(start: StartMock, session: aiohttp.ClientSession) -> None:
    base = await start()
    headers = {"content-type": "application/json"}
    async with session.post(f"{base}/v1/chat/completions", data=b"{not json", headers=headers) as resp:
        assert resp.status == 400
        body = await resp.json()
    assert body == {
        "error": {
            "message": body["error"]["message"],
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_json",
        }
    }


async def test_gzip_answer_whatever_the_client_accepts(start: StartMock) -> None:
    base = await start(name="mock-g")
    async with aiohttp.ClientSession(auto_decompress=False) as raw_session:
        headers = {"x-mock-gzip": "1", "Accept-Encoding": "identity"}
        async with raw_session.post(f"{base}/v1/chat/completions", json=CHAT, headers=headers) as resp:
            assert resp.status == 200
            assert resp.headers["content-encoding"] == "gzip"
            assert resp.content_type == "application/json"
            raw = await resp.read()
        assert int(resp.headers["content-length"]) == len(raw)
        body = orjson.loads(gzip.decompress(raw))
        assert body["choices"][0]["message"]["content"] == "[mock-g] tok0 tok1 tok2 tok3 "
        assert body["usage"]["total_tokens"] == 7
        async with raw_session.post(f"{base}/v1/chat/completions", json=CHAT) as resp:
            assert "content-encoding" not in resp.headers
            assert orjson.loads(await resp.read())["usage"]["total_tokens"] == 7


async def test_gzip_stream_arrives_event_by_event(start: StartMock) -> None:
    base = await start(chunks=3, chunk_delay_ms=50.0)
    payload = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    async with aiohttp.ClientSession(auto_decompress=False) as raw_session:
        async with raw_session.post(f"{base}/v1/chat/completions", json=payload, headers={"x-mock-gzip": "1"}) as resp:
            assert resp.headers["content-encoding"] == "gzip"
            unpack = zlib.decompressobj(wbits=31)
            # Each write is flushed: the first event can be read long before the stream ends.
            first = b""
            while b"\n\n" not in first:
                first += unpack.decompress(await resp.content.readany())
            assert first.startswith(b"data: {")
            rest = unpack.decompress(await resp.read())
        assert unpack.eof
    events = [e for e in (first + rest).split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    assert orjson.loads(events[-2][6:])["usage"]["total_tokens"] == 6


async def test_big_event_is_one_line_of_the_given_size(start: StartMock, session: aiohttp.ClientSession) -> None:
    base = await start(name="mock-big", chunks=2)
    size = 1 << 20
    headers = {"x-mock-big-event": str(size)}
    async with session.post(f"{base}/v1/chat/completions", json={**CHAT, "stream": True}, headers=headers) as resp:
        raw = await resp.read()
    events = raw.split(b"\n\n")
    assert events[-1] == b""
    lines = [e for e in events if e]
    assert [len(line) for line in lines].count(size) == 1
    big = next(line for line in lines if len(line) == size)
    assert big.count(b"\n") == 0
    content = orjson.loads(big[6:])["choices"][0]["delta"]["content"]
    assert set(content) == {"x"}
    # In front of the ordinary tokens, which arrive as usual.
    assert lines.index(big) == 1
    texts = [orjson.loads(line[6:])["choices"][0]["delta"].get("content") for line in lines[2:-1]]
    assert texts == ["[mock-big] tok0 ", "tok1 ", None]
    for bad in ("0", "100:early"):
        async with session.post(
            f"{base}/v1/chat/completions", json={**CHAT, "stream": True}, headers={"x-mock-big-event": bad}
        ) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["code"] == "bad_mock_knob"


async def test_big_event_after_finish(start: StartMock, session: aiohttp.ClientSession) -> None:
    base = await start(chunks=2)
    headers = {"x-mock-big-event": "5000:after-finish"}
    payload = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    async with session.post(f"{base}/v1/chat/completions", json=payload, headers=headers) as resp:
        lines = [e for e in (await resp.read()).split(b"\n\n") if e]
    assert [len(line) for line in lines].index(5000) == 4
    assert orjson.loads(lines[3][6:])["choices"][0]["finish_reason"] == "stop"
    big = orjson.loads(lines[4][6:])["choices"][0]
    assert big["index"] == 1
    assert set(big["delta"]["content"]) == {"x"}
    assert orjson.loads(lines[5][6:])["choices"] == []
    assert lines[6] == b"data: [DONE]"
