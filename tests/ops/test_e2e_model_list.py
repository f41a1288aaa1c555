"""GET /models against real processes: a glob-only provider's own list, fetched with its credential.

mock-g requires its provider key and serves a few names under the glob `mock-*` and one
outside it; `down` is a glob-only provider nobody listens for; `exact` (mock-b) has an
exact name. The gateway fetches mock-g's list in the background every half second.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from proxy.request.auth import key_digest, new_key
from tests.conftest import Mock, Mocks, Proc, free_port, start_gateway, start_mock

GLOB_KEY_ENV = "SG_TEST_GLOB_KEY"
SERVED = ["mock-chat", "mock-large", "other-x", "mock-large"]
KEYS = {"narrow": ["mock-chat"], "all": None, "globbed": ["mock-l*"], "own": ["mock-chat", "dead-x", "nowhere-model"]}


def model_list_config(glob_url: str, exact_url: str, keys: dict[str, str], connect_timeout_s: float = 1) -> str:
    key_tables = "".join(
        f'\n[[keys]]\nname = "{name}"\nsha256 = "{key_digest(keys[name])}"\n'
        + (f"models = {models!r}\n".replace("'", '"') if models is not None else "")
        for name, models in KEYS.items()
    )
    return f"""
[events]
sink = "off"

[[providers]]
name = "globby"
base_url = "{glob_url}/v1"
api_key_env = "{GLOB_KEY_ENV}"
models = ["mock-*"]
models_cache_s = 0.5
connect_timeout_s = {connect_timeout_s}
first_byte_timeout_s = 2

[[providers]]
name = "down"
base_url = "http://127.0.0.1:{free_port()}/v1"
models = ["dead-*"]
connect_timeout_s = 0.5

[[providers]]
name = "exact"
base_url = "{exact_url}/v1"
models = ["beta-chat"]

