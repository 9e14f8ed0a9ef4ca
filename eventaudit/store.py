"""The MongoDB audit store: indexes, batched writes and the exporter's bounded queries.

Only the subset of MongoDB that FerretDB 1.24 also serves is used: plain finds with
projections, unordered bulk writes, unique and compound indexes. No `$lookup`, no
accumulators beyond counting (sets are compared in Python, one bucket range at a time).
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from collections.abc import Collection as Collection_
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal, NamedTuple, Protocol, TypeGuard, cast

import bson
from bson.codec_options import CodecOptions
from bson.errors import InvalidBSON, InvalidDocument
from bson.raw_bson import RawBSONDocument
from pymongo import ASCENDING, MongoClient, ReturnDocument, UpdateOne
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import (
    AutoReconnect,
    BulkWriteError,
    DocumentTooLarge,
    DuplicateKeyError,
    OperationFailure,
    PyMongoError,
)

from eventaudit.contract import epoch_ms
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
    RECORD_PREFIXES,
    bucket_partition,
    folded_journal,
    is_live_journal,
    is_taken_journal,
    journal_collection,
    journal_key,
    journal_key_of,
    lease_slot,
    lease_slots,
    partitions_before,
    partitions_of,
    partitions_since,
    record_partition,
    taken_journal,
)
from eventaudit.records import (
    BUCKET_COLLECTION,
    DEAD_LETTER_COLLECTION,
    DIGEST_COLLECTION,
    JOURNAL_COLLECTION,
    LEASE_COLLECTION,
    PUBLISH_COLLECTION,
    RECEIVED_COLLECTION,
    STATE_COLLECTION,
    BucketResult,
    Lease,
    PublishRecord,
    Receipt,
    Tenure,
)

log = logging.getLogger(__name__)

_DUPLICATE_KEY = 11000
_NAMESPACE_NOT_FOUND = 26
_RAW: CodecOptions[RawBSONDocument] = CodecOptions(document_class=RawBSONDocument)
_LONG_AGO = datetime(1970, 1, 1, tzinfo=UTC)
NEWS_BYTES = 4 * 2**20
"""Bytes of told results per news document (BSON holds 16 MiB)."""
MAX_LEASES_PER_DOCUMENT = 1000
"""Leases one lease document holds (a replica holding more writes more documents)."""


class StoredResult(NamedTuple):
    """A bucket result as stored, with the (lease epoch, version) that orders its versions."""

    order: tuple[int, int]
    result: BucketResult


@dataclass(frozen=True)
class LeaseBoard:
    """What the replicas wrote to the lease slots of a time span."""

    leases: list[Lease]
    """every lease entry, in no order, each with the results it told (`recent`)"""
    alive: dict[str, datetime]
    """each replica's latest heartbeat: until when it said it is alive"""


@dataclass(frozen=True)
class FoundEvent:
    """One publish record of an event, with its receipts and dead letters (documents)."""

    published: dict[str, Any]
    receipts: list[dict[str, Any]]
    dead: list[dict[str, Any]]


class StoreError(RuntimeError):
    """The audit store could not complete an operation; the caller keeps its data and retries."""


class PublishRecordStore(Protocol):
    """What the publisher's record buffer writes to."""

    def insert_publish_records(
        self, records: Sequence[PublishRecord], now: datetime
    ) -> DuplicatePublishes:
        """Write a batch of publish records, one per (topic, eventID); return those not written
        because their key holds another publish, classified (see `duplicate_kind`). StoreError
        when the batch must be retried."""
        ...


class ReceiptStore(Protocol):
    """What the subscriber writes to."""

    def record_receipts(self, receipts: Sequence[Receipt], now: datetime) -> None:
        """Write a batch of deliveries (first ones and redeliveries); StoreError on failure."""
        ...


class EvaluatorStore(Protocol):
    """What the exporter's evaluator reads and keeps its results in."""

    def journal_reader(self, monotonic: Callable[[], float]) -> JournalReader:
        """What is new in the journal, for one process (its monotonic clock times the
        journal's housekeeping): take it, read it, say it is folded."""
        ...

    def append_journal(self, entries: Sequence[JournalEntry], now: datetime) -> None:
        """Journal these entries, each under its topic's journal key."""
        ...

    def load_digest(self, topic: str, start: datetime) -> BucketDigest:
        """The stored digest of one bucket (empty when none is)."""
        ...

    def save_digests(self, digests: Iterable[BucketDigest], fold: str) -> None:
        """Store what each digest gained since it was stored (deltas named by `fold`, unique
        per call), then mark the digests stored."""
        ...

    def save_bucket_results(
        self, results: Iterable[BucketResult], now: datetime, version: int, epoch: int = 0
    ) -> None:
        """Store a new version of each bucket's result; the highest (epoch, version) stands."""
        ...

    def load_fold_stamp(self) -> int:
        """The highest fold stamp any evaluation may have stored in a digest (0 if none)."""
        ...

    def save_fold_stamp(self, stamp: int) -> None:
        """Remember `stamp` before digests carrying it are stored."""
        ...

    def load_tenures(self) -> list[Tenure]:
        """Every stored subscription tenure."""
        ...

    def save_tenures(self, tenures: Sequence[Tenure], epoch: int = 0) -> list[Tenure]:
        """Store these tenures (each replaces the one of its topic and subscription) unless
        one was stored under a later lease `epoch`; return those refused so."""
        ...

    def load_results(
        self,
        since: datetime,
        topics: Collection_[str] | None = None,
        partitions: Collection_[int] | None = None,
    ) -> list[StoredResult]:
        """The latest stored version of each bucket evaluation with bucketStart >= since, of
        `topics` (None: all), in the result partitions starting at `partitions` (ms; None:
        every one the window reaches), with its (epoch, version)."""
        ...

    def load_leases(self, since: datetime, until: datetime) -> LeaseBoard:
        """What the replicas wrote in [since, until] (give or take a slot): every lease entry,
        in no order, each with the results it told (`recent`), and each replica's latest
        heartbeat."""
        ...

    def save_leases(
        self,
        replica: str,
        now: datetime,
        leases: Sequence[Lease],
        alive_until: datetime | None = None,
        forget_before: datetime | None = None,
    ) -> None:
        """Store one write of `replica` at `now`: these leases (each with the results it
        tells), and when `alive_until` is given the replica's heartbeat (alive until then;
        `now` or earlier: it stopped). With `forget_before`, writes before it are never read
        again (their room may be reclaimed)."""
        ...

    def claim_epoch(self, key: str, epoch: int, owner: str, now: datetime) -> datetime | None:
        """Claim `epoch` of `key`'s lease: None when this call claimed it, else when it was
        claimed (exactly one claim of an epoch succeeds, on every server)."""
        ...

    def claimed_epochs(self, pairs: Sequence[tuple[str, int]]) -> dict[tuple[str, int], datetime]:
        """Which of these (key, epoch) were claimed, and when (one query; one lookup by `_id`
        for a single pair)."""
        ...


