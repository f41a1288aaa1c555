"""The ops files: Grafana dashboard and provisioning, Prometheus config and alert rules, Redis snippets.

Checked with promtool (Debian's `prometheus` package) where it can: the rules and
the config load, every dashboard query parses, and the gateway's real /metrics
passes `promtool check metrics`. Every metric the files name must be one the
gateway exports. No YAML library: the project does not depend on one, so rule
files are written as JSON (which is YAML) and the YAML files are read as text.
The [redis] snippets (deploy/redis-*.toml) pass `sluicegate check-config` as pasted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.records.metrics import Metrics
from tests.conftest import ROOT, Gateway

DASHBOARD = ROOT / "grafana" / "dashboards" / "sluicegate.json"
DATASOURCES = ROOT / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = ROOT / "grafana" / "provisioning" / "dashboards" / "sluicegate.yml"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"
ALERTS = ROOT / "deploy" / "alerts.yml"

DASHBOARD_UID = "sluicegate-overview"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# What Grafana puts in place of its built-in variables, as far as parsing goes.
BUILTIN_RANGES = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}
VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")
METRIC_NAME = re.compile(r"\bsluicegate_[A-Za-z0-9_:]*")
SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("_count", "_sum", "_created"),
    "gauge": ("",),
}
ANY_SUFFIX = ("", "_total", "_bucket", "_count", "_sum", "_created")


@pytest.fixture(scope="session")
def promtool() -> str:
    """promtool's path; a skip without it, but a failure in CI, which must install it."""
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is missing: .ci/run must install Debian's `prometheus` package")
        pytest.skip("promtool is not installed (Debian package `prometheus`)")
    return path


def run(promtool: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *args], input=stdin, capture_output=True, text=True, timeout=60)


def output(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout}--- stderr\n{result.stderr}"


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(panel title, refId, expr) for every Prometheus query of the dashboard."""
    return [
        (panel["title"], target["refId"], target["expr"])
        for panel in panels(dashboard()["panels"])
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def template_variables() -> set[str]:
    return {variable["name"] for variable in dashboard()["templating"]["list"]}


def variables_used(expr: str) -> set[str]:
    return {next(g for g in m.groups() if g) for m in VARIABLE.finditer(expr)}


def as_promql(expr: str) -> str:
    """The expression with Grafana's variables replaced so that it is plain PromQL."""

    def value(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        if name.startswith("__"):
            return BUILTIN_RANGES[name]
        return ".*"  # template variables are only used as label regexes

    return VARIABLE.sub(value, expr)


def exported_names() -> set[str]:
    """Every sample name the gateway's registry can expose, plus Prometheus's own `up`."""
    names = {"up"}
    for family in Metrics().registry.collect():
        names.update(family.name + suffix for suffix in SAMPLE_SUFFIXES.get(family.type, ANY_SUFFIX))
    return names


def alert_blocks() -> dict[str, str]:
    """Each alert's name and the text of its rule, read from alerts.yml without a YAML parser."""
    text = ALERTS.read_text()
    starts = [m for m in re.finditer(r"^\s*- alert:\s*(\S+)\s*$", text, re.MULTILINE)]
    ends = [m.start() for m in starts[1:]] + [len(text)]
    return {m.group(1): text[m.start() : end] for m, end in zip(starts, ends, strict=True)}


def test_alert_rules_load(promtool: str) -> None:
    result = run(promtool, "check", "rules", str(ALERTS))
    assert result.returncode == 0, output(result)


def test_upstream_auth_alert_fires_per_provider(promtool: str, tmp_path: Path) -> None:
    """A provider refusing the gateway's key pages within minutes, naming that provider only."""
    labels = 'job="sluicegate", instance="gw-1:9090"'
    alert = "SluicegateUpstreamAuthErrors"
    summary = "provider deepseek refuses the gateway's own credential"
    cases = {
        "rule_files": [str(ALERTS)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    # deepseek's key is refused from minute 3 on; openai's counter never moves.
                    {"series": f'sluicegate_upstream_auth_errors_total{{{labels}, provider="deepseek"}}',
                     "values": "0 0 0 2 4 6 8 10 10 10 10 10 10 10 10 10"},
                    {"series": f'sluicegate_upstream_auth_errors_total{{{labels}, provider="openai"}}',
                     "values": "0x15"},
                ],
                "alert_rule_test": [
                    {"eval_time": "2m", "alertname": alert, "exp_alerts": []},
                    {"eval_time": "3m", "alertname": alert, "exp_alerts": []},  # pending for 1m
                    {
                        "eval_time": "4m",
                        "alertname": alert,
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "critical", "provider": "deepseek"},
                                "exp_annotations": {
                                    "summary": summary,
                                    "description": (
                                        "Provider deepseek answered 401 or 403 to the gateway's own key"
                                        " (4 attempts in the last 5 minutes). Clients get 502"
                                        " upstream_auth_error unless a fallback provider serves them;"
                                        " their own keys are fine. Set a valid key in the environment"
                                        " variable named by the provider's api_key_env (rotated, revoked"
                                        " or out of credit?) and restart the gateway."
                                    ),
                                },
                            }
                        ],
                    },
                    # Five minutes without a refusal and it resolves.
                    {"eval_time": "15m", "alertname": alert, "exp_alerts": []},
                ],
            }
        ],
    }  # fmt: skip
    tests_file = tmp_path / "alert_tests.yml"
    tests_file.write_text(json.dumps(cases, indent=2))
    result = run(promtool, "test", "rules", str(tests_file))
    assert result.returncode == 0, output(result)


def test_prometheus_config_loads_with_its_rules(promtool: str) -> None:
    result = run(promtool, "check", "config", str(PROMETHEUS))
    assert result.returncode == 0, output(result)
    assert "1 rule files found" in result.stdout + result.stderr, output(result)


