"""The journal writers append to, and the per-bucket digests the exporter folds it into.

Every batch a publisher or subscriber writes is followed, once the records are durable, by one
journal document listing what the batch made true ("publish record of (topic, eventID) exists",
"receipt of (subscription, eventID) exists with N deliveries"). The exporter takes the journal
collections (eventaudit.partitions), reads each whole (only what is new), folds each entry into
the digest of its (topic, bucket), inserts what each digest gained as a delta document, and
drops a taken journal collection only once it is folded.

Folding is idempotent (a set union; deliveries keep their maximum, and a writer journals the
total stored after its write), so a journal document read twice, written twice, or folded by
an evaluation that failed half-way changes nothing the second time. Nothing depends on a clock:
a receipt written an hour late is folded into its bucket by the next evaluation.
"""

from __future__ import annotations

import functools
import itertools
import logging
import re
import sys
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

from eventaudit.contract import (
    EVENT_ID_PATTERN,
    MAX_EVENT_ATTRIBUTES_BYTES,
    PUBSUB_ID_PATTERN,
    decode_attributes,
    epoch_ms,
    from_epoch_ms,
    parse_ascii_int,
)
from eventaudit.filters import SubscriptionFilter
from eventaudit.records import MISSED_KEPT, BucketCounts, BucketResult

log = logging.getLogger(__name__)

# Bytes of entries per digest delta document before a fold's delta is split over more of them
# (a BSON document holds at most 16 MiB).
PART_BYTES = 4 * 2**20
_ENTRY_BYTES = 40  # an entry's BSON overhead, its integers and separators, rounded up


class JournalEntry(NamedTuple):
    """One fact a writer made durable. `subscription` None: a publish record. (A named tuple:
    the evaluator makes hundreds of thousands at once, and a frozen dataclass is several times
    slower to build.)"""

    topic: str
    event_id: str
    publish_ms: int
    subscription: str | None = None
    trace_id: str = ""
    deliveries: int = 0
    """A receipt's deliveries; a dead letter's delivery attempts before it was dead-lettered."""
    attributes: str = ""
    """A publish's own attributes, as `encode_attributes` wrote them."""
    dead_letter: bool = False
    """The event reached `subscription`'s dead-letter topic (not a receipt)."""
    alias_of: int | None = None
    """Set on an alias (no subscription): the eventID was published again at `publish_ms` (a
    caller's retry, within the hour) while its record says `alias_of`; deliveries of that
    message count for the event at `alias_of`."""

    def to_document(self) -> str:
        """Compact string form (FerretDB stores no nested arrays, and none of these fields but
        the last, a publish's attributes, can hold a '|'): `p|topic|eventID|traceID|publishMs`
        (then `|attributes` when it has some), `r|topic|subscription|eventID|publishMs|deliveries`,
        `d|topic|subscription|eventID|publishMs|attempts` or `a|topic|eventID|publishMs|aliasOf`."""
        if self.alias_of is not None:
            return f"a|{self.topic}|{self.event_id}|{self.publish_ms}|{self.alias_of}"
        if self.subscription is None:
            text = f"p|{self.topic}|{self.event_id}|{self.trace_id}|{self.publish_ms}"
            return f"{text}|{self.attributes}" if self.attributes else text
        kind = "d" if self.dead_letter else "r"
        return (
            f"{kind}|{self.topic}|{self.subscription}|{self.event_id}|{self.publish_ms}|"
            f"{self.deliveries}"
        )

    @classmethod
    def from_document(cls, doc: Any) -> JournalEntry | None:
        """Inverse of to_document; None for anything else (counted `malformed`, never raised:
        the journal is a shared collection anyone with write access can put things in)."""
        if not isinstance(doc, str) or len(doc) > _MAX_ENTRY:
            return None
        # One whole-string match per entry: the evaluator reads hundreds of thousands at once.
        if match := _PUBLISHED.fullmatch(doc):
            topic, event_id, trace_id, ms, attributes = match.groups()
            millis = int(ms)
            if _MIN_MS <= millis <= _MAX_MS and _attributes_ok(attributes or ""):
                return cls(topic, event_id, millis, None, trace_id, 0, attributes or "")
        elif match := _RECEIVED.fullmatch(doc):
            kind, topic, sub, event_id, ms, deliveries = match.groups()
            millis, count = int(ms), int(deliveries)
            if _MIN_MS <= millis <= _MAX_MS and 1 <= count < 2**31:
                return cls(topic, event_id, millis, sub, "", count, "", kind == "d")
        elif match := _ALIAS.fullmatch(doc):
            topic, event_id, ms, of = match.groups()
            millis, canonical = int(ms), int(of)
            if _MIN_MS <= millis <= _MAX_MS and _MIN_MS <= canonical <= _MAX_MS:
                return cls(topic, event_id, millis, alias_of=canonical)
        return None


