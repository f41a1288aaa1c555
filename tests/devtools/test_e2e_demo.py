"""`sluicegate demo` and the commands a new user runs in the first hour, as real processes.

Each demo runs in a temp folder of its own (the records and the key file land there),
on free ports, counting in the tests' own Redis.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest

from proxy.request.auth import key_digest, new_key
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


def start_demo(tmp: Path, redis_url: str = "", config: Path = DEMO_CONFIG) -> Demo:
    """On free ports, in tmp: the records and the key file land there. No redis_url: the config's."""
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
    config = tmp_path / "gateway.toml"
    # With a key: a config without one gets a warning line of its own at start-up.
    config.write_text(DEMO_CONFIG.read_text() + f'\n[[keys]]\nname = "a"\nsha256 = "{key_digest(new_key())}"\n')
    args = ["serve", "--config", str(config), "--bind", f"127.0.0.1:{taken}", "--workers", workers]
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


# The demo's records and key, where the ops commands look


def banner_of(demo: Demo) -> str:
    """What the demo printed before serving: it is flushed before the port opens."""
    text = demo.proc.log.read_text()
    assert "Ctrl-C stops the demo." in text, text
    return text[text.index("sluicegate demo\n") : text.index("Ctrl-C stops the demo.")]


def printed(banner: str, start: str) -> str:
    (line,) = [line.strip() for line in banner.splitlines() if line.strip().startswith(start)]
    return line


