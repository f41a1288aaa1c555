"""A hostile OpenAI-compatible upstream: the largest usage a real tokenizer allows, usage left out on
request, and its own key leaked in error bodies, stream events and headers.

    HOSTILE_KEY=sk-... python -m tests.hostile_upstream --bind 127.0.0.1:PORT

Each request picks its behaviour with `x-hostile-*` headers (`Knobs`). The requests it saw are at
GET /_hostile/requests (DELETE clears them). Tests start one with `start_hostile`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gzip
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
import zlib
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

import orjson
from aiohttp import web

KEY_ENV = "HOSTILE_KEY"
LOG_SIZE = 1000
DEFAULT_COMPLETION_TOKENS = 20
SPLIT_PAUSE_S = 0.02
LEAKS = ("", "body", "event", "header")
CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES = "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"
PROMPT_FIELDS = {
    CHAT: ("messages",),
    COMPLETIONS: ("prompt",),
    EMBEDDINGS: ("input",),
    RESPONSES: ("input", "instructions"),
}
ECHO_FIELDS = ("prompt", "input", "messages")
ROOT = Path(__file__).resolve().parent.parent


def is_count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def text_bytes(value: Any) -> int:
    """Prompt text at one token per UTF-8 byte: no tokenizer can count more tokens than bytes."""
    if isinstance(value, str):
        return len(value.encode(errors="surrogatepass"))
    if isinstance(value, list):
        return sum(text_bytes(item) for item in value)
    if isinstance(value, dict):
        # Content parts keep their text under "text"; messages and Responses input items under "content".
        return text_bytes(value.get("text")) + text_bytes(value.get("content"))
    return 0


@dataclass(frozen=True)
class Knobs:
    """What the `x-hostile-*` headers ask of one request; ValueError names the bad header."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    no_usage: bool = False
    ttfb_ms: int = 0
    delay_ms: int = 0
    leak: str = ""
    status: int | None = None
    split: bool = False
    gzip: bool = False  # leaks compressed (Content-Encoding: gzip), as a CDN may send them whatever was asked

    @classmethod
    def of(cls, headers: Mapping[str, str]) -> Knobs:
        def number(name: str) -> int | None:
            raw = headers.get(f"x-hostile-{name}")
            if raw is None:
                return None
            if not raw.strip().isdigit():
                raise ValueError(f"x-hostile-{name} must be a whole number, got {raw!r}")
            return int(raw)

        leak = headers.get("x-hostile-leak", "").strip().lower()
        if leak not in LEAKS:
            raise ValueError(f"x-hostile-leak must be body, event or header, got {leak!r}")
        status = number("status")
        if status is not None and not 200 <= status <= 599:
            raise ValueError(f"x-hostile-status must be within 200-599, got {status}")
        return cls(
            prompt_tokens=number("prompt-tokens"),
            completion_tokens=number("completion-tokens"),
            cached_tokens=number("cached-tokens"),
            no_usage=headers.get("x-hostile-no-usage", "0").strip() == "1",
            ttfb_ms=number("ttfb-ms") or 0,
            delay_ms=number("delay-ms") or 0,
            leak=leak,
            status=status,
            split=headers.get("x-hostile-split", "0").strip() == "1",
            gzip=headers.get("x-hostile-gzip", "0").strip() == "1",
        )


