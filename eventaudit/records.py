"""Record types written by publishers and subscribers, and their MongoDB documents."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

PUBLISH_COLLECTION = "PublishRecord"
RECEIVED_COLLECTION = "ReceivedRecord"
DEAD_LETTER_COLLECTION = "DeadLetterRecord"
BUCKET_COLLECTION = "BucketResult"
STATE_COLLECTION = "ExporterState"
"""The exporter's small state, one document each: the fold stamp, subscription tenures
(`tenure|...`), lease claims (`claim|...`) and replica heartbeats (`replica|...`)."""
# Missed events a bucket result lists per subscription (the API's default page).
MISSED_KEPT = 100
JOURNAL_COLLECTION = "EventJournal"
DIGEST_COLLECTION = "BucketDigest"
LEASE_COLLECTION = "ExporterLease"
"""Prefix of the lease collections, one per LEASE_SLOT_MS of renewal time: lease documents,
and the results told with them (news)."""


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
    options: str = "{}"
    """The Options attribute it was published with."""

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
            "options": self.options,
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
    delivery_attempt: int | None = None
    """Pub/Sub's count of this delivery (subscriptions with a dead-letter policy); for a dead
    letter, the delivery attempts on `subscription` before it was dead-lettered."""
    dead_letter_subscription: str = ""
    """Set on a dead letter: the subscription of the dead-letter topic it was received on.
    `subscription` and `topic` are then the ones it was dead-lettered from."""

    def fields(self) -> dict[str, Any]:
        """What a receipt and a dead-letter record both store of the delivery."""
        return {
            "subscription": self.subscription,
            "eventID": self.event_id,
            "topic": self.topic,
            "traceID": self.trace_id,
            "messageId": self.message_id,
            "publishTime": self.publish_time,
        }

    @property
    def dead_letter(self) -> bool:
        """Not a delivery to `subscription`: Pub/Sub gave up on it and moved it to the
        dead-letter topic."""
        return bool(self.dead_letter_subscription)


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

    @property
    def heard(self) -> bool:
        """Whether the subscription had any receipt or dead letter in the bucket."""
        return bool(self.received or self.unmatched or self.filtered or self.dead_lettered)


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


@dataclass(frozen=True, slots=True)
class Tenure:
    """When a subscription of a topic was first seen, and when it stopped being listed. Stored,
    so that a restart neither forgets a deletion nor takes an old subscription for a new one."""

    topic: str
    subscription: str
    since: datetime | None
    """first listed or configured (or the publish time of its first receipt, when earlier);
    None: seen at the exporter's first evaluation on this database, expected from the start"""
    until: datetime | None = None
    """the last time Pub/Sub listed it, once it no longer does (deleted or detached)"""
    filter: str | None = ""
    """its filter as last listed ("": none; None: never read)"""
    seen: datetime | None = None
    """when it was first listed or configured (`since` may be earlier: an earlier receipt)"""
    listed: datetime | None = None
    """the last listing that showed it, stored every few minutes"""

    def to_document(self) -> dict[str, Any]:
        """The `SubscriptionTenure` document."""
        return {
            "_id": f"{self.topic}|{self.subscription}",
            "topic": self.topic,
            "subscription": self.subscription,
            "since": self.since,
            "until": self.until,
            "filter": self.filter,
            "seen": self.seen,
            "listed": self.listed,
        }

    @classmethod
    def from_document(cls, doc: dict[str, Any]) -> Tenure | None:
        """Inverse of to_document; None for a document that is not one (times must be between
        1970 and 9000: a stored time near datetime's limits would overflow the arithmetic)."""
        topic, sub, text = doc.get("topic"), doc.get("subscription"), doc.get("filter", "")
        times = [doc.get(k) for k in ("since", "until", "seen", "listed")]
        if not isinstance(topic, str) or not isinstance(sub, str):
            return None
        if not (text is None or isinstance(text, str)):
            return None
        if not all(
            t is None or (isinstance(t, datetime) and t.tzinfo and _SANE <= t < _INSANE)
            for t in times
        ):
            return None
        return cls(topic, sub, times[0], times[1], text, times[2], times[3])


