"""What each subscription is expected to receive: filters, dead letters, new and deleted
subscriptions. The evaluator on the in-memory store, with an explicit clock and listing."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest

from eventaudit.contract import encode_attributes
from eventaudit.exporter.buckets import Window
from eventaudit.exporter.evaluator import Evaluator
from eventaudit.exporter.snapshot import Snapshot, list_missed
from eventaudit.exporter.subscriptions import (
    NEW_SUBSCRIPTION_MARGIN,
    ExpectedSubscriptions,
    SubscriptionInfo,
)
from eventaudit.records import PublishRecord, Receipt, Tenure
from eventaudit.store import StoreError
from tests.fakes import MemoryStore, SteadyEvaluator

BUCKET = timedelta(seconds=10)
SETTLE = timedelta(seconds=30)
WINDOWS = [Window("1m", timedelta(minutes=1)), Window("5m", timedelta(minutes=5))]
TOPIC = "orders"
DLQ_SUB = "orders-dlq-audit"


def at(h: int, m: int, s: int) -> datetime:
    return datetime(2026, 11, 27, h, m, s, tzinfo=UTC)


def publish(store: MemoryStore, event_id: str, when: datetime, **attributes: str) -> None:
    record = PublishRecord(
        event_id, "a" * 32, TOPIC, "{}", "m", when, attributes=encode_attributes(attributes)
    )
    store.insert_publish_records([record], when)


def receive(store: MemoryStore, sub: str, event_id: str, published: datetime) -> None:
    got = published + timedelta(seconds=1)
    store.record_receipts(
        [Receipt(sub, event_id, TOPIC, None, "m", published, published, got)], got
    )


def dead_letter(
    store: MemoryStore, sub: str, event_id: str, published: datetime, attempts: int | None
) -> None:
    got = published + timedelta(seconds=5)
    letter = Receipt(sub, event_id, TOPIC, None, "m", published, published, got, attempts, DLQ_SUB)
    store.record_receipts([letter], got)


class Listing:
    """Pub/Sub's answer, changed by the test."""

    def __init__(self, *subs: SubscriptionInfo) -> None:
        self.subs = list(subs)

    def __call__(self, topic: str) -> list[SubscriptionInfo]:
        return list(self.subs) if topic == TOPIC else []


def evaluator(store: MemoryStore, listing: Listing) -> Evaluator:
    expected = ExpectedSubscriptions({TOPIC: set()}, set(), listing, refresh_seconds=0)
    return SteadyEvaluator(store, expected, WINDOWS, BUCKET, SETTLE)


def stats(snapshot: Snapshot, sub: str, window: str = "5m") -> tuple[int, int, int, int, int]:
    """(expected, received, missed, filtered, dead-lettered)"""
    s = snapshot.subscriptions[(TOPIC, sub)][window]
    return s.published, s.received, s.missed, s.filtered, s.dead_lettered


# -- filtered subscriptions ------------------------------------------------------------------

KIND_A = SubscriptionInfo("only-a", 'attributes.kind = "a"')


def _mixed_traffic(store: MemoryStore) -> None:
    """At 12:00:0x: a1..a3 of kind a, b1..b3 of kind b, n1 with no attributes."""
    for i in range(1, 4):
        publish(store, f"a{i}", at(12, 0, i), kind="a")
        publish(store, f"b{i}", at(12, 0, i), kind="b")
    publish(store, "n1", at(12, 0, 5))


def test_a_filtered_subscription_expects_only_the_events_its_filter_matches() -> None:
    store = MemoryStore()
    _mixed_traffic(store)
    receive(store, "only-a", "a1", at(12, 0, 1))
    receive(store, "only-a", "a2", at(12, 0, 2))
    receive(store, "only-a", "b1", at(12, 0, 1))  # the emulator does not enforce filters
    receive(store, "all", "a1", at(12, 0, 1))
    snapshot = evaluator(store, Listing(KIND_A, SubscriptionInfo("all"))).evaluate(at(12, 1, 0))
    assert snapshot.published[TOPIC]["5m"] == 7
    assert stats(snapshot, "only-a") == (3, 2, 1, 1, 0)
    assert snapshot.subscriptions[(TOPIC, "only-a")]["5m"].completion_rate == pytest.approx(2 / 3)
    assert snapshot.subscriptions[(TOPIC, "only-a")]["5m"].unmatched == 0
    assert stats(snapshot, "all") == (7, 1, 6, 0, 0)
    missed = list_missed(snapshot, store, TOPIC, "only-a", WINDOWS[1], 100)
    assert missed is not None and [e.event_id for e in missed] == ["a3"]


