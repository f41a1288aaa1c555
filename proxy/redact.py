"""Masking of API keys wherever a user may have pasted one by mistake."""

from __future__ import annotations

import re

KEY_PREFIX = "sk-"
# Ours are sk- + 48 url-safe characters; providers' look alike (sk-proj-…).
KEY_LIKE = re.compile(r"sk-[A-Za-z0-9_\-]{16,}")


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


def safe_url(url: str) -> str:
    """A URL fit for a log line: any password in it replaced."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not sep or not at:
        return url
    user = userinfo.partition(":")[0]
    return f"{scheme}://{user}:***@{host}" if ":" in userinfo else f"{scheme}://***@{host}"
