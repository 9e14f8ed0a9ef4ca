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
from collections.abc import Iterable, Mapping
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


BucketKey = tuple[str, datetime]


@dataclass(frozen=True)
class Snapshot:
    """The result of one evaluation, read by scrapes and the HTTP API.

    Each window is exactly the buckets in [frontier - window, frontier). A (topic, subscription)
    appears only for the windows it is reported in; `buckets` holds the per-bucket results the
    windows were summed from.
    """

    evaluated_at: datetime
    frontier: datetime
    bucket: timedelta
    windows: tuple[Window, ...]
    published: dict[str, dict[str, int]] = field(default_factory=dict)
    subscriptions: dict[tuple[str, str], dict[str, SubscriptionWindow]] = field(
        default_factory=dict
    )
    buckets: Mapping[BucketKey, BucketResult] = field(default_factory=dict)

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
        late_lookback: timedelta = timedelta(seconds=60),
    ) -> None:
        """`late_lookback`: how far before the previous evaluation records written since are
        looked for; it must exceed the longest a writer's store write takes to become visible
        (a record is stamped just before its write) plus the writers' clock skew."""
        if not windows:
            raise ValueError("at least one window is required")
        self._store = store
        self._expected = expected
        self._windows = tuple(sorted(windows, key=lambda w: w.length))
        self._bucket = bucket
        self._settle = settle
        self._late_lookback = max(late_lookback, bucket)
        self._span = self._windows[-1].length
        self._results: dict[tuple[str, datetime], BucketResult] = {}
        self._until: datetime | None = None
        self._watermark: datetime | None = None

    @property
    def late_lookback(self) -> timedelta:
        """How far before the previous evaluation late records are looked for."""
        return self._late_lookback

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
        # last evaluation (less the lookback, for writes in flight and clock skew) whose bucket
        # was already evaluated: a late receipt or a late publish record. Most records written
        # since then were published just before: the buckets from `since` on are read whole
        # and recomputed in this same read, so only records published before them (really
        # late ones) cost the extra re-read below.
        since = watermark - self._late_lookback
        start = max(oldest, min(until, floor_to_bucket(since, self._bucket)))
        published, late_published = self._store.published_scan(start, frontier, since, oldest)
        receipts, late_receipts = self._store.receipts_scan(start, frontier, since, oldest)
        changed = evaluate_buckets(published, receipts, self._bucket)
        dirty = sorted({floor_to_bucket(t, self._bucket) for t in late_published | late_receipts})
        if dirty:
            # Late records are rare: re-read just the span of the buckets they touched.
            end = dirty[-1] + self._bucket
            recomputed = evaluate_buckets(
                self._store.published_between(dirty[0], end),
                self._store.receipts_between(dirty[0], end),
                self._bucket,
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

    def _snapshot(self, now: datetime, frontier: datetime) -> Snapshot:
        # Buckets at or after the frontier exist when it moved back (a restart with a longer
        # settle delay, a clock stepped back): kept for later, never counted now.
        counted = {k: r for k, r in self._results.items() if k[1] < frontier}
        by_topic: dict[str, list[BucketResult]] = defaultdict(list)
        for (topic, _), result in counted.items():
            by_topic[topic].append(result)
        topics = set(by_topic) | self._expected.configured_topics
        published: dict[str, dict[str, int]] = {}
        subs_out: dict[tuple[str, str], dict[str, SubscriptionWindow]] = {}
        for topic in sorted(topics):
            results = by_topic.get(topic, [])
            standing = self._expected.standing(topic)
            published[topic] = {}
            for window in self._windows:
                in_window = [r for r in results if r.start >= frontier - window.length]
                count = sum(r.published for r in in_window)
                published[topic][window.label] = count
                seen = {
                    sub
                    for r in in_window
                    for sub in r.subscriptions
                    if not self._expected.excluded(topic, sub)
                }
                for sub in sorted(standing | seen):
                    counts = [r.subscriptions.get(sub, BucketCounts()) for r in in_window]
                    subs_out.setdefault((topic, sub), {})[window.label] = SubscriptionWindow(
                        published=count,
                        received=sum(c.received for c in counts),
                        duplicates=sum(c.duplicates for c in counts),
                        unmatched=sum(c.unmatched for c in counts),
                    )
        return Snapshot(now, frontier, self._bucket, self._windows, published, subs_out, counted)


def _group(
    events: Iterable[PublishedEvent], receipts: Iterable[ReceiptSummary], bucket: timedelta
) -> tuple[
    dict[BucketKey, dict[str, PublishedEvent]],
    dict[BucketKey, dict[str, list[ReceiptSummary]]],
]:
    """Publish records by (topic, bucket) and eventID; receipts by (topic, bucket), subscription."""
    published: dict[BucketKey, dict[str, PublishedEvent]] = defaultdict(dict)
    for event in events:
        published[(event.topic, floor_to_bucket(event.publish_time, bucket))][event.event_id] = (
            event
        )
    received: dict[BucketKey, dict[str, list[ReceiptSummary]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for receipt in receipts:
        key = (receipt.topic, floor_to_bucket(receipt.publish_time, bucket))
        received[key][receipt.subscription].append(receipt)
    return published, received


def evaluate_buckets(
    events: Iterable[PublishedEvent], receipts: Iterable[ReceiptSummary], bucket: timedelta
) -> list[BucketResult]:
    """Bucket results from the records of whole buckets, comparing id sets per bucket."""
    published, received = _group(events, receipts, bucket)
    out = []
    for key in sorted(set(published) | set(received)):
        ids = published.get(key, {})
        counts = {}
        for sub, items in received.get(key, {}).items():
            matched = sum(1 for r in items if r.event_id in ids)
            counts[sub] = BucketCounts(
                received=matched,
                duplicates=sum(max(0, r.deliveries - 1) for r in items),
                unmatched=len(items) - matched,
            )
        out.append(BucketResult(key[0], key[1], len(ids), counts))
    return out


def missed_as_evaluated(
    snapshot: Snapshot,
    topic: str,
    subscription: str,
    window: Window,
    events: Iterable[PublishedEvent],
    receipts: Iterable[ReceiptSummary],
) -> list[PublishedEvent] | None:
    """The missed events behind the snapshot's `missed` gauge, oldest first.

    `events` and `receipts` are the window's records written before the evaluation
    (`ExporterStore.window_records`). Records only accumulate, so when they reproduce the
    evaluation's published and received count of every bucket, they are exactly the records
    it compared. When they do not (a record stamped before the evaluation but stored after it
    read that bucket), None: the next evaluation re-reads that bucket.
    """
    frontier = snapshot.frontier
    start = frontier - window.length
    stats = snapshot.subscriptions.get((topic, subscription), {}).get(window.label)
    if stats is None:
        return None
    published, received = _group(
        (e for e in events if e.topic == topic and start <= e.publish_time < frontier),
        (
            r
            for r in receipts
            if r.topic == topic
            and r.subscription == subscription
            and start <= r.publish_time < frontier
        ),
        snapshot.bucket,
    )
    stored = {k: r for k, r in snapshot.buckets.items() if k[0] == topic and k[1] >= start}
    missed: list[PublishedEvent] = []
    for key in set(published) | set(stored):
        ids = published.get(key, {})
        got = {r.event_id for r in received.get(key, {}).get(subscription, ()) if r.event_id in ids}
        result = stored.get(key)
        evaluated = (
            (result.published, result.subscriptions.get(subscription, BucketCounts()).received)
            if result
            else (0, 0)
        )
        if (len(ids), len(got)) != evaluated:
            return None
        missed.extend(e for event_id, e in ids.items() if event_id not in got)
    if len(missed) != stats.missed:
        return None
    return sorted(missed, key=lambda e: (e.publish_time, e.event_id))


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
