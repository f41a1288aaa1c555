"""create_app(settings): the ASGI entry, dispatch by path, lifespan resources."""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
import orjson
from starlette.types import Receive, Scope, Send

from .auth import authenticate, extract_key, mask_key
from .errors import GatewayError, Header, InvalidRequest, LimiterUnavailable, MethodNotAllowed, NotFound
from .events import RequestRecord
from .relay import BodyFor, ClientGone, DisconnectWatcher, Exchange, Kind, read_body, relay
from .routing import Router
from .settings import ConfigError, KeySettings, ProviderSettings, Settings, load_settings
from .upstream import ProviderClient, create_session
from .usage import Usage

log = logging.getLogger("sluicegate")

MODEL_ROUTES = frozenset({"/chat/completions", "/completions", "/embeddings"})
STREAMING_ROUTES = frozenset({"/chat/completions", "/completions"})
REQUIRED_FIELD = {"/chat/completions": "messages", "/completions": "prompt", "/embeddings": "input"}
WANTED_HEADERS = frozenset({b"authorization", b"x-api-key", b"x-request-id", b"x-ai-provider", b"content-length"})
SANE_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:@/+=-]{1,128}$")
JSON_HEADERS: tuple[Header, ...] = ((b"content-type", b"application/json"),)


@dataclass(frozen=True, slots=True)
class Runtime:
    """Everything derived from one Settings; a request keeps the one it started with."""

    settings: Settings
    router: Router
    clients: Mapping[str, ProviderClient]

    @classmethod
    def build(cls, settings: Settings) -> Runtime:
        return cls(settings, Router(settings), {p.name: ProviderClient.build(p) for p in settings.providers})