def test_a_filtered_subscription_with_no_receipt_expects_the_matching_events_only() -> None:
    store = MemoryStore()
    _mixed_traffic(store)
    snapshot = evaluator(store, Listing(KIND_A)).evaluate(at(12, 1, 0))
    assert stats(snapshot, "only-a") == (3, 0, 3, 0, 0)
    missed = list_missed(snapshot, store, TOPIC, "only-a", WINDOWS[1], 100)
    assert missed is not None and [e.event_id for e in missed] == ["a1", "a2", "a3"]


def test_the_missed_list_read_from_the_digest_follows_the_filter_too() -> None:
    store = MemoryStore()
    _mixed_traffic(store)
    snapshot = evaluator(store, Listing(KIND_A)).evaluate(at(12, 1, 0))
    # Past the events a result lists (keep=... beyond them forces the digest read): keep 2.
    two = list_missed(snapshot, store, TOPIC, "only-a", WINDOWS[1], 2)
    assert two is not None and [e.event_id for e in two] == ["a1", "a2"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('attributes.kind = "a"', 3),
        ('attributes.kind != "a"', 4),  # b1..b3 and n1, which has no kind
        ("attributes:kind", 6),
        ("NOT attributes:kind", 1),
        ('hasPrefix(attributes.kind, "")', 6),
        ('attributes.kind = "a" OR attributes.kind = "b"', 6),
        ('attributes.kind = "a" AND attributes.kind = "b"', 0),
    ],
)
def test_expected_counts_follow_the_filter(text: str, expected: int) -> None:
    store = MemoryStore()
    _mixed_traffic(store)
    snapshot = evaluator(store, Listing(SubscriptionInfo("f", text))).evaluate(at(12, 1, 0))
    got = snapshot.subscriptions[(TOPIC, "f")]["5m"]
    assert (got.published, got.received, got.missed) == (expected, 0, expected)
    assert math.isnan(got.completion_rate) == (expected == 0)


def test_a_filter_the_exporter_cannot_evaluate_is_marked_never_reported() -> None:
    store = MemoryStore()
    _mixed_traffic(store)
    receive(store, "odd", "a1", at(12, 0, 1))
    listing = Listing(SubscriptionInfo("odd", 'attributes.n > "1"'), SubscriptionInfo("all"))
    ev = evaluator(store, listing)
    snapshot = ev.evaluate(at(12, 1, 0))
    assert (TOPIC, "odd") not in snapshot.subscriptions
    assert list(snapshot.unsupported) == [(TOPIC, "odd")]
    assert "unexpected character" in snapshot.unsupported[(TOPIC, "odd")]
    assert ev.evaluate(at(12, 1, 10)).unsupported == snapshot.unsupported
    assert ev._expected.filter_errors == 1  # counted (and logged) once per subscription
    assert stats(snapshot, "all")[0] == 7


def test_bucket_counts_made_without_the_filter_are_not_counted_against_it() -> None:
    # The listing failed when the bucket was folded: counted as expecting everything. Once
    # the filter is known those counts are not the subscription's: left out, never 0 of 7.
    store = MemoryStore()
    _mixed_traffic(store)
    receive(store, "only-a", "a1", at(12, 0, 1))
    listing = Listing(SubscriptionInfo("only-a"))
    ev = evaluator(store, listing)
    assert stats(ev.evaluate(at(12, 1, 0)), "only-a") == (7, 1, 6, 0, 0)
    listing.subs = [KIND_A]
    assert stats(ev.evaluate(at(12, 1, 1)), "only-a") == (0, 0, 0, 0, 0)
    publish(store, "a4", at(12, 0, 8), kind="a")  # a fold recounts the bucket with the filter
    assert stats(ev.evaluate(at(12, 1, 2)), "only-a") == (4, 1, 3, 0, 0)


