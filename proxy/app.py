"""create_app(settings): the ASGI entry, dispatch by path (routes.py), lifespan resources."""

from __future__ import annotations

import asyncio
import gc
import hmac
import logging
import re
import secrets
import time
from urllib.parse import quote

import orjson
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import Receive, Scope, Send

from . import billing
from .admin import key_usage
from .auth import CREDENTIAL_HEADERS, authenticate, extract_key, key_digest, mask_key, two_credentials
from .connections import discarding_body
from .endpoints import MODEL_ROUTES, model_request, passthrough
from .errors import (
    GatewayError,
    Header,
    HeadersTooLarge,
    InvalidApiKey,
    InvalidRequest,
    LimiterUnavailable,
    MethodNotAllowed,
    NotFound,
    PermissionDenied,
    RateLimited,
)
from .events import EventSink
from .exchange import AnswerState, Exchange
from .limits import KeyLimits, Limiter, LimiterFailure
from .metrics import Metrics, latency_bucket
from .model_list import ModelLists
from .record import RequestRecord
from .redact import KEY_LIKE, clip
from .relay import CLOSE, ClientGone, read_body
from .routes import Access, Answer, Asked, Found, RouteTable, Row, strip_prefix
from .routing import Router
from .settings import ADMIN_TOKEN_ENV, ConfigError, KeySettings, Settings, load_settings
from .types import Call, Runtime
from .upstream import ProviderClient, Sessions

log = logging.getLogger("sluicegate")

WANTED_HEADERS = frozenset(
    {b"authorization", b"x-api-key", b"x-request-id", b"x-ai-provider", b"content-length", b"transfer-encoding"}
)
# Lines counted as they go on the wire ("name: value\r\n"). Below what providers' servers take
# (aiohttp: 128 headers, 8190 bytes a field; nginx: 8 KiB a line, 4 x 8 KiB in all), so what passes
# here can be forwarded; hypercorn's own parser limit sits above these (server.py).
MAX_HEADERS = 100
MAX_HEADER_LINE_BYTES = 8 * 1024
MAX_HEAD_BYTES = 32 * 1024
SANE_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:@/+=-]{1,128}$")
RUNTIME_SAMPLE_S = 5.0
# Young objects are collected every this many net allocations. With 1,000 streams open, the
# default (700) ran passes of 20-100 ms several times a second: TTFB p90 / p99 64 / 145 ms,
# against 13 / 31 ms with this and 7 / 22 ms with no automatic collection at all.
GC_YOUNG_THRESHOLD = 20_000
UNSAFE_IN_PATH = re.compile(r"[\x00-\x1f\x7f;?#%\\]")


def build_runtime(settings: Settings) -> Runtime:
    """Built once per config, at start-up and on each reload, never per request."""
    router = Router(settings)
    return Runtime(
        settings=settings,
        router=router,
        clients={p.name: ProviderClient.build(p) for p in settings.providers},
        limits={
            k.sha256: KeyLimits.build(k, settings.groups[k.group], settings.limits) for k in settings.keys.values()
        },
        model_labels=frozenset(router.known_models),
    )


