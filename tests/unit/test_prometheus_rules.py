"""Alert and recording rules: valid, and their promtool unit tests pass."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

PROM = Path(__file__).resolve().parents[2] / "prometheus"


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: run `make setup` (Debian package prometheus)"
    return subprocess.run([promtool, *args], capture_output=True, text=True, check=False)


def test_rules_are_valid() -> None:
    result = _promtool("check", "rules", str(PROM / "rules.yml"), str(PROM / "alerts.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 5 rules found" in result.stdout
    assert "SUCCESS: 22 rules found" in result.stdout


def test_alert_unit_tests_pass() -> None:
    result = _promtool("test", "rules", str(PROM / "tests" / "alerts_test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_documented_and_tested() -> None:
    alerts = [
        r for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for r in g["rules"]
    ]
    tested = (PROM / "tests" / "alerts_test.yml").read_text()
    for rule in alerts:
        assert {"summary", "description", "runbook"} <= set(rule["annotations"]), rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert f"alertname: {rule['alert']}\n" in tested, f"{rule['alert']} has no promtool test"


def test_prometheus_config_is_valid() -> None:
    result = _promtool("check", "config", str(PROM / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
