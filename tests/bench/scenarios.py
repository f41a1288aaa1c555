"""The reference harness's loads for overhead.py: S1, S3 and S4 against direct, the bare relay and the gateway.

The gateway runs as the harness (../shared/bench/sluicegate_run.sh) runs it: one worker, Redis limits on with a
redis-server of its own, a key whose group has limits far too high to refuse, event records to a file in the temp
folder, stream_usage on. `sluicegate_nolimits` is the same process called with a second key, in a group without
limits. With taskset and two CPUs, the bare relay, the gateway and its redis-server run on the first CPU, the mock
and this client on the second; the gateway's CPU and memory include its redis-server's, as in the harness.

Every phase is a closed loop: --concurrency workers, their starts spread over the ramp, each sending one request
after another until --duration is over; then the requests in flight get a grace period to finish, and those still
running after it are abandoned and counted as errors. A stream counts as completed when it ends with [DONE].
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import redis
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
    stolen_s,
)

GATEWAYS = ("sluicegate", "sluicegate_nolimits")
PATH = "/v1/chat/completions"
UPSTREAM_KEY = "sk-mock-upstream"  # the gateway sends it to the mock, as in the harness; the mock does not check it
RPM, TPM = 100_000_000, 100_000_000_000  # the harness's limits: far beyond anything one run can use
REQUEST_TIMEOUT_S = 60.0
GRACE_S = 10.0  # after the last stream could have ended, before what is still in flight is abandoned
DEADLINE_GRACE_S = 5.0  # in flight at the global deadline: this long, then abandoned
WARMUP_CONCURRENCY = 16
WARMUP_MAX_S = 10.0
TICK_S = 0.5  # how often the target's memory is sampled during a phase
SETTLE_WINDOW_S, SETTLE_MAX_S, QUIET_CPU_SHARE = 0.25, 5.0, 0.15
SCRIPT_COMMANDS = ("eval", "evalsha", "eval_ro", "evalsha_ro")
BUSY_LOAD_PCT = 90.0  # of one core, mock and client together: above it they may have held the target back
SYSTEM = "You are a helpful assistant."
PROMPT = (
    "Summarise the following in two sentences. A gateway stands between applications and the language model "
    "providers they call. It checks who is calling, keeps each caller within its limits, picks a healthy "
    "provider, passes tokens on the moment they arrive and leaves a record of what each request used, and it "
    "must add as little delay as it can while it does all of that, for one stream or for a thousand."
)


@dataclass(frozen=True, kw_only=True)
class Scenario:
    stream: bool
    concurrency: int
    duration_s: float  # per target and round
    ramp_s: float  # worker starts are spread over this, so arrivals are not one burst
    rounds: int
    chunks: int
    chunk_delay_ms: float
    targets: tuple[str, ...]
    waves: bool = False  # report each round apart: s4's two waves, each target's second in the same process


SCENARIOS = {
    "s1": Scenario(stream=False, concurrency=64, duration_s=10, ramp_s=0, rounds=3, chunks=50, chunk_delay_ms=20,
                   targets=("direct", "bare_relay", *GATEWAYS)),
    "s3": Scenario(stream=True, concurrency=200, duration_s=10, ramp_s=1, rounds=3, chunks=50, chunk_delay_ms=20,
                   targets=("direct", "bare_relay", *GATEWAYS)),
    "s4": Scenario(stream=True, concurrency=1000, duration_s=20, ramp_s=2, rounds=2, chunks=25, chunk_delay_ms=200,
                   targets=("direct", "bare_relay", "sluicegate"), waves=True),
}  # fmt: skip


def resolve(args: Any) -> Scenario:
    """The scenario with what the command line set; s4 always has two waves."""
    base = SCENARIOS[args.scenario]
    given = {"concurrency": args.concurrency, "duration_s": args.duration, "chunks": args.chunks,
             "chunk_delay_ms": args.chunk_delay_ms, "rounds": args.rounds if not base.waves else None}  # fmt: skip
    return replace(base, **{k: v for k, v in given.items() if v is not None})


@dataclass(frozen=True)
class Target:
    url: str
    headers: dict[str, str]
    pids: tuple[int, ...]  # whose CPU and memory count against it: the gateway's include its redis-server


@dataclass
class Phase:
    """What the client saw of one target in one round, or in several added up."""

    total: list[float] = field(default_factory=list)
    ttfb: list[float] = field(default_factory=list)
    errors: int = 0
    elapsed_s: float = 0.0
    cpu_s: float = 0.0  # the target's processes
    load_cpu_s: float = 0.0  # the mock and this client
    peak_rss_mib: float = 0.0
    steal_s: float = 0.0  # taken by the hypervisor from the whole machine meanwhile

    def __add__(self, other: Phase) -> Phase:
        return Phase(
            total=self.total + other.total, ttfb=self.ttfb + other.ttfb, errors=self.errors + other.errors,
            elapsed_s=self.elapsed_s + other.elapsed_s, cpu_s=self.cpu_s + other.cpu_s,
            load_cpu_s=self.load_cpu_s + other.load_cpu_s,
            peak_rss_mib=max(self.peak_rss_mib, other.peak_rss_mib), steal_s=self.steal_s + other.steal_s,
        )  # fmt: skip

    def summary(self, stream: bool) -> dict[str, float]:
        per_wall = (lambda s: 100 * s / self.elapsed_s) if self.elapsed_s else (lambda _s: math.nan)
        out = {"ok": len(self.total), "errors": self.errors, "cpu_pct": per_wall(self.cpu_s),
               "load_cpu_pct": per_wall(self.load_cpu_s), "peak_rss_mib": self.peak_rss_mib,
               "elapsed_s": self.elapsed_s, "steal_pct": per_wall(self.steal_s) / (os.cpu_count() or 1)}  # fmt: skip
        if stream:
            return out | {"ttfb_p50_ms": pct(self.ttfb, 0.50), "ttfb_p99_ms": pct(self.ttfb, 0.99),
                          "total_p50_ms": pct(self.total, 0.50), "total_p99_ms": pct(self.total, 0.99)}  # fmt: skip
        rps = len(self.total) / self.elapsed_s if self.elapsed_s else 0.0
        return out | {"rps": rps, "p50_ms": pct(self.total, 0.50), "p99_ms": pct(self.total, 0.99)}


@dataclass(frozen=True)
class Request:
    body: bytes
    stream: bool


def chat_request(stream: bool) -> Request:
    """The harness's request: a system and a user message; a stream asks for the usage chunk."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}]
    body: dict[str, Any] = {"model": "mock-chat", "messages": messages, "temperature": 0.2}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return Request(json.dumps(body, separators=(",", ":")).encode(), stream)