def run_printed(line: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """A `sluicegate ...` line the banner printed, run with this checkout's package."""
    program, *args = shlex.split(line)
    assert program == "sluicegate"
    return sluicegate(*args, cwd=cwd, env=env)


def until_found(line: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Records are written a moment after the answer: ask again for a few seconds."""
    deadline = time.monotonic() + 5
    while True:
        result = run_printed(line, cwd, env)
        if result.returncode != 1 or time.monotonic() > deadline:
            return result
        time.sleep(0.1)


def test_the_banner_prints_commands_that_work_against_the_demo(tmp_path: Path, redis_server: RedisServer) -> None:
    env = {"REDIS_URL": redis_server.url.removesuffix("/0") + "/15"}
    demo = start_demo(tmp_path, env["REDIS_URL"])
    try:
        banner = banner_of(demo)
        key = printed(banner, "demo key").split()[2]
        assert printed(banner, "event records") == f"event records  {tmp_path / '.sluicegate-demo' / 'events.jsonl'}"
        curl = subprocess.run(
            printed(banner, "curl"), shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=30
        )
        assert curl.returncode == 0 and curl.stdout.rstrip().endswith("data: [DONE]"), curl
        events = until_found(printed(banner, "sluicegate events"), tmp_path, env)
        assert events.returncode == 0, events
        (record,) = [orjson.loads(line) for line in events.stdout.splitlines()]
        assert (record["request_id"], record["key_name"], record["status"]) == ("demo-hello", "demo", 200)
        usage = run_printed(printed(banner, "sluicegate keys usage"), tmp_path, env)
        assert usage.returncode == 0, usage
        row = printed(usage.stdout, "demo ")
        # Its buckets are the demo key's (rpm 60); a second later they have refilled, so no level is asserted.
        assert row.split()[:2] == ["demo", "default"] and "key rpm " in row and "/60" in row, usage.stdout
    finally:
        demo.proc.stop()
    # The key file holds the digest; the key itself is nowhere on disk.
    key_file = (tmp_path / ".sluicegate-demo" / "demo-key.toml").read_text()
    assert key_digest(key) in key_file and key not in key_file
    assert key not in (tmp_path / ".sluicegate-demo" / "events.jsonl").read_text()
    # Event lines went to the file: nothing scrolled the banner away.
    assert '"request_id"' not in demo.proc.log.read_text()


@pytest.mark.parametrize(
    ("sink", "said"),
    [
        ("stdout", 'writes event records to stdout ([events] sink = "stdout"): they are in the gateway\'s output'),
        ("off", 'writes no event records ([events] sink = "off")'),
    ],
)
def test_events_says_plainly_when_there_is_no_file_to_read(tmp_path: Path, sink: str, said: str) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(DEMO_CONFIG.read_text().replace('sink = "file"', f'sink = "{sink}"'))
    result = sluicegate("events", "--config", str(config), "--request-id", "req_1", cwd=tmp_path)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.startswith(f"{config} {said}"), result.stderr
    assert "cannot read" not in result.stderr


def test_keys_usage_without_a_demo_key_file_says_there_are_no_keys(tmp_path: Path) -> None:
    result = sluicegate("keys", "usage", "--config", str(DEMO_CONFIG), cwd=tmp_path)
    assert (result.returncode, result.stderr) == (2, f"no [[keys]] in {DEMO_CONFIG}\n")


def test_a_damaged_demo_key_file_is_named(tmp_path: Path) -> None:
    (tmp_path / ".sluicegate-demo").mkdir()
    (tmp_path / ".sluicegate-demo" / "demo-key.toml").write_text("[[keys]]\nname = 'demo'\n")
    result = sluicegate("keys", "usage", "--config", str(DEMO_CONFIG), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(".sluicegate-demo/demo-key.toml: not the file `sluicegate demo` writes")


# The demo's Redis: named in the banner, its counters apart from a gateway's


def redis_cli(port: int, *args: str, password: str | None = None) -> str:
    auth = ["-a", password, "--no-auth-warning"] if password else []
    result = subprocess.run(["redis-cli", "-p", str(port), *auth, *args], capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, result
    return result.stdout.strip()


def ask(demo: Demo, banner: str) -> None:
    key = printed(banner, "demo key").split()[2]
    body = {"model": "mock-chat", "messages": [{"role": "user", "content": "hi"}]}
    url = f"http://127.0.0.1:{demo.proc.port}/v1/chat/completions"
    assert httpx.post(url, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=10).status_code == 200


def test_the_demo_counts_in_a_database_of_its_own(tmp_path: Path) -> None:
    """The shipped config, pointed at a Redis that a gateway could be using too."""
    redis = RedisServer(free_port(), tmp_path / "redis.log").start()
    try:
        config = tmp_path / "demo.toml"
        config.write_text(DEMO_CONFIG.read_text().replace("127.0.0.1:6379/", f"127.0.0.1:{redis.port}/"))
        demo = start_demo(tmp_path, config=config)
        try:
            banner = banner_of(demo)
            url = f"redis://127.0.0.1:{redis.port}/15"
            assert printed(banner, "Redis") == f"Redis          {url} (already running; the demo counts in database 15)"
            ask(demo, banner)
        finally:
            demo.proc.stop()
        assert redis_cli(redis.port, "-n", "0", "DBSIZE") == "0"
        assert redis_cli(redis.port, "-n", "15", "KEYS", "sg:*").split()
    finally:
        redis.stop()


def test_the_demo_starts_a_redis_of_its_own_and_never_shows_its_password(tmp_path: Path) -> None:
    port = free_port()
    demo = start_demo(tmp_path, f"redis://:s3cret-pw@127.0.0.1:{port}/15")
    try:
        banner = banner_of(demo)
        started = rf"Redis +redis://:\*\*\*@127\.0\.0\.1:{port}/15 \(started for the demo, pid \d+; stops with it\)"
        assert re.fullmatch(started, printed(banner, "Redis"))
        ask(demo, banner)
        assert redis_cli(port, "-n", "0", "DBSIZE", password="s3cret-pw") == "0"
        assert redis_cli(port, "-n", "15", "KEYS", "sg:*", password="s3cret-pw").split()
    finally:
        demo.proc.stop()
    assert "s3cret-pw" not in demo.proc.log.read_text()
    # It stopped with the demo.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_a_redis_that_does_not_answer_is_named_too(tmp_path: Path) -> None:
    # TEST-NET-1: nothing answers there, and a demo does not start a Redis for another host.
    demo = start_demo(tmp_path, "redis://192.0.2.1:6379/15")
    try:
        line = printed(banner_of(demo), "Redis")
    finally:
        demo.proc.stop()
    assert line == (
        "Redis          redis://192.0.2.1:6379/15 does not answer, so limits are NOT enforced "
        "(no redis-server here to start for the demo)"
    )
