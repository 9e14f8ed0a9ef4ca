"""An in-memory audit store with MongoStore's semantics, for unit tests of pure logic.

It implements `eventaudit.store.AuditStore` (mypy checks that), so unit tests pass it where
the real store goes. Integration tests then prove MongoStore on FerretDB agrees.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from eventaudit.contract import epoch_ms
from eventaudit.exporter.evaluator import Evaluator
from eventaudit.exporter.snapshot import Snapshot
from eventaudit.journal import (
    BucketDigest,
    JournalBatch,
    JournalEntry,
    digest_key,
    journal_documents,
    parse_journal_document,
)
from eventaudit.journal_reader import JournalReader
from eventaudit.partitions import (
    PARTITION_MS,
    bucket_partition,
    folded_journal,
    is_live_journal,
    is_taken_journal,
    journal_collection,
    journal_key,
    journal_key_of,
    partitions_before,
    record_partition,
    taken_journal,
)
from eventaudit.records import BucketResult, Lease, PublishRecord, Receipt, Tenure
from eventaudit.store import (
    AuditStore,
    DuplicatePublishes,
    EvaluatorStore,
    FoundEvent,
    LeaseBoard,
    StoredResult,
    StoreError,
    classify_duplicates,
    dead_letter_entry,
    publish_entries,
    publish_key,
    receipt_key,
)


class MemoryStore:
    """Publish records keyed by (topic, eventID), receipts by (subscription, eventID), a
    journal appended after each batch and digests stored as documents, like MongoStore.

    `fail_next` makes the next N operations raise StoreError (an outage).
    """

    journal_stragglers = True
    """It can play FerretDB's race (`straggle`)."""

    def __init__(self) -> None:
        self.published: dict[str, dict[str, Any]] = {}
        self.received: dict[str, dict[str, Any]] = {}
        self.dead_letters: dict[str, dict[str, Any]] = {}
        self.buckets: dict[str, BucketResult] = {}
        self.journals: dict[str, dict[Any, dict[str, Any]]] = {}  # collection -> _id -> doc
        self._taken = 0
        self.versions: dict[str, tuple[int, int]] = {}  # stored result's (epoch, version)
        self.leases: dict[str, Lease] = {}  # the latest document of each key
        self.lease_log: list[Lease] = []  # every lease document written
        self.claims: dict[tuple[str, int], datetime] = {}
        self.replicas: dict[str, tuple[datetime, datetime]] = {}  # (written, alive until)
        self.journal_written: list[dict[str, Any]] = []  # every journal document ever appended
        self.digests: dict[str, dict[str, Any]] = {}  # digest deltas by _id
        self.digest_reads = 0
        self.fold_stamp = 0
        self.tenures: dict[tuple[str, str], Tenure] = {}
        self.tenure_epochs: dict[tuple[str, str], int] = {}
        self.fail_next = 0
        self.straggle = False
        """Journal appends look their collection up now and land on `land_journal()`: an
        insert racing the exporter's rename, as on FerretDB, lands in the taken collection."""
        self.in_flight: list[tuple[dict[Any, dict[str, Any]], list[dict[str, Any]]]] = []
        self._lock = threading.Lock()

    def _check(self) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise StoreError("memory store: injected failure")

    # -- writers -----------------------------------------------------------------------------

    def insert_publish_records(
        self, records: Sequence[PublishRecord], now: datetime
    ) -> DuplicatePublishes:
        with self._lock:
            self._check()
            duplicates = []
            for r in records:
                # Keyed within the hour, like MongoStore's hourly collections.
                hour = record_partition("PublishRecord", r.publish_time, now)
                key = f"{hour}|{publish_key(r.topic, r.event_id)}"
                stored = self.published.get(key)
                if stored is None:
                    self.published[key] = r.to_document(now)
                else:
                    duplicates.append((stored, r))
            refused = classify_duplicates(duplicates)
            self._append_journal(publish_entries(records, refused), now)
            return refused

    def record_receipts(self, receipts: Sequence[Receipt], now: datetime) -> None:
        with self._lock:
            self._check()
            entries: dict[str, JournalEntry] = {}
            for r in receipts:
                if r.dead_letter:
                    hour = record_partition(
                        "DeadLetterRecord", r.publish_time, r.broker_publish_time
                    )
                    key = f"{hour}|{receipt_key(r.subscription, r.event_id)}"
                    self.dead_letters.setdefault(
                        key,
                        {
                            **r.fields(),
                            "deliveryAttempts": r.delivery_attempt,
                            "deadLetterSubscription": r.dead_letter_subscription,
                            "receiveTime": r.receive_time,
                        },
                    )
                    entries["dead|" + key] = dead_letter_entry(r)
                    continue
                hour = record_partition("ReceivedRecord", r.publish_time, r.broker_publish_time)
                key = f"{hour}|{receipt_key(r.subscription, r.event_id)}"
                doc = self.received.get(key)
                if doc is None:
                    doc = self.received[key] = {
                        **r.fields(),
                        "receiveTime": r.receive_time,
                        "lastReceiveTime": r.receive_time,
                        "deliveries": 1,
                        "deliveryAttempt": r.delivery_attempt,
                        "createdTime": now,
                    }
                else:
                    doc["deliveries"] += 1
                    doc["lastReceiveTime"] = max(doc["lastReceiveTime"], r.receive_time)
                    if r.delivery_attempt is not None:
                        doc["deliveryAttempt"] = max(
                            doc["deliveryAttempt"] or 0, r.delivery_attempt
                        )
                entries[key] = JournalEntry(
                    doc["topic"],
                    doc["eventID"],
                    epoch_ms(doc["publishTime"]),
                    doc["subscription"],
                    "",
                    doc["deliveries"],
                )
            self._append_journal(list(entries.values()), now)

    def receipt(self, subscription: str, event_id: str) -> dict[str, Any]:
        """The receipt of (subscription, eventID), whatever its hour (KeyError if none)."""
        key = receipt_key(subscription, event_id)
        return next(d for k, d in self.received.items() if k.split("|", 1)[1] == key)

    def publish_keys(self) -> list[str]:
        """The `_id`s of the publish records, without their hour."""
        return [k.split("|", 1)[1] for k in self.published]

    def publish_record(self, topic: str, event_id: str) -> dict[str, Any]:
        """The publish record of (topic, eventID), whatever its hour."""
        key = publish_key(topic, event_id)
        return next(d for k, d in self.published.items() if k.split("|", 1)[1] == key)

    def append_journal(self, entries: Sequence[JournalEntry], now: datetime) -> None:
        with self._lock:
            self._check()
            self._append_journal(entries, now)

    def _append_journal(self, entries: Sequence[JournalEntry], now: datetime) -> None:
        by_key: dict[str, list[JournalEntry]] = {}
        for entry in entries:
            by_key.setdefault(journal_key(entry.topic), []).append(entry)
        for key, keyed in sorted(by_key.items()):
            collection = self.journals.setdefault(journal_collection(now, key), {})
            docs = journal_documents(f"j{len(self.journal_written)}", keyed, now)
            self.journal_written.extend(docs)
            if self.straggle:
                self.in_flight.append((collection, docs))
                continue
            for doc in docs:
                collection[doc["_id"]] = doc

    def land_journal(self) -> None:
        """Commit the journal appends in flight, into the collections they looked up (taken
        since, maybe)."""
        with self._lock:
            for collection, docs in self.in_flight:
                for doc in docs:
                    collection[doc["_id"]] = doc
            self.in_flight = []

    def inject_journal(
        self, doc: dict[str, Any], name: str | None = None, topic: str = "orders"
    ) -> None:
        """A journal document from elsewhere (hostile, or a straggling insert into a taken
        collection): into `name`, by default the live journal of `topic`'s key."""
        if name is None:
            name = journal_collection(datetime.fromtimestamp(0, UTC), journal_key(topic))
        with self._lock:
            self.journals.setdefault(name, {})[doc["_id"]] = doc

    # -- exporter ----------------------------------------------------------------------------

    def journal_reader(self, monotonic: Callable[[], float]) -> JournalReader:
        return JournalReader(self, monotonic)

    def take_journal(self, now: datetime, keys: Collection[str] | None = None) -> list[str]:
        def wanted(name: str) -> bool:
            key = journal_key_of(name)
            return key is not None and (keys is None or key in keys)

        with self._lock:
            self._check()
            for name in [n for n in self.journals if wanted(n) and is_live_journal(n)]:
                self._taken += 1
                key = journal_key_of(name)
                assert key is not None
                target = taken_journal(now, f"{self._taken:08x}", key)
                self.journals[target] = self.journals.pop(name)
            return sorted(n for n in self.journals if is_taken_journal(n) and wanted(n))

    def journal_keys(self) -> set[str]:
        with self._lock:
            self._check()
            return {k for n in self.journals if (k := journal_key_of(n)) is not None}

    def read_journal(self, name: str) -> Iterator[JournalBatch]:
        with self._lock:
            self._check()
            docs = copy.deepcopy(list(self.journals.get(name, {}).values()))
        for doc in docs:
            yield parse_journal_document(doc)

    def count_journal(self, name: str) -> int:
        with self._lock:
            self._check()
            return len(self.journals.get(name, {}))

    def mark_folded(self, name: str, documents: int) -> str:
        with self._lock:
            self._check()
            folded = folded_journal(name, documents)
            self.journals[folded] = self.journals.pop(name, {})
            return folded

    def drop_journal(self, name: str) -> None:
        with self._lock:
            self._check()
            self.journals.pop(name, None)

    def load_digest(self, topic: str, start: datetime) -> BucketDigest:
        with self._lock:
            self._check()
            self.digest_reads += 1
            key = digest_key(topic, start)
            docs = [copy.deepcopy(d) for d in self.digests.values() if d["digest"] == key]
        return BucketDigest.from_documents(topic, start, docs)

    def save_digests(self, digests: Iterable[BucketDigest], fold: str) -> None:
        digests = list(digests)
        for digest in digests:
            for doc in digest.deltas(fold):
                self.save_digest_document(doc)
        for digest in digests:
            digest.stored()

    def save_digest_document(self, doc: dict[str, Any]) -> None:
        """One document at a time, like MongoStore (a failure can fall between two)."""
        with self._lock:
            self._check()
            if doc["_id"] in self.digests:
                raise StoreError(f"memory store: duplicate digest delta {doc['_id']}")
            self.digests[doc["_id"]] = doc

    def save_bucket_results(
        self, results: Iterable[BucketResult], now: datetime, version: int, epoch: int = 0
    ) -> None:
        with self._lock:
            self._check()
            for r in results:
                if (epoch, version) > self.versions.get(r.key, (-1, -1)):
                    self.buckets[r.key], self.versions[r.key] = r, (epoch, version)

    def load_bucket_results(self, since: datetime) -> list[BucketResult]:
        return [stored.result for stored in self.load_results(since)]

    def load_results(
        self,
        since: datetime,
        topics: Collection[str] | None = None,
        partitions: Collection[int] | None = None,
    ) -> list[StoredResult]:
        with self._lock:
            self._check()
            return [
                StoredResult(self.versions.get(r.key, (0, -1)), r)
                for r in self.buckets.values()
                if r.start >= since
                and (topics is None or r.topic in topics)
                and (
                    partitions is None
                    or (epoch_ms(r.start) // PARTITION_MS) * PARTITION_MS in partitions
                )
            ]

    def load_leases(self, since: datetime, until: datetime) -> LeaseBoard:
        """Every lease entry written in the time, with what it told (those a test put in
        `leases` too), and the replicas' latest heartbeats of that time."""
        with self._lock:
            self._check()
            every = {id(x): x for x in [*self.lease_log, *self.leases.values()]}
            leases = [
                replace(lease, told=len(lease.recent) or lease.told)
                for lease in every.values()
                if since - timedelta(minutes=1) <= (lease.renewed or lease.expires) <= until
            ]
            alive = {
                replica: until_
                for replica, (written, until_) in self.replicas.items()
                if since - timedelta(minutes=1) <= written <= until
            }
            return LeaseBoard(leases, alive)

    def save_leases(
        self,
        replica: str,
        now: datetime,
        leases: Sequence[Lease],
        alive_until: datetime | None = None,
        forget_before: datetime | None = None,
    ) -> None:
        with self._lock:
            self._check()
            if forget_before is not None:
                self.lease_log = [
                    x for x in self.lease_log if (x.renewed or x.expires) >= forget_before
                ]
                for k in [
                    k for k, v in self.leases.items() if (v.renewed or v.expires) < forget_before
                ]:
                    del self.leases[k]
            for lease in leases:
                self.lease_log.append(lease)
                stored = self.leases.get(lease.key)
                if stored is None or lease.order > stored.order:
                    self.leases[lease.key] = lease
            if alive_until is not None and (
                replica not in self.replicas or self.replicas[replica][0] <= now
            ):
                self.replicas[replica] = (now, alive_until)

    def claim_epoch(self, key: str, epoch: int, owner: str, now: datetime) -> datetime | None:
        with self._lock:
            self._check()
            if (key, epoch) in self.claims:
                return self.claims[(key, epoch)]
            self.claims[(key, epoch)] = now
            return None

    def claimed_epochs(self, pairs: Sequence[tuple[str, int]]) -> dict[tuple[str, int], datetime]:
        with self._lock:
            self._check()
            return {p: self.claims[p] for p in pairs if p in self.claims}

    def find_event(
        self,
        event_id: str,
        subscriptions: Mapping[str, Collection[str]],
        hours: Sequence[datetime],
    ) -> list[FoundEvent]:
        with self._lock:
            self._check()
            found: list[FoundEvent] = []
            for hour in hours:
                name = record_partition("PublishRecord", hour, hour)
                for topic in sorted(subscriptions):
                    key = publish_key(topic, event_id)
                    if f"{name}|{key}" not in self.published:
                        continue
                    doc = {"_id": key, **self.published[f"{name}|{key}"]}
                    at = doc["publishTime"]
                    out: tuple[list[dict[str, Any]], list[dict[str, Any]]] = ([], [])
                    for prefix, table, into in (
                        ("ReceivedRecord", self.received, out[0]),
                        ("DeadLetterRecord", self.dead_letters, out[1]),
                    ):
                        part = record_partition(prefix, at, at)
                        for sub in sorted(subscriptions[topic]):
                            got = table.get(f"{part}|{receipt_key(sub, event_id)}")
                            if got is not None:
                                into.append({"_id": receipt_key(sub, event_id), **got})
                    found.append(FoundEvent(doc, *out))
            return found

    def load_tenures(self) -> list[Tenure]:
        with self._lock:
            self._check()
            return list(self.tenures.values())

    def save_tenures(self, tenures: Sequence[Tenure], epoch: int = 0) -> list[Tenure]:
        with self._lock:
            self._check()
            refused = []
            for t in tenures:
                key = (t.topic, t.subscription)
                if self.tenure_epochs.get(key, 0) > epoch:
                    refused.append(t)
                    continue
                self.tenures[key], self.tenure_epochs[key] = t, epoch
            return refused

    def load_fold_stamp(self) -> int:
        with self._lock:
            self._check()
            return self.fold_stamp

    def save_fold_stamp(self, stamp: int) -> None:
        with self._lock:
            self._check()
            self.fold_stamp = max(self.fold_stamp, stamp)

    def _prune_buckets(self, before: datetime) -> dict[str, int]:
        """Drops whole partitions, like MongoStore: counts collections, not documents."""
        with self._lock:
            self._check()
            dropped = {}
            for prefix, stored, start_of in (
                ("BucketDigest", self.digests, lambda d: d["bucketStart"]),
                ("BucketResult", self.buckets, lambda r: r.start),
            ):
                names = {bucket_partition(prefix, start_of(v)) for v in stored.values()}
                old = set(partitions_before(names, prefix, before))
                for key in [
                    k for k, v in stored.items() if bucket_partition(prefix, start_of(v)) in old
                ]:
                    del stored[key]
                dropped[prefix] = len(old)
            return dropped

    def delete_older_than(self, cutoff: datetime) -> dict[str, int]:
        """Drops whole hours of records, like MongoStore; counts the hours."""
        with self._lock:
            self._check()
            counts = {}
            tables = (
                ("PublishRecord", self.published),
                ("ReceivedRecord", self.received),
                ("DeadLetterRecord", self.dead_letters),
            )
            for name, table in tables:
                hours = {k: k.split("|", 1)[0] for k in table}
                old = set(partitions_before(set(hours.values()), name, cutoff))
                gone = [k for k, hour in hours.items() if hour in old]
                for k in gone:
                    del table[k]
                counts[name] = len(old)  # hours dropped, like MongoStore
        counts.update(self._prune_buckets(cutoff))
        return counts

    def ping(self) -> None:
        """Nothing to index in memory."""

    def close(self) -> None:
        """Nothing to release."""


def _implements_protocol(store: MemoryStore) -> AuditStore:
    # mypy checks here, once, that MemoryStore has every method of the real store's interface.
    return store


class CountsResultReads:
    """Mixed into a store (MemoryStore or MongoStore): counts reads of stored results, of
    every result in the window (`whole_reads`) and of named partitions (`partition_reads`)."""

    whole_reads = 0
    partition_reads = 0

    def load_results(
        self,
        since: datetime,
        topics: Collection[str] | None = None,
        partitions: Collection[int] | None = None,
    ) -> list[StoredResult]:
        if partitions is None:
            self.whole_reads += 1
        else:
            self.partition_reads += 1
        # Mixed in before a store class: super() is that store.
        return cast(EvaluatorStore, super()).load_results(since, topics, partitions)


class SteadyEvaluator(Evaluator):
    """An evaluator whose monotonic clock follows the wall clock each `evaluate` is given, as
    in a process whose clock never steps: for unit tests that drive virtual wall time (an
    Evaluator on the real monotonic clock would take each virtual jump for a clock step)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._virtual = 0.0
        kwargs.setdefault("monotonic", lambda: self._virtual)
        super().__init__(*args, **kwargs)

    def evaluate(self, now: datetime) -> Snapshot:
        self._virtual = now.timestamp()
        return super().evaluate(now)