def pinning() -> tuple[int, int] | None:
    """(the targets' CPU, the load's CPU) when taskset can keep them apart, else None."""
    cpus = sorted(os.sched_getaffinity(0))
    if shutil.which("taskset") is None or len(cpus) < 2:
        return None
    return cpus[0], cpus[1]


def gateway_config(tmp: Path, mock_url: str, redis_url: str, digests: dict[str, str], stream_usage: bool) -> Path:
    path = tmp / "gateway.toml"
    path.write_text(f"""\
[server]
bind = "{HOST}:9"
graceful_timeout_s = 2
drain_delay_s = 0

[redis]
url = "{redis_url}"
# The harness allows; deny makes a Redis failure show up as errors instead of as requests that skipped the limiter.
on_error = "deny"

[events]
sink = "file"
path = "{tmp / "events.jsonl"}"

[[providers]]
name = "mock"
base_url = "{mock_url}/v1"
api_key_env = "BENCH_UPSTREAM_KEY"
models = ["mock-chat"]
first_byte_timeout_s = 60
idle_timeout_s = 60
stream_usage = {str(stream_usage).lower()}

[groups.limited]
rpm = {RPM}
tpm = {TPM}

[[keys]]
name = "limited"
sha256 = "{digests["sluicegate"]}"
group = "limited"
rpm = {RPM}
tpm = {TPM}

[groups.free]

[[keys]]
name = "free"
sha256 = "{digests["sluicegate_nolimits"]}"
group = "free"
""")
    return path


