"""Folding journal entries into bucket digests: which bucket each entry counts in, what is
too old or too far ahead, a retried publish's deliveries moved to its stored record's bucket.

No writes and no clock: `fold` takes the journal's new batches, the digests known, and a
reader for the others (the one read it makes), and returns what changed; the evaluator stores
it. Table-driven tests in tests/unit/test_fold.py."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from eventaudit.contract import PUBLISH_TIME_TOLERANCE, epoch_ms, from_epoch_ms
from eventaudit.exporter.buckets import settled_frontier
from eventaudit.exporter.snapshot import BucketKey
from eventaudit.journal import BucketDigest, JournalBatch, JournalEntry
from eventaudit.partitions import journal_key
from eventaudit.records import BucketResult

JOURNAL_OUTCOMES = ("folded", "too_old", "too_new", "malformed", "misfiled")
LATE_FOLD_MS = 24 * 3_600_000
"""How much older than any window a late entry's bucket may be and still be folded into its
stored digest (counted `too_old` beyond): every stored result stays right for whichever
replica serves it (a longer window, a clock behind), at one digest read per such bucket."""


@dataclass(frozen=True, slots=True)
class FoldRules:
    """What decides where an entry counts: bucket length, settle delay, the longest window."""

    bucket: timedelta
    settle: timedelta
    span: timedelta


@dataclass
class Folded:
    """What one round of journal documents changed."""

    touched: dict[BucketKey, BucketDigest] = field(default_factory=dict)
    """every digest an entry was folded into (changed or not)"""
    changed: set[BucketKey] = field(default_factory=set)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(JOURNAL_OUTCOMES, 0))
    first_receipts: dict[tuple[str, str], int] = field(default_factory=dict)
    """per (topic, subscription): the earliest publish time (ms) of a receipt folded"""
    topics: set[str] = field(default_factory=set)
    misfiled: list[JournalEntry] = field(default_factory=list)
    """entries of topics of another journal key (journaled again under theirs)"""


def fold(
    batches: tuple[JournalBatch, ...],
    key: str,
    rules: FoldRules,
    span: tuple[datetime, datetime],
    merged: int,
    cached: Mapping[BucketKey, BucketDigest],
    results: Mapping[BucketKey, BucketResult],
    load: Callable[[str, datetime], BucketDigest],
) -> Folded:
    """Fold one round of documents of the journal of `key` into digests stamped `merged`.

    `span`: the buckets (oldest, newest) this process folds into; `cached`: digests held;
    `results`: the results held (a bucket with none has no stored digest, unless a fold
    stored one before failing); `load`: reads a stored digest (the only read)."""
    out = Folded()
    oldest, newest = (epoch_ms(t) for t in span)
    bucket_ms = rules.bucket // timedelta(milliseconds=1)
    starts: dict[int, datetime] = {}  # bucket start in ms -> as a datetime, made once

    def bounds(written: datetime | None) -> tuple[int, int]:
        """Buckets (ms) an entry is folded in: too old, or too far ahead, both by this
        clock and by its writer's when it wrote (a clock of this process stepped, or
        started, far off drops nothing); late entries up to LATE_FOLD_MS."""
        if written is None:
            return oldest - LATE_FOLD_MS, newest
        settled = settled_frontier(written, rules.settle, rules.bucket)
        return (
            min(oldest, epoch_ms(settled - rules.span)) - LATE_FOLD_MS,
            max(newest, epoch_ms(written + PUBLISH_TIME_TOLERANCE)),
        )

    def one(entry: JournalEntry, floor: int, ceiling: int, outcome: bool = True) -> None:
        """Fold one entry; `outcome`: count it (an entry read from the journal)."""
        start_ms = entry.publish_ms - entry.publish_ms % bucket_ms
        if start_ms < floor or start_ms > ceiling:
            if outcome:  # no window reaches its bucket, or a clock far ahead (not ours)
                out.counts["too_old" if start_ms < floor else "too_new"] += 1
            return
        if entry.alias_of is not None and entry.alias_of - entry.alias_of % bucket_ms == start_ms:
            out.counts["folded"] += outcome  # published again within its own bucket
            return
        start = starts.get(start_ms) or starts.setdefault(start_ms, from_epoch_ms(start_ms))
        at = (entry.topic, start)
        digest = out.touched.get(at) or cached.get(at)
        if digest is None:
            known = results.get(at)
            if known is None and start_ms >= oldest:
                # No result, so no digest either, but one a fold stored before failing
                # (its entries are still in the journal, being folded again now).
                digest = BucketDigest(entry.topic, start)
            else:
                # A late entry for a bucket no window of this process reaches any more is
                # folded into its stored digest too, so its stored result is right for
                # whichever replica still serves it (a clock behind, a longer window).
                digest = load(entry.topic, start)
        out.touched[at] = digest
        if digest.merge(entry, merged):
            out.changed.add(at)
        if entry.subscription is not None and not entry.dead_letter:
            sub = (entry.topic, entry.subscription)
            out.first_receipts[sub] = min(out.first_receipts.get(sub, entry.publish_ms),
                                          entry.publish_ms)  # fmt: skip
        out.counts["folded"] += outcome

    for batch in batches:
        out.counts["malformed"] += batch.malformed
        floor, ceiling = bounds(batch.written)
        for entry in batch.entries:
            if entry.topic not in out.topics:
                if journal_key(entry.topic) != key:
                    out.misfiled.append(entry)
                    continue
                out.topics.add(entry.topic)
            one(entry, floor, ceiling)
    # Deliveries of a message published again (a caller's retry) count for the event of the
    # stored record, in its bucket: moved there whichever of the two came first.
    floor, ceiling = bounds(None)
    for digest in [d for d in out.touched.values() if d.aliases]:
        for entry in digest.forwards():
            one(entry, floor, ceiling, outcome=False)  # read once, counted once
    out.counts["misfiled"] = len(out.misfiled)
    return out
