"""Collections named by time, so that what is new is a whole collection and retention a drop.

FerretDB 1.24 reads a whole collection for any filter (even `{_id: x}`), and for any update or
delete. So the exporter's collections are cut by time and it only ever inserts into them,
reads one whole, renames one, or drops one:

- The journal: writers insert into `EventJournal_<slot>_<key>` (their clock, JOURNAL_SLOT_MS
  slots, so no one collection grows without bound while no exporter runs; `key` the topic's
  journal key, so the exporter replica that holds a topic's lease takes only that topic's
  journal). Every evaluation takes each by renaming it to `EventJournalTaken_<key>_<ms>_<token>`
  (a writer's next insert creates the name afresh; one racing the rename on FerretDB 1.24 gets
  its connection reset and retries), folds it whole, renames it
  `EventJournalFolded_<key>_<ms>_<token>_<documents>` (so a restarted exporter does not fold it
  again), and drops it once no straggling insert can still land in it.
- Digest deltas and bucket results: `BucketDigest_<ms>` and `BucketResult_<ms>`, one per
  PARTITION_MS of bucket start; pruning drops the ones no window reaches.
- Publish records and receipts: `PublishRecord_<ms>` and `ReceivedRecord_<ms>`, one per hour
  of publish time; retention drops the hours past it (a delete on FerretDB reads the whole
  collection while it holds SQLite's write lock: every writer waits).

Names use '_', not '.': FerretDB's renameCollection refuses a dot in a collection name. On
MongoDB the same names are indexed where they are filtered (`digest`), and rename and drop
are as cheap.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from datetime import datetime

from eventaudit.contract import PUBLISH_TIME_TOLERANCE, epoch_ms
from eventaudit.records import (
    BUCKET_COLLECTION,
    DEAD_LETTER_COLLECTION,
    DIGEST_COLLECTION,
    JOURNAL_COLLECTION,
    LEASE_COLLECTION,
    PUBLISH_COLLECTION,
    RECEIVED_COLLECTION,
)

JOURNAL_SLOT_MS = 10_000
"""A writer's journal collection changes every 10 s of its clock."""
PARTITION_MS = 600_000
"""Digests and results: one collection per 10 minutes of bucket start."""
LEASE_SLOT_MS = 15_000
"""Topic lease documents: one collection per 15 s of renewal time."""
RECORD_PARTITION_MS = 3_600_000
"""Publish records and receipts: one collection per hour of publish time."""
TAKEN_JOURNAL = "EventJournalTaken"
FOLDED_JOURNAL = "EventJournalFolded"

JOURNAL_KEYS = 8
"""Topics are journaled, and leased to exporter replicas, in this many groups (a topic's group
is its name's SHA-256 modulo it): the catalog operations the journal costs (a create, two
renames and a drop per key every 10 s) stay flat in the number of topics (bench/catalog.py),
and at most this many replicas share the work."""
JOURNAL_KEY_HEX = 12
"""A journal key, as it is written in collection names: its group number in 12 hex digits."""
_KEY = rf"[0-9a-f]{{{JOURNAL_KEY_HEX}}}"
_LIVE = re.compile(rf"{JOURNAL_COLLECTION}_-?[0-9]{{1,15}}_({_KEY})")
_TAKEN = re.compile(rf"{TAKEN_JOURNAL}_(({_KEY})_-?[0-9]{{1,15}}_[0-9a-f]{{8}})")
_FOLDED = re.compile(rf"{FOLDED_JOURNAL}_(({_KEY})_-?[0-9]{{1,15}}_[0-9a-f]{{8}})_([0-9]{{1,12}})")
_PARTITIONED = re.compile(
    rf"({DIGEST_COLLECTION}|{BUCKET_COLLECTION}|{PUBLISH_COLLECTION}|{RECEIVED_COLLECTION}"
    rf"|{DEAD_LETTER_COLLECTION}|{LEASE_COLLECTION})"
    r"_(-?[0-9]{1,15})"
)
_SPANS = {
    DIGEST_COLLECTION: PARTITION_MS,
    BUCKET_COLLECTION: PARTITION_MS,
    PUBLISH_COLLECTION: RECORD_PARTITION_MS,
    RECEIVED_COLLECTION: RECORD_PARTITION_MS,
    DEAD_LETTER_COLLECTION: RECORD_PARTITION_MS,
    LEASE_COLLECTION: LEASE_SLOT_MS,
}
RECORD_PREFIXES = (PUBLISH_COLLECTION, RECEIVED_COLLECTION, DEAD_LETTER_COLLECTION)
"""Hourly record collections: retention drops the hours past it."""
_TOLERANCE_MS = int(PUBLISH_TIME_TOLERANCE.total_seconds() * 1000)


def journal_key(topic: str) -> str:
    """The key of `topic`'s journal collections and of its exporter lease: its group. Topic
    ids may hold characters collection names cannot (and be 255 long): the key never does."""
    group = int.from_bytes(hashlib.sha256(topic.encode()).digest()[:8], "big") % JOURNAL_KEYS
    return f"{group:0{JOURNAL_KEY_HEX}x}"


