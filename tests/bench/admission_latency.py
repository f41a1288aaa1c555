"""Admission latency through the limiter: one Redis against a three-primary Redis Cluster, in one run.

Starts its own redis-server and a Redis Cluster of three primaries (redis-server --cluster-enabled and
redis-cli --cluster create) on free 127.0.0.1 ports, and stops them by PID at the end. For each it opens the
project's own Limiter ([redis] mode "single" or "cluster", so the script pipe of redis_pipe.py, one per primary
in cluster mode) and times `Limiter.admit` of a realistic plan: rpm and tpm on the key, rpm and tpm on its group
(far too high to refuse). The calls go round KEYS keys in as many groups, which the cluster spreads over its
primaries.

    python tests/bench/admission_latency.py [--calls 3000] [--concurrent-calls 12000] [--concurrency 32]
                                            [--rounds 4] [--deadline 50] [--json]

Each round runs, for single then cluster (the other way round every other round, so drift hits both alike),
--calls/--rounds sequential admissions (one at a time: the round trip) and --concurrent-calls/--rounds by
--concurrency callers at once (what the pipe's batching gives). Printed: p50 and p99 of one admit call in µs,
and calls/s. Any admission that did not come from Redis (a timeout, an error) fails the run (exit 1), as does
hitting --deadline (seconds since start; the runs stop short then).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` imports however this file is started
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # and so does `proxy`, from this checkout

from common import HOST, free_port, loop_factory, pct

from proxy.config.settings import GroupSettings, KeySettings, LimitSettings, RedisSettings
from proxy.limits.limiter import Limiter
from proxy.limits.plan import KeyLimits, Plan

KEYS = 12  # keys, each in its own group: spread over the cluster's primaries
RPM, TPM = 100_000_000, 1_000_000_000  # far beyond anything one run can use
TIMEOUT_S = 2.0
START_TIMEOUT_S = 20.0


@dataclass
class Redis:
    """redis-server processes of this run's own."""

    tmp: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def server(self, *extra: str) -> int:
        port = free_port()
        args = ["redis-server", "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"]
        args += ["--dir", str(self.tmp), *extra]
        with (self.tmp / f"redis-{port}.log").open("ab") as out:
            self.procs.append(subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT))
        self.wait(["redis-cli", "-p", str(port), "PING"], b"PONG")
        return port

    def cluster(self) -> int:
        ports = [
            self.server(
                "--cluster-enabled", "yes", "--cluster-config-file", str(self.tmp / f"nodes-{i}.conf"),
                "--cluster-port", str(free_port()),
            )
            for i in range(3)
        ]  # fmt: skip
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"{HOST}:{port}" for port in ports), "--cluster-yes"],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        for port in ports:
            self.wait(["redis-cli", "-p", str(port), "CLUSTER", "INFO"], b"cluster_state:ok")
        return ports[0]

    def wait(self, command: list[str], expected: bytes) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            done = subprocess.run(command, capture_output=True, timeout=5)
            if expected in done.stdout:
                return
            time.sleep(0.05)
        raise RuntimeError(f"{' '.join(command)}: no {expected!r} within {START_TIMEOUT_S}s")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)


@dataclass
class Target:
    name: str
    limiter: Limiter
    plans: list[Plan]
    errors: list[int]  # one per admission that did not come from Redis
    pipes: int = 0  # script pipes the plans' slots go to: one per primary in cluster mode
    sequential: list[float] = field(default_factory=list)  # seconds per call
    concurrent: list[float] = field(default_factory=list)
    concurrent_elapsed: float = 0.0
    sequential_elapsed: float = 0.0

    def summary(self, concurrency: int) -> dict[str, Any]:
        def row(latencies: list[float], elapsed: float) -> dict[str, Any]:
            return {
                "calls": len(latencies),
                "p50_us": round(pct(latencies, 0.50) * 1000, 1),
                "p99_us": round(pct(latencies, 0.99) * 1000, 1),
                "calls_per_s": round(len(latencies) / elapsed) if elapsed else 0,
            }

        return {
            "sequential": row(self.sequential, self.sequential_elapsed),
            f"concurrent_{concurrency}": row(self.concurrent, self.concurrent_elapsed),
            "errors": len(self.errors),
            "primaries": self.pipes,
        }


def plans() -> list[Plan]:
    limits = LimitSettings()
    found = []
    for i in range(KEYS):
        group = GroupSettings(name=f"team{i}", rpm=RPM, tpm=TPM)
        key = KeySettings(name=f"key{i}", sha256="", group=group.name, rpm=RPM, tpm=TPM)
        plan = KeyLimits.build(key, group, limits).model
        assert plan is not None
        found.append(plan)
    return found


