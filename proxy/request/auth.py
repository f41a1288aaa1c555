"""Key extraction, sha256 lookup and masking.

The 401 messages name the mistake the client made but never repeat the key.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping

from ..config.settings import ADMIN_TOKEN_ENV, KeySettings, Settings
from ..http.errors import InvalidApiKey, InvalidRequest, PermissionDenied
from ..http.head import CREDENTIAL_HEADERS, Head
from ..records.record import RequestRecord
from ..redact import KEY_PREFIX, mask_key

__all__ = [
    "CREDENTIAL_HEADERS", "KEY_PREFIX", "authenticate", "authenticate_admin", "caller", "extract_key", "key_digest",
    "mask_key", "new_key", "two_credentials",
]  # fmt: skip

KEY_RANDOM_BYTES = 36  # 48 url-safe characters

WHITESPACE = re.compile(r"\s")
HOW_TO_SEND = "Send it as 'Authorization: Bearer sk-...' or 'X-API-Key: sk-...'."


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(KEY_RANDOM_BYTES)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def two_credentials(what: str) -> InvalidRequest:
    # Whichever one we picked, the client would not know which key it was charged to.
    return InvalidRequest(
        f"Two credentials were sent: {what}. Send exactly one key, "
        "as 'Authorization: Bearer sk-...' or as 'X-API-Key: sk-...'."
    )


def extract_key(authorization: str | None, x_api_key: str | None) -> str:
    """Return the presented key or raise InvalidApiKey naming the mistake."""
    if authorization is not None and x_api_key is not None:
        if not authorization[:7].lower().startswith("bearer"):
            # Authorization belongs to something else (nginx auth_basic forwards its own): X-API-Key speaks.
            authorization = None
        elif (bearer := authorization[6:].strip()) and (other := x_api_key.strip()) and bearer != other:
            raise two_credentials("an Authorization header and an X-API-Key header with different keys")
    if authorization is not None:
        if not authorization.strip():
            raise InvalidApiKey("The Authorization header is empty. " + HOW_TO_SEND)
        scheme, separator = authorization[:6], authorization[6:7]
        if scheme.lower() != "bearer" or not (separator == "" or separator.isspace()):
            if authorization.strip().startswith(KEY_PREFIX):
                raise InvalidApiKey(
                    "The Authorization header is missing the 'Bearer ' prefix: send 'Authorization: Bearer sk-...'."
                )
            raise InvalidApiKey("The Authorization header must use the Bearer scheme. " + HOW_TO_SEND)
        if separator not in ("", " "):
            raise InvalidApiKey("The Authorization header has a tab or line break after 'Bearer': use a single space.")
        return _check_shape(authorization[7:], "Authorization: Bearer")
    if x_api_key is not None:
        return _check_shape(x_api_key, "X-API-Key")
    raise InvalidApiKey("Missing API key. " + HOW_TO_SEND)


def _check_shape(key: str, where: str) -> str:
    if not key.strip():
        raise InvalidApiKey(f"The {where} header has no key after it. " + HOW_TO_SEND)
    if WHITESPACE.search(key):
        raise InvalidApiKey(
            f"The key in the {where} header has whitespace around or inside it: "
            "remove spaces, tabs and line breaks (often a copy-paste mistake)."
        )
    if not key.startswith(KEY_PREFIX):
        raise InvalidApiKey(
            f"The key in the {where} header does not start with 'sk-': "
            "use the key this gateway issued, not a provider's key."
        )
    return key


def authenticate(key: str, keys: Mapping[str, KeySettings]) -> KeySettings:
    found = keys.get(key_digest(key))
    if found is None:
        raise InvalidApiKey("Incorrect API key provided: this gateway does not know it.")
    if not found.enabled:
        raise InvalidApiKey("This API key is disabled. Ask the gateway's operators to enable it.")
    return found


def caller(head: Head, record: RequestRecord, keys: Mapping[str, KeySettings]) -> KeySettings:
    """The key a request's head presents, checked; the record learns its masked form, name and group."""
    if head.repeated is not None:
        raise two_credentials(f"two {CREDENTIAL_HEADERS[head.repeated]} headers with different values")
    auth = head.wanted.get(b"authorization")
    api_key = head.wanted.get(b"x-api-key")
    presented = extract_key(
        auth.decode("latin-1") if auth is not None else None,
        api_key.decode("latin-1") if api_key is not None else None,
    )
    record.key = mask_key(presented)
    key = authenticate(presented, keys)
    record.key_name = key.name
    record.group = key.group
    return key


def authenticate_admin(head: Head, settings: Settings) -> None:
    """The admin token, compared in constant time; never a client key. Neither is logged or recorded."""
    token = settings.admin_token
    auth = head.wanted.get(b"authorization", b"")
    presented = auth[7:] if auth[:7].lower() == b"bearer " else b""
    if token is not None and presented and hmac.compare_digest(presented, token.encode()):
        return
    if presented.startswith(b"sk-") and key_digest(presented.decode("latin-1")) in settings.keys:
        raise PermissionDenied("This is a client API key: admin routes take the admin token.")
    raise InvalidApiKey(f"Admin routes take 'Authorization: Bearer <the admin token>' ({ADMIN_TOKEN_ENV}).")