class Gateway:
    def __init__(self, settings: Settings) -> None:
        self.runtime = Runtime.build(settings)
        self.session: aiohttp.ClientSession | None = None
        self.started_at = int(time.time())
        self.draining = False

    def reload(self) -> bool:
        """Re-read the config file; a broken file keeps the old config."""
        source = self.runtime.settings.source
        try:
            settings = load_settings(source)
        except ConfigError as exc:
            log.error("config reload rejected, keeping the old config: %s", "; ".join(exc.problems))
            return False
        self.runtime = Runtime.build(settings)
        log.info("config reloaded from %s", source)
        return True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.handle_http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self.lifespan(receive, send)

    async def lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.session = create_session()
                for warning in self.runtime.settings.warnings:
                    log.warning("%s", warning)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.session is not None:
                    await self.session.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def handle_http(self, scope: Scope, receive: Receive, send: Send) -> None:
        wanted: dict[bytes, bytes] = {}
        for name, value in scope["headers"]:
            if name in WANTED_HEADERS:
                wanted[name] = value
        given_id = wanted.get(b"x-request-id")
        request_id = (
            given_id.decode() if given_id and SANE_REQUEST_ID.match(given_id) else "req_" + secrets.token_hex(12)
        )
        record = RequestRecord.start(request_id, scope["method"])
        ex = Exchange(send, record, [(b"x-request-id", request_id.encode())])
        runtime = self.runtime
        try:
            await self.dispatch(scope, receive, ex, runtime, wanted)
        except GatewayError as err:
            if not ex.started:
                await ex.error(err)
        except ClientGone:
            record.client_disconnected = True
        except Exception:
            # Never a traceback to the client; the log line has no headers or body.
            log.exception("unhandled error in request %s", request_id)
            if not ex.started:
                await ex.error(GatewayError("Internal error in the gateway."))
        finally:
            record.ended_at = time.perf_counter()

    async def dispatch(
        self, scope: Scope, receive: Receive, ex: Exchange, runtime: Runtime, wanted: dict[bytes, bytes]
    ) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        if path == "/healthz":
            return await ex.respond(200, JSON_HEADERS, b'{"status":"ok"}')
        if path == "/readyz":
            if self.draining:
                return await ex.respond(503, JSON_HEADERS, b'{"status":"draining"}')
            return await ex.respond(200, JSON_HEADERS, b'{"status":"ready"}')
        if self.draining:
            raise LimiterUnavailable("The gateway is shutting down; retry on another instance.")
        rest = _strip_prefix(path, runtime.settings.server.prefixes)
        if rest is None:
            raise NotFound(_missing_prefix_message(path, runtime.settings.server.prefixes))
        ex.record.route = rest if rest in MODEL_ROUTES or rest == "/models" else "passthrough"
        key = self.authenticate(wanted, ex.record, runtime)
        if rest == "/models":
            if method != "GET":
                raise MethodNotAllowed(f"Expected GET for {path}, but got {method}.")
            return await self.list_models(ex, runtime, key)
        if rest in MODEL_ROUTES and method != "POST":
            raise MethodNotAllowed(f"Expected POST for {path}, but got {method}.")
        length = wanted.get(b"content-length")
        body = await read_body(
            receive, runtime.settings.server.max_body_bytes, int(length) if length and length.isdigit() else None
        )
        pinned = wanted[b"x-ai-provider"].decode("latin-1") if b"x-ai-provider" in wanted else None
        query = scope.get("query_string", b"")
        path_and_query = rest + ("?" + query.decode("latin-1") if query else "")
        if rest in MODEL_ROUTES:
            await self.model_request(scope, receive, ex, runtime, key, rest, path_and_query, body, pinned)
        else:
            await self.passthrough(scope, receive, ex, runtime, key, path_and_query, body, pinned)

    def authenticate(self, wanted: dict[bytes, bytes], record: RequestRecord, runtime: Runtime) -> KeySettings:
        auth = wanted.get(b"authorization")
        api_key = wanted.get(b"x-api-key")
        presented = extract_key(
            auth.decode("latin-1") if auth is not None else None,
            api_key.decode("latin-1") if api_key is not None else None,
        )
        record.key = mask_key(presented)
        key = authenticate(presented, runtime.settings.keys)
        record.key_name = key.name
        record.group = key.group
        return key

    async def list_models(self, ex: Exchange, runtime: Runtime, key: KeySettings) -> None:
        data = [
            {"id": model, "object": "model", "created": self.started_at, "owned_by": owner}
            for model, owner in runtime.router.models_for(key)
        ]
        await ex.respond(200, JSON_HEADERS, orjson.dumps({"object": "list", "data": data}))

    async def model_request(
        self,
        scope: Scope,
        receive: Receive,
        ex: Exchange,
        runtime: Runtime,
        key: KeySettings,
        route: str,
        path_and_query: str,
        body: bytes,
        pinned: str | None,
    ) -> None:
        payload = _json_object(body)
        model = payload.get("model")
        if model is None or model == "":
            raise InvalidRequest("The request has no 'model' field.", param="model", code="missing_model")
        if not isinstance(model, str):
            raise InvalidRequest("Expected 'model' to be a string.", param="model")
        stream = payload.get("stream", False)
        if not isinstance(stream, bool):
            raise InvalidRequest("Expected 'stream' to be true or false.", param="stream")
        field = REQUIRED_FIELD[route]
        if field not in payload:
            raise InvalidRequest(f"The request has no '{field}' field.", param=field)
        ex.record.model = model
        ex.record.stream = stream
        chosen = runtime.router.route(model, key, pinned)
        ex.record.upstream_model = chosen.upstream_model
        kind: Kind = "stream" if stream and route in STREAMING_ROUTES else "json"
        bodies = _BodyVariants(payload, body, chosen.upstream_model != model, chosen.upstream_model, kind)
        await self._relay(scope, receive, ex, runtime, chosen.providers, path_and_query, bodies.body_for, kind)

    async def passthrough(
        self,
        scope: Scope,
        receive: Receive,
        ex: Exchange,
        runtime: Runtime,
        key: KeySettings,
        path_and_query: str,
        body: bytes,
        pinned: str | None,
    ) -> None:
        model = _model_field(body)
        if model is not None:
            ex.record.model = model
            chosen = runtime.router.route(model, key, pinned)
            providers = chosen.providers
            ex.record.upstream_model = chosen.upstream_model
            if chosen.upstream_model != model:
                payload = _json_object(body)
                payload["model"] = chosen.upstream_model
                body = orjson.dumps(payload)
        elif pinned is not None:
            providers = (runtime.router.pinned(pinned),)
        else:
            raise NotFound(
                f"Cannot route {scope['path']}: the body has no 'model' field and there is no X-AI-Provider header."
            )
        await self._relay(scope, receive, ex, runtime, providers, path_and_query, lambda _c: (body, False), "raw")

    async def _relay(
        self,
        scope: Scope,
        receive: Receive,
        ex: Exchange,
        runtime: Runtime,
        providers: tuple[ProviderSettings, ...],
        path_and_query: str,
        body_for: BodyFor,
        kind: Kind,
    ) -> None:
        assert self.session is not None, "lifespan startup did not run"
        attempts = [runtime.clients[p.name] for p in runtime.router.attempt_order(providers)]
        watcher = DisconnectWatcher(receive)
        try:
            await relay(
                ex, self.session, attempts, scope["method"], path_and_query, scope["headers"],
                body_for, kind, watcher, lambda usage: _record_usage(ex.record, usage),
            )  # fmt: skip
        except asyncio.CancelledError:
            if not watcher.disconnected:
                raise
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            ex.record.client_disconnected = True
        finally:
            watcher.stop()