# -- dead letters -----------------------------------------------------------------------------


def test_missed_events_are_split_into_dead_lettered_and_lost() -> None:
    store = MemoryStore()
    for i in range(1, 5):
        publish(store, f"e{i}", at(12, 0, i))
    receive(store, "sub-s", "e1", at(12, 0, 1))
    dead_letter(store, "sub-s", "e2", at(12, 0, 2), 5)
    dead_letter(store, "sub-s", "e3", at(12, 0, 3), None)
    dead_letter(store, "sub-s", "e1", at(12, 0, 1), 5)  # received, then dead-lettered: received
    snapshot = evaluator(store, Listing(SubscriptionInfo("sub-s"))).evaluate(at(12, 1, 0))
    assert stats(snapshot, "sub-s") == (4, 1, 3, 0, 2)
    assert snapshot.subscriptions[(TOPIC, "sub-s")]["5m"].completion_rate == 0.25
    missed = list_missed(snapshot, store, TOPIC, "sub-s", WINDOWS[1], 100)
    assert missed is not None
    assert [(e.event_id, e.dead_letter_attempts) for e in missed] == [
        ("e2", 5),
        ("e3", 1),
        ("e4", None),
    ]
    digest_read = list_missed(snapshot, store, TOPIC, "sub-s", WINDOWS[1], 1)
    assert digest_read is not None and [e.dead_letter_attempts for e in digest_read] == [5]


def test_a_dead_letter_received_later_is_received() -> None:
    store = MemoryStore()
    publish(store, "e1", at(12, 0, 1))
    dead_letter(store, "sub-s", "e1", at(12, 0, 1), 5)
    ev = evaluator(store, Listing(SubscriptionInfo("sub-s")))
    assert stats(ev.evaluate(at(12, 1, 0)), "sub-s") == (1, 0, 1, 0, 1)
    receive(store, "sub-s", "e1", at(12, 0, 1))  # replayed from the dead-letter topic
    assert stats(ev.evaluate(at(12, 1, 10)), "sub-s") == (1, 1, 0, 0, 0)


# -- subscriptions that appear and disappear ------------------------------------------------


def test_a_new_subscription_is_not_expected_to_have_received_what_came_before_it() -> None:
    store = MemoryStore()
    listing = Listing(SubscriptionInfo("old"))
    ev = evaluator(store, listing)
    for s in range(0, 60, 5):
        publish(store, f"early{s}", at(12, 0, s))
    ev.evaluate(at(12, 1, 0))  # the first evaluation: "old" existed before the exporter
    listing.subs.append(SubscriptionInfo("new"))
    ev.evaluate(at(12, 1, 0))  # "new" first seen at 12:01:00
    first = at(12, 1, 0) + NEW_SUBSCRIPTION_MARGIN
    for s in range(0, 60, 5):
        when = at(12, 1, s)
        publish(store, f"late{s}", when)
        receive(store, "old", f"late{s}", when)
        if when >= first:
            receive(store, "new", f"late{s}", when)
    snapshot = ev.evaluate(at(12, 2, 30))
    assert stats(snapshot, "old")[:3] == (24, 12, 12)  # the early ones, lost on "old"
    assert stats(snapshot, "new")[:3] == (10, 10, 0)  # 12:01:10 on; nothing missed
    missed = list_missed(snapshot, store, TOPIC, "new", WINDOWS[1], 100)
    assert missed == []
    restarted = evaluator(store, listing).evaluate(at(12, 2, 30))  # the tenure is stored
    assert stats(restarted, "new")[:3] == (10, 10, 0)
    assert stats(restarted, "old")[:3] == (24, 12, 12)


