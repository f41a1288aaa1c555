from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.cli import build_parser, keys_new, main
from proxy.config.settings import load_settings
from proxy.request.auth import authenticate
from tests.conftest import ROOT

NOTE = "# Give the key above to its user; it is not stored anywhere.\n# Add this block to the config:"

GOOD = """
[[providers]]
name = "mock"
base_url = "http://127.0.0.1:8001/v1"
models = ["mock-chat", "mock-*"]

[groups.gold]
rpm = 600

[[keys]]
name = "alice"
sha256 = "{digest}"
group = "gold"
"""

BAD = """
[server]
bind = "localhost"

[redis]
on_error = "ignore"

[[providers]]
name = "mock"
base_url = "127.0.0.1:8001"
models = []
weight = 0

[[keys]]
name = "alice"
sha256 = "nothex"
group = "silver"
"""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SLUICEGATE_CONFIG", "SLUICEGATE_BIND", "REDIS_URL", "SLUICEGATE_TEST_UPSTREAM_KEY"):
        monkeypatch.delenv(name, raising=False)


def run_keys_new(*argv: str) -> tuple[str, dict[str, object], str]:
    """The printed key, the parsed [[keys]] table, and the whole output."""
    output = keys_new(build_parser().parse_args(["keys", "new", *argv]))
    key, rest = output.split("\n", 1)
    (table,) = tomllib.loads(rest)["keys"]
    return key, table, output


def test_keys_new_minimal() -> None:
    key, table, output = run_keys_new("--name", "alice")
    assert re.fullmatch(r"sk-[A-Za-z0-9_-]{48}", key)
    assert table == {"name": "alice", "sha256": hashlib.sha256(key.encode()).hexdigest()}
    assert output == f'{key}\n\n{NOTE}\n[[keys]]\nname = "alice"\nsha256 = "{table["sha256"]}"\n'
    assert output.count(key) == 1


def test_keys_new_is_fresh_each_time() -> None:
    first, _, _ = run_keys_new("--name", "alice")
    second, _, _ = run_keys_new("--name", "alice")
    assert first != second


def test_keys_new_every_option() -> None:
    key, table, output = run_keys_new(
        "--name", "bob", "--group", "gold", "--rpm", "60", "--tpm", "100000", "--budget-tokens", "5000000",
        "--models", "deepseek-chat, gpt-4o-mini,,deepseek-* ,",
    )  # fmt: skip
    assert table == {
        "name": "bob",
        "sha256": hashlib.sha256(key.encode()).hexdigest(),
        "group": "gold",
        "rpm": 60,
        "tpm": 100000,
        "budget_tokens": 5000000,
        "models": ["deepseek-chat", "gpt-4o-mini", "deepseek-*"],
    }
    assert list(table) == ["name", "sha256", "group", "rpm", "tpm", "budget_tokens", "models"]
    assert output.count(key) == 1


@pytest.mark.parametrize(
    ("option", "value", "field", "parsed"),
    [
        ("--group", "gold", "group", "gold"),
        ("--rpm", "1", "rpm", 1),
        ("--tpm", "2500", "tpm", 2500),
        ("--budget-tokens", "7", "budget_tokens", 7),
        ("--models", "mock-chat", "models", ["mock-chat"]),
    ],
)
def test_keys_new_optional_fields_appear_only_when_given(option: str, value: str, field: str, parsed: object) -> None:
    key, table, _ = run_keys_new("--name", "carol", option, value)
    assert table == {"name": "carol", "sha256": hashlib.sha256(key.encode()).hexdigest(), field: parsed}


@pytest.mark.parametrize("option", ["--rpm", "--tpm", "--budget-tokens"])
def test_keys_new_refuses_numbers_below_one(option: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["keys", "new", "--name", "alice", option, "0"])
    assert info.value.code == 2
    assert "expected a whole number >= 1, got '0'" in capsys.readouterr().err


