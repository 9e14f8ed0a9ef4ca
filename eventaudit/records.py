"""Record types written by publishers and subscribers, and their MongoDB documents."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

PUBLISH_COLLECTION = "PublishRecord"
RECEIVED_COLLECTION = "ReceivedRecord"
BUCKET_COLLECTION = "BucketResult"
STATE_COLLECTION = "EvaluatorState"
# Missed events a bucket result lists per subscription (the API's default page).
MISSED_KEPT = 100
JOURNAL_COLLECTION = "EventJournal"
DIGEST_COLLECTION = "BucketDigest"


@dataclass(frozen=True, slots=True)
class PublishRecord:
    """One event handed to Pub/Sub by an audited publisher."""

    event_id: str
    trace_id: str
    topic: str
    payload: str
    message_id: str
    publish_time: datetime
    payload_truncated: bool = False
    attributes: str = ""
    """The event's own attributes (not the audit's), as `encode_attributes` writes them."""

    def to_document(self, created_time: datetime) -> dict[str, Any]:
        """The `PublishRecord` document; `createdTime` is when it reached the store."""
        return {
            "eventID": self.event_id,
            "traceID": self.trace_id,
            "topic": self.topic,
            "payload": self.payload,
            "messageId": self.message_id,
            "publishTime": self.publish_time,
            "createdTime": created_time,
            "payloadTruncated": self.payload_truncated,
            "attributes": self.attributes,
        }


@dataclass(frozen=True, slots=True)
class Receipt:
    """One delivery of an audited message to a subscription."""

    subscription: str
    event_id: str
    topic: str
    trace_id: str | None
    message_id: str
    publish_time: datetime
    broker_publish_time: datetime
    receive_time: datetime


@dataclass(frozen=True, slots=True)
class BucketCounts:
    """Evaluated counts of one subscription in one settled bucket."""

    received: int = 0
    duplicates: int = 0
    unmatched: int = 0
    expected: int | None = None
    """With a filter, the published events it matches (sent to the subscription); None: all."""
    filtered: int = 0
    """Receipts of published events the filter does not match (the emulator sends them)."""
    dead_lettered: int = 0
    """Expected events moved to the dead-letter topic and not received."""
    filter: str = ""
    """The filter these counts were made with ("": none)."""


@dataclass(frozen=True, slots=True)
class BucketResult:
    """Evaluation of one topic's settled bucket: published count and per-subscription counts."""

    topic: str
    start: datetime
    published: int
    subscriptions: dict[str, BucketCounts]
    merged: int = 0
    """The latest fold stamp in its digest (a new exporter process stamps after it)."""
    missed: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Per subscription with receipts here, its oldest MISSED_KEPT missed events, each
    `eventID|traceID|publishMs`: /api/v1/missed lists them without reading the digest."""
    oldest: tuple[str, ...] = ()
    """The oldest MISSED_KEPT published events, the same way: what a subscription with no
    receipt in this bucket missed."""

    @property
    def key(self) -> str:
        """Document id: topic ids never contain '|'."""
        return f"{self.topic}|{int(self.start.timestamp() * 1000)}"

    def to_document(self, evaluated_time: datetime) -> dict[str, Any]:
        """Subscriptions go in an array: subscription ids may contain dots, unsafe as keys."""
        return {
            "_id": self.key,
            "topic": self.topic,
            "bucketStart": self.start,
            "published": self.published,
            "subscriptions": [
                {
                    "name": name,
                    "received": c.received,
                    "duplicates": c.duplicates,
                    "unmatched": c.unmatched,
                    "expected": c.expected,
                    "filtered": c.filtered,
                    "deadLettered": c.dead_lettered,
                    "filter": c.filter,
                    "missed": list(self.missed.get(name, ())),
                }
                for name, c in sorted(self.subscriptions.items())
            ],
            "oldest": list(self.oldest),
            "merged": self.merged,
            "evaluatedTime": evaluated_time,
        }

    @classmethod
    def from_document(cls, doc: dict[str, Any]) -> BucketResult:
        """Inverse of to_document."""
        return cls(
            topic=doc["topic"],
            start=doc["bucketStart"],
            published=int(doc["published"]),
            subscriptions={
                s["name"]: BucketCounts(
                    int(s["received"]),
                    int(s["duplicates"]),
                    int(s["unmatched"]),
                    None if s.get("expected") is None else int(s["expected"]),
                    int(s.get("filtered", 0)),
                    int(s.get("deadLettered", 0)),
                    str(s.get("filter", "")),
                )
                for s in doc.get("subscriptions", [])
            },
            merged=int(doc.get("merged", 0)),
            missed={s["name"]: _strings(s.get("missed")) for s in doc.get("subscriptions", [])},
            oldest=_strings(doc.get("oldest")),
        )


def _strings(value: Any) -> tuple[str, ...]:
    return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) else ()
