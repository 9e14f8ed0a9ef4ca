"""Where each journal entry counts: the fold alone (no store, no clock), table-driven."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from eventaudit.contract import epoch_ms
from eventaudit.exporter.fold import LATE_FOLD_MS, FoldRules, fold
from eventaudit.journal import BucketDigest, JournalBatch, JournalEntry
from eventaudit.partitions import journal_key
from eventaudit.records import BucketCounts, BucketResult

RULES = FoldRules(timedelta(seconds=10), timedelta(seconds=30), timedelta(minutes=5))
NOW = datetime(2026, 12, 7, 12, 0, 0, tzinfo=UTC)
SPAN = (NOW - timedelta(minutes=6), NOW + timedelta(hours=1))
TOPIC = "orders"
KEY = journal_key(TOPIC)
OTHER = next(t for t in (f"t{i}" for i in range(100)) if journal_key(t) != KEY)


def ms(moment: datetime) -> int:
    return epoch_ms(moment)


def publish(at: datetime, topic: str = TOPIC, event: str = "e1", **kw: int) -> JournalEntry:
    return JournalEntry(topic, event, ms(at), None, "t" * 32, alias_of=kw.get("alias_of"))


def receipt(at: datetime, event: str = "e1") -> JournalEntry:
    return JournalEntry(TOPIC, event, ms(at), "orders-sub", "", 1)


MINUTE_AGO = NOW - timedelta(minutes=1)
LONG_AGO = SPAN[0] - timedelta(milliseconds=LATE_FOLD_MS + 10_000)
LATE = SPAN[0] - timedelta(hours=1)  # older than any window, within LATE_FOLD_MS


@pytest.mark.parametrize(
    ("entries", "written", "outcome", "buckets", "loads"),
    [
        ([publish(MINUTE_AGO)], NOW, "folded", 1, 0),
        ([publish(LONG_AGO)], NOW, "too_old", 0, 0),
        # Too far ahead of the writer's clock when it wrote, and of this process's.
        ([publish(NOW + timedelta(hours=2))], NOW, "too_new", 0, 0),
        # Ahead of this process's span, but not of its writer's clock: folded.
        ([publish(SPAN[1] + timedelta(minutes=5))], SPAN[1], "folded", 1, 0),
        # A late entry, older than every window: folded into its stored digest (one read).
        ([publish(LATE)], NOW, "folded", 1, 1),
        ([publish(MINUTE_AGO, OTHER)], NOW, "misfiled", 0, 0),
        # Published again within its own bucket: nothing to move.
        ([publish(MINUTE_AGO, alias_of=ms(MINUTE_AGO) + 1)], NOW, "folded", 0, 0),
    ],
)
def test_where_an_entry_counts(
    entries: list[JournalEntry], written: datetime, outcome: str, buckets: int, loads: int
) -> None:
    read: list[tuple[str, datetime]] = []

    def load(topic: str, start: datetime) -> BucketDigest:
        read.append((topic, start))
        return BucketDigest(topic, start)

    batch = JournalBatch("b1", tuple(entries), 0, written)
    out = fold((batch,), KEY, RULES, SPAN, 7, {}, {}, load)
    assert {k: v for k, v in out.counts.items() if v} == {outcome: len(entries)}
    assert (len(out.touched), len(read)) == (buckets, loads)
    assert out.misfiled == (entries if outcome == "misfiled" else [])


def test_a_bucket_with_a_result_is_read_before_it_is_folded_into() -> None:
    start = datetime.fromtimestamp(ms(MINUTE_AGO) // 10_000 * 10, UTC)
    stored = BucketDigest(TOPIC, start)
    stored.merge(publish(MINUTE_AGO, event="e0"), 3)
    out = fold(
        (JournalBatch("b1", (receipt(MINUTE_AGO, "e0"),), 0, NOW),),
        KEY, RULES, SPAN, 7, {}, {(TOPIC, start): BucketResult(TOPIC, start, 1, {})},
        lambda topic, at: stored,
    )  # fmt: skip
    assert out.touched[(TOPIC, start)] is stored
    assert out.changed == {(TOPIC, start)}
    assert out.first_receipts == {(TOPIC, "orders-sub"): ms(MINUTE_AGO)}


def test_malformed_documents_are_counted_and_nothing_is_read() -> None:
    out = fold((JournalBatch(None, (), 3, None),), KEY, RULES, SPAN, 7, {}, {}, _no_reads)
    assert {k: v for k, v in out.counts.items() if v} == {"malformed": 3}


def test_a_retried_publish_moves_its_deliveries_to_the_stored_records_bucket() -> None:
    first = MINUTE_AGO
    retry = first + timedelta(seconds=15)  # another bucket
    out = fold(
        (JournalBatch("b1", (publish(first), publish(retry, alias_of=ms(first)),
                             receipt(retry)), 0, NOW),),
        KEY, RULES, SPAN, 7, {}, {}, _no_reads,
    )  # fmt: skip
    counted = {
        start: (r.published, r.subscriptions.get("orders-sub", BucketCounts()).received)
        for (_, start), d in out.touched.items()
        for r in (d.result({}),)
    }
    first_bucket = datetime.fromtimestamp(ms(first) // 10_000 * 10, UTC)
    assert counted[first_bucket] == (1, 1)  # the event, and its receipt moved there
    assert sum(p for p, _ in counted.values()) == 1 and sum(g for _, g in counted.values()) == 1
    assert out.counts["folded"] == 3


def _no_reads(topic: str, start: datetime) -> BucketDigest:
    raise AssertionError(f"no digest read expected ({topic}, {start})")
