from __future__ import annotations

import hashlib
import re
from collections.abc import Callable

import pytest

from proxy.auth import authenticate, extract_key, key_digest, mask_key, new_key
from proxy.errors import InvalidApiKey
from proxy.settings import KeySettings, parse_settings

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
    ("bearer wins over x-api-key", lambda k: ("Bearer " + k[3:], k), not_sk("Authorization: Bearer")),
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


def test_extract_key_authorization_wins_over_x_api_key() -> None:
    from_authorization, from_x_api_key = new_key(), new_key()
    assert extract_key("Bearer " + from_authorization, from_x_api_key) == from_authorization


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
