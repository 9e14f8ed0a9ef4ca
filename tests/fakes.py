"""An in-memory audit store with MongoStore's semantics, for unit tests of pure logic.

It implements `eventaudit.store.AuditStore` (mypy checks that), so unit tests pass it where
the real store goes. Integration tests then prove MongoStore on FerretDB agrees.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from eventaudit.contract import PUBLISH_TIME_TOLERANCE
from eventaudit.records import BucketResult, PublishRecord, Receipt
from eventaudit.store import (
    AuditStore,
    DuplicatePublishes,
    PublishedEvent,
    ReceiptSummary,
    StoreError,
    classify_duplicates,
    publish_key,
    receipt_key,
)


class MemoryStore:
    """Publish records keyed by (topic, eventID), receipts by (subscription, eventID), like
    MongoStore.

    `fail_next` makes the next N operations raise StoreError (an outage).
    """

    def __init__(self) -> None:
        self.published: dict[str, dict[str, Any]] = {}
        self.received: dict[str, dict[str, Any]] = {}
        self.buckets: dict[str, BucketResult] = {}
        self.state: tuple[datetime | None, datetime | None] = (None, None)
        self.fail_next = 0
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
                key = publish_key(r.topic, r.event_id)
                stored = self.published.get(key)
                if stored is None:
                    self.published[key] = r.to_document(now)
                else:
                    duplicates.append((stored, r))
            return classify_duplicates(duplicates)

    def record_receipts(self, receipts: Sequence[Receipt], now: datetime) -> None:
        with self._lock:
            self._check()
            for r in receipts:
                key = receipt_key(r.subscription, r.event_id)
                doc = self.received.get(key)
                if doc is None:
                    self.received[key] = {
                        "subscription": r.subscription,
                        "eventID": r.event_id,
                        "topic": r.topic,
                        "traceID": r.trace_id,
                        "publishTime": r.publish_time,
                        "receiveTime": r.receive_time,
                        "lastReceiveTime": r.receive_time,
                        "deliveries": 1,
                        "createdTime": now,
                        "writtenTime": now,
                    }
                else:
                    doc["deliveries"] += 1
                    doc["lastReceiveTime"] = max(doc["lastReceiveTime"], r.receive_time)
                    doc["writtenTime"] = max(doc["writtenTime"], now)

    # -- exporter reads ----------------------------------------------------------------------

    @staticmethod
    def _split(
        docs: Iterable[dict[str, Any]],
        start: datetime,
        end: datetime,
        changed_field: str,
        changed_since: datetime | None,
        changed_from: datetime,
    ) -> tuple[list[dict[str, Any]], set[datetime]]:
        new: list[dict[str, Any]] = []
        late: set[datetime] = set()
        for d in docs:
            t = d["publishTime"]
            if start <= t < end:
                new.append(d)
            elif (
                changed_since is not None
                and changed_from <= t < start
                and d[changed_field] >= changed_since
            ):
                late.add(t)
        return new, late

    def published_scan(
        self, start: datetime, end: datetime, changed_since: datetime | None, changed_from: datetime
    ) -> tuple[list[PublishedEvent], set[datetime]]:
        with self._lock:
            self._check()
            docs, late = self._split(
                self.published.values(), start, end, "createdTime", changed_since, changed_from
            )
        return [_event(d) for d in docs], late

    def receipts_scan(
        self, start: datetime, end: datetime, changed_since: datetime | None, changed_from: datetime
    ) -> tuple[list[ReceiptSummary], set[datetime]]:
        with self._lock:
            self._check()
            docs, late = self._split(
                self.received.values(), start, end, "writtenTime", changed_since, changed_from
            )
        return [_summary(d) for d in docs], late

    def published_between(self, start: datetime, end: datetime) -> list[PublishedEvent]:
        return self.published_scan(start, end, None, start)[0]

    def receipts_between(self, start: datetime, end: datetime) -> list[ReceiptSummary]:
        return self.receipts_scan(start, end, None, start)[0]

    def window_records(
        self,
        topic: str,
        subscription: str,
        start: datetime,
        end: datetime,
        written_before: datetime,
    ) -> tuple[list[PublishedEvent], list[ReceiptSummary]]:
        with self._lock:
            self._check()
            events = [
                _event(d)
                for d in self.published.values()
                if d["topic"] == topic
                and start <= d["publishTime"] < end
                and d["createdTime"] < written_before
            ]
            receipts = [
                _summary(d)
                for d in self.received.values()
                if d["subscription"] == subscription
                and d["topic"] == topic
                and start <= d["publishTime"] < end
                and d["createdTime"] < written_before
            ]
        return events, receipts

    # -- evaluator state ---------------------------------------------------------------------

    def save_bucket_results(self, results: Iterable[BucketResult], now: datetime) -> None:
        with self._lock:
            self._check()
            for r in results:
                self.buckets[r.key] = r

    def load_bucket_results(self, since: datetime) -> list[BucketResult]:
        with self._lock:
            self._check()
            return [r for r in self.buckets.values() if r.start >= since]

    def load_evaluator_state(self) -> tuple[datetime | None, datetime | None]:
        with self._lock:
            self._check()
            return self.state

    def save_evaluator_state(self, until: datetime, scanned_at: datetime) -> None:
        with self._lock:
            self._check()
            self.state = (until, scanned_at)

    def delete_older_than(self, cutoff: datetime) -> dict[str, int]:
        with self._lock:
            self._check()
            counts = {}
            written_before = cutoff - PUBLISH_TIME_TOLERANCE
            tables = (("PublishRecord", self.published), ("ReceivedRecord", self.received))
            for name, table in tables:
                old = [
                    k
                    for k, d in table.items()
                    if d["publishTime"] < cutoff or d["createdTime"] < written_before
                ]
                for k in old:
                    del table[k]
                counts[name] = len(old)
            old_buckets = [k for k, r in self.buckets.items() if r.start < cutoff]
            for k in old_buckets:
                del self.buckets[k]
            counts["BucketResult"] = len(old_buckets)
            return counts

    def ensure_indexes(self) -> None:
        """Nothing to index in memory."""

    def close(self) -> None:
        """Nothing to release."""


def _event(d: dict[str, Any]) -> PublishedEvent:
    return PublishedEvent(d["topic"], d["eventID"], d.get("traceID") or "", d["publishTime"])


def _summary(d: dict[str, Any]) -> ReceiptSummary:
    return ReceiptSummary(
        d["topic"], d["subscription"], d["eventID"], int(d["deliveries"]), d["publishTime"]
    )


def _implements_protocol(store: MemoryStore) -> AuditStore:
    # mypy checks here, once, that MemoryStore has every method of the real store's interface.
    return store
