"""`sluicegate bench URL`: options, the run, the table, --json, --report, --slo and the exit code.

Heavy imports (aiohttp, the HDR histograms, tqdm) wait until the command runs, so the other
commands start as fast as before.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

SLO_NAMES = ("e2e", "ttft", "tpot", "itl", "chunk_gap")
RATIO_KEYS = ("req_per_s", "output_tokens_per_s", "total_tokens_per_s")
KEY_ENV = ("SLUICEGATE_KEY", "OPENAI_API_KEY")


def slo(text: str) -> tuple[str, float]:
    name, sep, bound = text.partition(":")
    try:
        ms = float(bound)
    except ValueError:
        ms = math.nan
    if not sep or name not in SLO_NAMES or not ms > 0:
        raise argparse.ArgumentTypeError(f"expected NAME:MS with NAME one of {', '.join(SLO_NAMES)}, got {text!r}")
    return name, ms


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def percentiles(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    if not values or not all(0 < v < 100 for v in values):
        raise argparse.ArgumentTypeError(f"expected percentiles between 0 and 100 like 50,90,99, got {text!r}")
    return tuple(sorted(set(values)))


def header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected 'Name: value', got {text!r}")
    return name.strip(), value.strip()


def add_parser(sub: Any, positive: Any) -> None:
    p = sub.add_parser(
        "bench", help="load-test an OpenAI-compatible endpoint (this gateway, a provider, nginx in front)",
        description="Load-test an OpenAI-compatible endpoint. Latencies are exact to 3 digits (HDR histograms); "
        "in open loop (--rate) they count from each request's scheduled start, so a stall cannot hide. "
        "Example: sluicegate bench http://127.0.0.1:9090/v1 --key sk-... --stream --concurrency 32 --duration 20",
    )  # fmt: skip
    p.add_argument("url", metavar="URL", help="base URL as clients use it, e.g. http://127.0.0.1:9090/v1")
    p.add_argument("--model", default="mock-chat", help="model to ask for (default mock-chat, the demo's)")
    p.add_argument("--key", help=f"API key sent as 'Authorization: Bearer' (default: ${KEY_ENV[0]} or ${KEY_ENV[1]})")
    p.add_argument("--header", type=header, action="append", default=[], metavar="'NAME: VALUE'",
                   help="an extra request header (repeatable)")  # fmt: skip
    p.add_argument("--endpoint", choices=("chat", "completions", "embeddings"), default="chat",
                   help="/chat/completions, /completions or /embeddings under URL (default chat)")  # fmt: skip
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=positive, help="closed loop: this many requests in flight (default 8)")
    load.add_argument("--rate", type=positive_float, help="open loop: start this many requests per second")
    p.add_argument("--arrivals", choices=("poisson", "constant"), default="poisson",
                   help="open loop: random (Poisson) or evenly spaced starts (default poisson)")  # fmt: skip
    p.add_argument("--burstiness", type=positive_float, default=1.0,
                   help="open loop, poisson: gamma shape of the gaps; 1 is Poisson, below 1 burstier "
                   "(default 1)")  # fmt: skip
    p.add_argument("--max-concurrency", type=positive,
                   help="open loop: at most this many in flight; later starts wait "
                   "(and their latency shows it)")  # fmt: skip
    bound = p.add_mutually_exclusive_group()
    bound.add_argument("--duration", type=positive_float, help="seconds of load per target (default 10)")
    bound.add_argument("--requests", type=positive, help="requests per target")
    p.add_argument("--stream", action="store_true", help="stream answers (SSE): measures TTFT, TPOT, ITL")
    p.add_argument("--input-tokens", type=positive, default=128, help="synthetic prompt length (default 128)")
    p.add_argument("--max-tokens", type=positive, help="max_tokens in each request (default: not sent)")
    p.add_argument("--prompts", type=Path, metavar="FILE.jsonl",
                   help='prompts instead of synthetic ones: lines of {"messages": [...]} '
                   'or {"prompt": "..."}')  # fmt: skip
    p.add_argument("--compare", metavar="URL2", help="also load URL2, in alternating rounds; prints the ratio B/A")
    p.add_argument("--compare-key", help="API key for URL2 (default: the same as --key)")
    p.add_argument("--rounds", type=positive, default=4, help="alternating rounds with --compare (default 4)")
    p.add_argument("--slo", type=slo, nargs="+", action="extend", default=[], metavar="NAME:MS",
                   help=f"fail (exit 1) when NAME's p99 is over MS; NAME is one of {', '.join(SLO_NAMES)}")  # fmt: skip
    p.add_argument("--percentiles", type=percentiles, default=(50.0, 90.0, 99.0), metavar="LIST",
                   help="percentiles the table shows, e.g. 50,90,99,99.9 (default 50,90,99); "
                   "--json has these and 95 and 99.9 too")  # fmt: skip
    p.add_argument("--json", type=Path, metavar="PATH", help="write every number as JSON")
    p.add_argument("--report", type=Path, metavar="PATH.html",
                   help="write a self-contained HTML report (needs: pip install 'sluicegate[bench]')")  # fmt: skip
    p.add_argument("--procs", type=positive, default=1, help="spread the load over N processes (default 1)")
    p.add_argument("--respect-retry-after", action="store_true",
                   help="on 429, wait retry-after and retry (up to 2 times), as the openai SDK does")  # fmt: skip
    p.add_argument("--timeout", type=positive_float, default=600.0, help="seconds per request (default 600)")
    p.add_argument("--quiet", action="store_true", help="no progress line")


def plan_from(args: argparse.Namespace) -> Any:
    from .load import Arrivals, Target
    from .run import LoadPlan
    from .workload import build

    key = args.key or next((os.environ[n] for n in KEY_ENV if os.environ.get(n)), None)
    extra = dict(args.header)
    targets = [Target(label="A", base_url=args.url, headers=auth(key, extra))]
    if args.compare:
        targets.append(Target(label="B", base_url=args.compare, headers=auth(args.compare_key or key, extra)))
    workload = build(endpoint=args.endpoint, model=args.model, stream=args.stream, max_tokens=args.max_tokens,
                     input_tokens=args.input_tokens, prompts=args.prompts)  # fmt: skip
    rate = (
        Arrivals(rate=args.rate, poisson=args.arrivals == "poisson", burstiness=args.burstiness) if args.rate else None
    )
    return LoadPlan(
        targets=tuple(targets), workload=workload, concurrency=None if rate else (args.concurrency or 8),
        arrivals=rate, max_concurrency=args.max_concurrency,
        duration_s=None if args.requests else (args.duration or 10.0), requests=args.requests,
        rounds=args.rounds, timeout_s=args.timeout, respect_retry_after=args.respect_retry_after,
        slo_ms=dict(args.slo), procs=args.procs,
    )  # fmt: skip


def auth(key: str | None, extra: dict[str, str]) -> dict[str, str]:
    return {**({"Authorization": f"Bearer {key}"} if key else {}), **extra}


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """The run's settings for --json and the report; never a key or a header value."""
    skip = {"key", "compare_key", "header", "command", "json", "report", "quiet", "slo", "prompts"}
    out = {k: v for k, v in vars(args).items() if k not in skip}
    out["prompts"] = str(args.prompts) if args.prompts else None
    out["headers"] = [name for name, _ in args.header]
    return out


