from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Callable

import orjson
import pytest
from starlette.types import Message

from proxy.app import Gateway
from proxy.config.settings import KeySettings, parse_settings
from proxy.http.errors import InvalidApiKey, InvalidRequest
from proxy.request.auth import authenticate, extract_key, key_digest, mask_key, new_key

HOW_TO_SEND = "Send it as 'Authorization: Bearer sk-...' or 'X-API-Key: sk-...'."
MISSING = "Missing API key. " + HOW_TO_SEND
EMPTY = "The Authorization header is empty. " + HOW_TO_SEND
NO_BEARER = "The Authorization header is missing the 'Bearer ' prefix: send 'Authorization: Bearer sk-...'."
NOT_BEARER = "The Authorization header must use the Bearer scheme. " + HOW_TO_SEND
BEARER_NOTHING = "The Authorization: Bearer header has no key after it. " + HOW_TO_SEND
X_API_KEY_NOTHING = "The X-API-Key header has no key after it. " + HOW_TO_SEND
TAB_AFTER_BEARER = "The Authorization header has a tab or line break after 'Bearer': use a single space."


def whitespace(where: str) -> str:
    return (
        f"The key in the {where} header has whitespace around or inside it: "
        "remove spaces, tabs and line breaks (often a copy-paste mistake)."
    )


def not_sk(where: str) -> str:
    return (
        f"The key in the {where} header does not start with 'sk-': "
        "use the key this gateway issued, not a provider's key."
    )


Headers = Callable[[str], tuple[str | None, str | None]]

# (authorization, x_api_key) built from a realistic key made at run time.
MISTAKES: list[tuple[str, Headers, str]] = [
    ("no header at all", lambda k: (None, None), MISSING),
    ("empty authorization", lambda k: ("", None), EMPTY),
    ("blank authorization", lambda k: ("   ", None), EMPTY),
    ("key without bearer prefix", lambda k: (k, None), NO_BEARER),
    ("key without bearer prefix, padded", lambda k: (" " + k, None), NO_BEARER),
    ("basic scheme", lambda k: ("Basic dXNlcjpwYXNzd29yZA==", None), NOT_BEARER),
    ("basic scheme with the key", lambda k: ("Basic " + k, None), NOT_BEARER),
    ("token scheme with the key", lambda k: ("Token " + k, None), NOT_BEARER),
    ("bearer glued to the key", lambda k: ("Bearer" + k, None), NOT_BEARER),
    ("bearer with nothing", lambda k: ("Bearer", None), BEARER_NOTHING),
    ("bearer space with nothing", lambda k: ("Bearer ", None), BEARER_NOTHING),
    ("bearer spaces with nothing", lambda k: ("Bearer    ", None), BEARER_NOTHING),
    ("bearer tab", lambda k: ("Bearer\t" + k, None), TAB_AFTER_BEARER),
    ("bearer line break", lambda k: ("Bearer\n" + k, None), TAB_AFTER_BEARER),
    ("bearer tab with nothing", lambda k: ("Bearer\t", None), TAB_AFTER_BEARER),
    ("bearer double space", lambda k: ("Bearer  " + k, None), whitespace("Authorization: Bearer")),
    ("bearer trailing space", lambda k: ("Bearer " + k + " ", None), whitespace("Authorization: Bearer")),
    ("bearer trailing newline", lambda k: ("Bearer " + k + "\n", None), whitespace("Authorization: Bearer")),
    ("bearer inner space", lambda k: ("Bearer " + k[:20] + " " + k[20:], None), whitespace("Authorization: Bearer")),
    ("bearer inner tab", lambda k: ("Bearer " + k[:20] + "\t" + k[20:], None), whitespace("Authorization: Bearer")),
    ("bearer key twice", lambda k: ("Bearer " + k + " " + k, None), whitespace("Authorization: Bearer")),
    ("bearer key without sk-", lambda k: ("Bearer " + k[3:], None), not_sk("Authorization: Bearer")),
    ("bearer provider-style key", lambda k: ("Bearer pk-" + k[3:], None), not_sk("Authorization: Bearer")),
    ("bearer wins over an empty x-api-key", lambda k: ("Bearer " + k[3:], ""), not_sk("Authorization: Bearer")),
    ("empty bearer wins over x-api-key", lambda k: ("Bearer ", k), BEARER_NOTHING),
    ("same key, padded in bearer", lambda k: ("Bearer  " + k, k), whitespace("Authorization: Bearer")),
    ("empty x-api-key", lambda k: (None, ""), X_API_KEY_NOTHING),
    ("blank x-api-key", lambda k: (None, " \t "), X_API_KEY_NOTHING),
    ("x-api-key leading space", lambda k: (None, " " + k), whitespace("X-API-Key")),
    ("x-api-key trailing tab", lambda k: (None, k + "\t"), whitespace("X-API-Key")),
    ("x-api-key inner space", lambda k: (None, k[:20] + " " + k[20:]), whitespace("X-API-Key")),
    ("x-api-key with bearer prefix", lambda k: (None, "Bearer " + k), whitespace("X-API-Key")),
    ("x-api-key without sk-", lambda k: (None, k[3:]), not_sk("X-API-Key")),
]


