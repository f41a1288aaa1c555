"""What a load run measured: HDR histograms, counts and a timeline, mergeable across processes.

Latencies are recorded in microseconds into HDR histograms (3 significant digits, up to an hour),
so a long run stays flat in memory and the histograms of several processes add up exactly.
"""

from __future__ import annotations

import base64
import math
from collections import Counter
from typing import Any

from hdrh.histogram import HdrHistogram

LATENCIES = ("e2e", "ttft", "tpot", "itl", "chunk_gap")
PERCENTILES = (50.0, 90.0, 95.0, 99.0, 99.9)  # the default of --percentiles; p50 and p99 are always given
HIGHEST_US = 3_600_000_000
CDF_POINTS = 200  # percentiles kept for the report's CDF
LIMIT_HEADERS = ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
                 "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens")  # fmt: skip


def new_histogram() -> HdrHistogram:
    return HdrHistogram(1, HIGHEST_US, 3)


def us(seconds: float) -> int:
    return min(HIGHEST_US, max(0, round(seconds * 1e6)))


class Recorder:
    """Everything one target's requests left behind, in one process."""

    def __init__(self, label: str, url: str, slo_us: dict[str, int]) -> None:
        self.label, self.url = label, url
        self.slo_us = slo_us  # latency name -> bound; a success within every bound is "good"
        self.hist = {name: new_histogram() for name in LATENCIES}
        self.status: Counter[str] = Counter()
        self.error_codes: Counter[str] = Counter()  # "429 rate_limit_exceeded", "502 upstream_error", ...
        self.requests = self.ok = self.failed = self.good = 0
        self.retried = 0  # 429s waited on and retried (--respect-retry-after)
        self.input_tokens = self.output_tokens = 0
        self.streams: Counter[str] = Counter()  # count, done, missing_done, error_events
        self.retry_after_s: list[float] = []  # min and max seen
        self.limit_headers: dict[str, str] = {}  # the last 429's x-ratelimit-* values
        self.timeline: dict[int, list[int]] = {}  # second of the run -> [ok, failed, output tokens]
        self.elapsed_s = 0.0  # time this target was under load, summed over rounds
        self.t0 = 0.0  # perf_counter at which this target's load time would have started

    def second(self, now: float) -> list[int]:
        key = int(now - self.t0)
        slot = self.timeline.get(key)
        if slot is None:
            slot = self.timeline[key] = [0, 0, 0]
        return slot

    def success(self, now: float, e2e_s: float, ttft_s: float | None, input_tokens: int, output_tokens: int) -> None:
        self.requests += 1
        self.ok += 1
        self.status["200"] += 1
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens
        values = {"e2e": us(e2e_s)}
        self.hist["e2e"].record_value(values["e2e"])
        if ttft_s is not None:
            values["ttft"] = us(ttft_s)
            self.hist["ttft"].record_value(values["ttft"])
            if output_tokens > 1:
                values["tpot"] = us((e2e_s - ttft_s) / (output_tokens - 1))
                self.hist["tpot"].record_value(values["tpot"])
        if all(values.get(name, 0) <= bound for name, bound in self.slo_us.items()):
            self.good += 1
        slot = self.second(now)
        slot[0] += 1
        slot[2] += output_tokens

    def failure(self, now: float, status: str, code: str | None = None) -> None:
        self.requests += 1
        self.failed += 1
        self.status[status] += 1
        if code is not None:
            self.error_codes[f"{status} {code}"] += 1
        self.second(now)[1] += 1

    def rate_limited(self, retry_after_s: float | None, headers: dict[str, str], retried: bool = False) -> None:
        self.retried += retried
        if retry_after_s is not None:
            seen = self.retry_after_s
            self.retry_after_s = [min([retry_after_s, *seen[:1]]), max([retry_after_s, *seen[1:]])]
        self.limit_headers.update(headers)

    def to_wire(self) -> dict[str, Any]:
        """A picklable, mergeable form (histograms HDR-encoded)."""
        state = {k: v for k, v in vars(self).items() if k != "hist"}
        state["hist"] = {name: base64.b64encode(h.encode()).decode() for name, h in self.hist.items()}
        return state

    @classmethod
    def merged(cls, wires: list[dict[str, Any]]) -> Recorder:
        """One recorder holding the sum of several processes' recorders of the same target."""
        first = wires[0]
        out = cls(first["label"], first["url"], first["slo_us"])
        for wire in wires:
            for name, encoded in wire["hist"].items():
                if wire["hist"][name]:
                    out.hist[name].decode_and_add(base64.b64decode(encoded))
            for name in ("requests", "ok", "failed", "good", "retried", "input_tokens", "output_tokens"):
                setattr(out, name, getattr(out, name) + wire[name])
            for name in ("status", "error_codes", "streams"):
                getattr(out, name).update(wire[name])
            if wire["retry_after_s"]:
                out.rate_limited(wire["retry_after_s"][0], wire["limit_headers"])
                out.rate_limited(wire["retry_after_s"][1], {})
            else:
                out.limit_headers.update(wire["limit_headers"])
            for second, (ok, failed, tokens) in wire["timeline"].items():
                slot = out.timeline.setdefault(int(second), [0, 0, 0])
                slot[0] += ok
                slot[1] += failed
                slot[2] += tokens
            out.elapsed_s = max(out.elapsed_s, wire["elapsed_s"])  # the processes ran side by side
        return out

    def p_ms(self, name: str, percentile: float) -> float:
        hist = self.hist[name]
        return hist.get_value_at_percentile(percentile) / 1000 if hist.get_total_count() else math.nan

    def summary(self, percentiles: tuple[float, ...] = PERCENTILES) -> dict[str, Any]:
        """The numbers of `--json` for this target; the timeline leaves out a last, partial second."""
        per_s = (lambda n: n / self.elapsed_s) if self.elapsed_s > 0 else (lambda n: 0.0)
        return {
            "label": self.label, "url": self.url, "elapsed_s": round(self.elapsed_s, 3),
            "requests": self.requests, "ok": self.ok, "failed": self.failed,
            "req_per_s": per_s(self.requests), "ok_per_s": per_s(self.ok),
            "goodput": self.good / self.requests if self.requests else None,
            "input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
            "output_tokens_per_s": per_s(self.output_tokens),
            "total_tokens_per_s": per_s(self.input_tokens + self.output_tokens),
            "status": dict(sorted(self.status.items())), "error_codes": dict(sorted(self.error_codes.items())),
            "rate_limited": {
                "count": self.status["429"],
                "retried": self.retried,
                "retry_after_s": dict(zip(("min", "max"), seen, strict=True)) if (seen := self.retry_after_s) else None,
                "headers": self.limit_headers,
            },
            "streams": dict(self.streams) or None,
            "latency_ms": {name: describe(h, percentiles) for name, h in self.hist.items() if h.get_total_count()},
            "cdf": {name: cdf(self.hist[name]) for name in ("e2e", "ttft") if self.hist[name].get_total_count()},
            "histogram": {"ttft": buckets(self.hist["ttft"])} if self.hist["ttft"].get_total_count() else {},
            "timeline": [{"t_s": s, "ok": v[0], "failed": v[1], "output_tokens": v[2]}
                         for s, v in sorted(self.timeline.items()) if s + 1 <= self.elapsed_s or self.elapsed_s < 2],
        }  # fmt: skip