def test_a_receipt_older_than_the_first_listing_moves_the_subscription_back() -> None:
    store = MemoryStore()
    listing = Listing()
    ticks = iter(range(0, 10_000, 60))  # a listing period (60 s) passes between evaluations
    expected = ExpectedSubscriptions({TOPIC: set()}, set(), listing, 60, clock=lambda: next(ticks))
    ev = SteadyEvaluator(store, expected, WINDOWS, BUCKET, SETTLE)
    ev.evaluate(at(12, 0, 0))
    listing.subs.append(SubscriptionInfo("new"))
    publish(store, "e1", at(12, 0, 20))
    publish(store, "e2", at(12, 0, 40))
    receive(store, "new", "e2", at(12, 0, 40))
    publish(store, "e0", at(11, 59, 0))
    ev.evaluate(at(12, 1, 0))  # listed at 12:01:00, but received an event of 12:00:40
    assert store.tenures[(TOPIC, "new")].since == at(12, 0, 40)
    receive(store, "new", "e0", at(11, 59, 0))  # older than a listing period before 12:01
    ev.evaluate(at(12, 1, 30))
    assert store.tenures[(TOPIC, "new")].since == at(11, 59, 50)  # 12:01 - 60 s - margin
    snapshot = ev.evaluate(at(12, 2, 30))
    # Buckets from 12:00:00 (since + margin) on: e1 and e2, not e0 (before it may have existed).
    assert stats(snapshot, "new")[:3] == (2, 1, 1)


def test_a_deleted_subscription_disappears_once_its_last_listed_moment_settles() -> None:
    store = MemoryStore()
    listing = Listing(SubscriptionInfo("going"), SubscriptionInfo("staying"))
    ev = evaluator(store, listing)
    for s in range(0, 60, 5):
        publish(store, f"e{s}", at(12, 0, s))
        receive(store, "going", f"e{s}", at(12, 0, s))
    assert stats(ev.evaluate(at(12, 0, 50)), "going")[:3] == (4, 4, 0)
    listing.subs = [SubscriptionInfo("staying")]  # deleted after 12:00:50
    snapshot = ev.evaluate(at(12, 1, 10))  # 12:00:00-12:00:40 settled: all before 12:00:50
    assert stats(snapshot, "going")[:3] == (8, 8, 0)
    assert store.tenures[(TOPIC, "going")].until == at(12, 0, 50)
    later = ev.evaluate(at(12, 1, 30))  # the frontier (12:01:00) is past 12:00:50
    assert (TOPIC, "going") not in later.subscriptions
    assert stats(later, "staying")[:3] == (12, 0, 12)
    restarted = evaluator(store, listing).evaluate(at(12, 1, 30))
    assert (TOPIC, "going") not in restarted.subscriptions


def test_a_subscription_created_again_is_a_new_one() -> None:
    store = MemoryStore()
    listing = Listing(SubscriptionInfo("again"))
    ev = evaluator(store, listing)
    ev.evaluate(at(12, 0, 0))
    listing.subs = []
    ev.evaluate(at(12, 0, 10))
    listing.subs = [SubscriptionInfo("again")]
    ev.evaluate(at(12, 0, 20))
    tenure = store.tenures[(TOPIC, "again")]
    assert (tenure.since, tenure.until) == (at(12, 0, 20), None)
    for s in range(0, 60, 5):
        publish(store, f"e{s}", at(12, 0, s))
    snapshot = ev.evaluate(at(12, 1, 30))
    assert stats(snapshot, "again")[:3] == (6, 0, 6)  # published 12:00:30 to 12:00:59 only


def test_a_failed_tenure_write_is_retried_by_the_next_evaluation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = MemoryStore()
    listing = Listing()
    ev = evaluator(store, listing)
    ev.evaluate(at(12, 0, 0))
    listing.subs = [SubscriptionInfo("new")]
    real = store.save_tenures

    def failing(tenures: object, epoch: int = 0) -> None:
        raise StoreError("down")

    monkeypatch.setattr(store, "save_tenures", failing)
    ev.evaluate(at(12, 0, 10))
    assert (TOPIC, "new") not in store.tenures
    monkeypatch.setattr(store, "save_tenures", real)
    ev.evaluate(at(12, 0, 20))
    assert store.tenures[(TOPIC, "new")].since == at(12, 0, 10)


