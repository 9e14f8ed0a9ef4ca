"""Topic leases: which exporter replica evaluates which topics, and fencing.

Several exporters may run against one database. The work is divided by journal key (eight
groups of topics, eventaudit.partitions.journal_key): a replica evaluates a key's topics only
while it holds the key's lease. Each evaluation pass, every replica

- reads what every replica wrote to the lease slots a live lease can be in: their leases and
  their heartbeats;
- releases the keys it holds beyond its fair share (ceil(keys / live replicas)), or one key
  when another live replica holds fewer than floor(keys / live replicas) and it holds the
  most;
- claims free keys (never held, released, or expired) up to its share: a claim inserts
  `claim|key|epoch` into `ExporterState`, where exactly one insert of an `_id` succeeds, on
  MongoDB and FerretDB alike;
- renews the leases it holds once it has stored its results, with the result partitions it
  wrote to (so the other replicas re-read only those) and says it is alive until now + the
  lease time: one write holding every key it renews and its heartbeat (an inserted document
  of `ExporterLease_<15 s slot>`: an update by `_id` would read the whole collection on
  FerretDB); the latest entry of a key counts (epoch, then write time), and the slots no live
  lease can be in are dropped every few minutes.

Fencing: before every write for a key (taking its journal, digests, results, marking a
journal folded, tenures, the lease), `fence(key)` checks that the lease was renewed less
than the lease time minus a margin (a fifth of it: for clock skew between replicas) ago, by
this process's monotonic clock (a pause, SIGSTOP or a long GC, counts); once a pass,
`verify_all` also checks that no one claimed the next epoch of any key held (one query). An
expired lease is never renewed: it is claimed again, under a new epoch, like any free one.
A replica that fails a check writes nothing more for the key: the write is refused and
counted (`eventaudit_lease_fenced_writes_total`). A write already past its check when the
process was paused still lands late; results are ordered by (epoch, version), so it never
replaces a successor's, and the journal collection it came from is marked folded only by a
later, fenced write, so the successor folds that journal itself.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from eventaudit.exporter.clocks import SteppedClock
from eventaudit.partitions import journal_key
from eventaudit.records import Lease
from eventaudit.store import EvaluatorStore

log = logging.getLogger(__name__)

LEASE_CHANGES = ("acquired", "released", "lost")
MAX_EPOCH = 2**62
RECENT_RESULTS = 32
"""Result documents a lease write carries per key (what one pass usually stores: the newest
buckets); more are read from the partitions instead."""
MAX_LEASE_TOPICS = 64
"""Topics a stored lease may name (they all hash to its key; more is not one of ours)."""
_SKEW = timedelta(minutes=1)
PRUNE_EVERY = timedelta(minutes=5)


class Fenced(Exception):
    """The lease of `key` passed to another replica: nothing more is written for it."""

    def __init__(self, key: str) -> None:
        super().__init__(f"the lease of journal key {key} is no longer held")
        self.key = key


@dataclass
class Held:
    """A lease this replica holds."""

    epoch: int
    deadline: float
    """monotonic time until which it may write without renewing"""
    topics: set[str] = field(default_factory=set)
    written: dict[int, tuple[int, int]] = field(default_factory=dict)
    recent: list[dict[str, Any]] = field(default_factory=list)
    """result documents stored since the lease was last written (told to the others with it)"""
    complete: bool = True
    """whether `recent` holds every one of them (at most RECENT_RESULTS)"""
    last_seq: int = 0


@dataclass(frozen=True)
class Ownership:
    """What one rebalance saw and did."""

    gained: frozenset[str]
    """keys claimed by this pass (their state elsewhere must be read afresh)"""
    released: frozenset[str]


def _own_topics(lease: Lease) -> Lease:
    """The lease with only the topics that hash to its key (at most MAX_LEASE_TOPICS): a
    stored lease naming others is not believed about them."""
    topics = tuple(t for t in lease.topics if journal_key(t) == lease.key)[:MAX_LEASE_TOPICS]
    return lease if topics == lease.topics else replace(lease, topics=topics)


class Leases(Collector):
    """The topic leases one replica holds, and the ones the others hold.

    eventaudit_topic_owned{topic="orders"} 1.0
    eventaudit_topics_without_owner 0.0
    eventaudit_exporter_replicas 3.0
    eventaudit_lease_fenced_writes_total 0.0
    """

    def __init__(
        self,
        store: EvaluatorStore,
        replica: str,
        lease: timedelta,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if lease <= timedelta(0):
            raise ValueError("the lease time must be positive")
        self._store = store
        self.replica = replica
        self._lease = lease
        self._margin = lease / 5
        self._wall = clock
        self._monotonic = monotonic
        self._readings = SteppedClock(self._margin.total_seconds(), lease.total_seconds())
        self._held: dict[str, Held] = {}
        self._others: dict[str, Lease] = {}
        self._topics: dict[str, set[str]] = {}
        self._lock = threading.Lock()
        self._fenced = 0
        self._changes = dict.fromkeys(LEASE_CHANGES, 0)
        self._replicas = 1
        self._unowned: frozenset[str] = frozenset()
        self._epochs: dict[str, int] = {}
        """The highest epoch of each key this replica has seen claimed or stored."""
        self._prune_due = -math.inf
        self._seq = 0
        self._entries: dict[str, list[Lease]] = {}
        self._fresh: set[str] = set()
        """keys claimed whose stored state the evaluator has not read yet"""

    def _clock(self) -> datetime:
        """The wall clock, once believed: a step of more than the margin (NTP, a VM restored,
        an operator) is suspect until it has held for a lease time by the monotonic clock;
        until then the time goes on from before the step. So a clock stepped for one
        evaluation never makes another replica's lease look expired, never seizes leases,
        and never makes this replica's own leases look short (issue 17, case 4). A clock that
        stays stepped is believed after a lease time: replicas' clocks must agree within the
        margin (docs/semantics.md, Limits)."""
        return self._readings.read(self._wall(), self._monotonic()).believed

    @property
    def lease(self) -> timedelta:
        """How long a lease lasts unless renewed."""
        return self._lease

    @property
    def held(self) -> Mapping[str, Held]:
        """The keys this replica holds."""
        return self._held

    @property
    def others(self) -> Mapping[str, Lease]:
        """The stored leases of keys this replica does not hold, as the last pass read them."""
        # Computed when asked: a key lost since the pass read the leases is another's now.
        return {k: v for k, v in self._others.items() if k not in self._held}

    def epoch(self, key: str) -> int:
        """The epoch of a held key's lease."""
        return self._held[key].epoch

    def rebalance(self, keys: Mapping[str, set[str]]) -> Ownership:
        """Say this replica is alive, release what is beyond its share, claim free keys up to
        it. `keys`: every journal key known, with the topics known of it. Raises StoreError."""
        now = self._clock()
        # Times further ahead than any replica renews to are not believed (a clock far ahead,
        # or a hand-written document): such a lease or heartbeat counts as expired.
        horizon = now + 2 * self._lease + _SKEW
        alive = self._read(now)
        replicas = {r for r, until in alive.items() if now < until <= horizon}
        replicas.add(self.replica)
        stored = {lease.key: _own_topics(lease) for lease in self._latest() if lease.epoch}

        def live(lease: Lease) -> bool:
            return now < lease.expires <= horizon

        # A key is known while it has topics (journal, configuration, results in a window) or
        # another replica holds it live: a key whose topics stopped existing ages out of the
        # leases, the shares and the metrics (issue 17, case 3), rather than being renewed
        # (and so known) for ever.
        # A key holds several topics: those of a held key are the ones known now, so a topic
        # that stopped existing ages out of a key that lives on; those of another's key (or
        # one about to be claimed) are also the ones its lease names.
        known = {k: set(t) for k, t in keys.items()}
        for key, lease in stored.items():
            if key not in self._held and (live(lease) or key in known):
                known.setdefault(key, set()).update(lease.topics)
        gone = {key for key in self._held if key not in known}
        for key in sorted(gone):
            log.info("journal key %s has no topic any more: its lease is released", key)
            self._give_up(now, key)

        counts = dict.fromkeys(replicas, 0)
        for key, lease in stored.items():
            if key not in self._held and lease.owner != self.replica and live(lease):
                counts[lease.owner] = counts.get(lease.owner, 0) + 1
        counts[self.replica] = len(self._held)
        high = math.ceil(len(known) / len(replicas))
        low = len(known) // len(replicas)

        released = self._release(now, counts, high, low) | gone
        counts[self.replica] = len(self._held)
        free = [
            key
            for key in known
            if key not in self._held
            and key not in released
            and (key not in stored or not live(stored[key]) or stored[key].owner == self.replica)
        ]
        # Each replica tries free keys in its own order: fewer claims collide.
        free.sort(key=lambda k: hashlib.sha256(f"{self.replica}|{k}".encode()).digest())
        gained = set()
        for key in free:
            if len(self._held) >= high:
                break
            if self._claim(key, stored.get(key), known[key]):
                gained.add(key)
        for key, topics in known.items():
            if key in self._held:
                self._held[key].topics = set(topics)
        self._topics = known
        self._others = stored
        unowned = frozenset(
            k for k in known if k not in self._held and (k not in stored or not live(stored[k]))
        )
        with self._lock:
            self._replicas, self._unowned = len(replicas), unowned
        # Keys claimed by an earlier pass that failed before their state was read are gained
        # again, until `adopted` (issue 17, case 2).
        self._fresh &= set(self._held)
        return Ownership(frozenset(self._fresh), frozenset(released))

    def adopted(self, keys: Iterable[str]) -> None:
        """The stored state of these gained keys was read: they are gained no more."""
        self._fresh -= set(keys)

    def release_all(self) -> None:
        """Hand every held lease over now (a clean stop): the others claim them at their next
        pass rather than after the lease time. Never raises: what cannot be released expires."""
        now = self._clock()
        for key in sorted(self._held):
            self._give_up(now, key)
        try:
            self._store.save_leases(self.replica, now, [], alive_until=now)
        except Exception as exc:
            log.warning("could not say this replica stopped: %s", exc)

    def _give_up(self, now: datetime, key: str) -> None:
        """Stop writing for `key` and mark its lease expired, so that it is claimed at once."""
        held = self._held.pop(key)
        self._count("released")
        lease = Lease(key, held.epoch, self.replica, now - 2 * self._lease, tuple(held.topics))
        try:
            self._store.save_leases(
                self.replica, now, [self._stamped(replace(lease, written=held.written), now, held)]
            )
        except Exception as exc:  # it then expires on its own
            log.warning("could not release the lease of %s: %s", key, exc)
        log.info("released the lease of journal key %s (topics %s)", key, sorted(held.topics))

    def _stamped(self, lease: Lease, now: datetime, held: Held | None = None) -> Lease:
        """The lease as written now: its write time and this process's write count (the first
        count is the clock's microseconds: a restarted process with the same replica id counts
        on from past its predecessor's); with the results stored since it was last written."""
        self._seq = max(self._seq + 1, int(now.timestamp() * 1_000_000))
        lease = replace(lease, renewed=now, seq=self._seq)
        if held is not None:
            lease = replace(
                lease, prev=held.last_seq, recent=tuple(held.recent), complete=held.complete
            )
            held.recent, held.complete, held.last_seq = [], True, self._seq
        return lease

    def _read(self, now: datetime) -> dict[str, datetime]:
        """Read the lease writes a live lease or heartbeat can be in: keep every key's
        entries (entries()); return each replica's latest heartbeat."""
        # A live lease was written within the lease time (by its holder's clock, at most the
        # margin apart); older keys' epochs are remembered, or found by claiming.
        board = self._store.load_leases(now - self._lease - 2 * self._margin, now + self._margin)
        entries: dict[str, list[Lease]] = {}
        for lease in board.leases:
            entries.setdefault(lease.key, []).append(lease)
            self._epochs[lease.key] = max(self._epochs.get(lease.key, 0), lease.epoch)
        self._entries = {k: sorted(v, key=lambda x: x.order) for k, v in entries.items()}
        return board.alive

    def _latest(self) -> list[Lease]:
        """Each key's latest lease entry, of those the last read found."""
        return [entries[-1] for entries in self._entries.values()]

    def entries(self, key: str) -> list[Lease]:
        """Every lease document of `key` the last pass read, oldest first."""
        return self._entries.get(key, [])

    def _forget_before(self, now: datetime) -> datetime | None:
        """Every PRUNE_EVERY, the time before which no live lease can have been written (the
        store may drop what was written before it)."""
        if self._monotonic() < self._prune_due:
            return None
        self._prune_due = self._monotonic() + PRUNE_EVERY.total_seconds()
        return now - 4 * self._lease - 2 * _SKEW

    def _release(self, now: datetime, counts: dict[str, int], high: int, low: int) -> set[str]:
        """Give up keys beyond the share: all above `high`; one when a live replica holds
        fewer than `low` and this one holds the most (ties: the first id)."""
        mine = len(self._held)
        excess = mine - high
        if excess <= 0 and any(n < low for n in counts.values()) and mine > low:
            most = max(counts.values())
            first = min(r for r, n in counts.items() if n == most)
            excess = 1 if first == self.replica else 0
        released = set(sorted(self._held)[: max(excess, 0)])
        for key in sorted(released):
            # Nothing more is written for it: hand it over now rather than at expiry.
            self._give_up(now, key)
        return released

    def _claim(self, key: str, stored: Lease | None, topics: set[str]) -> bool:
        """Claim the next epoch of `key`; True when this replica now holds it. The lease runs
        from before the claim was sent, by both clocks."""
        now, started = self._clock(), self._monotonic()
        # Claims are contiguous (an epoch is claimed only once every lower one is), so a
        # holder of epoch e is fenced by the claim of e + 1 alone, and the first epoch not
        # claimed is found by doubling then halving from the last one known.
        known = max(stored.epoch if stored else 0, self._epochs.get(key, 0))
        epoch = self._first_unclaimed(key, known + 1)
        if epoch is None or epoch >= MAX_EPOCH:
            log.error("journal key %s: no lease epoch left to claim", key)
            return False
        if epoch > known + 1:
            # Claimed since the lease this replica read: by one that holds it now, unless
            # that claim is older than a lease (its claimer never stored its lease).
            last = self._claimed(key, epoch - 1)
            if last is not None and now - self._lease < last <= now + _SKEW:
                self._epochs[key] = epoch - 1
                return False
        if self._store.claim_epoch(key, epoch, self.replica, now) is not None:
            self._epochs[key] = epoch
            return False  # claimed by another replica just now
        held = Held(epoch, started + (self._lease - self._margin).total_seconds(), set(topics))
        lease = Lease(key, epoch, self.replica, now + self._lease, tuple(sorted(topics)))
        self._store.save_leases(self.replica, now, [self._stamped(lease, now, held)])
        self._held[key] = held
        self._fresh.add(key)
        self._count("acquired")
        log.info(
            "acquired the lease of journal key %s (topics %s), epoch %d", key, sorted(topics), epoch
        )
        return True

    def _first_unclaimed(self, key: str, start: int) -> int | None:
        """The first epoch from `start` on that no one claimed (claims are contiguous): a few
        lookups by `_id`, however many epochs were claimed since."""
        if self._claimed(key, start) is None:
            return start
        low, step = start, 1  # low: claimed
        while True:
            if low + step >= MAX_EPOCH:
                return None
            if self._claimed(key, low + step) is None:
                high = low + step  # not claimed
                break
            low, step = low + step, step * 2
        while high - low > 1:
            middle = (low + high) // 2
            if self._claimed(key, middle) is None:
                high = middle
            else:
                low = middle
        return high

    def _claimed(self, key: str, epoch: int) -> datetime | None:
        """When `epoch` of `key` was claimed (None: not claimed); one lookup by `_id`."""
        return self._store.claimed_epochs([(key, epoch)]).get((key, epoch))

    def fence(self, key: str) -> None:
        """Raise Fenced (counted, logged) unless this replica still holds `key`: renewed less
        than the lease minus the margin ago (no other replica claims it before the lease has
        run out by its own clock, a margin later). With a quarter of it left, renew it (a
        long pass). Raises StoreError."""
        held = self._held.get(key)
        if held is None:
            raise Fenced(key)
        left = held.deadline - self._monotonic()
        if left < 0:
            self._lose(key, "its lease expired")
            raise Fenced(key)
        if left < (self._lease / 4).total_seconds():
            # A long pass: renew now, before the lease runs out (a pass renews at its end).
            self._renew(key)

    def verify_all(self) -> set[str]:
        """fence() every held key, and check that no one claimed its next epoch (one query for
        all): once a pass, for clocks further apart than the margin. Returns the keys lost
        (counted, logged). Raises StoreError."""
        lost = set()
        now = self._monotonic()
        for key in sorted(self._held):
            if self._held[key].deadline < now:
                self._lose(key, "its lease expired")
                lost.add(key)
        pairs = [(key, held.epoch + 1) for key, held in self._held.items()]
        for key, _ in sorted(self._store.claimed_epochs(pairs)):
            self._lose(key, "another replica claimed its lease")
            lost.add(key)
        return lost

    def refused(self, key: str, why: str) -> None:
        """The store refused a write for `key` (a later epoch's is stored): lost, counted."""
        if key in self._held:
            self._lose(key, why)

    def _lose(self, key: str, why: str) -> None:
        self._held.pop(key, None)
        with self._lock:
            self._fenced += 1
        self._count("lost")
        log.warning("a write for journal key %s refused: %s", key, why)

    def wrote(
        self, key: str, partition_ms: int, order: tuple[int, int], doc: dict[str, Any]
    ) -> None:
        """The result document `doc` of `key` was stored in the result partition starting at
        `partition_ms`: told to the others with the next write of the lease (at most
        RECENT_RESULTS of them; past that, they read the partitions)."""
        held = self._held.get(key)
        if held is None:
            return
        if order > held.written.get(partition_ms, (-1, -1)):
            held.written[partition_ms] = order
        if held.complete and len(held.recent) < RECENT_RESULTS:
            held.recent.append(doc)
        else:
            held.recent, held.complete = [], False

    def saw_topics(self, key: str, topics: set[str]) -> bool:
        """A held key's journal holds `topics`; True when some were not known of it (its
        lease must name them before anything of them is stored: a successor reads the stored
        state of the topics the lease names)."""
        held = self._held.get(key)
        if held is None or topics <= held.topics:
            return False
        held.topics |= topics
        return True

    def renew(self, oldest_partition_ms: int) -> None:
        """Renew every held lease (fenced first), with what was written where, and say this
        replica is alive for the lease time, in one write (after a pass that succeeded: a
        replica whose evaluations fail is not given a share of the topics); partitions before
        `oldest_partition_ms` are forgotten. Raises StoreError."""
        keys = []
        for key in sorted(self._held):
            held = self._held[key]
            held.written = {ms: o for ms, o in held.written.items() if ms >= oldest_partition_ms}
            try:
                self.fence(key)
            except Fenced:
                continue
            keys.append(key)
        self._renew(*keys, alive=True)

    def renew_key(self, key: str) -> None:
        """Renew one held lease (fenced first). Raises Fenced, StoreError."""
        self.fence(key)
        self._renew(key)
        if key not in self._held:
            raise Fenced(key)

    def _renew(self, *keys: str, alive: bool = False) -> None:
        """Store held leases with a new expiry (one write, with this replica's heartbeat when
        `alive`); each deadline moves only once stored."""
        keys = tuple(k for k in keys if k in self._held)
        if not keys and not alive:
            return
        now, started = self._clock(), self._monotonic()
        leases = []
        for key in keys:
            held = self._held[key]
            lease = Lease(
                key, held.epoch, self.replica, now + self._lease, tuple(sorted(held.topics))
            )
            leases.append(self._stamped(replace(lease, written=dict(held.written)), now, held))
        self._store.save_leases(
            self.replica,
            now,
            leases,
            alive_until=now + self._lease if alive else None,
            forget_before=self._forget_before(now) if alive else None,
        )
        for key in keys:
            self._held[key].deadline = started + (self._lease - self._margin).total_seconds()

    def topics_of(self, key: str) -> set[str]:
        """The topics known of a key."""
        held = self._held.get(key)
        return set(held.topics) if held else set(self._topics.get(key, ()))

    def _count(self, change: str) -> None:
        with self._lock:
            self._changes[change] += 1

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        """Who evaluates what, as this replica last saw it."""
        owned = GaugeMetricFamily(
            "eventaudit_topic_owned",
            "1 for each topic this exporter replica evaluates (holds the lease of), 0 for each "
            "other topic it knows of.",
            labels=["topic"],
        )
        held = dict(self._held)
        topics = {t: k in held for k, ts in dict(self._topics).items() for t in ts}
        for lease in held.values():
            topics.update(dict.fromkeys(lease.topics, True))
        for topic, mine in sorted(topics.items()):
            owned.add_metric([topic], int(mine))
        yield owned
        with self._lock:
            replicas, unowned, fenced = self._replicas, len(self._unowned), self._fenced
            changes = dict(self._changes)
        yield GaugeMetricFamily(
            "eventaudit_topics_without_owner",
            "Topic journal keys no live exporter replica held after this replica's last pass.",
            value=unowned,
        )
        yield GaugeMetricFamily(
            "eventaudit_exporter_replicas",
            "Exporter replicas alive (a heartbeat within the lease time), as this one saw them.",
            value=replicas,
        )
        yield GaugeMetricFamily(
            "eventaudit_topic_leases_held",
            "Topic journal keys this replica holds the lease of.",
            value=len(held),
        )
        yield CounterMetricFamily(
            "eventaudit_lease_fenced_writes",
            "Writes refused because this replica's lease of the topic had expired or passed to "
            "another replica (a pause, a partition): nothing of them was written.",
            value=fenced,
        )
        family = CounterMetricFamily(
            "eventaudit_topic_lease_changes",
            "Topic leases acquired, released (rebalancing) and lost (fenced) by this replica.",
            labels=["change"],
        )
        for change in LEASE_CHANGES:
            family.add_metric([change], changes[change])
        yield family