_SANE = datetime(1970, 1, 1, tzinfo=UTC)
_INSANE = datetime(9000, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Lease:
    """Which exporter replica evaluates the topics of one journal key, until when, under which
    epoch (each new holder claims the next epoch; a replica that finds its epoch's successor
    claimed writes nothing more for the key: fencing). The holder also says what it stored,
    so that the other replicas read only the result partitions it wrote to."""

    key: str
    epoch: int
    owner: str
    expires: datetime
    topics: tuple[str, ...] = ()
    """the key's topics, as its holder knows them"""
    written: dict[int, tuple[int, int]] = field(default_factory=dict)
    """result partition start (ms) -> the (epoch, version) of the latest results stored there"""
    renewed: datetime | None = None
    """when its holder wrote it (of two writes of one epoch, the later counts)"""
    seq: int = 0
    """the holder's count of its lease writes (orders two writes of one millisecond)"""
    prev: int = 0
    """`seq` of the holder's previous write of this key's lease (0: none): a reader that
    has read that one and every later one has missed nothing in between"""
    recent: tuple[dict[str, Any], ...] = ()
    """the result documents the holder stored since its previous write of this lease (stored
    apart, in `ExporterNews_<slot>`: only readers that have not read them yet read them)"""
    complete: bool = True
    """whether `recent` holds all of them (else readers read the partitions `written` names)"""
    told: int = 0
    """how many results this write carries (read back: `recent` comes from the news apart)"""

    @property
    def order(self) -> tuple[int, int]:
        """Which of a key's lease documents counts: the latest epoch, then its holder's latest
        write (one process writes an epoch's leases; its count never steps back, its clock
        might)."""
        return self.epoch, self.seq

    def to_document(self) -> dict[str, Any]:
        """An `ExporterLease_<slot>` document: one is inserted at every renewal (an insert
        reads nothing, on FerretDB too), and the latest of a key counts."""
        renewed = self.renewed or self.expires
        return {
            "_id": f"{self.key}|{self.epoch}|{self.seq}|{self.owner}",
            "key": self.key,
            "renewed": renewed,
            "seq": self.seq,
            "prev": self.prev,
            "complete": self.complete,
            "told": len(self.recent) if self.recent else self.told,
            "epoch": self.epoch,
            "owner": self.owner,
            "expires": self.expires,
            "topics": list(self.topics),
            # Strings: FerretDB stores no nested arrays.
            "written": [f"{ms}:{e}:{v}" for ms, (e, v) in sorted(self.written.items())],
        }

    @classmethod
    def from_document(cls, doc: dict[str, Any]) -> Lease | None:
        """Inverse of to_document; None for a document that is not one."""
        key, epoch, owner, expires = (doc.get(k) for k in ("key", "epoch", "owner", "expires"))
        topics, written, renewed = doc.get("topics", []), doc.get("written", []), doc.get("renewed")
        seq, prev, complete = doc.get("seq", 0), doc.get("prev", 0), doc.get("complete", True)
        told = doc.get("told", 0)
        if not (
            isinstance(told, int)
            and _count(told)
            and isinstance(key, str)
            and isinstance(seq, int)
            and _count(seq)
            and isinstance(prev, int)
            and _count(prev)
            and isinstance(complete, bool)
            and isinstance(renewed, datetime)
            and renewed.tzinfo
            and _SANE <= renewed < _INSANE
            and isinstance(epoch, int)
            and _count(epoch)
            and epoch < 2**62
            and isinstance(owner, str)
            and isinstance(expires, datetime)
            and expires.tzinfo
            and _SANE <= expires < _INSANE
            and isinstance(topics, list)
            and all(isinstance(t, str) for t in topics)
            and isinstance(written, list)
            and len(written) <= MAX_WRITTEN
        ):
            return None
        parsed = [_counts(w) for w in written]
        if any(p is None for p in parsed):
            return None
        return cls(
            key,
            epoch,
            owner,
            expires,
            tuple(topics),
            {p[0]: (p[1], p[2]) for p in parsed if p is not None},
            renewed,
            seq,
            prev,
            (),
            complete,
            told,
        )


MAX_WRITTEN = 1024
"""Result partitions a lease may name (a week of 10-minute partitions; the window's are fewer)."""


def _counts(value: Any) -> tuple[int, int, int] | None:
    """`ms:epoch:version`, three ASCII decimal counts; None for anything else."""
    if not isinstance(value, str) or value.count(":") != 2 or len(value) > 64:
        return None
    parts = value.split(":")
    if not all(p.isascii() and p.isdigit() and len(p) <= 19 for p in parts):
        return None
    a, b, c = (int(p) for p in parts)
    return (a, b, c) if all(_count(x) for x in (a, b, c)) else None


def _count(value: Any) -> bool:
    """A non-negative integer below 2**63 (bson reads those past 32 bits back as Int64)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63
