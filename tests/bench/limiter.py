"""What the Redis limiter adds to each request, against the same gateway with limits off, in one run.

Starts its own redis-server, the built-in mock upstream and ONE `python -m proxy serve` (REDIS_URL pointing at
that Redis, events off) on free 127.0.0.1 ports. The gateway's config has two keys made now:

    off  no rpm, tpm or budget on the key or its group: the gateway never calls Redis for it
    on   rpm, tpm and budget_tokens on the key and rpm/tpm on its group, all far too high to refuse, so each
         request runs the admit script (four buckets + budget) before the upstream call and the charge
         script (two token buckets + budget) after the answer

    python tests/bench/limiter.py [--requests 3000] [--serial-requests 800] [--concurrency 16] [--json]

Four passes: non-stream and stream chat at --concurrency, then both again at concurrency 1 (the per-request
cost without queueing). In each pass the requests are split into rounds that take turns between the two keys on
one client session (one pool of keep-alive connections to the one gateway), so drift hits both alike. The Redis
columns come from INFO commandstats and the redis-server's CPU time, read before and after every batch once
Redis has gone quiet, so they are what the gateway actually did; "redis RT" counts EVAL/EVALSHA calls per
request. CPU times come from /proc in clock ticks (10 ms) summed over the batches, so read them as averages.
Any answer other than 200 is a failure (exit 1), as is hitting --deadline: the limits are set so that none can
be refused.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` imports however this file is started

from common import (
    HOST,
    ROOT,
    Child,
    free_port,
    loop_factory,
    machine_busy_s,
    no_nan,
    our_cpu_s,
    pct,
    proc_status,
)

KEYS = ("off", "on")
RPM, TPM, BUDGET = 100_000_000, 1_000_000_000, 10_000_000_000_000  # far beyond anything one run can use
SCRIPT_CALLS = ("evalsha", "eval", "evalsha_ro", "eval_ro")  # one network round trip each
QUIET_S = 0.003  # Redis counts as quiet when commandstats do not move for this long
QUIET_MAX_S = 1.0
REQUEST_TIMEOUT_S = 10.0
DEADLINE_GRACE_S = 5.0  # in-flight requests get this long after the deadline before they are cancelled


@dataclass
class Tally:
    """What one key saw in one pass, summed over rounds."""

    stream: bool = False  # time to first byte only means something for streams
    total: list[float] = field(default_factory=list)
    ttfb: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    ratelimit_headers: int = 0  # answers that carried x-ratelimit-limit-requests
    elapsed: float = 0.0
    gateway_cpu: float = 0.0
    redis_cpu: float = 0.0
    redis_calls: Counter[str] = field(default_factory=Counter)  # by command, scripts' inner commands included
    redis_usec: Counter[str] = field(default_factory=Counter)

    def summary(self) -> dict[str, Any]:
        done = sum(self.statuses.values())
        per_req = (lambda x: x / done) if done else (lambda _x: math.nan)
        scripts = sum(self.redis_calls[c] for c in SCRIPT_CALLS)
        return {
            "requests": done, "ok": len(self.total), "non_200": {s: n for s, n in self.statuses.items() if s != "200"},
            "rps": len(self.total) / self.elapsed if self.elapsed else 0.0,
            "p50_ms": pct(self.total, 0.50), "p90_ms": pct(self.total, 0.90), "p99_ms": pct(self.total, 0.99),
            "ttfb_p50_ms": pct(self.ttfb, 0.50) if self.stream else math.nan,
            "ttfb_p99_ms": pct(self.ttfb, 0.99) if self.stream else math.nan,
            "gateway_cpu_us_per_req": per_req(self.gateway_cpu * 1e6),
            "redis_cpu_us_per_req": per_req(self.redis_cpu * 1e6),
            "redis_round_trips_per_req": per_req(scripts),
            "redis_commands_per_req": per_req(sum(self.redis_calls.values())),
            "redis_script_usec_per_call": sum(self.redis_usec[c] for c in SCRIPT_CALLS) / scripts if scripts else 0.0,
            "redis_calls": dict(sorted(self.redis_calls.items())),
            "ratelimit_headers": self.ratelimit_headers,
        }  # fmt: skip


@dataclass
class Bench:
    """Everything the passes share."""

    args: Any
    url: str
    keys: dict[str, str]
    gateway_pid: int
    redis_pid: int
    redis: aioredis.Redis
    session: aiohttp.ClientSession | None = None
    stats: tuple[Counter[str], Counter[str]] = field(default_factory=lambda: (Counter(), Counter()))
    seen: Counter[str] = field(default_factory=Counter)  # statuses of every request, warm-up included
    deadline_hit: bool = False

    async def commandstats(self) -> tuple[Counter[str], Counter[str]]:
        """(calls, usec) by command since Redis started, without our own INFO calls."""
        raw = await self.redis.info("commandstats")
        calls: Counter[str] = Counter()
        usec: Counter[str] = Counter()
        for name, row in raw.items():
            command = name.removeprefix("cmdstat_")
            if command != "info":
                calls[command], usec[command] = int(row["calls"]), int(row["usec"])
        return calls, usec

    async def quiet_stats(self) -> tuple[Counter[str], Counter[str]]:
        """Commandstats once they stop moving: a charge may still run after its answer reached the client."""
        stats = await self.commandstats()
        give_up = time.monotonic() + QUIET_MAX_S
        while time.monotonic() < give_up:
            await asyncio.sleep(QUIET_S)
            again = await self.commandstats()
            if again[0] == stats[0]:
                return again
            stats = again
        return stats

    async def batch(self, tally: Tally, key: str, body: bytes, count: int, concurrency: int) -> None:
        """`count` POSTs with one key by `concurrency` workers into `tally`; stops early at the deadline."""
        assert self.session is not None
        session, url = self.session, self.url
        todo = iter(range(count))
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {self.keys[key]}"}

        async def worker() -> None:
            for _ in todo:
                if time.monotonic() > self.args.deadline_at:
                    self.deadline_hit = True
                    return
                t0 = time.perf_counter()
                first = None
                try:
                    async with session.post(url, data=body, headers=headers) as resp:
                        status = str(resp.status)
                        tally.ratelimit_headers += "x-ratelimit-limit-requests" in resp.headers
                        async for _chunk in resp.content.iter_any():
                            first = first or time.perf_counter()
                except (aiohttp.ClientError, TimeoutError) as exc:
                    status = type(exc).__name__
                tally.statuses[status] += 1
                self.seen[status] += 1
                if status == "200" and first is not None:
                    tally.total.append(time.perf_counter() - t0)
                    tally.ttfb.append(first - t0)

        gateway_cpu, redis_cpu = proc_status(self.gateway_pid)[1], proc_status(self.redis_pid)[1]
        started = time.perf_counter()
        try:
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        finally:
            tally.elapsed += time.perf_counter() - started
            tally.gateway_cpu += proc_status(self.gateway_pid)[1] - gateway_cpu
            tally.redis_cpu += proc_status(self.redis_pid)[1] - redis_cpu
        after = await self.quiet_stats()
        tally.redis_calls.update(after[0] - self.stats[0])
        tally.redis_usec.update(after[1] - self.stats[1])
        self.stats = after


PASSES = (("json", "concurrency"), ("stream", "concurrency"), ("json", 1), ("stream", 1))


async def run_pass(bench: Bench, mode: str, concurrency: int, requests: int, out: dict[str, Any]) -> None:
    """Warm up both keys, then rounds that take turns between them; `out` is filled as the pass goes."""
    args = bench.args
    messages = [{"role": "user", "content": "Say hello."}]
    body = json.dumps({"model": "mock-chat", "messages": messages, "stream": mode == "stream"}).encode()
    tallies = {key: Tally(stream=mode == "stream") for key in KEYS}
    out.update({"mode": mode, "concurrency": concurrency, "tallies": tallies})
    for key in KEYS:
        await bench.batch(Tally(), key, body, args.warmup, concurrency)
    for i in range(args.rounds):
        count = requests // args.rounds + (i < requests % args.rounds)
        for key in KEYS[i % 2 :] + KEYS[: i % 2]:
            await bench.batch(tallies[key], key, body, count, concurrency)


async def run_all(bench: Bench, passes: list[dict[str, Any]]) -> None:
    args = bench.args
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session:
        bench.session = session
        bench.stats = await bench.quiet_stats()
        for mode, conc in PASSES:
            concurrency = args.concurrency if conc == "concurrency" else int(conc)
            if concurrency == args.concurrency and conc == 1:
                continue  # --concurrency 1 already is the serial pass
            requests = args.requests if conc == "concurrency" else args.serial_requests
            passes.append({})
            await run_pass(bench, mode, concurrency, requests, passes[-1])
            if bench.deadline_hit:
                return


DIFF_KEYS = ("p50_ms", "p90_ms", "p99_ms", "ttfb_p50_ms", "ttfb_p99_ms", "gateway_cpu_us_per_req",
             "redis_cpu_us_per_req", "redis_round_trips_per_req", "redis_commands_per_req")  # fmt: skip


def summarize(passes: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for p in passes:
        if not p:
            continue
        rows = {key: tally.summary() for key, tally in p["tallies"].items()}
        on, off = rows["on"], rows["off"]
        diff = {k: on[k] - off[k] for k in DIFF_KEYS}
        diff["rps_ratio"] = on["rps"] / off["rps"] if off["rps"] else math.nan
        out[f"{p['mode']} c={p['concurrency']}"] = {
            "mode": p["mode"], "concurrency": p["concurrency"], **rows, "on_minus_off": diff,
        }  # fmt: skip
    return out


KEY_COLUMNS = {"p50_ms": "p50", "p90_ms": "p90", "p99_ms": "p99", "ttfb_p50_ms": "ttfb p50",
               "ttfb_p99_ms": "ttfb p99", "rps": "req/s", "gateway_cpu_us_per_req": "gw CPU us",
               "redis_cpu_us_per_req": "redis CPU us", "redis_round_trips_per_req": "redis RT",
               "redis_commands_per_req": "redis cmds", "requests": "requests"}  # fmt: skip
DIFF_COLUMNS = {"p50_ms": "p50", "p90_ms": "p90", "p99_ms": "p99", "ttfb_p50_ms": "ttfb p50",
                "ttfb_p99_ms": "ttfb p99", "rps_ratio": "req/s x", "gateway_cpu_us_per_req": "gw CPU us",
                "redis_cpu_us_per_req": "redis CPU us", "redis_round_trips_per_req": "redis RT"}  # fmt: skip
WHOLE = frozenset({"rps", "requests", "gateway_cpu_us_per_req", "redis_cpu_us_per_req"})
LABEL = 22


def cell(key: str, value: Any, signed: bool = False) -> str:
    if isinstance(value, float) and math.isnan(value):
        return f"{'-':>13}"
    sign = "+" if signed and key != "rps_ratio" else ""
    return f"{value:>{sign}13.{0 if key in WHOLE else 2}f}"


def table(title: str, columns: dict[str, str], rows: dict[str, dict[str, Any]], signed: bool = False) -> str:
    lines = [title, " " * LABEL + "".join(f"{label:>13}" for label in columns.values())]
    for name, row in rows.items():
        lines.append(f"{name:<{LABEL}}" + "".join(cell(k, row[k], signed) for k in columns))
    return "\n".join(lines)


def report(out: dict[str, Any]) -> str:
    a, results = out["settings"], out["passes"]
    parts = [
        f"sluicegate limiter cost: per key {a['requests']} requests at concurrency {a['concurrency']} and "
        f"{a['serial_requests']} at concurrency 1 per mode, after {a['warmup']} warm-up, in {a['rounds']} rounds "
        f"taking turns; stream of {a['chunks']} chunks {a['chunk_delay_ms']:g} ms apart; {os.cpu_count()} CPUs, "
        f"{out['elapsed_s']:.1f} s in all, {out['other_processes_cpu_pct']:.0f}% of the CPUs used by other "
        "processes meanwhile",
        f"key 'on': rpm {RPM}, tpm {TPM}, budget_tokens {BUDGET}, group rpm {RPM}, tpm {TPM}; key 'off': no limits",
    ]
    rows = {f"{name} {key}": r[key] for name, r in results.items() for key in KEYS}
    title = "\nper key (ms; CPU us and Redis per request; RT = EVAL/EVALSHA round trips)"
    parts.append(table(title, KEY_COLUMNS, rows))
    diffs = {name: r["on_minus_off"] for name, r in results.items()}
    parts.append(table("\nlimiter cost: on - off (ms added; x = throughput ratio)", DIFF_COLUMNS, diffs, signed=True))
    on = Counter[str]()
    on_requests = 0
    for r in results.values():
        on.update(r["on"]["redis_calls"])
        on_requests += r["on"]["requests"]
    if on_requests:
        inner = ", ".join(f"{c} {n / on_requests:.2f}" for c, n in sorted(on.items()) if n / on_requests >= 0.005)
        usec = [r["on"]["redis_script_usec_per_call"] for r in results.values()]
        parts.append(
            f"\nRedis commands per 'on' request (INFO commandstats, commands run inside the scripts included): {inner}"
            f"\nRedis time per script call (commandstats usec): {min(usec):.1f}-{max(usec):.1f} us"
        )
    headers = {key: sum(r[key]["ratelimit_headers"] for r in results.values()) for key in KEYS}
    oks = {key: sum(r[key]["ok"] for r in results.values()) for key in KEYS}
    parts.append(
        f"x-ratelimit-* headers: on {headers['on']}/{oks['on']} answers, off {headers['off']}/{oks['off']} answers"
    )
    seen = out["statuses"]
    if out["all_200"]:
        parts.append(f"OK: no request was refused: all {seen.get('200', 0)} requests (warm-up included) answered 200.")
    else:
        parts.append(f"FAILED: not every request answered 200: {seen}")
    if out["other_processes_cpu_pct"] > 10:
        parts.append("WARNING: other processes competed for the CPUs; these numbers are not comparable.")
    if out["deadline_hit"]:
        parts.append(f"DEADLINE: stopped after {a['deadline']:g} s; the numbers above are partial.")
    return "\n".join(parts)


def gateway_config(tmp: Path, mock_url: str, keys: dict[str, str]) -> Path:
    sys.path.insert(0, str(ROOT))  # so the script also runs without `pip install -e .`
    from proxy.request.auth import key_digest

    path = tmp / "gateway.toml"
    path.write_text(
        f'[server]\nbind = "{HOST}:9"\ngraceful_timeout_s = 2\ndrain_delay_s = 0\n\n'
        # deny: a Redis failure shows up as 503 instead of as a request that skipped the limiter
        '[redis]\non_error = "deny"\n\n[events]\nsink = "off"\n\n'
        f'[[providers]]\nname = "mock"\nbase_url = "{mock_url}/v1"\nmodels = ["mock-chat"]\nstream_usage = true\n\n'
        f"[groups.limited]\nrpm = {RPM}\ntpm = {TPM}\n\n"
        f'[[keys]]\nname = "off"\nsha256 = "{key_digest(keys["off"])}"\n\n'
        f'[[keys]]\nname = "on"\nsha256 = "{key_digest(keys["on"])}"\ngroup = "limited"\n'
        f"rpm = {RPM}\ntpm = {TPM}\nbudget_tokens = {BUDGET}\n"
    )
    return path


def start_children(args: Any, tmp: Path, children: dict[str, Child]) -> tuple[str, int, dict[str, str]]:
    """redis-server, mock and gateway on free ports; `children` gets each one as soon as it is started."""
    sys.path.insert(0, str(ROOT))
    from proxy.request.auth import new_key

    ports = {name: free_port() for name in ("redis", "mock", "gateway")}
    redis_args = ["redis-server", "--port", str(ports["redis"]), "--bind", HOST, "--save", "", "--appendonly", "no"]
    children["redis"] = Child("redis", redis_args, ports["redis"], tmp)
    mock_args = [sys.executable, "-m", "proxy", "mock-upstream", "--chunks", str(args.chunks),
                 "--chunk-delay-ms", str(args.chunk_delay_ms), "--bind", f"{HOST}:{ports['mock']}"]  # fmt: skip
    children["mock"] = Child("mock", mock_args, ports["mock"], tmp)
    keys = {key: new_key() for key in KEYS}
    config = gateway_config(tmp, f"http://{HOST}:{ports['mock']}", keys)
    gateway_bind = f"{HOST}:{ports['gateway']}"
    gateway_args = [sys.executable, "-m", "proxy", "serve", "--config", str(config), "--bind", gateway_bind]
    redis_url = {"REDIS_URL": f"redis://{HOST}:{ports['redis']}/0"}
    children["gateway"] = Child("gateway", gateway_args, ports["gateway"], tmp, redis_url)
    for child in children.values():
        child.wait_ready()
    return f"http://{HOST}:{ports['gateway']}/v1/chat/completions", ports["redis"], keys


async def measure_all(args: Any, url: str, redis_port: int, keys: dict[str, str], pids: dict[str, int]) -> Any:
    passes: list[dict[str, Any]] = []
    client = aioredis.Redis(host=HOST, port=redis_port, socket_timeout=5)
    bench = Bench(args, url, keys, pids["gateway"], pids["redis"], client)
    try:
        async with asyncio.timeout(max(0.0, args.deadline_at - time.monotonic()) + DEADLINE_GRACE_S):
            await run_all(bench, passes)
    except TimeoutError:
        bench.deadline_hit = True
    finally:
        await client.aclose()
    return passes, bench.seen, bench.deadline_hit


def main() -> int:
    parser = argparse.ArgumentParser(description="sluicegate with the Redis limiter on vs off, one gateway, one run")
    parser.add_argument("--requests", type=int, default=3000, help="measured per key and mode at --concurrency")
    parser.add_argument("--serial-requests", type=int, default=800, help="measured per key and mode at concurrency 1")
    parser.add_argument("--warmup", type=int, default=100, help="warm-up requests per key and pass")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=10, help="each pass is split into rounds that take turns")
    parser.add_argument("--chunks", type=int, default=8, help="mock stream chunks")
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0, help="mock gap between stream chunks")
    parser.add_argument("--deadline", type=float, default=120.0, help="global time limit in seconds")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        print("redis-server is not installed; this benchmark needs one", file=sys.stderr)
        return 2
    args.concurrency, args.rounds = max(1, args.concurrency), max(1, args.rounds)
    started = time.monotonic()
    args.deadline_at = started + args.deadline
    children: dict[str, Child] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="sluicegate-limiter-bench-") as tmp:
            url, redis_port, keys = start_children(args, Path(tmp), children)
            pids = {name: child.proc.pid for name, child in children.items()}
            ours, busy, wall = our_cpu_s(pids), machine_busy_s(), time.monotonic()
            with asyncio.Runner(loop_factory=loop_factory()) as runner:
                passes, seen, deadline_hit = runner.run(measure_all(args, url, redis_port, keys, pids))
            others = (machine_busy_s() - busy) - (our_cpu_s(pids) - ours)
            others_pct = 100 * others / ((time.monotonic() - wall) * (os.cpu_count() or 1))
    finally:
        for child in reversed(children.values()):
            child.stop()
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "deadline_at")}
    out = {
        "settings": settings, "passes": summarize(passes), "statuses": dict(seen),
        "all_200": bool(seen) and set(seen) == {"200"}, "deadline_hit": deadline_hit,
        "elapsed_s": time.monotonic() - started, "other_processes_cpu_pct": max(0.0, others_pct),
    }  # fmt: skip
    print(json.dumps(no_nan(out), indent=2) if args.json else report(out))
    return 0 if out["all_200"] and not deadline_hit else 1


if __name__ == "__main__":
    sys.exit(main())