_MAX_ENTRY = 1024 + MAX_EVENT_ATTRIBUTES_BYTES
_MILLIS = r"(-?[0-9]{1,15})"
_NOT_GOOG = r"(?![gG][oO][oO][gG])"  # Pub/Sub refuses ids starting with goog (any case)
_PUBLISHED = re.compile(
    rf"p\|{_NOT_GOOG}({PUBSUB_ID_PATTERN})\|({EVENT_ID_PATTERN})\|([0-9A-Za-z]{{0,64}})"
    rf"\|{_MILLIS}(?:\|(\{{.*\}}))?"
)
_ALIAS = re.compile(
    rf"a\|{_NOT_GOOG}({PUBSUB_ID_PATTERN})\|({EVENT_ID_PATTERN})\|{_MILLIS}\|{_MILLIS}"
)
_RECEIVED = re.compile(
    rf"([rd])\|{_NOT_GOOG}({PUBSUB_ID_PATTERN})\|{_NOT_GOOG}({PUBSUB_ID_PATTERN})"
    rf"\|({EVENT_ID_PATTERN})\|{_MILLIS}\|([0-9]{{1,10}})"
)


@functools.lru_cache(maxsize=4096)
def _attributes_ok(encoded: str) -> bool:
    """Whether a publish entry's attributes read back as attributes (decoded once per set)."""
    try:
        decode_attributes(encoded)
    except ValueError:
        return False
    return len(encoded.encode()) <= MAX_EVENT_ATTRIBUTES_BYTES


# Entries a writer puts in one journal document (it splits larger batches): a document with
# more is not one of ours, and is counted malformed whole rather than held in memory.
MAX_ENTRIES_PER_DOCUMENT = 5000


# Publish times BSON dates and Python datetimes can both hold (years 1..9999).
_MIN_MS = epoch_ms(datetime(1, 1, 2, tzinfo=UTC))
_MAX_MS = epoch_ms(datetime(9999, 12, 30, tzinfo=UTC))


@dataclass(frozen=True, slots=True)
class JournalBatch:
    """One journal document as read: its `_id`, the entries it holds, and how many of its
    entries were malformed."""

    id: Any
    entries: tuple[JournalEntry, ...]
    malformed: int = 0
    written: datetime | None = None
    """its `writtenTime`: the writer's clock when it wrote it"""


def journal_documents(
    batch_id: str, entries: Sequence[JournalEntry], now: datetime
) -> list[dict[str, Any]]:
    """The journal documents a writer inserts after a batch: MAX_ENTRIES_PER_DOCUMENT each."""
    step = MAX_ENTRIES_PER_DOCUMENT
    return [
        {
            "_id": f"{batch_id}-{i // step}",
            "writtenTime": now,
            "entries": [e.to_document() for e in entries[i : i + step]],
        }
        for i in range(0, len(entries), step)
    ]


def parse_journal_document(doc: dict[str, Any]) -> JournalBatch:
    """A journal document as read; never raises on content."""
    raw = doc.get("entries")
    items = raw if isinstance(raw, list) else []
    if len(items) > MAX_ENTRIES_PER_DOCUMENT:
        return JournalBatch(doc.get("_id"), (), len(items))
    entries = [JournalEntry.from_document(item) for item in items]
    good = tuple(e for e in entries if e is not None)
    malformed = len(entries) - len(good) + (0 if isinstance(raw, list) else 1)
    written = doc.get("writtenTime")
    if isinstance(written, datetime):
        written = written if written.tzinfo else written.replace(tzinfo=UTC)
    else:
        written = None
    return JournalBatch(doc.get("_id"), good, malformed, written)


