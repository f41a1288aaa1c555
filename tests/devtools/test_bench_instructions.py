"""tests/bench/instructions.py end to end: callgrind's count per request for the bare relay and the gateway."""

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
    shutil.which("valgrind") is None or shutil.which("redis-server") is None,
    reason="needs valgrind and redis-server (Debian packages valgrind, redis-server)",
)
def test_counts_instructions_per_stream_for_the_relay_and_the_gateway() -> None:
    args = ["--requests", "2", "--chunks", "5", "--chunk-delay-ms", "20", "--targets", "bare_relay,sluicegate"]
    done = subprocess.run(
        [sys.executable, "tests/bench/instructions.py", *args, "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = json.loads(done.stdout)
    assert set(out) == {"bare_relay", "sluicegate"}
    for name, row in out.items():
        assert row["completed"] == row["requests"] == 2, name
        # A stream through either runs at least a few hundred thousand instructions under callgrind.
        assert row["per_request"] > 100_000, name
        assert row["instructions"] == pytest.approx(row["per_request"] * 2)
