"""The bench's numbers: histograms of several processes add up exactly, and the summary says what was seen."""

from __future__ import annotations

import itertools
import pickle
import random

from proxy.devtools.bench.stats import Recorder


def fill(rec: Recorder, values: list[float]) -> None:
    for i, value in enumerate(values):
        rec.success(rec.t0 + i * 0.01, value, value / 10, 100, 20)


def test_merged_recorders_equal_one_recorder_that_saw_everything() -> None:
    rng = random.Random(3)
    values = [rng.lognormvariate(-3, 1) for _ in range(3000)]
    whole, parts = Recorder("A", "u", {}), [Recorder("A", "u", {}) for _ in range(3)]
    fill(whole, values)
    for i, part in enumerate(parts):
        fill(part, values[i::3])
        part.failure(part.t0, "429", "rate_limit_exceeded")
        part.rate_limited(0.5 + i, {"x-ratelimit-limit-requests": "5"})
    # The wire form crosses a process boundary by pickle, as multiprocessing sends it.
    merged = Recorder.merged([pickle.loads(pickle.dumps(p.to_wire())) for p in parts])
    for name in ("e2e", "ttft", "tpot"):
        for p in (50.0, 90.0, 99.0, 99.9, 100.0):
            assert merged.p_ms(name, p) == whole.p_ms(name, p)
    summary = merged.summary()
    assert (summary["requests"], summary["ok"], summary["failed"]) == (3003, 3000, 3)
    assert summary["status"] == {"200": 3000, "429": 3}
    assert summary["error_codes"] == {"429 rate_limit_exceeded": 3}
    assert summary["rate_limited"]["retry_after_s"] == {"min": 0.5, "max": 2.5}
    assert summary["output_tokens"] == 60000
    assert sum(b[2] for b in summary["histogram"]["ttft"]) == 3000
    assert sum(s["ok"] for s in summary["timeline"]) == 3000
    cdf = summary["cdf"]["e2e"]
    assert cdf[-1][1] == 1.0 and all(a[0] < b[0] for a, b in itertools.pairwise(cdf))


def test_a_success_is_good_only_within_every_slo() -> None:
    rec = Recorder("A", "u", {"ttft": 100_000, "e2e": 1_000_000})  # 100 ms, 1 s
    rec.success(0, 0.5, 0.05, 1, 10)  # good
    rec.success(0, 0.5, 0.2, 1, 10)  # ttft over
    rec.success(0, 2.0, 0.05, 1, 10)  # e2e over
    rec.failure(0, "502", "upstream_error")
    assert rec.summary()["goodput"] == 0.25