class _BodyVariants:
    """The upstream body, re-encoded only when an alias or include_usage changes it."""

    def __init__(self, payload: dict[str, object], raw: bytes, renamed: bool, upstream_model: str, kind: Kind) -> None:
        self.payload = payload
        self.raw = raw
        self.renamed = renamed
        self.upstream_model = upstream_model
        options = payload.get("stream_options")
        self.client_asked = isinstance(options, dict) and options.get("include_usage") is True
        self.kind = kind
        self._cache: dict[bool, bytes] = {}

    def body_for(self, client: ProviderClient) -> tuple[bytes, bool]:
        inject = self.kind == "stream" and client.settings.stream_usage and not self.client_asked
        body = self._cache.get(inject)
        if body is None:
            if not inject and not self.renamed:
                body = self.raw
            else:
                payload = dict(self.payload)
                if self.renamed:
                    payload["model"] = self.upstream_model
                if inject:
                    options = payload.get("stream_options")
                    payload["stream_options"] = {
                        **(options if isinstance(options, dict) else {}),
                        "include_usage": True,
                    }
                body = orjson.dumps(payload)
            self._cache[inject] = body
        return body, inject


def _record_usage(record: RequestRecord, usage: Usage) -> None:
    record.prompt_tokens = usage.prompt_tokens
    record.completion_tokens = usage.completion_tokens
    record.total_tokens = usage.total_tokens


def _strip_prefix(path: str, prefixes: tuple[str, ...]) -> str | None:
    for prefix in prefixes:
        if path.startswith(prefix) and len(path) > len(prefix) and path[len(prefix)] == "/":
            return path[len(prefix) :]
    return None


def _missing_prefix_message(path: str, prefixes: tuple[str, ...]) -> str:
    return (
        f"Unknown path {path!r}. The base URL must end in {prefixes[0]!r} "
        f"(for example http://HOST:PORT{prefixes[0]}), so requests go to {prefixes[0]}/chat/completions."
    )


def _json_object(body: bytes) -> dict[str, object]:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest("The request body is not valid JSON.", code="invalid_json") from exc
    if not isinstance(payload, dict):
        raise InvalidRequest("Expected the request body to be a JSON object.")
    return payload


def _model_field(body: bytes) -> str | None:
    if not body.lstrip().startswith(b"{"):
        return None
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    model = payload.get("model") if isinstance(payload, dict) else None
    return model if isinstance(model, str) and model else None


def create_app(settings: Settings) -> Gateway:
    return Gateway(settings)
