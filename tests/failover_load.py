"""A steady trickle of chat requests to one gateway while Redis fails over (the Sentinel and Cluster tests)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import httpx

from tests.conftest import Proc

CHAT = {"model": "mock-chat", "messages": [{"role": "user", "content": "hi"}]}


def chat(client: httpx.Client, proc: Proc, key: str, request_id: str = "") -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}", **({"X-Request-ID": request_id} if request_id else {})}
    return client.post(f"http://127.0.0.1:{proc.port}/v1/chat/completions", json=CHAT, headers=headers)


@dataclass
class Sent:
    started: float
    took_s: float
    status: int
    checked: bool  # admitted by Redis (it sent x-ratelimit headers), not by on_error


@dataclass
class Load:
    """One client sending a request every ~50 ms to one gateway, until stopped (or 60 s at most)."""

    proc: Proc
    key: str
    sent: list[Sent] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        deadline = time.monotonic() + 60
        with httpx.Client(timeout=10) as client:
            while not self.stop.is_set() and time.monotonic() < deadline:
                started = time.monotonic()
                resp = chat(client, self.proc, self.key)
                took = time.monotonic() - started
                self.sent.append(Sent(started, took, resp.status_code, "x-ratelimit-limit-requests" in resp.headers))
                time.sleep(0.05)

    def back_at(self, killed: float) -> float | None:
        """When the first request sent after the kill that Redis admitted ended."""
        for sent in list(self.sent):
            if sent.started > killed and sent.status == 200 and sent.checked:
                return sent.started + sent.took_s
        return None


def check_gap(loads: dict[str, Load], killed: float, hang_s: float) -> None:
    """Each gateway (by its on_error) answered the requests Redis did not admit after the kill as on_error says,
    and none of its requests took `hang_s` or more."""
    for on_error, load in loads.items():
        gap = [s for s in load.sent if s.started > killed and not s.checked]
        assert gap, f"{on_error}: no request fell into the failover gap"
        assert {s.status for s in gap} == ({503} if on_error == "deny" else {200}), (on_error, gap)
        slowest = max(s.took_s for s in load.sent)
        assert slowest < hang_s, (on_error, slowest)