def start_targets(sc: Scenario, args: Any, tmp: Path, children: dict[str, Child]) -> dict[str, Target]:
    """redis-server, mock, bare relay and gateway on free ports, pinned when args.cpus says so; `children` gets
    each one as soon as it is started."""
    sys.path.insert(0, str(ROOT))  # so the script also runs without `pip install -e .`
    from proxy.request.auth import key_digest, new_key

    def pinned(side: int, command: list[str]) -> list[str]:
        return command if args.cpus is None else ["taskset", "-c", str(args.cpus[side]), *command]

    port = {name: free_port() for name in ("redis", "mock", "bare_relay", "sluicegate")}
    base = {name: f"http://{HOST}:{p}" for name, p in port.items()}
    redis_url = f"redis://{HOST}:{port['redis']}/0"
    redis_server = ["redis-server", "--port", str(port["redis"]), "--bind", HOST, "--save", "", "--appendonly", "no"]
    children["redis"] = Child("redis", pinned(0, redis_server), port["redis"], tmp).wait_ready()
    keys = {name: new_key() for name in GATEWAYS}
    digests = {name: key_digest(key) for name, key in keys.items()}
    config = gateway_config(tmp, base["mock"], redis_url, digests, args.stream_usage)
    py, bare = sys.executable, str(Path(__file__).with_name("bare_relay.py"))
    commands = {
        "mock": [py, "-m", "proxy", "mock-upstream", "--chunks", str(sc.chunks),
                 "--chunk-delay-ms", str(sc.chunk_delay_ms)],
        "bare_relay": [py, bare, "--upstream", base["mock"]],
        "sluicegate": [py, "-m", "proxy", "serve", "--config", str(config)],
    }  # fmt: skip
    # REDIS_URL would override [redis] url: one inherited from the shell must not point elsewhere.
    env = {"sluicegate": {"BENCH_UPSTREAM_KEY": UPSTREAM_KEY, "REDIS_URL": redis_url}}
    for name, command in commands.items():
        side = 1 if name == "mock" else 0
        children[name] = Child(name, pinned(side, [*command, "--bind", f"{HOST}:{port[name]}"]), port[name], tmp,
                               env.get(name))  # fmt: skip
    for child in children.values():
        child.wait_ready()
    pid = {name: child.proc.pid for name, child in children.items()}
    plain = {"Content-Type": "application/json"}
    targets = {
        "direct": Target(base["mock"] + PATH, plain | {"Authorization": f"Bearer {UPSTREAM_KEY}"}, (pid["mock"],)),
        "bare_relay": Target(base["bare_relay"] + PATH, plain, (pid["bare_relay"],)),
    }
    for name in GATEWAYS:
        auth = {"Authorization": f"Bearer {keys[name]}"}
        targets[name] = Target(base["sluicegate"] + PATH, plain | auth, (pid["sluicegate"], pid["redis"]))
    return {name: targets[name] for name in sc.targets}


def cpu_s(pids: tuple[int, ...]) -> float:
    return sum(proc_status(pid)[1] for pid in pids)


def load_cpu_s(mock_pid: int) -> float:
    """CPU seconds of the load side so far: the mock's and this client's."""
    return proc_status(mock_pid)[1] + sum(os.times()[:2])


async def one_request(session: aiohttp.ClientSession, target: Target, request: Request, phase: Phase) -> None:
    t0 = time.perf_counter()
    first = None
    tail = b""
    try:
        async with session.post(target.url, data=request.body, headers=target.headers) as resp:
            async for chunk in resp.content.iter_any():
                first = first or time.perf_counter()
                tail = (tail + chunk)[-32:]
            ok = resp.status == 200
    except (aiohttp.ClientError, OSError, TimeoutError):
        ok = False
    # A stream cut short was not delivered, whatever its status said.
    if not ok or first is None or (request.stream and not tail.rstrip().endswith(b"data: [DONE]")):
        phase.errors += 1
        return
    phase.total.append(time.perf_counter() - t0)
    phase.ttfb.append(first - t0)