@pytest.mark.parametrize(("headers", "expected"), [pytest.param(h, m, id=i) for i, h, m in MISTAKES])
def test_extract_key_names_the_mistake_and_never_echoes_the_key(headers: Headers, expected: str) -> None:
    key = new_key()
    authorization, x_api_key = headers(key)
    with pytest.raises(InvalidApiKey) as info:
        extract_key(authorization, x_api_key)
    exc = info.value
    assert exc.message == expected
    assert (exc.status, exc.code, exc.type) == (401, "invalid_api_key", "authentication_error")
    for secret in (key, key[3:], key[3:20], key[20:]):
        assert secret not in str(exc.message)
        assert secret not in str(exc)
        assert secret not in exc.body("req-1").decode()


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_extract_key_bearer_scheme_is_case_insensitive(scheme: str) -> None:
    key = new_key()
    assert extract_key(f"{scheme} {key}", None) == key


def test_extract_key_from_x_api_key() -> None:
    key = new_key()
    assert extract_key(None, key) == key


def test_extract_key_same_key_in_both_headers() -> None:
    key = new_key()
    assert extract_key("Bearer " + key, key) == key
    # The same key, the copy in X-API-Key padded: Authorization speaks, and it is well formed.
    assert extract_key("Bearer " + key, key + " ") == key


BOTH_HEADERS = (
    "Two credentials were sent: an Authorization header and an X-API-Key header with different keys. "
    "Send exactly one key, as 'Authorization: Bearer sk-...' or as 'X-API-Key: sk-...'."
)


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(lambda a, b: ("Bearer " + a, b), id="two keys"),
        pytest.param(lambda a, b: ("bearer " + b, a), id="two keys, other order"),
        pytest.param(lambda a, b: ("Bearer " + a, a[3:]), id="key and its body"),
        pytest.param(lambda a, b: ("Bearer " + a, "pk-provider"), id="key and something else"),
        pytest.param(lambda a, b: ("Bearer " + a[:-1], a), id="a character apart"),
    ],
)
def test_extract_key_refuses_two_different_keys(headers: Callable[[str, str], tuple[str, str]]) -> None:
    a, b = new_key(), new_key()
    with pytest.raises(InvalidRequest) as info:
        extract_key(*headers(a, b))
    exc = info.value
    assert exc.message == BOTH_HEADERS
    assert (exc.status, exc.code, exc.type) == (400, "invalid_request", "invalid_request_error")
    body = exc.body("req-1").decode()
    for key in (a, b):
        assert key[3:20] not in body


def test_authenticate_known_key() -> None:
    key = new_key()
    alice = KeySettings(name="alice", sha256=key_digest(key))
    bob = KeySettings(name="bob", sha256=key_digest(new_key()))
    keys = {alice.sha256: alice, bob.sha256: bob}
    assert authenticate(key, keys) is alice


def test_authenticate_unknown_key() -> None:
    known, presented = new_key(), new_key()
    alice = KeySettings(name="alice", sha256=key_digest(known))
    with pytest.raises(InvalidApiKey) as info:
        authenticate(presented, {alice.sha256: alice})
    assert info.value.message == "Incorrect API key provided: this gateway does not know it."
    assert info.value.status == 401
    assert presented not in str(info.value.message)
    assert presented[3:] not in info.value.body("req-1").decode()


def test_authenticate_disabled_key() -> None:
    key = new_key()
    off = KeySettings(name="off", sha256=key_digest(key), enabled=False)
    with pytest.raises(InvalidApiKey) as info:
        authenticate(key, {off.sha256: off})
    assert info.value.message == "This API key is disabled. Ask the gateway's operators to enable it."
    assert key not in str(info.value.message)


def test_authenticate_with_an_uppercase_sha256_in_the_config() -> None:
    key = new_key()
    raw = {
        "providers": [{"name": "mock", "base_url": "http://127.0.0.1:8001/v1", "models": ["mock-chat"]}],
        "keys": [{"name": "alice", "sha256": key_digest(key).upper()}],
    }
    settings = parse_settings(raw, env={})
    assert authenticate(key, settings.keys).name == "alice"


def test_mask_key_shape() -> None:
    key = new_key()
    masked = mask_key(key)
    assert masked == "sk-" + key[3:7] + "…" + key[-4:]
    assert len(masked) == 12
    assert key[7:-4] not in masked


def test_mask_key_twelve_body_characters_is_the_shortest_shown() -> None:
    assert mask_key("sk-abcdefghijkl") == "sk-abcd…ijkl"