# -- what a restart, a failed listing or a stored document must not change -----------------


class FlakyListing(Listing):
    """A listing that fails while `down`."""

    down = False

    def __call__(self, topic: str) -> list[SubscriptionInfo]:
        if self.down:
            raise RuntimeError("admin API unavailable")
        return super().__call__(topic)


def test_a_filter_is_remembered_when_the_listing_fails_after_a_restart() -> None:
    store = MemoryStore()
    listing = FlakyListing(KIND_A)
    evaluator(store, listing).evaluate(at(12, 0, 0))
    assert store.tenures[(TOPIC, "only-a")].filter == KIND_A.filter
    _mixed_traffic(store)
    listing.down = True
    configured = ExpectedSubscriptions({TOPIC: {"only-a"}}, set(), listing, refresh_seconds=0)
    restarted = SteadyEvaluator(store, configured, WINDOWS, BUCKET, SETTLE)
    # Not "0 of 7": the stored filter stands while the listing fails.
    assert stats(restarted.evaluate(at(12, 1, 0)), "only-a") == (3, 0, 3, 0, 0)


def test_a_deleted_filtered_subscription_keeps_its_filter_for_late_receipts() -> None:
    store = MemoryStore()
    listing = Listing(KIND_A)
    ev = evaluator(store, listing)
    ev.evaluate(at(12, 0, 0))
    _mixed_traffic(store)
    ev.evaluate(at(12, 0, 40))  # last listed
    listing.subs = []  # deleted
    receive(store, "only-a", "b2", at(12, 0, 2))  # a late receipt touches the bucket
    snapshot = ev.evaluate(at(12, 0, 45))
    assert store.tenures[(TOPIC, "only-a")].until == at(12, 0, 40)
    assert stats(snapshot, "only-a", "1m") == (3, 0, 3, 1, 0)


def test_a_subscription_whose_details_cannot_be_read_is_marked_never_guessed() -> None:
    store = MemoryStore()
    _mixed_traffic(store)
    listing = Listing(SubscriptionInfo("secret", error="PermissionDenied"))
    snapshot = evaluator(store, listing).evaluate(at(12, 1, 0))
    assert (TOPIC, "secret") not in snapshot.subscriptions
    assert snapshot.unsupported[(TOPIC, "secret")] == "its filter is unknown: PermissionDenied"


def test_a_subscription_deleted_while_no_exporter_ran_goes_at_its_last_stored_listing() -> None:
    store = MemoryStore()
    listing = Listing(SubscriptionInfo("going"))
    evaluator(store, listing).evaluate(at(12, 0, 0))
    evaluator(store, listing).evaluate(at(12, 6, 0))  # a restart: listed stored again (5 min)
    assert store.tenures[(TOPIC, "going")].listed == at(12, 6, 0)
    listing.subs = []  # deleted, then an exporter starts at 12:30
    for minute in range(25, 30):
        publish(store, f"e{minute}", at(12, minute, 0))
    snapshot = evaluator(store, listing).evaluate(at(12, 30, 0))
    assert store.tenures[(TOPIC, "going")].until == at(12, 6, 0)
    assert (TOPIC, "going") not in snapshot.subscriptions  # not 5 false misses


def test_the_first_evaluation_on_a_database_lasts_until_a_listing_succeeds() -> None:
    store = MemoryStore()
    listing = FlakyListing(SubscriptionInfo("old"))
    listing.down = True
    ev = evaluator(store, listing)
    ev.evaluate(at(12, 0, 0))
    listing.down = False
    ev.evaluate(at(12, 0, 10))
    assert store.tenures[(TOPIC, "old")].since is None  # existed before the exporter