async def closed_loop(
    session: aiohttp.ClientSession, target: Target, request: Request, phase: Phase, *,
    concurrency: int, duration_s: float, ramp_s: float, grace_s: float, deadline_at: float, count: int | None = None,
) -> None:  # fmt: skip
    """`concurrency` workers send one request after another until `duration_s` is over (or `count` have gone out);
    what is still in flight `grace_s` later is abandoned and counted as errors."""
    end = min(time.monotonic() + duration_s, deadline_at)
    budget = iter(range(count)) if count is not None else itertools.repeat(None)

    async def worker(i: int) -> None:
        await asyncio.sleep(ramp_s * i / concurrency)
        for _ in budget:
            if time.monotonic() >= end:
                return
            await one_request(session, target, request, phase)

    workers = [asyncio.ensure_future(worker(i)) for i in range(concurrency)]
    give_up = min(end + grace_s, deadline_at + DEADLINE_GRACE_S)
    _, late = await asyncio.wait(workers, timeout=max(0.1, give_up - time.monotonic()))
    for task in late:
        task.cancel()
    if late:
        await asyncio.wait(late, timeout=5)
    phase.errors += len(late)


async def sample_memory(target: Target, phase: Phase, until: float) -> None:
    """Peak resident memory of the target's processes, every TICK_S; also the client's young-generation
    collections, since its full ones are off during the run (they stall the loop for tens of ms)."""
    while time.monotonic() < until:
        phase.peak_rss_mib = max(phase.peak_rss_mib, sum(proc_status(pid)[0] for pid in target.pids))
        gc.collect(1)
        await asyncio.sleep(TICK_S)


async def measure(
    session: aiohttp.ClientSession, target: Target, request: Request, sc: Scenario, args: Any, mock_pid: int
) -> Phase:
    """One round against one target, with the target's CPU time and peak memory, and the CPU time of the load:
    the mock's and the client's."""
    phase = Phase()
    grace_s = sc.ramp_s + sc.chunks * sc.chunk_delay_ms / 1000 + GRACE_S
    cpu, load, stolen, started = cpu_s(target.pids), load_cpu_s(mock_pid), stolen_s(), time.monotonic()
    sampler = asyncio.ensure_future(sample_memory(target, phase, started + sc.duration_s + grace_s))
    try:
        await closed_loop(session, target, request, phase, concurrency=sc.concurrency, duration_s=sc.duration_s,
                          ramp_s=sc.ramp_s, grace_s=grace_s, deadline_at=args.deadline_at)  # fmt: skip
    finally:
        sampler.cancel()
    phase.elapsed_s = time.monotonic() - started
    phase.cpu_s = cpu_s(target.pids) - cpu
    phase.load_cpu_s = load_cpu_s(mock_pid) - load
    phase.steal_s = stolen_s() - stolen
    return phase


async def settle(pids: tuple[int, ...]) -> None:
    """Wait, SETTLE_MAX_S at most, until the children are quiet: the last phase's closes, charges and records."""
    until = time.monotonic() + SETTLE_MAX_S
    while time.monotonic() < until:
        before = cpu_s(pids)
        await asyncio.sleep(SETTLE_WINDOW_S)
        if cpu_s(pids) - before < QUIET_CPU_SHARE * SETTLE_WINDOW_S:
            return


async def run_rounds(sc: Scenario, args: Any, targets: dict[str, Target], every_pid: tuple[int, ...]) -> Any:
    """A non-stream warm-up per target, then rounds that take turns between the targets."""
    rounds: dict[str, list[Phase]] = {name: [] for name in targets}
    request, warmup = chat_request(sc.stream), chat_request(False)
    connector = aiohttp.TCPConnector(limit=sc.concurrency + WARMUP_CONCURRENCY, limit_per_host=0)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S, sock_connect=5)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session:
        for target in targets.values():
            await closed_loop(session, target, warmup, Phase(), concurrency=WARMUP_CONCURRENCY,
                              duration_s=WARMUP_MAX_S, ramp_s=0, grace_s=GRACE_S, deadline_at=args.deadline_at,
                              count=args.warmup)  # fmt: skip
        gc.collect()
        gc.freeze()
        gc.disable()
        try:
            names = list(targets)
            for i in range(sc.rounds):
                for name in names[i % len(names) :] + names[: i % len(names)]:
                    if time.monotonic() < args.deadline_at:
                        await settle(every_pid)
                        phase = await measure(session, targets[name], request, sc, args, targets["direct"].pids[0])
                        rounds[name].append(phase)
        finally:
            gc.enable()
    return rounds


