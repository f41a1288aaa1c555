"""The README's code as a reader copies it: the quick start runs against a real demo, Python snippets are formatted.

The quick start's shell commands run in bash from a folder of their own, with `sluicegate`
on PATH meaning this checkout; only the demo's ports and its printed key are put in place
of the README's 9090 and sk-... placeholders.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from tests.conftest import ROOT, Proc, RedisServer, free_port

README = (ROOT / "README.md").read_text()
FENCE = re.compile(r"^```(\w+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
# Installing and the test suite itself: the package is installed already and pytest is running.
NOT_RUN = {"python3 -m pip install -e .", "python3 -m pip install -e '.[test]'", "python3 -m pytest"}
COMMAND_TIMEOUT_S = 30


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else len(README)]


def blocks(text: str, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(text) if lang == language]


def shell_commands(block: str) -> list[str]:
    """One command a line (continuations joined), split at '&&'."""
    joined = block.replace("\\\n", " ")
    return [part.strip() for line in joined.splitlines() if line.strip() for part in line.split(" && ")]


@pytest.mark.parametrize("index", range(len(blocks(README, "python"))))
def test_every_python_snippet_is_ruff_formatted(index: int) -> None:
    snippet = blocks(README, "python")[index]
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", "--stdin-filename", "snippet.py", "-"],
        input=snippet, cwd=ROOT, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S,
    )  # fmt: skip
    assert result.returncode == 0, f"{snippet}\n{result.stdout}{result.stderr}"


def run(command: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """In bash; `events` is asked again for a few seconds, as the record is written just after the answer."""
    deadline = time.monotonic() + 5
    while True:
        result = subprocess.run(
            ["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S
        )
        if result.returncode != 1 or not command.startswith("sluicegate events") or time.monotonic() > deadline:
            return result
        time.sleep(0.1)


def test_the_quick_start_runs_against_the_demo(tmp_path: Path, redis_server: RedisServer) -> None:
    quick = section("Quick start")
    commands = [c for block in blocks(quick, "sh") for c in shell_commands(block)]
    skipped = [c for c in commands if c in NOT_RUN]
    assert len(skipped) == len(NOT_RUN), commands
    assert "sluicegate demo" in commands
    to_run = [c for c in commands if c not in skipped and c != "sluicegate demo"]
    assert len(to_run) >= 3, to_run  # curl, events, keys usage

    # `sluicegate` as the README's install would put it on PATH, but this checkout's.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sluicegate").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m proxy "$@"\n')
    (bin_dir / "sluicegate").chmod(0o755)
    shutil.copytree(ROOT / "config", tmp_path / "config")
    port, mock_port = free_port(), free_port()
    redis_url = redis_server.url.removesuffix("/0") + "/15"
    env = {"PYTHONPATH": str(ROOT), "REDIS_URL": redis_url, "PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin"}
    args = ["demo", "--bind", f"127.0.0.1:{port}", "--mock-bind", f"127.0.0.1:{mock_port}"]
    demo = Proc(args, port, tmp_path / "demo.log", env, cwd=tmp_path).start()
    try:
        key = re.search(r"demo key +(sk-\S+)", demo.log.read_text())
        assert key is not None, demo.log.read_text()

        def placed(text: str) -> str:
            return text.replace("127.0.0.1:9090", f"127.0.0.1:{port}").replace("sk-...", key.group(1))

        outputs = {}
        for command in to_run:
            result = run(placed(command), tmp_path, env)
            assert result.returncode == 0, f"{command}\n{result.stdout}{result.stderr}"
            outputs[" ".join(command.split()[:2])] = result.stdout
        (snippet,) = blocks(quick, "python")
        (tmp_path / "snippet.py").write_text(placed(snippet))
        python = subprocess.run(
            [sys.executable, "snippet.py"], cwd=tmp_path, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S
        )
        assert python.returncode == 0, python.stderr
    finally:
        demo.stop()
    assert outputs["curl -sN"].rstrip().endswith("data: [DONE]")
    (record,) = [orjson.loads(line) for line in outputs["sluicegate events"].splitlines()]
    assert (record["request_id"], record["key_name"], record["status"]) == ("demo-hello", "demo", 200)
    assert outputs["sluicegate keys"].splitlines()[1].startswith("demo ")
    # The mock's answer: its tokens, streamed, printed one after another.
    assert "tok0" in python.stdout and python.stdout.count("tok") == 8, python.stdout
