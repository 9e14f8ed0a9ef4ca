"""What one evaluation reports: per topic, subscription and window, and the bucket results
behind it. Read by the collector, the HTTP API, the status page and event stories; made by the
evaluator (eventaudit.exporter.evaluator), which none of its readers need."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

from eventaudit.exporter.buckets import Window, completion_rate
from eventaudit.exporter.subscriptions import Expectation
from eventaudit.journal import BucketDigest, MissedEvent, parse_listed
from eventaudit.records import BucketCounts, BucketResult

log = logging.getLogger(__name__)

BucketKey = tuple[str, datetime]


class DigestReader(Protocol):
    """What a missed listing reads past the events a bucket result lists."""

    def load_digest(self, topic: str, start: datetime) -> BucketDigest:
        """The stored digest of one bucket (empty when none is)."""
        ...


@dataclass(frozen=True, slots=True)
class SubscriptionWindow:
    """Completion of one subscription over one window."""

    published: int
    """the events expected on it: published, or with a filter those it matches"""
    received: int
    duplicates: int
    unmatched: int
    filtered: int = 0
    dead_lettered: int = 0

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
    merged: int = 0
    """The digests' merge stamp of this evaluation: entries folded later are not counted."""
    expectations: Mapping[tuple[str, str], Expectation] = field(default_factory=dict)
    """What each reported subscription was expected to receive."""
    unsupported: Mapping[tuple[str, str], str] = field(default_factory=dict)
    """Subscriptions not reported because their filter cannot be evaluated, and why."""
    topic_frontiers: Mapping[str, datetime] = field(default_factory=dict)
    """Topics served to another frontier than `frontier`: the one their holder settled."""

    def frontier_of(self, topic: str) -> datetime:
        """The frontier `topic`'s windows end at."""
        return self.topic_frontiers.get(topic, self.frontier)

    def window(self, label: str) -> Window | None:
        """The configured window with this label."""
        return next((w for w in self.windows if w.label == label), None)


def subscription_window(
    expectation: Expectation,
    subscription: str,
    in_window: list[BucketResult],
    frontier: datetime,
    bucket: timedelta,
) -> SubscriptionWindow | None:
    """One subscription's counts over a window's bucket results; None when it is not reported
    there (its filter cannot be evaluated, it is gone from the listing and settled, or it is
    neither configured nor listed and has no receipt in the window)."""
    if not expectation.reported(frontier):
        return None
    buckets = [
        (r, c)
        for r in in_window
        if counts_bucket(expectation, r, subscription, bucket)
        for c in (r.subscriptions.get(subscription, BucketCounts()),)
    ]
    if not expectation.standing and not any(c.heard for _, c in buckets):
        return None
    return SubscriptionWindow(
        published=sum(r.published if c.expected is None else c.expected for r, c in buckets),
        received=sum(c.received for _, c in buckets),
        duplicates=sum(c.duplicates for _, c in buckets),
        unmatched=sum(c.unmatched for _, c in buckets),
        filtered=sum(c.filtered for _, c in buckets),
        dead_lettered=sum(c.dead_lettered for _, c in buckets),
    )


def counts_bucket(
    expectation: Expectation, result: BucketResult, subscription: str, bucket: timedelta
) -> bool:
    """Whether a bucket result counts for a subscription: a bucket it existed for, whose counts
    were made with the filter it has now."""
    return expectation.covers(result.start, bucket) and (
        result.subscriptions.get(subscription, BucketCounts()).filter == expectation.filter_text
    )


def list_missed(
    snapshot: Snapshot,
    store: DigestReader,
    topic: str,
    subscription: str,
    window: Window,
    keep: int,
) -> list[MissedEvent] | None:
    """The missed events behind the snapshot's `missed` gauge, oldest first, at most `keep`.

    Each bucket result lists its oldest missed events (MISSED_KEPT per subscription): most
    listings read nothing from the store. Past that, the digest of the bucket is read (by
    `_id`) as the evaluation saw it (entries folded later are left out); None when it does not
    reproduce the evaluation's counts (which would be a defect: the caller answers 503).
    """
    start = snapshot.frontier_of(topic) - window.length
    listed: list[MissedEvent] = []
    expectation = snapshot.expectations.get((topic, subscription), Expectation())
    for key in sorted(k for k in snapshot.buckets if k[0] == topic and k[1] >= start):
        result = snapshot.buckets[key]
        if not counts_bucket(expectation, result, subscription, snapshot.bucket):
            continue
        counts = result.subscriptions.get(subscription, BucketCounts())
        expected = result.published if counts.expected is None else counts.expected
        received = counts.received
        missing = expected - received
        if missing == 0:
            continue
        need = keep - len(listed)
        kept = (
            result.missed.get(subscription, ())
            if subscription in result.subscriptions
            else result.oldest
        )
        events = [e for e in map(parse_listed, kept[:need]) if e is not None]
        if len(events) < min(need, missing) or len(kept) > missing:
            # More than the result lists are asked for (or it does not read back): the digest,
            # as the evaluation saw it.
            # Entries folded by the result's merge stamp: the replica that evaluated the topic
            # (maybe another) stamped its folds, not this snapshot.
            digest = store.load_digest(topic, key[1])
            seen = digest.counts_as_of(subscription, result.merged, expectation.filter)
            if seen != (expected, received):
                return None
            events = digest.missed(subscription, result.merged, expectation.filter)
        listed.extend(events[:need])
        if len(listed) >= keep:
            break
    return listed


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
