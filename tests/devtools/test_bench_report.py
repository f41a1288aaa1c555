"""devtools/bench/report.py: the --report page is one self-contained file, and headless Chromium draws its charts."""

from __future__ import annotations

import copy
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest

from proxy.devtools.bench.report import ReportUnavailable, report_available, write_report

CHART_IDS = ("chart-cdf", "chart-ttft", "chart-throughput")

# The sample in the --json schema: a streamed run against the gateway.
RUN_A: dict[str, Any] = {
    "label": "A", "url": "http://127.0.0.1:9090/v1",
    "elapsed_s": 10.0, "requests": 1000, "ok": 990, "failed": 10,
    "req_per_s": 100.0, "ok_per_s": 99.0, "goodput": 0.97,
    "input_tokens": 128000, "output_tokens": 63360, "output_tokens_per_s": 6336.0, "total_tokens_per_s": 19136.0,
    "status": {"200": 990, "429": 5, "502": 3, "connect_error": 2},
    "error_codes": {"429 rate_limit_exceeded": 5, "502 upstream_error": 3},
    "rate_limited": {"count": 5, "retry_after_s": {"min": 0.2, "max": 1.0},
                     "headers": {"x-ratelimit-limit-requests": "600", "x-ratelimit-remaining-requests": "0"}},
    "streams": {"count": 990, "done": 988, "missing_done": 2, "error_events": 1},
    "latency_ms": {
        "e2e": {"count": 990, "mean": 210.5, "std": 12.1, "min": 190.0, "max": 400.2, "p50": 205.0, "p90": 220.0,
                "p95": 230.0, "p99": 300.0, "p99.9": 390.0},
        "ttft": {"count": 990, "mean": 5.1, "std": 1.0, "min": 2.0, "max": 40.0, "p50": 4.8, "p90": 6.0, "p95": 7.0,
                 "p99": 12.0, "p99.9": 35.0},
        "tpot": {"count": 990, "mean": 20.3, "std": 0.5, "min": 19.8, "max": 25.0, "p50": 20.2, "p90": 20.8,
                 "p95": 21.0, "p99": 22.0, "p99.9": 24.0},
        "itl": {"count": 63000, "mean": 20.1, "std": 1.1, "min": 0.1, "max": 60.0, "p50": 20.0, "p90": 21.0,
                "p95": 21.5, "p99": 25.0, "p99.9": 40.0},
    },
    "cdf": {"e2e": [[190.0, 0.0], [205.0, 0.5], [220.0, 0.9], [300.0, 0.99], [400.2, 1.0]],
            "ttft": [[2.0, 0.0], [4.8, 0.5], [6.0, 0.9], [12.0, 0.99], [40.0, 1.0]]},
    "histogram": {"ttft": [[2.0, 3.0, 100], [3.0, 4.0, 300], [4.0, 5.0, 400], [5.0, 10.0, 180], [10.0, 40.0, 10]]},
    "timeline": [{"t_s": 1, "ok": 98, "failed": 1, "output_tokens": 6272},
                 {"t_s": 2, "ok": 100, "failed": 0, "output_tokens": 6400}],
}  # fmt: skip
SETTINGS: dict[str, Any] = {
    "url": "http://127.0.0.1:9090/v1", "compare": "http://127.0.0.1:8000/v1", "model": "mock-chat",
    "endpoint": "chat", "stream": True, "mode": "closed", "concurrency": 16, "rate": None, "arrivals": "poisson",
    "burstiness": 1.0, "duration_s": 10.0, "requests": None, "input_tokens": 128, "max_tokens": 64, "procs": 1,
    "rounds": 4,
}  # fmt: skip


