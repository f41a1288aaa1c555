"""How much load `sluicegate bench` itself can make, against wrk in the same run.

Starts the built-in mock upstream on CPU 1 and, on CPU 0, takes turns between
  - wrk (1 thread, 64 connections) and `sluicegate bench --concurrency 64`, non-stream;
  - `sluicegate bench --stream --concurrency 2000` (2,000 concurrent streams), one process;
  - the same 2,000 streams over `--procs 2` (then on both CPUs: the mock shares CPU 1).
Streams are 10 chunks 200 ms apart (mock knobs sent as headers), so the inter-token latency should read 200 ms.

    python tests/bench/bench_ceiling.py [--duration 10] [--rounds 2] [--streams 2000]

wrk must be on PATH (apt-get install wrk); without taskset the runs are not pinned (said in the output).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.common import Child, free_port

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
WRK_BODY = '{"model":"mock-chat","messages":[{"role":"user","content":"Say hello."}]}'
STREAM_KNOBS = ("--header", "x-mock-chunks: 10", "--header", "x-mock-chunk-delay-ms: 200")  # 2 s per stream
WRK_LUA = f'wrk.method = "POST"\nwrk.body = \'{WRK_BODY}\'\nwrk.headers["Content-Type"] = "application/json"\n'


def pinned(cpu: int, args: list[str]) -> list[str]:
    return ["taskset", "-c", str(cpu), *args] if shutil.which("taskset") and (os.cpu_count() or 1) >= 2 else args


def wrk(url: str, duration: float, lua: Path) -> float:
    args = pinned(0, ["wrk", "-t1", "-c64", f"-d{duration:g}s", "-s", str(lua), url + "/v1/chat/completions"])
    out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=duration + 30).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not match:
        raise RuntimeError(f"no Requests/sec in wrk's output:\n{out}")
    return float(match.group(1))


def bench(url: str, tmp: Path, cpu: int | None, *extra: str, duration: float) -> dict[str, Any]:
    """One `sluicegate bench` run; its result gains "cpu_pct", the CPU the bench's processes used."""
    out = tmp / "bench.json"
    before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
    args = [sys.executable, "-m", "proxy", "bench", url + "/v1", "--duration", str(duration), "--quiet",
            "--json", str(out), *extra]  # fmt: skip
    subprocess.run(pinned(cpu, args) if cpu is not None else args, cwd=ROOT, check=False, timeout=duration + 120,
                   capture_output=True)  # fmt: skip
    after, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic() - started
    run: dict[str, Any] = json.loads(out.read_text())["runs"][0]
    cpu_s = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    run["cpu_pct"] = 100 * cpu_s / wall
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement (default 10)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--streams", type=int, default=2000, help="concurrent streams (default 2000)")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        print("wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    rows: dict[str, list[float]] = {"wrk req/s": [], "bench req/s": [], "ratio": [], "bench CPU %": []}
    streams: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-ceiling-") as name:
        tmp = Path(name)
        lua = tmp / "post.lua"
        lua.write_text(WRK_LUA)
        port = free_port()
        mock = Child("mock", pinned(1, [sys.executable, "-m", "proxy", "mock-upstream",
                                        "--bind", f"{HOST}:{port}"]), port, tmp).wait_ready()  # fmt: skip
        url = f"http://{HOST}:{port}"
        try:
            for _ in range(args.rounds):
                w = wrk(url, args.duration, lua)
                run = bench(url, tmp, 0, "--concurrency", "64", duration=args.duration)
                b = run["req_per_s"]
                rows["bench CPU %"].append(run["cpu_pct"])
                rows["wrk req/s"].append(w)
                rows["bench req/s"].append(b)
                rows["ratio"].append(b / w)
                for procs in (1, 2):
                    load = ("--stream", "--concurrency", str(args.streams), "--procs", str(procs), "--timeout", "60")
                    run = bench(url, tmp, 0 if procs == 1 else None, *load, *STREAM_KNOBS, duration=args.duration)
                    kept = ("ok", "failed", "req_per_s", "status", "cpu_pct")
                    streams.append({"procs": procs, **{k: run[k] for k in kept},
                                    "itl_p50": run["latency_ms"].get("itl", {}).get("p50"),
                                    "itl_p99": run["latency_ms"].get("itl", {}).get("p99"),
                                    "ttft_p99": run["latency_ms"].get("ttft", {}).get("p99")})  # fmt: skip
                time.sleep(1)
        finally:
            mock.stop()
    print(f"non-stream, 64 connections, {args.duration:g} s each, client on CPU 0, mock on CPU 1:")
    for name, values in rows.items():
        print(f"  {name:<12}" + "".join(f"{v:>12.2f}" for v in values))
    print(f"\n{args.streams} concurrent streams (mock: 10 chunks 200 ms apart, so ITL should read 200 ms):")
    for s in streams:
        print(f"  procs {s['procs']}: ok {s['ok']:,} failed {s['failed']:,} ({s['status']}), {s['req_per_s']:.0f} "
              f"streams/s, ITL p50 {s['itl_p50']} ms p99 {s['itl_p99']} ms, TTFT p99 {s['ttft_p99']} ms, "
              f"bench CPU {s['cpu_pct']:.0f}%")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
