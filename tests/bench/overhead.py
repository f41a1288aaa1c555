"""What sluicegate costs over a bare relay and over no relay at all, in one run.

Starts the built-in mock upstream, tests/bench/bare_relay.py and `python -m proxy serve` on free 127.0.0.1 ports
and measures each path with one aiohttp client session; rounds take turns between the targets, so drift hits each
alike. Four scenarios:

    python tests/bench/overhead.py [--requests 2000] [--concurrency 16] [--json]      # quick, the default
    python tests/bench/overhead.py --scenario s1 [--duration 10] [--rounds 3] [--json]
    python tests/bench/overhead.py --scenario s3 [--duration 10] [--rounds 3] [--json]
    python tests/bench/overhead.py --scenario s4 [--duration 20] [--json]

quick: the gateway with one key, events off, no limits; --requests non-stream and then stream requests per target
at --concurrency 16. On a 2-core box the client, the mock and the relay share the CPUs, so latency includes
queueing; "CPU us/req" (CPU time of the process the client talks to) is the steadiest column.

s1, s3, s4: the reference harness's loads (../shared/bench/README.md), set up the way it sets them up (see
scenarios.py: limits on, records to a file, the targets pinned apart from the mock and the client):
    s1  non-stream, closed loop, 64 connections, --duration s per target and round
    s3  200 concurrent streams of 50 chunks 20 ms apart (+ usage chunk, [DONE]), --duration s per target and round
    s4  1000 concurrent slow streams of 25 chunks 200 ms apart, two waves of --duration s per target
Targets: direct (the mock), bare_relay, sluicegate and, in s1 and s3, sluicegate_nolimits (the same gateway with a
key without limits). --concurrency, --chunks and --chunk-delay-ms change a scenario's own.

The header says how much CPU other processes used meanwhile; above 10% the numbers are flagged. --deadline bounds
the whole run. Exit 1 on any error or when the deadline cut the run short.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` imports however this file is started

from common import HOST, ROOT, Child, free_port, loop_factory, machine_busy_s, no_nan, our_cpu_s, pct, proc_status
from scenarios import SCENARIOS, run_scenario

TARGETS = ("direct", "bare_relay", "sluicegate")
DIFFERENCES = (("json", ("p50_ms", "p99_ms")), ("stream", ("ttfb_p50_ms", "ttfb_p99_ms", "p50_ms", "p99_ms")))
WHOLE = frozenset({"rps", "requests", "errors", "cpu_us_per_req"})  # printed without decimals
QUICK = {"concurrency": 16, "rounds": 4, "chunks": 8, "chunk_delay_ms": 0.0, "deadline": 120.0}
SCENARIO_DEADLINE_S = 600.0


def gateway_config(tmp: Path, mock_url: str, stream_usage: bool) -> tuple[Path, str]:
    sys.path.insert(0, str(ROOT))  # so the script also runs without `pip install -e .`
    from proxy.request.auth import key_digest, new_key

    key = new_key()
    path = tmp / "gateway.toml"
    path.write_text(
        f'[server]\nbind = "{HOST}:9"\ngraceful_timeout_s = 2\ndrain_delay_s = 0\n\n[events]\nsink = "off"\n\n'
        f'[[providers]]\nname = "mock"\nbase_url = "{mock_url}/v1"\nmodels = ["mock-chat"]\n'
        f"stream_usage = {str(stream_usage).lower()}\n\n"
        f'[[keys]]\nname = "bench"\nsha256 = "{key_digest(key)}"\n'
    )
    return path, key


class Tally:
    """What the client saw of one target in one mode, summed over rounds."""

    def __init__(self, pid: int) -> None:
        self.pid = pid  # the process the client talks to, whose CPU time is counted
        self.total: list[float] = []
        self.ttfb: list[float] = []
        self.errors = 0
        self.elapsed = 0.0
        self.cpu = 0.0

    def summary(self) -> dict[str, float]:
        done = len(self.total) + self.errors
        return {
            "requests": done, "errors": self.errors, "rps": len(self.total) / self.elapsed if self.elapsed else 0.0,
            "p50_ms": pct(self.total, 0.50), "p90_ms": pct(self.total, 0.90), "p99_ms": pct(self.total, 0.99),
            "ttfb_p50_ms": pct(self.ttfb, 0.50), "ttfb_p99_ms": pct(self.ttfb, 0.99),
            "cpu_us_per_req": self.cpu / done * 1e6 if done else math.nan,
        }  # fmt: skip


async def measure(session: aiohttp.ClientSession, tally: Tally, url: str, body: bytes, count: int, args: Any) -> None:
    """`count` POSTs by `args.concurrency` workers into `tally`; stops early at the global deadline."""
    todo = iter(range(count))
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {args.key}"}

    async def worker() -> None:
        for _ in todo:
            if time.monotonic() > args.deadline_at:
                return
            t0 = time.perf_counter()
            first = None
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    async for _chunk in resp.content.iter_any():
                        first = first or time.perf_counter()
                    ok = resp.status == 200
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            if not ok or first is None:
                tally.errors += 1
                continue
            tally.total.append(time.perf_counter() - t0)
            tally.ttfb.append(first - t0)

    cpu, started = proc_status(tally.pid)[1], time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    tally.elapsed += time.perf_counter() - started
    tally.cpu += proc_status(tally.pid)[1] - cpu


async def run_all(args: Any, urls: dict[str, str], pids: dict[str, int]) -> dict[str, dict[str, Any]]:
    """Warm up each target, then rounds that take turns between the targets."""
    results: dict[str, dict[str, Any]] = {}
    timeout = aiohttp.ClientTimeout(total=30)
    connector = aiohttp.TCPConnector(limit=args.concurrency * len(TARGETS))
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session:
        for mode in ("json", "stream"):
            messages = [{"role": "user", "content": "Say hello."}]
            body = json.dumps({"model": "mock-chat", "messages": messages, "stream": mode == "stream"}).encode()
            paths = {name: urls[name] + "/v1/chat/completions" for name in TARGETS}
            tallies = {name: Tally(pids[name]) for name in TARGETS}
            for name in TARGETS:
                await measure(session, Tally(pids[name]), paths[name], body, args.warmup, args)
            for i in range(args.rounds):
                count = args.requests // args.rounds + (i < args.requests % args.rounds)
                for name in TARGETS[i % len(TARGETS) :] + TARGETS[: i % len(TARGETS)]:
                    await measure(session, tallies[name], paths[name], body, count, args)
            results[mode] = {name: tally.summary() for name, tally in tallies.items()}
    return results


def overhead(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Differences of p50/p99 (ms) and throughput ratios, against direct and against the bare relay."""
    out: dict[str, dict[str, float]] = {}
    for name, base in (("bare_relay", "direct"), ("sluicegate", "direct"), ("sluicegate", "bare_relay")):
        row = out[f"{name} - {base}"] = {}
        for mode, keys in DIFFERENCES:
            ours, theirs = results[mode][name], results[mode][base]
            row.update({f"{mode}_{k}": ours[k] - theirs[k] for k in keys})
            row[f"{mode}_rps_x"] = ours["rps"] / theirs["rps"] if theirs["rps"] else math.nan
    return out