def journal_collection(now: datetime, key: str) -> str:
    """Where a writer journals at `now` (its clock) the entries of topics of journal `key`."""
    return f"{_named(JOURNAL_COLLECTION, epoch_ms(now), JOURNAL_SLOT_MS)}_{key}"


def is_live_journal(name: str) -> bool:
    """A collection writers insert into, of one journal key."""
    return _LIVE.fullmatch(name) is not None


def journal_key_of(name: str) -> str | None:
    """The journal key of a live, taken or folded journal collection; None for any other
    name."""
    match = _LIVE.fullmatch(name)
    if match is not None:
        return match.group(1)
    match = _TAKEN.fullmatch(name) or _FOLDED.fullmatch(name)
    return None if match is None else match.group(2)


def taken_journal(now: datetime, token: str, key: str) -> str:
    """The name a live journal collection of `key` is renamed to when an exporter takes it."""
    return f"{TAKEN_JOURNAL}_{key}_{epoch_ms(now)}_{token}"


def folded_journal(taken: str, documents: int) -> str:
    """The name a taken journal collection gets once its `documents` are folded."""
    match = _TAKEN.fullmatch(taken) or _FOLDED.fullmatch(taken)
    if match is None:
        raise ValueError(f"not a taken journal collection: {taken!r}")
    return f"{FOLDED_JOURNAL}_{match.group(1)}_{documents}"


def is_taken_journal(name: str) -> bool:
    """A journal collection an exporter took (renamed), folded or not."""
    return _TAKEN.fullmatch(name) is not None or _FOLDED.fullmatch(name) is not None


def folded_documents(name: str) -> int | None:
    """How many documents a folded journal collection held when it was folded; None for a
    collection not (yet) folded."""
    match = _FOLDED.fullmatch(name)
    return None if match is None else int(match.group(3))


def lease_slot(renewed: datetime) -> str:
    """The lease collection a lease document (and its news) renewed at `renewed` goes to."""
    return _named(LEASE_COLLECTION, epoch_ms(renewed), LEASE_SLOT_MS)


def lease_slots(since: datetime, until: datetime) -> list[str]:
    """The lease collections of every slot from `since`'s to `until`'s."""
    first, last = epoch_ms(since), epoch_ms(until)
    first -= first % LEASE_SLOT_MS
    first = max(first, last - last % LEASE_SLOT_MS - 1000 * LEASE_SLOT_MS)  # 1000 at most
    return [f"{LEASE_COLLECTION}_{ms}" for ms in range(first, last + 1, LEASE_SLOT_MS)]


def bucket_partition(prefix: str, start: datetime) -> str:
    """The digest (prefix DIGEST_COLLECTION) or result (BUCKET_COLLECTION) collection that
    holds the bucket starting at `start`."""
    return _named(prefix, epoch_ms(start), PARTITION_MS)


def record_partition(prefix: str, publish_time: datetime, reference: datetime) -> str:
    """The publish record (prefix PUBLISH_COLLECTION) or receipt (RECEIVED_COLLECTION)
    collection a record goes to: the hour of its publish time, which every delivery of a
    message carries alike, so a redelivery finds its receipt and a retried batch its records.
    A publish time further ahead of `reference` than the tolerance (a broken clock) counts as
    the reference plus the tolerance, so retention reaches it. The reference is fixed for a
    record: a receipt's broker publish time (the subscriber keeps no publish time further
    from it anyway), a publish record's write time (its publish time is the publisher's own
    clock when it was made, so only a clock stepped back over an hour in between differs)."""
    ms = min(epoch_ms(publish_time), epoch_ms(reference) + _TOLERANCE_MS)
    return _named(prefix, ms, RECORD_PARTITION_MS)


def _named(prefix: str, ms: int, span: int) -> str:
    """The collection of `prefix` holding the `span` (ms) that `ms` falls in."""
    return f"{prefix}_{ms - ms % span}"


def partition_start(name: str, prefix: str) -> int | None:
    """The first bucket (or record) start (ms) a partition of `prefix` holds; None for other
    names."""
    match = _PARTITIONED.fullmatch(name)
    if match is None or match.group(1) != prefix:
        return None
    return int(match.group(2))


def _starts(names: Iterable[str], prefix: str) -> list[tuple[int, str]]:
    """(first start, name) of every partition of `prefix`, oldest first."""
    starts = ((partition_start(n, prefix), n) for n in names)
    return sorted((s, n) for s, n in starts if s is not None)


def partitions_of(names: Iterable[str], prefix: str) -> list[str]:
    """Every partition of `prefix`, oldest first."""
    return [n for _, n in _starts(names, prefix)]


def partitions_since(names: Iterable[str], prefix: str, since: datetime) -> list[str]:
    """Partitions of `prefix` that hold some bucket (or record) starting at or after `since`,
    oldest first."""
    edge, span = epoch_ms(since), _SPANS[prefix]
    return [n for s, n in _starts(names, prefix) if s + span > edge]


def partitions_before(names: Iterable[str], prefix: str, before: datetime) -> list[str]:
    """Partitions of `prefix` whose every bucket (or record) starts before `before`."""
    edge, span = epoch_ms(before), _SPANS[prefix]
    return [n for s, n in _starts(names, prefix) if s + span <= edge]
