"""The MongoDB audit store: indexes, batched writes and the exporter's bounded queries.

Only the subset of MongoDB that FerretDB 1.24 also serves is used: plain finds with
projections, unordered bulk writes, unique and compound indexes. No `$lookup`, no
accumulators beyond counting (sets are compared in Python, one bucket range at a time).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, TypeVar

from bson.codec_options import CodecOptions
from pymongo import ASCENDING, DESCENDING, MongoClient, UpdateOne
from pymongo.collection import Collection
from pymongo.errors import BulkWriteError, OperationFailure, PyMongoError

from eventaudit.contract import PUBLISH_TIME_TOLERANCE, epoch_ms
from eventaudit.records import (
    BUCKET_COLLECTION,
    PUBLISH_COLLECTION,
    RECEIVED_COLLECTION,
    STATE_COLLECTION,
    BucketResult,
    PublishRecord,
    Receipt,
)

log = logging.getLogger(__name__)

_DUPLICATE_KEY = 11000
_INDEX_NOT_FOUND = 27
T = TypeVar("T")


class StoreError(RuntimeError):
    """The audit store could not complete an operation; the caller keeps its data and retries."""


@dataclass(frozen=True, slots=True)
class PublishedEvent:
    """The slice of a publish record the evaluator needs."""

    topic: str
    event_id: str
    trace_id: str
    publish_time: datetime


@dataclass(frozen=True, slots=True)
class ReceiptSummary:
    """The slice of a receipt the evaluator needs."""

    topic: str
    subscription: str
    event_id: str
    deliveries: int
    publish_time: datetime


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

    def published_scan(
        self, start: datetime, end: datetime, changed_since: datetime | None, changed_from: datetime
    ) -> tuple[list[PublishedEvent], set[datetime]]:
        """Publish records in [start, end), and publishTimes of late ones (see MongoStore)."""
        ...

    def receipts_scan(
        self, start: datetime, end: datetime, changed_since: datetime | None, changed_from: datetime
    ) -> tuple[list[ReceiptSummary], set[datetime]]:
        """Receipts in [start, end), and publishTimes of late ones (see MongoStore)."""
        ...

    def published_between(self, start: datetime, end: datetime) -> list[PublishedEvent]:
        """Publish records with publishTime in [start, end)."""
        ...

    def receipts_between(self, start: datetime, end: datetime) -> list[ReceiptSummary]:
        """Receipts of events whose publishTime is in [start, end)."""
        ...

    def save_bucket_results(self, results: Iterable[BucketResult], now: datetime) -> None:
        """Replace the stored evaluation of each bucket."""
        ...

    def load_bucket_results(self, since: datetime) -> list[BucketResult]:
        """Stored bucket evaluations with bucketStart >= since."""
        ...

    def load_evaluator_state(self) -> tuple[datetime | None, datetime | None]:
        """(end of the settled range evaluated, time of the last late-record scan)."""
        ...

    def save_evaluator_state(self, until: datetime, scanned_at: datetime) -> None:
        """Remember how far buckets were evaluated and late records scanned."""
        ...


class ExporterStore(EvaluatorStore, Protocol):
    """Everything the exporter process uses: the evaluator's reads, the API, retention."""

    def window_records(
        self,
        topic: str,
        subscription: str,
        start: datetime,
        end: datetime,
        written_before: datetime,
    ) -> tuple[list[PublishedEvent], list[ReceiptSummary]]:
        """Publish records of `topic` and receipts of (`topic`, `subscription`) with publishTime
        in [start, end) and createdTime before `written_before`: what an evaluation at that
        time compared (the missed-events API lists the same events the gauges count)."""
        ...

    def delete_older_than(self, cutoff: datetime) -> dict[str, int]:
        """Retention: delete records published before `cutoff`, records written before
        `cutoff - PUBLISH_TIME_TOLERANCE` (whatever their publishTime), and bucket results
        before `cutoff`; counts per collection. Nothing published at or after `cutoff` is
        deleted unless its publishTime is further ahead of its write than the tolerance."""
        ...