def assemble(args: argparse.Namespace, recs: list[Any], interrupted: bool) -> dict[str, Any]:
    from .stats import PERCENTILES

    runs = [rec.summary(tuple(sorted({*PERCENTILES, *args.percentiles}))) for rec in recs]
    slos = [
        {"name": name, "bound_ms": ms, "label": run["label"],
         "p99_ms": run["latency_ms"].get(name, {}).get("p99"),
         "passed": name in run["latency_ms"] and run["latency_ms"][name]["p99"] <= ms}
        for run in runs for name, ms in args.slo
    ]  # fmt: skip
    return {
        "tool": "sluicegate bench", "settings": settings_of(args), "runs": runs,
        "compare": ratios(runs[0], runs[1]) if len(runs) == 2 else None,
        "slo": slos, "passed": all(s["passed"] for s in slos), "interrupted": interrupted,
    }  # fmt: skip


def ratios(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float | None]:
    """B/A for throughput and for every latency statistic both runs have."""

    def ratio(x: float | None, y: float | None) -> float | None:
        return y / x if x and y is not None and not math.isnan(x) and not math.isnan(y) else None

    out = {key: ratio(a[key], b[key]) for key in RATIO_KEYS}
    for name, stats in a["latency_ms"].items():
        for stat, value in stats.items():
            if stat != "count" and name in b["latency_ms"]:
                out[f"{name}_{stat}"] = ratio(value, b["latency_ms"][name][stat])
    return out


def main(args: argparse.Namespace) -> int:
    try:
        from .output import Progress, table
        from .run import run_here, run_procs
        from .workload import WorkloadError
    except ImportError as exc:  # hdrhistogram and tqdm come with the extra, not with the gateway
        print(
            f"sluicegate bench needs its extra ({exc.name} is missing): pip install 'sluicegate[bench]'",
            file=sys.stderr,
        )
        return 2

    if args.report:
        from .report import report_available

        if not report_available():
            print("--report needs the plotting extra: pip install 'sluicegate[bench]'", file=sys.stderr)
            return 2
    try:
        plan = plan_from(args)
    except WorkloadError as exc:
        print(exc, file=sys.stderr)
        return 2
    total, unit = (plan.requests, "req") if plan.requests else (plan.duration_s, "s")
    total *= len(plan.targets)
    bar = None if args.quiet or not sys.stderr.isatty() else Progress(total, unit)

    def progress(elapsed: float, requests: int, failed: int, p50_ms: float) -> None:
        if bar is not None:
            bar.show(
                done=requests if plan.requests else elapsed,
                requests=requests,
                failed=failed,
                elapsed_s=elapsed,
                p50_ms=p50_ms,
            )

    try:
        recs, interrupted = (run_procs if plan.procs > 1 else run_here)(plan, progress)
    finally:
        if bar is not None:
            bar.close()
    result = assemble(args, recs, interrupted)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str, allow_nan=False) + "\n")
    print(table(result))
    if args.report:
        from .report import ReportUnavailable, write_report

        try:
            write_report(result, args.report)
        except ReportUnavailable as exc:
            print(exc, file=sys.stderr)
            return 2
    if not any(run["ok"] for run in result["runs"]):
        print("no request succeeded: check the URL, the key and the model", file=sys.stderr)
        return 1
    return 0 if result["passed"] else 1