def digest_key(topic: str, start: datetime) -> str:
    """What every delta document of one (topic, bucket) digest carries in `digest`; topic ids
    never contain '|'."""
    return f"{topic}|{epoch_ms(start)}"


@dataclass(frozen=True, slots=True)
class MissedEvent:
    """A published event without a receipt on the subscription asked about."""

    event_id: str
    trace_id: str
    publish_time: datetime
    dead_letter_attempts: int | None = None
    """Delivery attempts before Pub/Sub moved it to the dead-letter topic; None: lost."""


@dataclass
class BucketDigest:
    """Every event id of one (topic, bucket): published ones with their trace id and publish
    time, received ones per subscription with their deliveries. Each entry also keeps when it
    was folded in (`merged`, the evaluation's clock in ms), so the API can list exactly what a
    given evaluation counted.

    It is stored as deltas, never rewritten: each fold inserts what it added (`deltas`), and
    reading a digest is the union of its deltas (`from_documents`). An insert needs no read,
    even on FerretDB, where every other write by `_id` reads the whole collection.
    """

    topic: str
    start: datetime
    published: dict[str, tuple[str, int, int]] = field(default_factory=dict)
    """eventID -> (traceID, publishMs, merged)"""
    receipts: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)
    """subscription -> eventID -> (deliveries, merged)"""
    attributes: dict[str, str] = field(default_factory=dict)
    """eventID -> its own attributes (encoded), for the published events that have some"""
    dead: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)
    """subscription -> eventID -> (delivery attempts, merged): moved to its dead-letter topic"""
    aliases: dict[str, tuple[int, int]] = field(default_factory=dict)
    """eventID -> (publishMs of its record, merged): published again in this bucket (a
    caller's retry) while its record is in another; its receipts here count there"""
    unsaved_aliases: set[str] = field(default_factory=set)
    unsaved_published: set[str] = field(default_factory=set)
    unsaved_receipts: set[tuple[str, str]] = field(default_factory=set)
    unsaved_dead: set[tuple[str, str]] = field(default_factory=set)
    """What merges changed since the digest was last stored: the next delta."""

    def merge(self, entry: JournalEntry, merged: int) -> bool:
        """Fold one entry in; True when it changed the digest."""
        if entry.alias_of is not None:
            if entry.event_id in self.aliases:
                return False
            self.aliases[entry.event_id] = (entry.alias_of, merged)
            self.unsaved_aliases.add(entry.event_id)
            return True
        if entry.subscription is None:
            if entry.event_id in self.published:
                return False
            self.published[entry.event_id] = (entry.trace_id, entry.publish_ms, merged)
            if entry.attributes:
                self.attributes[entry.event_id] = sys.intern(entry.attributes)
            self.unsaved_published.add(entry.event_id)
            return True
        if entry.dead_letter:
            table, unsaved = self.dead, self.unsaved_dead
        else:
            table, unsaved = self.receipts, self.unsaved_receipts
        if not _raise(table, entry.subscription, entry.event_id, entry.deliveries, merged):
            return False
        unsaved.add((entry.subscription, entry.event_id))
        return True

    @property
    def unsaved(self) -> bool:
        """Whether merges changed it since it was stored."""
        return bool(
            self.unsaved_published
            or self.unsaved_receipts
            or self.unsaved_dead
            or self.unsaved_aliases
        )

    def forwards(self) -> list[JournalEntry]:
        """The receipts and dead letters of aliased events held here, as entries of the bucket
        of their publish record (folding them there again changes nothing)."""
        out = []
        for event_id, (ms, _) in self.aliases.items():
            for table, dead in ((self.receipts, False), (self.dead, True)):
                for sub, got in table.items():
                    if event_id in got:
                        count = got[event_id][0]
                        out.append(JournalEntry(self.topic, event_id, ms, sub, "", count, "", dead))
        return out

    def _expected(self, subscription_filter: SubscriptionFilter | None) -> set[str] | None:
        """The published events a subscription with this filter is sent; None: all of them."""
        if subscription_filter is None:
            return None
        attributes = self.attributes
        return {
            e for e in self.published if subscription_filter.matches_encoded(attributes.get(e, ""))
        }

    def result(
        self,
        filters: Mapping[str, SubscriptionFilter] | None = None,
        reported: Collection[str] | None = None,
    ) -> BucketResult:
        """The bucket's counts and the oldest MISSED_KEPT events each subscription missed;
        the oldest published events too (what a subscription without a receipt here missed)
        only when one of the `reported` subscriptions (None: any) has none here. That list
        is most of a result's size, and a result is stored again at each fold of its bucket.

        A subscription with a filter (in `filters`) is sent only the published events whose
        attributes match it: those are its `expected`; a receipt of one that does not match is
        `filtered` (the emulator delivers them; Pub/Sub never does), never `received`.
        `received` counts receipts of expected events, `unmatched` receipts without a publish
        record, `dead_lettered` expected events moved to the dead-letter topic and not received.
        """
        filters = filters or {}
        counts = {}
        merged = max(
            max((m for _, _, m in self.published.values()), default=0),
            max((m for _, m in self.aliases.values()), default=0),
        )
        by_age = sorted(self.published.items(), key=lambda kv: (kv[1][1], kv[0]))
        missed = {}
        aliases = self.aliases
        for sub in sorted(set(self.receipts) | set(self.dead) | set(filters)):
            got = self.receipts.get(sub, {})
            dead = self.dead.get(sub, {})
            if aliases:  # counted in the bucket of the event's record (forwards)
                got = {e: v for e, v in got.items() if e not in aliases}
                dead = {e: v for e, v in dead.items() if e not in aliases}
            subscription_filter = filters.get(sub)
            expected = self._expected(subscription_filter)
            wanted = self.published if expected is None else expected
            matched = sum(1 for event_id in got if event_id in wanted)
            published = (
                matched
                if expected is None
                else sum(1 for event_id in got if event_id in self.published)
            )
            counts[sub] = BucketCounts(
                received=matched,
                duplicates=sum(d - 1 for d, _ in got.values()),
                unmatched=len(got) - published,
                expected=None if expected is None else len(expected),
                filtered=published - matched,
                dead_lettered=sum(1 for e in dead if e in wanted and e not in got),
                filter=subscription_filter.text if subscription_filter else "",
            )
            merged = max(
                merged,
                max((m for _, m in got.values()), default=0),
                max((m for _, m in dead.values()), default=0),
            )
            missed[sub] = _listed(
                (kv, dead.get(kv[0])) for kv in by_age if kv[0] in wanted and kv[0] not in got
            )
        absent = reported is None or any(sub not in counts for sub in reported)
        return BucketResult(
            self.topic,
            self.start,
            len(self.published),
            counts,
            merged,
            missed,
            _listed((kv, None) for kv in by_age) if absent else (),
        )

    def missed(
        self,
        subscription: str,
        merged_by: int,
        subscription_filter: SubscriptionFilter | None = None,
    ) -> list[MissedEvent]:
        """Expected events without a receipt on `subscription`, as an evaluation whose merge
        time was `merged_by` saw them, oldest first; each says whether it was dead-lettered."""
        got = {
            e
            for e, (_, merged) in self.receipts.get(subscription, {}).items()
            if merged <= merged_by
        }
        dead = {
            e: attempts
            for e, (attempts, merged) in self.dead.get(subscription, {}).items()
            if merged <= merged_by
        }
        expected = self._expected(subscription_filter)
        return sorted(
            (
                MissedEvent(event_id, trace, from_epoch_ms(ms), dead.get(event_id))
                for event_id, (trace, ms, merged) in self.published.items()
                if merged <= merged_by
                and event_id not in got
                and (expected is None or event_id in expected)
            ),
            key=lambda e: (e.publish_time, e.event_id),
        )

    def counts_as_of(
        self,
        subscription: str,
        merged_by: int,
        subscription_filter: SubscriptionFilter | None = None,
    ) -> tuple[int, int]:
        """(expected, received on `subscription`) as the evaluation at `merged_by` saw them."""
        expected = self._expected(subscription_filter)
        published = {
            e
            for e, (_, _, m) in self.published.items()
            if m <= merged_by and (expected is None or e in expected)
        }
        got = self.receipts.get(subscription, {})
        return len(published), sum(
            1 for e, (_, m) in got.items() if m <= merged_by and e in published
        )

    def deltas(self, fold: str) -> list[dict[str, Any]]:
        """What merges changed since the digest was stored, as documents to insert (`_id`s
        unique per `fold`), each with at most about PART_BYTES of entries. Strings, like the
        journal's entries: `eventID|traceID|publishMs|merged` and
        `subscription|eventID|deliveries|merged` (a receipt's current deliveries); a publish
        with attributes has them last (`|{...}`), dead letters are `subscription|eventID|
        attempts|merged` in `dead`, aliases `eventID|publishMs|merged` in `aliases`."""
        key = digest_key(self.topic, self.start)
        docs: list[dict[str, Any]] = []
        part: dict[str, list[str]] = {"published": [], "receipts": [], "dead": [], "aliases": []}
        size = 0

        def add(kind: str, item: str) -> None:
            nonlocal size
            part[kind].append(item)
            size += len(item) + _ENTRY_BYTES
            if size >= PART_BYTES:
                close()

        def close() -> None:
            nonlocal part, size
            document: dict[str, Any] = {
                "_id": f"{key}|{fold}|{len(docs)}",
                "digest": key,
                "topic": self.topic,
                "bucketStart": self.start,
                "published": part["published"],
                "receipts": part["receipts"],
            }
            for optional in ("dead", "aliases"):
                if part[optional]:
                    document[optional] = part[optional]
            docs.append(document)
            part, size = {"published": [], "receipts": [], "dead": [], "aliases": []}, 0

        for event_id in self.unsaved_published:
            trace, ms, merged = self.published[event_id]
            attributes = self.attributes.get(event_id)
            item = f"{event_id}|{trace}|{ms}|{merged}"
            add("published", f"{item}|{attributes}" if attributes else item)
        for kind, unsaved, table in (
            ("receipts", self.unsaved_receipts, self.receipts),
            ("dead", self.unsaved_dead, self.dead),
        ):
            for sub, event_id in unsaved:
                count, merged = table[sub][event_id]
                add(kind, f"{sub}|{event_id}|{count}|{merged}")
        for event_id in self.unsaved_aliases:
            ms, merged = self.aliases[event_id]
            add("aliases", f"{event_id}|{ms}|{merged}")
        if any(part.values()):
            close()
        return docs

    def stored(self) -> None:
        """Its deltas are stored: nothing is unsaved any more."""
        self.unsaved_published.clear()
        self.unsaved_receipts.clear()
        self.unsaved_dead.clear()
        self.unsaved_aliases.clear()

    @classmethod
    def from_documents(
        cls, topic: str, start: datetime, docs: Iterable[dict[str, Any] | None]
    ) -> BucketDigest:
        """The union of a digest's deltas, in any order: a publish keeps its first fold, a
        receipt its most deliveries and first fold (a delta stored twice changes nothing)."""
        digest = cls(topic, start)
        for doc in docs:
            if doc is None:
                continue
            bad = 0
            for item in _strings_in(doc, "published"):
                item, _, attributes = (
                    item.partition("|{") if isinstance(item, str) else (item, "", "")
                )
                attributes = "{" + attributes if attributes else ""
                fields = _ints(item, 4, first_ints=2)
                if (
                    fields is None
                    or not (_MIN_MS <= int(fields[2]) <= _MAX_MS)
                    or int(fields[3]) < 0
                    or not _attributes_ok(attributes)
                ):
                    bad += 1
                    continue
                event_id, trace, ms, merged = str(fields[0]), str(fields[1]), *map(int, fields[2:])
                before = digest.published.get(event_id)
                if before is None or merged < before[2]:
                    digest.published[event_id] = (trace, ms, merged)
                if attributes:
                    digest.attributes[event_id] = sys.intern(attributes)
            bad += _read_counted(doc, "receipts", digest.receipts)
            bad += _read_counted(doc, "dead", digest.dead)
            for item in _strings_in(doc, "aliases"):
                fields = _ints(item, 3, first_ints=1)
                if fields is None or not _MIN_MS <= int(fields[1]) <= _MAX_MS:
                    bad += 1
                    continue
                event_id, ms, merged = str(fields[0]), int(fields[1]), int(fields[2])
                alias = digest.aliases.get(event_id)
                if alias is None or merged < alias[1]:
                    digest.aliases[event_id] = (ms, merged)
            if bad:
                # Only the exporter writes digests: someone else did. Logged, never raised (it
                # would stop every evaluation).
                log.error("digest delta %s: %d unreadable entries skipped", doc.get("_id"), bad)
        return digest