class ExporterStore(EvaluatorStore, Protocol):
    """Everything the exporter process uses: the evaluator's reads, the API, retention."""

    def find_event(
        self,
        event_id: str,
        subscriptions: Mapping[str, Collection_[str]],
        hours: Sequence[datetime],
    ) -> list[FoundEvent]:
        """The publish records of `event_id` published in any of `hours` (their starts) on a
        topic of `subscriptions`, each with its receipts and dead letters on that topic's
        subscriptions."""
        ...

    def delete_older_than(self, cutoff: datetime) -> dict[str, int]:
        """Retention: delete records published before `cutoff`, records written before
        `cutoff - PUBLISH_TIME_TOLERANCE` (whatever their publishTime), and digests and bucket
        results before `cutoff`; counts per collection. Nothing published at or after `cutoff`
        is deleted unless its publishTime is further ahead of its write than the tolerance."""
        ...


class AuditStore(PublishRecordStore, ReceiptStore, ExporterStore, Protocol):
    """The whole audit store interface; MongoStore and the tests' MemoryStore implement it."""


def receipt_key(subscription: str, event_id: str) -> str:
    """`_id` of a receipt; neither subscription ids nor valid eventIDs contain '|'."""
    return f"{subscription}|{event_id}"


def publish_key(topic: str, event_id: str) -> str:
    """`_id` of a publish record: one per (topic, eventID), so an event fanned out to several
    topics has a record on each; neither topic ids nor valid eventIDs contain '|'."""
    return f"{topic}|{event_id}"


DuplicateKind = Literal["same", "retried", "conflict"]
# What `insert_publish_records` reads back of a stored record whose key a batch hit.
_DUPLICATE_FIELDS = {"messageId": 1, "payload": 1, "payloadTruncated": 1, "publishTime": 1}


@dataclass(frozen=True, slots=True)
class DuplicatePublishes:
    """Records of a batch not written because their (topic, eventID) holds another publish;
    the stored record stands in both cases."""

    retried: tuple[PublishRecord, ...] = ()
    """The same event published again as another message (a caller retrying after a timeout)."""
    conflicts: tuple[PublishRecord, ...] = ()
    """A different event under a key already used (a reused eventID)."""
    stored_ms: tuple[tuple[PublishRecord, int], ...] = ()
    """Of those, the ones whose stored record has another publish time (epoch ms): its
    deliveries count for the stored record's event (`publish_entries` journals an alias)."""


def duplicate_kind(stored: dict[str, Any] | None, record: PublishRecord) -> DuplicateKind:
    """How `record` relates to the document stored under its key.

    `same`: this very publish (a batch retried after its write landed; it counts written):
    same Pub/Sub message, payload and publishTime (compared in BSON's milliseconds).
    `retried`: the same payload as another message, the caller publishing the same event
    again (after a 504 or a 502 its first publish may well have gone through). The trace id
    is not compared: a caller that sends no trace header gets a fresh trace per request.
    `conflict`: a different payload, or nothing stored any more.
    """
    if stored is None:
        return "conflict"
    same_payload = stored.get("payload") == record.payload and bool(
        stored.get("payloadTruncated", False)
    ) == bool(record.payload_truncated)
    if not same_payload:
        return "conflict"
    if (
        stored.get("messageId") == record.message_id
        and isinstance(stored.get("publishTime"), datetime)
        and epoch_ms(stored["publishTime"]) == epoch_ms(record.publish_time)
    ):
        return "same"
    return "retried"


def classify_duplicates(
    pairs: Iterable[tuple[dict[str, Any] | None, PublishRecord]],
) -> DuplicatePublishes:
    """Sort records whose key was taken, each with the stored document, by `duplicate_kind`."""
    kinds: dict[DuplicateKind, list[PublishRecord]] = {"same": [], "retried": [], "conflict": []}
    moved: list[tuple[PublishRecord, int]] = []
    for stored, record in pairs:
        kind = duplicate_kind(stored, record)
        kinds[kind].append(record)
        at = stored.get("publishTime") if stored is not None else None
        if (
            kind != "same"
            and isinstance(at, datetime)
            and epoch_ms(at) != epoch_ms(record.publish_time)
        ):
            moved.append((record, epoch_ms(at)))
    return DuplicatePublishes(tuple(kinds["retried"]), tuple(kinds["conflict"]), tuple(moved))


def publish_entries(
    records: Sequence[PublishRecord], refused: DuplicatePublishes
) -> list[JournalEntry]:
    """Journal entries of a publish batch: every record but those refused (their key holds
    another publish, journaled when that one was written), and an alias for each refused one
    published at another time than the stored one (its deliveries carry its own publish time;
    they count for the stored record's event)."""
    skip = {id(r) for r in (*refused.retried, *refused.conflicts)}
    entries = [
        JournalEntry(
            r.topic, r.event_id, epoch_ms(r.publish_time), None, r.trace_id, 0, r.attributes
        )
        for r in records
        if id(r) not in skip
    ]
    entries += [
        JournalEntry(r.topic, r.event_id, epoch_ms(r.publish_time), alias_of=ms)
        for r, ms in refused.stored_ms
    ]
    return entries


