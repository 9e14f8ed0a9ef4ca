"""What must survive: evaluator progress across restarts, and every record path's losses counted."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from eventaudit.contract import PUBLISH_TIME_TOLERANCE, utc_now_ms
from eventaudit.exporter.buckets import Window, floor_to_bucket
from eventaudit.exporter.evaluator import Evaluator
from eventaudit.exporter.subscriptions import ExpectedSubscriptions
from eventaudit.records import PublishRecord, Receipt
from eventaudit.store import AuditStore, MongoStore
from tests.conftest import unique, wait_for
from tests.fakes import MemoryStore, SteadyEvaluator
from tests.integration.harness import BUCKET, SETTLE, audited_publisher


def _seed(
    store: MongoStore,
    topic: str,
    sub: str,
    start: datetime,
    n: int,
    lose: set[int],
    prefix: str = "e",
) -> None:
    times = [start + timedelta(milliseconds=137 * i) for i in range(n)]
    records = [
        PublishRecord(f"{prefix}{i}", "t" * 32, topic, "{}", str(i), t) for i, t in enumerate(times)
    ]
    store.insert_publish_records(records, utc_now_ms())
    store.record_receipts(
        [
            Receipt(sub, f"{prefix}{i}", topic, None, str(i), t, t, t)
            for i, t in enumerate(times)
            if i not in lose
        ],
        utc_now_ms(),
    )


def _evaluator(store: MongoStore, topic: str, sub: str) -> Evaluator:
    expected = ExpectedSubscriptions({topic: {sub}}, set(), None)
    return SteadyEvaluator(store, expected, [Window.parse("5m", BUCKET)], BUCKET, SETTLE)


def _collections(store: MongoStore, prefix: str) -> frozenset[str]:
    return frozenset(n for n in store.db.list_collection_names() if n.startswith(prefix))


def _documents(store: MongoStore, prefix: str) -> list[dict[str, Any]]:
    return [d for n in sorted(_collections(store, prefix)) for d in store.db[n].find({})]


def test_restarted_evaluator_resumes_from_stored_results(store) -> None:
    topic, sub = "topic-resume", "topic-resume-sub"
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=60)
    _seed(store, topic, sub, start, 200, lose={3, 50, 150})
    now = datetime.now(UTC)
    evaluator = _evaluator(store, topic, sub)
    first = evaluator.evaluate(now)
    stats = first.subscriptions[(topic, sub)]["5m"]
    assert (stats.published, stats.received, stats.missed) == (200, 197, 3)
    taken = _collections(store, "EventJournal")
    assert taken and taken == evaluator.folded_journals  # folded whole, dropped a grace later
    assert all(n.startswith("EventJournalFolded_") for n in taken)

    # A new process: same numbers from the stored buckets, and new buckets evaluated on top.
    _seed(store, topic, sub, first.frontier + timedelta(milliseconds=1), 5, lose={0}, prefix="late")
    later = first.frontier + timedelta(seconds=2) + SETTLE + BUCKET
    second = _evaluator(store, topic, sub).evaluate(max(later, datetime.now(UTC)))
    stats = second.subscriptions[(topic, sub)]["5m"]
    assert (stats.published, stats.received, stats.missed) == (205, 201, 4)


def test_retention_deletes_old_records_and_old_buckets_are_pruned(store) -> None:
    topic, sub = "topic-retention", "topic-retention-sub"
    now = datetime.now(UTC)
    old = floor_to_bucket(now - timedelta(days=8), BUCKET)
    _seed(store, topic, sub, old, 10, lose={4})
    letter = Receipt(sub, "dead-1", topic, None, "m", old, old, old, 5, f"{sub}-dlq")
    store.record_receipts([letter], utc_now_ms())
    _evaluator(store, topic, sub).evaluate(old + timedelta(minutes=1))  # folded back then
    # 10 old events span two 1 s buckets (the dead letter is in the first).
    assert len({d["digest"] for d in _documents(store, "BucketDigest_")}) == 2
    store.insert_publish_records(
        [PublishRecord("fresh", "t" * 32, topic, "{}", "x", utc_now_ms())], utc_now_ms()
    )
    _evaluator(store, topic, sub).evaluate(now)
    # No window reaches the old buckets, but their digests and results go only with
    # retention: another exporter of the database may have longer windows (issue 17, case 15).
    assert len({d["digest"] for d in _documents(store, "BucketDigest_")}) == 3
    assert len(_documents(store, "BucketResult_")) == 3
    deleted = store.delete_older_than(now - timedelta(days=7))
    assert deleted == {
        "PublishRecord": 1,  # the hour holding the 10 old records (hours are dropped)
        "ReceivedRecord": 1,
        "DeadLetterRecord": 1,
        "BucketDigest": 1,  # the 10-minute collections of the old buckets
        "BucketResult": 1,
    }
    assert [d["topic"] for d in _documents(store, "BucketDigest_")] == [topic]
    assert len(_documents(store, "BucketResult_")) == 1
    assert [d["eventID"] for d in store.published.find({})] == ["fresh"]
    assert store.received.count_documents({}) == 0
    assert store.dead_letters.count_documents({}) == 0
    assert store.delete_older_than(now - timedelta(days=7)) == dict.fromkeys(deleted, 0)


def test_retention_reaches_records_by_write_time(store) -> None:
    """A record with a far-future publishTime, written long ago, is deleted like any other."""
    topic, sub = "topic-far-future", "topic-far-future-sub"
    now = datetime.now(UTC).replace(microsecond=0)
    far = [datetime(2100, 1, 1, tzinfo=UTC), datetime(9999, 12, 31, tzinfo=UTC)]
    for written, prefix in ((now - timedelta(days=8), "stale"), (now, "kept")):
        for i, when in enumerate(far):
            event = f"{prefix}-{i}"
            store.insert_publish_records(
                [PublishRecord(event, "t" * 32, topic, "{}", "m", when)], written
            )
            store.record_receipts(
                [Receipt(sub, event, topic, None, "m", when, written, written)], written
            )
    deleted = store.delete_older_than(now - timedelta(days=7))
    assert deleted == {  # hours dropped: each kind's stale records went to one
        "PublishRecord": 1,
        "ReceivedRecord": 1,
        "DeadLetterRecord": 0,
        "BucketDigest": 0,
        "BucketResult": 0,
    }
    assert sorted(d["eventID"] for d in store.published.find({})) == ["kept-0", "kept-1"]
    assert sorted(d["eventID"] for d in store.received.find({})) == ["kept-0", "kept-1"]


@pytest.fixture(params=["ferretdb", "memory"])
def audit_store(request: pytest.FixtureRequest) -> Iterator[AuditStore]:
    if request.param == "memory":
        yield MemoryStore()
    else:
        yield request.getfixturevalue("store")


CUTOFF = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
MS = timedelta(milliseconds=1)
TOLERANCE = PUBLISH_TIME_TOLERANCE
FAR = datetime(2100, 1, 1, tzinfo=UTC)
LAST = datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)
# (eventID, publishTime, createdTime, deleted by delete_older_than(CUTOFF))
RETENTION_BOUNDARIES = [
    ("published-before-cutoff", CUTOFF - MS, CUTOFF + timedelta(minutes=5), True),
    ("published-at-cutoff", CUTOFF, CUTOFF, False),
    # Inside the window, written before the cutoff: a publishTime may be up to the tolerance
    # after its write (a subscriber keeps one within an hour of the broker's publish time).
    ("ahead-of-its-write-by-the-tolerance", CUTOFF + TOLERANCE - MS, CUTOFF - MS, False),
    ("ahead-by-the-tolerance-written-earlier", CUTOFF, CUTOFF - TOLERANCE, False),
    ("far-future-written-at-the-bound", FAR, CUTOFF - TOLERANCE, False),
    ("far-future-written-before-the-bound", FAR, CUTOFF - TOLERANCE - MS, True),
    ("year-9999-written-long-ago", LAST, CUTOFF - timedelta(days=30), True),
    ("in-window-written-late", CUTOFF + timedelta(seconds=1), CUTOFF + timedelta(days=1), False),
]  # fmt: skip


def _event_ids(store: AuditStore) -> tuple[list[str], list[str]]:
    if isinstance(store, MongoStore):
        published = [d["eventID"] for d in store.published.find({})]
        received = [d["eventID"] for d in store.received.find({})]
    else:
        assert isinstance(store, MemoryStore)
        published = [d["eventID"] for d in store.published.values()]
        received = [d["eventID"] for d in store.received.values()]
    return sorted(published), sorted(received)


def test_retention_never_deletes_a_record_published_after_the_cutoff(
    audit_store: AuditStore,
) -> None:
    """Records go by publishTime; by write time only past the tolerance a publishTime may run
    ahead of its write, so a far-future publishTime is deleted and nothing in a window is;
    digests and results go by their bucket."""
    topic, sub = "topic-retention-bounds", "topic-retention-bounds-sub"
    for event, published, written, _ in RETENTION_BOUNDARIES:
        audit_store.insert_publish_records(
            [PublishRecord(event, "t" * 32, topic, "{}", "m", published)], written
        )
        audit_store.record_receipts(
            [Receipt(sub, event, topic, None, "m", published, written, written)], written
        )
    expected = ExpectedSubscriptions({topic: {sub}}, set(), None)
    evaluator = SteadyEvaluator(audit_store, expected, [Window.parse("1h", BUCKET)], BUCKET, SETTLE)
    evaluator.evaluate(CUTOFF + timedelta(minutes=10))
    assert audit_store.delete_older_than(CUTOFF) == {
        "PublishRecord": 2,  # hours: 11:00 (published or written just before), and 30 days ago
        "ReceivedRecord": 2,
        "DeadLetterRecord": 0,
        "BucketDigest": 1,
        "BucketResult": 1,
    }
    kept = sorted(event for event, *_, is_deleted in RETENTION_BOUNDARIES if not is_deleted)
    assert _event_ids(audit_store) == (kept, kept)
    since = CUTOFF - timedelta(days=1)
    assert sorted(r.result.start for r in audit_store.load_results(since)) == [
        CUTOFF,
        CUTOFF + timedelta(seconds=1),  # 1 s buckets
        CUTOFF + TOLERANCE - timedelta(seconds=1),
    ]  # far-future publish times are not folded (too_new), their records go by write time


def test_publisher_buffer_overflow_is_counted_and_the_rest_recovers(
    private_ferret, topic_factory
) -> None:
    topic, _ = topic_factory(1)
    store = MongoStore(private_ferret.uri, unique("db").replace("-", "_"), timeout_seconds=1)
    store.ping()
    with audited_publisher(store, capacity=5) as pub:
        private_ferret.stop()
        events = [pub.publisher.publish(topic, {"n": i}) for i in range(12)]
        assert all(e.message_id(timeout=30) for e in events)  # publishing is unaffected

        def dropped() -> float:
            return (
                pub.registry.get_sample_value(
                    "eventaudit_publisher_records_total", {"outcome": "dropped"}
                )
                or 0.0
            )

        # 12 accepted by Pub/Sub; the buffer holds 5 (+ at most one batch in flight).
        wait_for(
            lambda: dropped() + pub.buffer.depth() == 12, 30, "every record buffered or counted"
        )
        assert dropped() >= 6
        kept = pub.buffer.depth()
        private_ferret.restart()
        wait_for(lambda: pub.buffer.depth() == 0, 60, "the buffer to drain after the restart")
        assert store.published.count_documents({"topic": topic}) == kept
        assert (
            pub.registry.get_sample_value(
                "eventaudit_publisher_records_total", {"outcome": "written"}
            )
            == kept
        )
    store.close()