def _raise(
    table: dict[str, dict[str, tuple[int, int]]],
    subscription: str,
    event_id: str,
    count: int,
    merged: int,
) -> bool:
    """Fold (count, merged) into a receipt or dead letter: the most deliveries (or attempts),
    the first fold. True when it changed."""
    got = table.setdefault(subscription, {})
    before = got.get(event_id)
    if before is not None and count <= before[0]:
        if merged >= before[1]:
            return False
        count = before[0]
    got[event_id] = (count, merged if before is None else min(merged, before[1]))
    return True


def _read_counted(
    doc: dict[str, Any], name: str, table: dict[str, dict[str, tuple[int, int]]]
) -> int:
    """Read a delta's `subscription|eventID|count|merged` items into `table`; how many were
    unreadable."""
    bad = 0
    for item in _strings_in(doc, name):
        fields = _ints(item, 4, first_ints=2)
        if fields is None or not (1 <= int(fields[2]) < 2**31) or int(fields[3]) < 0:
            bad += 1
            continue
        _raise(table, str(fields[0]), str(fields[1]), int(fields[2]), int(fields[3]))
    return bad


def _listed(
    events: Iterable[tuple[tuple[str, tuple[str, int, int]], tuple[int, int] | None]],
) -> tuple[str, ...]:
    """The first MISSED_KEPT of ((eventID, (traceID, publishMs, merged)), dead letter or None),
    as result strings: `eventID|traceID|publishMs`, then `|attempts` when dead-lettered."""
    return tuple(
        f"{e}|{trace}|{ms}|{dead[0]}" if dead else f"{e}|{trace}|{ms}"
        for (e, (trace, ms, _)), dead in itertools.islice(events, MISSED_KEPT)
    )


