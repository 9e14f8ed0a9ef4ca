"""The committed dashboard JSON is what dashboards/eventaudit.py generates."""

from __future__ import annotations

import json

from dashboards import build, eventaudit


def test_committed_dashboard_json_is_current() -> None:
    assert build.OUTPUT.read_text() == build.render(), "stale: run `make dashboards`"


def test_dashboard_variables_and_panels() -> None:
    dash = json.loads(build.render())
    assert dash["uid"] == eventaudit.UID
    assert [v["name"] for v in dash["templating"]["list"]] == [
        "datasource",
        "topic",
        "subscription",
        "window",
    ]
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert [p["title"] for p in panels] == [
        "Completion rate per subscription",
        "Current completion",
        "Missed events: lost and dead-lettered",
        "Published vs received per second",
        "Delivery latency p50 / p95 / p99",
        "Duplicates, unmatched and filtered-out receipts",
        "Exporter up",
        "Evaluation duration",
        "Age of the last evaluation",
        "Subscriptions not audited",
        "Topics evaluated per exporter replica",
        "Topics without an owner",
        "Writes refused by fencing",
    ]
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]


def test_completion_thresholds_match_alert_levels() -> None:
    dash = json.loads(build.render())
    for panel in dash["panels"][1:3]:
        steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
        assert [s["value"] for s in steps] == [None, 0.95, 0.99]
        assert [s["color"] for s in steps] == ["red", "orange", "green"]


def test_per_topic_panels_show_one_series_whatever_the_replica_count() -> None:
    """Every exporter replica serves every topic's numbers: a panel summing or listing them
    per replica would double with two replicas."""
    dash = json.loads(build.render())
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for gauge in (
                "eventaudit_completion_rate",
                "eventaudit_missed_events",
                "eventaudit_dead_lettered_events",
                "eventaudit_duplicate_deliveries",
                "eventaudit_unmatched_receipts",
                "eventaudit_filtered_receipts",
                "eventaudit_subscription_filter_unsupported",
            ):
                if gauge in expr:
                    assert f"max without(instance, pod) ({gauge}" in expr, (panel["title"], expr)
