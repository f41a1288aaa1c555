"""One meaning per body: a key the gateway reads, twice at the top level, is refused (bodies.py)."""

from __future__ import annotations

import json

import pytest

from proxy.http.errors import InvalidRequest
from proxy.request.bodies import READ_KEYS, json_object, maybe_json_object


@pytest.mark.parametrize("name", READ_KEYS)
@pytest.mark.parametrize("space", ["", " ", "\n\t "])
def test_a_read_key_twice_is_refused(name: str, space: str) -> None:
    body = f'{{"{name}"{space}:1,"messages":[],"{name}"{space}:2}}'.encode()
    with pytest.raises(InvalidRequest) as info:
        json_object(body)
    assert info.value.param == name
    assert f"'{name}' twice" in info.value.message


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"a","mod\\u0065l":"b"}',
        b'{"mod\\u0065l":"a","\\u006dodel":"b"}',
        b'{"stream":true,"str\\u0065am":false}',
    ],
)
def test_a_key_written_with_escapes_is_the_same_key(body: bytes) -> None:
    assert len(json.loads(body)) == 1
    with pytest.raises(InvalidRequest):
        json_object(body)
    with pytest.raises(InvalidRequest):
        maybe_json_object(body)


@pytest.mark.parametrize(
    "body",
    [
        # The names as values, deeper keys, and keys the gateway does not read.
        b'{"model":"m","messages":[{"role":"user","content":"user"},{"role":"user","content":"\\"model\\": 1"}]}',
        b'{"model":"m","tools":[{"function":{"parameters":{"properties":{"model":{},"stream":{},"user":{}}}}}]}',
        b'{"model":"m","metadata":{"user":"a"},"user":"b"}',
        b'{"model":"m","temperature":1,"temperature":2}',
        b'{"model":"caf\\u00e9","messages":[]}',
    ],
)
def test_what_is_not_a_duplicate_read_key_passes(body: bytes) -> None:
    assert json_object(body) == json.loads(body)


def test_a_deep_or_wide_body_gets_an_answer_not_an_error() -> None:
    """Deeper than orjson writes (255) or the standard library reads (about 1,000): still looked at."""
    for depth in (300, 1000):
        nested = b"[" * depth + b"]" * depth
        assert json_object(b'{"model":"m","x":' + nested + b"}")["model"] == "m"
        with pytest.raises(InvalidRequest):
            json_object(b'{"model":"m","model":"n","x":' + nested + b"}")
    wide = b'{"model":"m",' + b",".join(b'"k%d":0' % i for i in range(50_000)) + b',"model":"n"}'
    with pytest.raises(InvalidRequest):
        json_object(wide)
