"""The journal and the digests it is folded into: hostile entries, idempotent folding, faults
half-way, restarts, parts, and /api/v1/missed listing exactly what an evaluation counted.

All on MemoryStore, which journals exactly like MongoStore (tests/integration/test_store.py
proves the real store on FerretDB agrees).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from eventaudit import journal as journal_module
from eventaudit import journal_reader, partitions
from eventaudit.contract import epoch_ms
from eventaudit.exporter import evaluator as evaluator_module
from eventaudit.exporter.buckets import Window
from eventaudit.exporter.evaluator import JOURNAL_OUTCOMES, Evaluator
from eventaudit.exporter.snapshot import Snapshot, list_missed
from eventaudit.exporter.subscriptions import ExpectedSubscriptions
from eventaudit.journal import (
    BucketDigest,
    JournalBatch,
    JournalEntry,
    digest_key,
    parse_journal_document,
)
from eventaudit.records import BucketResult, PublishRecord, Receipt
from eventaudit.store import StoreError
from tests.fakes import MemoryStore, SteadyEvaluator

BUCKET = timedelta(seconds=10)
SETTLE = timedelta(seconds=30)
WINDOW = Window("1m", timedelta(minutes=1))
HOUR = Window("1h", timedelta(hours=1))
TOPIC, SUB, OTHER = "orders", "orders-audit", "orders-billing"
MS = epoch_ms(datetime(2026, 11, 27, 12, 0, 0, tzinfo=UTC))


def at(m: int, s: float) -> datetime:
    return datetime(2026, 11, 27, 12, m, 0, tzinfo=UTC) + timedelta(seconds=s)


def publish(store: MemoryStore, event_id: str, when: datetime, written: datetime | None = None):
    store.insert_publish_records(
        [PublishRecord(event_id, "t" * 32, TOPIC, "{}", "m", when)], written or when
    )


def receive(
    store: MemoryStore, event_id: str, published: datetime, sub: str = SUB, n: int = 1
) -> None:
    got = published + timedelta(seconds=1)
    receipt = Receipt(sub, event_id, TOPIC, None, "m", published, published, got)
    store.record_receipts([receipt] * n, got)


def evaluator(store: MemoryStore, windows: list[Window] | None = None, **kw: Any) -> Evaluator:
    expected = ExpectedSubscriptions({TOPIC: {SUB, OTHER}}, set(), None)
    return SteadyEvaluator(store, expected, windows or [WINDOW], BUCKET, SETTLE, **kw)


def counts(snapshot: Snapshot, sub: str = SUB, window: str = "1m") -> tuple[int, int, int, int]:
    s = snapshot.subscriptions[(TOPIC, sub)][window]
    return s.published, s.received, s.duplicates, s.unmatched


def missed_ids(snapshot: Snapshot, store: MemoryStore, sub: str = SUB) -> list[str] | None:
    listed = list_missed(snapshot, store, TOPIC, sub, snapshot.windows[0], 10_000)
    return None if listed is None else [e.event_id for e in listed]


# -- journal entries: anything in the collection is read without raising -------------------

GOOD_P = f"p|{TOPIC}|e1|{'t' * 32}|{MS}"
GOOD_R = f"r|{TOPIC}|{SUB}|e1|{MS}|2"


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        (GOOD_P, JournalEntry(TOPIC, "e1", MS, None, "t" * 32)),
        (GOOD_R, JournalEntry(TOPIC, "e1", MS, SUB, "", 2)),
        (f"p|{TOPIC}|e1||{MS}", JournalEntry(TOPIC, "e1", MS, None, "")),  # no trace id
        (f"r|{TOPIC}|{SUB}|e1|{MS}|0", None),  # zero deliveries
        (f"r|{TOPIC}|{SUB}|e1|{MS}|-1", None),
        (f"r|{TOPIC}|{SUB}|e1|{MS}|{2**31}", None),  # overflow
        (f"r|{TOPIC}|{SUB}|e1|{MS}|99999999999999999999", None),
        (f"r|{TOPIC}|{SUB}|e1|{MS}|2\n", None),  # trailing newline
        (f"r|{TOPIC}|{SUB}|e1|{MS}|\u0662", None),  # Arabic-Indic 2
        (f"r|{TOPIC}|{SUB}|e1|{MS}|\u00b2", None),  # superscript 2
        (f"r|{TOPIC}|{SUB}|e1|{MS}| 2", None),
        (f"r|{TOPIC}|{SUB}|e1|{MS}|2.0", None),
        (f"r|{TOPIC}|{SUB}|e1|{MS}|", None),
        (f"p|{TOPIC}|e1|t|{10**20}", None),  # past year 9999
        (f"p|{TOPIC}|e1|t|-{10**15}", None),  # before year 1
        (f"p|{TOPIC}|e1|t|-0", JournalEntry(TOPIC, "e1", 0, None, "t")),
        (f"p|{TOPIC}|e1|t|nan", None),
        (f"p|{TOPIC}||t|{MS}", None),
        (f"p||e1|t|{MS}", None),
        (f"p|{TOPIC}|e1|t|{MS}|extra", None),
        (f"r|{TOPIC}|{SUB}|e1|{MS}", None),
        (f"x|{TOPIC}|e1|t|{MS}", None),
        ("p|" + "x" * 5000 + f"|e1|t|{MS}", None),  # huge
        ("", None),
        (["p", TOPIC, "e1", "t", MS], None),  # the array form FerretDB cannot store
        ({"p": 1}, None),
        (None, None),
        (7, None),
        (f"p|{TOPIC}|e\u0661|t|{MS}", None),  # not an eventID the contract accepts
        (f"p|goog-topic|e1|t|{MS}", None),  # not a Pub/Sub id
        (f"r|{TOPIC}|a b|e1|{MS}|1", None),
        (f"p|{TOPIC}|e1|t-t|{MS}", None),  # not a trace id
        # Aliases (a caller's retry published at another time than its stored record).
        (f"a|{TOPIC}|e1|{MS}|{MS - 15_000}", JournalEntry(TOPIC, "e1", MS, alias_of=MS - 15_000)),
        (f"a|{TOPIC}|e1|{MS}|\u0661{MS}", None),  # Arabic-Indic digit
        (f"a|{TOPIC}|e1|{MS}|{10**20}", None),  # overflow
        (f"a|{TOPIC}|e1|{MS}|{10**15}", None),  # past year 9999
        (f"a|{TOPIC}|e1|{MS}|{MS}\n", None),  # trailing newline
        (f"a|{TOPIC}|e1|{MS}", None),
        (f"a|{TOPIC}|{SUB}|e1|{MS}|{MS}", None),
        (f"a|goog-x|e1|{MS}|{MS}", None),
    ],
)
def test_journal_entries_hostile_table(doc: Any, expected: JournalEntry | None) -> None:
    assert JournalEntry.from_document(doc) == expected
    if expected is not None and expected.publish_ms:
        assert expected.to_document() == doc


@pytest.mark.parametrize(
    ("doc", "good", "malformed"),
    [
        ({"_id": "j", "entries": [GOOD_P, GOOD_R]}, 2, 0),
        ({"_id": "j", "entries": [GOOD_P, ["p"], 7, "p|x", GOOD_R]}, 2, 3),
        ({"_id": "j", "entries": "nope"}, 0, 1),
        ({"_id": "j"}, 0, 1),
        ({"_id": "j", "entries": []}, 0, 0),
    ],
)
def test_journal_documents_count_what_they_cannot_read(
    doc: dict[str, Any], good: int, malformed: int
) -> None:
    batch = parse_journal_document(doc)
    assert (batch.id, len(batch.entries), batch.malformed) == ("j", good, malformed)


def test_malformed_entries_are_counted_and_the_rest_is_folded() -> None:
    store = MemoryStore()
    publish(store, "e1", at(0, 1))
    store.inject_journal({"_id": "bad", "entries": [f"p|{TOPIC}", "junk", None]})
    ev = evaluator(store)
    snapshot = ev.evaluate(at(0, 50))
    assert counts(snapshot) == (1, 0, 0, 0)
    assert _journal_counts(ev) == {**NONE_COUNTED, "folded": 1, "malformed": 3}
    assert folded_all(ev, store)  # read and counted: it cannot block the journal


def folded_all(ev: Evaluator, store: MemoryStore) -> bool:
    """Every journal collection is taken and folded whole (dropped a grace later)."""
    return set(store.journals) <= ev.folded_journals


NONE_COUNTED = dict.fromkeys(JOURNAL_OUTCOMES, 0)


def _sample(ev: Evaluator, name: str) -> float | None:
    return next((s.value for f in ev.collect() for s in f.samples if s.name == name), None)


def _journal_counts(ev: Evaluator) -> dict[str, float]:
    return {
        s.labels["outcome"]: s.value
        for family in ev.collect()
        if family.name == "eventaudit_journal_entries"
        for s in family.samples
        if s.name.endswith("_total")
    }


# -- digests: folding is idempotent ---------------------------------------------------------

ENTRIES = [
    JournalEntry(TOPIC, "e1", MS, None, "a" * 32),
    JournalEntry(TOPIC, "e2", MS + 5, None, "b" * 32),
    JournalEntry(TOPIC, "e1", MS, SUB, "", 1),
    JournalEntry(TOPIC, "e1", MS, SUB, "", 3),  # a redelivery: total stored after the write
    JournalEntry(TOPIC, "e9", MS, SUB, "", 1),  # no publish record: unmatched
    JournalEntry(TOPIC, "e2", MS, OTHER, "", 2),
]


@pytest.mark.parametrize(
    "order",
    [
        ENTRIES,
        list(reversed(ENTRIES)),
        ENTRIES + ENTRIES,  # a journal document folded twice (a failure before its delete)
        ENTRIES[3:] + ENTRIES,  # the redelivery's total first, then the first delivery
    ],
)
def test_folding_any_order_any_number_of_times_gives_one_result(
    order: list[JournalEntry],
) -> None:
    digest = BucketDigest(TOPIC, at(0, 0))
    for entry in order:
        digest.merge(entry, merged=1)
    assert digest.result() == BucketResult(
        TOPIC,
        at(0, 0),
        2,
        {
            SUB: journal_module.BucketCounts(received=1, duplicates=2, unmatched=1),
            OTHER: journal_module.BucketCounts(received=1, duplicates=1, unmatched=0),
        },
        merged=1,
        missed={SUB: (f"e2|{'b' * 32}|{MS + 5}",), OTHER: (f"e1|{'a' * 32}|{MS}",)},
        oldest=(f"e1|{'a' * 32}|{MS}", f"e2|{'b' * 32}|{MS + 5}"),
    )
    assert all(not digest.merge(e, merged=2) for e in order)  # nothing left to change


def test_digest_deltas_hold_what_changed_and_their_union_is_the_digest() -> None:
    digest = BucketDigest(TOPIC, at(0, 0))
    for i, entry in enumerate(ENTRIES):
        digest.merge(entry, merged=i)
    first = digest.deltas("f1")
    digest.stored()
    assert digest.deltas("f2") == []  # nothing changed since
    redelivered = ENTRIES[-1]._replace(deliveries=ENTRIES[-1].deliveries + 5)
    late = JournalEntry(TOPIC, "late", MS + 9, None, "c" * 32)
    assert digest.merge(redelivered, merged=50) and digest.merge(late, merged=50)
    [second] = digest.deltas("f2")
    assert (second["published"], len(second["receipts"])) == ([f"late|{'c' * 32}|{MS + 9}|50"], 1)
    # In any order, any delta any number of times: the same digest.
    for docs in ([*first, second], [second, *first], [second, *first, second, *first]):
        back = BucketDigest.from_documents(TOPIC, at(0, 0), docs)
        assert (back.published, back.receipts) == (digest.published, digest.receipts)
    assert len({d["_id"] for d in [*first, second]}) == len(first) + 1


@pytest.mark.parametrize(
    "bad",
    ["e9|t|1", "e9|t|x|1", "e9|t|1|\u0661", 7, None, ["e9", "t", 1, 1]],
)
def test_unreadable_digest_entries_are_skipped_never_raised(bad: Any) -> None:
    doc = {
        "_id": "d",
        "published": [f"e1|t|{MS}|1", bad],
        "receipts": [f"{SUB}|e1|2|1", bad],
    }
    digest = BucketDigest.from_documents(TOPIC, at(0, 0), [doc, {"published": "junk"}])
    assert digest.published == {"e1": ("t", MS, 1)}
    assert digest.receipts == {SUB: {"e1": (2, 1)}}


def test_missed_as_of_leaves_out_what_was_folded_later() -> None:
    digest = BucketDigest(TOPIC, at(0, 0))
    digest.merge(JournalEntry(TOPIC, "e1", MS, None, "t"), merged=10)
    digest.merge(JournalEntry(TOPIC, "e2", MS + 1, None, "t"), merged=10)
    digest.merge(JournalEntry(TOPIC, "e1", MS, SUB, "", 1), merged=20)
    digest.merge(JournalEntry(TOPIC, "e3", MS + 2, None, "t"), merged=20)
    assert [e.event_id for e in digest.missed(SUB, 10)] == ["e1", "e2"]
    assert digest.counts_as_of(SUB, 10) == (2, 0)
    assert [e.event_id for e in digest.missed(SUB, 20)] == ["e2", "e3"]
    assert digest.counts_as_of(SUB, 20) == (3, 1)


# -- the evaluator: every record once, after it is durable ----------------------------------


class FaultyStore(MemoryStore):
    """A MemoryStore whose named operation fails once, on its n-th call from now."""

    def __init__(self) -> None:
        super().__init__()
        self.fail: tuple[str, int] | None = None
        self.calls: dict[str, int] = {}

    def fail_on(self, name: str, nth: int = 1) -> None:
        self.fail, self.calls = (name, nth), {}

    def _maybe_fail(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.fail and self.fail[0] == name and self.calls[name] == self.fail[1]:
            self.fail = None
            raise StoreError(f"injected: {name}")

    def load_digest(self, topic: str, start: datetime) -> BucketDigest:
        self._maybe_fail("load_digest")
        return super().load_digest(topic, start)

    def take_journal(self, now: datetime, keys: Collection[str] | None = None) -> list[str]:
        self._maybe_fail("take_journal")
        return super().take_journal(now, keys)

    def read_journal(self, name: str) -> Iterator[JournalBatch]:
        self._maybe_fail("read_journal")
        return super().read_journal(name)

    def count_journal(self, name: str) -> int:
        self._maybe_fail("count_journal")
        return super().count_journal(name)

    def drop_journal(self, name: str) -> None:
        self._maybe_fail("drop_journal")
        super().drop_journal(name)

    def save_fold_stamp(self, stamp: int) -> None:
        self._maybe_fail("save_fold_stamp")
        super().save_fold_stamp(stamp)

    def save_digests(self, digests: Iterable[BucketDigest], fold: str) -> None:
        self._maybe_fail("save_digests")
        super().save_digests(digests, fold)

    def save_digest_document(self, doc: dict[str, Any]) -> None:
        self._maybe_fail("save_digest_document")
        super().save_digest_document(doc)

    def save_bucket_results(
        self, results: Iterable[BucketResult], now: datetime, version: int, epoch: int = 0
    ) -> None:
        self._maybe_fail("save_bucket_results")
        super().save_bucket_results(results, now, version, epoch)


def _traffic(store: MemoryStore) -> None:
    """10 events in [12:00:00, 12:00:20): all received on SUB, e3 twice; e7 lost on SUB; OTHER
    gets the even ones; plus a receipt without publish record."""
    for i in range(10):
        when = at(0, 2 * i)
        publish(store, f"e{i}", when)
        if i != 7:
            receive(store, f"e{i}", when, n=2 if i == 3 else 1)
        if i % 2 == 0:
            receive(store, f"e{i}", when, sub=OTHER)
    receive(store, "stranger", at(0, 5))


EXPECTED_SUB = (10, 9, 1, 1)
EXPECTED_OTHER = (10, 5, 0, 0)


@pytest.mark.parametrize(
    "fail",
    [
        ("take_journal", 1),
        ("read_journal", 1),
        ("read_journal", 2),  # the first journal collection folded, the second not
        ("save_fold_stamp", 1),
        ("save_digests", 1),
        ("save_digest_document", 2),  # the first collection's delta stored, the second's not
        ("save_bucket_results", 1),  # after the digests were stored
        ("save_bucket_results", 2),  # the first collection's results stored
    ],
)
def test_an_evaluation_failing_half_way_counts_every_record_once_next_time(
    fail: tuple[str, int],
) -> None:
    store = FaultyStore()
    _traffic(store)
    store.fail_on(*fail)
    ev = evaluator(store)
    with pytest.raises(StoreError):
        ev.evaluate(at(0, 50))
    snapshot = ev.evaluate(at(0, 51))
    assert (counts(snapshot), counts(snapshot, OTHER)) == (EXPECTED_SUB, EXPECTED_OTHER)
    assert folded_all(ev, store)
    assert missed_ids(snapshot, store) == ["e7"]
    # And a new process over the same store agrees, reading nothing again.
    again = evaluator(store).evaluate(at(0, 52))
    assert (counts(again), counts(again, OTHER)) == (EXPECTED_SUB, EXPECTED_OTHER)


@pytest.mark.parametrize(
    "fail_at",
    ["take_journal", "read_journal", "save_fold_stamp", "save_digests", "save_bucket_results"],
)
def test_a_process_that_stops_half_way_leaves_nothing_a_new_one_counts_twice(
    fail_at: str,
) -> None:
    store = FaultyStore()
    _traffic(store)
    store.fail_on(fail_at)
    with pytest.raises(StoreError):
        evaluator(store).evaluate(at(0, 50))  # this process dies here
    snapshot = evaluator(store).evaluate(at(0, 51))
    assert (counts(snapshot), counts(snapshot, OTHER)) == (EXPECTED_SUB, EXPECTED_OTHER)


def test_a_failed_store_of_cached_digests_is_stored_by_the_next_evaluation() -> None:
    store = FaultyStore()
    publish(store, "e1", at(0, 11))
    ev = evaluator(store)
    ev.evaluate(at(0, 40))  # the bucket of 12:00:10 is not settled: its digest stays cached
    publish(store, "e2", at(0, 12))
    store.fail_on("save_digests")
    with pytest.raises(StoreError):
        ev.evaluate(at(0, 45))
    snapshot = ev.evaluate(at(0, 50))
    assert counts(snapshot)[0] == 2
    assert missed_ids(snapshot, store) == ["e1", "e2"]  # read from the stored digest
    assert counts(evaluator(store).evaluate(at(0, 51)))[0] == 2


def test_a_journal_document_written_twice_counts_once() -> None:
    store = MemoryStore()
    _traffic(store)
    for name, docs in list(store.journals.items()):
        for i, doc in enumerate(list(docs.values())):  # a retried insert that landed
            store.inject_journal({**doc, "_id": f"copy{i}"}, name)
            store.inject_journal({**doc, "_id": f"elsewhere{i}"})  # or went to the next slot
    snapshot = evaluator(store).evaluate(at(0, 50))
    assert (counts(snapshot), counts(snapshot, OTHER)) == (EXPECTED_SUB, EXPECTED_OTHER)


def test_an_evaluation_with_nothing_new_reads_no_digest_and_recounts_nothing() -> None:
    store = MemoryStore()
    _traffic(store)
    ev = evaluator(store)
    first = ev.evaluate(at(0, 50))
    reads = store.digest_reads
    for now in (at(1, 0), at(1, 10)):
        later = ev.evaluate(now)
        assert counts(later) == counts(first)
    assert store.digest_reads == reads


def test_new_records_read_the_digests_of_their_buckets_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(evaluator_module, "CACHE_EVENTS", 5)  # older buckets leave the cache
    store = MemoryStore()
    _traffic(store)
    ev = evaluator(store, windows=[HOUR])
    ev.evaluate(at(0, 50))
    # 40 minutes of history evaluated and dropped from memory, then one late receipt.
    for minute in range(1, 40):
        publish(store, f"h{minute}", at(minute, 0))
        ev.evaluate(at(minute, 45))
    reads = store.digest_reads
    receive(store, "e7", at(0, 14))  # e7's bucket is 40 minutes old
    snapshot = ev.evaluate(at(40, 45))
    assert store.digest_reads - reads == 1  # the one bucket it fell in
    assert counts(snapshot, window="1h")[:2] == (49, 10)


@pytest.mark.parametrize(
    ("published", "now", "reported"),
    [
        # The window is [frontier - 1m, frontier); frontier = floor(now - settle, 10 s).
        (at(0, 9.999), at(0, 40), True),  # bucket 12:00:00 ended at 12:00:10, settled 12:00:40
        (at(0, 10), at(0, 40), False),  # bucket 12:00:10 settles at 12:00:50
        (at(0, 10), at(0, 50), True),
        (at(0, 0), at(1, 30), True),  # first bucket of the window [12:00:00, 12:01:00)
        (at(0, 0), at(1, 40), False),  # out of the window now
    ],
)
def test_records_on_bucket_and_window_edges(
    published: datetime, now: datetime, reported: bool
) -> None:
    store = MemoryStore()
    publish(store, "e1", published)
    snapshot = evaluator(store).evaluate(now)
    assert counts(snapshot)[0] == int(reported)
    assert missed_ids(snapshot, store) == (["e1"] if reported else [])


@pytest.mark.parametrize(
    "written", [at(0, 1), at(0, 1) - timedelta(hours=1), at(0, 1) + timedelta(hours=1)]
)
def test_writer_clocks_do_not_decide_what_is_counted(written: datetime) -> None:
    # Only the publishTime places an event; when (by any writer's clock) it was written is
    # irrelevant: the journal is read whole, whatever its stamps.
    store = MemoryStore()
    publish(store, "e1", at(0, 1), written=written)
    receipt = Receipt(SUB, "e1", TOPIC, None, "m", at(0, 1), at(0, 1), written)
    store.record_receipts([receipt], written)
    assert counts(evaluator(store).evaluate(at(0, 45))) == (1, 1, 0, 0)


def test_records_too_old_for_any_window_are_counted_apart() -> None:
    store = MemoryStore()
    # Written now, for an event older than any window by more than LATE_FOLD_MS.
    publish(store, "ancient", at(0, 0) - timedelta(hours=25), written=at(0, 1))
    publish(store, "e1", at(0, 1))
    ev = evaluator(store)
    assert counts(ev.evaluate(at(0, 45))) == (1, 0, 0, 0)
    assert _journal_counts(ev) == {**NONE_COUNTED, "folded": 1, "too_old": 1}


def test_an_entry_too_old_only_by_the_exporters_clock_is_folded() -> None:
    # An exporter started with its clock 75 minutes ahead (issue 17, case 4): what writers
    # wrote a moment ago is not too old by their clocks, so it is folded, not dropped.
    store = MemoryStore()
    publish(store, "e1", at(0, 1))
    ahead = evaluator(store)
    ahead.evaluate(at(0, 45) + timedelta(minutes=75))
    assert _journal_counts(ahead) == {**NONE_COUNTED, "folded": 1}
    right = evaluator(store)  # restarted with the clock put right
    assert counts(right.evaluate(at(0, 45))) == (1, 0, 0, 0)


# -- a late receipt: missed, then received; the API agrees with the gauge at every step ----


def test_a_late_receipt_is_listed_missed_by_the_evaluation_that_missed_it() -> None:
    store = MemoryStore()
    for i in range(3):
        publish(store, f"e{i}", at(0, i))
    receive(store, "e0", at(0, 0))
    ev = evaluator(store)
    first = ev.evaluate(at(0, 45))
    assert counts(first)[:2] == (3, 1)
    assert missed_ids(first, store) == ["e1", "e2"]
    # e1's consumer handler took 40 s: its receipt is written now.
    receive(store, "e1", at(0, 1))
    second = ev.evaluate(at(0, 55))
    assert counts(second)[:2] == (3, 2)
    assert missed_ids(second, store) == ["e2"]
    # The API asked about the first evaluation still lists what that one counted.
    assert missed_ids(first, store) == ["e1", "e2"]


# -- deltas: a bucket stored over many documents -------------------------------------------


@pytest.mark.parametrize(
    ("fail_at", "nth"),
    [
        ("save_digests", 1),
        ("save_digest_document", 1),  # nothing of the new delta is stored
        ("save_digest_document", 3),  # two of its documents are, the rest not
        ("save_bucket_results", 1),  # the delta is stored, the result is not
    ],
)
def test_a_bucket_over_many_delta_documents_loses_nothing_to_a_failure_half_way(
    monkeypatch: pytest.MonkeyPatch, fail_at: str, nth: int
) -> None:
    monkeypatch.setattr(journal_module, "PART_BYTES", 500)
    monkeypatch.setattr(journal_module, "MISSED_KEPT", 0)  # listings read the digest
    store = FaultyStore()
    for i in range(3):
        publish(store, f"e{i}", at(0, 1))
    ev = evaluator(store)
    ev.evaluate(at(0, 45))
    assert len(store.digests) == 1
    for i in range(3, 30):
        publish(store, f"e{i}", at(0, 1))
        if i % 3:
            receive(store, f"e{i}", at(0, 1))
    store.fail_on(fail_at, nth)
    with pytest.raises(StoreError):
        ev.evaluate(at(0, 46))
    for snapshot in (ev.evaluate(at(0, 47)), evaluator(store).evaluate(at(0, 48))):
        # The same process goes on, and a new one starts: both see every event.
        assert counts(snapshot)[:2] == (30, 18)
        missed = missed_ids(snapshot, store)
        assert missed is not None and sorted(missed) == sorted(
            f"e{i}" for i in range(30) if i < 3 or i % 3 == 0
        )
    assert len(store.digests) > 5  # 27 publishes and 18 receipts, 500 bytes a document


def test_the_digest_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from eventaudit.exporter import evaluator as evaluator_module

    monkeypatch.setattr(evaluator_module, "CACHE_EVENTS", 5)
    store = MemoryStore()
    for i in range(20):
        publish(store, f"e{i}", at(0, 35))
    ev = evaluator(store)
    ev.evaluate(at(0, 45))
    cached = {
        f.name: f.samples[0].value
        for f in ev.collect()
        if f.name == "eventaudit_digest_cache_events"
    }
    assert cached == {"eventaudit_digest_cache_events": 0}  # 20 events > 5: not kept


def test_a_burst_is_folded_over_several_evaluations_within_the_budget() -> None:
    store = MemoryStore()
    for i in range(50):  # a writer's batch every 2 s: ten journal collections
        publish(store, f"e{i}", at(0, 1), written=at(0, 1) + timedelta(seconds=2 * i))
    assert len(store.journals) == 10
    ticks = iter(range(1000))
    clock: Callable[[], float] = lambda: float(next(ticks))  # noqa: E731
    # Two documents per round, and the budget is spent after the first collection.
    ev = evaluator(store, round_entries=2, budget=timedelta(seconds=0.5), monotonic=clock)
    first = ev.evaluate(at(0, 45))
    assert counts(first)[0] == 5  # the first collection's (written 12:00:01..09), by twos
    assert _backlog(ev) == 1
    ev2 = evaluator(store, round_entries=100)
    assert counts(ev2.evaluate(at(0, 46)))[0] == 50
    assert _backlog(ev2) == 0


def _backlog(ev: Evaluator) -> float:
    return next(f.samples[0].value for f in ev.collect() if f.name == "eventaudit_journal_backlog")


def test_a_new_process_with_its_clock_stepped_back_still_lists_what_it_counts() -> None:
    store = MemoryStore()
    _traffic(store)
    ten = [Window("10m", timedelta(minutes=10))]
    first = evaluator(store, windows=ten).evaluate(at(5, 0))
    receive(store, "e7", at(0, 14))  # folded by the second process
    # The second process's clock is a minute behind the first's: its folds must still be
    # stamped after the first process's, or the API would take them for earlier ones.
    snapshot = evaluator(store, windows=ten).evaluate(at(4, 0))
    assert snapshot.merged > first.merged
    assert counts(snapshot, window="10m")[:2] == (10, 10)
    listed = list_missed(snapshot, store, TOPIC, SUB, ten[0], 100)
    assert listed == []
    assert [e.event_id for e in list_missed(first, store, TOPIC, SUB, ten[0], 100) or []] == ["e7"]


# -- what a hostile review found ------------------------------------------------------------


def test_a_failed_fold_never_lets_a_later_fold_reuse_its_stamp() -> None:
    store = FaultyStore()
    publish(store, "e1", at(0, 1))
    ev = evaluator(store)
    assert missed_ids(ev.evaluate(at(0, 45)), store) == ["e1"]
    receive(store, "e1", at(0, 1))
    publish(store, "e2", at(0, 2))
    store.fail_on("save_bucket_results")  # digests stored with this evaluation's stamp
    with pytest.raises(StoreError):
        ev.evaluate(at(0, 50))
    for process in (ev, evaluator(store)):  # the same process, or a new one
        snapshot = process.evaluate(at(0, 49))  # the clock stepped back a second
        assert counts(snapshot)[:2] == (2, 1)
        assert missed_ids(snapshot, store) == ["e2"]


def test_publish_times_past_the_tolerance_are_counted_apart_not_kept() -> None:
    store = MemoryStore()
    y9000 = epoch_ms(datetime(9000, 1, 1, tzinfo=UTC))
    store.inject_journal(
        {"_id": "x", "entries": [f"p|{TOPIC}|e{i}|t|{y9000 + i * 10_000}" for i in range(1000)]}
    )
    # A publish time two hours ahead of the clock of the writer that wrote it.
    publish(store, "ahead", at(0, 1) + timedelta(hours=2), written=at(0, 1))
    ev = evaluator(store)
    ev.evaluate(at(0, 45))
    assert _journal_counts(ev) == {**NONE_COUNTED, "too_new": 1001}
    assert store.buckets == {} and store.digests == {}


def _evil_digest(store: MemoryStore, published: list[Any], receipts: list[Any]) -> None:
    start = at(0, 0)
    store.digests["evil"] = {
        "_id": "evil",
        "digest": digest_key(TOPIC, start),
        "topic": TOPIC,
        "bucketStart": start,
        "published": published,
        "receipts": receipts,
    }


@pytest.mark.parametrize(
    ("published", "receipts"),
    [
        ([], [f"{SUB}|x|-1000|1"]),  # negative deliveries
        ([], [f"{SUB}|x|0|1"]),
        ([f"evil|t|{10**15 - 1}|1"], []),  # a publish time past year 9999
        ([f"evil|t|{MS}|-5"], []),
    ],
)
def test_unreadable_digest_values_never_reach_the_gauges_or_the_api(
    published: list[Any], receipts: list[Any]
) -> None:
    store = MemoryStore()
    _evil_digest(store, published, receipts)
    publish(store, "e1", at(0, 1))
    snapshot = evaluator(store).evaluate(at(0, 45))
    assert counts(snapshot) == (1, 0, 0, 0)
    assert missed_ids(snapshot, store) == ["e1"]


def test_a_digest_too_large_for_one_document_is_split_by_bytes() -> None:
    import bson

    digest = BucketDigest(TOPIC, at(0, 0))
    subs = [f"orders-consumer-number-{i:02d}" for i in range(9)]
    for i in range(20_000):
        event_id = f"{i:036d}"
        digest.merge(JournalEntry(TOPIC, event_id, MS, None, "a" * 32), 1795780800123)
        for sub in subs:
            digest.merge(JournalEntry(TOPIC, event_id, MS, sub, "", 1), 1795780800123)
    sizes = [len(bson.encode(doc)) for doc in digest.deltas("f")]
    assert sum(sizes) > 16 * 2**20  # one document could not hold it
    assert max(sizes) < journal_module.PART_BYTES


def test_a_journal_document_with_more_entries_than_a_writer_writes_is_malformed_whole() -> None:
    n = journal_module.MAX_ENTRIES_PER_DOCUMENT + 1
    doc = {"_id": "j", "entries": [f"p|{TOPIC}|e{i}|t|{MS}" for i in range(n)]}
    batch = parse_journal_document(doc)
    assert (batch.entries, batch.malformed) == ((), n)
    # Writers split their batches: a 12,000-receipt batch is three documents.
    entries = [JournalEntry(TOPIC, f"e{i}", MS, SUB, "", 1) for i in range(12_000)]
    docs = journal_module.journal_documents("b", entries, at(0, 0))
    assert [len(d["entries"]) for d in docs] == [5000, 5000, 2000]
    assert len({d["_id"] for d in docs}) == 3


# -- /api/v1/missed from the bucket results -------------------------------------------------


def test_a_listing_reads_digests_only_past_what_the_results_keep(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(journal_module, "MISSED_KEPT", 3)
    store = MemoryStore()
    for i in range(5):  # bucket 12:00:00: five published, none received on SUB
        publish(store, f"a{i}", at(0, i))
    for i in range(2):  # bucket 12:00:10: two published, none received
        publish(store, f"b{i}", at(0, 10 + i))
    receive(store, "b0", at(0, 10), sub=OTHER)  # OTHER has receipts there, SUB has none
    snapshot = evaluator(store).evaluate(at(0, 55))
    window = snapshot.windows[0]
    reads = store.digest_reads
    ids = [e.event_id for e in list_missed(snapshot, store, TOPIC, SUB, window, 3) or []]
    assert (ids, store.digest_reads - reads) == (["a0", "a1", "a2"], 0)
    ids = [e.event_id for e in list_missed(snapshot, store, TOPIC, SUB, window, 100) or []]
    assert ids == ["a0", "a1", "a2", "a3", "a4", "b0", "b1"]
    assert store.digest_reads - reads == 1  # 12:00:00 holds more than its result lists
    ids = [e.event_id for e in list_missed(snapshot, store, TOPIC, OTHER, window, 100) or []]
    assert ids == ["a0", "a1", "a2", "a3", "a4", "b1"]


def test_a_result_listing_that_does_not_read_back_falls_back_to_the_digest() -> None:
    store = MemoryStore()
    publish(store, "e1", at(0, 1))
    snapshot = evaluator(store).evaluate(at(0, 45))
    [(key, result)] = snapshot.buckets.items()
    broken = dataclasses.replace(result, oldest=("not|a-number|x",))
    tampered = dataclasses.replace(snapshot, buckets={key: broken})
    reads = store.digest_reads
    assert missed_ids(tampered, store) == ["e1"]
    assert store.digest_reads - reads == 1


def test_a_failed_digest_read_for_a_late_record_counts_it_next_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(evaluator_module, "CACHE_EVENTS", 5)  # older buckets leave the cache
    store = FaultyStore()
    _traffic(store)
    ev = evaluator(store)
    ev.evaluate(at(0, 50))
    ev.evaluate(at(1, 30))  # the traffic's buckets are no longer cached
    receive(store, "e7", at(0, 14))
    store.fail_on("load_digest")
    with pytest.raises(StoreError):
        ev.evaluate(at(1, 31))
    snapshot = ev.evaluate(at(1, 32))
    assert counts(snapshot)[:2] == (10, 10)
    assert store.calls["load_digest"] == 2


# -- journal collections: taken by rename, dropped a grace after they were folded -------------


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_folded_journal_collection_is_dropped_only_after_the_grace() -> None:
    store = MemoryStore()
    publish(store, "e1", at(0, 1))
    clock = Clock()
    ev = evaluator(store, monotonic=clock)
    ev.evaluate(at(0, 45))
    [taken] = store.journals
    assert ev.folded_journals == {taken}
    clock.now = journal_reader.JOURNAL_DROP_GRACE - 1
    ev.evaluate(at(0, 46))
    assert list(store.journals) == [taken]  # a writer may still be inserting into it
    clock.now = journal_reader.JOURNAL_DROP_GRACE
    snapshot = ev.evaluate(at(0, 47))
    assert (store.journals, ev.folded_journals) == ({}, frozenset())
    assert counts(snapshot)[:2] == (1, 0)


def test_an_insert_that_lands_in_a_taken_collection_is_folded_before_it_is_dropped() -> None:
    store = MemoryStore()
    publish(store, "e1", at(0, 1))
    clock = Clock()
    ev = evaluator(store, monotonic=clock)
    assert counts(ev.evaluate(at(0, 45)))[:2] == (1, 0)
    [taken] = store.journals
    # A subscriber looked the collection up before the rename; its insert lands after the fold.
    receipt = JournalEntry(TOPIC, "e1", epoch_ms(at(0, 1)), SUB, "", 1)
    store.inject_journal({"_id": "straggler", "entries": [receipt.to_document()]}, taken)
    clock.now = journal_reader.JOURNAL_DROP_GRACE
    snapshot = ev.evaluate(at(0, 46))
    assert counts(snapshot)[:2] == (1, 1)  # folded again instead of dropped
    assert missed_ids(snapshot, store) == []
    assert taken.endswith("_1")  # named folded with the one document it held then
    assert list(store.journals) == [taken.removesuffix("_1") + "_2"]  # and now with two
    clock.now = 2 * journal_reader.JOURNAL_DROP_GRACE
    assert counts(ev.evaluate(at(0, 47)))[:2] == (1, 1)
    assert store.journals == {}


def test_a_failed_drop_is_retried_and_a_new_process_refolds_what_is_left() -> None:
    store = FaultyStore()
    _traffic(store)
    clock = Clock()
    ev = evaluator(store, monotonic=clock)
    ev.evaluate(at(0, 50))
    clock.now = journal_reader.JOURNAL_DROP_GRACE
    store.fail_on("drop_journal")
    with pytest.raises(StoreError):
        ev.evaluate(at(0, 51))
    left = len(store.journals)
    assert left >= 1
    # A new process folds what was not dropped again (idempotent), then drops it.
    clock2 = Clock()
    ev2 = evaluator(store, monotonic=clock2)
    snapshot = ev2.evaluate(at(0, 52))
    assert (counts(snapshot), counts(snapshot, OTHER)) == (EXPECTED_SUB, EXPECTED_OTHER)
    clock2.now = journal_reader.JOURNAL_DROP_GRACE
    again = ev2.evaluate(at(0, 53))
    assert (counts(again), counts(again, OTHER)) == (EXPECTED_SUB, EXPECTED_OTHER)
    assert store.journals == {}


def test_writers_journal_into_a_fresh_collection_once_theirs_is_taken() -> None:
    store = MemoryStore()
    publish(store, "e1", at(0, 1))
    ev = evaluator(store)
    ev.evaluate(at(0, 5))
    publish(store, "e2", at(0, 2))  # the same writer slot: a new collection of that name
    assert sorted(n.split("_")[0] for n in store.journals) == ["EventJournal", "EventJournalFolded"]
    assert counts(ev.evaluate(at(0, 45)))[:2] == (2, 0)


# -- partition names: anything else in the database is left alone -----------------------


K = partitions.journal_key("orders")


@pytest.mark.parametrize(
    ("name", "live", "taken", "key"),
    [
        (f"EventJournal_1795780800000_{K}", True, False, K),
        (f"EventJournal_-10000_{K}", True, False, K),  # a writer clock before 1970
        (f"EventJournalTaken_{K}_1795780800000_0a1b2c3d", False, True, K),
        (f"EventJournalFolded_{K}_1795780800000_0a1b2c3d_7", False, True, K),
        # anything else is left alone: no journal collection without a key was ever written
        ("EventJournal", False, False, None),
        ("EventJournal_1795780800000", False, False, None),
        ("EventJournalTaken_1795780800000_0a1b2c3d", False, False, None),
        ("EventJournalFolded_1795780800000_0a1b2c3d_3", False, False, None),
        ("EventJournal_", False, False, None),
        ("EventJournal_1795780800000\n", False, False, None),
        (f"EventJournal_1795780800000_{K}\n", False, False, None),
        ("EventJournal_1795780800000_00000000000A", False, False, None),  # upper-case hex
        (f"EventJournal_1795780800000_{K[:-1]}", False, False, None),  # 11 hex digits
        (f"EventJournal_1795780800000_{K}0", False, False, None),  # 13
        (f"EventJournal_1795780800000_{K[:-1]}\u0661", False, False, None),
        ("EventJournal_\u0661", False, False, None),  # Arabic-Indic 1
        ("EventJournal_1234567890123456", False, False, None),  # more digits than a clock
        (f"EventJournalTaken_{K}_1795780800000_0A1B2C3D", False, False, None),
        (f"EventJournalTaken_{K}_1795780800000_0a1b2c3d.x", False, False, None),
        ("EventJournal.1795780800000", False, False, None),  # FerretDB cannot rename it
        ("eventjournal.1", False, False, None),
        ("PublishRecord", False, False, None),
    ],
)
def test_journal_collection_names_hostile_table(
    name: str, live: bool, taken: bool, key: str | None
) -> None:
    assert (
        partitions.is_live_journal(name),
        partitions.is_taken_journal(name),
        partitions.journal_key_of(name),
    ) == (live, taken, key)


@pytest.mark.parametrize(
    ("names", "before", "dropped"),
    [
        # A partition holds 10 minutes of bucket starts: dropped once all start before.
        ([f"BucketDigest_{MS}"], MS + 600_000, [f"BucketDigest_{MS}"]),
        ([f"BucketDigest_{MS}"], MS + 599_999, []),
        ([f"BucketResult_{MS}", f"BucketDigest_{MS}"], MS + 600_000, [f"BucketDigest_{MS}"]),
        (["BucketDigest", "BucketDigest_x", "BucketDigest_\u0661", "Other.1"], MS + 10**9, []),
    ],
)
def test_partitions_are_dropped_whole_once_no_window_reaches_them(
    names: list[str], before: int, dropped: list[str]
) -> None:
    old = partitions.partitions_before(names, "BucketDigest", journal_module.from_epoch_ms(before))
    assert old == dropped


# -- a second hostile review: refolds, the stamp, clocks ---------------------------------------

GRACE = journal_reader.JOURNAL_DROP_GRACE


def _refold_without_new_collections(store: MemoryStore, clock: Clock):
    publish(store, "e1", at(0, 1))
    publish(store, "e2", at(0, 1))
    ev = evaluator(store, monotonic=clock)
    assert counts(ev.evaluate(at(0, 45)))[:2] == (2, 0)
    [taken] = store.journals
    straggler = JournalEntry(TOPIC, "e1", epoch_ms(at(0, 1)), SUB, "", 1)
    store.inject_journal({"_id": "straggler", "entries": [straggler.to_document()]}, taken)
    clock.now = GRACE
    assert counts(ev.evaluate(at(0, 46)))[:2] == (2, 1)  # refolded, nothing new taken
    return ev


def test_a_refold_saves_its_fold_stamp_first() -> None:
    store = MemoryStore()
    _refold_without_new_collections(store, Clock())
    stamps = [int(d["_id"].split("|")[2].split(".")[0]) for d in store.digests.values()]
    # Every stamp stored in a digest must be <= the stored fold stamp (load_fold_stamp's
    # contract: "the highest fold stamp any evaluation may have stored in a digest").
    assert max(stamps) <= store.fold_stamp, (max(stamps), store.fold_stamp)


def test_a_clock_stepped_back_after_a_refold_leaves_a_stale_result_standing() -> None:
    store = MemoryStore()
    clock = Clock()
    ev = _refold_without_new_collections(store, clock)
    receive(store, "e2", at(0, 1))  # a new collection: this one does save a stamp
    # The wall clock steps back half a second (NTP); same process.
    assert counts(ev.evaluate(at(0, 45.5)))[:2] == (2, 2)
    clock.now = 10 * GRACE
    ev.evaluate(at(0, 45.6))  # every taken collection dropped (counts unchanged)
    assert store.journals == {}
    # A restart: the stored result with the highest version is the refold's (2, 1).
    restarted = evaluator(store).evaluate(at(0, 47))
    assert counts(restarted)[:2] == (2, 2)


def _fold_at_the_refolds_stamp(store: MemoryStore) -> None:
    """A refold, then a receipt folded with the clock stepped back to exactly the refold's
    millisecond (the same fold token "M.0" but for the stored stamp), then every taken
    collection dropped."""
    clock = Clock()
    ev = _refold_without_new_collections(store, clock)
    receive(store, "e2", at(0, 1))
    assert counts(ev.evaluate(at(0, 46)))[:2] == (2, 2)
    clock.now = 10 * GRACE
    ev.evaluate(at(0, 46) + timedelta(milliseconds=1))


def test_an_equal_stamp_after_a_refold_loses_a_delta() -> None:
    store = MemoryStore()
    _fold_at_the_refolds_stamp(store)
    assert store.journals == {}
    restarted = evaluator(store).evaluate(at(0, 47))
    assert counts(restarted)[:2] == (2, 2)


def test_an_equal_stamp_after_a_refold_loses_the_receipt_from_the_digest_for_good() -> None:
    store = MemoryStore()
    _fold_at_the_refolds_stamp(store)
    digest = store.load_digest(TOPIC, at(0, 0))
    assert set(digest.receipts.get(SUB, {})) == {"e1", "e2"}


class StampFailsOnce(MemoryStore):
    fail_stamp = False

    def load_fold_stamp(self) -> int:
        if self.fail_stamp:
            self.fail_stamp = False
            raise StoreError("injected: load_fold_stamp")
        return super().load_fold_stamp()


def test_a_failed_first_load_of_the_fold_stamp_is_not_taken_for_zero() -> None:
    store = StampFailsOnce()
    publish(store, "e1", at(0, 1))
    assert counts(evaluator(store).evaluate(at(0, 45)))[:2] == (1, 0)  # process 1
    receive(store, "e1", at(0, 1))
    # Process 2, its clock 2 s behind process 1's: the results load, the stamp read fails.
    store.fail_stamp = True
    clock = Clock()
    ev = evaluator(store, monotonic=clock)
    with pytest.raises(StoreError):
        ev.evaluate(at(0, 43))
    assert counts(ev.evaluate(at(0, 43.5)))[:2] == (1, 1)
    clock.now = 10 * GRACE
    ev.evaluate(at(0, 44))  # taken collections dropped
    # Process 3: the highest stored version is process 1's (1, 0).
    assert counts(evaluator(store).evaluate(at(0, 50)))[:2] == (1, 1)


def test_a_taken_name_made_from_any_clock_is_recognised() -> None:
    now = datetime(1969, 12, 31, 23, 59, 50, tzinfo=UTC)
    taken = partitions.taken_journal(now, "0a1b2c3d", partitions.journal_key(TOPIC))
    assert partitions.is_taken_journal(taken)
    assert partitions.folded_documents(partitions.folded_journal(taken, 7)) == 7
    assert partitions.journal_key_of(taken) == partitions.journal_key(TOPIC)


HOUR_MS = 3_600_000


def after(minutes: float) -> datetime:
    return at(0, 0) + timedelta(minutes=minutes)


@pytest.mark.parametrize(
    ("published", "written", "hour"),
    [
        (at(0, 0), at(0, 0), MS),  # 12:00 to 13:00
        (after(59.99), after(59.99), MS),
        (after(60), after(61), MS + HOUR_MS),
        # A redelivery a day later carries the same publish time: the same hour, its receipt.
        (at(0, 5), at(0, 5) + timedelta(days=1), MS),
        # A receipt written late for an event published long ago goes to that old hour.
        (at(0, 5) - timedelta(days=3), at(0, 5), MS - 72 * HOUR_MS),
        # A publish time far ahead of its write (a broken clock): the write plus the tolerance.
        (datetime(9999, 1, 1, tzinfo=UTC), at(0, 5), MS + HOUR_MS),
        (at(0, 5) + timedelta(minutes=59), at(0, 5), MS),  # within the tolerance: as is
    ],
)
def test_records_go_to_the_hour_of_their_publish_time(
    published: datetime, written: datetime, hour: int
) -> None:
    assert partitions.record_partition("ReceivedRecord", published, written) == (
        f"ReceivedRecord_{hour}"
    )


def test_retention_drops_whole_hours_and_never_a_record_published_after_the_cutoff() -> None:
    store = MemoryStore()
    for i, minute in enumerate((0, 30, 59, 60, 61)):
        publish(store, f"e{i}", after(minute))
        receive(store, f"e{i}", after(minute))
    # The cutoff falls inside the 13:00 hour: only the 12:00 hour is dropped, whole.
    deleted = store.delete_older_than(after(90))
    assert (deleted["PublishRecord"], deleted["ReceivedRecord"]) == (1, 1)  # hours
    assert sorted(d["eventID"] for d in store.published.values()) == ["e3", "e4"]
    assert store.delete_older_than(after(120))["PublishRecord"] == 1
    assert store.published == {}


def test_a_refold_after_a_straggler_folds_only_the_new_documents(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(evaluator_module, "CACHE_EVENTS", 2)  # its bucket leaves the cache
    store = FaultyStore()
    for i in range(3):
        publish(store, f"e{i}", at(0, 1))
    clock = Clock()
    ev = evaluator(store, windows=[HOUR], monotonic=clock)
    ev.evaluate(at(0, 45))
    [taken] = store.journals
    receipt = JournalEntry(TOPIC, "e1", epoch_ms(at(0, 1)), SUB, "", 1)
    store.inject_journal({"_id": "straggler", "entries": [receipt.to_document()]}, taken)
    # The bucket of 12:00:00 is out of the cache; the taken collection is counted again at
    # the next pass (within STRAGGLER_CHECK of its read), and its straggler folded there.
    reads = store.digest_reads
    folded = _journal_counts(ev)["folded"]
    clock.now = 10.0  # the next pass
    snapshot = ev.evaluate(at(0, 55))
    assert _journal_counts(ev)["folded"] - folded == 1  # the straggler's entry, not e0..e2 again
    assert store.digest_reads - reads == 1
    assert counts(snapshot, window="1h")[:2] == (3, 1)
    assert _sample(ev, "eventaudit_journal_stragglers_total") == 1
    clock.now = 10.0 + journal_reader.JOURNAL_DROP_GRACE  # the grace after its refold
    ev.evaluate(at(5, 1))
    assert store.journals == {}  # dropped at the grace: nothing grew since


def test_a_burst_over_old_buckets_reads_each_digest_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # A publisher flushing after an outage: records for settled buckets, over several rounds.
    store = MemoryStore()
    for i in range(40):
        publish(store, f"e{i}", at(0, i % 20), written=at(0, 1) + timedelta(seconds=10 * i))
    ev = evaluator(store, windows=[HOUR], round_entries=1)
    ev.evaluate(at(0, 45))  # results for 12:00:00 and 12:00:10 exist from here on
    for i in range(40, 80):
        publish(store, f"e{i}", at(0, i % 20), written=at(5, 0) + timedelta(seconds=10 * i))
    reads = store.digest_reads
    snapshot = ev.evaluate(at(12, 0))  # forty collections, one document each: forty rounds
    assert counts(snapshot, window="1h")[0] == 80
    assert store.digest_reads - reads == 0  # kept in memory between rounds, never reloaded


class RenameExcludesInserts(MemoryStore):
    """A store whose rename excludes inserts (MongoDB): no journal insert lands after a take."""

    journal_stragglers = False
    counts = 0

    def count_journal(self, name: str) -> int:
        self.counts += 1
        return super().count_journal(name)


@pytest.mark.parametrize(("stragglers", "counted"), [(True, 1), (False, 0)])
def test_taken_collections_are_counted_again_only_where_inserts_can_land_after_a_take(
    stragglers: bool, counted: int
) -> None:
    store = RenameExcludesInserts()
    store.journal_stragglers = stragglers
    publish(store, "e1", at(0, 1))
    clock = Clock()
    ev = evaluator(store, monotonic=clock)
    ev.evaluate(at(0, 45))
    clock.now = journal_reader.STRAGGLER_CHECK - 1
    ev.evaluate(at(0, 55))  # within STRAGGLER_CHECK of the read
    assert store.counts == counted
    clock.now = journal_reader.JOURNAL_DROP_GRACE
    ev.evaluate(at(2, 45))  # the grace: counted (then dropped) on every store
    assert (store.counts, store.journals) == (counted + 1, {})


def test_a_result_lists_the_oldest_published_only_when_a_reported_subscription_has_no_receipt() -> (
    None
):
    # The oldest published events are most of a result's size, and a result is stored again
    # at each fold of its bucket: kept only where a subscription without a receipt needs them.
    store = MemoryStore()
    for i in range(3):
        publish(store, f"a{i}", at(0, i))  # 12:00:00: both configured subscriptions receive
        receive(store, f"a{i}", at(0, i))
        receive(store, f"a{i}", at(0, i), sub=OTHER)
        publish(store, f"b{i}", at(0, 10 + i))  # 12:00:10: only SUB receives, OTHER nothing
        receive(store, f"b{i}", at(0, 10 + i))
    snapshot = evaluator(store).evaluate(at(0, 55))
    both, one = (snapshot.buckets[(TOPIC, at(0, s))] for s in (0, 10))
    assert (both.oldest, len(one.oldest)) == ((), 3)
    assert [e.event_id for e in list_missed(snapshot, store, TOPIC, OTHER, WINDOW, 10) or []] == [
        "b0", "b1", "b2"]  # fmt: skip
    assert counts(snapshot, OTHER) == (6, 3, 0, 0)


def test_a_digest_result_without_reported_subscriptions_lists_the_oldest() -> None:
    digest = journal_module.BucketDigest(TOPIC, at(0, 0))
    digest.merge(JournalEntry(TOPIC, "e1", MS, None, "t" * 32), 1)
    digest.merge(JournalEntry(TOPIC, "e1", MS, SUB, "", 1), 1)
    assert len(digest.result().oldest) == 1  # nothing said: any subscription may need it
    assert digest.result(None, {SUB}).oldest == ()
    assert len(digest.result(None, {SUB, OTHER}).oldest) == 1


class CountsResultWrites(MemoryStore):
    """MemoryStore counting the result versions it is asked to store, per bucket."""

    def __init__(self) -> None:
        super().__init__()
        self.result_writes: dict[str, int] = {}

    def save_bucket_results(
        self, results: Iterable[BucketResult], now: datetime, version: int, epoch: int = 0
    ) -> None:
        results = list(results)
        super().save_bucket_results(results, now, version, epoch)
        for r in results:
            self.result_writes[r.key] = self.result_writes.get(r.key, 0) + 1


def test_a_pass_over_many_small_writer_batches_stores_each_bucket_once() -> None:
    # make run: about 350 writer batches of one or two entries a pass; folded 50 documents a
    # round, each of its buckets got a result version (and a digest delta) per round: 9 a
    # bucket, most of the store's growth.
    store = CountsResultWrites()
    for i in range(300):
        publish(store, f"e{i}", at(0, 1 + i / 100), written=at(0, 4))
    evaluator(store).evaluate(at(0, 45))
    assert store.result_writes == {f"{TOPIC}|{epoch_ms(at(0, 0))}": 1}
    assert len(store.digests) == 1  # one delta


class CountsJournalCounts(MemoryStore):
    """MemoryStore counting how often a journal collection is counted."""

    def __init__(self) -> None:
        super().__init__()
        self.counted = 0

    def count_journal(self, name: str) -> int:
        self.counted += 1
        return super().count_journal(name)


def test_a_restarted_exporter_does_not_count_the_folded_journal_it_finds_at_its_first_pass() -> (
    None
):
    # The first pass of a new process found the collections an earlier one had folded and
    # counted each at once (FerretDB reads a collection whole to count it): 12 s instead of
    # 0.2 s for the first evaluation after a restart with 1,000,000 events stored.
    store = CountsJournalCounts()
    _traffic(store)
    clock = Clock()
    evaluator(store, monotonic=clock).evaluate(at(0, 45))
    folded = len(store.journals)
    assert folded > 0
    restarted = evaluator(store, monotonic=clock)
    store.counted = 0
    restarted.evaluate(at(0, 46))
    assert store.counted == 0
    clock.now = journal_reader.STRAGGLER_CHECK
    restarted.evaluate(at(0, 56))
    assert store.counted == folded  # from the next pass on, as any folded collection


def test_a_subscription_heard_only_later_lists_its_misses_where_no_result_kept_them() -> None:
    # A bucket's result keeps the oldest published events only if a subscription reported
    # then had no receipt in it; one first heard in a later bucket finds none kept in the
    # earlier one: /api/v1/missed reads that bucket's digest, and agrees with the gauge.
    late = "orders-late"  # neither configured nor listed: reported where it has receipts
    store = MemoryStore()
    expected = ExpectedSubscriptions({TOPIC: {SUB}}, set(), None)
    ev = SteadyEvaluator(store, expected, [WINDOW], BUCKET, SETTLE)
    for i in range(3):
        publish(store, f"a{i}", at(0, 1 + i))
        receive(store, f"a{i}", at(0, 1 + i))
    ev.evaluate(at(0, 15))
    assert store.buckets[f"{TOPIC}|{epoch_ms(at(0, 0))}"].oldest == ()
    publish(store, "b0", at(0, 11))
    receive(store, "b0", at(0, 11))
    receive(store, "b0", at(0, 11), sub=late)
    snapshot = ev.evaluate(at(0, 55))
    reads = store.digest_reads
    listed = list_missed(snapshot, store, TOPIC, late, WINDOW, 100)
    assert [e.event_id for e in listed or []] == ["a0", "a1", "a2"]
    assert snapshot.subscriptions[(TOPIC, late)]["1m"].missed == 3
    assert store.digest_reads - reads == 1
