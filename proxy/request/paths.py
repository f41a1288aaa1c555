"""Request paths: the prefix (/v1) taken off, and the path a passthrough request is forwarded to."""

from __future__ import annotations

import re
from urllib.parse import quote

from starlette.types import Scope

from ..http.errors import InvalidRequest
from ..redact import clip

UNSAFE_IN_PATH = re.compile(r"[\x00-\x1f\x7f;?#%\\]")


def strip_prefix(path: str, prefixes: tuple[str, ...]) -> str | None:
    for prefix in prefixes:
        if path.startswith(prefix) and len(path) > len(prefix) and path[len(prefix)] == "/":
            return path[len(prefix) :]
    return None


def passthrough_path(scope: Scope, rest: str, prefixes: tuple[str, ...]) -> str:
    """The path to forward, still percent-encoded as the client sent it.

    ASGI's `path` is decoded: forwarding it would turn %2F, %3F or %23 into a new
    path segment, query or fragment on the provider's side, with our credential.
    """
    # '//' and ';' are read as something else by some servers (a host, path parameters: '..;/x').
    if "//" in rest:
        raise InvalidRequest(
            "The path has an empty segment ('//' or a trailing '/'); it is not forwarded. "
            "If the base URL ends in '/', drop that '/'."
        )
    # Refused, not taken as the route: one rule for every path, and the answer names the path to use.
    if rest.endswith("/"):
        raise InvalidRequest(
            "The path has an empty segment (a trailing '/'); it is not forwarded. "
            f"Send it to {clip(scope['path'].rstrip('/'))}, without the '/'."
        )
    if any(s in (".", "..") for s in rest.split("/")):
        raise InvalidRequest("The path has a '.' or '..' segment; it is not forwarded.")
    unsafe = UNSAFE_IN_PATH.search(rest)
    if unsafe is not None:
        char = unsafe.group()
        shown = f"'{char}'" if char.isprintable() else f"the control character {char!r}"
        raise InvalidRequest(f"The path has {shown} once decoded; it is not forwarded.")
    raw = scope.get("raw_path")
    raw_rest = strip_prefix(raw.decode("latin-1"), prefixes) if raw else None
    if raw_rest is None:
        return quote(rest)
    if "%2f" in raw_rest.lower():
        raise InvalidRequest("The path has an encoded '/' (%2F); it is not forwarded.")
    return raw_rest


def missing_prefix_message(path: str, prefixes: tuple[str, ...]) -> str:
    return (
        f"Unknown path {clip(path)!r}. The base URL must end in {prefixes[0]!r} "
        f"(for example http://HOST:PORT{prefixes[0]}), so requests go to {prefixes[0]}/chat/completions."
    )


def doubled_prefix_message(path: str, rest: str) -> str:
    prefix = path[: len(path) - len(rest)]
    return (
        f"Unknown path {clip(path)!r}: the prefix is there twice. The base URL must end in {prefix!r} once "
        f"(for example http://HOST:PORT{prefix}), so this request goes to {clip(rest)}."
    )
