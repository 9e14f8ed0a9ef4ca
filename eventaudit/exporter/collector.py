"""Prometheus collector over the latest evaluation."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from eventaudit.exporter.snapshot import Snapshot
from eventaudit.exporter.subscriptions import ExpectedSubscriptions

# Numbers older than this many evaluation intervals (and at least MIN_STALE_SECONDS) are stale.
STALE_INTERVALS = 3
MIN_STALE_SECONDS = 60.0


class Reading(NamedTuple):
    """What scrapes and the API may serve: the snapshot only when `up`, else why not."""

    up: bool
    snapshot: Snapshot | None
    reason: str | None


@dataclass
class EvaluationState:
    """What the evaluation loop last achieved, shared with scrapes and the API (thread-safe).

    Error reasons are short and fixed ("audit store unavailable"): they are served over HTTP,
    so driver details (hosts, topology) stay in the log.
    """

    settle_seconds: float
    clock: Callable[[], float] = time.monotonic
    snapshot: Snapshot | None = None
    last_success: float | None = None
    duration: float = 0.0
    error: str | None = None
    successes: int = 0
    failures: int = 0
    retention_successes: int = 0
    retention_failures: int = 0
    last_retention: float | None = None

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._ok = False
        self._succeeded_at = -math.inf
        self._stale_after = math.inf
        self._loop_stopped = False

    def expect_every(self, interval_seconds: float) -> None:
        """The loop evaluates this often: numbers not refreshed for a few intervals are stale."""
        with self._lock:
            self._stale_after = max(STALE_INTERVALS * interval_seconds, MIN_STALE_SECONDS)

    def succeeded(self, snapshot: Snapshot, duration: float) -> None:
        """Record a successful evaluation."""
        with self._lock:
            self.snapshot, self._ok, self.duration, self.error = snapshot, True, duration, None
            self.last_success = time.time()
            self._succeeded_at = self.clock()
            self.successes += 1

    def failed(self, reason: str, duration: float) -> None:
        """Record a failed evaluation; its numbers are no longer served."""
        with self._lock:
            self._ok, self.duration, self.error = False, duration, reason
            self.failures += 1

    def retention_succeeded(self, finished_at: float) -> None:
        """Record a retention delete that completed at Unix time `finished_at`."""
        with self._lock:
            self.retention_successes += 1
            self.last_retention = finished_at

    def retention_failed(self) -> None:
        """Record a failed retention delete (the numbers stay served)."""
        with self._lock:
            self.retention_failures += 1

    def loop_stopped(self) -> None:
        """The evaluation loop has ended: nothing will refresh the numbers any more."""
        with self._lock:
            self._loop_stopped = True

    def current(self) -> Reading:
        """Whether the numbers may be served, read together with them."""
        with self._lock:
            if self._loop_stopped:
                return Reading(False, None, "evaluation loop stopped")
            if not self._ok or self.snapshot is None:
                return Reading(False, None, self.error or "no evaluation has completed yet")
            age = self.clock() - self._succeeded_at
            if age > self._stale_after:
                return Reading(False, None, f"no successful evaluation for {age:.0f}s")
            return Reading(True, self.snapshot, None)


class CompletionCollector(Collector):
    """Exposes the latest evaluation.

    eventaudit_completion_rate{topic="create-user",subscription="audit-a",window="5m"} 0.95
    eventaudit_missed_events{topic="create-user",subscription="audit-a",window="5m"} 15.0
    eventaudit_published_events{topic="create-user",window="5m"} 300.0
    eventaudit_up 1.0

    After a failed evaluation, with no success for a few intervals, or once the evaluation
    loop has stopped, only the health metrics are served (`eventaudit_up 0`): numbers that are
    not being refreshed are not presented as current.
    """

    def __init__(
        self, state: EvaluationState, expected: ExpectedSubscriptions | None = None
    ) -> None:
        self._state = state
        self._expected = expected

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """Fresh metric families from the latest evaluation."""
        state = self._state
        up, snapshot, _ = state.current()
        yield GaugeMetricFamily(
            "eventaudit_up",
            "1 when the last evaluation succeeded recently and the evaluation loop runs.",
            value=int(up),
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
        retention = CounterMetricFamily(
            "eventaudit_retention_runs",
            "Retention deletes by outcome (a failure is retried with backoff; eventaudit_up "
            "is not affected).",
            labels=["outcome"],
        )
        retention.add_metric(["success"], state.retention_successes)
        retention.add_metric(["error"], state.retention_failures)
        yield retention
        yield GaugeMetricFamily(
            "eventaudit_last_retention_timestamp_seconds",
            "Unix time of the last successful retention delete.",
            value=state.last_retention if state.last_retention is not None else math.nan,
        )
        if self._expected is not None:
            yield CounterMetricFamily(
                "eventaudit_subscription_list_errors",
                "Failed Pub/Sub listings of a topic's subscriptions (the last good list is kept).",
                value=self._expected.list_errors,
            )
            yield CounterMetricFamily(
                "eventaudit_subscription_filter_errors",
                "Listings that showed a subscription filter this exporter cannot evaluate.",
                value=self._expected.filter_errors,
            )
        if not up or snapshot is None:
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
            "filtered": GaugeMetricFamily(
                "eventaudit_filtered_receipts",
                "Receipts of events the subscription's filter excludes (Pub/Sub never sends "
                "them; the emulator does not enforce filters): neither received nor unmatched.",
                labels=labels,
            ),
            "dead_lettered": GaugeMetricFamily(
                "eventaudit_dead_lettered_events",
                "Missed events that Pub/Sub moved to the subscription's dead-letter topic "
                "(the rest of the missed events are lost).",
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
                families["filtered"].add_metric(values, stats.filtered)
                families["dead_lettered"].add_metric(values, stats.dead_lettered)
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
        unsupported = GaugeMetricFamily(
            "eventaudit_subscription_filter_unsupported",
            "1 for a subscription whose filter this exporter cannot evaluate: its completion is "
            "not reported (never taken for one that expects every event).",
            labels=["topic", "subscription"],
        )
        for topic, sub in sorted(snapshot.unsupported):
            unsupported.add_metric([topic, sub], 1)
        yield unsupported
