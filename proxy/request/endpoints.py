"""The model-aware routes and passthrough: validate, route, limit, relay, settle."""

from __future__ import annotations

import asyncio

import orjson

from ..config.limit_kinds import Scope
from ..config.prices import Price
from ..config.settings import ProviderSettings
from ..http.errors import InvalidRequest, NotFound, RouteNotBillable
from ..limits.limiter import Settlement
from ..limits.plan import Plan
from ..redact import clip
from .bodies import json_object, maybe_json_object
from .call import Call
from .charges import charge_for
from .prompts import prompt_bound
from .relay import BodyFor, DisconnectWatcher, Kind, relay
from .upstream import ProviderClient
from .usage import Usage

MODEL_ROUTES = frozenset({"/chat/completions", "/completions", "/embeddings"})
STREAMING_ROUTES = frozenset({"/chat/completions", "/completions"})
REQUIRED_FIELD = {"/chat/completions": "messages", "/completions": "prompt", "/embeddings": "input"}
# The request's own cap on its completion, in the order a provider reads them.
COMPLETION_CAPS = {
    "/chat/completions": ("max_completion_tokens", "max_tokens"),
    "/completions": ("max_tokens",),
    "/embeddings": (),
}
# Answers generated at once, each up to the cap: chat's n choices; completions generate (and bill) best_of.
CHOICES = {"/chat/completions": ("n",), "/completions": ("best_of", "n"), "/embeddings": ()}
# A passthrough JSON body's own cap, under the names the APIs use: the Responses API's first.
PASSTHROUGH_CAPS = ("max_output_tokens", "max_completion_tokens", "max_tokens")


async def model_request(call: Call) -> None:
    payload = json_object(call.body)
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
        wanted = hold_wanted(call.route, payload, call.limits.reserve_tokens)
    kind: Kind = "stream" if stream and call.route in STREAMING_ROUTES else "json"
    bodies = _BodyVariants(payload, call.body, chosen.upstream_model, kind)
    await _relay(
        call, plan, wanted=wanted, providers=chosen.providers, body_for=bodies.body_for, kind=kind, price=price
    )


def hold_wanted(route: str, payload: dict[str, object], reserve_tokens: int) -> tuple[int, int]:
    """What a model request may use of a budget: its prompt's upper bound (prompts.prompt_bound), and its
    completion cap or the reserve, times the answers it asks for at once. Embeddings have no completion."""
    caps = COMPLETION_CAPS[route]
    prompt = prompt_bound(payload)
    if not caps:
        return prompt, 0
    return prompt, _cap(payload, caps, reserve_tokens) * _choices(payload, CHOICES[route])


def _cap(payload: dict[str, object], fields: tuple[str, ...], reserve_tokens: int) -> int:
    """The first of `fields` that is a positive whole number, else the reserve."""
    return next((n for n in map(_whole, map(payload.get, fields)) if n), reserve_tokens)


def _choices(payload: dict[str, object], fields: tuple[str, ...]) -> int:
    return max(map(_whole, map(payload.get, fields)), default=1) or 1


def _whole(value: object) -> int:
    """A positive whole number's value, else 0 (booleans, floats, text and nulls are not counts)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


async def passthrough(call: Call) -> None:
    record = call.ex.record
    body = call.body
    payload = maybe_json_object(body)
    model = payload.get("model") if payload is not None else None
    price = None
    if payload is not None and isinstance(model, str) and model:
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
    plan = call.limits.passthrough
    wanted = (0, call.limits.reserve_tokens)
    if plan is not None and plan.budgeted and payload is not None:
        # A JSON body (the Responses API, images): its text bounds the prompt, its own cap the answer. Other
        # bodies (audio, multipart) hold the reserve alone; their answers' usage is charged when it comes.
        wanted = (prompt_bound(payload), _cap(payload, PASSTHROUGH_CAPS, call.limits.reserve_tokens))
    await _relay(
        call, plan, wanted=wanted, providers=providers, body_for=lambda _c: (body, False), kind="raw", price=price
    )


async def _relay(
    call: Call,
    plan: Plan | None,
    *,
    wanted: tuple[int, int],
    providers: tuple[ProviderSettings, ...],
    body_for: BodyFor,
    kind: Kind,
    price: Price | None,
) -> None:
    """Admit, relay, settle: everything after the admission is inside the one `finally` that settles it.

    Only the attempt whose answer went to the client reports it (a failed one never does): its usage
    at its price, else its price per request, else the gateway's estimate (charges.py). An upstream
    error, a 429 or 402 of ours or a client gone before the answer bill nothing. `wanted` is what the
    request may use, (prompt, completion) tokens: a token budget holds their sum, a money budget the
    most they can cost. A money budget never pays for what has no price: such a request is refused.
    """
    ex = call.ex
    record = ex.record
    attempts = [call.runtime.clients[p.name] for p in call.runtime.router.attempt_order(providers)]
    if price is None and plan is not None and plan.money_scope is not None:
        _refuse_unpriced(call, plan.money_scope, attempts)
    settlement = Settlement(call.limiter, call.limits)

    def on_answer(status: int, usage: Usage | None, estimate: Usage | None) -> None:
        if estimate is not None and call.route == "/embeddings":
            # The relay estimates a JSON answer's completion by its size; an embedding's vectors are no completion.
            estimate = Usage(estimate.prompt_tokens, 0, estimate.prompt_tokens)
        charge = charge_for(price, status, usage, estimate)
        record.usage_source = charge.source
        record.cost = charge.cost
        tokens = 0
        if charge.usage is not None:
            tokens = charge.usage.total_tokens
            record.prompt_tokens = charge.usage.prompt_tokens
            record.completion_tokens = charge.usage.completion_tokens
            record.total_tokens = tokens
        settlement.settle(tokens, charge.micros)

    # Watching from before admission: a client that leaves while Redis is slow is not sent upstream.
    watcher = DisconnectWatcher(call.receive)
    try:
        if plan is not None:
            hold_micros = price.hold_micros(*wanted) if price is not None and plan.budgeted else 0
            ex.extra_headers += await settlement.admit(plan, sum(wanted), hold_micros)
        await relay(
            ex,
            sessions=call.sessions,
            attempts=attempts,
            method=call.scope["method"],
            path_and_query=call.path_and_query,
            client_headers=call.scope["headers"],
            body_for=body_for,
            kind=kind,
            watcher=watcher,
            on_answer=on_answer,
            request_bytes=len(call.body),
        )
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


def _refuse_unpriced(call: Call, payer: Scope, attempts: list[ProviderClient]) -> None:
    """403 for a request a money budget would pay for without a price to charge it by, unless every
    provider it may go to lets such requests through (unpriced_routes = "allow")."""
    refusing = next((c.settings.name for c in attempts if c.settings.unpriced_routes == "refuse"), None)
    if refusing is None:
        return
    model = call.ex.record.model
    what = f"model {clip(model)!r}" if model is not None else "this request (it names no model)"
    owner = "This API key's" if payer == "key" else "This key's group's"
    raise RouteNotBillable(
        f"{owner} budget is in money, and {clip(call.route)} for {what} has no price, so what it costs could not "
        f"be charged. The gateway's operators can price it in [[prices]] (per million tokens, or per_request) "
        f'or set unpriced_routes = "allow" on provider {refusing!r}.'
    )


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
