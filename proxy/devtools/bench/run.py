"""A whole load run: rounds that alternate between targets, in one process or spread over several.

With `--compare`, the targets take turns in rounds (A B, B A, A B, ...), so drift on a noisy
machine hits both alike and the ratio B/A holds. With `--procs N`, N processes each run the same
rounds with an Nth of the load, and their HDR histograms are added up exactly at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import queue
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import aiohttp

from .load import Arrivals, Bounds, Client, Target, closed_loop, open_loop
from .stats import Recorder
from .workload import Workload

TICK_S = 0.5  # progress updates
CHILD_GRACE_S = 10.0  # how long the parent waits for children's numbers after Ctrl-C

ProgressFn = Callable[[float, int, int, float], None]  # (elapsed, requests, failed, p50 ms)


@dataclass(frozen=True, kw_only=True)
class LoadPlan:
    targets: tuple[Target, ...]
    workload: Workload
    concurrency: int | None  # closed loop; else open loop at `arrivals`
    arrivals: Arrivals | None
    max_concurrency: int | None
    duration_s: float | None
    requests: int | None
    rounds: int
    timeout_s: float
    respect_retry_after: bool
    slo_ms: dict[str, float]
    procs: int = 1

    def share(self, index: int) -> LoadPlan:
        """The part of the load that process `index` of `procs` sends."""

        def part(total: int) -> int:
            return total // self.procs + (index < total % self.procs)

        return replace(
            self, procs=1,
            concurrency=part(self.concurrency) if self.concurrency else None,
            arrivals=replace(self.arrivals, rate=self.arrivals.rate / self.procs) if self.arrivals else None,
            max_concurrency=part(self.max_concurrency) if self.max_concurrency else None,
            requests=part(self.requests) if self.requests is not None else None,
        )  # fmt: skip


def round_share(total: int | None, rounds: int, index: int) -> int | None:
    return None if total is None else total // rounds + (index < total % rounds)


async def run_plan(plan: LoadPlan, stop: asyncio.Event, progress: ProgressFn | None) -> list[Recorder]:
    slo_us = {name: round(ms * 1000) for name, ms in plan.slo_ms.items()}
    recs = [Recorder(t.label, t.base_url, slo_us) for t in plan.targets]
    rounds = plan.rounds if len(plan.targets) > 1 else 1
    started = time.perf_counter()
    ticker = asyncio.ensure_future(tick(recs, started, progress)) if progress else None
    connector = aiohttp.TCPConnector(limit=0, enable_cleanup_closed=True)
    timeout = aiohttp.ClientTimeout(total=plan.timeout_s)
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session:
            clients = [Client(session, t, workload=plan.workload, rec=rec, respect_retry=plan.respect_retry_after)
                       for t, rec in zip(plan.targets, recs, strict=True)]  # fmt: skip
            for i in range(rounds):
                for client in clients[i % len(clients) :] + clients[: i % len(clients)]:
                    if stop.is_set():
                        break
                    await one_round(
                        plan, client, requests=round_share(plan.requests, rounds, i), rounds=rounds, stop=stop
                    )
    finally:
        if ticker is not None:
            ticker.cancel()
    return recs


async def one_round(plan: LoadPlan, client: Client, *, requests: int | None, rounds: int, stop: asyncio.Event) -> None:
    start = time.perf_counter()
    client.rec.t0 = start - client.rec.elapsed_s
    length = plan.duration_s / rounds if plan.duration_s is not None else math.inf
    bounds = Bounds(deadline=start + length, requests=requests, stop=stop)
    try:
        if plan.concurrency:
            await closed_loop(client, plan.concurrency, bounds)
        else:
            assert plan.arrivals is not None
            await open_loop(client, plan.arrivals, plan.max_concurrency, bounds)
    finally:
        client.rec.elapsed_s += time.perf_counter() - start


async def tick(recs: list[Recorder], started: float, progress: ProgressFn) -> None:
    while True:
        await asyncio.sleep(TICK_S)
        current = max(recs, key=lambda r: r.requests)
        progress(time.perf_counter() - started, sum(r.requests for r in recs), sum(r.failed for r in recs),
                 current.p_ms("e2e", 50))  # fmt: skip


def run_here(plan: LoadPlan, progress: ProgressFn | None) -> tuple[list[Recorder], bool]:
    """Runs the plan in this process; Ctrl-C stops it and keeps what was measured."""

    async def main() -> tuple[list[Recorder], bool]:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGINT, stop.set)
        recs = await run_plan(plan, stop, progress)
        return recs, stop.is_set()

    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main())


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def child(plan: LoadPlan, index: int, out: Any) -> None:
    """One of --procs: runs its share and sends its recorders' wire form (and progress) to the parent."""

    def progress(elapsed: float, requests: int, failed: int, p50: float) -> None:
        out.put(("progress", index, requests, failed, p50))

    recs, interrupted = run_here(plan, progress)
    out.put(("done", index, [rec.to_wire() for rec in recs], interrupted))


def run_procs(plan: LoadPlan, progress: ProgressFn | None) -> tuple[list[Recorder], bool]:
    """Runs the plan in `procs` processes at once and merges what they measured."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=child, args=(plan.share(i), i, out), daemon=True) for i in range(plan.procs)]
    for proc in procs:
        proc.start()
    seen: dict[int, tuple[int, int, float]] = {}
    wires: dict[int, list[dict[str, Any]]] = {}
    interrupted = False
    started = time.perf_counter()
    give_up: float | None = None
    try:
        while len(wires) < len(procs):
            try:
                message = out.get(timeout=TICK_S)
            except queue.Empty:
                if all(not p.is_alive() for p in procs) or (give_up and time.perf_counter() > give_up):
                    break
                continue
            except KeyboardInterrupt:
                interrupted, give_up = True, time.perf_counter() + CHILD_GRACE_S  # the children got it too
                continue
            if message[0] == "progress":
                seen[message[1]] = message[2:]
                if progress:
                    requests = sum(s[0] for s in seen.values())
                    p50 = sum(s[0] * s[2] for s in seen.values() if not math.isnan(s[2])) / max(1, requests)
                    progress(time.perf_counter() - started, requests, sum(s[1] for s in seen.values()), p50)
            else:
                wires[message[1]] = message[2]
                interrupted = interrupted or message[3]
    finally:
        for proc in procs:
            proc.join(timeout=1)
            if proc.is_alive():
                proc.terminate()
    if not wires:
        raise RuntimeError("no load process reported its numbers")
    recs = [Recorder.merged([w[i] for w in wires.values()]) for i in range(len(plan.targets))]
    return recs, interrupted or len(wires) < len(procs)
