"""What a load run prints: the live progress line while it runs and the table at the end.

The progress line is tqdm's: one small dependency-free package that redraws a single line in
place, keeps out of the way when stderr is not a terminal, and takes our own counters as its
postfix (rich would bring a whole rendering stack for one line).
"""

from __future__ import annotations

import math
import sys
from typing import Any

from tqdm import tqdm

from .stats import Recorder

LATENCY_TITLES = {"e2e": "end to end", "ttft": "time to first token", "tpot": "time per output token",
                  "itl": "inter-token latency", "chunk_gap": "gap between reads"}  # fmt: skip


class Progress:
    """req/s, errors and p50 so far, redrawn in place on stderr (only when stderr is a terminal)."""

    def __init__(self, total: float, unit: str) -> None:
        layout = "{l_bar}{bar}| {n:.0f}/{total:.0f} {unit} [{elapsed}<{remaining}{postfix}]"
        self.bar = tqdm(total=total, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False, bar_format=layout)

    def show(self, *, done: float, requests: int, failed: int, elapsed_s: float, p50_ms: float) -> None:
        rate = requests / elapsed_s if elapsed_s > 0 else 0.0
        p50 = "-" if math.isnan(p50_ms) else f"{p50_ms:.1f} ms"
        self.bar.set_postfix_str(f"{rate:,.0f} req/s, {failed} errors, p50 {p50}", refresh=False)
        self.bar.update(max(0.0, min(done, self.bar.total) - self.bar.n))

    def close(self) -> None:
        self.bar.close()


def number(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def table(result: dict[str, Any]) -> str:
    """The final table: one column per target; with --compare the ratio B/A beside them."""
    runs = result["runs"]
    ratio = result.get("compare") or {}
    head = [""] + [f"{r['label']}: {r['url']}" for r in runs] + (["B/A"] if ratio else [])
    rows: list[list[str]] = []

    def row(name: str, values: list[Any], key: str | None = None, digits: int = 2) -> None:
        cells = [number(v, digits) for v in values]
        if ratio:
            cells.append(number(ratio.get(key), 2) + "x" if key and ratio.get(key) is not None else "")
        rows.append([name, *cells])

    row("requests", [r["requests"] for r in runs])
    row("ok / failed", [f"{r['ok']:,} / {r['failed']:,}" for r in runs])
    row("req/s", [r["req_per_s"] for r in runs], "req_per_s", 1)
    row("output tokens/s", [r["output_tokens_per_s"] for r in runs], "output_tokens_per_s", 1)
    row("total tokens/s", [r["total_tokens_per_s"] for r in runs], "total_tokens_per_s", 1)
    if any(r["goodput"] is not None for r in runs) and result["slo"]:
        row("goodput (all SLOs met)", [pct(r["goodput"]) for r in runs])
    for name, title in LATENCY_TITLES.items():
        if not any(name in r["latency_ms"] for r in runs):
            continue
        rows.append([f"{title}, ms", *[""] * (len(head) - 1)])
        for stat in ("mean", *(f"p{p:g}" for p in result["settings"]["percentiles"]), "max"):  # std, min: --json
            label = "  median" if stat == "p50" else f"  {stat}"
            row(label, [r["latency_ms"].get(name, {}).get(stat) for r in runs], f"{name}_{stat}")
    rows.append(["status", *[statuses(r) for r in runs], *([""] if ratio else [])])
    if any(r["rate_limited"]["retried"] for r in runs):
        row("429s waited on and retried", [r["rate_limited"]["retried"] for r in runs])
    if any(r["rate_limited"]["count"] or r["rate_limited"]["retried"] for r in runs):
        rows.append(["429 retry-after, s", *[retry(r) for r in runs], *([""] if ratio else [])])
    if any(r["streams"] for r in runs):
        rows.append(["streams ended [DONE] / not / error event",
                     *[streams(r) for r in runs], *([""] if ratio else [])])  # fmt: skip
    widths = [max(len(line[i]) for line in [head, *rows]) for i in range(len(head))]
    lines = [aligned(line, widths) for line in [head, *rows]]
    codes = {k: v for r in runs for k, v in r["error_codes"].items()}
    if codes:
        lines.append("error codes: " + ", ".join(f"{k} x{v}" for k, v in codes.items()))
    for run in runs:
        headers = run["rate_limited"]["headers"]
        if headers:
            lines.append(f"{run['label']} last 429: " + ", ".join(f"{k}={v}" for k, v in headers.items()))
    for slo in result["slo"]:
        verdict = "ok" if slo["passed"] else "FAILED"
        lines.append(f"SLO {slo['name']} p99 <= {slo['bound_ms']:g} ms on {slo['label']}: "
                     f"{number(slo['p99_ms'])} ms, {verdict}")  # fmt: skip
    if result.get("interrupted"):
        lines.append("interrupted: these are the numbers measured until Ctrl-C")
    return "\n".join(lines)


def aligned(cells: list[str], widths: list[int]) -> str:
    """The first cell left-aligned, the numbers right-aligned."""
    return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))


def pct(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.1f}%"


def statuses(run: dict[str, Any]) -> str:
    return " ".join(f"{k}:{v:,}" for k, v in run["status"].items()) or "-"


def retry(run: dict[str, Any]) -> str:
    seen = run["rate_limited"]["retry_after_s"]
    return f"{seen['min']:g}-{seen['max']:g}" if seen else "-"


def streams(run: dict[str, Any]) -> str:
    s = run["streams"] or {}
    return f"{s.get('done', 0):,} / {s.get('missing_done', 0):,} / {s.get('error_events', 0):,}"


def recorder_line(rec: Recorder) -> str:
    return f"{rec.label}: {rec.requests:,} requests, {rec.failed:,} failed"
