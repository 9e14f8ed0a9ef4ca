"""Bytes each kind of document costs per event, as the code writes them (docs/scaling.md).

python -m bench.sizes
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import bson

from eventaudit.contract import epoch_ms
from eventaudit.journal import BucketDigest, JournalEntry, journal_documents
from eventaudit.records import PublishRecord

BATCH = 500


def main() -> None:
    """Print the size of a publish record, a receipt, and per-event journal, digest and result
    bytes for a batch of demo events (one subscription)."""
    now = datetime(2026, 11, 28, 12, 0, 0, 123000, tzinfo=UTC)
    trace = uuid.uuid4().hex
    event_id = str(uuid.uuid4())
    payload = f'{{"userId":"{uuid.uuid4()}","name":"Ada Lovelace","age":36,"gender":"female"}}'
    record = PublishRecord(event_id, trace, "create-user", payload, "12345678901234", now)
    publish = {"_id": f"create-user|{event_id}", **record.to_document(now)}
    receipt = {
        "_id": f"create-user-audit|{event_id}", "subscription": "create-user-audit",
        "eventID": event_id, "topic": "create-user", "traceID": trace,
        "messageId": "12345678901234", "publishTime": now, "brokerPublishTime": now,
        "receiveTime": now, "lastReceiveTime": now, "deliveries": 1, "deliveryAttempt": None,
        "createdTime": now,
    }  # fmt: skip
    ms = epoch_ms(now)
    ids = [str(uuid.uuid4()) for _ in range(BATCH)]
    published = [JournalEntry("create-user", e, ms, None, trace) for e in ids]
    received = [JournalEntry("create-user", e, ms, "create-user-audit", "", 1) for e in ids]
    digest = BucketDigest("create-user", now)
    for entry in (*published, *received):
        digest.merge(entry, 1)
    deltas = sum(len(bson.encode(d)) for d in digest.deltas("1.0"))
    result = {**digest.result().to_document(now), "version": 1}
    print(f"publish record            {len(bson.encode(publish))} B")
    print(f"receipt                   {len(bson.encode(receipt))} B")
    for name, entries in (("publish", published), ("receipt", received)):
        size = len(bson.encode(journal_documents("b", entries, now)[0])) / BATCH
        print(f"journal entry, {name:8}   {size:.0f} B")
    print(f"digest, publish + receipt {deltas / BATCH:.0f} B per event")
    print(f"bucket result version     {len(bson.encode(result))} B ({BATCH} events)")


if __name__ == "__main__":
    main()