def parse_listed(item: str) -> MissedEvent | None:
    """A missed event as a bucket result lists it; None if it is not one."""
    fields = (
        _ints(item, 4, first_ints=2) if isinstance(item, str) and item.count("|") == 3 else None
    )
    if fields is not None:
        if not 1 <= int(fields[3]) < 2**31:
            return None
        attempts: int | None = int(fields[3])
    else:
        fields, attempts = _ints(item, 3, first_ints=2), None
    if fields is None or not _MIN_MS <= int(fields[2]) <= _MAX_MS:
        return None
    return MissedEvent(str(fields[0]), str(fields[1]), from_epoch_ms(int(fields[2])), attempts)


def _strings_in(doc: dict[str, Any], name: str) -> list[Any]:
    items = doc.get(name)
    return items if isinstance(items, list) else []


def _ints(item: Any, n: int, first_ints: int) -> list[str | int] | None:
    """`item` split on '|' into `n` fields, the last `n - first_ints` as integers; None if it
    is not that."""
    if not isinstance(item, str):
        return None
    fields: list[str | int] = list(item.split("|"))
    if len(fields) != n:
        return None
    for i in range(first_ints, n):
        text = str(fields[i])
        value = parse_ascii_int(text.removeprefix("-"), max_digits=15)
        if value is None:
            return None
        fields[i] = -value if text.startswith("-") else value
    return fields
