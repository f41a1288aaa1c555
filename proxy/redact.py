"""Masking of API keys wherever a user may have pasted one by mistake."""

from __future__ import annotations

import re

KEY_PREFIX = "sk-"
# Ours are sk- + 48 url-safe characters; providers' look alike (sk-proj-…).
KEY_LIKE = re.compile(r"sk-[A-Za-z0-9_\-]{16,}")
URL_SECRET = re.compile(r"([?&]ssl_password=)[^&#]*")  # a Redis URL's passphrase of its TLS key, as redis-py reads it
CLIENT_TEXT_LIMIT = 256  # characters of a client's text (model, provider, path) echoed or recorded


def mask_key(key: str) -> str:
    """`sk-` + first 4 + `…` + last 4; shorter strings show nothing of themselves."""
    body = key[len(KEY_PREFIX) :] if key.startswith(KEY_PREFIX) else key
    if len(body) < 12:
        return KEY_PREFIX + "…"
    return f"{KEY_PREFIX}{body[:4]}…{body[-4:]}"


def redact(text: str) -> str:
    """Mask anything that looks like a key (a model name, a path, a header a client filled wrongly)."""
    if KEY_PREFIX not in text:
        return text
    return KEY_LIKE.sub(lambda m: mask_key(m.group()), text)


def clip(text: str) -> str:
    """Client text fit to echo in an error or write to a record: at most 256 characters, keys masked."""
    if len(text) <= CLIENT_TEXT_LIMIT:
        return redact(text)
    # Masked before the cut, over a window twice as long: a key cut in half at the limit would
    # be too short to look like one, and a key running past the window's end is long enough to.
    return redact(text[: 2 * CLIENT_TEXT_LIMIT])[: CLIENT_TEXT_LIMIT - 1] + "…"


def safe_url(url: str) -> str:
    """A URL fit for a log line: any password in it replaced (the TLS key's `ssl_password` in the query too)."""
    url = URL_SECRET.sub(r"\1***", url)
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not sep or not at:
        return url
    user = userinfo.partition(":")[0]
    return f"{scheme}://{user}:***@{host}" if ":" in userinfo else f"{scheme}://***@{host}"
