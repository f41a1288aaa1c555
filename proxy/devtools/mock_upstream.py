"""Fake OpenAI-compatible upstream for the demo, end-to-end tests and benchmarks.

Every knob can be set per request with an ``x-mock-<knob>`` header, for the
whole server with ``POST /_mock/faults`` (so one of several mocks can fail
without touching the requests), or through :class:`MockOptions`.  Requests to
``/v1`` are logged with timestamps in ``GET /_mock/requests`` so tests can
check *when* the gateway sent, read and abandoned its upstream requests;
``GET /v1/models`` requests are logged apart, in ``GET /_mock/models``, with the
list it serves (``POST /_mock/models`` replaces that list).
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
import uuid
import zlib
from collections import deque
from typing import Any

import orjson
from aiohttp import ClientConnectionResetError, web

from ..http.listen import binding
from .mock_parts import (
    HANG_LIMIT_S,
    KNOBS,
    LOG_SIZE,
    Knobs,
    MockExchange,
    MockOptions,
    MockRecord,
    Route,
    big_event,
    count_words,
    error_envelope,
    fake_embedding,
    json_response,
    resolve_knobs,
    sse,
)

__all__ = ["MockOptions", "MockUpstream", "bound_port", "create_mock_app", "run_mock", "start_mock"]


class MockUpstream:
    def __init__(self, options: MockOptions) -> None:
        self.options = options
        self.faults: dict[str, str] = {}
        self.models = options.models  # what GET /v1/models lists; POST /_mock/models changes it
        self.log: deque[MockRecord] = deque(maxlen=LOG_SIZE)
        # A gateway fetches GET /v1/models on its own schedule: those go here, so the request log
        # holds only what a test made the gateway send.
        self.models_log: deque[MockRecord] = deque(maxlen=LOG_SIZE)
        self._ids = itertools.count(1)
        # Only these answer completions/embeddings, so only they get ttfb.
        self._model_routes: dict[tuple[str, str], Route] = {
            ("POST", "/v1/chat/completions"): self._chat,
            ("POST", "/v1/completions"): self._completions,
            ("POST", "/v1/embeddings"): self._embeddings,
        }

    async def handle_v1(self, request: web.Request) -> web.StreamResponse:
        record = MockRecord(
            id=request.headers.get("x-request-id") or str(next(self._ids)),
            path=request.path,
            raw_path=request.raw_path,
            method=request.method,
            headers={k.lower(): v for k, v in request.headers.items()},
            started_at=time.time(),
        )
        (self.models_log if request.path == "/v1/models" else self.log).append(record)
        try:
            return await self._serve(MockExchange(request, record))
        except asyncio.CancelledError:
            # handler_cancellation turns the client going away into this, so
            # it is the earliest moment the disconnect can be observed.
            record.finish("disconnected")
            raise
        finally:
            record.finish("error")

    async def _serve(self, ex: MockExchange) -> web.StreamResponse:
        request, record = ex.request, ex.record
        raw = await request.read()
        bad_json = False
        try:
            record.body = orjson.loads(raw) if raw.strip() else None
        except orjson.JSONDecodeError:
            bad_json = True
        if isinstance(record.body, dict):
            ex.body = record.body
        record.stream = ex.body.get("stream") is True

        key = self.options.api_key
        if key is not None and request.headers.get("Authorization") != f"Bearer {key}":
            return await ex.fail(401, "Incorrect API key provided.", "invalid_api_key")
        try:
            knobs = resolve_knobs(record.headers, self.faults, self.options)
        except ValueError as exc:
            return await ex.fail(400, f"bad mock knob: {exc}", "bad_mock_knob")
        ex.gzip = knobs.gzip
        name = self.options.name
        if knobs.status is not None:
            message = f"mock {name} injected status {knobs.status}"
            return await ex.fail(knobs.status, message, "mock_error", "mock_error")
        if knobs.hang:
            await asyncio.sleep(HANG_LIMIT_S)
            return await ex.fail(504, f"mock {name} hang expired", "mock_error")
        route = self._model_routes.get((request.method, request.path))
        if bad_json or (route is not None and not isinstance(record.body, dict)):
            return await ex.fail(400, "Body is not a JSON object.", "invalid_json")

        if route is not None:
            await asyncio.sleep(knobs.ttfb_ms / 1000)
        if knobs.reset_after is not None and not record.stream:
            ex.reset()
            # Sending this fails on the aborted transport; aiohttp ignores that.
            return web.Response()
        if knobs.garbage:
            garbage = b'{"id": "chatcmpl-1", <<not json'
            return await ex.send(web.Response(body=garbage, content_type="application/json"))
        if route is None:
            route = self._models if request.path == "/v1/models" else self._echo
        return await route(ex, knobs)

    async def _chat(self, ex: MockExchange, knobs: Knobs) -> web.StreamResponse:
        messages = ex.body.get("messages")
        if not isinstance(messages, list):
            messages = []
        prompt = [m.get("content") for m in messages if isinstance(m, dict)]
        return await self._generate(ex, knobs, prompt, chat=True)

    async def _completions(self, ex: MockExchange, knobs: Knobs) -> web.StreamResponse:
        return await self._generate(ex, knobs, ex.body.get("prompt"), chat=False)

    async def _generate(self, ex: MockExchange, knobs: Knobs, prompt: Any, *, chat: bool) -> web.StreamResponse:
        record = ex.record
        texts = [f"tok{i} " for i in range(knobs.chunks)]
        if texts:
            texts[0] = f"[{self.options.name}] {texts[0]}"
        prompt_tokens = max(1, count_words(prompt))
        usage: dict[str, Any] = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": knobs.chunks,
            "total_tokens": prompt_tokens + knobs.chunks,
        }
        if knobs.cached_tokens is not None:
            usage["prompt_tokens_details"] = {"cached_tokens": min(knobs.cached_tokens, prompt_tokens)}
        base = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": ex.body.get("model") or self.options.models[0],
        }

        def choice(text: str | None, finish: str | None, *, role: bool = False) -> dict[str, Any]:
            if not chat:
                return {
                    "index": 0,
                    "text": text or "",
                    "logprobs": None,
                    "finish_reason": finish,
                }
            content: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                content["content"] = text
            key = "delta" if record.stream else "message"
            return {"index": 0, key: content, "finish_reason": finish}

        if not record.stream:
            answer = {
                **base,
                "choices": [choice("".join(texts), "stop", role=True)],
                "usage": usage,
            }
            return await ex.reply(answer)

        options = ex.body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        if chat:
            base["object"] = "chat.completion.chunk"
        if include_usage:
            # OpenAI marks every chunk before the usage one with an explicit null.
            base["usage"] = None
        resp = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
        # Flushed after every write, so a compressed stream still arrives event by event.
        packer = zlib.compressobj(wbits=31) if knobs.gzip else None
        if packer is not None:
            resp.headers["Content-Encoding"] = "gzip"

        async def write(data: bytes) -> None:
            await resp.write(data if packer is None else packer.compress(data) + packer.flush(zlib.Z_SYNC_FLUSH))

        async def emit(event: bytes) -> None:
            if knobs.split_events:
                await write(event[: len(event) // 2])
                await asyncio.sleep(0.005)
                event = event[len(event) // 2 :]
            await write(event)

        big = None
        if knobs.big_event is not None:
            # Late, it belongs to a second choice: the first one has finished.
            index = 1 if knobs.big_event_late else 0
            big = big_event(
                knobs.big_event, lambda text: sse({**base, "choices": [{**choice(text, None), "index": index}]})
            )
        reset_at = knobs.reset_after if knobs.reset_after is not None else knobs.reset_mid_event
        try:
            await resp.prepare(ex.request)
            record.headers_sent_at = time.time()
            if chat:
                await emit(sse({**base, "choices": [choice("", None, role=True)]}))
            if big is not None and not knobs.big_event_late:
                await write(big)
            for i, text in enumerate(texts):
                if reset_at is not None and i >= reset_at:
                    break
                delay = knobs.chunk_delay_ms if i else 0.0
                if knobs.slow_chunk is not None and knobs.slow_chunk[0] == i:
                    delay += knobs.slow_chunk[1]
                await asyncio.sleep(delay / 1000)
                await emit(sse({**base, "choices": [choice(text, None)]}))
                record.chunk_sent_at.append(time.time())
            if reset_at is not None:
                if knobs.reset_mid_event is not None:
                    half = sse({**base, "choices": [choice("cut", None)]})
                    await write(half[: len(half) // 2])
                    await asyncio.sleep(0.02)
                ex.reset()
                return resp
            await emit(sse({**base, "choices": [choice(None, "stop")]}))
            if big is not None and knobs.big_event_late:
                await write(big)
            if include_usage:
                await emit(sse({**base, "choices": [], "usage": usage}))
            await emit(b"data: [DONE]\n\n")
            if packer is not None:
                await resp.write(packer.flush())
            await resp.write_eof()
        except (ConnectionResetError, ClientConnectionResetError):
            record.finish("disconnected")
            return resp
        record.finish("completed")
        return resp

    async def _embeddings(self, ex: MockExchange, knobs: Knobs) -> web.StreamResponse:
        raw = ex.body.get("input", "")
        inputs = [
            x if isinstance(x, str) else orjson.dumps(x).decode() for x in (raw if isinstance(raw, list) else [raw])
        ]
        tokens = max(1, count_words(inputs))
        answer = {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": fake_embedding(text)} for i, text in enumerate(inputs)
            ],
            "model": ex.body.get("model") or self.options.models[-1],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return await ex.reply(answer)

    async def _models(self, ex: MockExchange, knobs: Knobs) -> web.StreamResponse:
        owner = self.options.name
        data = [{"id": m, "object": "model", "created": 0, "owned_by": owner} for m in self.models]
        answer = {"object": "list", "data": data}
        return await ex.reply(answer)

    async def _echo(self, ex: MockExchange, knobs: Knobs) -> web.StreamResponse:
        answer = {
            "object": "mock.echo",
            "path": ex.request.path,
            "method": ex.request.method,
            "model": ex.body.get("model"),
            "mock": self.options.name,
        }
        return await ex.reply(answer)

    async def get_requests(self, request: web.Request) -> web.Response:
        return json_response(list(self.log))

    async def clear_requests(self, request: web.Request) -> web.Response:
        self.log.clear()
        self.models_log.clear()
        return web.Response(status=204)

    async def get_faults(self, request: web.Request) -> web.Response:
        return json_response(self.faults)

    async def set_faults(self, request: web.Request) -> web.Response:
        try:
            payload = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            payload = None
        if not isinstance(payload, dict) or not set(payload) <= set(KNOBS):
            message = f"expected a JSON object with keys among {list(KNOBS)}"
            return json_response(error_envelope(message, "bad_mock_knob"), 400)
        # Stored as header-style strings so one parser serves both sources.
        faults = {k: str(int(v) if isinstance(v, bool) else v) for k, v in payload.items()}
        try:
            resolve_knobs({}, faults, self.options)
        except ValueError as exc:
            return json_response(error_envelope(f"bad mock knob: {exc}", "bad_mock_knob"), 400)
        # Replacing rather than merging keeps each test's fault setup self-contained.
        self.faults = faults
        return json_response(self.faults)

    async def clear_faults(self, request: web.Request) -> web.Response:
        self.faults = {}
        return web.Response(status=204)

    async def get_models(self, request: web.Request) -> web.Response:
        return json_response({"models": self.models, "requests": list(self.models_log)})

    async def set_models(self, request: web.Request) -> web.Response:
        try:
            payload = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            payload = None
        if not isinstance(payload, list) or not all(isinstance(m, str) and m for m in payload):
            return json_response(error_envelope("expected a JSON list of model names", "bad_mock_models"), 400)
        self.models = tuple(payload)
        return await self.get_models(request)


MOCK_KEY = web.AppKey("mock_upstream", MockUpstream)


def create_mock_app(options: MockOptions) -> web.Application:
    mock = MockUpstream(options)
    app = web.Application()
    app[MOCK_KEY] = mock
    app.router.add_get("/_mock/requests", mock.get_requests)
    app.router.add_delete("/_mock/requests", mock.clear_requests)
    app.router.add_get("/_mock/faults", mock.get_faults)
    app.router.add_post("/_mock/faults", mock.set_faults)
    app.router.add_delete("/_mock/faults", mock.clear_faults)
    app.router.add_get("/_mock/models", mock.get_models)
    app.router.add_post("/_mock/models", mock.set_models)
    app.router.add_route("*", "/v1/{tail:.*}", mock.handle_v1)
    return app


async def start_mock(options: MockOptions) -> web.AppRunner:
    # Hanging handlers are the point of this server, so they must not hold up
    # test teardown or Ctrl+C for aiohttp's default 60 s.
    runner = web.AppRunner(
        create_mock_app(options),
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=1.0,
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, options.host, options.port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


def bound_port(runner: web.AppRunner) -> int:
    if not runner.addresses:
        raise RuntimeError("mock upstream is not listening")
    return int(runner.addresses[0][1])


def run_mock(options: MockOptions) -> None:
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        with binding(options.host, options.port, "--bind"):
            runner = await start_mock(options)
        try:
            url = f"http://{options.host}:{bound_port(runner)}/v1"
            print(f"mock upstream listening on {url}", flush=True)
            await stop.wait()
        finally:
            await runner.cleanup()

    asyncio.run(main())