[aliases]
"chat" = "mock-chat"
{key_tables}"""


@dataclass
class Setup:
    proc: Proc
    glob: Mock
    keys: dict[str, str]
    provider_key: str

    @property
    def v1(self) -> str:
        return f"http://127.0.0.1:{self.proc.port}/v1"

    def listed(self, key: str = "all") -> list[tuple[str, str]]:
        resp = httpx.get(self.v1 + "/models", headers={"Authorization": f"Bearer {self.keys[key]}"}, timeout=10)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["object"] == "list"
        return [(m["id"], m["owned_by"]) for m in body["data"]]

    def ids(self, key: str = "all") -> list[str]:
        return [model for model, _ in self.listed(key)]

    def served(self, models: list[str]) -> None:
        httpx.post(self.glob.url + "/_mock/models", json=models).raise_for_status()

    def fetches(self) -> list[dict[str, Any]]:
        requests: list[dict[str, Any]] = httpx.get(self.glob.url + "/_mock/models").json()["requests"]
        return requests

    def output(self) -> str:
        return self.proc.log.read_text(errors="replace")


def until(check: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s}s: {check}")
        time.sleep(0.05)


def glob_mock(tmp: Path, name: str, provider_key: str) -> Mock:
    env = {GLOB_KEY_ENV: provider_key}
    return start_mock(tmp, name, env, "--api-key-env", GLOB_KEY_ENV, "--models", ",".join(SERVED))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, mocks: Mocks) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("model-list")
    provider_key = "sk-glob-" + new_key()[3:]
    glob = glob_mock(tmp, "mock-g", provider_key)
    keys = {name: new_key() for name in KEYS}
    try:
        config = model_list_config(glob.url, mocks.beta.url, keys)
        proc = start_gateway(tmp, mocks, config, env={GLOB_KEY_ENV: provider_key})
        try:
            yield Setup(proc, glob, keys, provider_key)
        finally:
            proc.stop()
    finally:
        glob.proc.stop()


@pytest.fixture
def sg(setup: Setup) -> Iterator[Setup]:
    setup.served(SERVED)
    until(lambda: "mock-large" in setup.ids(), timeout_s=10)
    yield setup
    httpx.delete(setup.glob.url + "/_mock/faults").raise_for_status()
    setup.served(SERVED)


def test_a_narrow_key_sees_its_model_served_by_a_glob_and_nothing_else(sg: Setup) -> None:
    assert sg.listed("narrow") == [("chat", "globby"), ("mock-chat", "globby")]
    # Each one listed is one the key may use.
    for model in sg.ids("narrow"):
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        resp = httpx.post(
            sg.v1 + "/chat/completions", json=body, headers={"Authorization": f"Bearer {sg.keys['narrow']}"}
        )
        assert resp.status_code == 200, (model, resp.text)


def test_the_providers_list_cut_to_its_globs_and_the_keys(sg: Setup) -> None:
    assert sg.listed("all") == [
        ("beta-chat", "exact"),
        ("chat", "globby"),
        ("mock-chat", "globby"),
        ("mock-large", "globby"),
    ]
    assert sg.ids("globbed") == ["mock-large"]
    # The key's own exact names that a provider's glob serves, even one that is down; not one nobody serves.
    assert sg.listed("own") == [("chat", "globby"), ("dead-x", "down"), ("mock-chat", "globby")]


def test_the_fetch_carries_the_provider_key(sg: Setup) -> None:
    fetches = sg.fetches()
    assert fetches, "the gateway never asked mock-g for its models"
    assert {(f["method"], f["path"], f["headers"].get("authorization")) for f in fetches} == {
        ("GET", "/v1/models", f"Bearer {sg.provider_key}")
    }
    # The client's key never goes upstream, and the provider's never comes back in the log.
    assert not any(key in str(fetches) for key in sg.keys.values())
    assert sg.provider_key not in sg.output()


def test_a_provider_that_is_down_costs_the_list_nothing(sg: Setup) -> None:
    started = time.monotonic()
    assert "beta-chat" in sg.ids()
    assert time.monotonic() - started < 0.5
    output = sg.output()
    assert "model list of provider 'down' not refreshed (cannot connect): none listed yet" in output
    assert "Traceback" not in output


def test_the_refresh_picks_up_a_change(sg: Setup) -> None:
    sg.served(["mock-chat", "mock-new"])
    until(lambda: sg.ids() == ["beta-chat", "chat", "mock-chat", "mock-new"])
    assert sg.ids("globbed") == []


@pytest.mark.parametrize(
    ("faults", "reason", "timeout_s"),
    [
        ({"status": 500}, "HTTP 500", 5.0),
        ({"garbage": 1}, "the answer is not JSON", 5.0),
        ({"hang": "headers"}, "timed out", 8.0),
    ],
    ids=["500", "not-json", "hang"],
)
def test_a_failed_refresh_keeps_the_cached_list(
    sg: Setup, faults: dict[str, Any], reason: str, timeout_s: float
) -> None:
    before = sg.listed()
    line = f"model list of provider 'globby' not refreshed ({reason}): keeping the 2 listed before"
    seen = sg.output().count(line)
    httpx.post(sg.glob.url + "/_mock/faults", json=faults).raise_for_status()
    sg.served(["mock-chat", "mock-gone"])
    until(lambda: sg.output().count(line) > seen, timeout_s)
    assert sg.listed() == before


def test_openai_sdk_models_list(sg: Setup) -> None:
    client = openai.OpenAI(base_url=sg.v1, api_key=sg.keys["narrow"], max_retries=0, timeout=10)
    assert [m.id for m in client.models.list()] == ["chat", "mock-chat"]
    client = openai.OpenAI(base_url=sg.v1, api_key=sg.keys["all"], max_retries=0, timeout=10)
    models = list(client.models.list())
    assert [(m.id, m.object, m.owned_by) for m in models] == [
        ("beta-chat", "model", "exact"),
        ("chat", "model", "globby"),
        ("mock-chat", "model", "globby"),
        ("mock-large", "model", "globby"),
    ]


def test_before_the_first_fill_a_request_waits_at_most_the_connect_timeout(tmp_path: Path, mocks: Mocks) -> None:
    provider_key = "sk-glob-" + new_key()[3:]
    glob = glob_mock(tmp_path, "mock-hung", provider_key)
    keys = {name: new_key() for name in KEYS}
    try:
        glob.faults(hang="headers")
        config = model_list_config(glob.url, mocks.beta.url, keys, connect_timeout_s=1)
        proc = start_gateway(tmp_path, mocks, config, env={GLOB_KEY_ENV: provider_key})
        try:
            sg = Setup(proc, glob, keys, provider_key)
            started = time.monotonic()
            assert sg.ids() == ["beta-chat", "chat"]
            # The fetch hangs for first_byte_timeout_s (2 s): the request gave up after connect_timeout_s.
            assert 0.5 < time.monotonic() - started < 1.8
            assert len(sg.fetches()) == 1
        finally:
            proc.stop()
        # Shut down in the middle of a fetch: the lifespan cancelled it, and the process ended cleanly.
        assert proc.proc is not None and proc.proc.returncode == 0
        assert "Traceback" not in proc.log.read_text() and "Task was destroyed" not in proc.log.read_text()
    finally:
        glob.proc.stop()