def dead_letter_entry(letter: Receipt) -> JournalEntry:
    """The journal entry of a dead letter (attempts 1 when Pub/Sub did not say)."""
    return JournalEntry(
        letter.topic,
        letter.event_id,
        epoch_ms(letter.publish_time),
        letter.subscription,
        "",
        max(1, letter.delivery_attempt or 1),
        "",
        True,
    )


def _insert_new(
    collection: Collection[dict[str, Any]], docs: list[dict[str, Any]], what: str
) -> list[int]:
    """Insert `docs` unordered; the indexes of those whose `_id` was already taken. Any other
    failure is a StoreError naming `what`."""
    try:
        collection.insert_many(docs, ordered=False)
    except BulkWriteError as exc:
        errors = exc.details.get("writeErrors", [])
        if any(e.get("code") != _DUPLICATE_KEY for e in errors) or exc.details.get(
            "writeConcernErrors"
        ):
            raise StoreError(f"{what} not written: {errors[:3]}") from exc
        return [e["index"] for e in errors]
    except PyMongoError as exc:
        raise StoreError(f"{what} not written: {exc}") from exc
    return []


def _aware(value: Any) -> TypeGuard[datetime]:
    """Whether `value` is a stored time (a datetime with a zone)."""
    return isinstance(value, datetime) and value.tzinfo is not None


def _read_news(items: Any, into: dict[tuple[str, int], list[Any]]) -> None:
    """The (key, seq) -> results of a news document's items of a readable shape."""
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        key, seq, recent = item.get("key"), item.get("seq"), item.get("recent")
        if isinstance(key, str) and isinstance(seq, int) and isinstance(recent, list):
            into[(key, seq)] = recent


def result_document(r: BucketResult, now: datetime, version: int, epoch: int) -> dict[str, Any]:
    """A bucket result as stored: one version of it, by the holder of lease `epoch`."""
    doc = r.to_document(now)
    doc.update({"_id": f"{r.key}|{epoch}.{version}", "key": r.key, "version": version})
    if epoch:
        doc["epoch"] = epoch
    return doc


def parse_result(doc: dict[str, Any]) -> StoredResult | None:
    """A stored result document (from a partition, or carried by a lease) with its (epoch,
    version); None (logged) for one that is not. Results stored without leases have epoch 0."""
    version = doc.get("version")
    epoch = doc.get("epoch", 0)
    # bson reads integers past 32 bits back as Int64, a subclass of int.
    if not (
        isinstance(version, int)
        and isinstance(epoch, int)
        and not isinstance(version, bool)
        and not isinstance(epoch, bool)
    ):
        log.error("bucket result %r without a version skipped", doc.get("_id"))
        return None
    try:
        result = BucketResult.from_document(doc)
        if not isinstance(result.topic, str) or not isinstance(result.start, datetime):
            raise TypeError("topic or bucketStart of the wrong type")
        if not 0 <= result.published < 2**31:
            raise ValueError(f"published {result.published}")
        for name, c in result.subscriptions.items():
            if not isinstance(name, str):
                raise TypeError(f"subscription name {name!r}")
            expected = result.published if c.expected is None else c.expected
            if not (
                0 <= expected <= result.published
                and 0 <= c.received <= expected
                and 0 <= c.duplicates < 2**31
                and 0 <= c.unmatched < 2**31
                and 0 <= c.filtered <= result.published - c.received
                and 0 <= c.dead_lettered <= expected - c.received
            ):
                raise ValueError(f"impossible counts for {name}: {c}")
    except (KeyError, TypeError, ValueError, OverflowError, AttributeError) as exc:
        log.error("bucket result %r unreadable, skipped: %s", doc.get("_id"), exc)
        return None
    return StoredResult((int(epoch), int(version)), result)


# FerretDB 1.24 (SQLite) never answers an update command of 100 or more operations, and stays
# hung for every client after it: bulk updates go in chunks well below that.
_UPDATES_PER_COMMAND = 50


def _bulk_write_in_chunks(collection: Collection[dict[str, Any]], ops: Sequence[UpdateOne]) -> int:
    """Unordered bulk updates, `_UPDATES_PER_COMMAND` per command; documents matched or
    upserted. Raises what pymongo raises."""
    done = 0
    for i in range(0, len(ops), _UPDATES_PER_COMMAND):
        result = collection.bulk_write(list(ops[i : i + _UPDATES_PER_COMMAND]), ordered=False)
        done += result.matched_count + result.upserted_count
    return done


class RecordPartitions:
    """Every hourly collection of one kind of record, read as one: for tools and tests.
    Writers, lookups and retention address the partitions themselves."""

    def __init__(self, db: Database[dict[str, Any]], prefix: str) -> None:
        self._db = db
        self.prefix = prefix

    def names(self) -> list[str]:
        """The collections, newest hour first."""
        return list(reversed(partitions_of(self._db.list_collection_names(), self.prefix)))

    def find(
        self, filter: Mapping[str, Any] | None = None, projection: Any = None
    ) -> Iterator[dict[str, Any]]:
        """Matching documents of every collection."""
        for name in self.names():
            yield from self._db[name].find(filter or {}, projection)

    def find_one(
        self, filter: Mapping[str, Any] | None = None, projection: Any = None
    ) -> dict[str, Any] | None:
        """The first matching document, newest hour first."""
        return next(self.find(filter, projection), None)

    def count_documents(self, filter: Mapping[str, Any]) -> int:
        """Matching documents of every collection."""
        return sum(self._db[name].count_documents(filter) for name in self.names())

    def estimated_document_count(self) -> int:
        """Documents of every collection, estimated."""
        return sum(self._db[name].estimated_document_count() for name in self.names())


