"""Prometheus collector over the latest evaluation."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from eventaudit.exporter.evaluator import Snapshot
from eventaudit.exporter.subscriptions import ExpectedSubscriptions


@dataclass
class EvaluationState:
    """What the evaluation loop last achieved, shared with scrapes and the API (thread-safe)."""

    settle_seconds: float
    snapshot: Snapshot | None = None
    ok: bool = False
    last_success: float | None = None
    duration: float = 0.0
    error: str | None = None
    successes: int = 0
    failures: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def succeeded(self, snapshot: Snapshot, duration: float) -> None:
        """Record a successful evaluation."""
        with self._lock:
            self.snapshot, self.ok, self.duration, self.error = snapshot, True, duration, None
            self.last_success = time.time()
            self.successes += 1

    def failed(self, error: str, duration: float) -> None:
        """Record a failed evaluation; its numbers are no longer served."""
        with self._lock:
            self.ok, self.duration, self.error = False, duration, error
            self.failures += 1

    def current(self) -> tuple[bool, Snapshot | None]:
        """(ok, snapshot) read together."""
        with self._lock:
            return self.ok, self.snapshot


class CompletionCollector(Collector):
    """Exposes the latest evaluation.

    eventaudit_completion_rate{topic="create-user",subscription="audit-a",window="5m"} 0.95
    eventaudit_missed_events{topic="create-user",subscription="audit-a",window="5m"} 15.0
    eventaudit_published_events{topic="create-user",window="5m"} 300.0
    eventaudit_up 1.0

    After a failed evaluation only the health metrics are served (`eventaudit_up 0`): numbers
    that can no longer be refreshed are not presented as current.
    """

    def __init__(
        self, state: EvaluationState, expected: ExpectedSubscriptions | None = None
    ) -> None:
        self._state = state
        self._expected = expected

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """Fresh metric families from the latest evaluation."""
        state = self._state
        ok, snapshot = state.current()
        yield GaugeMetricFamily(
            "eventaudit_up", "1 when the last evaluation succeeded.", value=int(ok)
        )
        yield GaugeMetricFamily(
            "eventaudit_last_evaluation_timestamp_seconds",
            "Unix time of the last successful evaluation.",
            value=state.last_success if state.last_success is not None else math.nan,
        )
        yield GaugeMetricFamily(
            "eventaudit_evaluation_duration_seconds",
            "Duration of the last evaluation.",
            value=state.duration,
        )
        yield GaugeMetricFamily(
            "eventaudit_settle_delay_seconds",
            "How long after a bucket ends it is evaluated.",
            value=state.settle_seconds,
        )
        evaluations = CounterMetricFamily(
            "eventaudit_evaluations", "Evaluations by outcome.", labels=["outcome"]
        )
        evaluations.add_metric(["success"], state.successes)
        evaluations.add_metric(["error"], state.failures)
        yield evaluations
        if self._expected is not None:
            yield CounterMetricFamily(
                "eventaudit_subscription_list_errors",
                "Failed Pub/Sub listings of a topic's subscriptions (the last good list is kept).",
                value=self._expected.list_errors,
            )
        if not ok or snapshot is None:
            return

        labels = ["topic", "subscription", "window"]
        families = {
            "completion_rate": GaugeMetricFamily(
                "eventaudit_completion_rate",
                "Received / published events over the window (NaN when none published).",
                labels=labels,
            ),
            "missed": GaugeMetricFamily(
                "eventaudit_missed_events", "Published events with no receipt.", labels=labels
            ),
            "received": GaugeMetricFamily(
                "eventaudit_received_events", "Published events with a receipt.", labels=labels
            ),
            "duplicates": GaugeMetricFamily(
                "eventaudit_duplicate_deliveries", "Deliveries beyond the first.", labels=labels
            ),
            "unmatched": GaugeMetricFamily(
                "eventaudit_unmatched_receipts",
                "Receipts whose event has no publish record.",
                labels=labels,
            ),
        }
        for (topic, sub), windows in sorted(snapshot.subscriptions.items()):
            for label, stats in windows.items():
                values = [topic, sub, label]
                families["completion_rate"].add_metric(values, stats.completion_rate)
                families["missed"].add_metric(values, stats.missed)
                families["received"].add_metric(values, stats.received)
                families["duplicates"].add_metric(values, stats.duplicates)
                families["unmatched"].add_metric(values, stats.unmatched)
        published = GaugeMetricFamily(
            "eventaudit_published_events",
            "Events with a publish record over the window.",
            labels=["topic", "window"],
        )
        for topic, counts in sorted(snapshot.published.items()):
            for label, count in counts.items():
                published.add_metric([topic, label], count)
        yield published
        yield from families.values()
