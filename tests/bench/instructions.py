"""CPU per request that a neighbour's load does not move: instructions counted by valgrind's callgrind.

Wall-clock CPU of the same build moves several points from run to run on a shared
machine; an instruction count does not (the same build, the same load: the same count
within a fraction of a percent). So A/B of a change to the hot path is read here, and
the reference harness says what that does to latency under load.

Each target runs under `valgrind --tool=callgrind` beside its own redis-server and the
project's mock upstream (50 chunks 60 ms apart by default). After a warm-up the counts
are zeroed (`callgrind_control -z`), a fixed number of requests goes through two at a
time, and the counts are dumped (`callgrind_control -d`): instructions per request are
the dump's total over that number. The bare relay (tests/bench/bare_relay.py) is the
floor, as in overhead.py.

    python tests/bench/instructions.py                       # streams: bare relay, gateway, key without limits
    python tests/bench/instructions.py --non-stream --requests 200
    python tests/bench/instructions.py --python /tmp/old-venv/bin/python3 --label old
        # adds the gateway as installed in another venv (another build), beside this checkout's
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from common import HOST, ROOT, Child, free_port
from scenarios import PATH, UPSTREAM_KEY, Phase, Target, chat_request, closed_loop, gateway_config, pinning

START_TIMEOUT_S = 120.0  # a Python under valgrind starts about 50 times slower
REQUEST_TIMEOUT_S = 600.0
RUN_MAX_S = 1800.0
WARMUP_REQUESTS = 6
CONCURRENCY = 2
TOTALS = re.compile(rb"^(?:summary|totals): (\d+)", re.MULTILINE)


@dataclass(frozen=True)
class Build:
    """A target as callgrind runs it."""

    name: str
    command: list[str]  # run under valgrind
    headers: dict[str, str]
    env: dict[str, str]


async def send_requests(url: str, headers: dict[str, str], stream: bool, count: int) -> Phase:
    """`count` requests, CONCURRENCY at a time, as overhead.py's closed loop sends them."""
    phase = Phase()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as session:
        await closed_loop(session, Target(url, headers, ()), chat_request(stream), phase, concurrency=CONCURRENCY,
                          duration_s=RUN_MAX_S, ramp_s=0, grace_s=REQUEST_TIMEOUT_S,
                          deadline_at=time.monotonic() + RUN_MAX_S, count=count)  # fmt: skip
    return phase


def callgrind_control(flag: str, pid: int) -> None:
    subprocess.run(["callgrind_control", flag, str(pid)], check=True, capture_output=True, timeout=120)


def measure(target: Build, port: int, tmp: Path, args: argparse.Namespace, cpu: str | None) -> dict[str, Any]:
    out = tmp / f"{target.name}.callgrind"
    command = [
        "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p", *target.command,
        "--bind", f"{HOST}:{port}",
    ]  # fmt: skip
    if cpu is not None:
        command = ["taskset", "-c", cpu, *command]
    child = Child(target.name, command, port, tmp, target.env)
    try:
        child.wait_ready(START_TIMEOUT_S)
        url = f"http://{HOST}:{port}{PATH}"
        asyncio.run(send_requests(url, target.headers, args.stream, WARMUP_REQUESTS))
        callgrind_control("-z", child.proc.pid)
        done = len(asyncio.run(send_requests(url, target.headers, args.stream, args.requests)).total)
        callgrind_control("-d", child.proc.pid)
        dumps = sorted(tmp.glob(f"{out.name}.{child.proc.pid}.*"), key=lambda p: p.stat().st_mtime)
        if not dumps:
            raise RuntimeError(f"callgrind left no dump for {target.name} (see {child.log})")
        found = TOTALS.search(dumps[-1].read_bytes())
        if found is None:
            raise RuntimeError(f"no total in {dumps[-1]}")
        total = int(found.group(1))
    finally:
        child.stop()
    return {"requests": args.requests, "completed": done, "instructions": total, "per_request": total / args.requests}


