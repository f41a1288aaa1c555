"""The circuit breaker in front of Redis: a Redis that keeps failing is not waited on."""

from __future__ import annotations

import time
from collections.abc import Callable

from redis.exceptions import RedisClusterException, RedisError

REDIS_ERRORS = (RedisError, RedisClusterException, OSError, TimeoutError)  # the cluster's: no node reachable


class LimiterFailure(Exception):
    """Redis did not answer in time or at all, or the circuit is open."""


class CircuitOpen(LimiterFailure):
    """The command was not sent: Redis has failed too often in a row (see Circuit)."""


class Circuit:
    """Stops requests from waiting on a Redis that keeps failing.

    Closed: every call goes to Redis. After `threshold` consecutive failures it
    opens: for `cooldown_s` no call is made and the caller's on_error applies at
    once. Then one call goes through as a probe (the others still fail fast);
    its success closes the circuit, its failure opens it for another cool-down.
    """

    def __init__(self, threshold: int, cooldown_s: float, on_change: Callable[[bool], object] | None = None) -> None:
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self.on_change = on_change
        self.failures = 0
        self.open_until = 0.0  # time.monotonic()
        self.probing = False

    @property
    def is_open(self) -> bool:
        return self.failures >= self.threshold

    def allow(self) -> bool:
        if self.failures < self.threshold:
            return True
        if self.probing or time.monotonic() < self.open_until:
            return False
        self.probing = True
        return True

    def success(self) -> None:
        if self.failures:
            was_open = self.is_open
            self.failures = 0
            self.probing = False
            if was_open and self.on_change is not None:
                self.on_change(False)

    def failure(self) -> None:
        was_open = self.is_open
        self.failures += 1
        self.probing = False
        if self.is_open:
            self.open_until = time.monotonic() + self.cooldown_s
            if not was_open and self.on_change is not None:
                self.on_change(True)

    def ready(self) -> bool:
        """Whether allow() would let a call through now; nothing changes."""
        return self.failures < self.threshold or (not self.probing and time.monotonic() >= self.open_until)

    def abandon(self) -> None:
        """A call ended without an answer either way (its request was cancelled): free the probe slot."""
        self.probing = False