def test_every_dashboard_query_parses(promtool: str, tmp_path: Path) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 12
    declared = template_variables()
    for title, ref, expr in queries:
        unknown = {name for name in variables_used(expr) if not name.startswith("__")} - declared
        assert not unknown, f"{title} {ref}: undeclared variables {unknown} in {expr}"
    rules = [
        {"record": f"dashboard:query_{i}", "expr": as_promql(expr)} for i, (_, _, expr) in enumerate(queries, start=1)
    ]
    rules_file = tmp_path / "dashboard_rules.yml"
    rules_file.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}, indent=2))
    result = run(promtool, "check", "rules", str(rules_file))
    listing = "\n".join(
        f"{rule['record']} ({title} {ref}): {rule['expr']}"
        for (title, ref, _), rule in zip(queries, rules, strict=True)
    )
    assert result.returncode == 0, f"{output(result)}\n{listing}"


def test_dashboard_and_alerts_use_only_exported_metrics() -> None:
    exported = exported_names()
    used_by_dashboard = {name for _, _, expr in dashboard_queries() for name in METRIC_NAME.findall(expr)}
    used_by_alerts = set(METRIC_NAME.findall(ALERTS.read_text()))
    assert used_by_dashboard, "no sluicegate_ metric found in the dashboard"
    assert used_by_alerts, "no sluicegate_ metric found in alerts.yml"
    assert used_by_dashboard <= exported, f"dashboard: not exported: {sorted(used_by_dashboard - exported)}"
    assert used_by_alerts <= exported, f"alerts.yml: not exported: {sorted(used_by_alerts - exported)}"


def test_dashboard_shows_every_exported_metric() -> None:
    used = {name for _, _, expr in dashboard_queries() for name in METRIC_NAME.findall(expr)}
    families = {family.name for family in Metrics().registry.collect()}
    unshown = {family for family in families if not any(name.startswith(family) for name in used)}
    assert not unshown, f"no panel shows {sorted(unshown)}"


def test_dashboard_is_provisionable() -> None:
    text = DASHBOARD.read_text()
    data = json.loads(text)
    assert data["uid"] == DASHBOARD_UID
    assert data["title"] == "sluicegate"
    assert "__inputs" not in data
    assert "${DS_" not in text
    variables = {variable["name"]: variable for variable in data["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in panels(data["panels"])]
    assert len(ids) == len(set(ids)), f"panel ids repeat: {ids}"
    for panel in panels(data["panels"]):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel.get("targets"), panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", DATASOURCE) == DATASOURCE, f"{panel['title']} {target['refId']}"


def test_alerts_have_for_severity_and_annotations() -> None:
    blocks = alert_blocks()
    assert len(blocks) >= 6, sorted(blocks)
    for name, block in blocks.items():
        for field in ("expr:", "for:", "severity:", "summary:", "description:"):
            assert re.search(rf"^\s*{field}", block, re.MULTILINE), f"{name} has no {field}"
    # SluicegateDown watches the scrape job that deploy/prometheus.yml defines.
    assert 'up{job="sluicegate"}' in ALERTS.read_text()
    assert re.search(r"^\s*- job_name:\s*sluicegate\b", PROMETHEUS.read_text(), re.MULTILINE)


def test_grafana_provisioning_matches() -> None:
    datasources = DATASOURCES.read_text()
    for line in ("uid: prometheus", "type: prometheus", "url: http://prometheus:9090", "access: proxy"):
        assert re.search(rf"^\s*-?\s*{re.escape(line)}\s*$", datasources, re.MULTILINE), line
    assert re.search(r"^\s*isDefault:\s*true\s*$", datasources, re.MULTILINE)
    assert re.search(r"^\s*path:\s*/var/lib/grafana/dashboards\s*$", PROVIDERS.read_text(), re.MULTILINE)


def test_real_metrics_pass_promtool(promtool: str, gw: Gateway) -> None:
    messages = [{"role": "user", "content": "hello"}]
    answered = httpx.post(
        gw.v1 + "/chat/completions", headers=gw.auth(), json={"model": "mock-chat", "messages": messages}, timeout=10
    )
    assert answered.status_code == 200, answered.text
    missing = httpx.post(
        gw.v1 + "/chat/completions",
        headers=gw.auth(),
        json={"model": "no-such-model", "messages": messages},
        timeout=10,
    )
    assert missing.status_code == 404, missing.text
    exposition = httpx.get(gw.base + "/metrics", timeout=10)
    assert exposition.status_code == 200
    assert "sluicegate_requests_total{" in exposition.text
    result = run(promtool, "check", "metrics", stdin=exposition.text)
    assert result.returncode == 0, output(result)


@pytest.mark.parametrize("snippet", ["redis-cluster.toml", "redis-sentinel.toml"])
def test_the_redis_snippets_pass_check_config(snippet: str, tmp_path: Path) -> None:
    """Each deploy/redis-*.toml, pasted into a config as its comment says, is one check-config accepts."""
    config = tmp_path / "gateway.toml"
    provider = '[[providers]]\nname = "mock"\nbase_url = "http://127.0.0.1:8001/v1"\nmodels = ["mock-chat"]\n'
    config.write_text((ROOT / "deploy" / snippet).read_text() + "\n" + provider)
    env = {name: value for name, value in os.environ.items() if name != "REDIS_URL"}  # the snippet's url, not this
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", "--config", str(config)],
        cwd=ROOT, capture_output=True, text=True, timeout=30, env=env,
    )  # fmt: skip
    assert result.returncode == 0, output(result)
    assert result.stdout.startswith(f"{config}: ok (1 provider"), output(result)
