"""A long mixed load with faults: does the gateway stay flat, and is every request recorded?

Starts its own redis-server, the built-in mock upstream and ONE `python -m proxy serve` (limits on: rpm, tpm and
a budget far too high to refuse; event records to a file) on free 127.0.0.1 ports, then runs a closed loop of
--concurrency clients for --duration seconds:

    python tests/bench/soak.py [--duration 600] [--concurrency 64] [--disconnects 0.05] [--faults 0.05] [--json]

Half the requests stream (--chunks chunks, --chunk-delay-ms apart), half do not. A share (--disconnects) of the
clients leave early: a stream after its first chunk, a non-stream request while the upstream still thinks. A
share (--faults) of the requests ask the mock for a fault: 503, a reset mid-stream, a garbage body, a slow first
byte past the provider's first_byte_timeout_s. Every --sample-s seconds it samples the gateway's resident memory,
open file descriptors, asyncio tasks and upstream connections (the last two from /metrics).

At the end the gateway is stopped with SIGTERM (it writes every accepted record before it exits) and the records
in the file are counted against the requests the clients sent: they must be equal, and every request id must
appear exactly once. Exit 1 when they differ, when a request got an answer the fault it asked for does not
explain, or when the process did not come back to its starting level of tasks and streams once idle (its open
file descriptors may stay up by the keep-alive connections of both pools, and no more).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` imports however this file is started

from common import HOST, ROOT, Child, free_port, loop_factory, pct, proc_status

# What each fault asks of the mock, and the statuses a client may then see.
FAULTS: dict[str, tuple[dict[str, str], frozenset[int]]] = {
    "status_503": ({"x-mock-status": "503"}, frozenset({502})),
    "reset": ({"x-mock-reset-after": "2"}, frozenset({200, 502})),  # a stream fails after its headers
    "garbage": ({"x-mock-garbage": "1"}, frozenset({200, 502})),  # a stream passes garbage on as it came
    "slow_first_byte": ({"x-mock-ttfb-ms": "1500"}, frozenset({504})),
}
FIRST_BYTE_TIMEOUT_S = 1


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def gateway_config(tmp: Path, mock_url: str, key_digest: str, events: Path) -> Path:
    path = tmp / "gateway.toml"
    path.write_text(
        f'[server]\nbind = "{HOST}:9"\ngraceful_timeout_s = 10\ndrain_delay_s = 0\n\n'
        f'[events]\nsink = "file"\npath = "{events}"\n\n'
        f'[[providers]]\nname = "mock"\nbase_url = "{mock_url}/v1"\nmodels = ["mock-chat"]\n'
        f"first_byte_timeout_s = {FIRST_BYTE_TIMEOUT_S}\n\n"
        f'[[keys]]\nname = "soak"\nsha256 = "{key_digest}"\nrpm = 100000000\ntpm = 1000000000\n'
        f"budget_tokens = 10000000000000\n"
    )
    return path


def gauges(text: str) -> dict[str, float]:
    """The runtime gauges of a /metrics page, summed over their labels (pool connections split by state)."""
    wanted = ("sluicegate_event_loop_tasks", "sluicegate_upstream_connections", "sluicegate_upstream_pool_waiting",
              "sluicegate_active_streams", "sluicegate_inflight_requests", "sluicegate_event_queue_depth")  # fmt: skip
    found: dict[str, float] = {}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name not in wanted:
            continue
        if name == "sluicegate_upstream_connections":
            name += "_idle" if 'state="idle"' in line else "_in_use"
        found[name] = found.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return found


class Soak:
    def __init__(self, args: argparse.Namespace, url: str, key: str, pid: int) -> None:
        self.args = args
        self.url = url
        self.key = key
        self.pid = pid
        self.sent: list[str] = []
        self.outcomes: Counter[str] = Counter()
        self.unexplained: list[str] = []
        self.latency: list[float] = []
        self.samples: list[dict[str, float]] = []
        self.rng = random.Random(args.seed)
        self.ids = 0

    async def sample(self, session: aiohttp.ClientSession) -> dict[str, float]:
        rss = proc_status(self.pid)[0]
        async with session.get(f"{self.url}/metrics") as resp:
            text = await resp.text()
        return {"t_s": time.monotonic(), "rss_mib": rss, "fds": open_fds(self.pid), **gauges(text)}

    async def one(self, session: aiohttp.ClientSession) -> None:
        self.ids += 1
        request_id = f"soak-{self.ids}"
        stream = self.rng.random() < 0.5
        leave = self.rng.random() < self.args.disconnects
        fault = self.rng.choice(list(FAULTS)) if self.rng.random() < self.args.faults else None
        headers = {
            "Authorization": f"Bearer {self.key}",
            "X-Request-ID": request_id,
            "x-mock-chunks": str(self.args.chunks),
            "x-mock-chunk-delay-ms": str(self.args.chunk_delay_ms),
        }
        if fault is not None:
            headers.update(FAULTS[fault][0])
        elif leave and not stream:
            headers["x-mock-ttfb-ms"] = "300"  # something to leave during
        body = {"model": "mock-chat", "messages": [{"role": "user", "content": "soak test"}], "stream": stream}
        self.sent.append(request_id)
        kind = f"{'stream' if stream else 'json'}/{fault or ('leave' if leave else 'ok')}"
        started = time.perf_counter()
        try:
            if leave and fault is None:
                await self.leave_early(session, body, headers, stream)
                self.outcomes[f"{kind} left"] += 1
                return
            async with session.post(f"{self.url}/v1/chat/completions", json=body, headers=headers) as resp:
                data = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.outcomes[f"{kind} {type(exc).__name__}"] += 1
            self.unexplained.append(f"{request_id} {kind}: {type(exc).__name__}")
            return
        self.outcomes[f"{kind} {status}"] += 1
        allowed = FAULTS[fault][1] if fault is not None else frozenset({200})
        if status not in allowed or (stream and fault is None and not data.rstrip().endswith(b"[DONE]")):
            self.unexplained.append(f"{request_id} {kind}: {status} {data[-200:]!r}")
        if fault is None:
            self.latency.append(time.perf_counter() - started)

    async def leave_early(
        self, session: aiohttp.ClientSession, body: dict[str, Any], headers: dict[str, str], stream: bool
    ) -> None:
        """A stream: read the first chunk and go. A non-stream request: give up while the upstream thinks."""
        if not stream:
            request = session.post(f"{self.url}/v1/chat/completions", json=body, headers=headers)
            task = asyncio.ensure_future(request.__aenter__())
            await asyncio.sleep(0.1)
            task.cancel()
            try:
                resp = await task
            except asyncio.CancelledError:
                return
            resp.close()  # it answered before we left after all; close without reading
            return
        async with session.post(f"{self.url}/v1/chat/completions", json=body, headers=headers) as resp:
            await resp.content.readany()
            resp.close()  # drops the connection: the gateway sees the client leave

    async def run(self) -> None:
        args = self.args
        deadline = time.monotonic() + args.duration
        timeout = aiohttp.ClientTimeout(total=30)
        connector = aiohttp.TCPConnector(limit=args.concurrency + 2)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

            async def client() -> None:
                while time.monotonic() < deadline:
                    await self.one(session)

            async def sampler() -> None:
                while time.monotonic() < deadline:
                    self.samples.append(await self.sample(session))
                    await asyncio.sleep(args.sample_s)

            self.samples.append(await self.sample(session))
            sampling = asyncio.create_task(sampler())
            await asyncio.gather(*(client() for _ in range(args.concurrency)))
            sampling.cancel()
            self.samples.append(await self.sample(session))
        # Idle again, every client connection closed: what is left over now was leaked
        # (but for the upstream pool's idle keep-alive connections, which are meant to stay).
        await asyncio.sleep(FIRST_BYTE_TIMEOUT_S + 2)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            self.samples.append(await self.sample(session))


def count_records(path: Path) -> Counter[str]:
    ids: Counter[str] = Counter()
    with path.open("rb") as lines:
        for line in lines:
            ids[json.loads(line)["request_id"]] += 1
    return ids


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--disconnects", type=float, default=0.05, help="share of clients that leave early")
    parser.add_argument("--faults", type=float, default=0.05, help="share of requests that ask for an upstream fault")
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--chunk-delay-ms", type=float, default=10.0)
    parser.add_argument("--sample-s", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from proxy.request.auth import key_digest, new_key

    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        print("redis-server is not installed", file=sys.stderr)
        return 2
    children: dict[str, Child] = {}
    with tempfile.TemporaryDirectory(prefix="sluicegate-soak-") as tmp_name:
        tmp = Path(tmp_name)
        events = tmp / "events.jsonl"
        key = new_key()
        ports = {name: free_port() for name in ("redis", "mock", "gateway")}
        try:
            redis_args = [redis_bin, "--port", str(ports["redis"]), "--bind", HOST, "--save", "", "--appendonly", "no"]
            children["redis"] = Child("redis", redis_args, ports["redis"], tmp).wait_ready()
            mock_args = [sys.executable, "-m", "proxy", "mock-upstream", "--bind", f"{HOST}:{ports['mock']}"]
            children["mock"] = Child("mock", mock_args, ports["mock"], tmp).wait_ready()
            config = gateway_config(tmp, f"http://{HOST}:{ports['mock']}", key_digest(key), events)
            os.environ["REDIS_URL"] = f"redis://{HOST}:{ports['redis']}/0"
            gateway_args = [sys.executable, "-m", "proxy", "serve", "--config", str(config),
                            "--bind", f"{HOST}:{ports['gateway']}"]  # fmt: skip
            gateway = children["gateway"] = Child("gateway", gateway_args, ports["gateway"], tmp).wait_ready()
            soak = Soak(args, f"http://{HOST}:{ports['gateway']}", key, gateway.proc.pid)
            started = time.monotonic()
            with asyncio.Runner(loop_factory=loop_factory()) as runner:
                runner.run(soak.run())
            elapsed = time.monotonic() - started
            gateway.stop()
            records = count_records(events)
        finally:
            for child in children.values():
                child.stop()
    sent = Counter(soak.sent)
    missing = sorted(set(sent) - set(records))
    doubled = sorted(r for r, n in records.items() if n > 1)
    first, busy_end, idle = soak.samples[0], soak.samples[-2], soak.samples[-1]
    # One task more than at the start: the scrape's own connection.
    allowed = {"sluicegate_event_loop_tasks": 3.0}
    skip = ("t_s", "rss_mib", "fds", "sluicegate_upstream_connections_idle")
    grown = {k: idle[k] - first.get(k, 0.0) for k in idle if k not in skip}
    leaked = {k: more for k, more in grown.items() if more > allowed.get(k, 0.0)}
    out = {
        "settings": vars(args), "elapsed_s": round(elapsed, 1), "requests_sent": len(soak.sent),
        "records_written": sum(records.values()), "missing_records": missing[:20], "doubled_records": doubled[:20],
        "outcomes": dict(sorted(soak.outcomes.items())), "unexplained": soak.unexplained[:20],
        "latency_ms": {"p50": pct(soak.latency, 0.5), "p99": pct(soak.latency, 0.99)},
        "start": first, "end_of_load": busy_end, "idle_after": idle, "leaked": leaked,
        "samples": soak.samples,
    }  # fmt: skip
    # Pools keep idle keep-alive connections: the upstream's and Redis's, up to one each per request in flight.
    fds_allowed = first["fds"] + 2 * args.concurrency + 4
    failures = [
        *(["records written differ from requests sent"] if len(soak.sent) != sum(records.values()) else []),
        *(["some requests have no record or two"] if missing or doubled else []),
        *(["answers their fault does not explain"] if soak.unexplained else []),
        *([f"grew and stayed up once idle: {leaked}"] if leaked else []),
        *([f"{idle['fds']:.0f} open files once idle, over {fds_allowed}"] if idle["fds"] > fds_allowed else []),
    ]
    out["failures"] = failures
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(report(out))
    return 1 if failures else 0


def report(out: dict[str, Any]) -> str:
    a = out["settings"]
    lines = [
        f"sluicegate soak: {out['elapsed_s']} s, concurrency {a['concurrency']}, {a['disconnects']:.0%} client "
        f"disconnects, {a['faults']:.0%} upstream faults, streams of {a['chunks']} chunks {a['chunk_delay_ms']:g} ms "
        f"apart, {os.cpu_count()} CPUs",
        f"requests sent {out['requests_sent']}, records written {out['records_written']}, "
        f"missing {len(out['missing_records'])}, doubled {len(out['doubled_records'])}",
        f"latency of requests without faults: p50 {out['latency_ms']['p50']:.1f} ms, "
        f"p99 {out['latency_ms']['p99']:.1f} ms",
        "",
        f"{'':<40}{'start':>12}{'end of load':>14}{'idle after':>12}",
    ]
    for name in dict.fromkeys([*out["start"], *out["end_of_load"], *out["idle_after"]]):
        if name == "t_s":
            continue
        row = (out["start"].get(name, 0.0), out["end_of_load"].get(name, 0.0), out["idle_after"].get(name, 0.0))
        lines.append(f"{name:<40}" + "".join(f"{v:>12.1f}" if i != 1 else f"{v:>14.1f}" for i, v in enumerate(row)))
    lines += ["", "outcomes (kind/fault status):"]
    lines += [f"  {name:<40}{count:>8}" for name, count in out["outcomes"].items()]
    if out["unexplained"]:
        lines += ["", "UNEXPLAINED answers (first 20):", *(f"  {u}" for u in out["unexplained"])]
    if out["missing_records"] or out["doubled_records"]:
        lines += ["", f"MISSING records: {out['missing_records']}", f"DOUBLED records: {out['doubled_records']}"]
    lines += [
        "",
        "FAILED: " + "; ".join(out["failures"])
        if out["failures"]
        else "OK: every request recorded once, nothing left over",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
