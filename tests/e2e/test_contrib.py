"""contrib/: the Prometheus alert rules and the Grafana dashboard, checked against the real daemon.

promtool (Debian's `prometheus` package) checks and unit-tests the rules; every metric an
expression names must be one a running `forwarder run` exports.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import DaemonProc, MockProc, promtool

StartMock = Callable[..., Awaitable[MockProc]]
StartDaemon = Callable[..., Awaitable[DaemonProc]]

CONTRIB = Path(__file__).resolve().parents[2] / "contrib"
RULES = CONTRIB / "prometheus" / "forwarder-rules.yml"
RULE_TESTS = CONTRIB / "prometheus" / "forwarder-rules.test.yml"
DASHBOARD = CONTRIB / "grafana" / "forwarder.json"
METRIC = re.compile(r"\b(forwarder_[a-z0-9_]+)\b")


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], capture_output=True, text=True, timeout=60, check=False
    )


def rule_expressions() -> list[str]:
    """Every `expr:` of the rules file (one line each, as the file keeps them)."""
    return [
        line.split("expr:", 1)[1].strip()
        for line in RULES.read_text().splitlines()
        if line.strip().startswith("expr:")
    ]


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_promtool_checks_the_rules() -> None:
    result = _promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 9 rules found" in result.stdout
    assert "WARNING" not in result.stdout + result.stderr


def test_promtool_rule_unit_tests_pass() -> None:
    # Each alert has a firing and a non-firing case in the test file.
    result = _promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    alerts = re.findall(r"- alert: (\w+)", RULES.read_text())
    tests = RULE_TESTS.read_text()
    assert len(alerts) == 9
    for alert in alerts:
        # " []" for a case where it stays quiet, "" for one where alerts are expected.
        cases = re.findall(rf"alertname: {alert}\n\s+exp_alerts:( \[\])?", tests)
        assert set(cases) == {"", " []"}, f"{alert} needs a firing and a quiet case: {cases}"


def test_dashboard_panels_each_have_a_query_and_a_description() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(panels) >= 12
    for panel in panels:
        assert panel["targets"], panel["title"]
        assert panel["description"], panel["title"]


async def test_every_metric_the_rules_and_dashboard_name_is_exported(
    mock_remote: StartMock, daemon: StartDaemon
) -> None:
    mock = await mock_remote()
    d = await daemon(mock.base_url, queue={"mode": "durable"})
    async with aiohttp.ClientSession(base_url=d.url) as http:
        async with http.post(
            "/v1/recipientEvents/create", data={"recipient_id": "1", "name": "SIGNUP"}
        ) as response:
            assert response.status < 300
        async with http.get("/metrics") as response:
            text = await response.text()
    exported = {
        sample.name for family in text_string_to_metric_families(text) for sample in family.samples
    }
    named = {
        name
        for expr in rule_expressions() + dashboard_expressions()
        for name in METRIC.findall(expr)
    }
    assert len(named) >= 20
    assert sorted(named - exported) == []
