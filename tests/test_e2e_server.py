"""The serve command as a process: SIGHUP reload, --workers, SIGTERM drain with its delay."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import orjson
import pytest

from proxy.request.auth import key_digest, new_key
from tests.conftest import Mocks, Proc, beta_config, free_port, start_gateway, wait_for_port

CHAT = {"model": "mock-chat", "messages": [{"role": "user", "content": "hi"}]}


def config_text(mocks: Mocks, *keys: str) -> str:
    blocks = "".join(f'\n[[keys]]\nname = "k{i}"\nsha256 = "{key_digest(k)}"\n' for i, k in enumerate(keys))
    # No delay: these tests are about what SIGTERM finishes; test_drain_sequence is about the delay.
    return "[server]\ndrain_delay_s = 0\n" + beta_config(mocks, blocks)


def chat(proc: Proc, key: str, **kw: object) -> httpx.Response:
    url = f"http://127.0.0.1:{proc.port}/v1/chat/completions"
    return httpx.post(url, json=CHAT, headers={"Authorization": f"Bearer {key}"}, timeout=10, **kw)  # type: ignore[arg-type]


def wait_until(check: object, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def test_sighup_reloads_keys_and_keeps_old_config_when_broken(tmp_path: Path, mocks: Mocks) -> None:
    first, second = new_key(), new_key()
    proc = start_gateway(tmp_path, mocks, config_text(mocks, first))
    try:
        assert chat(proc, first).status_code == 200
        assert chat(proc, second).status_code == 401
        (tmp_path / "gateway.toml").write_text(config_text(mocks, first, second))
        proc.signal(signal.SIGHUP)
        wait_until(lambda: chat(proc, second).status_code == 200)
        (tmp_path / "gateway.toml").write_text("[[providers]]\nname = 'x y'\n")
        proc.signal(signal.SIGHUP)
        wait_until(lambda: "config reload rejected" in proc.log.read_text())
        assert "providers[0].name" in proc.log.read_text()
        assert chat(proc, second).status_code == 200
    finally:
        proc.stop()


def test_in_flight_stream_finishes_on_sigterm(tmp_path: Path, mocks: Mocks) -> None:
    key = new_key()
    proc = start_gateway(tmp_path, mocks, config_text(mocks, key))
    url = f"http://127.0.0.1:{proc.port}/v1/chat/completions"
    body = {**CHAT, "stream": True}
    headers = {"Authorization": f"Bearer {key}", "x-mock-chunks": "20", "x-mock-chunk-delay-ms": "50"}
    try:
        with httpx.stream("POST", url, json=body, headers=headers, timeout=10) as resp:
            stream = resp.iter_raw()
            first = next(stream)
            proc.signal(signal.SIGTERM)
            rest = b"".join(stream)
        assert first.startswith(b"data: ")  # SIGTERM went out while the stream was under way
        assert (first + rest).count(b"tok") == 20
        assert (first + rest).endswith(b"data: [DONE]\n\n")
        assert proc.proc is not None
        assert proc.proc.wait(timeout=10) == 0
    finally:
        proc.stop()


@pytest.mark.parametrize("workers", [2])
def test_workers_serve_and_stop(tmp_path: Path, mocks: Mocks, workers: int) -> None:
    key, added = new_key(), new_key()
    proc = start_gateway(tmp_path, mocks, config_text(mocks, key), "--workers", str(workers))
    try:
        assert [chat(proc, key).status_code for _ in range(20)] == [200] * 20
        # SIGHUP to the parent reaches every worker.
        (tmp_path / "gateway.toml").write_text(config_text(mocks, key, added))
        proc.signal(signal.SIGHUP)
        wait_until(lambda: proc.log.read_text().count("config reloaded") == workers)
        assert [chat(proc, added).status_code for _ in range(20)] == [200] * 20
        proc.signal(signal.SIGTERM)
        assert proc.proc is not None
        assert proc.proc.wait(timeout=15) == 0
    finally:
        proc.stop()


def worker_pids(proc: Proc) -> list[int]:
    assert proc.proc is not None
    out = subprocess.run(["pgrep", "-P", str(proc.proc.pid), "-f", "spawn_main"], capture_output=True, text=True)
    return [int(pid) for pid in out.stdout.split()]


def test_a_worker_that_dies_takes_the_gateway_down(tmp_path: Path, mocks: Mocks) -> None:
    key = new_key()
    proc = start_gateway(tmp_path, mocks, config_text(mocks, key), "--workers", "2")
    try:
        wait_until(lambda: len(worker_pids(proc)) == 2)
        os.kill(worker_pids(proc)[0], signal.SIGKILL)
        assert proc.proc is not None
        assert proc.proc.wait(timeout=15) != 0  # so a supervisor restarts a whole gateway
        assert "exited with code" in proc.log.read_text()
    finally:
        proc.stop()


def test_sighup_while_workers_start_kills_nothing(tmp_path: Path, mocks: Mocks) -> None:
    key = new_key()
    config = tmp_path / "gateway.toml"
    config.write_text(config_text(mocks, key))
    port = free_port()
    proc = Proc(
        ["serve", "--config", str(config), "--bind", f"127.0.0.1:{port}", "--workers", "2"], port, tmp_path / "log"
    )
    with proc.log.open("ab") as out:
        proc.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", *proc.args], stdout=out, stderr=subprocess.STDOUT, cwd=Path.cwd()
        )
    try:
        # From the moment the workers exist until well after they serve: a reload at boot.
        wait_until(lambda: len(worker_pids(proc)) == 2)
        for _ in range(20):
            proc.signal(signal.SIGHUP)
            time.sleep(0.05)
        wait_for_port(port, proc.proc, proc.log)
        assert [chat(proc, key).status_code for _ in range(10)] == [200] * 10
        assert proc.proc.poll() is None
        wait_until(lambda: len(worker_pids(proc)) == 2)
    finally:
        proc.stop()


def test_sigterm_while_workers_start_is_a_clean_stop(tmp_path: Path, mocks: Mocks) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(config_text(mocks, new_key()))
    port = free_port()
    proc = Proc(
        ["serve", "--config", str(config), "--bind", f"127.0.0.1:{port}", "--workers", "2"], port, tmp_path / "log"
    )
    with proc.log.open("ab") as out:
        proc.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", *proc.args], stdout=out, stderr=subprocess.STDOUT, cwd=Path.cwd()
        )
    try:
        # The workers exist but are still importing: no signal handler of theirs yet.
        wait_until(lambda: len(worker_pids(proc)) == 2)
        proc.signal(signal.SIGTERM)
        assert proc.proc.wait(timeout=15) == 0  # systemd must not see a failed stop
    finally:
        proc.stop()


DRAIN_DELAY_S = 2.0


def drain_config(mocks: Mocks, key: str, events: Path, delay_s: float = DRAIN_DELAY_S) -> str:
    return f"""