@pytest.mark.parametrize(
    "doc",
    [
        {"topic": TOPIC, "subscription": "s1", "since": datetime(9999, 12, 31, tzinfo=UTC)},
        {"topic": TOPIC, "subscription": "s1", "until": datetime(1, 1, 1, tzinfo=UTC)},
        {"topic": TOPIC, "subscription": "s1", "since": datetime(2026, 1, 1)},  # naive
        {"topic": TOPIC, "subscription": "s1", "since": "2026-01-01"},
        {"topic": TOPIC, "subscription": 7},
        {"topic": TOPIC, "subscription": "s1", "filter": ["x"]},
        {"subscription": "s1"},
    ],
)
def test_a_stored_tenure_that_is_not_one_is_skipped(doc: dict[str, object]) -> None:
    assert Tenure.from_document(doc) is None


def test_a_stored_tenure_reads_back() -> None:
    tenure = Tenure(TOPIC, "s1", at(12, 0, 0), None, None, at(12, 0, 0), at(12, 5, 0))
    assert Tenure.from_document(tenure.to_document()) == tenure


def test_a_subscription_created_again_starts_at_its_first_receipt_not_its_listing() -> None:
    # Issue 17, case 14: receipts folded before the listing showed it again were ignored, so
    # its tenure started at that listing.
    store = MemoryStore()
    listing = Listing(SubscriptionInfo("again"))
    tick = [0.0]  # the listing clock: listed once a minute
    expected = ExpectedSubscriptions({TOPIC: set()}, set(), listing, 60, clock=lambda: tick[0])
    ev = SteadyEvaluator(store, expected, WINDOWS, BUCKET, SETTLE)
    ev.evaluate(at(12, 0, 0))
    listing.subs = []
    tick[0] = 61
    ev.evaluate(at(12, 0, 10))  # deleted: expected until 12:00:00
    listing.subs = [SubscriptionInfo("again")]
    for s in range(30, 60, 5):  # created again; it receives before the next listing
        publish(store, f"e{s}", at(12, 0, s))
        receive(store, "again", f"e{s}", at(12, 0, s))
    tick[0] = 70
    ev.evaluate(at(12, 1, 0))
    tick[0] = 200
    ev.evaluate(at(12, 1, 10))  # listed again
    tenure = store.tenures[(TOPIC, "again")]
    assert (tenure.since, tenure.until) == (at(12, 0, 30), None)
    tick[0] = 210
    snapshot = ev.evaluate(at(12, 1, 40))
    # Buckets from 12:00:40 (since + margin) on, as for any new subscription.
    assert stats(snapshot, "again")[:3] == (4, 4, 0)


def test_a_deleted_subscription_never_shows_misses_while_the_listing_is_stale() -> None:
    # Issue 17, case 14: listed once a minute, a subscription deleted at 12:01:02 was still
    # expected (and missed every event) in the buckets that settled before the next listing.
    store = MemoryStore()
    listing = Listing(SubscriptionInfo("going"), SubscriptionInfo("staying"))
    tick = [0.0]  # the listing clock, in step with the evaluations
    expected = ExpectedSubscriptions({TOPIC: set()}, set(), listing, 60, clock=lambda: tick[0])
    ev = SteadyEvaluator(store, expected, WINDOWS, BUCKET, SETTLE)
    start = at(12, 0, 0)
    for s in range(0, 180, 2):
        when = start + timedelta(seconds=s)
        publish(store, f"e{s}", when)
        receive(store, "staying", f"e{s}", when)
        if s < 62:
            receive(store, "going", f"e{s}", when)
    for s in range(0, 180, 5):
        if s == 65:
            listing.subs = [SubscriptionInfo("staying")]  # deleted at 12:01:02
        tick[0] = float(s)
        snapshot = ev.evaluate(start + timedelta(seconds=s))
        going = snapshot.subscriptions.get((TOPIC, "going"), {}).get("5m")
        assert going is None or going.missed == 0, f"at +{s}s: {going}"
    assert (TOPIC, "going") not in snapshot.subscriptions
    assert stats(snapshot, "staying")[:3] == (70, 70, 0)  # 12:00:00 to 12:02:20