class AuditStore(PublishRecordStore, ReceiptStore, ExporterStore, Protocol):
    """The whole audit store interface; MongoStore and the tests' MemoryStore implement it."""

    def ensure_indexes(self) -> None:
        """Create what the queries rely on (idempotent)."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


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
    for stored, record in pairs:
        kinds[duplicate_kind(stored, record)].append(record)
    return DuplicatePublishes(tuple(kinds["retried"]), tuple(kinds["conflict"]))


def _new_or_changed(
    start: datetime,
    end: datetime,
    changed_field: str,
    changed_since: datetime | None,
    changed_from: datetime,
) -> dict[str, Any]:
    """Records published in [start, end), or written (`changed_field`) since `changed_since`
    with a publishTime in [changed_from, start): one `$or`, one read per collection."""
    query: dict[str, Any] = {"publishTime": {"$gte": start, "$lt": end}}
    if changed_since is None or changed_from >= start:
        return query
    late = {
        changed_field: {"$gte": changed_since},
        "publishTime": {"$gte": changed_from, "$lt": start},
    }
    return {"$or": [query, late]}


_PUBLISHED_FIELDS = {"_id": 0, "topic": 1, "eventID": 1, "traceID": 1, "publishTime": 1}
_RECEIPT_FIELDS = {
    "_id": 0,
    "topic": 1,
    "subscription": 1,
    "eventID": 1,
    "deliveries": 1,
    "publishTime": 1,
}


def _published_event(d: dict[str, Any]) -> PublishedEvent:
    return PublishedEvent(d["topic"], d["eventID"], d.get("traceID") or "", d["publishTime"])


def _receipt_summary(d: dict[str, Any]) -> ReceiptSummary:
    return ReceiptSummary(
        d["topic"], d["subscription"], d["eventID"], int(d["deliveries"]), d["publishTime"]
    )


def _split_read(
    collection: Collection[dict[str, Any]],
    query: dict[str, Any],
    fields: dict[str, int],
    start: datetime,
    convert: Callable[[dict[str, Any]], T],
) -> tuple[list[T], set[datetime]]:
    """Run `query`; records published at or after `start` are converted, the publishTimes of
    the earlier (late) ones are collected."""
    records: list[T] = []
    late: set[datetime] = set()
    try:
        for d in collection.find(query, fields):
            if d["publishTime"] >= start:
                records.append(convert(d))
            else:
                late.add(d["publishTime"])
    except PyMongoError as exc:
        raise StoreError(f"could not read {collection.name}: {exc}") from exc
    return records, late


def _drop_index(collection: Collection[dict[str, Any]], name: str) -> None:
    """Drop an index; one already gone (another process dropped it first) is fine."""
    try:
        collection.drop_index(name)
    except OperationFailure as exc:
        if exc.code != _INDEX_NOT_FOUND:
            raise


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
        self.published: Collection[dict[str, Any]] = db[PUBLISH_COLLECTION]
        self.received: Collection[dict[str, Any]] = db[RECEIVED_COLLECTION]
        self.buckets: Collection[dict[str, Any]] = db[BUCKET_COLLECTION]
        self.state: Collection[dict[str, Any]] = db[STATE_COLLECTION]
        self.database = database

    def close(self) -> None:
        """Close the client's connections."""
        self._client.close()

    def ensure_indexes(self) -> None:
        """Create every index the writers and the exporter rely on (idempotent)."""
        try:
            self.published.create_index(
                [("topic", ASCENDING), ("eventID", ASCENDING)],
                unique=True,
                name="topic_eventID_unique",
            )
            # Before publish records were keyed per topic, eventID alone was unique: that index
            # would refuse an event fanned out to a second topic.
            if "eventID_unique" in self.published.index_information():
                _drop_index(self.published, "eventID_unique")
            self.published.create_index([("publishTime", ASCENDING)], name="publishTime")
            self.published.create_index(
                [("topic", ASCENDING), ("publishTime", ASCENDING)], name="topic_publishTime"
            )
            self.published.create_index([("createdTime", ASCENDING)], name="createdTime")
            self.received.create_index(
                [("subscription", ASCENDING), ("eventID", ASCENDING)],
                unique=True,
                name="subscription_eventID_unique",
            )
            self.received.create_index([("publishTime", ASCENDING)], name="publishTime")
            self.received.create_index(
                [("subscription", ASCENDING), ("publishTime", ASCENDING)],
                name="subscription_publishTime",
            )
            self.received.create_index([("writtenTime", ASCENDING)], name="writtenTime")
            self.received.create_index([("createdTime", ASCENDING)], name="createdTime")
            self.buckets.create_index([("bucketStart", DESCENDING)], name="bucketStart")
        except PyMongoError as exc:
            raise StoreError(f"could not ensure indexes: {exc}") from exc

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
        docs = [{"_id": publish_key(r.topic, r.event_id), **r.to_document(now)} for r in records]
        try:
            self.published.insert_many(docs, ordered=False)
            return DuplicatePublishes()
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if any(e.get("code") != _DUPLICATE_KEY for e in errors) or exc.details.get(
                "writeConcernErrors"
            ):
                raise StoreError(f"publish records not written: {errors[:3]}") from exc
            duplicates = [records[e["index"]] for e in errors]
        except PyMongoError as exc:
            raise StoreError(f"publish records not written: {exc}") from exc
        # One read by `_id` per duplicate: what FerretDB's SQLite backend serves without a scan.
        try:
            return classify_duplicates(
                (
                    self.published.find_one(
                        {"_id": publish_key(r.topic, r.event_id)}, _DUPLICATE_FIELDS
                    ),
                    r,
                )
                for r in duplicates
            )
        except PyMongoError as exc:
            raise StoreError(f"could not read back duplicate publish records: {exc}") from exc

    def record_receipts(self, receipts: Sequence[Receipt], now: datetime) -> None:
        """Store one receipt per (subscription, eventID), counting every delivery.

        First deliveries, the common case, are one unordered bulk insert keyed by
        `_id = "subscription|eventID"`; only keys that already exist (redeliveries) become
        updates, matched on `_id`. Both are what FerretDB's SQLite backend serves without a
        table scan (it pushes down nothing but `_id` equality), and MongoDB is fast at both.
        Deliveries of one event within the batch are folded into one write first.
        """
        if not receipts:
            return
        folded: dict[str, tuple[Receipt, int, datetime, datetime]] = {}
        for r in receipts:
            key = receipt_key(r.subscription, r.event_id)
            if key in folded:
                first, n, lo, hi = folded[key]
                folded[key] = (first, n + 1, min(lo, r.receive_time), max(hi, r.receive_time))
            else:
                folded[key] = (r, 1, r.receive_time, r.receive_time)
        items = list(folded.items())
        docs = [
            {
                "_id": key,
                "subscription": r.subscription,
                "eventID": r.event_id,
                "topic": r.topic,
                "traceID": r.trace_id,
                "messageId": r.message_id,
                "publishTime": r.publish_time,
                "brokerPublishTime": r.broker_publish_time,
                "receiveTime": first_seen,
                "lastReceiveTime": last_seen,
                "deliveries": n,
                "createdTime": now,
                "writtenTime": now,
            }
            for key, (r, n, first_seen, last_seen) in items
        ]
        try:
            self.received.insert_many(docs, ordered=False)
            return
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if any(e.get("code") != _DUPLICATE_KEY for e in errors) or exc.details.get(
                "writeConcernErrors"
            ):
                raise StoreError(f"receipts not written: {errors[:3]}") from exc
            existing = [items[e["index"]] for e in errors]
        except PyMongoError as exc:
            raise StoreError(f"receipts not written: {exc}") from exc
        updates = [
            UpdateOne(
                {"_id": key},
                {
                    "$inc": {"deliveries": n},
                    "$max": {"lastReceiveTime": last_seen, "writtenTime": now},
                },
            )
            for key, (_, n, _, last_seen) in existing
        ]
        try:
            matched = _bulk_write_in_chunks(self.received, updates)
        except PyMongoError as exc:
            raise StoreError(f"redeliveries not written: {exc}") from exc
        if matched < len(updates):
            # A receipt deleted between the insert and its update (retention, an operator):
            # acking now would leave a delivered event without a receipt, so fail the batch.
            raise StoreError(
                f"redeliveries not written: {len(updates) - matched} receipt(s) vanished"
            )

    # -- exporter queries ------------------------------------------------------------------

    def published_between(self, start: datetime, end: datetime) -> list[PublishedEvent]:
        """Publish records with publishTime in [start, end)."""
        events, _ = self.published_scan(start, end, None, start)
        return events

    def published_scan(
        self, start: datetime, end: datetime, changed_since: datetime | None, changed_from: datetime
    ) -> tuple[list[PublishedEvent], set[datetime]]:
        """One read for an evaluation: publish records with publishTime in [start, end), and
        the publishTimes in [changed_from, start) of records created at or after
        `changed_since` (late records whose bucket was already evaluated).
        """
        query = _new_or_changed(start, end, "createdTime", changed_since, changed_from)
        return _split_read(self.published, query, _PUBLISHED_FIELDS, start, _published_event)

    def receipts_between(self, start: datetime, end: datetime) -> list[ReceiptSummary]:
        """Receipts of events whose publishTime is in [start, end)."""
        receipts, _ = self.receipts_scan(start, end, None, start)
        return receipts

    def receipts_scan(
        self, start: datetime, end: datetime, changed_since: datetime | None, changed_from: datetime
    ) -> tuple[list[ReceiptSummary], set[datetime]]:
        """Like published_scan, for receipts: those of events published in [start, end), and
        the publishTimes in [changed_from, start) of receipts written at or after
        `changed_since` (late receipts and redeliveries). `writtenTime` is stamped when the
        batch is written, after the consumer's handler ran, not when the message arrived.
        """
        query = _new_or_changed(start, end, "writtenTime", changed_since, changed_from)
        return _split_read(self.received, query, _RECEIPT_FIELDS, start, _receipt_summary)

    def window_records(
        self,
        topic: str,
        subscription: str,
        start: datetime,
        end: datetime,
        written_before: datetime,
    ) -> tuple[list[PublishedEvent], list[ReceiptSummary]]:
        """Publish records of `topic` and receipts of (`topic`, `subscription`) with publishTime
        in [start, end) and createdTime before `written_before` (served by the
        topic_publishTime and subscription_publishTime indexes)."""
        span = {"$gte": start, "$lt": end}
        written = {"$lt": written_before}
        try:
            events = [
                _published_event(d)
                for d in self.published.find(
                    {"topic": topic, "publishTime": span, "createdTime": written}, _PUBLISHED_FIELDS
                )
            ]
            receipts = [
                _receipt_summary(d)
                for d in self.received.find(
                    {
                        "subscription": subscription,
                        "publishTime": span,
                        "topic": topic,
                        "createdTime": written,
                    },
                    _RECEIPT_FIELDS,
                )
            ]
        except PyMongoError as exc:
            raise StoreError(f"could not read the records of a window: {exc}") from exc
        return events, receipts

    # -- evaluator state -------------------------------------------------------------------

    def save_bucket_results(self, results: Iterable[BucketResult], now: datetime) -> None:
        """Replace the stored evaluation of each bucket."""
        ops = [
            UpdateOne({"_id": r.key}, {"$set": r.to_document(now)}, upsert=True) for r in results
        ]
        if not ops:
            return
        try:
            _bulk_write_in_chunks(self.buckets, ops)
        except PyMongoError as exc:
            raise StoreError(f"could not save bucket results: {exc}") from exc

    def load_bucket_results(self, since: datetime) -> list[BucketResult]:
        """Stored bucket evaluations with bucketStart >= since."""
        try:
            return [
                BucketResult.from_document(d)
                for d in self.buckets.find({"bucketStart": {"$gte": since}})
            ]
        except PyMongoError as exc:
            raise StoreError(f"could not load bucket results: {exc}") from exc

    def load_evaluated_until(self) -> datetime | None:
        """End of the last settled bucket range evaluated, if any."""
        return self.load_evaluator_state()[0]

    def load_evaluator_state(self) -> tuple[datetime | None, datetime | None]:
        """(end of the settled range evaluated, time of the last late-record scan), if any."""
        try:
            doc = self.state.find_one({"_id": "evaluator"})
        except PyMongoError as exc:
            raise StoreError(f"could not load evaluator state: {exc}") from exc
        if not doc:
            return None, None
        return doc["evaluatedUntil"], doc.get("scannedAt")

    def save_evaluator_state(self, until: datetime, scanned_at: datetime) -> None:
        """Remember how far buckets were evaluated and late records scanned, so a restart
        resumes there instead of re-reading the whole window."""
        try:
            self.state.update_one(
                {"_id": "evaluator"},
                {"$set": {"evaluatedUntil": until, "scannedAt": scanned_at}},
                upsert=True,
            )
        except PyMongoError as exc:
            raise StoreError(f"could not save evaluator state: {exc}") from exc

    def delete_older_than(self, cutoff: datetime) -> dict[str, int]:
        """Retention by periodic delete (FerretDB has no TTL indexes): records published before
        `cutoff`, and records written before `cutoff - PUBLISH_TIME_TOLERANCE` whatever their
        publishTime (one carrying a far-future publishTime would otherwise stay for good).

        A stored publishTime may be up to the tolerance after its record's write (a subscriber
        keeps the attribute when it is within that of the broker's publish time), so deleting
        by write time only that much earlier never reaches a record published at or after
        `cutoff`, still inside a window. One indexed delete per field."""
        before = {"$lt": cutoff}
        written_before = {"$lt": cutoff - PUBLISH_TIME_TOLERANCE}
        try:
            counts = {
                name: collection.delete_many({"publishTime": before}).deleted_count
                + collection.delete_many({"createdTime": written_before}).deleted_count
                for name, collection in (
                    (PUBLISH_COLLECTION, self.published),
                    (RECEIVED_COLLECTION, self.received),
                )
            }
            counts[BUCKET_COLLECTION] = self.buckets.delete_many(
                {"bucketStart": before}
            ).deleted_count
        except PyMongoError as exc:
            raise StoreError(f"retention delete failed: {exc}") from exc
        return counts