class Gateway:
    def __init__(self, settings: Settings, extra_keys: tuple[KeySettings, ...] = ()) -> None:
        """extra_keys: keys made at start-up (the demo's), kept across config reloads."""
        self.extra_keys = extra_keys
        self.runtime = build_runtime(settings.with_keys(*extra_keys))
        self.sessions: Sessions | None = None
        self.limiter: Limiter | None = None
        self.events: EventSink | None = None
        self.model_lists: ModelLists | None = None
        self.metrics = Metrics()
        self.started_at = int(time.time())
        self.draining = False
        self._sampler: asyncio.Task[None] | None = None
        self.routes = RouteTable(
            Row("/healthz", self.healthz, access=Access.OPEN),
            Row("/readyz", self.readyz, access=Access.OPEN),
            Row("/metrics", self.scrape, access=Access.OPEN),
            Row("/models", self.list_models),
            Row("/dashboard/billing/subscription", self.billing_subscription),
            Row("/dashboard/billing/usage", self.billing_usage),
            Row("/admin/keys/{name}/usage", self.admin_key_usage, access=Access.ADMIN),
        )

    def reload(self) -> bool:
        """Re-read the config file; a broken file keeps the old config."""
        source = self.runtime.settings.source
        try:
            settings = load_settings(source).with_keys(*self.extra_keys)
        except ConfigError as exc:
            log.error("config reload rejected, keeping the old config: %s", "; ".join(exc.problems))
            return False
        for section in ("redis", "events"):
            if getattr(settings, section) != getattr(self.runtime.settings, section):
                log.warning("[%s] changed: the new settings take effect after a restart", section)
        self.runtime = build_runtime(settings)
        if self.events is not None:
            self.events.reopen()
        if self.model_lists is not None:
            self.model_lists.wake()
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
                try:
                    await self.startup()
                except Exception as exc:
                    # Said plainly and fatal: hypercorn would otherwise serve on without the lifespan.
                    log.exception("start-up failed")
                    await send({"type": "lifespan.startup.failed", "message": f"start-up failed: {exc}"})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._sampler is not None:
                    self._sampler.cancel()
                if self.model_lists is not None:
                    await self.model_lists.close()
                if self.events is not None:
                    await self.events.close()
                if self.sessions is not None:
                    await self.sessions.close()
                if self.limiter is not None:
                    await self.limiter.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def startup(self) -> None:
        settings = self.runtime.settings
        self.sessions = Sessions(on_wait=self.pool_waited)
        self.limiter = Limiter(
            settings.redis,
            on_error=self.metrics.limiter_errors.inc,
            on_circuit=self.circuit_changed,
            on_lost=self.metrics.settles_lost.inc,
        )
        self.events = EventSink(settings.events, latency_bucket, self.metrics.events_dropped.inc, self.limiter.client)
        self.events.start()
        self._sampler = asyncio.create_task(self._sample_runtime())
        self.model_lists = ModelLists(self.sessions, lambda: self.runtime.settings)
        self.model_lists.start()
        for warning in settings.warnings:
            log.warning("%s", warning)
        problem = await self.limiter.ping()
        if problem is not None:
            then = "requests are admitted unchecked" if settings.redis.on_error == "allow" else "requests get 503"
            log.warning("limits are NOT enforced: Redis does not answer (%s); %s until it does", problem, then)
        # What exists now lives as long as the worker: keep it out of every later GC pass.
        gc.freeze()
        # The young generation less often than Python's 700 allocations (see GC_YOUNG_THRESHOLD).
        gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])

    async def _sample_runtime(self) -> None:
        """Pool sizes, tasks and the event queue, for /metrics: sampled, so requests pay nothing for them."""
        while True:
            self.sample_runtime()
            await asyncio.sleep(RUNTIME_SAMPLE_S)

    def sample_runtime(self) -> None:
        if self.sessions is not None and self.events is not None:
            owed = self.limiter.owed if self.limiter is not None else 0
            self.metrics.sample_runtime(
                self.sessions.pool_stats(), len(asyncio.all_tasks()), self.events.queue.qsize(), owed
            )

    def pool_waited(self, provider: str) -> None:
        self.metrics.pool_waits.labels(provider if provider in self.runtime.clients else "other").inc()

    def circuit_changed(self, is_open: bool) -> None:
        self.metrics.limiter_circuit_open.set(1 if is_open else 0)
        redis = self.runtime.settings.redis
        if is_open:
            log.warning(
                "Redis failed %d times in a row: for %gs no request waits on it (on_error = %s), then one probes",
                redis.circuit_failures, redis.circuit_cooldown_s, redis.on_error,
            )  # fmt: skip
        else:
            log.info("Redis answers again: limits are enforced")

    async def handle_http(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = scope["headers"]
        wanted: dict[bytes, bytes] = {}
        repeated: bytes | None = None
        head_bytes = 0
        too_long: bytes | None = None
        for name, value in headers:
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
        extra_headers = [(b"x-request-id", request_id.encode())]
        if self.draining:
            # Keep-alive connections are retired one response at a time while the balancer
            # moves away, so few are left idle when the listener closes.
            extra_headers.extend(CLOSE)
        refused = _refusal(len(headers), head_bytes, too_long, wanted)
        found = self.routes.find(scope["path"], self.runtime.settings.server.prefixes)
        if found is not None and found.row.access is Access.OPEN and refused is None:
            return await self.answer_open(found, scope, send, extra_headers)
        record = RequestRecord.start(request_id, scope["method"])
        ex = Exchange(send, record, extra_headers, self.metrics.active_streams)
        runtime = self.runtime
        record.currency = runtime.settings.prices.currency
        self.metrics.inflight.inc()
        try:
            await self.dispatch(scope, receive, ex, runtime, wanted, repeated, refused, found)
        except GatewayError as err:
            if isinstance(err, RateLimited):
                record.ratelimit = (err.scope, err.limit)
            if ex.state is AnswerState.REQUEST:
                await ex.error(err)
        except ClientGone:
            record.client_disconnected = True
        except Exception:
            # Never a traceback to the client; the log line has no headers or body.
            log.exception("unhandled error in request %s", request_id)
            if ex.state is AnswerState.REQUEST:
                await ex.error(GatewayError("Internal error in the gateway."))
        finally:
            record.ended_at = time.perf_counter()
            ex.check_ended()
            self.metrics.inflight.dec()
            self.metrics.observe(record, runtime.model_labels, runtime.clients.keys())
            if self.events is not None:
                self.events.emit(record)

    async def answer_open(self, found: Found, scope: Scope, send: Send, extra_headers: list[Header]) -> None:
        """An OPEN route's answer: no record and no Exchange, so probes and scrapes cost next to nothing."""
        answer = await found.row.handler(Asked(scope=scope, runtime=self.runtime, key=None, params=found.params))
        headers = [*answer.headers, (b"content-length", str(len(answer.body)).encode()), *extra_headers]
        await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        await send({"type": "http.response.body", "body": answer.body, "more_body": False})

    async def dispatch(
        self,
        scope: Scope,
        receive: Receive,
        ex: Exchange,
        runtime: Runtime,
        wanted: dict[bytes, bytes],
        repeated: bytes | None,
        refused: GatewayError | None,
        found: Found | None,
    ) -> None:
        """repeated: a credential header sent twice with different values; refused: what is wrong with the head;
        found: the gateway's own route for the path, if it has one."""
        path: str = scope["path"]
        method: str = scope["method"]
        server = runtime.settings.server
        if refused is not None and CLOSE[0] in refused.headers:
            # The body is read first only so that the connection outlives the answer; this answer
            # ends it, and a body framed two ways may never end (Transfer-Encoding with Content-Length).
            async with discarding_body(receive):
                await ex.error(refused)
            return
        # The body is read before any other answer, even a 401: a response sent while the client is
        # still sending makes hypercorn close the keep-alive connection under its next request.
        # Content-Length means nothing next to Transfer-Encoding (RFC 9112 6.3), and h11 ignores it.
        length = wanted.get(b"content-length") if b"transfer-encoding" not in wanted else None
        size = int(length) if length and length.isdigit() else None
        body = await read_body(receive, server.max_body_bytes, size, server.body_timeout_s)
        ex.record.body_read_at = time.perf_counter()
        if refused is not None:
            raise refused
        if found is not None and found.row.access is Access.ADMIN and runtime.settings.admin_token is not None:
            ex.record.route = found.row.path
            self.authenticate_admin(wanted, runtime)
            if method != found.row.method:
                raise MethodNotAllowed(f"Expected {found.row.method} for {clip(path)}, but got {clip(method)}.")
            answer = await found.row.handler(Asked(scope=scope, runtime=runtime, key=None, params=found.params))
            return await ex.respond(answer.status, answer.headers, answer.body)
        rest = strip_prefix(path, runtime.settings.server.prefixes)
        if rest is None:
            # Also an ADMIN route while no admin token is set: as if the gateway had none.
            raise NotFound(_missing_prefix_message(path, runtime.settings.server.prefixes))
        if strip_prefix(rest, runtime.settings.server.prefixes) is not None:
            # A base URL of ".../v1" whose client adds "/v1/..." itself; a provider would answer a bare 404.
            raise NotFound(_doubled_prefix_message(path, rest))
        # An OPEN route found here had its head refused above: what is left are KEY routes.
        ex.record.route = found.row.path if found is not None else rest if rest in MODEL_ROUTES else "passthrough"
        key = self.authenticate(wanted, repeated, ex.record, runtime)
        if found is not None:
            if method != found.row.method:
                raise MethodNotAllowed(f"Expected {found.row.method} for {clip(path)}, but got {clip(method)}.")
            answer = await found.row.handler(Asked(scope=scope, runtime=runtime, key=key, params=found.params))
            return await ex.respond(answer.status, answer.headers, answer.body)
        if rest in MODEL_ROUTES and method != "POST":
            raise MethodNotAllowed(f"Expected POST for {clip(path)}, but got {clip(method)}.")
        pinned = wanted[b"x-ai-provider"].decode("latin-1") if b"x-ai-provider" in wanted else None
        query = scope.get("query_string", b"")
        upstream_path = (
            rest if rest in MODEL_ROUTES else _passthrough_path(scope, rest, runtime.settings.server.prefixes)
        )
        if self.sessions is None or self.limiter is None:
            raise LimiterUnavailable("The gateway did not start properly; see its log.")
        call = Call(
            scope=scope,
            receive=receive,
            ex=ex,
            runtime=runtime,
            key=key,
            limits=runtime.limits[key.sha256],
            route=rest,
            path_and_query=upstream_path + ("?" + query.decode("latin-1") if query else ""),
            body=body,
            pinned=pinned,
            sessions=self.sessions,
            limiter=self.limiter,
        )
        await (model_request(call) if rest in MODEL_ROUTES else passthrough(call))

    def authenticate(
        self, wanted: dict[bytes, bytes], repeated: bytes | None, record: RequestRecord, runtime: Runtime
    ) -> KeySettings:
        if repeated is not None:
            raise two_credentials(f"two {CREDENTIAL_HEADERS[repeated]} headers with different values")
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

    def authenticate_admin(self, wanted: dict[bytes, bytes], runtime: Runtime) -> None:
        """The admin token, compared in constant time; never a client key. Neither is logged or recorded."""
        token = runtime.settings.admin_token
        auth = wanted.get(b"authorization", b"")
        presented = auth[7:] if auth[:7].lower() == b"bearer " else b""
        if token is not None and presented and hmac.compare_digest(presented, token.encode()):
            return
        if presented.startswith(b"sk-") and key_digest(presented.decode("latin-1")) in runtime.settings.keys:
            raise PermissionDenied("This is a client API key: admin routes take the admin token.")
        raise InvalidApiKey(f"Admin routes take 'Authorization: Bearer <the admin token>' ({ADMIN_TOKEN_ENV}).")

    async def admin_key_usage(self, asked: Asked) -> Answer:
        settings = asked.runtime.settings
        name = asked.params["name"]
        key = next((k for k in settings.keys.values() if k.name == name), None)
        if key is None:
            raise NotFound(f"No key named {clip(name)!r} in the config.")
        if self.limiter is None:
            raise LimiterUnavailable("The gateway did not start properly; see its log.")
        try:
            usage = await key_usage(self.limiter, settings, key)
        except LimiterFailure as exc:
            raise LimiterUnavailable("The usage store is unavailable; retry shortly.") from exc
        return Answer(200, orjson.dumps(usage))

    async def healthz(self, asked: Asked) -> Answer:
        return Answer(200, b'{"status":"ok"}')

    async def readyz(self, asked: Asked) -> Answer:
        if self.draining:
            problem: str | None = "draining"
        elif self.sessions is None or self.limiter is None:
            problem = "start-up did not complete"
        else:
            problem = await self.limiter.ping()
        if problem is None:
            return Answer(200, orjson.dumps({"status": "ready"}))
        return Answer(503, orjson.dumps({"status": "unavailable", "reason": problem}))

    async def scrape(self, asked: Asked) -> Answer:
        self.sample_runtime()
        return Answer(200, self.metrics.exposition(), ((b"content-type", CONTENT_TYPE_LATEST.encode()),))

    async def list_models(self, asked: Asked) -> Answer:
        if asked.key is None:
            raise TypeError("/models is a KEY route: its handler runs with the caller's key")
        settings = asked.runtime.settings
        fetched = await self.model_lists.fetched(settings, asked.key) if self.model_lists is not None else []
        data = [
            {"id": model, "object": "model", "created": self.started_at, "owned_by": owner}
            for model, owner in asked.runtime.router.models_for(asked.key, fetched)
        ]
        return Answer(200, orjson.dumps({"object": "list", "data": data}))

    async def billing_subscription(self, asked: Asked) -> Answer:
        key, limiter = self._billing(asked)
        return Answer(200, orjson.dumps(await billing.subscription(limiter, asked.runtime.settings, key)))

    async def billing_usage(self, asked: Asked) -> Answer:
        key, limiter = self._billing(asked)
        query = asked.scope.get("query_string", b"")
        return Answer(200, orjson.dumps(await billing.usage(limiter, asked.runtime.settings, key, query)))

    def _billing(self, asked: Asked) -> tuple[KeySettings, Limiter]:
        if asked.key is None:
            raise TypeError("billing routes are KEY routes: their handlers run with the caller's key")
        if self.limiter is None:
            raise LimiterUnavailable("The gateway did not start properly; see its log.")
        return asked.key, self.limiter


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


def _passthrough_path(scope: Scope, rest: str, prefixes: tuple[str, ...]) -> str:
    """The path to forward, still percent-encoded as the client sent it.

    ASGI's `path` is decoded: forwarding it would turn %2F, %3F or %23 into a new
    path segment, query or fragment on the provider's side, with our credential.
    """
    # '//' and ';' are read as something else by some servers (a host, path parameters: '..;/x').
    if "//" in rest:
        raise InvalidRequest(
            "The path has an empty segment ('//' or a trailing '/'); it is not forwarded. "
            "If the base URL ends in '/', drop that '/'."
        )
    # Refused, not taken as the route: one rule for every path, and the answer names the path to use.
    if rest.endswith("/"):
        raise InvalidRequest(
            "The path has an empty segment (a trailing '/'); it is not forwarded. "
            f"Send it to {clip(scope['path'].rstrip('/'))}, without the '/'."
        )
    if any(s in (".", "..") for s in rest.split("/")):
        raise InvalidRequest("The path has a '.' or '..' segment; it is not forwarded.")
    unsafe = UNSAFE_IN_PATH.search(rest)
    if unsafe is not None:
        char = unsafe.group()
        shown = f"'{char}'" if char.isprintable() else f"the control character {char!r}"
        raise InvalidRequest(f"The path has {shown} once decoded; it is not forwarded.")
    raw = scope.get("raw_path")
    raw_rest = strip_prefix(raw.decode("latin-1"), prefixes) if raw else None
    if raw_rest is None:
        return quote(rest)
    if "%2f" in raw_rest.lower():
        raise InvalidRequest("The path has an encoded '/' (%2F); it is not forwarded.")
    return raw_rest


def _missing_prefix_message(path: str, prefixes: tuple[str, ...]) -> str:
    return (
        f"Unknown path {clip(path)!r}. The base URL must end in {prefixes[0]!r} "
        f"(for example http://HOST:PORT{prefixes[0]}), so requests go to {prefixes[0]}/chat/completions."
    )


def _doubled_prefix_message(path: str, rest: str) -> str:
    prefix = path[: len(path) - len(rest)]
    return (
        f"Unknown path {clip(path)!r}: the prefix is there twice. The base URL must end in {prefix!r} once "
        f"(for example http://HOST:PORT{prefix}), so this request goes to {clip(rest)}."
    )


def create_app(settings: Settings, extra_keys: tuple[KeySettings, ...] = ()) -> Gateway:
    return Gateway(settings, extra_keys)
