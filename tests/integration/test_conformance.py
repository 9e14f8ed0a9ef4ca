"""One conformance suite, two stores: every method of the store's interface behaves the same on
the in-memory fake (tests.fakes.MemoryStore, which unit tests and the simulation run on) and on
MongoStore over a real FerretDB. Wherever the fake could be kinder than the store, a case here
pins it (issue 17, case 5: one eventID published in two hours, delivered in one batch)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import pytest

from eventaudit.contract import epoch_ms
from eventaudit.journal import BucketDigest, JournalEntry
from eventaudit.journal_reader import JournalCollections
from eventaudit.partitions import journal_key
from eventaudit.records import BucketCounts, BucketResult, Lease, PublishRecord, Receipt, Tenure
from eventaudit.store import AuditStore, LeaseBoard, MongoStore
from tests.conftest import Ferret, unique
from tests.fakes import MemoryStore
from tests.sim.world import Records, memory_records, mongo_records


class Store(AuditStore, JournalCollections, Protocol):
    """The store's interface and the journal collections behind its journal reader: both
    stores conform to both."""


# Ten seconds before an hour boundary.
T0 = datetime(2026, 11, 29, 12, 59, 50, tzinfo=UTC)
T1 = T0 + timedelta(seconds=20)  # the next hour
TOPIC, SUB = "orders", "orders-billing"


@pytest.fixture(params=["memory", "ferretdb"])
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[Store, Records]]:
    if request.param == "memory":
        memory = MemoryStore()
        yield memory, memory_records(memory)
        return
    ferret: Ferret = request.getfixturevalue("ferret")
    mongo = MongoStore(ferret.uri, unique("db").replace("-", "_"), timeout_seconds=5)
    mongo.ping()
    yield mongo, mongo_records(mongo)
    mongo.close()


def _publish(event_id: str, at: datetime, payload: str = "{}", message: str = "m") -> PublishRecord:
    return PublishRecord(event_id, "t" * 32, TOPIC, payload, message, at)


def _receipt(event_id: str, at: datetime, delivered: datetime, sub: str = SUB) -> Receipt:
    return Receipt(sub, event_id, TOPIC, None, "m", at, at, delivered)


def _entries(store: Store, now: datetime) -> list[str]:
    """Every journal entry written so far, taken and read back, sorted."""
    names = store.take_journal(now)
    return sorted(e.to_document() for n in names for b in store.read_journal(n) for e in b.entries)


def _records(records: Records) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    publishes, receipts, _ = records.records()
    return (
        sorted((d["eventID"], epoch_ms(d["publishTime"]), d["messageId"]) for d in publishes),
        sorted(
            (d["subscription"], d["eventID"], epoch_ms(d["publishTime"]), d["deliveries"])
            for d in receipts
        ),
    )


def test_one_event_id_published_in_two_hours_and_delivered_in_one_batch_is_two_receipts(
    pair: tuple[Store, Records],
) -> None:
    store, records = pair
    store.insert_publish_records([_publish("e1", T0, message="m1")], T0)
    store.insert_publish_records([_publish("e1", T1, message="m2")], T1)
    store.record_receipts([_receipt("e1", T0, T1), _receipt("e1", T1, T1)], T1)
    ms0, ms1 = epoch_ms(T0), epoch_ms(T1)
    assert _records(records) == (
        [("e1", ms0, "m1"), ("e1", ms1, "m2")],
        [(SUB, "e1", ms0, 1), (SUB, "e1", ms1, 1)],
    )
    assert _entries(store, T1) == sorted(
        [
            f"p|{TOPIC}|e1|{'t' * 32}|{ms0}",
            f"p|{TOPIC}|e1|{'t' * 32}|{ms1}",
            f"r|{TOPIC}|{SUB}|e1|{ms0}|1",
            f"r|{TOPIC}|{SUB}|e1|{ms1}|1",
        ]
    )


def test_redeliveries_within_and_across_batches_count_on_one_receipt(
    pair: tuple[Store, Records],
) -> None:
    store, records = pair
    store.record_receipts([_receipt("e1", T0, T0), _receipt("e1", T0, T0)], T0)
    store.record_receipts([_receipt("e1", T0, T1)], T1)
    assert _records(records)[1] == [(SUB, "e1", epoch_ms(T0), 3)]
    assert _entries(store, T1) == [
        f"r|{TOPIC}|{SUB}|e1|{epoch_ms(T0)}|2",
        f"r|{TOPIC}|{SUB}|e1|{epoch_ms(T0)}|3",
    ]


def test_a_publish_again_within_the_hour_is_refused_and_journals_an_alias(
    pair: tuple[Store, Records],
) -> None:
    store, records = pair
    later = T0 - timedelta(seconds=15)
    first = _publish("e1", later - timedelta(seconds=15), message="m1")
    refused = store.insert_publish_records([first], later)
    assert (refused.retried, refused.conflicts) == ((), ())
    assert store.insert_publish_records([first], later).retried == ()  # the same publish
    retry = _publish("e1", later, message="m2")
    other = _publish("e1", later, payload='{"v": 2}', message="m3")
    refused = store.insert_publish_records([retry, other], later)
    assert (refused.retried, refused.conflicts) == ((retry,), (other,))
    ms = epoch_ms(first.publish_time)
    assert refused.stored_ms == ((retry, ms), (other, ms))
    assert _records(records)[0] == [("e1", ms, "m1")]
    assert _entries(store, later) == sorted(
        [
            f"p|{TOPIC}|e1|{'t' * 32}|{ms}",
            f"p|{TOPIC}|e1|{'t' * 32}|{ms}",
            f"a|{TOPIC}|e1|{epoch_ms(later)}|{ms}",
            f"a|{TOPIC}|e1|{epoch_ms(later)}|{ms}",
        ]
    )


def test_a_dead_letter_keeps_its_first_record_and_is_journaled_each_time(
    pair: tuple[Store, Records],
) -> None:
    store, records = pair
    letter = Receipt(SUB, "e1", TOPIC, None, "m", T0, T0, T0, 5, "orders-dead")
    store.record_receipts([letter], T0)
    store.record_receipts([Receipt(SUB, "e1", TOPIC, None, "m", T0, T0, T1, 7, "x-dead")], T1)
    [dead] = records.records()[2]
    assert (dead["eventID"], dead["deliveryAttempts"], dead["deadLetterSubscription"]) == (
        "e1",
        5,
        "orders-dead",
    )
    ms = epoch_ms(T0)
    assert _entries(store, T1) == [f"d|{TOPIC}|{SUB}|e1|{ms}|5", f"d|{TOPIC}|{SUB}|e1|{ms}|7"]


def test_the_journal_is_taken_read_counted_marked_and_dropped(
    pair: tuple[Store, Records],
) -> None:
    store, _ = pair
    store.append_journal([JournalEntry(TOPIC, "e1", epoch_ms(T0))], T0)
    store.append_journal([JournalEntry("users", "e2", epoch_ms(T0))], T0)
    assert store.journal_keys() == {journal_key(TOPIC), journal_key("users")}
    [name] = store.take_journal(T0, [journal_key(TOPIC)])
    assert store.count_journal(name) == 1
    assert [e.event_id for b in store.read_journal(name) for e in b.entries] == ["e1"]
    # A write after the take goes to a new collection, taken by the next take.
    store.append_journal([JournalEntry(TOPIC, "e3", epoch_ms(T0))], T0)
    folded = store.mark_folded(name, 1)
    assert folded != name
    taken = store.take_journal(T0 + timedelta(seconds=10), [journal_key(TOPIC)])
    assert len(taken) == 2 and folded in taken
    store.drop_journal(folded)
    [rest] = store.take_journal(T0 + timedelta(seconds=20), [journal_key(TOPIC)])
    assert [e.event_id for b in store.read_journal(rest) for e in b.entries] == ["e3"]


def test_digests_read_back_as_the_union_of_their_deltas(
    pair: tuple[Store, Records],
) -> None:
    store, _ = pair
    start = datetime(2026, 11, 29, 12, 59, 50, tzinfo=UTC)
    digest = BucketDigest(TOPIC, start)
    ms = epoch_ms(start)
    for entry in (
        JournalEntry(TOPIC, "e1", ms + 1, None, "t" * 32),
        JournalEntry(TOPIC, "e1", ms + 1, SUB, "", 2),
        JournalEntry(TOPIC, "e2", ms + 2, SUB, "", 1, "", True),
        JournalEntry(TOPIC, "e3", ms + 3, alias_of=ms - 60_000),
    ):
        digest.merge(entry, 100)
    store.save_digests([digest], "f1")
    digest.merge(JournalEntry(TOPIC, "e1", ms + 1, SUB, "", 3), 200)
    store.save_digests([digest], "f2")
    read = store.load_digest(TOPIC, start)
    assert read.published == {"e1": ("t" * 32, ms + 1, 100)}
    assert read.receipts == {SUB: {"e1": (3, 100)}}
    assert read.dead == {SUB: {"e2": (1, 100)}}
    assert read.aliases == {"e3": (ms - 60_000, 100)}
    assert store.load_digest(TOPIC, start + timedelta(seconds=10)).published == {}


def test_the_highest_epoch_then_version_of_a_result_stands(
    pair: tuple[Store, Records],
) -> None:
    store, _ = pair

    def result(published: int) -> BucketResult:
        return BucketResult(TOPIC, T0, published, {SUB: BucketCounts(published)}, 1)

    store.save_bucket_results([result(1)], T0, version=5, epoch=1)
    store.save_bucket_results([result(2)], T0, version=9, epoch=1)
    store.save_bucket_results([result(3)], T0, version=7, epoch=1)  # a late, older write
    [stored] = store.load_results(T0 - timedelta(minutes=1))
    assert (stored.order, stored.result.published) == ((1, 9), 2)
    store.save_bucket_results([result(4)], T0, version=1, epoch=2)  # a new holder
    [stored] = store.load_results(T0 - timedelta(minutes=1), {TOPIC})
    assert (stored.order, stored.result.published) == ((2, 1), 4)
    assert store.load_results(T0 + timedelta(seconds=10)) == []
    assert store.load_results(T0 - timedelta(minutes=1), {"users"}) == []


def test_the_fold_stamp_only_grows(pair: tuple[Store, Records]) -> None:
    store, _ = pair
    assert store.load_fold_stamp() == 0
    store.save_fold_stamp(1795953600000)
    store.save_fold_stamp(1795953500000)
    assert store.load_fold_stamp() == 1795953600000


def test_a_tenure_of_an_earlier_epoch_is_refused(pair: tuple[Store, Records]) -> None:
    store, _ = pair
    tenure = Tenure(TOPIC, SUB, T0)
    assert store.save_tenures([tenure], epoch=2) == []
    late = Tenure(TOPIC, SUB, T0 - timedelta(hours=1))
    assert store.save_tenures([late], epoch=1) == [late]
    assert store.load_tenures() == [tenure]


def test_exactly_one_claim_of_an_epoch_succeeds(pair: tuple[Store, Records]) -> None:
    store, _ = pair
    key = journal_key(TOPIC)
    assert store.claim_epoch(key, 1, "a", T0) is None
    assert store.claim_epoch(key, 1, "b", T1) == T0
    assert store.claimed_epochs([(key, 1)]) == {(key, 1): T0}
    assert store.claimed_epochs([(key, 2)]) == {}
    assert store.claimed_epochs([(key, 1), (key, 2)]) == {(key, 1): T0}


def test_leases_heartbeats_and_told_results_read_back(pair: tuple[Store, Records]) -> None:
    store, _ = pair
    key = journal_key(TOPIC)
    told = ({"_id": "r1", "n": 1}, {"_id": "r2", "n": 2})
    first = Lease(key, 1, "a", T0 + timedelta(seconds=30), (TOPIC,), renewed=T0, seq=1)
    second = Lease(key, 1, "a", T0 + timedelta(seconds=40), (TOPIC,), renewed=T0, seq=2,
                   prev=1, recent=told)  # fmt: skip
    store.save_leases("a", T0, [first])
    store.save_leases("a", T0, [second], alive_until=T1)
    window = (T0 - timedelta(seconds=30), T0 + timedelta(seconds=30))
    board = store.load_leases(*window)
    assert sorted((x.key, x.owner, x.epoch, x.seq, x.told, x.recent) for x in board.leases) == [
        (key, "a", 1, 1, 0, ()),
        (key, "a", 1, 2, 2, told),
    ]
    assert board.alive == {"a": T1}
    # A write without a heartbeat leaves it; a later one replaces it (a stop: alive until now).
    store.save_leases("b", T0 + timedelta(seconds=1), [])
    store.save_leases("a", T0 + timedelta(seconds=2), [], alive_until=T0 + timedelta(seconds=2))
    assert store.load_leases(*window).alive == {"a": T0 + timedelta(seconds=2)}
    # Writes before `forget_before` are never read again.
    later = T0 + timedelta(minutes=5)
    store.save_leases("a", later, [], alive_until=later, forget_before=later - timedelta(minutes=1))
    assert store.load_leases(*window) == LeaseBoard([], {})
    assert store.load_leases(later, later).alive == {"a": later}


def test_an_events_records_are_found_by_id_within_their_hour(pair: tuple[Store, Records]) -> None:
    store, _ = pair
    store.insert_publish_records([_publish("e1", T0)], T0)
    store.record_receipts([_receipt("e1", T0, T0)], T0)
    [found] = store.find_event("e1", {TOPIC: {SUB, "other"}, "users": {"u"}}, [T0])
    assert (found.published["_id"], found.published["eventID"]) == (f"{TOPIC}|e1", "e1")
    assert ([(d["_id"], d["deliveries"]) for d in found.receipts], found.dead) == (
        [(f"{SUB}|e1", 1)],
        [],
    )
    assert store.find_event("e1", {TOPIC: {SUB}}, [T1]) == []
    assert store.find_event("e1", {"users": {SUB}}, [T0]) == []


def test_retention_drops_whole_hours_of_records_and_old_buckets(
    pair: tuple[Store, Records],
) -> None:
    store, records = pair
    old = T0 - timedelta(hours=2)
    store.insert_publish_records([_publish("old", old)], old)
    store.insert_publish_records([_publish("new", T0)], T0)
    store.save_bucket_results([BucketResult(TOPIC, old, 1, {}, 1)], old, version=1)
    store.save_bucket_results([BucketResult(TOPIC, T0, 1, {}, 1)], T0, version=1)
    store.delete_older_than(T0 - timedelta(hours=1))
    assert [d["eventID"] for d in records.records()[0]] == ["new"]
    assert [r.result.start for r in store.load_results(old)] == [T0]


def test_both_stores_say_a_journal_insert_can_land_after_a_take(
    pair: tuple[Store, Records],
) -> None:
    # FerretDB's insert can commit into a collection renamed after it looked it up; the fake
    # plays that race too. (MongoDB's rename excludes inserts: False there.)
    store, _ = pair
    assert store.journal_stragglers is True
