"""Settled-bucket completion evaluation.

Events are bucketed by publishTime. A bucket is evaluated once it has settled (its end is at
least the settle delay in the past), its result is stored, and windows sum stored buckets; so
an evaluation reads only the newly settled buckets plus any bucket a late record touched. A
late receipt (or a publish record the publisher flushed after an outage) re-evaluates its
bucket: it is counted late, not lost.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from eventaudit.exporter.buckets import (
    Window,
    completion_rate,
    floor_to_bucket,
    settled_frontier,
)
from eventaudit.exporter.subscriptions import ExpectedSubscriptions
from eventaudit.records import BucketCounts, BucketResult
from eventaudit.store import EvaluatorStore, PublishedEvent, ReceiptSummary

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SubscriptionWindow:
    """Completion of one subscription over one window."""

    published: int
    received: int
    duplicates: int
    unmatched: int

    @property
    def missed(self) -> int:
        """published - received (never negative: receipts are matched against publishes)."""
        return self.published - self.received

    @property
    def completion_rate(self) -> float:
        """received / published, NaN when nothing was published."""
        return completion_rate(self.received, self.published)


@dataclass(frozen=True)
class Snapshot:
    """The result of one evaluation, read by scrapes and the HTTP API."""

    evaluated_at: datetime
    frontier: datetime
    windows: tuple[Window, ...]
    published: dict[str, dict[str, int]] = field(default_factory=dict)
    subscriptions: dict[tuple[str, str], dict[str, SubscriptionWindow]] = field(
        default_factory=dict
    )

    def window(self, label: str) -> Window | None:
        """The configured window with this label."""
        return next((w for w in self.windows if w.label == label), None)


class Evaluator:
    """Evaluates settled buckets against the store and keeps results for the longest window."""

    def __init__(
        self,
        store: EvaluatorStore,
        expected: ExpectedSubscriptions,
        windows: list[Window],
        bucket: timedelta,
        settle: timedelta,
    ) -> None:
        if not windows:
            raise ValueError("at least one window is required")
        self._store = store
        self._expected = expected
        self._windows = tuple(sorted(windows, key=lambda w: w.length))
        self._bucket = bucket
        self._settle = settle
        self._span = self._windows[-1].length
        self._results: dict[tuple[str, datetime], BucketResult] = {}
        self._until: datetime | None = None
        self._watermark: datetime | None = None

    def evaluate(self, now: datetime) -> Snapshot:
        """Evaluate everything that settled by `now`; raises StoreError (state unchanged)."""
        frontier = settled_frontier(now, self._settle, self._bucket)
        oldest = frontier - self._span
        results = dict(self._results)
        until, watermark = self._until, self._watermark
        if until is None:
            # First evaluation of this process: resume from what an earlier one stored.
            stored, scanned_at = self._store.load_evaluator_state()
            results = {(r.topic, r.start): r for r in self._store.load_bucket_results(oldest)}
            if stored is not None and stored >= oldest:
                # Stored results are current up to the last scan: only what was written since
                # then can correct them, so the window is not read again.
                until, watermark = stored, scanned_at or oldest
            else:
                until, watermark = oldest, oldest
        assert watermark is not None
        until = min(until, frontier)

        # One read per collection: the newly settled buckets, plus anything written since the
        # last evaluation (less one bucket of overlap for clock skew and batches in flight)
        # whose bucket was already evaluated: a late receipt or a late publish record.
        since = watermark - self._bucket
        published, late_published = self._store.published_scan(until, frontier, since, oldest)
        receipts, late_receipts = self._store.receipts_scan(until, frontier, since, oldest)
        changed = self._evaluate_buckets(published, receipts)
        dirty = sorted({floor_to_bucket(t, self._bucket) for t in late_published | late_receipts})
        if dirty:
            # Late records are rare: re-read just the span of the buckets they touched.
            end = dirty[-1] + self._bucket
            recomputed = self._evaluate_buckets(
                self._store.published_between(dirty[0], end),
                self._store.receipts_between(dirty[0], end),
            )
            wanted = set(dirty)
            changed.extend(r for r in recomputed if r.start in wanted)

        for result in changed:
            results[(result.topic, result.start)] = result
        if changed:
            self._store.save_bucket_results(changed, now)
        if frontier != self._until:
            self._store.save_evaluator_state(frontier, now)
        # Commit in-memory state only after every store call succeeded.
        self._results = {k: v for k, v in results.items() if k[1] >= oldest}
        self._until, self._watermark = frontier, now
        if dirty:
            log.info("re-evaluated %d bucket(s) touched by late records", len(dirty))
        return self._snapshot(now, frontier)

    def _evaluate_buckets(
        self, events: list[PublishedEvent], receipts_read: list[ReceiptSummary]
    ) -> list[BucketResult]:
        """Bucket results from the records of whole buckets, comparing id sets per bucket."""
        published: dict[tuple[str, datetime], set[str]] = defaultdict(set)
        for event in events:
            published[(event.topic, floor_to_bucket(event.publish_time, self._bucket))].add(
                event.event_id
            )
        receipts: dict[tuple[str, datetime], dict[str, list[tuple[str, int]]]] = defaultdict(
            lambda: defaultdict(list)
        )
        for receipt in receipts_read:
            key = (receipt.topic, floor_to_bucket(receipt.publish_time, self._bucket))
            receipts[key][receipt.subscription].append((receipt.event_id, receipt.deliveries))

        out = []
        for key in sorted(set(published) | set(receipts)):
            ids = published.get(key, set())
            counts = {}
            for sub, items in receipts.get(key, {}).items():
                matched = sum(1 for event_id, _ in items if event_id in ids)
                counts[sub] = BucketCounts(
                    received=matched,
                    duplicates=sum(max(0, d - 1) for _, d in items),
                    unmatched=len(items) - matched,
                )
            out.append(BucketResult(key[0], key[1], len(ids), counts))
        return out

    def _snapshot(self, now: datetime, frontier: datetime) -> Snapshot:
        by_topic: dict[str, list[BucketResult]] = defaultdict(list)
        for (topic, _), result in self._results.items():
            by_topic[topic].append(result)
        topics = set(by_topic) | self._expected.configured_topics
        published: dict[str, dict[str, int]] = {}
        subs_out: dict[tuple[str, str], dict[str, SubscriptionWindow]] = {}
        for topic in sorted(topics):
            results = by_topic.get(topic, [])
            seen = {s for r in results for s in r.subscriptions}
            expected = self._expected.for_topic(topic, seen)
            published[topic] = {}
            for window in self._windows:
                in_window = [r for r in results if r.start >= frontier - window.length]
                published[topic][window.label] = sum(r.published for r in in_window)
                for sub in expected:
                    counts = [r.subscriptions.get(sub, BucketCounts()) for r in in_window]
                    subs_out.setdefault((topic, sub), {})[window.label] = SubscriptionWindow(
                        published=published[topic][window.label],
                        received=sum(c.received for c in counts),
                        duplicates=sum(c.duplicates for c in counts),
                        unmatched=sum(c.unmatched for c in counts),
                    )
        return Snapshot(now, frontier, self._windows, published, subs_out)


def log_snapshot(snapshot: Snapshot) -> None:
    """One line per topic/subscription/window, in the spirit of the old scheduler."""
    for (topic, sub), windows in sorted(snapshot.subscriptions.items()):
        for label, stats in windows.items():
            rate = stats.completion_rate
            log.info(
                "topic=%s subscription=%s window=%s total: %d missed: %d completion rate: %s",
                topic,
                sub,
                label,
                stats.published,
                stats.missed,
                "n/a" if rate != rate else f"{rate * 100:.3f}%",
            )
