"""What a real `sluicegate serve` says about its config when it starts."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.conftest import Mocks, start_gateway


def test_a_gateway_without_keys_says_so_when_it_starts(tmp_path: Path, mocks: Mocks) -> None:
    config = f'[[providers]]\nname = "beta"\nbase_url = "{mocks.beta.url}/v1"\nmodels = ["mock-chat"]\n'
    proc = start_gateway(tmp_path, mocks, config)
    try:
        answer = httpx.post(f"http://127.0.0.1:{proc.port}/v1/chat/completions", json={}, timeout=5)
        assert answer.status_code == 401
    finally:
        proc.stop()
    log = proc.log.read_text()
    assert "no [[keys]]: every request will be refused with 401" in log