JSON_COLUMNS = {"p50_ms": "p50", "p90_ms": "p90", "p99_ms": "p99", "rps": "req/s", "cpu_us_per_req": "CPU us/req",
                "requests": "requests", "errors": "errors"}  # fmt: skip
STREAM_COLUMNS = {"ttfb_p50_ms": "ttfb p50", "ttfb_p99_ms": "ttfb p99", "p50_ms": "total p50", "p99_ms": "total p99",
                  "rps": "req/s", "cpu_us_per_req": "CPU us/req", "errors": "errors"}  # fmt: skip
OVERHEAD_COLUMNS = {"json_p50_ms": "json p50", "json_p99_ms": "json p99", "json_rps_x": "json rps x",
                    "stream_ttfb_p50_ms": "ttfb p50", "stream_ttfb_p99_ms": "ttfb p99", "stream_p50_ms": "total p50",
                    "stream_p99_ms": "total p99", "stream_rps_x": "strm rps x"}  # fmt: skip


def table(title: str, columns: dict[str, str], rows: dict[str, dict[str, float]]) -> str:
    lines = [title, f"{'':<24}" + "".join(f"{label:>12}" for label in columns.values())]
    for name, row in rows.items():
        lines.append(f"{name:<24}" + "".join(f"{row[key]:>12.{0 if key in WHOLE else 2}f}" for key in columns))
    return "\n".join(lines)


def report(out: dict[str, Any]) -> str:
    a = out["settings"]
    memory = ", ".join(f"{n} {m['start']:.1f} at start -> {m['end']:.1f} after" for n, m in out["rss_mib"].items())
    parts = [
        f"sluicegate overhead: {a['requests']} requests per target and mode after {a['warmup']} warm-up, "
        f"concurrency {a['concurrency']}, stream of {a['chunks']} chunks {a['chunk_delay_ms']:g} ms apart, "
        f"stream_usage={a['stream_usage']}, {os.cpu_count()} CPUs, {out['elapsed_s']:.1f} s in all, "
        f"{out['other_processes_cpu_pct']:.0f}% of the CPUs used by other processes meanwhile",
        table("\nnon-stream (ms; CPU = the process the client talks to)", JSON_COLUMNS, out["json"]),
        table("\nstream (ms; ttfb = first body bytes)", STREAM_COLUMNS, out["stream"]),
        table("\noverhead (ms added; x = throughput ratio)", OVERHEAD_COLUMNS, out["overhead"]),
        f"\nresident memory (VmRSS, MiB): {memory}",
    ]
    if out["other_processes_cpu_pct"] > 10:
        parts.append("\nWARNING: other processes competed for the CPUs; these numbers are not comparable.")
    if out["deadline_hit"]:
        parts.append(f"\nDEADLINE: stopped after {a['deadline']:g} s; the numbers above are partial.")
    return "\n".join(parts)


