"""The model-aware routes and passthrough: validate, route, limit, relay, settle."""

from __future__ import annotations

import asyncio

import orjson

from .errors import InvalidRequest, NotFound
from .limits import Plan, Settlement
from .prices import Price
from .redact import clip
from .relay import BodyFor, DisconnectWatcher, Kind, relay
from .settings import ProviderSettings
from .types import Call
from .upstream import ProviderClient
from .usage import Usage, prompt_estimate

MODEL_ROUTES = frozenset({"/chat/completions", "/completions", "/embeddings"})
STREAMING_ROUTES = frozenset({"/chat/completions", "/completions"})
REQUIRED_FIELD = {"/chat/completions": "messages", "/completions": "prompt", "/embeddings": "input"}
# The request's own cap on its completion, in the order a provider reads them.
COMPLETION_CAPS = {
    "/chat/completions": ("max_completion_tokens", "max_tokens"),
    "/completions": ("max_tokens",),
    "/embeddings": (),
}


async def model_request(call: Call) -> None:
    payload = _json_object(call.body)
    record = call.ex.record
    model = payload.get("model")
    if model is None or model == "":
        raise InvalidRequest("The request has no 'model' field.", param="model", code="missing_model")
    if not isinstance(model, str):
        raise InvalidRequest("Expected 'model' to be a string.", param="model")
    stream = payload.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequest("Expected 'stream' to be true or false.", param="stream")
    field = REQUIRED_FIELD[call.route]
    if field not in payload:
        raise InvalidRequest(f"The request has no '{field}' field.", param=field)
    record.model = model
    record.stream = stream
    chosen = call.runtime.router.route(model, call.key, call.pinned)
    record.upstream_model = chosen.upstream_model
    price = call.runtime.settings.prices.for_request(chosen.upstream_model, model)
    plan = call.limits.model
    wanted = (0, 0)
    if plan is not None and plan.budgeted:
        wanted = hold_wanted(call.route, payload, len(call.body), call.limits.reserve_tokens)
    kind: Kind = "stream" if stream and call.route in STREAMING_ROUTES else "json"
    bodies = _BodyVariants(payload, call.body, chosen.upstream_model, kind)
    await _relay(call, plan, wanted, chosen.providers, bodies.body_for, kind, price)


def hold_wanted(route: str, payload: dict[str, object], request_bytes: int, reserve_tokens: int) -> tuple[int, int]:
    """What a model request may use of a budget: its prompt, and its completion cap or the reserve.

    Embeddings have no completion.
    """
    caps = COMPLETION_CAPS[route]
    if not caps:
        return prompt_estimate(request_bytes), 0
    for field in caps:
        cap = payload.get(field)
        if isinstance(cap, int) and not isinstance(cap, bool) and cap > 0:
            return prompt_estimate(request_bytes), cap
    return prompt_estimate(request_bytes), reserve_tokens


async def passthrough(call: Call) -> None:
    record = call.ex.record
    body = call.body
    payload, model = _model_field(body)
    price = None
    if payload is not None and model is not None:
        record.model = model
        chosen = call.runtime.router.route(model, call.key, call.pinned)
        providers = chosen.providers
        record.upstream_model = chosen.upstream_model
        price = call.runtime.settings.prices.for_request(chosen.upstream_model, model)
        if chosen.upstream_model != model:
            body = orjson.dumps({**payload, "model": chosen.upstream_model})
    elif call.pinned is not None:
        providers = (call.runtime.router.pinned(call.pinned),)
    else:
        path = clip(call.scope["path"])
        raise NotFound(f"Cannot route {path}: the body has no 'model' field and there is no X-AI-Provider header.")
    # A body here may be audio or an image: no prompt estimate, the reserve alone is held
    # (of a money budget, at the output price).
    wanted = (0, call.limits.reserve_tokens)
    await _relay(call, call.limits.passthrough, wanted, providers, lambda _c: (body, False), "raw", price)


async def _relay(
    call: Call,
    plan: Plan | None,
    wanted: tuple[int, int],
    providers: tuple[ProviderSettings, ...],
    body_for: BodyFor,
    kind: Kind,
    price: Price | None,
) -> None:
    """Admit, relay, settle: everything after the admission is inside the one `finally` that settles it.

    The record's cost stays 0 unless usage comes: only the attempt that answered reports it
    (a failed one never does), a stream cut short reports what was delivered, and an upstream
    error, a 429 or 402 of ours or a client gone before the answer bill nothing. Usage of a
    model with no price leaves the cost unknown (None). `wanted` is what the request may use,
    (prompt, completion) tokens: a token budget holds their sum, a money budget their cost.
    """
    ex = call.ex
    record = ex.record
    attempts = [call.runtime.clients[p.name] for p in call.runtime.router.attempt_order(providers)]
    settlement = Settlement(call.limiter, call.limits)

    def on_usage(usage: Usage) -> None:
        record.prompt_tokens = usage.prompt_tokens
        record.completion_tokens = usage.completion_tokens
        record.total_tokens = usage.total_tokens
        micros = 0
        if price is not None:
            record.cost = price.cost(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens)
            micros = price.micros(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens)
        else:
            record.cost = None
        settlement.settle(usage.total_tokens, micros)

    # Watching from before admission: a client that leaves while Redis is slow is not sent upstream.
    watcher = DisconnectWatcher(call.receive)
    try:
        if plan is not None:
            # Without a price a money budget holds nothing (check-config warns of such models).
            hold_micros = price.micros(*wanted) if price is not None and plan.budgeted else 0
            ex.extra_headers += await settlement.admit(plan, sum(wanted), hold_micros)
        await relay(
            ex, call.sessions, attempts, call.scope["method"], call.path_and_query, call.scope["headers"],
            body_for, kind, watcher, on_usage, len(call.body),
        )  # fmt: skip
    except asyncio.CancelledError:
        if not watcher.disconnected:
            raise
        current = asyncio.current_task()
        if current is not None:
            current.uncancel()
        record.client_disconnected = True
    finally:
        watcher.stop()
        settlement.close()


class _BodyVariants:
    """The upstream body, re-encoded only when an alias or include_usage changes it."""

    def __init__(self, payload: dict[str, object], raw: bytes, upstream_model: str, kind: Kind) -> None:
        self.payload = payload
        self.raw = raw
        self.upstream_model = upstream_model
        self.renamed = payload.get("model") != upstream_model
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
            elif inject and not self.renamed and "stream_options" not in self.payload and self.payload:
                # The common case, spliced in rather than re-encoding the whole conversation.
                body = self.raw.rstrip()[:-1] + b',"stream_options":{"include_usage":true}}'
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


def _json_object(body: bytes) -> dict[str, object]:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest("The request body is not valid JSON.", code="invalid_json") from exc
    if not isinstance(payload, dict):
        raise InvalidRequest("Expected the request body to be a JSON object.")
    return payload


def _model_field(body: bytes) -> tuple[dict[str, object] | None, str | None]:
    """A passthrough body's JSON object and its `model`, when it has them (it may be multipart, audio...)."""
    if not body.lstrip().startswith(b"{"):
        return None, None
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, None
    if not isinstance(payload, dict):
        return None, None
    model = payload.get("model")
    return payload, model if isinstance(model, str) and model else None