class MongoStore:
    """Reads and writes the audit collections of one database."""

    def __init__(self, uri: str, database: str, timeout_seconds: float = 5.0) -> None:
        timeout_ms = int(timeout_seconds * 1000)
        self._client: MongoClient[dict[str, Any]] = MongoClient(
            uri,
            serverSelectionTimeoutMS=timeout_ms,
            connectTimeoutMS=timeout_ms,
            socketTimeoutMS=timeout_ms * 6,
            appname="eventaudit",
        )
        db = self._client.get_database(
            database, codec_options=CodecOptions(tz_aware=True, tzinfo=UTC)
        )
        self.published = RecordPartitions(db, PUBLISH_COLLECTION)
        self.received = RecordPartitions(db, RECEIVED_COLLECTION)
        self.dead_letters = RecordPartitions(db, DEAD_LETTER_COLLECTION)
        self.state: Collection[dict[str, Any]] = db[STATE_COLLECTION]
        self.database = database
        self.db = db
        """The database: the exporter's collections are named by time (eventaudit.partitions)."""
        self._indexed: set[str] = set()  # digest partitions this process has indexed
        self._stragglers: bool | None = None

    def close(self) -> None:
        """Close the client's connections."""
        self._client.close()

    @property
    def journal_stragglers(self) -> bool:
        """True on FerretDB (its buildInfo says `ferretdbVersion`), whose insert can commit
        into a collection renamed after the insert looked it up; also when the server cannot
        say (the safe answer). Asked once."""
        if self._stragglers is None:
            try:
                info = self._client.admin.command("buildInfo")
                self._stragglers = "ferretdbVersion" in info
            except PyMongoError:
                return True
        return self._stragglers

    def ping(self) -> None:
        """Raise StoreError unless the server answers. Nothing needs an index beyond `_id`:
        records are read by `_id` within their hour, digests by `digest` (indexed per
        partition as it is created)."""
        try:
            self._client.admin.command("ping")
        except PyMongoError as exc:
            raise StoreError(f"the audit store does not answer: {exc}") from exc

    def journal_reader(self, monotonic: Callable[[], float]) -> JournalReader:
        """The journal's take, read and folded, over this store's journal collections."""
        return JournalReader(self, monotonic)

    # -- writers -------------------------------------------------------------------------

    def insert_publish_records(
        self, records: Sequence[PublishRecord], now: datetime
    ) -> DuplicatePublishes:
        """Insert a batch keyed by `_id = "topic|eventID"`; return the duplicates not written.

        A key already stored with the same publish (a batch retried after a write that did
        land) counts as written. A key stored with another message of the same payload (the
        caller published the event again) is returned as retried; with a different payload (a
        caller reusing an eventID on the same topic for another event) as a conflict. Either
        way the stored record is left as it was.
        """
        if not records:
            return DuplicatePublishes()
        by_hour: dict[str, list[PublishRecord]] = {}
        for r in records:
            by_hour.setdefault(
                record_partition(PUBLISH_COLLECTION, r.publish_time, now), []
            ).append(r)
        duplicates: list[tuple[str, PublishRecord]] = []
        for name, batch in by_hour.items():
            docs = [{"_id": publish_key(r.topic, r.event_id), **r.to_document(now)} for r in batch]
            taken = _insert_new(self.db[name], docs, "publish records")
            duplicates += [(name, batch[i]) for i in taken]
        # One read by `_id` per duplicate, in its hour (indexed on MongoDB; a scan of that
        # hour on FerretDB 1.24, whose `_id` filter misses its own index: duplicates are rare).
        try:
            refused = classify_duplicates(
                (
                    self.db[name].find_one(
                        {"_id": publish_key(r.topic, r.event_id)}, _DUPLICATE_FIELDS
                    ),
                    r,
                )
                for name, r in duplicates
            )
        except PyMongoError as exc:
            raise StoreError(f"could not read back duplicate publish records: {exc}") from exc
        self.append_journal(publish_entries(records, refused), now)
        return refused

    def record_receipts(self, receipts: Sequence[Receipt], now: datetime) -> None:
        """Store one receipt per (subscription, eventID), counting every delivery.

        First deliveries, the common case, are one unordered bulk insert keyed by
        `_id = "subscription|eventID"`; only keys that already exist (redeliveries) become
        updates, matched on `_id`. MongoDB is fast at both; FerretDB 1.24 inserts through its
        `_id` index but finds an `_id` by scanning (docs/scaling.md), so a redelivery costs a
        scan of the receipts there. Deliveries of one event within the batch are folded into
        one write first.
        """
        if not receipts:
            return
        dead = [r for r in receipts if r.dead_letter]
        if dead:
            self._record_dead_letters(dead, now)
            receipts = [r for r in receipts if not r.dead_letter]
            if not receipts:
                return
        # Deliveries of one receipt (one key within one hour) are folded into one write first;
        # one eventID published in two hours is two events, two receipts (issue 17, case 5).
        folded: dict[tuple[str, str], tuple[Receipt, int, datetime, datetime]] = {}
        for r in receipts:
            name = record_partition(RECEIVED_COLLECTION, r.publish_time, r.broker_publish_time)
            at = (name, receipt_key(r.subscription, r.event_id))
            if at in folded:
                first, n, lo, hi = folded[at]
                folded[at] = (first, n + 1, min(lo, r.receive_time), max(hi, r.receive_time))
            else:
                folded[at] = (r, 1, r.receive_time, r.receive_time)
        items = [(key, value) for (_, key), value in folded.items()]
        by_hour: dict[str, list[int]] = {}
        for i, (name, _) in enumerate(folded):
            by_hour.setdefault(name, []).append(i)
        docs = [
            {
                "_id": key,
                **r.fields(),
                "brokerPublishTime": r.broker_publish_time,
                "receiveTime": first_seen,
                "lastReceiveTime": last_seen,
                "deliveries": n,
                "deliveryAttempt": r.delivery_attempt,
                "createdTime": now,
            }
            for key, (r, n, first_seen, last_seen) in items
        ]
        existing: list[tuple[str, tuple[str, tuple[Receipt, int, datetime, datetime]]]] = []
        redelivered: set[int] = set()
        for name, indexes in by_hour.items():
            taken = _insert_new(self.db[name], [docs[i] for i in indexes], "receipts")
            existing += [(name, items[indexes[i]]) for i in taken]
            redelivered.update(indexes[i] for i in taken)
        entries = [
            JournalEntry(r.topic, r.event_id, epoch_ms(r.publish_time), r.subscription, "", n)
            for i, (_, (r, n, _, _)) in enumerate(items)
            if i not in redelivered
        ]
        # A redelivery is one update per receipt that returns the stored document (whole:
        # FerretDB 1.24's findAndModify takes no projection), so the
        # journal says how many deliveries are stored (a total, not an increment: folding it
        # twice changes nothing). Redeliveries are the rare path.
        vanished = 0
        try:
            for name, (key, (r, n, _, last_seen)) in existing:
                latest: dict[str, Any] = {"lastReceiveTime": last_seen}
                if r.delivery_attempt is not None:
                    latest["deliveryAttempt"] = r.delivery_attempt
                stored = self.db[name].find_one_and_update(
                    {"_id": key},
                    {"$inc": {"deliveries": n}, "$max": latest},
                    return_document=ReturnDocument.AFTER,
                )
                if stored is None:
                    vanished += 1
                    continue
                entries.append(
                    JournalEntry(
                        stored["topic"],
                        stored["eventID"],
                        epoch_ms(stored["publishTime"]),
                        stored["subscription"],
                        "",
                        int(stored["deliveries"]),
                    )
                )
        except PyMongoError as exc:
            raise StoreError(f"redeliveries not written: {exc}") from exc
        self.append_journal(entries, now)
        if vanished:
            # A receipt deleted between the insert and its update (retention, an operator):
            # acking now would leave a delivered event without a receipt, so fail the batch.
            raise StoreError(f"redeliveries not written: {vanished} receipt(s) vanished")

    def _record_dead_letters(self, letters: Sequence[Receipt], now: datetime) -> None:
        """Store one dead-letter record per (subscription, eventID) it was dead-lettered from,
        in the hour of its publish time; a dead letter received again (a redelivery on the
        dead-letter subscription) keeps the first record. All are journaled (folding them
        again changes nothing)."""
        by_key = {receipt_key(r.subscription, r.event_id): r for r in letters}
        by_hour: dict[str, list[dict[str, Any]]] = {}
        for key, r in by_key.items():
            name = record_partition(DEAD_LETTER_COLLECTION, r.publish_time, r.broker_publish_time)
            by_hour.setdefault(name, []).append(
                {
                    "_id": key,
                    **r.fields(),
                    "deliveryAttempts": r.delivery_attempt,
                    "deadLetterSubscription": r.dead_letter_subscription,
                    "receiveTime": r.receive_time,
                    "createdTime": now,
                }
            )
        for name, docs in by_hour.items():
            _insert_new(self.db[name], docs, "dead letters")
        self.append_journal([dead_letter_entry(r) for r in by_key.values()], now)

    def append_journal(self, entries: Sequence[JournalEntry], now: datetime) -> None:
        """Append what a batch made durable to the journal: one collection per topic journal
        key (eventaudit.partitions), one document per MAX_ENTRIES_PER_DOCUMENT entries, after
        the batch's records (a journal entry always names a stored record). When this fails
        the caller's batch fails and is retried or redelivered: its records are rewritten as
        duplicates, the journal again."""
        by_key: dict[str, list[JournalEntry]] = {}
        for entry in entries:
            by_key.setdefault(journal_key(entry.topic), []).append(entry)
        for key, keyed in sorted(by_key.items()):
            self._journal_into(journal_collection(now, key), keyed, now)

    def _journal_into(self, name: str, entries: Sequence[JournalEntry], now: datetime) -> None:
        docs = journal_documents(uuid.uuid4().hex, entries, now)
        for attempt in (1, 2):
            try:
                self.db[name].insert_many(docs, ordered=False)
                return
            except BulkWriteError as exc:
                errors = exc.details.get("writeErrors", [])
                if errors and all(e.get("code") == _DUPLICATE_KEY for e in errors):
                    return  # the first attempt landed these documents
                raise StoreError(f"journal not written: {errors[:3]}") from exc
            except AutoReconnect as exc:
                # FerretDB 1.24 resets the connection of an insert racing the exporter's rename
                # of the collection; one retry (into a fresh collection) is safe, since folding
                # a journal document twice changes nothing.
                if attempt == 2:
                    raise StoreError(f"journal not written: {exc}") from exc
            except (PyMongoError, InvalidDocument) as exc:
                raise StoreError(f"journal not written: {exc}") from exc

    # -- exporter: journal, digests, results ------------------------------------------------

    def take_journal(self, now: datetime, keys: Collection_[str] | None = None) -> list[str]:
        """Rename every journal collection writers insert into, of the journal `keys` (all:
        None), to a taken one (a writer's next insert creates the name afresh); return every
        taken one of those keys, folded or not, this call's and any earlier one's not yet
        dropped."""

        def wanted(name: str) -> bool:
            key = journal_key_of(name)
            return key is not None and (keys is None or key in keys)

        try:
            names = self._collections(wanted, JOURNAL_COLLECTION)
            taken = [n for n in names if is_taken_journal(n)]
            for name in names:
                if is_taken_journal(name):
                    continue
                key = journal_key_of(name)
                assert key is not None  # wanted
                target = taken_journal(now, uuid.uuid4().hex[:8], key)
                try:
                    self.db[name].rename(target)
                except OperationFailure as exc:
                    if exc.code != _NAMESPACE_NOT_FOUND:  # dropped or taken meanwhile
                        raise
                    continue
                taken.append(target)
            return sorted(taken)
        except PyMongoError as exc:
            raise StoreError(f"could not take the journal: {exc}") from exc

    def journal_keys(self) -> set[str]:
        """The journal keys of every live or taken journal collection (topics written to)."""
        try:
            names = self._collections(prefix=JOURNAL_COLLECTION)
            return {k for n in names if (k := journal_key_of(n)) is not None}
        except PyMongoError as exc:
            raise StoreError(f"could not list the journal: {exc}") from exc

    def read_journal(self, name: str) -> Iterator[JournalBatch]:
        """Every document of a taken journal collection, in no particular order (its whole
        read is what was written since it was taken: new records only). A document bson cannot
        decode (a date out of range, invalid UTF-8) is one malformed batch, never an error
        that would stop every evaluation at this collection."""
        for doc in self._decoded(name, "the journal"):
            yield JournalBatch(None, (), 1) if doc is None else parse_journal_document(doc)

    def _decoded(self, name: str, what: str) -> Iterator[dict[str, Any] | None]:
        """Every document of collection `name`, decoded one at a time: None (logged) for one
        bson cannot decode (a date out of range, invalid UTF-8), never an error that would stop
        every evaluation at it. A read failure is a StoreError naming `what`."""
        # pymongo types a collection by its client's document class, not the codec's.
        collection = cast(
            "Collection[RawBSONDocument]", self.db.get_collection(name, codec_options=_RAW)
        )
        try:
            for raw in collection.find({}):
                try:
                    yield bson.decode(raw.raw, codec_options=self.db.codec_options)
                except (InvalidBSON, ValueError, OverflowError) as exc:
                    log.error("%s: an undecodable document in %s: %s", what, name, exc)
                    yield None
        except PyMongoError as exc:
            raise StoreError(f"could not read {what}: {exc}") from exc

    def mark_folded(self, name: str, documents: int) -> str:
        """Rename a taken journal collection once its `documents` are folded (and stored), so
        that no exporter folds it again; the new name."""
        folded = folded_journal(name, documents)
        if folded == name:
            return name
        try:
            self.db[name].rename(folded)
        except PyMongoError as exc:
            raise StoreError(f"could not mark a journal folded: {exc}") from exc
        return folded

    def count_journal(self, name: str) -> int:
        """How many documents a taken journal collection holds."""
        try:
            return self.db[name].count_documents({})
        except PyMongoError as exc:
            raise StoreError(f"could not count the journal: {exc}") from exc

    def drop_journal(self, name: str) -> None:
        """Drop a folded, taken journal collection."""
        try:
            self.db.drop_collection(name)
        except PyMongoError as exc:
            raise StoreError(f"could not drop a folded journal: {exc}") from exc

    def find_event(
        self,
        event_id: str,
        subscriptions: Mapping[str, Collection_[str]],
        hours: Sequence[datetime],
    ) -> list[FoundEvent]:
        """One `_id` lookup (`$in`) per hour for the publish records on every topic at once
        (indexed on MongoDB; on FerretDB a read of that hour's collection), then per record
        one in its hour's receipts and one in its dead letters."""
        keys = sorted(publish_key(t, event_id) for t in subscriptions)
        found: list[FoundEvent] = []
        try:
            for hour in hours:
                name = record_partition(PUBLISH_COLLECTION, hour, hour)
                for doc in self.db[name].find({"_id": {"$in": keys}}):
                    topic, published = doc.get("topic"), doc.get("publishTime")
                    subs = sorted(
                        receipt_key(s, event_id) for s in subscriptions.get(str(topic), ())
                    )
                    at = published if _aware(published) else hour  # its receipts' hour
                    receipts, dead = (
                        list(self.db[record_partition(p, at, at)].find({"_id": {"$in": subs}}))
                        for p in (RECEIVED_COLLECTION, DEAD_LETTER_COLLECTION)
                    )
                    found.append(FoundEvent(doc, receipts, dead))
        except PyMongoError as exc:
            raise StoreError(f"could not read the records of an event: {exc}") from exc
        return found

    def load_digest(self, topic: str, start: datetime) -> BucketDigest:
        """The union of one bucket's digest deltas: indexed on MongoDB; on FerretDB a read of
        the digest collection of its PARTITION_MS, never more."""
        collection = self.db[bucket_partition(DIGEST_COLLECTION, start)]
        try:
            docs = list(collection.find({"digest": digest_key(topic, start)}))
        except PyMongoError as exc:
            raise StoreError(f"could not load a bucket digest: {exc}") from exc
        return BucketDigest.from_documents(topic, start, docs)

    def save_digests(self, digests: Iterable[BucketDigest], fold: str) -> None:
        """Insert each digest's delta (what it gained since it was stored): an insert reads
        nothing, on FerretDB too. Marks the digests stored only once all are."""
        digests = list(digests)
        by_partition: dict[str, list[dict[str, Any]]] = {}
        for digest in digests:
            docs = digest.deltas(fold)
            by_partition.setdefault(bucket_partition(DIGEST_COLLECTION, digest.start), []).extend(
                docs
            )
        try:
            for name, docs in by_partition.items():
                if name not in self._indexed:
                    self.db[name].create_index([("digest", ASCENDING)], name="digest")
                    self._indexed.add(name)
                for doc in docs:  # one per command: a delta may be megabytes
                    # A duplicate `_id` (a fold token used twice) fails the evaluation: the
                    # next one folds again under a new stamp; ignoring it could lose entries.
                    self.db[name].insert_one(doc)
        except (PyMongoError, InvalidDocument) as exc:
            raise StoreError(f"could not save bucket digests: {exc}") from exc
        for digest in digests:
            digest.stored()

    def save_bucket_results(
        self, results: Iterable[BucketResult], now: datetime, version: int, epoch: int = 0
    ) -> None:
        """Insert a new version of each bucket's evaluation: the highest (epoch, version)
        counts. `version` grows with every save of one lease holder (across processes too);
        `epoch` is the holder's lease epoch, so a successor's results always outrank those of
        a holder it took over from, whatever their clocks."""
        by_partition: dict[str, list[dict[str, Any]]] = {}
        for r in results:
            doc = result_document(r, now, version, epoch)
            by_partition.setdefault(bucket_partition(BUCKET_COLLECTION, r.start), []).append(doc)
        try:
            for name, docs in by_partition.items():
                self.db[name].insert_many(docs, ordered=False)
        except PyMongoError as exc:
            raise StoreError(f"could not save bucket results: {exc}") from exc

    def load_bucket_results(self, since: datetime) -> list[BucketResult]:
        """The latest version of every stored bucket evaluation with bucketStart >= since."""
        return [stored.result for stored in self.load_results(since)]

    def load_results(
        self,
        since: datetime,
        topics: Collection_[str] | None = None,
        partitions: Collection_[int] | None = None,
    ) -> list[StoredResult]:
        """The latest version of every stored bucket evaluation with bucketStart >= since, of
        `topics`, in the result partitions starting at `partitions` (each read whole on
        FerretDB; by `topic` on MongoDB)."""
        latest: dict[str, StoredResult] = {}
        query: dict[str, Any] = {} if topics is None else {"topic": {"$in": sorted(topics)}}
        try:
            if partitions is not None:
                # Named, not listed (a listing of every collection costs more than the read);
                # a partition no longer there reads empty.
                starts = sorted(ms for ms in partitions if ms + PARTITION_MS > epoch_ms(since))
                sources = [f"{BUCKET_COLLECTION}_{ms}" for ms in starts]
            else:
                names = self._collections(prefix=BUCKET_COLLECTION)
                sources = partitions_since(names, BUCKET_COLLECTION, since)
            for name in sources:
                for doc in self.db[name].find(query):
                    read = parse_result(doc)
                    if read is None or read.result.start < since:
                        continue
                    key = read.result.key
                    if key not in latest or read.order > latest[key].order:
                        latest[key] = read
        except PyMongoError as exc:
            raise StoreError(f"could not load bucket results: {exc}") from exc
        return list(latest.values())

    # -- exporter replicas: topic leases ----------------------------------------------------

    def load_leases(self, since: datetime, until: datetime) -> LeaseBoard:
        """Read the lease collections of the slots from `since` to `until` (by name: a slot
        no one wrote in is an empty read): every lease entry with the results its news told,
        and each replica's latest heartbeat."""
        leases: list[Lease] = []
        news: dict[tuple[str, int], list[Any]] = {}
        beats: dict[str, tuple[datetime, datetime]] = {}
        bad = 0
        for name in lease_slots(since, until):
            for doc in self._decoded(name, "topic leases"):
                if doc is not None and "news" in doc and "leases" not in doc:
                    _read_news(doc["news"], news)
                    continue
                entries = doc.get("leases") if doc is not None else None
                if not isinstance(entries, list) or len(entries) > MAX_LEASES_PER_DOCUMENT:
                    bad += 1
                    continue
                assert doc is not None
                replica, renewed, alive = doc.get("replica"), doc.get("renewed"), doc.get("alive")
                if not (isinstance(replica, str) and _aware(renewed) and _aware(alive)):
                    pass  # no heartbeat (or none of a readable shape)
                elif replica not in beats or beats[replica][0] < renewed:
                    beats[replica] = (renewed, alive)
                for entry in entries:
                    lease = Lease.from_document(entry) if isinstance(entry, dict) else None
                    if lease is None:
                        bad += 1
                    else:
                        leases.append(lease)
        if bad:
            log.error("%d unreadable topic leases skipped", bad)
        told = [
            replace(x, recent=tuple(news[(x.key, x.seq)])) if (x.key, x.seq) in news else x
            for x in leases
        ]
        return LeaseBoard(told, {r: alive for r, (_, alive) in beats.items()})

    def save_leases(
        self,
        replica: str,
        now: datetime,
        leases: Sequence[Lease],
        alive_until: datetime | None = None,
        forget_before: datetime | None = None,
    ) -> None:
        """Insert one document holding the leases (a replica renews all it holds at once) and
        its heartbeat into the collection of `now`'s slot: an insert reads nothing, on FerretDB
        too (an update by `_id` reads the whole collection). Its news go first, in documents
        of their own; then, with `forget_before`, the slots that end before it are dropped
        (housekeeping after the write: a renewal never waits for catalog operations)."""
        slot = self.db[lease_slot(now)]
        entries = [lease.to_document() for lease in leases]
        for i in range(0, max(len(entries), 1), MAX_LEASES_PER_DOCUMENT):
            part = entries[i : i + MAX_LEASES_PER_DOCUMENT]
            first = part[0]["_id"] if part else f"{replica}|{epoch_ms(now)}|{uuid.uuid4().hex}"
            self._save_news(slot, first, now, leases[i : i + MAX_LEASES_PER_DOCUMENT])
            doc: dict[str, Any] = {"_id": first, "replica": replica, "renewed": now, "leases": part}
            if alive_until is not None:
                doc["alive"] = alive_until
            _insert_new(slot, [doc], "topic leases")
        if forget_before is not None:
            self._drop_lease_slots(forget_before)

    def _save_news(
        self, slot: Collection[dict[str, Any]], first: str, now: datetime, leases: Sequence[Lease]
    ) -> None:
        """The results told by `leases`, in documents of at most NEWS_BYTES. First, and never
        in the way of the leases: a lease write whose news is missing (or short) is read from
        the partitions instead."""
        docs: list[dict[str, Any]] = []
        size = NEWS_BYTES
        for lease in leases:
            if not lease.recent:
                continue
            item = {"key": lease.key, "seq": lease.seq, "recent": list(lease.recent)}
            try:
                length = len(bson.encode(item))
            except (InvalidDocument, OverflowError) as exc:
                log.warning("lease news of %s not written: %s", lease.key, exc)
                continue
            if length > NEWS_BYTES:
                continue  # its readers read the partitions
            if size + length > NEWS_BYTES:
                docs.append({"_id": f"news|{first}|{len(docs)}", "renewed": now, "news": []})
                size = 0
            docs[-1]["news"].append(item)
            size += length
        try:
            if docs:
                _insert_new(slot, docs, "lease news")
        except (StoreError, InvalidDocument, DocumentTooLarge) as exc:
            log.warning("lease news not written (read from the partitions): %s", exc)

    def _drop_lease_slots(self, before: datetime) -> None:
        """Drop the lease collections of slots that end before `before` (a failure is logged:
        they are dropped by a later write)."""
        try:
            for name in partitions_before(self._collections(), LEASE_COLLECTION, before):
                self.db.drop_collection(name)
        except PyMongoError as exc:
            log.warning("could not drop old topic lease collections: %s", exc)

    def claim_epoch(self, key: str, epoch: int, owner: str, now: datetime) -> datetime | None:
        """An insert of `key|epoch`: the one claim of it that succeeds."""
        try:
            self.state.insert_one({"_id": f"claim|{key}|{epoch}", "owner": owner, "claimed": now})
            return None
        except DuplicateKeyError:
            pass
        except PyMongoError as exc:
            raise StoreError(f"could not claim a topic lease: {exc}") from exc
        return self.claimed_epochs([(key, epoch)]).get((key, epoch), _LONG_AGO)

    def claimed_epochs(self, pairs: Sequence[tuple[str, int]]) -> dict[tuple[str, int], datetime]:
        """One lookup by `_id` for one pair (pushed down to SQLite on FerretDB too); one `$in`
        of `_id`s for more (on FerretDB a read of the claims, one small document per lease
        change). A claim without a readable time is not believed to be recent."""
        ids = {f"claim|{key}|{epoch}": (key, epoch) for key, epoch in pairs}
        if not ids:
            return {}
        query = {"_id": next(iter(ids))} if len(ids) == 1 else {"_id": {"$in": sorted(ids)}}
        try:
            found = list(self.state.find(query, {"claimed": 1}))
        except PyMongoError as exc:
            raise StoreError(f"could not read topic lease claims: {exc}") from exc
        return {
            ids[d["_id"]]: d["claimed"] if _aware(d.get("claimed")) else _LONG_AGO
            for d in found
            if d.get("_id") in ids
        }

    def load_tenures(self) -> list[Tenure]:
        """Every stored subscription tenure (one small document per subscription)."""
        tenures = [
            Tenure.from_document(d) if d is not None else None
            for d in self._state("tenure|", "subscription tenures")
        ]
        if None in tenures:
            log.error("%d unreadable subscription tenures skipped", tenures.count(None))
        return [t for t in tenures if t is not None]

    def save_tenures(self, tenures: Sequence[Tenure], epoch: int = 0) -> list[Tenure]:
        """Replace each tenure by `_id` (rare: a subscription seen, gone or back), unless the
        stored one carries a later lease epoch (then the upsert's insert hits the `_id`)."""
        refused = []
        try:
            for t in tenures:
                doc = {**t.to_document(), "epoch": epoch}
                doc["_id"] = f"tenure|{doc['_id']}"
                newer = {"$or": [{"epoch": {"$lte": epoch}}, {"epoch": {"$exists": False}}]}
                try:
                    self.state.replace_one({"_id": doc["_id"], **newer}, doc, upsert=True)
                except DuplicateKeyError:
                    refused.append(t)
        except PyMongoError as exc:
            raise StoreError(f"could not store subscription tenures: {exc}") from exc
        return refused

    def _state(self, kind: str, what: str) -> Iterator[dict[str, Any] | None]:
        """The state documents of one kind (`_id` prefix), each decoded (None: undecodable)."""
        for doc in self._decoded(STATE_COLLECTION, what):
            name = doc.get("_id") if doc is not None else kind
            if isinstance(name, str) and name.startswith(kind):
                yield doc

    def load_fold_stamp(self) -> int:
        """The highest fold stamp stored (one read by `_id`)."""
        try:
            doc = self.state.find_one({"_id": "foldStamp"})
        except PyMongoError as exc:
            raise StoreError(f"could not load the fold stamp: {exc}") from exc
        stamp = doc.get("stamp") if doc else None
        # bson reads integers past 32 bits back as Int64, a subclass of int.
        return (
            int(stamp)
            if isinstance(stamp, int) and not isinstance(stamp, bool) and stamp > 0
            else 0
        )

    def save_fold_stamp(self, stamp: int) -> None:
        """Remember a fold stamp before digests carrying it are stored."""
        try:
            self.state.update_one({"_id": "foldStamp"}, {"$max": {"stamp": stamp}}, upsert=True)
        except PyMongoError as exc:
            raise StoreError(f"could not save the fold stamp: {exc}") from exc

    # -- retention -------------------------------------------------------------------------

    def _prune_buckets(self, before: datetime) -> dict[str, int]:
        """Drop the digest and result partitions whose every bucket starts before `before`
        (out of every window). Returns how many collections were dropped, per kind."""
        try:
            names = self._collections()
            dropped = {}
            for prefix in (DIGEST_COLLECTION, BUCKET_COLLECTION):
                old = partitions_before(names, prefix, before)
                for name in old:
                    self.db.drop_collection(name)
                    self._indexed.discard(name)
                dropped[prefix] = len(old)
            return dropped
        except PyMongoError as exc:
            raise StoreError(f"could not prune old buckets: {exc}") from exc

    def journal_size(self) -> int:
        """Documents in every journal collection, live or taken (for operators and benches)."""
        try:
            names = self._collections(lambda n: is_live_journal(n) or is_taken_journal(n))
            return sum(self.count_journal(n) for n in names)
        except PyMongoError as exc:
            raise StoreError(f"could not count the journal: {exc}") from exc

    def _collections(
        self, wanted: Callable[[str], bool] | None = None, prefix: str = ""
    ) -> list[str]:
        """Collections (not views: one cannot be renamed or read as a journal) whose name is
        `wanted`, of those starting with `prefix` (filtered by the server: a listing costs
        what it returns, 4 vs 11 ms of 350 collections on FerretDB, and retention keeps a
        week of digest and result partitions)."""
        query = {"name": {"$regex": f"^{re.escape(prefix)}"}} if prefix else None
        listed = self.db.list_collections(filter=query)
        names = (c["name"] for c in listed if c.get("type") == "collection")
        return sorted(n for n in names if wanted is None or wanted(n))

    def delete_older_than(self, cutoff: datetime) -> dict[str, int]:
        """Retention by dropping whole hours of records (FerretDB has no TTL index, and its
        deletes read a whole collection under SQLite's write lock): every hourly collection
        whose records were all published before `cutoff` (so a record is kept up to an hour
        past the retention); digests and results before `cutoff` too. Counts the collections
        dropped per kind (counting their documents would read them whole on FerretDB)."""
        counts: dict[str, int] = {}
        try:
            names = self._collections()
            for prefix in RECORD_PREFIXES:
                old = partitions_before(names, prefix, cutoff)
                for name in old:
                    self.db.drop_collection(name)
                counts[prefix] = len(old)
            counts.update(self._prune_buckets(cutoff))
        except PyMongoError as exc:
            raise StoreError(f"retention failed: {exc}") from exc
        return counts
