from __future__ import annotations

import pytest

from proxy.auth import new_key
from proxy.redact import mask_key, redact, safe_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:s3cret@cache:6379/0", "redis://:***@cache:6379/0"),
        ("rediss://app:s3cret@cache:6380/1", "rediss://app:***@cache:6380/1"),
        ("redis://tokenonly@cache/0", "redis://***@cache/0"),
        ("unix:///run/redis.sock", "unix:///run/redis.sock"),
    ],
)
def test_safe_url_hides_passwords(url: str, shown: str) -> None:
    assert safe_url(url) == shown


def test_redact_masks_every_key_like_run_and_nothing_else() -> None:
    first, second = new_key(), new_key()
    text = f"model {first} and path /v1/{second}?x=sk-short"
    assert redact(text) == f"model {mask_key(first)} and path /v1/{mask_key(second)}?x=sk-short"
    assert redact("no keys here") == "no keys here"
