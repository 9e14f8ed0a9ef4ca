"""MongoStore's writes against a real FerretDB: large redelivery batches, a redelivery whose
receipt disappeared before its update, and the journal (the same as MemoryStore's)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from bson.datetime_ms import DatetimeMS
from pymongo.errors import AutoReconnect

from eventaudit.contract import epoch_ms
from eventaudit.partitions import is_live_journal
from eventaudit.records import BucketCounts, BucketResult, PublishRecord, Receipt, Tenure
from eventaudit.store import AuditStore, LeaseBoard, MongoStore, StoreError
from tests.conftest import Ferret
from tests.fakes import MemoryStore

T0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def _receipts(n: int, delivered: datetime) -> list[Receipt]:
    return [
        Receipt("sub-a", f"e{i}", "topic-a", None, f"m{i}", T0, T0, delivered) for i in range(n)
    ]


def test_a_full_batch_of_redeliveries_is_written(private_ferret: Ferret) -> None:
    # FerretDB 1.24 (SQLite) never answers one update command of 100 or more operations, and
    # stays hung for every client: a restarted subscriber's first batch is often all
    # redeliveries, 500 by default.
    store = MongoStore(private_ferret.uri, "eventaudit_test", timeout_seconds=5)
    try:
        store.ping()
        store.record_receipts(_receipts(500, T0), T0)
        later = T0 + timedelta(seconds=30)
        store.record_receipts(_receipts(500, later), later)
        docs = list(store.received.find({}, {"deliveries": 1, "lastReceiveTime": 1}))
        assert len(docs) == 500
        assert {d["deliveries"] for d in docs} == {2}
        assert {d["lastReceiveTime"] for d in docs} == {later}
    finally:
        store.close()


class _VanishingReceipts:
    """The database, but every receipt is deleted right after the insert attempt (retention,
    or an operator, between the insert and the redelivery's update)."""

    def __init__(self, db: Any) -> None:
        self._db = db

    def __getitem__(self, name: str) -> Any:
        collection = self._db[name]
        if not name.startswith("ReceivedRecord_"):
            return collection

        class Vanishing:
            def insert_many(self, docs: Any, **kwargs: Any) -> Any:
                try:
                    return collection.insert_many(docs, **kwargs)
                finally:
                    collection.delete_many({})

            def __getattr__(self, attr: str) -> Any:
                return getattr(collection, attr)

        return Vanishing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


def test_a_redelivery_whose_receipt_vanished_is_an_error_not_a_silent_ack(
    store: MongoStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.record_receipts(_receipts(3, T0), T0)
    monkeypatch.setattr(store, "db", _VanishingReceipts(store.db))
    with pytest.raises(StoreError, match="redeliveries not written"):
        store.record_receipts(_receipts(3, T0), T0)  # the caller nacks: Pub/Sub redelivers


# -- the journal: MongoStore on FerretDB writes what MemoryStore writes ----------------------


def _writes(store: AuditStore) -> None:
    """A publish batch, the same batch retried, the event published again as another
    message, a reused eventID, receipts, redeliveries within and across batches."""
    records = [PublishRecord(f"e{i}", "t" * 32, "topic-a", "{}", f"m{i}", T0) for i in range(3)]
    store.insert_publish_records(records, T0)
    store.insert_publish_records(records[:1], T0)  # a retried batch whose write landed
    store.insert_publish_records(
        [
            PublishRecord("e1", "u" * 32, "topic-a", "{}", "m9", T0),  # published again
            PublishRecord("e2", "t" * 32, "topic-a", "{other}", "m2", T0),  # eventID reused
            PublishRecord("e3", "v" * 32, "topic-a", "{}", "m3", T0 + timedelta(seconds=10)),
        ],
        T0,
    )
    store.record_receipts([*_receipts(2, T0), _receipts(1, T0)[0]], T0)  # e0 twice in one
    store.record_receipts(_receipts(3, T0), T0 + timedelta(seconds=5))  # e0, e1 redelivered


def _journal(store: AuditStore) -> list[list[str]]:
    if isinstance(store, MongoStore):
        names = [n for n in store.db.list_collection_names() if is_live_journal(n)]
        docs = [d for n in names for d in store.db[n].find({})]
    else:
        assert isinstance(store, MemoryStore)
        docs = [d for docs in store.journals.values() for d in docs.values()]
    return [sorted(d["entries"]) for d in docs]


def test_mongo_store_journals_exactly_what_the_memory_store_journals(store: MongoStore) -> None:
    memory = MemoryStore()
    _writes(store)
    _writes(memory)
    ms = epoch_ms(T0)
    t, v = "t" * 32, "v" * 32
    expected = [
        [f"p|topic-a|e{i}|{t}|{ms}" for i in range(3)],
        [f"p|topic-a|e0|{t}|{ms}"],  # the same publish: journaled again, harmless
        [f"p|topic-a|e3|{v}|{ms + 10_000}"],  # e1 and e2 refused: not journaled
        [f"r|topic-a|sub-a|e0|{ms}|2", f"r|topic-a|sub-a|e1|{ms}|1"],
        # Redeliveries journal the total stored, not the increment.
        [f"r|topic-a|sub-a|e0|{ms}|3", f"r|topic-a|sub-a|e1|{ms}|2", f"r|topic-a|sub-a|e2|{ms}|1"],
    ]
    assert sorted(_journal(store)) == sorted(_journal(memory)) == sorted(expected)


class _FailingJournal:
    """The database, refusing inserts into journal collections (the store gone between two
    writes)."""

    def __init__(self, db: Any) -> None:
        self._db = db

    def __getitem__(self, name: str) -> Any:
        if not is_live_journal(name):
            return self._db[name]
        collection = self._db[name]

        class Refusing:
            def insert_many(self, docs: Any, **kwargs: Any) -> Any:
                raise AutoReconnect("connection closed")

            def __getattr__(self, attr: str) -> Any:
                return getattr(collection, attr)

        return Refusing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


def test_a_batch_whose_journal_is_not_written_fails_and_its_retry_journals_it(
    store: MongoStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = [PublishRecord("e0", "t" * 32, "topic-a", "{}", "m0", T0)]
    real = store.db
    monkeypatch.setattr(store, "db", _FailingJournal(real))
    with pytest.raises(StoreError, match="journal not written"):
        store.insert_publish_records(records, T0)
    with pytest.raises(StoreError, match="journal not written"):
        store.record_receipts(_receipts(1, T0), T0)  # the subscriber nacks
    monkeypatch.setattr(store, "db", real)
    assert store.journal_size() == 0
    # The publisher retries the batch; Pub/Sub redelivers the message.
    store.insert_publish_records(records, T0)
    store.record_receipts(_receipts(1, T0), T0)
    ms = epoch_ms(T0)
    assert sorted(_journal(store)) == [
        [f"p|topic-a|e0|{'t' * 32}|{ms}"],
        [f"r|topic-a|sub-a|e0|{ms}|2"],
    ]


@pytest.mark.parametrize("stamp", [1, 2**31 - 1, 2**31, 1795780800123, 2**62])
def test_the_fold_stamp_reads_back_as_stored(store: MongoStore, stamp: int) -> None:
    # A millisecond stamp is stored as a 64-bit integer, which bson reads back as Int64.
    memory = MemoryStore()
    for s in (store, memory):
        s.save_fold_stamp(stamp)
        s.save_fold_stamp(stamp - 1)  # never lowers it
    assert store.load_fold_stamp() == memory.load_fold_stamp() == stamp


def test_bucket_results_read_back_the_latest_version_from_their_partitions(
    store: MongoStore,
) -> None:
    start = T0.replace(minute=9, second=50, microsecond=0)  # the last bucket of a partition
    memory = MemoryStore()
    old = BucketResult("topic-a", start, 3, {"sub-a": BucketCounts(1, 0, 0)}, merged=5)
    new = BucketResult(
        "topic-a", start, 4, {"sub-a": BucketCounts(4, 0, 0)}, merged=9, missed={"sub-a": ()}
    )
    nxt = BucketResult("topic-a", start + timedelta(seconds=10), 1, {}, merged=9)
    for s in (store, memory):
        s.save_bucket_results([old], T0, 2**40 + 1)
        s.save_bucket_results([new, nxt], T0, 2**40 + 3)
        s.save_bucket_results([old], T0, 2**40 + 2)  # an older version, stored late
    assert {n for n in store.db.list_collection_names() if n.startswith("BucketResult")} == {
        f"BucketResult_{epoch_ms(start) - epoch_ms(start) % 600_000}",
        f"BucketResult_{epoch_ms(nxt.start)}",
    }
    for s in (store, memory):
        assert sorted(s.load_bucket_results(start), key=lambda r: r.start) == [new, nxt]
        assert s.load_bucket_results(nxt.start) == [nxt]


@pytest.mark.parametrize(
    "doc",
    [
        {"_id": "x", "key": "x", "version": 1},  # no topic, no bucketStart
        {"_id": "y", "version": 1, "topic": 7, "bucketStart": T0, "published": 1},
        {"_id": "z", "version": 1, "topic": "t", "bucketStart": "noon", "published": 1},
        {"_id": "w", "version": "9", "topic": "t", "bucketStart": T0, "published": 1},
        {"_id": "v", "version": 1, "topic": "t", "bucketStart": T0, "published": "many"},
        {"_id": "u", "version": 1, "topic": "t", "bucketStart": T0, "published": -1},
        {
            "_id": "s",
            "version": 1,
            "topic": "t",
            "bucketStart": T0,
            "published": 1,
            "subscriptions": [{"name": 5, "received": 1, "duplicates": 0, "unmatched": 0}],
        },
        {
            "_id": "r",
            "version": 1,
            "topic": "t",
            "bucketStart": T0,
            "published": 1,
            "subscriptions": [{"name": "s", "received": 2, "duplicates": 0, "unmatched": 0}],
        },
        {
            "_id": "q",
            "version": 1,
            "topic": "t",
            "bucketStart": T0,
            "published": 1,
            "subscriptions": [{"name": "s", "received": 1, "duplicates": -3, "unmatched": 0}],
        },
    ],
)
def test_a_hostile_document_among_the_results_is_skipped(
    store: MongoStore, doc: dict[str, Any]
) -> None:
    good = BucketResult("topic-a", T0, 1, {}, merged=9)
    store.save_bucket_results([good], T0, 1)
    store.db[f"BucketResult_{epoch_ms(T0)}"].insert_one(doc)
    assert store.load_bucket_results(T0) == [good]


def test_an_undecodable_journal_document_is_counted_malformed_not_raised(store: MongoStore) -> None:
    store.insert_publish_records([PublishRecord("e0", "t" * 32, "topic-a", "{}", "m0", T0)], T0)
    [live] = [n for n in store.db.list_collection_names() if is_live_journal(n)]
    # A date Python cannot hold (year 292,278,994): bson cannot decode this document.
    store.db[live].insert_one({"_id": "evil", "entries": [], "writtenTime": DatetimeMS(2**62)})
    [taken] = store.take_journal(T0)
    batches = list(store.read_journal(taken))
    assert sorted((len(b.entries), b.malformed) for b in batches) == [(0, 1), (1, 0)]
    assert store.count_journal(taken) == 2
    folded = store.mark_folded(taken, 2)
    assert store.take_journal(T0) == [folded] and folded.endswith("_2")


def test_stored_tenures_read_back_and_hostile_ones_are_skipped(store: MongoStore) -> None:
    good = Tenure("topic-a", "sub-a", T0, None, 'attributes.k = "v"', T0, T0)
    gone = Tenure("topic-a", "sub-b", None, T0, "", None, T0)
    store.save_tenures([good, gone])
    store.save_tenures([good])  # replaced by `_id`, not added
    state = store.db["ExporterState"]  # tenures beside the fold stamp, claims and heartbeats
    state.insert_one({"_id": "tenure|x|undecodable", "topic": "x", "subscription": "y",
                      "since": DatetimeMS(2**62)})  # fmt: skip
    state.insert_one({"_id": "tenure|x|far", "topic": "x", "subscription": "y",
                      "since": datetime(9999, 12, 31, tzinfo=UTC)})  # fmt: skip
    state.insert_one({"_id": "tenure|x|typed", "topic": 7, "subscription": "y"})
    store.save_fold_stamp(7)
    assert store.claim_epoch("000000000001", 1, "r0", T0) is None
    assert sorted(store.load_tenures(), key=lambda t: t.subscription) == [good, gone]
    assert store.load_fold_stamp() == 7


@pytest.mark.parametrize(
    "name",
    [
        "EventJournal_\u0661\u0662",  # Arabic-Indic digits
        "EventJournal_99999999999999999999",  # more digits than any clock
        "EventJournalTaken_1_zzzzzzzz",
        "EventJournalFolded_1_0a1b2c3d_-1",
        "BucketResult_\u00b2",  # superscript two
        "PublishRecord_1e3",
    ],
)
def test_collections_named_almost_like_ours_are_left_alone(store: MongoStore, name: str) -> None:
    store.db[name].insert_one({"_id": "x", "entries": ["p|topic-a|evil|t|1"]})
    store.insert_publish_records([PublishRecord("e0", "t" * 32, "topic-a", "{}", "m0", T0)], T0)
    [taken] = store.take_journal(T0)
    assert [len(b.entries) for b in store.read_journal(taken)] == [1]
    assert store.load_bucket_results(T0 - timedelta(days=1)) == []
    store.delete_older_than(T0 + timedelta(days=30))
    assert name in store.db.list_collection_names()  # neither taken, read nor dropped


def test_hostile_documents_beside_the_exporters_state_and_leases_are_skipped(
    store: MongoStore,
) -> None:
    # ExporterState holds the fold stamp, tenures and claims side by side, and a lease slot
    # holds lease writes (with heartbeats) and their news: a document of one kind, or of
    # none, is never read as another, nor stops a read.
    from eventaudit.partitions import lease_slot
    from eventaudit.records import Lease

    store.save_fold_stamp(9)
    store.db["ExporterState"].insert_many([
        {"_id": 7, "expires": T0},  # not a string id
        {"_id": "tenure\u0661", "topic": "x"},  # no kind separator
        {"_id": "tenure|x|y", "topic": "x"},  # a tenure missing its fields
        {"_id": "claim|k|1", "claimed": T0},
    ])  # fmt: skip
    lease = Lease("000000000001", 1, "r0", T0 + timedelta(seconds=30), ("orders",), {}, T0)
    store.save_leases("r0", T0, [lease], alive_until=T0 + timedelta(seconds=30))
    t1 = T0 + timedelta(minutes=1)
    store.db[lease_slot(T0)].insert_many([
        {"_id": "news|x|0", "renewed": T0, "news": 5},  # news of no usable shape
        {"_id": "news|y|0", "renewed": T0, "news": [{"key": "k", "seq": "1", "recent": []}]},
        {"_id": "h1", "replica": 7, "renewed": T0, "alive": t1, "leases": []},  # not an id
        {"_id": "h2", "replica": "r1", "renewed": T0, "alive": "soon", "leases": []},
        {"_id": "h3", "replica": "r2", "renewed": "now", "alive": t1, "leases": []},
        {"_id": "h4", "replica": "r3", "renewed": T0, "alive": t1, "leases": 5},
    ])  # fmt: skip
    assert store.load_fold_stamp() == 9
    assert store.load_tenures() == []
    assert store.load_leases(T0, T0) == LeaseBoard([lease], {"r0": T0 + timedelta(seconds=30)})
