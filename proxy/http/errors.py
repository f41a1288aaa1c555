"""GatewayError hierarchy -> the OpenAI error envelope."""

from __future__ import annotations

from collections.abc import Sequence

import orjson

from ..redact import redact

Header = tuple[bytes, bytes]


class GatewayError(Exception):
    status = 500
    code = "internal_error"
    type = "api_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        headers: Sequence[Header] = (),
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers
        if code is not None:
            self.code = code

    def body(self, request_id: str) -> bytes:
        return error_body(self.message, self.type, self.code, request_id, param=self.param)


def error_body(message: str, type_: str, code: str, request_id: str, *, param: str | None = None) -> bytes:
    # Messages may quote what the client sent (a model name, a path): never a key pasted there.
    return orjson.dumps(
        {
            "error": {
                "message": f"{redact(message)} (request id: {request_id})",
                "type": type_,
                "param": param,
                "code": code,
                "request_id": request_id,
            }
        }
    )


class InvalidRequest(GatewayError):
    status = 400
    code = "invalid_request"
    type = "invalid_request_error"


class InvalidApiKey(GatewayError):
    status = 401
    code = "invalid_api_key"
    type = "authentication_error"


class InsufficientQuota(GatewayError):
    status = 402
    code = "insufficient_quota"
    type = "insufficient_quota"


class PermissionDenied(GatewayError):
    status = 403
    code = "permission_denied"
    type = "permission_error"


class ModelNotAllowed(GatewayError):
    status = 403
    code = "model_not_allowed"
    type = "permission_error"


class NotFound(GatewayError):
    status = 404
    code = "not_found"
    type = "invalid_request_error"


class ModelNotFound(NotFound):
    code = "model_not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    code = "method_not_allowed"
    type = "invalid_request_error"


class RequestTimeout(GatewayError):
    status = 408
    code = "request_timeout"
    type = "invalid_request_error"


class RequestTooLarge(GatewayError):
    status = 413
    code = "request_too_large"
    type = "invalid_request_error"


class HeadersTooLarge(GatewayError):
    status = 431
    code = "request_header_fields_too_large"
    type = "invalid_request_error"


class RateLimited(GatewayError):
    status = 429
    code = "rate_limit_exceeded"
    type = "rate_limit_error"

    def __init__(self, message: str, *, headers: Sequence[Header], scope: str, limit: str) -> None:
        super().__init__(message, headers=headers)
        self.scope = scope  # "key" or "group"
        self.limit = limit  # the refusing LimitKind's limit_label: "rpm", "tpm", "budget"


class UpstreamError(GatewayError):
    status = 502
    code = "upstream_error"
    type = "api_error"


class UpstreamAuthError(UpstreamError):
    """The provider refused the gateway's own credential: no client can fix that, only its operators."""

    code = "upstream_auth_error"
    reason = "auth_error"  # of the failed attempt, in records and metrics


class LimiterUnavailable(GatewayError):
    status = 503
    code = "limiter_unavailable"
    type = "api_error"


class UpstreamTimeout(GatewayError):
    status = 504
    code = "upstream_timeout"
    type = "api_error"


class RouteNotBillable(GatewayError):
    """A money budget would pay for a request whose cost cannot be known: no price for what it asks."""

    status = 403
    code = "route_not_billable"
    type = "permission_error"


# What a client gets for a request h11 refuses to parse, by the status h11 hints: hypercorn would
# answer that status with an empty body. Fixed texts: h11's own message may quote the bad line,
# and a malformed Authorization line would put its key in the answer.
MALFORMED_HEAD = (
    InvalidRequest.code,
    "The request is not valid HTTP/1.1: its request line, a header or its chunked framing is malformed.",
)
REFUSED_BY_PARSER: dict[int, tuple[str, str]] = {
    400: MALFORMED_HEAD,
    431: (HeadersTooLarge.code, "The request head is too large to read; send fewer or shorter headers."),
    501: (
        "not_implemented",
        "The request's Transfer-Encoding is not supported: only one 'Transfer-Encoding: chunked' header is.",
    ),
}
