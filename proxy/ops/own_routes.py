"""The gateway's own routes: probes, /metrics, the model list, billing, admin. One row each.

The handlers read the worker's resources (opened in the app's lifespan) through `Worker`, which
`app.Gateway` is: they live here, not in the app, and a new route is a row and a handler here.
"""

from __future__ import annotations

from typing import Protocol

import orjson
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import Scope, Send

from ..config.settings import KeySettings
from ..http.errors import Header, LimiterUnavailable, NotFound
from ..limits.circuit import LimiterFailure
from ..limits.limiter import Limiter
from ..records.metrics import Metrics
from ..redact import clip
from ..request.runtime import Runtime
from ..request.upstream import Sessions
from . import billing
from .admin import key_usage
from .model_list import ModelLists
from .routes import Access, Answer, Asked, Found, RouteTable, Row

NOT_STARTED = "The gateway did not start properly; see its log."


class Worker(Protocol):
    """What one worker process holds: the config it runs now, and what its lifespan opened."""

    runtime: Runtime
    sessions: Sessions | None
    limiter: Limiter | None
    model_lists: ModelLists | None
    metrics: Metrics
    started_at: int
    draining: bool

    def sample_runtime(self) -> None: ...


def own_routes(worker: Worker) -> RouteTable:
    async def healthz(asked: Asked) -> Answer:
        return Answer(200, b'{"status":"ok"}')

    async def readyz(asked: Asked) -> Answer:
        if worker.draining:
            problem: str | None = "draining"
        elif worker.sessions is None or worker.limiter is None:
            problem = "start-up did not complete"
        else:
            problem = await worker.limiter.ping()
        if problem is None:
            return Answer(200, orjson.dumps({"status": "ready"}))
        return Answer(503, orjson.dumps({"status": "unavailable", "reason": problem}))

    async def scrape(asked: Asked) -> Answer:
        worker.sample_runtime()
        return Answer(200, worker.metrics.exposition(), ((b"content-type", CONTENT_TYPE_LATEST.encode()),))

    async def list_models(asked: Asked) -> Answer:
        key = _caller(asked)
        settings = asked.runtime.settings
        fetched = await worker.model_lists.fetched(settings, key) if worker.model_lists is not None else []
        data = [
            {"id": model, "object": "model", "created": worker.started_at, "owned_by": owner}
            for model, owner in asked.runtime.router.models_for(key, fetched)
        ]
        return Answer(200, orjson.dumps({"object": "list", "data": data}))

    async def billing_subscription(asked: Asked) -> Answer:
        key = _caller(asked)
        usage = await billing.subscription(_limiter(worker), asked.runtime.settings, key)
        return Answer(200, orjson.dumps(usage))

    async def billing_usage(asked: Asked) -> Answer:
        key, query = _caller(asked), asked.scope.get("query_string", b"")
        usage = await billing.usage(_limiter(worker), asked.runtime.settings, key, query)
        return Answer(200, orjson.dumps(usage))

    async def admin_key_usage(asked: Asked) -> Answer:
        settings = asked.runtime.settings
        name = asked.params["name"]
        key = next((k for k in settings.keys.values() if k.name == name), None)
        if key is None:
            raise NotFound(f"No key named {clip(name)!r} in the config.")
        limiter = _limiter(worker)
        try:
            usage = await key_usage(limiter, settings, key)
        except LimiterFailure as exc:
            raise LimiterUnavailable("The usage store is unavailable; retry shortly.") from exc
        return Answer(200, orjson.dumps(usage))

    return RouteTable(
        Row("/healthz", healthz, access=Access.OPEN),
        Row("/readyz", readyz, access=Access.OPEN),
        Row("/metrics", scrape, access=Access.OPEN),
        Row("/models", list_models),
        Row("/dashboard/billing/subscription", billing_subscription),
        Row("/dashboard/billing/usage", billing_usage),
        Row("/admin/keys/{name}/usage", admin_key_usage, access=Access.ADMIN),
    )


async def answer_open(found: Found, scope: Scope, runtime: Runtime, send: Send, *, extra_headers: list[Header]) -> None:
    """An OPEN route's answer: no record and no Exchange, so probes and scrapes cost next to nothing."""
    answer = await found.row.handler(Asked(scope=scope, runtime=runtime, key=None, params=found.params))
    headers = [*answer.headers, (b"content-length", str(len(answer.body)).encode()), *extra_headers]
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": answer.body, "more_body": False})


def _caller(asked: Asked) -> KeySettings:
    if asked.key is None:
        raise TypeError("a KEY route's handler runs with the caller's key")
    return asked.key


def _limiter(worker: Worker) -> Limiter:
    if worker.limiter is None:
        raise LimiterUnavailable(NOT_STARTED)
    return worker.limiter
