"""What the other exporter replicas stored: each replica serves every topic, but folds only
the keys it holds; the results of the others' keys it reads as their holders store them.

A holder's lease writes form a chain (seq, prev) and carry the results stored since the
previous one (its news): a replica that read the whole chain since its last read takes the
results from it; one that missed a link (or a write too large to carry them all) reads the
result partitions the lease names as written since. A key whose holder changed is read whole
(the last writes of the one before may never have been announced).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from eventaudit.contract import PUBLISH_TIME_TOLERANCE, epoch_ms
from eventaudit.partitions import PARTITION_MS
from eventaudit.records import Lease
from eventaudit.store import EvaluatorStore, StoredResult, parse_result


class Following:
    """Per key held by another replica: which of its holder's writes were read."""

    def __init__(self, store: EvaluatorStore) -> None:
        self._store = store
        self._holder: dict[str, tuple[str, int]] = {}
        """the (owner, epoch) whose writes are followed"""
        self._written: dict[str, dict[int, tuple[int, int]]] = {}
        """the latest (epoch, version) read per result partition"""
        self._seq: dict[str, int] = {}
        """the seq of the holder's last lease write read"""

    def start(self, others: Mapping[str, Lease]) -> None:
        """Every stored result is read now (a process's first pass): follow each holder from
        these leases (read before that)."""
        for key, lease in others.items():
            self._follow(key, lease)

    def forget(self, key: str) -> None:
        """This replica holds `key` now."""
        self._holder.pop(key, None)
        self._written.pop(key, None)
        self._seq.pop(key, None)

    def read(
        self,
        others: Mapping[str, Lease],
        entries: Mapping[str, list[Lease]],
        oldest: datetime,
        now: datetime,
    ) -> list[StoredResult]:
        """What the holders of `others` (each key's latest lease) stored since the last read;
        `entries`: every lease write read of each key, with the results it told."""
        whole: set[str] = set()
        stale: dict[int, set[str]] = {}
        fresh: list[StoredResult] = []
        for key, lease in others.items():
            before = self._written.get(key, {})
            if self._holder.get(key) != (lease.owner, lease.epoch):
                whole |= set(lease.topics)
            elif not self._told(key, lease, entries.get(key, []), fresh):
                for ms, order in lease.written.items():
                    if (
                        ms % PARTITION_MS
                        or ms + PARTITION_MS <= epoch_ms(oldest)
                        or ms > epoch_ms(now + PUBLISH_TIME_TOLERANCE)
                    ):
                        continue  # not a partition, or one no bucket can be in
                    if order > before.get(ms, (-1, -1)):
                        stale.setdefault(ms, set()).update(lease.topics)
        if whole:
            fresh += self._store.load_results(oldest, whole)
        if stale:
            fresh += self._store.load_results(oldest, set().union(*stale.values()), set(stale))
        # Only once every read succeeded: a failed one is read again next time.
        for key, lease in others.items():
            self._follow(key, lease)
        return fresh

    def forget_partitions_before(self, edge_ms: int) -> None:
        """Result partitions before `edge_ms` are out of every window."""
        for written in self._written.values():
            for ms in [ms for ms in written if ms < edge_ms]:
                del written[ms]

    def _follow(self, key: str, lease: Lease) -> None:
        self._holder[key] = (lease.owner, lease.epoch)
        self._written[key], self._seq[key] = dict(lease.written), lease.seq

    def _told(
        self,
        key: str,
        latest: Lease,
        entries: list[Lease],
        fresh: list[StoredResult],
    ) -> bool:
        """Take the results the holder of `key` stored since the last read, from its lease
        writes; False when they do not hold them all (one missed, one that could not carry
        them all): the partitions its lease names are read instead."""
        last = self._seq.get(key, 0)
        chain = [
            e
            for e in entries
            if (e.owner, e.epoch) == (latest.owner, latest.epoch) and e.seq > last
        ]
        if latest.seq < last:
            return False  # what was read last is not this holder's chain (hostile, or odd)
        previous = last
        for entry in chain:
            if entry.prev != previous or not entry.complete or len(entry.recent) != entry.told:
                return False
            previous = entry.seq
        if previous != latest.seq:
            return False
        topics = set(latest.topics)
        for entry in chain:
            for doc in entry.recent:
                stored = parse_result(doc) if isinstance(doc, dict) else None
                if stored is not None and stored.result.topic in topics:
                    fresh.append(stored)
        return True
