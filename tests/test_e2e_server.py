"""The serve command as a process: SIGHUP reload, --workers, SIGTERM drain."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from proxy.auth import key_digest, new_key
from tests.conftest import Mocks, Proc, beta_config, free_port, start_gateway, wait_for_port

CHAT = {"model": "mock-chat", "messages": [{"role": "user", "content": "hi"}]}


def config_text(mocks: Mocks, *keys: str) -> str:
    blocks = "".join(f'\n[[keys]]\nname = "k{i}"\nsha256 = "{key_digest(k)}"\n' for i, k in enumerate(keys))
    return beta_config(mocks, blocks)


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