def test_keys_new_block_loads_and_authenticates(tmp_path: Path) -> None:
    key, _, output = run_keys_new("--name", "dave", "--group", "gold", "--models", "mock-chat")
    path = tmp_path / "gateway.toml"
    path.write_text(GOOD.format(digest="0" * 64) + "\n" + output.split("\n", 1)[1], encoding="utf-8")
    settings = load_settings(str(path), env={})
    found = authenticate(key, settings.keys)
    assert (found.name, found.group) == ("dave", "gold")
    assert found.models is not None and found.models.exact == frozenset({"mock-chat"})


def test_main_keys_new_prints_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "new", "--name", "erin"]) == 0
    captured = capsys.readouterr()
    key = captured.out.split("\n", 1)[0]
    assert re.fullmatch(r"sk-[A-Za-z0-9_-]{48}", key)
    assert f'sha256 = "{hashlib.sha256(key.encode()).hexdigest()}"' in captured.out
    assert captured.err == ""


def test_check_config_good_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(GOOD.format(digest="ab" * 32), encoding="utf-8")
    assert main(["check-config", "--config", str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{path}: ok (1 provider, 1 key)\n"
    assert captured.err == ""


def test_check_config_reports_warnings_and_still_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "gateway.toml"
    with_env = 'api_key_env = "SLUICEGATE_TEST_UPSTREAM_KEY"\nmodels = ["mock-chat"'
    text = GOOD.format(digest="ab" * 32).replace('models = ["mock-chat"', with_env)
    path.write_text(text, encoding="utf-8")
    assert main(["check-config", "--config", str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{path}: ok (1 provider, 1 key)\n"
    assert captured.err == (
        f"warning: {path}:5: providers[0].api_key_env: environment variable SLUICEGATE_TEST_UPSTREAM_KEY is not set\n"
    )


def test_check_config_uses_sluicegate_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "from-env.toml"
    path.write_text(GOOD.format(digest="ab" * 32), encoding="utf-8")
    monkeypatch.setenv("SLUICEGATE_CONFIG", str(path))
    assert main(["check-config"]) == 0
    assert capsys.readouterr().out == f"{path}: ok (1 provider, 1 key)\n"


def test_check_config_bad_file_lists_every_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(BAD, encoding="utf-8")
    assert main(["check-config", "--config", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        f"{path}:3: server.bind: expected HOST:PORT, got 'localhost'",
        f"{path}:6: redis.on_error: expected one of allow, deny, got 'ignore'",
        f"{path}:10: providers[0].base_url: expected an http:// or https:// URL",
        f"{path}:11: providers[0].models: expected a non-empty list of model names or globs",
        f"{path}:12: providers[0].weight: must be > 0",
        f"{path}:16: keys[0].sha256: expected 64 hex characters (sha256 of the full key)",
        f"{path}:17: keys[0].group: no [groups.silver] table",
    ]


def test_check_config_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "missing.toml"
    assert main(["check-config", "--config", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"{path}: cannot read the file (No such file or directory)\n"
    assert captured.out == ""


def test_check_config_invalid_toml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text("[[providers]\n", encoding="utf-8")
    assert main(["check-config", "--config", str(path)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"{path}: not valid TOML (")


def test_check_config_honours_env_overrides(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(GOOD.format(digest="ab" * 32), encoding="utf-8")
    monkeypatch.setenv("SLUICEGATE_BIND", "nope")
    assert main(["check-config", "--config", str(path)]) == 2
    assert capsys.readouterr().err == "SLUICEGATE_BIND: expected HOST:PORT, got 'nope'\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["keys", "new", "--name", "bad name"], "--name: expected 1-64"),
        (["keys", "new", "--name", "ok", "--group", "a{b}"], "--group: expected 1-64"),
        (["keys", "new", "--name", "ok", "--models", 'a"b'], "--models: model names cannot contain"),
    ],
)
def test_keys_new_refuses_what_the_config_would_reject(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert message in captured.err


ROUGH = """
[server]
bind = "127.0.0.1:9090"

[[providers]]
name = "mock"
base_ur = "http://127.0.0.1:8001/v1"
models = ["mock-*"]
weight = "1"

[[providers]]
name = "other"
base_url = "http://127.0.0.1:8002/v1"
models = ["other-chat"]

[aliases]
"gpt-4o" = "nobody-serves-this"

[groups.gold]
rmp = 600

[[keys]]
name = "alice"
sha256 = "{digest}"
models = ["mock-chat", "deepseek-chat"]
"""


def test_check_config_names_the_line_and_guesses_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(ROUGH.format(digest="ab" * 32), encoding="utf-8")
    assert main(["check-config", "--config", str(path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"{path}:20: groups.gold.rmp: unknown key (did you mean rpm?)",
        f"{path}:7: providers[0].base_ur: unknown key (did you mean base_url?)",
        f"{path}:5: providers[0].base_url: missing; every provider needs one, "
        'e.g. base_url = "https://api.deepseek.com/v1"',
        f"{path}:9: providers[0].weight: expected a number, got the quoted string '1' (write it without quotes)",
    ]


def test_check_config_warns_of_models_nobody_serves_and_of_no_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "gateway.toml"
    fixed = ROUGH.replace("base_ur =", "base_url =").replace('weight = "1"', "weight = 1").replace("rmp", "rpm")
    path.write_text(fixed.format(digest="ab" * 32), encoding="utf-8")
    assert main(["check-config", "--config", str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{path}: ok (2 providers, 1 key)\n"
    assert captured.err.splitlines() == [
        f"warning: {path}:17: aliases.gpt-4o: no provider serves its target 'nobody-serves-this'",
        f"warning: {path}:25: keys[0].models: no provider serves 'deepseek-chat'",
    ]
    keyless = fixed.split("[[keys]]")[0].replace('"gpt-4o" = "nobody-serves-this"', '"gpt-4o" = "other-chat"')
    path.write_text(keyless, encoding="utf-8")
    assert main(["check-config", "--config", str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{path}: ok (2 providers, 0 keys)\n"
    assert (
        captured.err
        == "warning: no [[keys]]: every request will be refused with 401 (`sluicegate keys new` makes one)\n"
    )


def test_unknown_sections_get_a_guess_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(GOOD.format(digest="ab" * 32) + '\n[serevr]\nbind = "127.0.0.1:1"\n', encoding="utf-8")
    assert main(["check-config", "--config", str(path)]) == 2
    assert capsys.readouterr().err == f"{path}:15: serevr: unknown section (did you mean server?)\n"


# --help: every option explained


def commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every command's parser, by its words: 'serve', 'keys new', ..."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield " ".join((*path, name)), sub
                yield from commands(sub, (*path, name))


def test_every_option_of_every_command_says_what_it_does_and_its_default() -> None:
    found = dict(commands(build_parser()))
    assert set(found) >= {"serve", "check-config", "keys", "keys new", "keys usage", "events", "mock-upstream", "demo"}
    for name, parser in found.items():
        assert parser.description, name
        if name != "bench":  # bench keeps its example in its description
            assert parser.epilog and parser.epilog.startswith(f"example:\n  sluicegate {name.split()[0]}"), name
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction) or not action.option_strings:
                continue
            where = f"{name} {action.option_strings[0]}"
            assert action.help, where
            if action.default not in (None, False, []) and not action.required:
                assert "default" in action.help, where


@pytest.mark.parametrize(("argv", "choices"), [(["keys"], "{new,usage}"), ([], "{serve,check-config,keys,")])
def test_a_missing_subcommand_names_the_choices(argv: list[str], choices: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy", *argv], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].startswith(f"sluicegate{' ' if argv else ''}{' '.join(argv)}: error: ")
    assert "the following arguments are required: " + choices in result.stderr
    assert "required: keys_command" not in result.stderr and "required: command" not in result.stderr


def test_help_shows_the_defaults_and_an_example() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "mock-upstream", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "--chunks N tokens in each answer, streamed one chunk each (default 8)" in text
    assert "example: sluicegate mock-upstream --bind 127.0.0.1:8001" in text