def compare_result() -> dict[str, Any]:
    """The sample with a second run, B, straight at the provider: a little faster, and a ten-second timeline."""
    run_a = copy.deepcopy(RUN_A)
    run_a["timeline"] = [{"t_s": s, "ok": 95 + s % 4, "failed": s % 2, "output_tokens": 64 * (95 + s % 4)}
                         for s in range(1, 11)]  # fmt: skip
    run_b = copy.deepcopy(run_a)
    run_b.update(label="B", url="http://127.0.0.1:8000/v1", req_per_s=108.0, ok=1080, failed=0, requests=1080,
                 status={"200": 1080}, error_codes={}, output_tokens_per_s=6912.0)  # fmt: skip
    run_b["latency_ms"]["e2e"].update(p50=190.0, p99=260.0)
    run_b["latency_ms"]["ttft"].update(p50=3.1, p99=8.0)
    run_b["cdf"] = {name: [[ms * 0.8, share] for ms, share in points] for name, points in RUN_A["cdf"].items()}
    run_b["histogram"]["ttft"] = [[1.5, 2.2, 250], [2.2, 3.3, 500], [3.3, 5.0, 280], [5.0, 7.5, 40], [7.5, 30.0, 10]]
    run_b["timeline"] = [{"t_s": s, "ok": 104 + s % 3, "failed": 0, "output_tokens": 64 * (104 + s % 3)}
                         for s in range(1, 11)]  # fmt: skip
    ratios = {"req_per_s": 1.08, "e2e_p50": 190.0 / 205.0, "e2e_p99": 260.0 / 300.0, "ttft_p50": 3.1 / 4.8,
              "ttft_p99": 8.0 / 12.0, "output_tokens_per_s": 6912.0 / 6336.0}  # fmt: skip
    slo = [{"name": "ttft", "bound_ms": 500.0, "label": label, "p99_ms": p99, "passed": True}
           for label, p99 in (("A", 12.0), ("B", 8.0))]  # fmt: skip
    return {"tool": "sluicegate bench", "settings": copy.deepcopy(SETTINGS), "runs": [run_a, run_b], "compare": ratios,
            "slo": slo, "passed": True}  # fmt: skip


def test_report_is_one_file_that_loads_nothing_from_elsewhere(tmp_path: Path) -> None:
    path = tmp_path / "report.html"
    write_report(compare_result(), path)
    text = path.read_text()
    assert text.startswith("<!doctype html>")
    for div_id in CHART_IDS:
        assert text.count(f'id="{div_id}"') == 1
    assert re.findall(r"<script[^>]*\ssrc=", text) == []
    assert re.findall(r"<link[^>]*\shref=", text) == []
    assert "@import" not in text
    # plotly.js itself is inline, once; each chart has its own small script.
    assert len(re.findall(r"<script>/\*\*\n\* plotly\.js v\d", text)) == 1
    assert len(re.findall(r"<script>\s*window\.PLOTLYENV", text)) == 3
    # The summary carries both targets, the ratio column and the SLO verdicts.
    assert "<th>A: http://127.0.0.1:9090/v1</th><th>B: http://127.0.0.1:8000/v1</th><th>B/A</th>" in text
    assert "1.08x" in text
    assert text.count("ttft 12.0 &lt;= 500 ms: pass") == 1
    assert "SLOs passed" in text


def test_report_escapes_every_string_from_the_result(tmp_path: Path) -> None:
    result = compare_result()
    hostile = "<img src=x onerror=alert(1)>"
    result["settings"]["model"] = f"mock-chat{hostile}"
    result["runs"][1]["url"] = f"http://127.0.0.1:8000/v1?a=1&b={hostile}"
    result["runs"][1]["label"] = f"B</th>{hostile}"
    result["runs"][1]["status"] = {f"502{hostile}": 1}
    path = tmp_path / "report.html"
    write_report(result, path)
    text = path.read_text()
    assert "<img" not in text
    assert "a=1&amp;b=" in text
    # Escaped in the charts too: plotly.js draws legend text as HTML.
    for div_id in CHART_IDS:
        script = text.split(f'id="{div_id}"')[1].split("</script>")[0]
        assert "&lt;img src=x onerror=alert(1)&gt;" in script, div_id


def test_report_without_streams_successes_or_compare(tmp_path: Path) -> None:
    """A non-stream run has no TTFT; a run where everything failed has no CDF, histogram or timeline."""
    plain = copy.deepcopy(RUN_A)
    plain.update(streams=None, cdf={"e2e": RUN_A["cdf"]["e2e"]}, histogram={})
    plain["latency_ms"] = {"e2e": RUN_A["latency_ms"]["e2e"]}
    plain["rate_limited"]["retry_after_s"] = None
    failed = copy.deepcopy(plain)
    failed.update(label="B", ok=0, failed=1000, status={"connect_error": 1000}, latency_ms={}, cdf={}, timeline=[],
                  output_tokens_per_s=0.0)  # fmt: skip
    for runs, notes in (([plain], ["no TTFT"]), ([failed], ["no successful requests", "no TTFT", "no requests"])):
        result = {"tool": "sluicegate bench", "settings": {**SETTINGS, "stream": False}, "runs": runs,
                  "compare": None, "slo": [], "passed": True, "interrupted": True}  # fmt: skip
        path = tmp_path / "report.html"
        write_report(result, path)
        text = path.read_text()
        assert "Interrupted" in text
        assert "B/A" not in text
        for note in notes:
            assert note in text, note
        for div_id in CHART_IDS:
            assert f'id="{div_id}"' in text


