from __future__ import annotations

import pytest

from proxy.redact import clip, mask_key, redact, safe_url
from proxy.request.auth import new_key


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:s3cret@cache:6379/0", "redis://:***@cache:6379/0"),
        ("rediss://app:s3cret@cache:6380/1", "rediss://app:***@cache:6380/1"),
        ("redis://tokenonly@cache/0", "redis://***@cache/0"),
        ("unix:///run/redis.sock", "unix:///run/redis.sock"),
        (
            "rediss://gw:s3cret@cache/0?ssl_keyfile=/k.pem&ssl_password=keypass&ssl_ca_certs=/ca.pem",
            "rediss://gw:***@cache/0?ssl_keyfile=/k.pem&ssl_password=***&ssl_ca_certs=/ca.pem",
        ),
        ("rediss://cache/0?ssl_password=keypass", "rediss://cache/0?ssl_password=***"),
    ],
)
def test_safe_url_hides_passwords(url: str, shown: str) -> None:
    assert safe_url(url) == shown


def test_redact_masks_every_key_like_run_and_nothing_else() -> None:
    first, second = new_key(), new_key()
    text = f"model {first} and path /v1/{second}?x=sk-short"
    assert redact(text) == f"model {mask_key(first)} and path /v1/{mask_key(second)}?x=sk-short"
    assert redact("no keys here") == "no keys here"


def test_clip_keeps_short_text_whole_and_masks_keys_in_it() -> None:
    key = new_key()
    assert clip("deepseek-chat") == "deepseek-chat"
    assert clip(f"model {key}") == f"model {mask_key(key)}"
    assert clip("m" * 256) == "m" * 256


def test_clip_cuts_long_text_to_256_characters() -> None:
    clipped = clip("m" * 900_000)
    assert clipped == "m" * 255 + "…"
    assert len(clipped) == 256


@pytest.mark.parametrize("start", [0, 100, 200, 240, 245, 250, 254, 255, 256])
def test_clip_masks_a_key_the_cut_runs_through(start: int) -> None:
    key = new_key()
    clipped = clip("m" * start + key + "/n" * 450_000)
    assert len(clipped) == 256
    assert clipped.startswith("m" * min(start, 255))
    # The mask shows the key's first and last four characters: nothing of what lies between.
    hidden = key[7:-4]
    assert not any(hidden[i : i + 5] in clipped for i in range(len(hidden) - 4)), clipped[start:]


def test_clip_masks_a_key_longer_than_the_window() -> None:
    # A key running past the part looked at is still long enough to be masked.
    text = "m" * 200 + "sk-" + "k" * 2000
    assert clip(text) == "m" * 200 + "sk-kkkk…kkkk…"