def targets(args: argparse.Namespace, mock_url: str, redis_url: str, tmp: Path) -> list[Build]:
    sys.path.insert(0, str(ROOT))
    from proxy.request.auth import key_digest, new_key

    keys = {"sluicegate": new_key(), "sluicegate_nolimits": new_key()}
    config = gateway_config(tmp, mock_url, redis_url, {n: key_digest(k) for n, k in keys.items()}, args.stream_usage)
    env = {"BENCH_UPSTREAM_KEY": UPSTREAM_KEY, "REDIS_URL": redis_url}
    plain = {"Content-Type": "application/json"}
    bare = [sys.executable, str(Path(__file__).with_name("bare_relay.py")), "--upstream", mock_url]
    gateway = [sys.executable, "-m", "proxy", "serve", "--config", str(config)]
    found = [
        Build("bare_relay", bare, plain, {}),
        Build("sluicegate", gateway, plain | {"Authorization": f"Bearer {keys['sluicegate']}"}, env),
        Build("sluicegate_nolimits", gateway, plain | {"Authorization": f"Bearer {keys['sluicegate_nolimits']}"}, env),
    ]
    if args.python:
        # Another build, installed in its own venv: run from a neutral folder, so this checkout is not imported.
        other = [args.python, "-c", "import sys; from proxy.cli import main; sys.exit(main())", "serve", "--config",
                 str(config)]  # fmt: skip
        env_other = env | {"PYTHONPATH": "", "PYTHONSAFEPATH": "1"}
        found.append(Build(args.label, other, plain | {"Authorization": f"Bearer {keys['sluicegate']}"}, env_other))
    return [t for t in found if t.name in args.targets or t.name == args.label]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20, help="measured requests per target (default 20)")
    parser.add_argument("--non-stream", dest="stream", action="store_false", help="plain JSON answers")
    parser.add_argument("--chunks", type=int, default=50)
    parser.add_argument("--chunk-delay-ms", type=float, default=60.0)
    parser.add_argument("--no-stream-usage", dest="stream_usage", action="store_false")
    parser.add_argument("--targets", default="bare_relay,sluicegate,sluicegate_nolimits")
    parser.add_argument("--python", help="also the gateway as installed for this interpreter (another build's venv)")
    parser.add_argument("--label", default="other", help="the name of --python's row")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    args.targets = args.targets.split(",")
    return args


def main() -> int:
    args = parse_args()
    for tool in ("valgrind", "callgrind_control", "redis-server"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed (Debian packages valgrind, redis-server)", file=sys.stderr)
            return 2
    cpus = pinning()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="sluicegate-instr-") as name:
        tmp = Path(name)
        port = {n: free_port() for n in ("redis", "mock")}
        redis_server = ["redis-server", "--port", str(port["redis"]), "--bind", HOST, "--save", "",
                        "--appendonly", "no"]  # fmt: skip
        mock = [sys.executable, "-m", "proxy", "mock-upstream", "--chunks", str(args.chunks),
                "--chunk-delay-ms", str(args.chunk_delay_ms), "--bind", f"{HOST}:{port['mock']}"]  # fmt: skip
        side = (None, None) if cpus is None else (str(cpus[0]), str(cpus[1]))
        children = [
            Child("redis", redis_server if side[0] is None else ["taskset", "-c", side[0], *redis_server],
                  port["redis"], tmp),
            Child("mock", mock if side[1] is None else ["taskset", "-c", side[1], *mock], port["mock"], tmp),
        ]  # fmt: skip
        try:
            for child in children:
                child.wait_ready()
            redis_url = f"redis://{HOST}:{port['redis']}/0"
            for target in targets(args, f"http://{HOST}:{port['mock']}", redis_url, tmp):
                results[target.name] = measure(target, free_port(), tmp, args, side[0])
        finally:
            for child in children:
                child.stop()
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    kind = f"stream of {args.chunks} chunks" if args.stream else "non-stream request"
    floor = results.get("bare_relay", {}).get("per_request")
    print(f"instructions per {kind} ({args.requests} requests, {CONCURRENCY} at a time, under callgrind)")
    print(f"{'target':24} {'per request':>12} {'x bare':>7} {'completed':>10}")
    for name, row in results.items():
        ratio = f"{row['per_request'] / floor:.2f}" if floor else "-"
        print(f"{name:24} {row['per_request'] / 1e6:10.3f} M {ratio:>7} {row['completed']:>5}/{row['requests']}")
    return 0 if all(r["completed"] == r["requests"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
