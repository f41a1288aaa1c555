"""`sluicegate bench` end to end: the real command against the mock and a real gateway on real ports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from proxy.request.auth import key_digest, new_key
from tests.conftest import Mock, Mocks, Proc, RedisServer, beta_config, start_gateway, start_mock

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Run:
    code: int
    out: str
    err: str
    result: dict[str, Any]

    @property
    def a(self) -> dict[str, Any]:
        run: dict[str, Any] = self.result["runs"][0]
        return run


def bench(tmp: Path, url: str, *args: str, timeout_s: float = 60) -> Run:
    """Runs `python -m proxy bench URL ... --json` and returns what it printed and wrote."""
    out = tmp / f"bench-{time.monotonic_ns()}.json"
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "bench", url, *args, "--json", str(out)],
        capture_output=True, text=True, timeout=timeout_s, cwd=ROOT, env={**os.environ, "SLUICEGATE_KEY": ""},
    )  # fmt: skip
    result = json.loads(out.read_text()) if out.exists() else {}
    return Run(done.returncode, done.stdout, done.stderr, result)


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mock]:
    """A mock with known delays: first byte after 200 ms, then 10 chunks 20 ms apart."""
    mock = start_mock(tmp_path_factory.mktemp("slow"), "slow", None, "--ttfb-ms", "200", "--chunks", "10",
                      "--chunk-delay-ms", "20")  # fmt: skip
    try:
        yield mock
    finally:
        mock.proc.stop()


@dataclass
class Limited:
    proc: Proc
    keys: dict[str, str]

    @property
    def v1(self) -> str:
        return f"http://127.0.0.1:{self.proc.port}/v1"


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory, mocks: Mocks, redis_server: RedisServer) -> Iterator[Limited]:
    """A gateway in front of mock-b with a free key, a key allowed 5 requests, and one refilled each second."""
    keys = {"free": new_key(), "five": new_key(), "refill": new_key(), "one": new_key()}
    limits = {"free": "", "five": "rpm = 5\nburst = 5", "refill": "rpm = 60\nburst = 2", "one": "rpm = 1\nburst = 1"}
    blocks = "".join(f'\n[[keys]]\nname = "{n}"\nsha256 = "{key_digest(k)}"\n{limits[n]}\n' for n, k in keys.items())
    config = beta_config(mocks, blocks, '[redis]\non_error = "deny"\ntimeout_s = 5')
    proc = start_gateway(tmp_path_factory.mktemp("bench-gw"), mocks, config, redis_url=redis_server.url)
    try:
        yield Limited(proc, keys)
    finally:
        proc.stop()


def test_counts_match_the_mocks_own_request_log(tmp_path: Path, mocks: Mocks) -> None:
    mocks.beta.reset()
    run = bench(tmp_path, mocks.beta.url + "/v1", "--requests", "57", "--concurrency", "5", "--quiet")
    assert run.code == 0, run.err
    assert (run.a["requests"], run.a["ok"], run.a["failed"]) == (57, 57, 0)
    log = [e for e in mocks.beta.requests() if e["path"] == "/v1/chat/completions"]
    assert len(log) == 57
    assert run.a["status"] == {"200": 57}
    # The mock counts prompt and completion tokens; the bench adds up what the answers said.
    assert run.a["output_tokens"] > 0 and run.a["input_tokens"] > 0


def test_procs_split_the_load_and_their_histograms_add_up_exactly(tmp_path: Path, mocks: Mocks) -> None:
    mocks.beta.reset()
    run = bench(tmp_path, mocks.beta.url + "/v1", "--requests", "41", "--concurrency", "4", "--procs", "2", "--stream")
    assert run.code == 0, run.err
    assert (run.a["requests"], run.a["ok"]) == (41, 41)
    assert run.a["latency_ms"]["e2e"]["count"] == 41 and run.a["latency_ms"]["ttft"]["count"] == 41
    assert len([e for e in mocks.beta.requests() if e["path"] == "/v1/chat/completions"]) == 41


def test_ttft_tpot_and_itl_match_the_mocks_delays(tmp_path: Path, slow: Mock) -> None:
    run = bench(tmp_path, slow.url + "/v1", "--stream", "--requests", "20", "--concurrency", "4", "--quiet")
    assert run.code == 0, run.err
    lat = run.a["latency_ms"]
    # 200 ms to the first byte, then 10 chunks 20 ms apart; the slack is scheduling noise.
    assert 195 <= lat["ttft"]["p50"] <= 260, lat["ttft"]
    assert 17 <= lat["itl"]["p50"] <= 30, lat["itl"]
    assert 17 <= lat["tpot"]["p50"] <= 30, lat["tpot"]
    assert 195 + 9 * 17 <= lat["e2e"]["p50"] <= 200 + 9 * 30 + 60, lat["e2e"]
    assert run.a["streams"] == {"count": 20, "done": 20}
    assert "time to first token" in run.out and "inter-token latency" in run.out


def test_a_failing_slo_exits_1_and_a_met_one_exits_0(tmp_path: Path, slow: Mock) -> None:
    failing = bench(tmp_path, slow.url + "/v1", "--stream", "--requests", "4", "--slo", "ttft:50", "e2e:5000")
    assert failing.code == 1
    assert "SLO ttft p99 <= 50 ms on A" in failing.out and "FAILED" in failing.out
    assert [s["passed"] for s in failing.result["slo"]] == [False, True]
    assert failing.a["goodput"] == 0.0
    met = bench(tmp_path, slow.url + "/v1", "--stream", "--requests", "4", "--slo", "ttft:5000")
    assert met.code == 0, met.out
    assert met.a["goodput"] == 1.0


def test_429s_are_counted_with_the_limits_the_gateway_announced(tmp_path: Path, limited: Limited) -> None:
    run = bench(tmp_path, limited.v1, "--key", limited.keys["five"], "--requests", "12", "--concurrency", "3")
    assert run.code == 0, run.err  # some succeeded and no SLO was set
    assert run.a["status"] == {"200": 5, "429": 7}
    assert run.a["rate_limited"]["count"] == 7
    assert run.a["rate_limited"]["retry_after_s"]["min"] > 0
    assert run.a["rate_limited"]["headers"]["x-ratelimit-limit-requests"] == "5"
    assert set(run.a["error_codes"]) == {"429 rate_limit_exceeded"}
    assert "429:7" in run.out and "x-ratelimit-limit-requests=5" in run.out
    assert limited.keys["five"] not in run.out + run.err + json.dumps(run.result)


def test_respect_retry_after_waits_and_retries_like_the_sdk(tmp_path: Path, limited: Limited) -> None:
    run = bench(tmp_path, limited.v1, "--key", limited.keys["refill"], "--requests", "4", "--concurrency", "4",
                "--respect-retry-after")  # fmt: skip
    assert run.code == 0, run.err
    assert run.a["status"] == {"200": 4}  # two at once, then one a second as the bucket refills
    assert run.a["rate_limited"]["retried"] >= 2
    assert run.a["latency_ms"]["e2e"]["max"] >= 900  # the last one waited for the bucket


def test_a_429_whose_retry_would_outlast_the_run_is_counted_not_lost(tmp_path: Path, limited: Limited) -> None:
    run = bench(tmp_path, limited.v1, "--key", limited.keys["one"], "--duration", "1", "--concurrency", "2",
                "--respect-retry-after")  # fmt: skip
    assert run.code == 0, run.err
    assert run.a["status"]["200"] == 1 and run.a["status"]["429"] >= 1  # retry-after ~60 s: no retry fits
    assert run.a["requests"] == run.a["ok"] + run.a["failed"] == sum(run.a["status"].values())
    assert run.a["rate_limited"]["retried"] == 0


def test_compare_prints_both_targets_and_the_ratio(tmp_path: Path, mocks: Mocks, limited: Limited) -> None:
    run = bench(tmp_path, mocks.beta.url + "/v1", "--compare", limited.v1, "--compare-key", limited.keys["free"],
                "--stream", "--requests", "40", "--concurrency", "4", "--rounds", "4")  # fmt: skip
    assert run.code == 0, run.err
    a, b = run.result["runs"]
    assert (a["label"], b["label"], a["ok"], b["ok"]) == ("A", "B", 40, 40)
    assert run.result["compare"]["req_per_s"] == pytest.approx(b["req_per_s"] / a["req_per_s"])
    assert run.result["compare"]["ttft_p50"] == pytest.approx(
        b["latency_ms"]["ttft"]["p50"] / a["latency_ms"]["ttft"]["p50"]
    )
    head = run.out.splitlines()[0]
    assert mocks.beta.url in head and limited.v1 in head and "B/A" in head
    assert limited.keys["free"] not in run.out + run.err + json.dumps(run.result)


def test_open_loop_starts_requests_on_schedule(tmp_path: Path, mocks: Mocks) -> None:
    started = time.monotonic()
    run = bench(tmp_path, mocks.beta.url + "/v1", "--rate", "40", "--arrivals", "constant", "--requests", "30")
    assert run.code == 0, run.err
    assert run.a["ok"] == 30
    assert 0.7 <= run.a["elapsed_s"] <= 5, run.a["elapsed_s"]  # 30 starts 25 ms apart
    assert time.monotonic() - started < 30


def test_completions_and_embeddings(tmp_path: Path, mocks: Mocks) -> None:
    for endpoint, model in (("completions", "mock-chat"), ("embeddings", "mock-embed")):
        mocks.beta.reset()
        run = bench(tmp_path, mocks.beta.url + "/v1", "--endpoint", endpoint, "--model", model, "--requests", "6")
        assert run.code == 0, run.err
        assert run.a["ok"] == 6
        paths = {e["path"] for e in mocks.beta.requests()}
        assert paths == {f"/v1/{endpoint}"}


def test_prompts_come_from_a_jsonl_file(tmp_path: Path, mocks: Mocks) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"messages": [{"role": "user", "content": "first prompt"}]}\n{"prompt": "second prompt"}\n')
    mocks.beta.reset()
    run = bench(tmp_path, mocks.beta.url + "/v1", "--prompts", str(prompts), "--requests", "4", "--concurrency", "1")
    assert run.code == 0, run.err
    sent = [e["body"]["messages"][0]["content"] for e in mocks.beta.requests()]
    assert sent == ["first prompt", "second prompt", "first prompt", "second prompt"]
    prompts.write_text('{"messages": [{"role": "user", "content": "ok"}]}\nnot json\n')
    bad = bench(tmp_path, mocks.beta.url + "/v1", "--prompts", str(prompts), "--requests", "1")
    assert bad.code == 2 and f"{prompts}:2: not JSON" in bad.err


def test_an_unreachable_url_says_so_and_exits_1(tmp_path: Path) -> None:
    run = bench(tmp_path, "http://127.0.0.1:9/v1", "--requests", "3")
    assert run.code == 1
    assert run.a["status"] == {"connect_error": 3}
    assert "no request succeeded" in run.err


def test_ctrl_c_prints_what_was_measured_so_far(tmp_path: Path, slow: Mock) -> None:
    out = tmp_path / "interrupted.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "bench", slow.url + "/v1", "--stream", "--duration", "60", "--json", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=15)
    assert proc.returncode == 0, stderr
    result = json.loads(out.read_text())
    assert result["interrupted"] is True
    assert result["runs"][0]["ok"] > 0
    assert "interrupted" in stdout and "Traceback" not in stderr


def test_chosen_percentiles_reach_the_table_and_the_json(tmp_path: Path, mocks: Mocks) -> None:
    run = bench(tmp_path, mocks.beta.url + "/v1", "--requests", "20", "--percentiles", "75,99.9,50")
    assert run.code == 0, run.err
    e2e = run.a["latency_ms"]["e2e"]
    assert {"p50", "p75", "p90", "p95", "p99", "p99.9", "mean", "std", "min", "max"} <= set(e2e)
    rows = [line.split()[0] for line in run.out.splitlines()[1:] if line.startswith("  ")]
    assert rows == ["mean", "median", "p75", "p99.9", "max"]
    bad = bench(tmp_path, mocks.beta.url + "/v1", "--requests", "1", "--percentiles", "50,100")
    assert bad.code == 2 and "expected percentiles between 0 and 100" in bad.err


def test_bench_without_its_extra_says_how_to_install_it() -> None:
    """hdrhistogram and tqdm come with `sluicegate[bench]`, not with the gateway: missing, they are named."""
    hidden = "import sys; sys.modules['hdrh'] = sys.modules['hdrh.histogram'] = None"
    code = f"{hidden}; from proxy.cli import main; sys.exit(main())"
    done = subprocess.run(
        [sys.executable, "-c", code, "bench", "http://127.0.0.1:9/v1", "--requests", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip() == (
        "sluicegate bench needs its extra (hdrh.histogram is missing): pip install 'sluicegate[bench]'"
    )
