"""`sluicegate demo` and the commands a new user runs in the first hour, as real processes.

Each demo runs in a temp folder of its own (the records and the key file land there),
on free ports, counting in the tests' own Redis.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT, Proc, RedisServer, free_port

DEMO_CONFIG = ROOT / "config" / "demo.toml"
COMMAND_TIMEOUT_S = 30


def sluicegate(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """A command run to its end, as a user types it, with this checkout's package."""
    clean = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "SLUICEGATE_CONFIG", "SLUICEGATE_BIND")}
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=cwd,
        env={**clean, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
    )


@dataclass
class Demo:
    proc: Proc
    mock_port: int


def start_demo(tmp: Path, redis_url: str, config: Path = DEMO_CONFIG) -> Demo:
    """On free ports, in tmp: the records and the key file land there."""
    port, mock_port = free_port(), free_port()
    args = ["demo", "--config", str(config), "--bind", f"127.0.0.1:{port}", "--mock-bind", f"127.0.0.1:{mock_port}"]
    env = {"PYTHONPATH": str(ROOT), "REDIS_URL": redis_url}
    return Demo(Proc(args, port, tmp / "demo.log", env, cwd=tmp).start(), mock_port)


@pytest.fixture
def taken() -> Iterator[int]:
    """A port another process listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def in_use(command: str, port: int, option: str = "--bind") -> str:
    return (
        f"sluicegate {command}: 127.0.0.1:{port} is already in use: stop the process that holds it, "
        f"or choose another address with {option} HOST:PORT\n"
    )


# A busy port: one line, exit 2


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_on_a_taken_port_says_so_in_one_line(tmp_path: Path, taken: int, workers: str) -> None:
    args = ["serve", "--config", str(DEMO_CONFIG), "--bind", f"127.0.0.1:{taken}", "--workers", workers]
    result = sluicegate(*args, cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (2, "", in_use("serve", taken))


def test_mock_upstream_on_a_taken_port_says_so_in_one_line(tmp_path: Path, taken: int) -> None:
    result = sluicegate("mock-upstream", "--bind", f"127.0.0.1:{taken}", cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (2, "", in_use("mock-upstream", taken))


def test_a_second_demo_says_which_port_is_taken(tmp_path: Path, redis_server: RedisServer) -> None:
    redis_url = redis_server.url.removesuffix("/0") + "/15"
    first = start_demo(tmp_path, redis_url)
    try:
        env = {"REDIS_URL": redis_url}
        same = ["demo", "--config", str(DEMO_CONFIG), "--mock-bind", f"127.0.0.1:{first.mock_port}"]
        twice = sluicegate(*same, "--bind", f"127.0.0.1:{first.proc.port}", cwd=tmp_path, env=env)
        assert (twice.returncode, twice.stdout, twice.stderr) == (2, "", in_use("demo", first.proc.port))
        # Moved off the gateway's port, it meets the mock's next.
        moved = sluicegate(*same, "--bind", f"127.0.0.1:{free_port()}", cwd=tmp_path, env=env)
        in_use_mock = in_use("demo", first.mock_port, "--mock-bind")
        assert (moved.returncode, moved.stdout, moved.stderr) == (2, "", in_use_mock)
        assert first.proc.proc is not None and first.proc.proc.poll() is None
    finally:
        first.proc.stop()
    assert "Traceback" not in first.proc.log.read_text()
