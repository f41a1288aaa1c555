"""Two gateway processes sharing one Redis behind a real nginx running deploy/nginx-multi.conf.

One gateway is killed (SIGKILL) under a light load: requests sent afterwards are all
answered, nginx passing those that met the dead one's refused connection on to the
survivor; streams that were on the dead one end cut off at once instead of hanging;
and a key's rpm still admits exactly its number of concurrent requests.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.request.auth import key_digest, new_key
from tests.conftest import ROOT, Mocks, Proc, RedisServer, beta_config, start_gateway
from tests.limits.test_e2e_limits import assert_exact
from tests.test_e2e_nginx import start_nginx

SHIPPED = ROOT / "deploy" / "nginx-multi.conf"
SHIPPED_SERVERS = ("10.0.0.21:9090", "10.0.0.22:9090")
FAIL_TIMEOUT_S = float(re.findall(r"fail_timeout=(\d+)s", SHIPPED.read_text())[0])
KEYS = ("load", "both", "survivor")
RPM = 10  # of "both" and "survivor"; a burst much shorter than 60 / RPM s refills nothing
BURST = 30
CHAT: dict[str, Any] = {"model": "mock-chat", "messages": [{"role": "user", "content": "say something"}]}
STREAMS = 6
STREAM_HEADERS = {"x-mock-chunks": "100", "x-mock-chunk-delay-ms": "50"}  # 5 s each
TOKEN = re.compile(rb"tok\d+ ")  # the mock's texts: "[mock-b] tok0 ", "tok1 ", ...
LOAD_WORKERS = 2
CUT_BOUND_S = 2.0  # a stream on the killed gateway ends this soon after the kill
# nginx's own access log, written when each request ends: which gateways it tried, and their answers.
ACCESS_FORMAT = "log_format multi '$sluicegate_request_id|$upstream_addr|$upstream_status|$status';\n"


@dataclass
class Farm:
    gateways: tuple[Proc, Proc]
    keys: dict[str, str]
    port: int
    access_log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/chat/completions"

    def headers(self, key: str, request_id: str, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[key]}", "X-Request-ID": request_id, **extra}

    def access(self) -> dict[str, tuple[list[str], list[str], str]]:
        """Request id -> (gateways tried, their statuses, nginx's status)."""
        entries = {}
        for line in self.access_log.read_text().splitlines():
            request_id, addrs, statuses, status = line.split("|")
            entries[request_id] = (addrs.split(", "), statuses.split(", "), status)
        return entries


def multi_server_block(ports: tuple[int, int], access_log: Path) -> str:
    """deploy/nginx-multi.conf as shipped, its two servers pointed at the test's gateways."""
    text = SHIPPED.read_text()
    for shipped, port in zip(SHIPPED_SERVERS, ports, strict=True):
        assert f"server {shipped} " in text, f"{SHIPPED.name} no longer names {shipped}"
        text = text.replace(f"server {shipped} ", f"server 127.0.0.1:{port} ")
    return ACCESS_FORMAT + text.replace("server_name _;", f"server_name _;\n    access_log {access_log} multi;")


@pytest.fixture
def farm(tmp_path: Path, mocks: Mocks, redis_server: RedisServer) -> Iterator[Farm]:
    redis_server.flush()
    keys = {name: new_key() for name in KEYS}
    blocks = "".join(f'\n[[keys]]\nname = "{name}"\nsha256 = "{key_digest(keys[name])}"\n' for name in KEYS)
    blocks = blocks.replace('name = "both"\n', f'name = "both"\nrpm = {RPM}\n')
    blocks = blocks.replace('name = "survivor"\n', f'name = "survivor"\nrpm = {RPM}\n')
    # "deny" and a long timeout, as in test_e2e_limits.py: an exactness test must not pass by luck.
    config = beta_config(mocks, blocks, '[redis]\non_error = "deny"\ntimeout_s = 5')
    first = start_gateway(tmp_path, mocks, config, redis_url=redis_server.url, name="gw1")
    second = start_gateway(tmp_path, mocks, config, redis_url=redis_server.url, name="gw2")
    access_log = tmp_path / "access.log"
    nginx, port = start_nginx(tmp_path, multi_server_block((first.port, second.port), access_log))
    try:
        yield Farm((first, second), keys, port, access_log)
    finally:
        nginx.terminate()
        nginx.wait(timeout=10)
        first.stop()
        second.stop()


async def burst(client: httpx.AsyncClient, farm: Farm, key: str) -> tuple[list[tuple[int, Any]], float]:
    async def one(i: int) -> tuple[int, Any]:
        resp = await client.post(farm.url, json=CHAT, headers=farm.headers(key, f"{key}-{i}"))
        return resp.status_code, resp.headers

    start = time.monotonic()
    results = await asyncio.gather(*(one(i) for i in range(BURST)))
    return results, time.monotonic() - start


async def test_rpm_is_exact_across_both_gateways(farm: Farm) -> None:
    async with httpx.AsyncClient(timeout=15) as client:
        results, elapsed = await burst(client, farm, "both")
    print(f"{BURST} requests in {elapsed:.3f}s")
    assert_exact(results, elapsed, RPM, RPM)
    served_by = {addrs[-1] for request_id, (addrs, _, _) in farm.access().items() if request_id.startswith("both-")}
    assert served_by == {f"127.0.0.1:{gw.port}" for gw in farm.gateways}


@dataclass
class Sent:
    request_id: str
    sent_at: float
    status: int


@dataclass
class Streamed:
    tokens: int = 0
    done: bool = False
    error: Exception | None = None
    ended_at: float = 0.0


async def load(client: httpx.AsyncClient, farm: Farm, worker: int, stop: asyncio.Event, sent: list[Sent]) -> None:
    for i in range(2000):
        if stop.is_set():
            return
        request_id = f"load-{worker}-{i}"
        sent_at = time.monotonic()
        resp = await client.post(farm.url, json=CHAT, headers=farm.headers("load", request_id))
        sent.append(Sent(request_id, sent_at, resp.status_code))
        await asyncio.sleep(0.02)
    raise AssertionError("the load ran past its bound")


async def stream(client: httpx.AsyncClient, farm: Farm, i: int, first_token: asyncio.Event) -> Streamed:
    result = Streamed()
    body = {**CHAT, "stream": True}
    headers = farm.headers("load", f"stream-{i}", **STREAM_HEADERS)
    received = b""
    try:
        async with client.stream("POST", farm.url, json=body, headers=headers) as resp:
            assert resp.status_code == 200
            async for raw in resp.aiter_raw():
                received += raw
                result.tokens = len(TOKEN.findall(received))
                if result.tokens:
                    first_token.set()
    except httpx.TransportError as exc:
        result.error = exc
    result.done = received.endswith(b"data: [DONE]\n\n")
    result.ended_at = time.monotonic()
    return result


def active_streams(gateway: Proc) -> int:
    text = httpx.get(f"http://127.0.0.1:{gateway.port}/metrics", timeout=5).text
    return int(float(re.findall(r"^sluicegate_active_streams (\S+)$", text, re.MULTILINE)[0]))


async def test_killing_one_gateway_under_load(farm: Farm) -> None:
    async with httpx.AsyncClient(timeout=15, limits=httpx.Limits(max_connections=None)) as client:
        stop = asyncio.Event()
        sent: list[Sent] = []
        loads = [asyncio.create_task(load(client, farm, w, stop, sent)) for w in range(LOAD_WORKERS)]
        started = [asyncio.Event() for _ in range(STREAMS)]
        streams = [asyncio.create_task(stream(client, farm, i, started[i])) for i in range(STREAMS)]
        await asyncio.wait_for(asyncio.gather(*(event.wait() for event in started)), 10)

        # Kill the gateway relaying more of the streams, so at least one stream is on it.
        on = [await asyncio.to_thread(active_streams, gw) for gw in farm.gateways]
        assert sum(on) == STREAMS, on
        victim, survivor = farm.gateways if on[0] >= on[1] else farm.gateways[::-1]
        assert victim.proc is not None
        victim.proc.kill()
        await asyncio.to_thread(victim.proc.wait)
        dead_at = time.monotonic()

        # Past fail_timeout, so nginx has tried the dead one again at least once.
        await asyncio.sleep(FAIL_TIMEOUT_S + 1.5)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*loads), 15)
        streamed = await asyncio.wait_for(asyncio.gather(*streams), 15)

        # Sent after the kill: every one answered, some of them by way of the dead gateway's refusal.
        after = [s for s in sent if s.sent_at > dead_at]
        assert len(after) > 20, len(after)
        assert [s for s in after if s.status != 200] == []
        # In flight at the kill: nginx had already passed them on, so the dead one's are 502, not retried.
        assert {s.status for s in sent if s.sent_at <= dead_at} <= {200, 502}
        access = farm.access()
        retried = [access[s.request_id] for s in after if len(access[s.request_id][0]) == 2]
        dead, alive = f"127.0.0.1:{victim.port}", f"127.0.0.1:{survivor.port}"
        assert retried, "no request after the kill met the dead gateway"
        assert all(entry == ([dead, alive], ["502", "200"], "200") for entry in retried), retried

        # Streams on the dead gateway end cut off within CUT_BOUND_S of the kill; the others complete.
        cut = [s for s in streamed if s.error is not None]
        assert len(cut) == max(on), streamed
        for s in cut:
            assert isinstance(s.error, httpx.RemoteProtocolError), s
            assert not s.done and s.tokens >= 1, s
            assert s.ended_at - dead_at < CUT_BOUND_S, s
        assert all(s.done and s.tokens == 100 for s in streamed if s.error is None), streamed

        # The survivor still shares the one Redis: exactly RPM of BURST for a key the load did not use.
        results, elapsed = await burst(client, farm, "survivor")
    print(
        f"streams per gateway {on}, cut {[round(s.ended_at - dead_at, 3) for s in cut]} s after the kill; "
        f"{len(after)} requests after it, {len(retried)} retried on the survivor; {BURST} requests in {elapsed:.3f}s"
    )
    assert_exact(results, elapsed, RPM, RPM)