def compare(sc: Scenario, rounds: dict[str, list[Phase]]) -> dict[str, Any]:
    """Per target: the rounds added up (s1, s3) or each wave (s4), with the differences the issue's targets use."""
    if not sc.waves:
        rows = {name: sum(phases, Phase()).summary(sc.stream) for name, phases in rounds.items()}
        (against_direct if sc.stream else against_relays)(rows)
        return rows
    waves = [{name: (p[i] if i < len(p) else Phase()).summary(True) for name, p in rounds.items()} for i in range(2)]
    for wave in waves:
        against_direct(wave)
    out: dict[str, Any] = {}
    for name in rounds:
        first, second = (wave[name]["peak_rss_mib"] for wave in waves)
        ratio = second / first if first else math.nan
        out[name] = {"waves": [wave[name] for wave in waves], "rss_wave2_over_wave1": ratio}
    return out


def against_direct(rows: dict[str, dict[str, float]]) -> None:
    for row in rows.values():
        for key in ("ttfb_p50_ms", "ttfb_p99_ms"):
            row[key.replace("_ms", "_delta_ms")] = row[key] - rows["direct"][key]


def against_relays(rows: dict[str, dict[str, float]]) -> None:
    for row in rows.values():
        for key, base in (("x_bare_relay", "bare_relay"), ("x_nolimits", "sluicegate_nolimits")):
            row[key] = row["rps"] / rows[base]["rps"] if rows[base]["rps"] else math.nan


S1_ROWS = (
    ("req/s", "rps", 0), ("× bare relay", "x_bare_relay", 2), ("× sluicegate_nolimits", "x_nolimits", 2),
    ("latency p50, ms", "p50_ms", 2), ("latency p99, ms", "p99_ms", 2), ("CPU % of its core", "cpu_pct", 0),
    ("mock + client CPU %", "load_cpu_pct", 0), ("hypervisor steal, % of the machine", "steal_pct", 1),
    ("requests", "ok", 0), ("errors", "errors", 0),
)  # fmt: skip
STREAM_ROWS = (
    ("ΔTTFB p50 vs direct, ms", "ttfb_p50_delta_ms", 2), ("ΔTTFB p99 vs direct, ms", "ttfb_p99_delta_ms", 2),
    ("TTFB p50, ms", "ttfb_p50_ms", 2), ("TTFB p99, ms", "ttfb_p99_ms", 2), ("stream total p99, ms", "total_p99_ms", 0),
    ("CPU % of its core", "cpu_pct", 0), ("peak RSS, MiB", "peak_rss_mib", 0),
    ("mock + client CPU %", "load_cpu_pct", 0), ("hypervisor steal, % of the machine", "steal_pct", 1),
    ("streams completed", "ok", 0), ("errors", "errors", 0),
)  # fmt: skip


def number(value: float, decimals: int) -> str:
    return "–" if math.isnan(value) else f"{value:,.{decimals}f}"


