"""The collector's exposition from an evaluation state (pure logic, fresh registry)."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

from prometheus_client import CollectorRegistry

from eventaudit.exporter.buckets import Window
from eventaudit.exporter.collector import CompletionCollector, EvaluationState
from eventaudit.exporter.snapshot import Snapshot, SubscriptionWindow
from eventaudit.exporter.subscriptions import ExpectedSubscriptions

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
WINDOWS = (Window("1m", timedelta(minutes=1)), Window("5m", timedelta(minutes=5)))


def _registry(state: EvaluationState) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(CompletionCollector(state))
    return registry


def _snapshot() -> Snapshot:
    return Snapshot(
        NOW,
        NOW - timedelta(seconds=30),
        timedelta(seconds=10),
        WINDOWS,
        published={"t": {"1m": 0, "5m": 300}},
        subscriptions={
            ("t", "a"): {
                "1m": SubscriptionWindow(0, 0, 0, 0),
                "5m": SubscriptionWindow(300, 285, 4, 2),
            },
        },
    )


def test_numbers_from_a_successful_evaluation() -> None:
    state = EvaluationState(settle_seconds=30)
    state.succeeded(_snapshot(), 0.25)
    registry = _registry(state)
    five = {"topic": "t", "subscription": "a", "window": "5m"}
    assert registry.get_sample_value("eventaudit_completion_rate", five) == 0.95
    assert registry.get_sample_value("eventaudit_missed_events", five) == 15
    assert registry.get_sample_value("eventaudit_received_events", five) == 285
    assert registry.get_sample_value("eventaudit_duplicate_deliveries", five) == 4
    assert registry.get_sample_value("eventaudit_unmatched_receipts", five) == 2
    assert (
        registry.get_sample_value("eventaudit_published_events", {"topic": "t", "window": "5m"})
        == 300
    )
    assert registry.get_sample_value("eventaudit_up") == 1
    assert registry.get_sample_value("eventaudit_evaluation_duration_seconds") == 0.25
    assert registry.get_sample_value("eventaudit_settle_delay_seconds") == 30
    assert registry.get_sample_value("eventaudit_evaluations_total", {"outcome": "success"}) == 1


def test_no_traffic_is_nan_not_one_or_zero() -> None:
    state = EvaluationState(settle_seconds=30)
    state.succeeded(_snapshot(), 0.1)
    one = {"topic": "t", "subscription": "a", "window": "1m"}
    rate = _registry(state).get_sample_value("eventaudit_completion_rate", one)
    assert rate is not None and math.isnan(rate)
    assert _registry(state).get_sample_value("eventaudit_missed_events", one) == 0


def test_failed_evaluation_serves_health_only() -> None:
    state = EvaluationState(settle_seconds=30)
    state.succeeded(_snapshot(), 0.1)
    state.failed("store down", 5.0)
    registry = _registry(state)
    assert registry.get_sample_value("eventaudit_up") == 0
    assert registry.get_sample_value("eventaudit_evaluation_duration_seconds") == 5.0
    assert registry.get_sample_value("eventaudit_evaluations_total", {"outcome": "error"}) == 1
    assert registry.get_sample_value("eventaudit_last_evaluation_timestamp_seconds") is not None
    assert (
        registry.get_sample_value(
            "eventaudit_completion_rate", {"topic": "t", "subscription": "a", "window": "5m"}
        )
        is None
    )


def test_before_any_evaluation() -> None:
    registry = _registry(EvaluationState(settle_seconds=30))
    assert registry.get_sample_value("eventaudit_up") == 0
    assert math.isnan(
        registry.get_sample_value("eventaudit_last_evaluation_timestamp_seconds") or 0.0
    )


def test_retention_runs_are_exposed_apart_from_evaluations() -> None:
    state = EvaluationState(settle_seconds=30)
    registry = _registry(state)
    runs = "eventaudit_retention_runs_total"
    assert registry.get_sample_value(runs, {"outcome": "success"}) == 0
    assert registry.get_sample_value(runs, {"outcome": "error"}) == 0
    last = "eventaudit_last_retention_timestamp_seconds"
    assert math.isnan(registry.get_sample_value(last) or 0.0)
    state.succeeded(_snapshot(), 0.25)
    state.retention_failed()
    state.retention_failed()
    state.retention_succeeded(NOW.timestamp())
    assert registry.get_sample_value(runs, {"outcome": "success"}) == 1
    assert registry.get_sample_value(runs, {"outcome": "error"}) == 2
    assert registry.get_sample_value(last) == NOW.timestamp()
    assert registry.get_sample_value("eventaudit_up") == 1
    assert registry.get_sample_value("eventaudit_evaluations_total", {"outcome": "error"}) == 0


def test_listing_errors_are_exposed() -> None:
    def broken(topic: str) -> list[str]:
        raise RuntimeError("unavailable")

    expected = ExpectedSubscriptions({"t": {"a"}}, set(), broken, refresh_seconds=0)
    assert expected.for_topic("t", set()) == {"a"}
    assert expected.for_topic("t", set()) == {"a"}
    registry = CollectorRegistry()
    registry.register(CompletionCollector(EvaluationState(settle_seconds=30), expected))
    assert registry.get_sample_value("eventaudit_subscription_list_errors_total") == 2