@pytest.mark.parametrize("short", ["", "sk-", "sk-a", "sk-abcdefghijk", "hunter2", "abcdefghijk"])
def test_mask_key_short_strings_reveal_nothing(short: str) -> None:
    assert mask_key(short) == "sk-…"


def test_new_key_shape() -> None:
    keys = {new_key() for _ in range(50)}
    assert len(keys) == 50
    for key in keys:
        assert re.fullmatch(r"sk-[A-Za-z0-9_-]{48}", key), key
        assert len(key) == 51


def test_key_digest_is_sha256_hex() -> None:
    assert key_digest("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    key = new_key()
    assert key_digest(key) == hashlib.sha256(key.encode()).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", key_digest(key))


@pytest.mark.parametrize("authorization", ["", "Basic dXNlcjpwYXNz", "Token abc", "KEY"])
def test_x_api_key_speaks_when_authorization_is_not_bearer(authorization: str) -> None:
    # e.g. nginx auth_basic in front of the gateway forwards its own Authorization header.
    key = new_key()
    assert extract_key(authorization.replace("KEY", key), key) == key


def gateway_answer(key: str, headers: list[tuple[str, str]]) -> tuple[int, str]:
    """One request through the ASGI app in-process: (status, body). No lifespan ran, so a request
    that gets past the key check ends at 503 'did not start properly'."""
    raw = {
        "providers": [{"name": "mock", "base_url": "http://127.0.0.1:9/v1", "models": ["mock-chat"]}],
        "keys": [{"name": "alice", "sha256": key_digest(key)}],
    }
    gateway = Gateway(parse_settings(raw, env={}))
    scope = {
        "type": "http", "method": "POST", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
        "query_string": b"", "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
    }  # fmt: skip
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b'{"model": "mock-chat", "messages": []}', "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(gateway(scope, receive, send))
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    return sent[0]["status"], sent[1]["body"].decode()


TWO_AUTHORIZATION = (
    "Two credentials were sent: two Authorization headers with different values. "
    "Send exactly one key, as 'Authorization: Bearer sk-...' or as 'X-API-Key: sk-...'."
)
TWO_X_API_KEY = TWO_AUTHORIZATION.replace("two Authorization headers", "two X-API-Key headers")

Pairs = Callable[[str, str], list[tuple[str, str]]]


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        pytest.param(lambda k, o: [("Authorization", f"Bearer {k}"), ("Authorization", f"Bearer {o}")],
                     TWO_AUTHORIZATION, id="authorization: valid, then unknown"),
        pytest.param(lambda k, o: [("Authorization", f"Bearer {o}"), ("Authorization", f"Bearer {k}")],
                     TWO_AUTHORIZATION, id="authorization: unknown, then valid"),
        pytest.param(lambda k, o: [("Authorization", f"Bearer {k}"), ("Authorization", "Basic dXNlcjpwYXNz")],
                     TWO_AUTHORIZATION, id="authorization: bearer and basic"),
        pytest.param(lambda k, o: [("X-API-Key", k), ("X-API-Key", o)], TWO_X_API_KEY, id="x-api-key twice"),
        pytest.param(lambda k, o: [("X-API-Key", o), ("Authorization", f"Bearer {k}"), ("X-API-Key", k)],
                     TWO_X_API_KEY, id="x-api-key twice around a valid authorization"),
        pytest.param(lambda k, o: [("Authorization", f"Bearer {k}"), ("X-API-Key", o)],
                     BOTH_HEADERS, id="authorization and x-api-key"),
        pytest.param(lambda k, o: [("X-API-Key", o), ("Authorization", f"Bearer {k}")],
                     BOTH_HEADERS, id="x-api-key and authorization"),
    ],
)  # fmt: skip
def test_gateway_refuses_two_credentials(headers: Pairs, message: str) -> None:
    key, other = new_key(), new_key()
    status, body = gateway_answer(key, headers(key, other))
    assert status == 400, body
    error = orjson.loads(body)["error"]
    assert error["code"] == "invalid_request"
    assert error["message"] == f"{message} (request id: {error['request_id']})"
    for secret in (key, other):
        assert secret[3:20] not in body


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(lambda k: [("Authorization", f"Bearer {k}"), ("Authorization", f"Bearer {k}")], id="same twice"),
        pytest.param(lambda k: [("X-API-Key", k), ("X-API-Key", k)], id="same x-api-key twice"),
        pytest.param(lambda k: [("Authorization", f"Bearer {k}"), ("X-API-Key", k)], id="same key in both"),
        pytest.param(lambda k: [("Authorization", "Basic dXNlcjpwYXNz"), ("X-API-Key", k)], id="nginx basic"),
    ],
)
def test_gateway_takes_one_key_sent_more_than_once(headers: Callable[[str], list[tuple[str, str]]]) -> None:
    key = new_key()
    status, body = gateway_answer(key, headers(key))
    # Past the key check: only the missing lifespan stops it.
    assert status == 503, body
    assert "did not start properly" in body