def table(columns: dict[str, list[dict[str, float]]], rows: tuple[tuple[str, str, int], ...]) -> list[str]:
    """Markdown with a column per target, as in the harness's RESULTS.md; s4's cells hold wave 1 / wave 2."""
    lines = ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label, key, decimals in rows:
        cells = (" / ".join(number(row[key], decimals) for row in column) for column in columns.values())
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def report(out: dict[str, Any]) -> str:
    s, cpus, targets = out["settings"], out["pinned_cpus"], out["targets"]
    if s["stream"]:
        load = (f"{s['concurrency']} concurrent streams of {s['chunks']} chunks {s['chunk_delay_ms']:g} ms apart "
                f"(+ usage chunk, [DONE]), started over {s['ramp_s']:g} s")  # fmt: skip
    else:
        load = f"non-stream, closed loop, {s['concurrency']} connections"
    pin = (f"pinned: bare relay, gateway and its redis-server on CPU {cpus[0]}, mock and client on CPU {cpus[1]}"
           if cpus else "not pinned (that needs taskset and two CPUs)")  # fmt: skip
    lines = [
        f"sluicegate overhead, {out['scenario']}: {load}; {s['duration_s']:g} s per target in each of "
        f"{'two waves' if s['waves'] else str(s['rounds']) + ' rounds'}; {pin}; {os.cpu_count()} CPUs, "
        f"{out['elapsed_s']:.0f} s in all, {out['other_processes_cpu_pct']:.0f}% of the CPUs used by other processes",
        f"sluicegate: one worker, limits on (sluicegate_nolimits: a key without), records to a file, "
        f"stream_usage={str(s['stream_usage']).lower()}; its CPU and RSS include its redis-server's, which ran "
        f"{out['redis_script_calls']:,} limiter scripts in all",
        "",
    ]
    columns = {name: row["waves"] if s["waves"] else [row] for name, row in targets.items()}
    lines += table(columns, STREAM_ROWS if s["stream"] else S1_ROWS)
    if s["waves"]:
        ratios = (number(row["rss_wave2_over_wave1"], 2) for row in targets.values())
        lines.append("| peak RSS, wave 2 ÷ wave 1 | " + " | ".join(ratios) + " |")
    for name, column in columns.items():
        busiest = max((row["load_cpu_pct"] for row in column), key=lambda v: -1 if math.isnan(v) else v)
        if cpus and busiest > BUSY_LOAD_PCT:
            lines.append(f"\nNOTE: the mock and the client used {busiest:.0f}% of their CPU against {name}: "
                         "they may have held it back.")  # fmt: skip
    if out["other_processes_cpu_pct"] > 10:
        lines.append("\nWARNING: other processes competed for the CPUs; these numbers are not comparable.")
    if out["deadline_hit"]:
        lines.append(f"\nDEADLINE: stopped after {s['deadline']:g} s; the numbers above are partial.")
    return "\n".join(lines)


def script_calls(port: int) -> int:
    """Lua script calls the gateway's Redis has run: none would mean that its limiter was never asked."""
    client = redis.Redis(host=HOST, port=port, socket_timeout=5)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in SCRIPT_COMMANDS)


def errors(targets: dict[str, Any]) -> int:
    return sum(int(wave["errors"]) for row in targets.values() for wave in row.get("waves", [row]))


def run_scenario(args: Any) -> int:
    """Start everything, measure, stop everything, print; exit status 1 on any error or at the deadline."""
    if shutil.which("redis-server") is None:
        print("redis-server is not installed; the s1, s3 and s4 scenarios need one", file=sys.stderr)
        return 2
    sc = resolve(args)
    args.cpus = pinning()
    started = time.monotonic()
    args.deadline_at = started + args.deadline
    children: dict[str, Child] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="sluicegate-bench-") as tmp:
            targets = start_targets(sc, args, Path(tmp), children)
            if args.cpus is not None:
                os.sched_setaffinity(0, {args.cpus[1]})  # the client beside the mock, away from the targets
            pids = {name: child.proc.pid for name, child in children.items()}
            ours, busy, wall = our_cpu_s(pids), machine_busy_s(), time.monotonic()
            with asyncio.Runner(loop_factory=loop_factory()) as runner:
                rounds = runner.run(run_rounds(sc, args, targets, tuple(pids.values())))
            cut = time.monotonic() > args.deadline_at  # the last phase ended at the deadline, not at its duration
            limiter_calls = script_calls(children["redis"].port)
            others = (machine_busy_s() - busy) - (our_cpu_s(pids) - ours)
            others_pct = 100 * others / ((time.monotonic() - wall) * (os.cpu_count() or 1))
    finally:
        for child in reversed(children.values()):
            child.stop()
    out = {
        "scenario": args.scenario, "pinned_cpus": args.cpus,
        "settings": asdict(sc) | {"warmup": args.warmup, "stream_usage": args.stream_usage, "deadline": args.deadline},
        "targets": compare(sc, rounds), "elapsed_s": time.monotonic() - started,
        "other_processes_cpu_pct": max(0.0, others_pct), "redis_script_calls": limiter_calls,
        "deadline_hit": cut or any(len(phases) < sc.rounds for phases in rounds.values()),
    }  # fmt: skip
    print(json.dumps(no_nan(out), indent=2) if args.json else report(out))
    return 1 if out["deadline_hit"] or errors(out["targets"]) else 0