def start_children(args: Any, tmp: Path, children: dict[str, Child]) -> dict[str, str]:
    """Mock, bare relay and gateway on free ports; `children` gets each one as soon as it is started."""
    ports = {name: free_port() for name in TARGETS}
    urls = {name: f"http://{HOST}:{port}" for name, port in ports.items()}
    config, args.key = gateway_config(tmp, urls["direct"], args.stream_usage)
    py, bare = sys.executable, str(Path(__file__).with_name("bare_relay.py"))
    commands = {
        "direct": [py, "-m", "proxy", "mock-upstream", "--chunks", str(args.chunks),
                   "--chunk-delay-ms", str(args.chunk_delay_ms)],
        "bare_relay": [py, bare, "--upstream", urls["direct"]],
        "sluicegate": [py, "-m", "proxy", "serve", "--config", str(config)],
    }  # fmt: skip
    for name in TARGETS:
        children[name] = Child(name, [*commands[name], "--bind", f"{HOST}:{ports[name]}"], ports[name], tmp)
    for child in children.values():
        child.wait_ready()
    return urls


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="sluicegate vs bare relay vs direct, against the mock upstream")
    parser.add_argument("--scenario", choices=("quick", *SCENARIOS), default="quick",
                        help="quick (default), or one of the reference harness's loads: s1, s3, s4")  # fmt: skip
    parser.add_argument("--requests", type=int, default=2000, help="quick: measured requests per target and mode")
    parser.add_argument("--duration", type=float, help="s1, s3, s4: seconds per target and round (default 10; s4 20)")
    parser.add_argument("--warmup", type=int, default=100, help="warm-up requests per target (quick: and mode)")
    parser.add_argument("--concurrency", type=int, help="default: quick 16, s1 64, s3 200, s4 1000")
    parser.add_argument("--rounds", type=int, help="rounds that take turns (default: quick 4, s1 and s3 3; s4: 2)")
    parser.add_argument("--chunks", type=int, help="mock stream chunks (default: quick 8, s1 and s3 50, s4 25)")
    parser.add_argument("--chunk-delay-ms", type=float, help="mock gap between chunks (quick 0, s1 and s3 20, s4 200)")
    parser.add_argument("--no-stream-usage", dest="stream_usage", action="store_false",
                        help="provider stream_usage = false (no include_usage injection and scan)")  # fmt: skip
    parser.add_argument("--deadline", type=float, help="global time limit in seconds (default: quick 120, else 600)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    args = parser.parse_args()
    if args.scenario == "quick":
        for name, default in QUICK.items():
            if getattr(args, name) is None:
                setattr(args, name, default)
    elif args.deadline is None:
        args.deadline = SCENARIO_DEADLINE_S
    return args


def run_quick(args: argparse.Namespace) -> int:
    started = time.monotonic()
    args.deadline_at = started + args.deadline
    children: dict[str, Child] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="sluicegate-bench-") as tmp:
            urls = start_children(args, Path(tmp), children)
            pids = {name: child.proc.pid for name, child in children.items()}
            rss_start = {name: proc_status(pids[name])[0] for name in ("bare_relay", "sluicegate")}
            ours, busy, wall = our_cpu_s(pids), machine_busy_s(), time.monotonic()
            with asyncio.Runner(loop_factory=loop_factory()) as runner:
                results = runner.run(run_all(args, urls, pids))
            others = (machine_busy_s() - busy) - (our_cpu_s(pids) - ours)
            others_pct = 100 * others / ((time.monotonic() - wall) * (os.cpu_count() or 1))
            rss = {name: {"start": rss_start[name], "end": proc_status(pids[name])[0]} for name in rss_start}
    finally:
        for child in children.values():
            child.stop()
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "deadline_at", "key", "scenario", "duration")}
    out = {
        "scenario": "quick", "settings": settings, **results, "overhead": overhead(results), "rss_mib": rss,
        "elapsed_s": time.monotonic() - started, "other_processes_cpu_pct": max(0.0, others_pct),
        "deadline_hit": any(r["requests"] < args.requests for m in ("json", "stream") for r in results[m].values()),
    }  # fmt: skip
    print(json.dumps(no_nan(out), indent=2) if args.json else report(out))
    return 1 if out["deadline_hit"] or any(r["errors"] for m in ("json", "stream") for r in results[m].values()) else 0


def main() -> int:
    args = parse_args()
    return run_quick(args) if args.scenario == "quick" else run_scenario(args)


if __name__ == "__main__":
    sys.exit(main())