@dataclass
class Ask:
    """One authorised /v1 request and the usage it will be told."""

    request: web.Request
    body: dict[str, Any]
    knobs: Knobs
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def stream(self) -> bool:
        return self.body.get("stream") is True

    @property
    def model(self) -> Any:
        return self.body.get("model") or "hostile"

    def choices(self) -> int:
        n = self.body.get("n")
        return n if self.request.path == CHAT and is_count(n) and n > 1 else 1

    def prompt_tokens(self) -> int:
        if self.knobs.prompt_tokens is not None:
            return self.knobs.prompt_tokens
        fields = PROMPT_FIELDS.get(self.request.path, ECHO_FIELDS)
        return max(1, sum(text_bytes(self.body.get(name)) for name in fields))

    def completion_tokens(self) -> int:
        tokens = self.knobs.completion_tokens
        if tokens is None:
            names = (
                ("max_output_tokens",) if self.request.path == RESPONSES else ("max_completion_tokens", "max_tokens")
            )
            caps = [self.body.get(name) for name in names]
            tokens = next((cap for cap in caps if is_count(cap)), DEFAULT_COMPLETION_TOKENS)
        return tokens * self.choices()

    def cached_tokens(self) -> int:
        return min(self.knobs.cached_tokens or 0, self.prompt_tokens())

    def usage(self) -> dict[str, Any]:
        prompt, completion = self.prompt_tokens(), self.completion_tokens()
        usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion}
        usage["total_tokens"] = prompt + completion
        if self.knobs.cached_tokens is not None:
            usage["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens()}
        return usage

    def response_usage(self) -> dict[str, Any]:
        prompt, completion = self.prompt_tokens(), self.completion_tokens()
        return {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": self.cached_tokens()},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion,
        }

    def response(self, status: str, output: list[Any], usage: dict[str, Any] | None) -> dict[str, Any]:
        """A Responses API object, its fields in OpenAI's order."""
        instructions = self.body.get("instructions")
        answer: dict[str, Any] = {"id": f"resp_{self.id}", "object": "response", "created_at": self.created}
        answer |= {"status": status, "error": None, "incomplete_details": None}
        answer |= {"instructions": instructions if isinstance(instructions, str) else None}
        answer |= {"max_output_tokens": self.body.get("max_output_tokens"), "model": self.model, "output": output}
        answer |= {"parallel_tool_calls": True, "previous_response_id": None, "reasoning": {"effort": None}}
        answer |= {"store": True, "temperature": 1.0, "text": {"format": {"type": "text"}}, "tool_choice": "auto"}
        answer |= {"tools": [], "top_p": 1.0, "truncation": "disabled", "usage": usage, "user": None, "metadata": {}}
        return without_usage(answer) if self.knobs.no_usage else answer

    def message(self, text: str) -> dict[str, Any]:
        part = {"type": "output_text", "text": text, "annotations": []}
        return {
            "type": "message",
            "id": f"msg_{self.id}",
            "status": "completed",
            "role": "assistant",
            "content": [part],
        }


def without_usage(answer: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in answer.items() if k != "usage"}


def envelope(message: str, kind: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def json_response(payload: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(payload), content_type="application/json", headers=headers)


def sse(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def chat_events(ask: Ask, *, chat: bool = True) -> Iterator[bytes]:
    """Chat or text-completion chunks: one per completion token, round-robin over the n choices."""
    n, tokens = ask.choices(), ask.completion_tokens()
    options = ask.body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True and not ask.knobs.no_usage
    kind = "chat.completion.chunk" if chat else "text_completion"
    base: dict[str, Any] = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{ask.id}", "object": kind}
    base |= {"created": ask.created, "model": ask.model}
    if include_usage:
        # OpenAI marks every chunk before the usage one with an explicit null.
        base["usage"] = None

    def choice(index: int, text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
        if not chat:
            return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        delta = {} if text is None else {"role": "assistant", "content": text} if first else {"content": text}
        return {"index": index, "delta": delta, "finish_reason": finish}

    for i in range(tokens):
        yield sse({**base, "choices": [choice(i % n, "t ", None, first=i < n)]})
    yield sse({**base, "choices": [choice(i, None, "stop") for i in range(n)]})
    if include_usage:
        yield sse({**base, "choices": [], "usage": ask.usage()})
    yield b"data: [DONE]\n\n"


def completion_events(ask: Ask) -> Iterator[bytes]:
    return chat_events(ask, chat=False)


def response_events(ask: Ask) -> Iterator[bytes]:
    """The Responses API stream: named events, no [DONE]; the whole object comes back at the end."""
    numbers = itertools.count()

    def event(kind: str, **fields: Any) -> bytes:
        data = orjson.dumps({"type": kind, "sequence_number": next(numbers), **fields})
        return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"

    yield event("response.created", response=ask.response("in_progress", [], None))
    yield event("response.in_progress", response=ask.response("in_progress", [], None))
    where = {"item_id": f"msg_{ask.id}", "output_index": 0, "content_index": 0}
    tokens = ask.completion_tokens()
    for _ in range(tokens):
        yield event("response.output_text.delta", **where, delta="t ")
    yield event("response.output_text.done", **where, text="t " * tokens)
    whole = ask.response("completed", [ask.message("t " * tokens)], ask.response_usage())
    yield event("response.completed", response=whole)


# Events each stream sends before its first token: a leak after two tokens skips these first.
STREAMS = {CHAT: (chat_events, 0), COMPLETIONS: (completion_events, 0), RESPONSES: (response_events, 2)}


async def send_stream(ask: Ask, events: Iterable[bytes], pieces: Iterable[bytes] = ()) -> web.StreamResponse:
    """`events` `delay_ms` apart, then `pieces` (one event cut in parts) as separate writes."""
    headers = {"content-type": "text/event-stream", "cache-control": "no-cache", **ask.headers}
    packer = zlib.compressobj(wbits=31) if ask.knobs.gzip else None  # flushed after each write: event by event
    if packer is not None:
        headers["Content-Encoding"] = "gzip"
    resp = web.StreamResponse(status=ask.status, headers=headers)

    async def write(data: bytes) -> None:
        await resp.write(data if packer is None else packer.compress(data) + packer.flush(zlib.Z_SYNC_FLUSH))

    try:
        await resp.prepare(ask.request)
        for i, event in enumerate(events):
            if i and ask.knobs.delay_ms:
                await asyncio.sleep(ask.knobs.delay_ms / 1000)
            await write(event)
        for i, piece in enumerate(pieces):
            if i:
                await asyncio.sleep(SPLIT_PAUSE_S)
            await write(piece)
        if packer is not None:
            await resp.write(packer.flush())
        await resp.write_eof()
    except ConnectionResetError:
        pass  # the client left: there is no one to tell
    return resp


class Upstream:
    def __init__(self, key: str) -> None:
        self.key = key
        self.log: deque[dict[str, Any]] = deque(maxlen=LOG_SIZE)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body: Any = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        headers = {k.lower(): v for k, v in request.headers.items()}
        entry = {"path": request.path, "method": request.method, "headers": headers, "body": body, "raw_size": len(raw)}
        self.log.append(entry)
        try:
            knobs = Knobs.of(request.headers)
        except ValueError as exc:
            return json_response(envelope(str(exc), "invalid_request_error", "bad_hostile_header"), 400)
        await asyncio.sleep(knobs.ttfb_ms / 1000)
        if request.headers.get("Authorization") != f"Bearer {self.key}":
            message = f"Incorrect API key provided: expected key {self.key}"
            return json_response(envelope(message, "invalid_request_error", "invalid_api_key"), 401)
        ask = Ask(request, body if isinstance(body, dict) else {}, knobs, status=knobs.status or 200)
        if knobs.leak == "body":
            status = knobs.status or 400
            retry = {"retry-after": "1"} if status == 429 else None
            message = f"request rejected for key {self.key}"
            resp = json_response(envelope(message, "invalid_request_error", "rejected"), status, retry)
            if knobs.gzip:
                resp.body = gzip.compress(orjson.dumps(envelope(message, "invalid_request_error", "rejected")))
                resp.headers["Content-Encoding"] = "gzip"
            return resp
        if knobs.leak == "header":
            ask.headers = {"x-upstream-debug": f"key={self.key}", "x-upstream-trace": "ok"}
        if ask.status >= 400:
            message = f"hostile upstream answered {ask.status}"
            return json_response(envelope(message, "server_error", "hostile_status"), ask.status, ask.headers)
        if knobs.leak == "event":
            # A provider that breaks mid-answer has already started a stream, whatever the request asked for.
            return await self.leak_event(ask)
        if ask.stream and request.path in STREAMS:
            return await send_stream(ask, STREAMS[request.path][0](ask))
        return json_response(self.answer(ask), ask.status, ask.headers)

    async def leak_event(self, ask: Ask) -> web.StreamResponse:
        events, preamble = STREAMS.get(ask.request.path, STREAMS[CHAT])
        # Two tokens of one choice, and no usage: the error is all the client learns of the end.
        two = dataclasses.replace(ask.knobs, completion_tokens=2, no_usage=True)
        before = itertools.islice(events(dataclasses.replace(ask, knobs=two, body={**ask.body, "n": 1})), preamble + 2)
        error = {"message": f"upstream broke for key {self.key}", "type": "server_error", "code": "boom"}
        event = sse({"error": error})
        cut = event.index(self.key.encode()) + len(self.key) // 2
        return await send_stream(ask, before, [event[:cut], event[cut:]] if ask.knobs.split else [event])

    def answer(self, ask: Ask) -> dict[str, Any]:
        path, n, tokens = ask.request.path, ask.choices(), ask.completion_tokens()
        texts = ["t " * len(range(i, tokens, n)) for i in range(n)]
        answer: dict[str, Any]
        if path == RESPONSES:
            return ask.response("completed", [ask.message(texts[0])], ask.response_usage())
        if path == CHAT:
            choices = [
                {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                for i, text in enumerate(texts)
            ]
            answer = {"id": f"chatcmpl-{ask.id}", "object": "chat.completion", "created": ask.created}
            answer |= {"model": ask.model, "choices": choices, "usage": ask.usage()}
        elif path == COMPLETIONS:
            choice = {"index": 0, "text": texts[0], "logprobs": None, "finish_reason": "stop"}
            answer = {"id": f"cmpl-{ask.id}", "object": "text_completion", "created": ask.created}
            answer |= {"model": ask.model, "choices": [choice], "usage": ask.usage()}
        elif path == EMBEDDINGS:
            raw = ask.body.get("input")
            count = len(raw) if isinstance(raw, list) else 1
            data = [{"object": "embedding", "index": i, "embedding": [0.25, -0.5, 0.75]} for i in range(count)]
            prompt = ask.prompt_tokens()
            usage = {"prompt_tokens": prompt, "total_tokens": prompt}
            answer = {"object": "list", "data": data, "model": ask.model, "usage": usage}
        else:
            answer = {"object": "hostile.echo", "path": path, "usage": ask.usage()}
        return without_usage(answer) if ask.knobs.no_usage else answer


def create_app(key: str) -> web.Application:
    upstream = Upstream(key)
    app = web.Application()

    async def requests(request: web.Request) -> web.Response:
        return json_response(list(upstream.log))

    async def clear(request: web.Request) -> web.Response:
        upstream.log.clear()
        return web.Response(status=204)

    app.router.add_get("/_hostile/requests", requests)
    app.router.add_delete("/_hostile/requests", clear)
    app.router.add_route("*", "/v1/{tail:.*}", upstream.handle)
    return app


async def serve(host: str, port: int, key: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    # A slow stream must not hold up a test's teardown for aiohttp's default 60 s.
    runner = web.AppRunner(create_app(key), handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        print(f"hostile upstream listening on http://{host}:{port}/v1", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.hostile_upstream", description=__doc__.splitlines()[0])
    parser.add_argument("--bind", required=True, metavar="HOST:PORT")
    args = parser.parse_args(argv)
    host, _, port = str(args.bind).rpartition(":")
    key = os.environ.get(KEY_ENV, "")
    if not host or not port.isdigit():
        parser.error(f"--bind must be HOST:PORT, got {args.bind!r}")
    if not key:
        parser.error(f"set {KEY_ENV} to the key the upstream expects")
    asyncio.run(serve(host, int(port), key))


@dataclass
class Hostile:
    """A hostile upstream process, as a test drives it."""

    proc: subprocess.Popen[bytes]
    port: int
    key: str
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def requests(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.url}/_hostile/requests", timeout=5) as resp:
            entries: list[dict[str, Any]] = json.loads(resp.read())
            return entries

    def clear(self) -> None:
        request = urllib.request.Request(f"{self.url}/_hostile/requests", method="DELETE")
        urllib.request.urlopen(request, timeout=5).close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_hostile(tmp: Path, key: str) -> Hostile:
    # Imported here: the server process has no use for conftest's pytest, Redis and proxy imports.
    from tests.conftest import free_port, wait_for_port

    port = free_port()
    log = tmp / f"hostile-{port}.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.hostile_upstream", "--bind", f"127.0.0.1:{port}"],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, KEY_ENV: key}, cwd=ROOT,
        )  # fmt: skip
    hostile = Hostile(proc, port, key, log)
    try:
        wait_for_port(port, proc, log)
    except BaseException:
        hostile.stop()
        raise
    return hostile


if __name__ == "__main__":
    main()
