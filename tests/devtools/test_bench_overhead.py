"""tests/bench/overhead.py end to end: a short s3 run against real processes, as the README tells people to run it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TARGETS = {"direct", "bare_relay", "sluicegate", "sluicegate_nolimits"}
STREAM_COLUMNS = {
    "ok", "errors", "ttfb_p50_ms", "ttfb_p99_ms", "ttfb_p50_delta_ms", "ttfb_p99_delta_ms", "total_p99_ms",
    "cpu_pct", "load_cpu_pct", "peak_rss_mib", "steal_pct",
}  # fmt: skip


pytestmark = pytest.mark.bench


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="the scenario starts a redis-server of its own")
def test_s3_runs_every_target_to_the_end_without_errors() -> None:
    args = ["--scenario", "s3", "--duration", "1", "--rounds", "1", "--warmup", "20", "--deadline", "60", "--json"]
    done = subprocess.run(
        [sys.executable, "tests/bench/overhead.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=90
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = json.loads(done.stdout)
    assert out["scenario"] == "s3"
    assert out["settings"]["concurrency"] == 200
    assert out["settings"]["chunks"] == 50
    assert not out["deadline_hit"]
    assert out["redis_script_calls"] > 0  # the limited key went through the limiter
    assert set(out["targets"]) == TARGETS
    for name, row in out["targets"].items():
        assert set(row) >= STREAM_COLUMNS, name
        assert row["errors"] == 0, name
        assert row["ok"] > 0, name
    assert out["targets"]["direct"]["ttfb_p50_delta_ms"] == 0
