"""What is new in the journal, for one exporter process: take it, read it, say it is folded.

The evaluator sees only that. Behind it is the layout's mechanics (eventaudit.partitions):
each take renames the live journal collections of the keys held to taken ones; a taken
collection read whole is renamed folded (with how many documents it held, so a restarted
process does not fold it again) and dropped JOURNAL_DROP_GRACE later. On FerretDB 1.24 an
insert that looked a collection up before its rename can still commit into it afterwards
(SQLite's busy timeout, 10 s): each folded collection is counted again at each take until
one does so STRAGGLER_CHECK after its read, and at the grace; what grew is taken again (its
new documents only), so a receipt made durable before its bucket settled is never reported
missed (issue 17, case 9). On MongoDB a rename excludes inserts: only the grace's count is
made (`journal_stragglers`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from eventaudit.journal import JournalBatch
from eventaudit.partitions import folded_documents, journal_key_of

log = logging.getLogger(__name__)

JOURNAL_DROP_GRACE = 120.0
"""Seconds a folded journal collection is kept before it is dropped: many times the longest
a straggling insert can take to commit into it after its rename."""
STRAGGLER_CHECK = 10.0
"""Seconds after its read by which a folded collection has been counted again (FerretDB)."""


class JournalCollections(Protocol):
    """The store's journal collections (MongoStore; the tests' MemoryStore)."""

    @property
    def journal_stragglers(self) -> bool:
        """Whether an insert can land in a collection after it was taken (FerretDB)."""
        ...

    def journal_keys(self) -> set[str]:
        """The journal keys of every live or taken journal collection (topics written to)."""
        ...

    def take_journal(self, now: datetime, keys: Collection[str] | None = None) -> list[str]:
        """Rename the live journal collections of `keys` (None: all) to taken ones; every
        taken or folded one of those keys, oldest first."""
        ...

    def read_journal(self, name: str) -> Iterator[JournalBatch]:
        """Every document of a taken journal collection."""
        ...

    def count_journal(self, name: str) -> int:
        """How many documents a taken journal collection holds."""
        ...

    def mark_folded(self, name: str, documents: int) -> str:
        """Rename a taken collection folded, with how many documents it held; the new name."""
        ...

    def drop_journal(self, name: str) -> None:
        """Drop a folded journal collection."""
        ...


@dataclass
class Taken:
    """Part of the journal taken by an evaluation: read it whole, then say it is folded."""

    key: str
    """the journal key (topics) it holds entries of"""
    name: str
    skip: frozenset[Any] = frozenset()
    """documents folded already (a collection taken again because it grew)"""
    documents: int = 0
    """documents read so far (skipped ones included)"""
    ids: set[Any] = field(default_factory=set)
    """ids of the documents read so far"""


@dataclass(frozen=True, slots=True)
class _Folded:
    documents: int
    read_at: float
    """monotonic time it was read"""
    ids: frozenset[Any] = frozenset()
    """the ids this process folded (none known for one an earlier process folded)"""
    checked: bool = False
    """counted again STRAGGLER_CHECK or more after its read: no straggler can come now"""


class JournalReader:
    """The journal as one exporter process reads it (a store can serve several in tests)."""

    def __init__(self, store: JournalCollections, monotonic: Callable[[], float]) -> None:
        self._store = store
        self._monotonic = monotonic
        self._folded: dict[str, _Folded] = {}
        self._lock = threading.Lock()
        self.stragglers = 0
        """documents that landed in a collection after it was read, taken again (a counter)"""

    def keys(self) -> set[str]:
        """The journal keys of the topics written to (a listing of the journal). Raises
        StoreError."""
        return self._store.journal_keys()

    def take(self, now: datetime, keys: Collection[str] | None = None) -> list[Taken]:
        """What is new in the journal of `keys` (None: every key): whatever is not folded
        yet, this take's and earlier ones', and what landed after a read. Drops folded
        collections past the grace. Raises StoreError."""
        names = self._store.take_journal(now, keys)
        self._folded = {n: f for n, f in self._folded.items() if n in names}
        new: list[Taken] = []
        found = set()
        for name in names:
            key = journal_key_of(name)
            if key is None:
                continue
            documents = folded_documents(name)
            if documents is None:
                new.append(Taken(key, name))
            elif name not in self._folded:
                # Folded by an earlier process (or by this one before a failure): its count
                # is in its name, as if read now (counted again from the next take on).
                self._folded[name] = _Folded(documents, self._monotonic())
                found.add(name)
        return self._grown(found) + new

    def _grown(self, found: set[str]) -> list[Taken]:
        """Folded collections that grew since they were read, but those `found` by this take;
        drop those past the grace."""
        grown = []
        for name, folded in list(self._folded.items()):
            if name in found:
                continue
            age = self._monotonic() - folded.read_at
            if age < JOURNAL_DROP_GRACE and (folded.checked or not self._store.journal_stragglers):
                continue
            documents = self._store.count_journal(name)
            if age >= STRAGGLER_CHECK:
                self._folded[name] = folded = _Folded(
                    folded.documents, folded.read_at, folded.ids, checked=True
                )
            if documents == folded.documents:
                if age >= JOURNAL_DROP_GRACE:
                    self._store.drop_journal(name)
                    del self._folded[name]
                continue
            with self._lock:
                self.stragglers += documents - folded.documents
            log.warning("journal %s grew after it was taken: taking it again", name)
            key = journal_key_of(name)
            assert key is not None  # listed by key
            grown.append(Taken(key, name, folded.ids))
        return grown

    def read(self, taken: Taken) -> Iterator[JournalBatch]:
        """The documents of `taken` not folded yet; counts every one read."""
        for batch in self._store.read_journal(taken.name):
            taken.documents += 1
            if batch.id is not None:
                if batch.id in taken.ids:
                    continue  # the same document twice in one read (a retried insert)
                taken.ids.add(batch.id)
                if batch.id in taken.skip:
                    continue
            yield batch

    def folded(self, taken: Taken) -> None:
        """`taken` was read whole and folded. Raises StoreError."""
        self._folded.pop(taken.name, None)
        name = self._store.mark_folded(taken.name, taken.documents)
        self._folded[name] = _Folded(
            taken.documents, self._monotonic(), frozenset(taken.ids | taken.skip)
        )

    @property
    def folded_names(self) -> frozenset[str]:
        """Folded collections waiting for the grace to drop."""
        return frozenset(self._folded)
