"""Evaluator semantics on the in-memory store with an explicit clock: windows and expected-ness."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest

from eventaudit.exporter.buckets import Window
from eventaudit.exporter.evaluator import Evaluator
from eventaudit.exporter.snapshot import Snapshot
from eventaudit.exporter.subscriptions import ExpectedSubscriptions
from eventaudit.records import PublishRecord, Receipt
from tests.fakes import MemoryStore, SteadyEvaluator

BUCKET = timedelta(seconds=10)
WINDOWS = [Window("1m", timedelta(minutes=1)), Window("5m", timedelta(minutes=5))]
HOUR_WINDOWS = [*WINDOWS, Window("1h", timedelta(hours=1))]
TOPIC = "orders"
SUB = "orders-audit"


def at(h: int, m: int, s: int) -> datetime:
    return datetime(2026, 11, 27, h, m, s, tzinfo=UTC)


def publish(store: MemoryStore, event_id: str, when: datetime, topic: str = TOPIC) -> None:
    """A publish record written when it was published."""
    store.insert_publish_records([PublishRecord(event_id, "t" * 32, topic, "{}", "m", when)], when)


def receive(
    store: MemoryStore, sub: str, event_id: str, published: datetime, topic: str = TOPIC
) -> None:
    """A receipt delivered and written a second after the publish."""
    got = published + timedelta(seconds=1)
    store.record_receipts(
        [Receipt(sub, event_id, topic, None, "m", published, published, got)], got
    )


def evaluator(
    store: MemoryStore,
    settle: timedelta = timedelta(seconds=30),
    expected: ExpectedSubscriptions | None = None,
    windows: list[Window] = WINDOWS,
) -> Evaluator:
    expected = expected or ExpectedSubscriptions({TOPIC: {SUB}}, set(), None)
    return SteadyEvaluator(store, expected, windows, BUCKET, settle)


def numbers(snapshot: Snapshot, window: str) -> tuple[int, int]:
    stats = snapshot.subscriptions[(TOPIC, SUB)][window]
    return stats.published, stats.received


def _traffic_in_last_half_minute() -> MemoryStore:
    """One event a second in [12:01:30, 12:02:00), each received."""
    store = MemoryStore()
    for i in range(30):
        when = at(12, 1, 30) + timedelta(seconds=i)
        publish(store, f"e{i}", when)
        receive(store, SUB, f"e{i}", when)
    return store


def _restart_with_longer_settle(store: MemoryStore, first: Evaluator) -> Snapshot:
    return evaluator(store, settle=timedelta(seconds=60)).evaluate(at(12, 2, 35))


def _clock_stepped_back(store: MemoryStore, first: Evaluator) -> Snapshot:
    return first.evaluate(at(12, 2, 5))


@pytest.mark.parametrize("move_back", [_restart_with_longer_settle, _clock_stepped_back])
def test_window_ends_at_the_frontier_when_the_frontier_moves_back(move_back) -> None:
    store = _traffic_in_last_half_minute()
    first = evaluator(store)
    before = first.evaluate(at(12, 2, 30))
    assert before.frontier == at(12, 2, 0)
    assert numbers(before, "1m") == (30, 30)

    after = move_back(store, first)
    # Frontier 12:01:30: the 1m window is [12:00:30, 12:01:30), where nothing was published.
    # The stored buckets [12:01:30, 12:02:00) lie after the frontier and must not be counted.
    assert after.frontier == at(12, 1, 30)
    for window in ("1m", "5m"):
        assert numbers(after, window) == (0, 0)
        assert after.published[TOPIC][window] == 0
        assert math.isnan(after.subscriptions[(TOPIC, SUB)][window].completion_rate)


def test_frontier_moving_forward_again_counts_each_event_once() -> None:
    store = _traffic_in_last_half_minute()
    first = evaluator(store)
    first.evaluate(at(12, 2, 30))
    first.evaluate(at(12, 2, 5))
    again = first.evaluate(at(12, 2, 31))
    assert again.frontier == at(12, 2, 0)
    assert numbers(again, "1m") == (30, 30)
    restarted = evaluator(store).evaluate(at(12, 2, 40))
    assert numbers(restarted, "1m") == (30, 30)


# Evaluated at 12:00:35 with a 30 s settle delay: frontier 12:00:00, so the windows are
# 1m = [11:59, 12:00), 5m = [11:55, 12:00), 1h = [11:00, 12:00).
NOW = at(12, 0, 35)
ALL = {"1m", "5m", "1h"}


def _expected_setup() -> tuple[MemoryStore, ExpectedSubscriptions]:
    store = MemoryStore()
    # Background traffic: one event a minute, so every window has published events.
    for minute in range(60):
        publish(store, f"bg{minute}", at(11, minute, 5))
    receive(store, "old", "bg30", at(11, 30, 5))  # seen 30 minutes ago only
    receive(store, "recent", "bg57", at(11, 57, 5))  # seen 3 minutes ago
    receive(store, "fresh", "bg59", at(11, 59, 5))  # seen within the last minute
    receive(store, "orphan", "never-published", at(11, 30, 5))  # only an unmatched receipt
    receive(store, "excluded", "bg59", at(11, 59, 5))
    expected = ExpectedSubscriptions(
        {TOPIC: {"configured"}},
        {(TOPIC, "excluded")},
        lambda topic: ["listed", "excluded"] if topic == TOPIC else [],
    )
    return store, expected


@pytest.mark.parametrize(
    ("sub", "windows", "received_1h", "unmatched_1h"),
    [
        # Configured or currently listed by Pub/Sub: expected in every window, even at 0.
        ("configured", ALL, 0, 0),
        ("listed", ALL, 0, 0),
        # Otherwise reported only in the windows whose buckets hold a receipt of it.
        ("old", {"1h"}, 1, 0),
        ("recent", {"5m", "1h"}, 1, 0),
        ("fresh", ALL, 1, 0),
        ("orphan", {"1h"}, 0, 1),
        # Excluded: never reported, receipts or not, listed or not.
        ("excluded", set(), None, None),
        ("never-seen", set(), None, None),
    ],
)
def test_expected_subscriptions_are_decided_per_window(
    sub: str, windows: set[str], received_1h: int | None, unmatched_1h: int | None
) -> None:
    store, expected = _expected_setup()
    snapshot = evaluator(store, expected=expected, windows=HOUR_WINDOWS).evaluate(NOW)
    assert snapshot.frontier == at(12, 0, 0)
    assert snapshot.published[TOPIC] == {"1m": 1, "5m": 5, "1h": 60}
    reported = snapshot.subscriptions.get((TOPIC, sub), {})
    assert set(reported) == windows
    if "1h" in reported:
        stats = reported["1h"]
        assert (stats.published, stats.received, stats.unmatched) == (
            60,
            received_1h,
            unmatched_1h,
        )
    if "1m" in reported:
        assert reported["1m"].published == 1


def test_a_subscription_gone_from_the_listing_leaves_the_short_windows() -> None:
    listing = ["going"]
    store = MemoryStore()
    for minute in range(60):
        publish(store, f"bg{minute}", at(11, minute, 5))
    receive(store, "going", "bg20", at(11, 20, 5))
    expected = ExpectedSubscriptions({TOPIC: set()}, set(), lambda topic: list(listing), 0)
    ev = evaluator(store, expected=expected, windows=HOUR_WINDOWS)
    listed = ev.evaluate(NOW).subscriptions[(TOPIC, "going")]
    assert set(listed) == ALL
    assert listed["5m"].completion_rate == 0.0
    listing.clear()  # deleted: no longer listed, never configured
    gone = ev.evaluate(NOW).subscriptions[(TOPIC, "going")]
    assert set(gone) == {"1h"}
    assert (gone["1h"].published, gone["1h"].received) == (60, 1)
    # Last listed at NOW (12:00:30): once the frontier passes it, its series are gone.
    assert (TOPIC, "going") not in ev.evaluate(NOW + timedelta(seconds=40)).subscriptions


# -- late records: found by when they became durable, not by the writer's earlier clocks ------


def _receipt(event_id: str, published: datetime, callback: datetime) -> Receipt:
    return Receipt(SUB, event_id, TOPIC, None, "m", published, published, callback)


def _slow_handler(store: MemoryStore, ev: Evaluator) -> None:
    # Callback at 12:00:01, the handler takes 44 s: written at 12:00:45, after the bucket of
    # 12:00:00 was evaluated (12:00:40) with the event missed.
    store.record_receipts([_receipt("e1", at(12, 0, 0), at(12, 0, 1))], at(12, 0, 45))


def _write_visible_late(store: MemoryStore, ev: Evaluator) -> None:
    # Stamped at 12:00:15, but the write (a busy store) only became visible after 12:00:40.
    store.record_receipts([_receipt("e1", at(12, 0, 0), at(12, 0, 1))], at(12, 0, 15))


def _redelivery_after_evaluation(store: MemoryStore, ev: Evaluator) -> None:
    # The first delivery was lost; a redelivery for an event whose receipt... is the first.
    store.record_receipts([_receipt("e1", at(12, 0, 0), at(12, 0, 44))], at(12, 0, 45))


@pytest.mark.parametrize(
    "late_write", [_slow_handler, _write_visible_late, _redelivery_after_evaluation]
)
def test_a_receipt_durable_after_its_bucket_was_evaluated_is_counted_late(late_write) -> None:
    store = MemoryStore()
    publish(store, "e1", at(12, 0, 0))
    ev = evaluator(store)
    assert numbers(ev.evaluate(at(12, 0, 40)), "1m") == (1, 0)  # missed, for now
    late_write(store, ev)
    for now in (at(12, 0, 50), at(12, 1, 0)):
        assert numbers(ev.evaluate(now), "1m") == (1, 1)  # counted late, not lost


def test_a_late_publish_record_turns_an_unmatched_receipt_into_a_received_one() -> None:
    store = MemoryStore()
    receive(store, SUB, "e1", at(12, 0, 0))
    ev = evaluator(store)
    first = ev.evaluate(at(12, 0, 40))
    assert numbers(first, "1m") == (0, 0)
    assert first.subscriptions[(TOPIC, SUB)]["1m"].unmatched == 1
    # The publisher's buffer is written after an outage: createdTime 12:00:55.
    store.insert_publish_records(
        [PublishRecord("e1", "t" * 32, TOPIC, "{}", "m", at(12, 0, 0))], at(12, 0, 55)
    )
    later = ev.evaluate(at(12, 1, 0))
    assert numbers(later, "1m") == (1, 1)
    assert later.subscriptions[(TOPIC, SUB)]["1m"].unmatched == 0


def test_a_late_receipt_is_found_after_a_restart_between_evaluations() -> None:
    store = MemoryStore()
    publish(store, "e1", at(12, 0, 0))
    assert numbers(evaluator(store).evaluate(at(12, 0, 40)), "1m") == (1, 0)
    _slow_handler(store, evaluator(store))
    restarted = evaluator(store)  # a new process resumes from the stored state
    assert numbers(restarted.evaluate(at(12, 0, 50)), "1m") == (1, 1)
