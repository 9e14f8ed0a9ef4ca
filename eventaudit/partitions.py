"""Collections named by time, so that what is new is a whole collection and retention a drop.

FerretDB 1.24 reads a whole collection for any filter (even `{_id: x}`), and for any update or
delete. So the exporter's collections are cut by time and it only ever inserts into them,
reads one whole, renames one, or drops one:

- The journal: writers insert into `EventJournal_<slot>` (their clock, JOURNAL_SLOT_MS
  slots, so no one collection grows without bound while no exporter runs). The exporter takes
  each by renaming it to `EventJournalTaken_<ms>_<token>` (a writer's next insert creates the
  name afresh), folds it whole, and drops it once no straggling insert can still land in it.
- Digest deltas and bucket results: `BucketDigest_<ms>` and `BucketResult_<ms>`, one per
  PARTITION_MS of bucket start; pruning drops the ones no window reaches.

Names use '_', not '.': FerretDB's renameCollection refuses a dot in a collection name. On
MongoDB the same names are indexed where they are filtered (`digest`), and rename and drop
are as cheap.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import datetime

from eventaudit.contract import epoch_ms
from eventaudit.records import BUCKET_COLLECTION, DIGEST_COLLECTION, JOURNAL_COLLECTION

JOURNAL_SLOT_MS = 10_000
"""A writer's journal collection changes every 10 s of its clock."""
PARTITION_MS = 600_000
"""Digests and results: one collection per 10 minutes of bucket start."""
TAKEN_JOURNAL = "EventJournalTaken"

_LIVE = re.compile(rf"{JOURNAL_COLLECTION}(_-?[0-9]{{1,15}})?")
_TAKEN = re.compile(rf"{TAKEN_JOURNAL}_[0-9]{{1,15}}_[0-9a-f]{{8}}")
_BUCKETS = re.compile(rf"({DIGEST_COLLECTION}|{BUCKET_COLLECTION})_(-?[0-9]{{1,15}})")


def journal_collection(now: datetime) -> str:
    """Where a writer journals at `now` (its clock)."""
    ms = epoch_ms(now)
    return f"{JOURNAL_COLLECTION}_{ms - ms % JOURNAL_SLOT_MS}"


def is_live_journal(name: str) -> bool:
    """A collection writers insert into (the unsliced `EventJournal` of earlier releases too)."""
    return _LIVE.fullmatch(name) is not None


def taken_journal(now: datetime, token: str) -> str:
    """The name a live journal collection is renamed to when the exporter takes it."""
    return f"{TAKEN_JOURNAL}_{epoch_ms(now)}_{token}"


def is_taken_journal(name: str) -> bool:
    """A journal collection an exporter took (renamed): folded, then dropped."""
    return _TAKEN.fullmatch(name) is not None


def bucket_partition(prefix: str, start: datetime) -> str:
    """The digest (prefix DIGEST_COLLECTION) or result (BUCKET_COLLECTION) collection that
    holds the bucket starting at `start`."""
    ms = epoch_ms(start)
    return f"{prefix}_{ms - ms % PARTITION_MS}"


def partition_start(name: str, prefix: str) -> int | None:
    """The first bucket start (ms) a partition of `prefix` holds; None for other names."""
    match = _BUCKETS.fullmatch(name)
    if match is None or match.group(1) != prefix:
        return None
    return int(match.group(2))


def partitions_since(names: Iterable[str], prefix: str, since: datetime) -> list[str]:
    """Partitions of `prefix` that hold some bucket starting at or after `since`, oldest
    first."""
    edge = epoch_ms(since)
    starts = ((partition_start(n, prefix), n) for n in names)
    return [
        n for s, n in sorted((s, n) for s, n in starts if s is not None) if s + PARTITION_MS > edge
    ]


def partitions_before(names: Iterable[str], prefix: str, before: datetime) -> list[str]:
    """Partitions of `prefix` whose every bucket starts before `before`."""
    edge = epoch_ms(before)
    starts = ((partition_start(n, prefix), n) for n in names)
    return sorted(n for s, n in starts if s is not None and s + PARTITION_MS <= edge)
