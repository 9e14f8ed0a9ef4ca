"""What bounds /api/v1/missed: a few computations at once, and answers kept per evaluation.

Listing missed events reads the digests of the window's buckets with misses (by `_id`, in
proportion to the misses listed): still store reads, so callers must not be able to take every
HTTP thread or slow the evaluation down by asking repeatedly.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from eventaudit.exporter.snapshot import Snapshot
from eventaudit.journal import MissedEvent

# (topic, subscription, window label) within one snapshot.
AnswerKey = tuple[str, str, str]
OUTCOMES = ("computed", "cached", "busy", "error")


@dataclass(frozen=True, slots=True)
class MissedList:
    """The missed events of one window as evaluated: `missed` of them, the oldest listed (as
    many as a caller may ask for).

    `events` is None when the records changed during the evaluation (answered 503 until the
    next one).
    """

    missed: int
    events: tuple[MissedEvent, ...] | None


class MissedAnswers(Collector):
    """At most `concurrency` listings computed at once (non-blocking: a caller beyond it is
    turned away), and the answers of the current snapshot kept, at most `entries` of them.

    eventaudit_missed_api_requests_total{outcome="computed"} 12.0
    eventaudit_missed_api_requests_total{outcome="cached"} 40.0
    eventaudit_missed_api_requests_total{outcome="busy"} 3.0
    eventaudit_missed_api_requests_total{outcome="error"} 0.0
    """

    def __init__(self, concurrency: int = 2, entries: int = 32, keep_events: int = 10_000):
        self._slots = threading.BoundedSemaphore(concurrency)
        self._entries = entries
        self.keep_events = keep_events
        self._lock = threading.Lock()
        self._snapshot: Snapshot | None = None
        self._answers: dict[AnswerKey, MissedList] = {}
        self._counts = dict.fromkeys(OUTCOMES, 0)

    def cached(self, snapshot: Snapshot, key: AnswerKey) -> MissedList | None:
        """The answer already computed for this snapshot, if any."""
        with self._lock:
            answer = self._answers.get(key) if snapshot is self._snapshot else None
            if answer is not None:
                self._counts["cached"] += 1
            return answer

    def try_acquire(self) -> bool:
        """Take a computation slot without waiting; False (counted `busy`) when none is free."""
        if self._slots.acquire(blocking=False):
            return True
        with self._lock:
            self._counts["busy"] += 1
        return False

    def failed(self) -> None:
        """Count a computation the store could not answer (nothing kept: the next call retries)."""
        with self._lock:
            self._counts["error"] += 1

    def release(self) -> None:
        """Give back a slot taken by try_acquire()."""
        self._slots.release()

    def store(
        self, snapshot: Snapshot, key: AnswerKey, missed: int, listed: list[MissedEvent] | None
    ) -> MissedList:
        """Keep the answer computed from `snapshot` (the oldest goes past `entries`)."""
        answer = MissedList(
            missed, tuple(listed[: self.keep_events]) if listed is not None else None
        )
        with self._lock:
            self._counts["computed"] += 1
            if snapshot is not self._snapshot:
                if (
                    self._snapshot is not None
                    and snapshot.evaluated_at < self._snapshot.evaluated_at
                ):
                    return answer  # computed from a snapshot already replaced: not kept
                self._snapshot, self._answers = snapshot, {}
            self._answers.pop(key, None)
            self._answers[key] = answer
            while len(self._answers) > self._entries:
                del self._answers[next(iter(self._answers))]
        return answer

    def collect(self) -> Iterator[CounterMetricFamily]:
        """Requests for missed events by outcome."""
        family = CounterMetricFamily(
            "eventaudit_missed_api_requests",
            "/api/v1/missed answers: computed from the store, served from the cache of the "
            "latest evaluation, turned away (429) while too many are computed, or failed (503).",
            labels=["outcome"],
        )
        with self._lock:
            for outcome in OUTCOMES:
                family.add_metric([outcome], self._counts[outcome])
        yield family