def test_report_without_plotly_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert report_available()
    for name in {"plotly", *(name for name in sys.modules if name.startswith("plotly."))}:
        monkeypatch.setitem(sys.modules, name, None)  # a None entry makes `import` fail as if it were absent
    assert not report_available()
    with pytest.raises(ReportUnavailable, match=re.escape("pip install 'sluicegate[bench]'")):
        write_report(compare_result(), tmp_path / "report.html")
    assert not (tmp_path / "report.html").exists()


# Headless Chromium: the page draws its charts.


def chromium() -> str:
    """Debian's chromium; a skip without it, but a failure in CI, which must install it."""
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(path):
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing: .ci/run must install Debian's `chromium` package")
        pytest.skip("chromium is not installed (Debian package `chromium`)")
    return path


def run_chromium(binary: str, profile: Path, url: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=10000",
         f"--user-data-dir={profile}", *args, url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def finish(proc: subprocess.Popen[str]) -> str:
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    assert proc.returncode == 0, err[-2000:]
    return out


def chart_dom(dom: str, div_id: str) -> str:
    """The rendered DOM of one chart: from its div to the next chart's."""
    start = dom.index(f'id="{div_id}"')
    ends = [i for other in CHART_IDS if (i := dom.find(f'id="{other}"', start + 1)) > start]
    return dom[start : min(ends, default=len(dom))]


def png_summary(path: Path) -> tuple[int, int, int]:
    """Width, height and how many distinct byte values the image data holds (a blank page has a handful)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, width, height, idat = 8, 0, 0, b""
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos : pos + 4]), data[pos + 4 : pos + 8]
        chunk = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", chunk[:8])
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    return width, height, len(set(zlib.decompress(idat)))


def test_report_renders_its_charts_in_headless_chromium(tmp_path: Path) -> None:
    binary = chromium()
    path = tmp_path / "report.html"
    write_report(compare_result(), path)
    shot = tmp_path / "report.png"
    # Both at once: each is a whole browser start, and the machine has two cores.
    dumping = run_chromium(binary, tmp_path / "profile-dom", path.as_uri(), "--dump-dom")
    shooting = run_chromium(
        binary, tmp_path / "profile-shot", path.as_uri(), f"--screenshot={shot}", "--window-size=1400,2400"
    )
    dom, _ = finish(dumping), finish(shooting)

    assert dom.count('class="plot-container plotly"') == 3
    cdf, ttft, over_time = (chart_dom(dom, div_id) for div_id in CHART_IDS)
    for chart in (cdf, ttft, over_time):
        assert 'class="main-svg"' in chart
        assert "A: http://127.0.0.1:9090/v1" in chart  # the legend names both runs
        assert "B: http://127.0.0.1:8000/v1" in chart
    # Lines drawn: e2e and TTFT for each run; ok req/s and tokens/s for each run.
    assert len(re.findall(r'class="js-line" d="M[^"]+L', cdf)) == 4
    assert len(re.findall(r'class="js-line" d="M[^"]+L', over_time)) == 4
    # Five bars a run, each with a real width and height.
    bars = re.findall(r'<g class="point"><path d="M([\d.]+),([\d.]+)V([\d.]+)H([\d.]+)', ttft)
    assert len(bars) == 10
    assert all(float(x1) - float(x0) > 1 and abs(float(y1) - float(y0)) > 0.5 for x0, y0, y1, x1 in bars)
    for title in ("Latency CDF", "latency, ms (log scale)", "Time to first token", "output tokens/s"):
        assert title in dom

    width, height, byte_values = png_summary(shot)
    assert (width, height) == (1400, 2400)
    assert shot.stat().st_size > 60_000
    assert byte_values > 64