async def sequential(target: Target, calls: int, deadline_at: float) -> None:
    limiter, plans_ = target.limiter, target.plans
    started = time.perf_counter()
    for i in range(calls):
        if time.monotonic() > deadline_at:
            break
        t0 = time.perf_counter()
        await limiter.admit(plans_[i % len(plans_)])
        target.sequential.append(time.perf_counter() - t0)
    target.sequential_elapsed += time.perf_counter() - started


async def concurrent(target: Target, calls: int, concurrency: int, deadline_at: float) -> None:
    limiter, plans_ = target.limiter, target.plans
    todo = iter(range(calls))

    async def caller() -> None:
        for i in todo:
            if time.monotonic() > deadline_at:
                return
            t0 = time.perf_counter()
            await limiter.admit(plans_[i % len(plans_)])
            target.concurrent.append(time.perf_counter() - t0)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    target.concurrent_elapsed += time.perf_counter() - started


async def run(args: argparse.Namespace, urls: dict[str, str]) -> tuple[dict[str, Target], bool]:
    targets: dict[str, Target] = {}
    for name, url in urls.items():
        settings = RedisSettings(url=url, mode="cluster" if name == "cluster" else "single", timeout_s=TIMEOUT_S)
        errors: list[int] = []
        targets[name] = Target(
            name, Limiter(settings, on_error=lambda errors=errors: errors.append(1)), plans(), errors
        )
    try:
        for target in targets.values():  # warm-up: scripts loaded, pipes open, the slot map read
            await concurrent(target, 50 * len(target.plans), args.concurrency, args.deadline_at)
            target.concurrent.clear()
            target.concurrent_elapsed = 0.0
            target.pipes = len({id(target.limiter.pipes.now(plan.call.slot)) for plan in target.plans})
        order = list(targets.values())
        for i in range(args.rounds):
            for target in order if i % 2 == 0 else order[::-1]:
                await sequential(target, split(args.calls, args.rounds, i), args.deadline_at)
                await concurrent(
                    target, split(args.concurrent_calls, args.rounds, i), args.concurrency, args.deadline_at
                )
    finally:
        for target in targets.values():
            await target.limiter.close()
    return targets, time.monotonic() > args.deadline_at


def split(total: int, rounds: int, i: int) -> int:
    return total // rounds + (i < total % rounds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3000, help="sequential admissions per target, in all rounds")
    parser.add_argument("--concurrent-calls", type=int, default=12000, help="concurrent admissions per target")
    parser.add_argument("--concurrency", type=int, default=32, help="callers at once in the concurrent runs")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--deadline", type=float, default=50.0, help="seconds from start before runs stop short")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    args.deadline_at = time.monotonic() + args.deadline
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        print("redis-server and redis-cli are needed", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="sg-admission-") as tmp:
        redis = Redis(Path(tmp))
        try:
            urls = {"single": f"redis://{HOST}:{redis.server()}/0", "cluster": f"redis://{HOST}:{redis.cluster()}/0"}
            with asyncio.Runner(loop_factory=loop_factory()) as runner:
                targets, deadline_hit = runner.run(run(args, urls))
        finally:
            redis.stop()
    results = {name: target.summary(args.concurrency) for name, target in targets.items()}
    out = {
        "settings": {k: v for k, v in vars(args).items() if k != "deadline_at"},
        "results": results,
        "deadline_hit": deadline_hit,
    }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{'target':8} {'run':14} {'calls':>7} {'p50 µs':>8} {'p99 µs':>8} {'calls/s':>9}")
        for name, result in results.items():
            for run_name, row in result.items():
                if isinstance(row, dict):
                    print(
                        f"{name:8} {run_name:14} {row['calls']:7d} {row['p50_us']:8.1f} {row['p99_us']:8.1f} "
                        f"{row['calls_per_s']:9d}"
                    )
        print(f"the {KEYS} groups live on {results['cluster']['primaries']} of the cluster's primaries")
        if deadline_hit:
            print(f"deadline of {args.deadline:g}s hit: runs stopped short")
    failed = deadline_hit or any(result["errors"] for result in results.values())
    if any(result["errors"] for result in results.values()):
        print(
            "admissions failed (not from Redis): " + str({n: r["errors"] for n, r in results.items()}), file=sys.stderr
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
