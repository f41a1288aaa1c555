"""tests/bench/admission_latency.py end to end with tiny counts: its own Redis and Cluster, every call from Redis."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.bench


@pytest.mark.skipif(
    shutil.which("redis-server") is None or shutil.which("redis-cli") is None,
    reason="the script starts a redis-server and a Redis Cluster of its own",
)
def test_the_admission_benchmark_runs_single_and_cluster_without_errors() -> None:
    args = ["--calls", "40", "--concurrent-calls", "80", "--concurrency", "4", "--rounds", "2", "--json"]
    done = subprocess.run(
        [sys.executable, "tests/bench/admission_latency.py", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = json.loads(done.stdout)
    assert not out["deadline_hit"]
    assert set(out["results"]) == {"single", "cluster"}
    assert out["results"]["cluster"]["primaries"] == 3  # the groups spread over the cluster
    for name, result in out["results"].items():
        assert result["errors"] == 0, name
        assert result["sequential"]["calls"] == 40, name
        assert result["concurrent_4"]["calls"] == 80, name
        assert 0 < result["sequential"]["p50_us"] <= result["sequential"]["p99_us"], name
