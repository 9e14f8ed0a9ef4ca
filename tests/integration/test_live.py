"""Live verification: a real Prometheus scrapes real services fed by a real run with known loss.

(a) every dashboard panel's query, variables substituted, returns data from that Prometheus;
(b) the completion alert goes pending then firing, and Alertmanager delivers it to a webhook
    receiver run by this test, with topic and subscription labels.

The alert rules are the committed ones with `for:` shortened to seconds and the rule groups
evaluated every second, so the test takes a minute, not ten.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from dashboards import build
from tests.conftest import Ferret, service_env, wait_for
from tools import stack

PROM_DIR = stack.ROOT / "prometheus"
LOSE_FRACTION = "0.5"


class Webhook:
    """An Alertmanager webhook receiver: remembers every alert it is sent."""

    def __init__(self) -> None:
        self.alerts: list[dict[str, Any]] = []
        received = self.alerts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                received.extend(body["alerts"])
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def _fast_rules(tmp: Path) -> list[Path]:
    """Copies of the committed rule files, evaluated every second, with `for:` of 3 s."""
    out = []
    for name in ("rules.yml", "alerts.yml"):
        doc = yaml.safe_load((PROM_DIR / name).read_text())
        for group in doc["groups"]:
            group["interval"] = "1s"
            for rule in group["rules"]:
                if "for" in rule:
                    rule["for"] = "3s"
        path = tmp / name
        path.write_text(yaml.safe_dump(doc))
        out.append(path)
    return out


def _query(prom: str, expr: str) -> list[dict[str, Any]]:
    url = f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = json.load(resp)
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def _alerts(prom: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{prom}/api/v1/alerts", timeout=5) as resp:
        return list(json.load(resp)["data"]["alerts"])


@pytest.fixture
def live_stack(
    ferret: Ferret, emulator: str, topic_factory, tmp_path: Path
) -> Iterator[dict[str, Any]]:
    topic, (healthy, lossy) = topic_factory(2)
    env = service_env(ferret, emulator)
    names = ("publisher", "sub-healthy", "sub-lossy", "exporter", "prometheus", "alertmanager")
    port = {name: stack.free_port() for name in names}
    addr = {name: f"127.0.0.1:{p}" for name, p in port.items()}
    webhook = Webhook()
    (tmp_path / "am.yml").write_text(
        yaml.safe_dump(
            {
                "route": {
                    "receiver": "test",
                    "group_by": ["alertname", "topic", "subscription"],
                    "group_wait": "1s",
                    "group_interval": "1s",
                    "repeat_interval": "1h",
                },
                "receivers": [{"name": "test", "webhook_configs": [{"url": webhook.url}]}],
            }
        )
    )
    rules = _fast_rules(tmp_path)
    (tmp_path / "prometheus.yml").write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(p) for p in rules],
                "alerting": {
                    "alertmanagers": [{"static_configs": [{"targets": [addr["alertmanager"]]}]}]
                },
                "scrape_configs": [
                    {
                        "job_name": "eventaudit-exporter",
                        "static_configs": [{"targets": [addr["exporter"]]}],
                    },
                    {
                        "job_name": "eventaudit-publisher",
                        "static_configs": [{"targets": [addr["publisher"]]}],
                    },
                    {
                        "job_name": "eventaudit-subscriber",
                        "static_configs": [{"targets": [addr["sub-healthy"], addr["sub-lossy"]]}],
                    },
                ],
            }
        )
    )
    services: list[stack.Service] = []
    stop = threading.Event()
    try:
        for name, module, args in (
            ("publisher", "publisher", ["--users-topic", topic]),
            ("sub-healthy", "subscriber", ["--subscription", healthy]),
            (
                "sub-lossy",
                "subscriber",
                ["--subscription", lossy, "--lose-fraction", LOSE_FRACTION],
            ),
            (
                "exporter",
                "exporter",
                [
                    "--bucket",
                    "1s",
                    "--settle-delay",
                    "2s",
                    "--windows",
                    "1m,5m,1h",
                    "--topics",
                    topic,
                ],
            ),
        ):
            services.append(
                stack.python_service(
                    name,
                    module,
                    [*args, "--listen-address", addr[name]],
                    tmp_path,
                    env,
                    f"http://{addr[name]}/metrics",
                ).start()
            )
        services.append(
            stack.alertmanager(
                tmp_path / "am.yml", port["alertmanager"], tmp_path / "am", tmp_path
            ).start()
        )
        services.append(
            stack.prometheus(
                tmp_path / "prometheus.yml", port["prometheus"], tmp_path / "prom", tmp_path
            ).start()
        )

        def traffic() -> None:
            url = f"http://{addr['publisher']}/api/v1/users"
            while not stop.wait(0.1):
                with urllib.request.urlopen(
                    urllib.request.Request(url, data=b"", method="POST"), timeout=10
                ):
                    pass

        threading.Thread(target=traffic, daemon=True).start()
        yield {
            "topic": topic,
            "healthy": healthy,
            "lossy": lossy,
            "prom": f"http://{addr['prometheus']}",
            "webhook": webhook,
        }
    finally:
        stop.set()
        webhook.server.shutdown()
        for service in reversed(services):
            service.stop()


def _panel_queries(topic: str) -> list[tuple[str, str]]:
    dash = json.loads(build.OUTPUT.read_text())
    values = {"$topic": topic, "$subscription": ".*", "$window": "1m", "$__rate_interval": "1m"}
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in values.items():
                expr = expr.replace(var, value)
            assert "$" not in expr, expr
            out.append((f"{panel['title']} [{target['refId']}]", expr))
    return out


def test_every_dashboard_panel_query_returns_data(live_stack) -> None:
    queries = _panel_queries(live_stack["topic"])
    assert len(queries) == 19
    empty: list[str] = []

    def all_have_data() -> bool:
        empty[:] = [title for title, expr in queries if not _query(live_stack["prom"], expr)]
        return not empty

    deadline = time.monotonic() + 120
    while not all_have_data():
        assert time.monotonic() < deadline, f"panels with no data after 120 s: {empty}"
        time.sleep(1)
    # The variables' label_values() queries, as Grafana runs them, list what we published.
    dash = json.loads(build.OUTPUT.read_text())
    for var in dash["templating"]["list"]:
        if var["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", var["query"])
        assert match, var["query"]
        selector = match.group(1).replace("$topic", live_stack["topic"])
        url = (
            f"{live_stack['prom']}/api/v1/label/{match.group(2)}/values?"
            + urllib.parse.urlencode({"match[]": selector})
        )
        with urllib.request.urlopen(url, timeout=5) as resp:
            values = json.load(resp)["data"]
        expected = {
            "topic": live_stack["topic"],
            "subscription": live_stack["lossy"],
            "window": "5m",
        }[var["name"]]
        assert expected in values, (var["name"], values)
    # The known loss is visible where the dashboard shows it.
    rates = {
        r["metric"]["subscription"]: float(r["value"][1])
        for r in _query(
            live_stack["prom"],
            f'eventaudit_completion_rate{{topic="{live_stack["topic"]}", window="1m"}}',
        )
    }
    assert rates[live_stack["healthy"]] == 1.0
    assert 0.2 < rates[live_stack["lossy"]] < 0.8


def test_completion_alert_pends_fires_and_reaches_the_webhook(live_stack) -> None:
    started = time.monotonic()
    states: list[str] = []
    lossy, topic = live_stack["lossy"], live_stack["topic"]

    def state() -> str | None:
        for alert in _alerts(live_stack["prom"]):
            labels = alert["labels"]
            if (
                labels["alertname"] == "EventAuditCompletionCritical"
                and labels.get("subscription") == lossy
            ):
                return str(alert["state"])
        return None

    def firing() -> bool:
        current = state()
        if current and (not states or states[-1] != current):
            states.append(current)
        return current == "firing"

    wait_for(firing, 120, "EventAuditCompletionCritical to fire for the lossy subscription")
    assert states == ["pending", "firing"]
    assert not any(
        a["labels"]["alertname"].startswith("EventAuditCompletion")
        and a["labels"].get("subscription") == live_stack["healthy"]
        for a in _alerts(live_stack["prom"])
    )

    def delivered() -> list[dict[str, Any]]:
        return [
            a
            for a in live_stack["webhook"].alerts
            if a["labels"]["alertname"] == "EventAuditCompletionCritical"
            and a["labels"].get("subscription") == lossy
        ]

    wait_for(lambda: bool(delivered()), 60, "Alertmanager to deliver the alert to the webhook")
    alert = delivered()[0]
    assert alert["status"] == "firing"
    assert alert["labels"]["topic"] == topic
    assert alert["labels"]["severity"] == "critical"
    assert alert["annotations"]["runbook"].startswith("Same steps as EventAuditCompletionLow")
    print(f"live alert test: pending -> firing -> delivered in {time.monotonic() - started:.1f} s")
