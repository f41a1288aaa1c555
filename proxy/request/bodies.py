"""What the gateway reads of a JSON request body: the object, and one meaning for each key it reads.

orjson, like most parsers, keeps the last of two equal keys; some providers' parsers keep the first.
A body that names `model` twice could then be routed, allowed and priced as one model and run as
another: such a body is refused. Cheap on the way of every request: a body exactly as orjson writes
the object it holds (compact JSON, as the OpenAI SDKs send) has no key twice; in any other the
names are searched for where they are keys, in one pass, and only a body where one appears twice
(or a letter is written as an escape) is looked at properly.
"""

from __future__ import annotations

import json
import re
from collections import Counter

import orjson

from ..http.errors import InvalidRequest

# The top-level keys whose meaning the gateway acts on (routing, limits, holds, records).
READ_KEYS = ("model", "stream", "max_tokens", "max_completion_tokens", "max_output_tokens", "stream_options", "user")
# Their names where they are keys (a colon follows; JSON's whitespace between): one pass over the body,
# about as long as one search for one name. "role": "user" is a value, and not found.
_AS_KEYS = re.compile(rb'"(' + b"|".join(name.encode() for name in READ_KEYS) + rb')"[ \t\r\n]*:')
# A letter written as an escape: "mod\\u0065l" is "model" to every parser, and no encoder writes one.
_ESCAPED_LETTER = re.compile(rb"\\u00[5-7][0-9a-fA-F]")
BACKSLASH = 0x5C


def json_object(body: bytes) -> dict[str, object]:
    """The body's JSON object, for a route that needs one: 400 for anything else."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest("The request body is not valid JSON.", code="invalid_json") from exc
    if not isinstance(payload, dict):
        raise InvalidRequest("Expected the request body to be a JSON object.")
    refuse_duplicates(body, payload)
    return payload


def maybe_json_object(body: bytes) -> dict[str, object] | None:
    """A passthrough body's JSON object, when it is one (it may be multipart, audio...)."""
    if not body.lstrip().startswith(b"{"):
        return None
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(payload, dict):
        return None
    refuse_duplicates(body, payload)
    return payload


def refuse_duplicates(body: bytes, payload: dict[str, object]) -> None:
    """400 when a key the gateway reads is at the top level twice. `payload` is what orjson read of `body`."""
    try:
        if orjson.dumps(payload) == body:
            return  # the object written back is the body: nothing in it was dropped (a quarter of the search's cost)
    except orjson.JSONEncodeError:
        pass  # nested deeper than orjson writes (255): the search below still looks
    found = _AS_KEYS.findall(body)
    # A backslash is one memchr to look for (an int: `bytes in bytes` costs five times as much even for
    # one byte); most bodies have none, or no escaped letter.
    if len(set(found)) == len(found) and not (BACKSLASH in body and _ESCAPED_LETTER.search(body)):
        return
    # A name twice as a key, at some depth (a tool's parameter may be called "model"): look properly.
    # A body too deep for that look is taken at its word: each read key found twice is refused.
    top = _top_level_duplicates(body)
    twice = sorted((top if top is not None else {name.decode() for name in found}) & set(READ_KEYS))
    if twice:
        name = twice[0]
        raise InvalidRequest(
            f"The request body has the key '{name}' twice; send it once, so that every reader of the body "
            "takes the same value.",
            param=name,
        )


def _top_level_duplicates(body: bytes) -> set[str] | None:
    """The keys that appear more than once in the top-level object (the rare, careful look); None for a
    body the standard library's parser cannot read (nested deeper than its recursion limit)."""
    top: list[list[tuple[str, object]]] = []

    def pairs(items: list[tuple[str, object]]) -> dict[str, object]:
        # Called for every object, innermost first: the top-level object is the last one.
        top.append(items)
        return {}

    try:
        json.loads(body, object_pairs_hook=pairs)
    except (ValueError, RecursionError):  # orjson took it; the standard library is stricter on depth
        return None
    counts = Counter(name for name, _ in top[-1])
    return {name for name, count in counts.items() if count > 1}