def describe(hist: HdrHistogram, percentiles: tuple[float, ...] = PERCENTILES) -> dict[str, float]:
    out = {
        "count": hist.get_total_count(), "mean": hist.get_mean_value() / 1000, "std": hist.get_stddev() / 1000,
        "min": hist.get_min_value() / 1000, "max": hist.get_max_value() / 1000,
    }  # fmt: skip
    chosen = sorted({50.0, 99.0, *percentiles})
    out.update({f"p{p:g}": hist.get_value_at_percentile(p) / 1000 for p in chosen})
    return out


def cdf(hist: HdrHistogram) -> list[list[float]]:
    """(ms, share of requests at or below) at CDF_POINTS percentiles, denser in the tail."""
    points: list[list[float]] = []
    for i in range(CDF_POINTS + 1):
        share = 1 - 10 ** (-4 * i / CDF_POINTS)  # 0 .. 0.9999
        value = hist.get_value_at_percentile(share * 100) / 1000
        if not points or value > points[-1][0]:
            points.append([value, round(share, 6)])
    top = hist.get_max_value() / 1000
    if top > points[-1][0]:
        points.append([top, 1.0])
    else:
        points[-1][1] = 1.0
    return points


def buckets(hist: HdrHistogram, count: int = 40) -> list[list[float]]:
    """A histogram in `count` log-spaced buckets from the smallest value to the largest: [start ms, end ms, n]."""
    low = max(1, hist.get_min_value())
    scale = math.log(max(low + 1, hist.get_max_value() + 1) / low)
    counts = [0] * count
    for item in hist.get_recorded_iterator():
        at = math.log(max(low, item.value_iterated_to) / low) / scale
        counts[min(count - 1, int(at * count))] += item.count_at_value_iterated_to
    edges = [low * math.exp(scale * i / count) / 1000 for i in range(count + 1)]
    return [[edges[i], edges[i + 1], n] for i, n in enumerate(counts) if n]
