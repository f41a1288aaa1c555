"""Where a request goes once its head is read: the gateway's own route, a model route, or passthrough.

The order is the contract: a head refused for its framing is answered at once; otherwise the body is
read first (a response sent while the client is still sending makes hypercorn close the keep-alive
connection under its next request), then the credential, then the method, then the handler.
"""

from __future__ import annotations

import time

from starlette.types import Receive, Scope

from ..http.connections import discarding_body
from ..http.errors import LimiterUnavailable, MethodNotAllowed, NotFound
from ..http.head import CLOSE, Head
from ..redact import clip
from ..request.auth import authenticate_admin, caller
from ..request.call import Call
from ..request.endpoints import MODEL_ROUTES, model_request, passthrough
from ..request.exchange import Exchange
from ..request.paths import doubled_prefix_message, missing_prefix_message, passthrough_path, strip_prefix
from ..request.relay import read_body
from ..request.runtime import Runtime
from .own_routes import NOT_STARTED, Worker
from .routes import Access, Asked, Found


async def dispatch(
    worker: Worker, scope: Scope, receive: Receive, ex: Exchange, *, runtime: Runtime, head: Head, found: Found | None
) -> None:
    """found: the gateway's own route for the path, if it has one."""
    path: str = scope["path"]
    method: str = scope["method"]
    server = runtime.settings.server
    refused = head.refused
    if refused is not None and CLOSE[0] in refused.headers:
        # The body is read first only so that the connection outlives the answer; this answer
        # ends it, and a body framed two ways may never end (Transfer-Encoding with Content-Length).
        async with discarding_body(receive):
            await ex.error(refused)
        return
    # Content-Length means nothing next to Transfer-Encoding (RFC 9112 6.3), and h11 ignores it.
    wanted = head.wanted
    length = wanted.get(b"content-length") if b"transfer-encoding" not in wanted else None
    size = int(length) if length and length.isdigit() else None
    body = await read_body(receive, server.max_body_bytes, size, server.body_timeout_s)
    ex.record.body_read_at = time.perf_counter()
    if refused is not None:
        raise refused
    rest = None
    if found is not None and found.row.access is Access.ADMIN and runtime.settings.admin_token is not None:
        ex.record.route = found.row.path
        authenticate_admin(head, runtime.settings)
        key = None
    else:
        rest = strip_prefix(path, server.prefixes)
        if rest is None:
            # Also an ADMIN route while no admin token is set: as if the gateway had none.
            raise NotFound(missing_prefix_message(path, server.prefixes))
        if strip_prefix(rest, server.prefixes) is not None:
            # A base URL of ".../v1" whose client adds "/v1/..." itself; a provider would answer a bare 404.
            raise NotFound(doubled_prefix_message(path, rest))
        # An OPEN route found here had its head refused above: what is left are KEY routes.
        ex.record.route = found.row.path if found is not None else rest if rest in MODEL_ROUTES else "passthrough"
        key = caller(head, ex.record, runtime.settings.keys)
    expected = found.row.method if found is not None else "POST" if rest in MODEL_ROUTES else None
    if expected is not None and method != expected:
        raise MethodNotAllowed(f"Expected {expected} for {clip(path)}, but got {clip(method)}.")
    if found is not None:
        answer = await found.row.handler(Asked(scope=scope, runtime=runtime, key=key, params=found.params))
        return await ex.respond(answer.status, answer.headers, answer.body)
    if rest is None or key is None:
        raise TypeError("a model or passthrough request has a path under a prefix and a caller's key")
    query = scope.get("query_string", b"")
    upstream_path = rest if rest in MODEL_ROUTES else passthrough_path(scope, rest, server.prefixes)
    if worker.sessions is None or worker.limiter is None:
        raise LimiterUnavailable(NOT_STARTED)
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
        pinned=wanted[b"x-ai-provider"].decode("latin-1") if b"x-ai-provider" in wanted else None,
        sessions=worker.sessions,
        limiter=worker.limiter,
    )
    await (model_request(call) if rest in MODEL_ROUTES else passthrough(call))