[server]
drain_delay_s = {delay_s}
graceful_timeout_s = 10

[events]
sink = "file"
path = "{events}"

[[providers]]
name = "beta"
base_url = "{mocks.beta.url}/v1"
models = ["mock-chat"]

[[keys]]
name = "k"
sha256 = "{key_digest(key)}"
"""


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.parametrize("workers", [1, 2])
def test_drain_sequence(tmp_path: Path, mocks: Mocks, workers: int) -> None:
    key = new_key()
    events = tmp_path / "events.jsonl"
    proc = start_gateway(tmp_path, mocks, drain_config(mocks, key, events), "--workers", str(workers))
    base = f"http://127.0.0.1:{proc.port}"
    auth = {"Authorization": f"Bearer {key}"}
    stream: dict[str, object] = {}

    def long_stream() -> None:
        # 40 chunks 100 ms apart: under way at SIGTERM, still going after the listener closed.
        headers = {**auth, "X-Request-ID": "drain-stream", "x-mock-chunks": "40", "x-mock-chunk-delay-ms": "100"}
        with httpx.stream("POST", base + "/v1/chat/completions", json={**CHAT, "stream": True}, headers=headers) as r:
            chunks = r.iter_raw()
            stream["first"] = next(chunks)
            stream["body"] = stream["first"] + b"".join(chunks)  # type: ignore[operator]
            stream["ended"] = time.monotonic()

    try:
        wait_until(lambda: proc.log.read_text().count("serving on") == workers)
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(long_stream)
            wait_until(lambda: "first" in stream or running.done())
            t0 = time.monotonic()
            proc.signal(signal.SIGTERM)
            # At once: /readyz says draining, through the shared socket whichever worker answers.
            wait_until(lambda: httpx.get(base + "/readyz").status_code == 503, timeout_s=1.0)
            readyz = [httpx.get(base + "/readyz") for _ in range(6)]
            assert {r.status_code for r in readyz} == {503}
            assert readyz[0].json() == {"status": "unavailable", "reason": "draining"}
            assert time.monotonic() - t0 < 1.0
            # Requests are still served during the delay.
            time.sleep(max(0.0, t0 + 0.5 - time.monotonic()))
            served = httpx.post(base + "/v1/chat/completions", json=CHAT, headers={**auth, "X-Request-ID": "drain-new"})
            assert served.status_code == 200
            assert served.headers["connection"] == "close"
            assert time.monotonic() - t0 < DRAIN_DELAY_S
            # After the delay: the listener is closed.
            time.sleep(max(0.0, t0 + DRAIN_DELAY_S + 0.5 - time.monotonic()))
            assert refused(proc.port)
            running.result(timeout=15)
        body = stream["body"]
        assert isinstance(body, bytes)
        assert body.count(b"tok") == 40 and body.endswith(b"data: [DONE]\n\n")
        assert stream["ended"] > t0 + DRAIN_DELAY_S  # type: ignore[operator]
        assert proc.proc is not None
        assert proc.proc.wait(timeout=15) == 0
        records = {orjson.loads(line)["request_id"]: orjson.loads(line) for line in events.read_bytes().splitlines()}
        assert records["drain-stream"]["status"] == 200
        assert records["drain-new"]["status"] == 200
    finally:
        proc.stop()


@pytest.mark.parametrize(
    "signals", [(signal.SIGTERM, signal.SIGTERM), (signal.SIGINT,)], ids=["sigterm-twice", "sigint"]
)
def test_a_second_sigterm_or_sigint_skips_the_delay(tmp_path: Path, mocks: Mocks, signals: tuple[int, ...]) -> None:
    key = new_key()
    proc = start_gateway(tmp_path, mocks, drain_config(mocks, key, tmp_path / "events.jsonl", delay_s=60))
    base = f"http://127.0.0.1:{proc.port}"
    try:
        proc.signal(signal.SIGTERM if len(signals) == 2 else signals[0])
        if len(signals) == 2:
            wait_until(lambda: httpx.get(base + "/readyz").status_code == 503, timeout_s=2.0)
            proc.signal(signals[1])
        assert proc.proc is not None
        assert proc.proc.wait(timeout=5) == 0
        assert refused(proc.port)
    finally:
        proc.stop()


def test_a_stream_cut_at_the_graceful_timeout_still_leaves_its_record(tmp_path: Path, mocks: Mocks) -> None:
    key = new_key()
    events = tmp_path / "events.jsonl"
    config = drain_config(mocks, key, events, delay_s=0).replace("graceful_timeout_s = 10", "graceful_timeout_s = 1")
    proc = start_gateway(tmp_path, mocks, config)
    url = f"http://127.0.0.1:{proc.port}/v1/chat/completions"
    headers = {"Authorization": f"Bearer {key}", "X-Request-ID": "cut-stream", "x-mock-chunks": "100"}
    try:
        with httpx.stream(
            "POST", url, json={**CHAT, "stream": True}, headers={**headers, "x-mock-chunk-delay-ms": "100"}
        ) as r:
            chunks = r.iter_raw()
            next(chunks)
            proc.signal(signal.SIGTERM)
            with pytest.raises(httpx.RemoteProtocolError):
                for _ in chunks:  # cut short once graceful_timeout_s is over
                    pass
        assert proc.proc is not None
        assert proc.proc.wait(timeout=10) == 0
        (record,) = [orjson.loads(line) for line in events.read_bytes().splitlines()]
        assert record["request_id"] == "cut-stream"
        assert record["status"] == 200
    finally:
        proc.stop()
