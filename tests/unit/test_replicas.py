"""Several exporter replicas on one store: leases divide the topics, a successor takes over a
dead or paused holder's topics, fencing refuses the paused holder's late writes, and every
replica serves the same numbers. In memory (tests.fakes.MemoryStore), with fake clocks; the
same on FerretDB with real processes in tests/integration/test_replicas.py."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.registry import Collector

from eventaudit.exporter import leases as leases_module
from eventaudit.exporter.buckets import Window
from eventaudit.exporter.evaluator import Evaluator
from eventaudit.exporter.leases import Leases
from eventaudit.exporter.snapshot import Snapshot, list_missed
from eventaudit.exporter.subscriptions import ExpectedSubscriptions
from eventaudit.journal import JournalEntry
from eventaudit.partitions import journal_key
from eventaudit.records import BucketResult, Lease, PublishRecord, Receipt, Tenure
from eventaudit.store import AuditStore, StoredResult, StoreError
from tests.fakes import CountsResultReads, MemoryStore

BUCKET = timedelta(seconds=10)
SETTLE = timedelta(seconds=30)
LEASE = timedelta(seconds=30)
WINDOW = Window("5m", timedelta(minutes=5))
T0 = datetime(2026, 11, 29, 12, 0, 0, tzinfo=UTC)


def topics_over(keys: int, per_key: int) -> list[str]:
    """Topic names that fall in exactly `keys` journal keys, `per_key` in each (the unit
    leases divide among replicas is the key: a group of topics)."""
    by_key: dict[str, list[str]] = {}
    i = 0
    while len(by_key) < keys or any(len(v) < per_key for v in by_key.values()):
        topic = f"topic-{i:03d}"
        i += 1
        names = by_key.get(journal_key(topic))
        if names is None and len(by_key) < keys:
            by_key[journal_key(topic)] = [topic]
        elif names is not None and len(names) < per_key:
            names.append(topic)
    return sorted(t for names in by_key.values() for t in names)


KEYS = len({journal_key(str(i)) for i in range(1000)})
"""Every journal key there is (8): what the replicas divide."""
TOPICS = topics_over(KEYS, 4)
"""32 topics, 4 in each key."""


@dataclass
class Clock:
    """The wall clock all replicas share, and one monotonic clock per replica (a paused
    replica's jumps when it resumes)."""

    now: datetime = T0
    monotonic: dict[str, float] = field(default_factory=dict)

    def advance(self, seconds: float, *replicas: str) -> None:
        self.now += timedelta(seconds=seconds)
        for r in replicas:
            self.monotonic[r] = self.monotonic.get(r, 0.0) + seconds


@dataclass
class Replica:
    name: str
    leases: Leases
    evaluator: Evaluator
    snapshot: Snapshot | None = None


def replica(store: AuditStore, clock: Clock, name: str, topics: list[str]) -> Replica:
    clock.monotonic.setdefault(name, 0.0)
    leases = Leases(store, name, LEASE, lambda: clock.now, lambda: clock.monotonic[name])
    expected = ExpectedSubscriptions({t: {f"{t}-sub"} for t in topics}, set(), None)
    evaluator = Evaluator(
        store,
        expected,
        [WINDOW],
        BUCKET,
        SETTLE,
        monotonic=lambda: clock.monotonic[name],
        leases=leases,
    )
    return Replica(name, leases, evaluator)


def run(clock: Clock, replicas: list[Replica], rounds: int = 1) -> None:
    """`rounds` evaluation passes of every replica, one bucket apart."""
    for _ in range(rounds):
        clock.advance(BUCKET.total_seconds(), *(r.name for r in replicas))
        for r in replicas:
            r.snapshot = r.evaluator.evaluate(clock.now)


def traffic(store: AuditStore, topics: list[str], when: datetime, n: int, lost: int = 0) -> None:
    """`n` events on each topic published at `when`, the first `lost` of them never received."""
    for topic in topics:
        records = [
            PublishRecord(f"{topic}-{when.timestamp():.0f}-{i}", "t" * 32, topic, "{}", "m", when)
            for i in range(n)
        ]
        store.insert_publish_records(records, when)
        got = when + timedelta(seconds=1)
        store.record_receipts(
            [
                Receipt(f"{topic}-sub", r.event_id, topic, None, "m", when, when, got)
                for r in records[lost:]
            ],
            got,
        )


def owned(replicas: list[Replica]) -> dict[str, int]:
    return {r.name: len(r.leases.held) for r in replicas}


def numbers(snapshot: Snapshot | None) -> dict[tuple[str, str], tuple[int, int]]:
    assert snapshot is not None
    return {
        key: (w["5m"].published, w["5m"].received)
        for key, w in sorted(snapshot.subscriptions.items())
    }


def test_three_replicas_split_thirty_topics_evenly_and_serve_the_same_numbers() -> None:
    store, clock = MemoryStore(), Clock()
    replicas = [replica(store, clock, name, TOPICS) for name in ("a", "b", "c")]
    traffic(store, TOPICS, T0 + timedelta(seconds=5), 3, lost=1)
    run(clock, replicas, rounds=8)
    assert sorted(owned(replicas).values()) == [2, 3, 3]  # 8 keys
    assert set().union(*(r.leases.held for r in replicas)) == {journal_key(t) for t in TOPICS}
    # Each topic evaluated by one replica, served alike by all three from the stored results.
    expected = {(t, f"{t}-sub"): (3, 2) for t in TOPICS}
    assert [numbers(r.snapshot) for r in replicas] == [expected] * 3
    for r in replicas:
        assert r.snapshot is not None
        topic = TOPICS[7]
        [missed] = list_missed(r.snapshot, store, topic, f"{topic}-sub", WINDOW, 10) or []
        assert missed.event_id == f"{topic}-{(T0 + timedelta(seconds=5)).timestamp():.0f}-0"


@pytest.mark.parametrize(
    ("keys", "replicas", "most", "least"),
    [
        (8, 1, 8, 8),
        (8, 2, 4, 4),
        (8, 3, 3, 2),
        (7, 3, 3, 2),
        (8, 4, 2, 2),
        (8, 5, 2, 1),
        (4, 3, 2, 1),
        (2, 3, 1, 0),
        (8, 9, 1, 0),  # more replicas than keys: one idles
    ],
)
def test_the_split_converges_to_within_one_key(
    keys: int, replicas: int, most: int, least: int
) -> None:
    store, clock = MemoryStore(), Clock()
    topics = topics_over(keys, 3)
    group = [replica(store, clock, f"r{i}", topics) for i in range(replicas)]
    run(clock, group, rounds=6)
    counts = sorted(owned(group).values())
    assert (counts[-1], counts[0], sum(counts)) == (most, least, keys)


def test_a_dead_holders_topics_are_taken_over_within_the_lease_and_one_bucket() -> None:
    store, clock = MemoryStore(), Clock()
    group = [replica(store, clock, name, TOPICS) for name in ("a", "b", "c")]
    run(clock, group, rounds=4)
    a, survivors = group[0], group[1:]
    orphaned = set(a.leases.held)
    assert sorted(owned(group).values()) == [2, 3, 3] and orphaned
    # a dies (SIGKILL: it never evaluates again) while traffic flows on every topic
    died = clock.now
    for second in range(0, 90, 3):
        traffic(store, TOPICS, died + timedelta(seconds=second), 2)
    taken_at = None
    for _ in range(12):
        run(clock, survivors)
        if taken_at is None and orphaned <= set().union(*(r.leases.held for r in survivors)):
            taken_at = clock.now
    assert taken_at is not None and taken_at - died <= LEASE + BUCKET
    assert sorted(owned(survivors).values()) == [4, 4]
    # No bucket skipped, none counted twice: every event published since the death, settled
    # and inside the window, is counted once on every topic, by both survivors. A topic the
    # other survivor holds is served up to the frontier its holder had settled by its latest
    # pass (at most one pass behind this replica's own).
    for survivor in survivors:
        snapshot = survivor.snapshot
        assert snapshot is not None
        expected = {}
        for t in TOPICS:
            end = snapshot.frontier_of(t)
            assert snapshot.frontier - BUCKET <= end <= snapshot.frontier
            n = sum(1 for s in range(0, 90, 3) if died + timedelta(seconds=s) < end)
            expected[(t, f"{t}-sub")] = (2 * n, 2 * n)
        assert numbers(snapshot) == expected


def test_a_paused_holders_late_writes_are_refused_and_counted() -> None:
    store, clock = MemoryStore(), Clock()
    group = [replica(store, clock, name, TOPICS) for name in ("a", "b", "c")]
    traffic(store, TOPICS, T0 + timedelta(seconds=5), 2)
    run(clock, group, rounds=6)
    a, b, c = group
    held = dict(a.leases.held)
    # a is paused (SIGSTOP) past its lease: its monotonic clock stands still meanwhile
    pause = clock.now
    traffic(store, TOPICS, pause + timedelta(seconds=2), 4, lost=1)
    for _ in range(8):
        run(clock, [b, c])
    assert {k for k in held if k in b.leases.held or k in c.leases.held} == set(held)
    # a resumes (SIGCONT): its clock jumps, it evaluates believing it still holds its keys
    clock.monotonic["a"] += (clock.now - pause).total_seconds()
    traffic(store, TOPICS, clock.now - timedelta(seconds=40), 1)  # a journal for a to take
    stored = (dict(store.versions), dict(store.digests), sorted(store.journals), store.leases)
    a.snapshot = a.evaluator.evaluate(clock.now)
    assert _sample(a.leases, "eventaudit_lease_fenced_writes_total") == len(held) >= 2
    assert a.leases.held == {}
    # a wrote nothing: no result, no digest, no journal taken, no lease
    leases = {k: v for k, v in store.leases.items()}
    assert (dict(store.versions), dict(store.digests), sorted(store.journals)) == stored[:3]
    assert all(lease.owner in ("b", "c") for lease in leases.values())
    run(clock, group, rounds=6)
    assert sorted(owned(group).values()) == [2, 3, 3]
    assert numbers(a.snapshot) == numbers(b.snapshot) == numbers(c.snapshot)
    assert numbers(a.snapshot)[(TOPICS[0], f"{TOPICS[0]}-sub")] == (7, 6)


def test_a_lease_whose_next_epoch_is_claimed_is_fenced_before_its_deadline() -> None:
    """A clock skew larger than the margin, or a successor that claimed too early: the
    claim of the next epoch alone fences the holder."""
    store, clock = MemoryStore(), Clock()
    [a] = group = [replica(store, clock, "a", ["orders"])]
    run(clock, group, rounds=2)
    key = journal_key("orders")
    epoch = a.leases.epoch(key)
    assert store.claim_epoch(key, epoch + 1, "thief", clock.now) is None
    traffic(store, ["orders"], clock.now - timedelta(seconds=45), 1)
    run(clock, group)
    assert _sample(a.leases, "eventaudit_lease_fenced_writes_total") == 1
    assert key not in a.leases.held
    assert all(epoch_ <= epoch for epoch_, _ in store.versions.values())


def test_results_are_ordered_by_epoch_before_version() -> None:
    """A successor whose clock is behind stores lower versions; its epoch still wins."""
    store = MemoryStore()
    old = BucketResult("orders", T0, 5, {})
    new = BucketResult("orders", T0, 6, {})
    store.save_bucket_results([old], T0, version=900, epoch=1)
    store.save_bucket_results([new], T0, version=100, epoch=2)
    store.save_bucket_results([old], T0, version=999, epoch=1)  # the old holder, late
    assert store.load_bucket_results(T0) == [new]


def test_a_released_key_is_handed_over_without_waiting_for_expiry() -> None:
    store, clock = MemoryStore(), Clock()
    a = replica(store, clock, "a", TOPICS)
    run(clock, [a], rounds=2)
    assert len(a.leases.held) == KEYS
    b = replica(store, clock, "b", TOPICS)
    unowned_rounds = 0
    for _ in range(4):
        run(clock, [a, b])
        held = set(a.leases.held) | set(b.leases.held)
        unowned_rounds += len(held) < KEYS
    assert owned([a, b]) == {"a": 4, "b": 4}
    assert unowned_rounds == 0  # released at a's pass, claimed at b's, in the same round
    assert _sample(a.leases, "eventaudit_topic_lease_changes_total", change="released") == 4


GOOD_LEASE = {"key": "k", "renewed": T0, "epoch": 1, "owner": "a", "expires": T0}


def _without(name: str) -> dict[str, object]:
    return {k: v for k, v in GOOD_LEASE.items() if k != name}


@pytest.mark.parametrize(
    "doc",
    [
        {**GOOD_LEASE, "epoch": -1},
        {**GOOD_LEASE, "epoch": True},
        {**GOOD_LEASE, "epoch": 2**63},
        {**GOOD_LEASE, "epoch": 2**62},  # no room for a successor's epoch
        {**GOOD_LEASE, "epoch": "1"},
        {**GOOD_LEASE, "owner": 7},
        {**GOOD_LEASE, "expires": "soon"},
        {**GOOD_LEASE, "expires": datetime(2026, 1, 1)},  # naive
        {**GOOD_LEASE, "expires": datetime(9999, 1, 1, tzinfo=UTC)},
        {**GOOD_LEASE, "topics": "orders"},
        {**GOOD_LEASE, "topics": [1]},
        {**GOOD_LEASE, "written": [[1, 2, 3]]},  # the nested form FerretDB cannot store
        {**GOOD_LEASE, "written": ["1:2"]},
        {**GOOD_LEASE, "written": ["1:2:-3"]},
        {**GOOD_LEASE, "written": ["1:2:3\n"]},
        {**GOOD_LEASE, "written": ["1:2:\u0663"]},  # Arabic-Indic 3
        {**GOOD_LEASE, "written": [f"1:2:{2**63}"]},
        {**GOOD_LEASE, "written": ["1:2: 3"]},
        {**GOOD_LEASE, "written": "1:2:3"},
        {**GOOD_LEASE, "renewed": "now"},
        {**GOOD_LEASE, "renewed": datetime(2026, 1, 1)},  # naive
        {**GOOD_LEASE, "key": 5},
        _without("renewed"),
        _without("key"),
        _without("owner"),
    ],
)
def test_hostile_stored_leases_are_not_leases(doc: dict[str, object]) -> None:
    assert Lease.from_document(doc) is None


def test_a_stored_lease_reads_back() -> None:
    lease = Lease("k", 3, "a", T0, ("orders",), {600_000: (3, 17)}, T0 - timedelta(seconds=5))
    assert Lease.from_document(lease.to_document()) == lease


def test_entries_of_a_topic_in_another_keys_journal_are_counted_misfiled() -> None:
    store, clock = MemoryStore(), Clock()
    [a] = group = [replica(store, clock, "a", ["orders"])]
    run(clock, group)
    when = clock.now - timedelta(seconds=45)
    entry = JournalEntry("payments", "e1", int(when.timestamp() * 1000), None, "t" * 32)
    name = f"EventJournal_0_{journal_key('orders')}"
    store.inject_journal({"_id": "x", "entries": [entry.to_document()]}, name)
    run(clock, group)
    assert _sample(a.evaluator, "eventaudit_journal_entries_total", outcome="misfiled") == 1
    # Journaled again under its topic's key, and folded by that key's holder (here a again:
    # the only replica, once it lists the journal's keys), never by the holder of the
    # collection it was found in.
    run(clock, group, rounds=4)
    assert store.buckets[f"payments|{journal_entry_bucket(entry)}"].published == 1
    assert journal_key("payments") in a.leases.held


def _sample(collector: Collector, name: str, **labels: str) -> float:
    registry = CollectorRegistry()
    registry.register(collector)
    value = registry.get_sample_value(name, labels)
    assert value is not None, name
    return value


class LeaseFailingStore(MemoryStore):
    """Fails writes of leases while `fail_leases` is set (a holder that stored its results but
    could not renew yet: the others have not been told of them); heartbeats alone pass."""

    fail_leases = False

    def save_leases(
        self, replica: str, now: datetime, leases: Sequence[Lease], *args: Any, **kwargs: Any
    ) -> None:
        if self.fail_leases and leases:
            raise StoreError("injected: save_leases")
        super().save_leases(replica, now, leases, *args, **kwargs)


def test_a_replica_lists_the_missed_events_its_gauge_counts_for_a_topic_it_does_not_hold() -> None:
    """Past the events a result lists, /api/v1/missed reads the digest as the evaluation saw
    it. On a replica that does not hold the topic, that evaluation is the holder's: entries the
    holder folded since (stamped before this replica's own evaluation) must be left out."""
    store, clock = LeaseFailingStore(), Clock()
    a, b = group = [replica(store, clock, name, ["orders"]) for name in ("a", "b")]
    when = T0 + timedelta(seconds=5)
    traffic(store, ["orders"], when, 150, lost=150)
    run(clock, group, rounds=6)
    holder, other = (a, b) if a.leases.held else (b, a)
    assert numbers(other.snapshot) == {("orders", "orders-sub"): (150, 0)}
    # 10 receipts arrive late; the holder folds them but cannot tell the others yet
    late = [
        Receipt("orders-sub", f"orders-{when.timestamp():.0f}-{i}", "orders", None, "m", when,
                when, clock.now)
        for i in range(10)
    ]  # fmt: skip
    store.record_receipts(late, clock.now)
    clock.advance(BUCKET.total_seconds(), "a", "b")
    store.fail_leases = True
    with pytest.raises(StoreError):
        holder.evaluator.evaluate(clock.now)
    clock.advance(1, "a", "b")
    other.snapshot = other.evaluator.evaluate(clock.now)
    assert numbers(other.snapshot) == {("orders", "orders-sub"): (150, 0)}
    listed = list_missed(other.snapshot, store, "orders", "orders-sub", WINDOW, 1000)
    assert listed is not None and len(listed) == 150
    store.fail_leases = False
    run(clock, group, rounds=2)
    assert (
        numbers(other.snapshot) == numbers(holder.snapshot) == {("orders", "orders-sub"): (150, 10)}
    )
    listed = list_missed(other.snapshot, store, "orders", "orders-sub", WINDOW, 1000)
    assert listed is not None and len(listed) == 140


def test_a_replica_that_stops_cleanly_hands_its_topics_over_at_the_next_pass() -> None:
    store, clock = MemoryStore(), Clock()
    group = [replica(store, clock, name, TOPICS) for name in ("a", "b", "c")]
    run(clock, group, rounds=6)
    a, *others = group
    had = len(a.leases.held)
    assert sorted(owned(group).values()) == [2, 3, 3]
    released = _sample(a.leases, "eventaudit_topic_lease_changes_total", change="released")
    a.leases.release_all()  # SIGTERM: after its last evaluation
    assert a.leases.held == {}
    run(clock, others)  # one pass, far less than the lease time
    assert sorted(owned(others).values()) == [4, 4]
    changes = _sample(a.leases, "eventaudit_topic_lease_changes_total", change="released")
    assert changes == released + had


def journal_entry_bucket(entry: JournalEntry) -> int:
    ms = entry.publish_ms
    return ms - ms % int(BUCKET.total_seconds() * 1000)


def test_a_holder_that_dies_before_announcing_its_last_results_is_read_whole_by_the_others() -> (
    None
):
    """The holder stored results for late receipts and died before renewing its lease (which
    says where it wrote): the replicas that do not hold the topic read all of its results
    again once its successor holds it, rather than serve the old counts until they age out."""
    store, clock = LeaseFailingStore(), Clock()
    group = [replica(store, clock, name, ["orders"]) for name in ("a", "b", "c")]
    when = T0 + timedelta(seconds=5)
    traffic(store, ["orders"], when, 6, lost=6)
    run(clock, group, rounds=6)
    [holder] = [r for r in group if r.leases.held]
    others = [r for r in group if r is not holder]
    late = [
        Receipt("orders-sub", f"orders-{when.timestamp():.0f}-{i}", "orders", None, "m", when,
                when, clock.now)
        for i in range(4)
    ]  # fmt: skip
    store.record_receipts(late, clock.now)
    clock.advance(BUCKET.total_seconds(), *(r.name for r in group))
    store.fail_leases = True
    with pytest.raises(StoreError):
        holder.evaluator.evaluate(clock.now)  # results stored, lease not renewed: then killed
    store.fail_leases = False
    run(clock, others, rounds=5)
    assert sum(len(r.leases.held) for r in others) == 1
    assert [numbers(r.snapshot) for r in others] == [{("orders", "orders-sub"): (6, 4)}] * 2


class SlowStore(MemoryStore):
    """Reading results takes `seconds` of the replicas' monotonic clocks (FerretDB reading
    whole partitions under load)."""

    clock: Clock | None = None
    seconds = 0.0

    def load_results(
        self,
        since: datetime,
        topics: Collection[str] | None = None,
        partitions: Collection[int] | None = None,
    ) -> list[StoredResult]:
        if self.clock is not None and self.seconds:
            for name in self.clock.monotonic:
                self.clock.monotonic[name] += self.seconds
        return super().load_results(since, topics, partitions)


def test_a_slow_takeover_keeps_the_keys_it_gained() -> None:
    """Reading a gained key's results takes most of the lease: the leases are renewed before
    folding, not refused at the first write (which would repeat at every pass)."""
    store, clock = SlowStore(), Clock()
    store.clock = clock
    group = [replica(store, clock, name, TOPICS) for name in ("a", "b")]
    b = group[1]
    run(clock, group, rounds=4)
    assert owned(group) == {"a": 4, "b": 4}
    # Each read takes 12 s of the lease's 30 (a write is refused past 24): one read for all
    # the keys gained, and their leases renewed after it.
    store.seconds = 12.0
    for _ in range(5):  # a dies: b takes its keys over, one slow read
        run(clock, [b])
    assert owned([b]) == {"b": KEYS}
    assert _sample(b.leases, "eventaudit_lease_fenced_writes_total") == 0


def test_claims_step_over_any_number_of_abandoned_epochs() -> None:
    """Claimers that died before storing their lease leave claims behind: the next claimer
    steps over them (a bounded number a pass), so the key is never orphaned for good."""
    store, clock = MemoryStore(), Clock()
    key = journal_key("orders")
    for epoch in range(1, 201):  # every rolling deploy moves the epochs on
        store.claims[(key, epoch)] = T0 - timedelta(hours=1)
    [a] = group = [replica(store, clock, "a", ["orders"])]
    run(clock, group)  # one pass: doubling, then halving, from the last epoch known
    assert a.leases.epoch(key) == 201


def test_a_claim_made_just_now_past_the_lease_read_is_not_stepped_over() -> None:
    store, clock = MemoryStore(), Clock()
    key = journal_key("orders")
    store.claims.update({(key, e): T0 - timedelta(hours=1) for e in range(1, 7)})
    store.claims[(key, 7)] = T0 + timedelta(seconds=5)  # another replica, 5 s before
    [a] = group = [replica(store, clock, "a", ["orders"])]
    run(clock, group)
    assert a.leases.held == {}


@pytest.mark.parametrize(
    ("ghost", "rewritten"),
    [
        (T0 + timedelta(days=365), True),  # a clock far ahead, or a hostile writer
        (T0 + timedelta(seconds=20), False),  # a replica that died just now: gone after the lease
    ],
)
def test_a_ghost_heartbeat_does_not_keep_the_split_off_balance(
    ghost: datetime, rewritten: bool
) -> None:
    store, clock = MemoryStore(), Clock()
    group = [replica(store, clock, name, TOPICS) for name in ("a", "b", "c")]

    def rounds(n: int) -> None:
        for _ in range(n):
            if rewritten or clock.now == T0:
                store.save_leases("ghost", clock.now, [], alive_until=ghost)
            run(clock, group)

    rounds(8)
    assert sorted(owned(group).values()) == [2, 3, 3]
    changes = sum(
        _sample(r.leases, "eventaudit_topic_lease_changes_total", change="acquired") for r in group
    )
    rounds(5)
    assert sorted(owned(group).values()) == [2, 3, 3]
    after = sum(
        _sample(r.leases, "eventaudit_topic_lease_changes_total", change="acquired") for r in group
    )
    assert after == changes  # no churn


def test_a_lease_expiring_in_a_hundred_years_is_not_believed() -> None:
    store, clock = MemoryStore(), Clock()
    key = journal_key("orders")
    store.leases[key] = Lease(key, 3, "ghost", T0 + timedelta(days=36500), ("orders",), {}, T0)
    store.claims.update({(key, e): T0 - timedelta(days=1) for e in (1, 2, 3)})
    [a] = group = [replica(store, clock, "a", ["orders"])]
    run(clock, group)
    assert a.leases.epoch(key) == 4


def test_a_paused_holders_late_tenure_never_replaces_its_successors() -> None:
    store = MemoryStore()
    gone = Tenure("orders", "old-sub", T0, T0 + timedelta(minutes=5), "")
    stale = Tenure("orders", "old-sub", T0, None, "")
    assert store.save_tenures([gone], epoch=2) == []
    assert store.save_tenures([stale], epoch=1) == [stale]
    assert store.tenures[("orders", "old-sub")] == gone
    assert store.save_tenures([stale], epoch=3) == []


def test_a_subscription_configured_only_on_a_replica_that_does_not_hold_the_topic() -> None:
    """A rolling configuration change: b expects `orders-new`, the holder does not yet. b must
    not report it (it would count every bucket since before it existed as missed)."""
    store, clock = MemoryStore(), Clock()
    clock.monotonic.update(a=0.0, b=0.0)
    a = replica(store, clock, "a", ["orders"])
    run(clock, [a], rounds=2)
    leases = Leases(store, "b", LEASE, lambda: clock.now, lambda: clock.monotonic["b"])
    expected = ExpectedSubscriptions({"orders": {"orders-sub", "orders-new"}}, set(), None)
    b = Replica("b", leases, Evaluator(store, expected, [WINDOW], BUCKET, SETTLE, leases=leases))
    traffic(store, ["orders"], clock.now - timedelta(seconds=45), 3)
    run(clock, [a, b], rounds=3)
    assert not b.leases.held
    assert b.snapshot is not None and ("orders", "orders-new") not in b.snapshot.subscriptions
    assert numbers(b.snapshot) == numbers(a.snapshot) == {("orders", "orders-sub"): (3, 3)}


def test_result_orders_are_kept_only_for_buckets_a_window_reaches() -> None:
    store, clock = MemoryStore(), Clock()
    [a] = group = [replica(store, clock, "a", ["orders"])]
    for _ in range(6 * 13):  # 13 minutes of traffic in every bucket
        traffic(store, ["orders"], clock.now - timedelta(seconds=35), 1)
        run(clock, group)
    window_buckets = int(WINDOW.length / BUCKET) + int(SETTLE / BUCKET) + 2
    assert 0 < len(a.evaluator._orders) <= window_buckets


@pytest.mark.parametrize("carried", [32, 2])
def test_the_others_learn_a_holders_results_from_its_leases_or_its_partitions(
    carried: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A holder's lease writes carry the results it stored since the last one (at most
    RECENT_RESULTS): the others read no partition. Past that, they read the partitions the
    lease names; the numbers are the same either way."""
    monkeypatch.setattr(leases_module, "RECENT_RESULTS", carried)
    store, clock = CountingStore(), Clock()
    group = [replica(store, clock, name, ["orders"]) for name in ("a", "b")]
    run(clock, group, rounds=3)
    other = next(r for r in group if not r.leases.held)
    reads = store.partition_reads
    for second in range(0, 60, 10):  # late receipts of 6 buckets at once, then traffic
        traffic(store, ["orders"], clock.now - timedelta(seconds=90 + second), 2)
    for _ in range(6):
        traffic(store, ["orders"], clock.now - timedelta(seconds=35), 1)
        run(clock, group)
    holder = next(r for r in group if r.leases.held)
    assert (
        numbers(other.snapshot) == numbers(holder.snapshot) == {("orders", "orders-sub"): (18, 18)}
    )
    assert (store.partition_reads - reads > 0) == (carried < 6)


def test_each_pass_writes_each_replicas_leases_once() -> None:
    """With the default lease (3 buckets), a pass renews every key in one write at its end,
    never one by one at its start: the others read one lease write a pass per key."""
    store, clock = MemoryStore(), Clock()
    group = [replica(store, clock, name, TOPICS) for name in ("a", "b", "c")]
    run(clock, group, rounds=8)
    before = len(store.lease_log)
    run(clock, group, rounds=3)
    assert len(store.lease_log) - before == 3 * KEYS  # each key's lease entry once a pass


def test_an_odd_lease_entry_does_not_leave_the_others_behind_for_good() -> None:
    """An entry of the holder's key, owner and epoch with a huge write count (hand-written,
    corrupt): once it is gone, the others follow the holder's writes again."""
    store, clock = MemoryStore(), Clock()
    group = [replica(store, clock, name, ["orders"]) for name in ("a", "b")]
    run(clock, group, rounds=4)
    holder = next(r for r in group if r.leases.held)
    other = next(r for r in group if r is not holder)
    [lease] = [x for x in store.leases.values()]
    store.lease_log.append(replace(lease, seq=2**61, renewed=clock.now, prev=0))
    run(clock, group)
    store.lease_log = [x for x in store.lease_log if x.seq != 2**61]
    store.leases = {lease.key: max((x for x in store.lease_log), key=lambda x: x.order)}
    for _ in range(4):
        traffic(store, ["orders"], clock.now - timedelta(seconds=35), 2)
        run(clock, group)
    assert numbers(other.snapshot) == numbers(holder.snapshot) == {("orders", "orders-sub"): (8, 8)}


def test_a_replicas_first_evaluation_reads_the_stored_results_once() -> None:
    """A restarted replica claims its topics, then reads every stored result once (after the
    claims, so whatever their previous holders stored is in it): not once for every topic
    and again for those it claimed."""
    store, clock = CountingStore(), Clock()
    group = [replica(store, clock, "a", TOPICS)]
    traffic(store, TOPICS, T0 + timedelta(seconds=5), 2)
    run(clock, group, rounds=6)
    group[0].leases.release_all()  # SIGTERM
    restarted = [replica(store, clock, "a2", TOPICS)]
    store.whole_reads = 0
    run(clock, restarted)
    assert store.whole_reads == 1
    assert len(restarted[0].leases.held) == KEYS
    expected = {(t, f"{t}-sub"): (2, 2) for t in TOPICS}
    assert numbers(restarted[0].snapshot) == expected


class CountingStore(CountsResultReads, MemoryStore):
    """MemoryStore counting its reads of stored results."""


def test_keys_whose_topics_stopped_existing_age_out_of_leases_shares_and_metrics() -> None:
    # Issue 17, case 3: 40 topics that stop existing (no traffic, no configuration, no journal)
    # were held, renewed and exported for ever.
    store, clock = MemoryStore(), Clock()
    gone = [f"gone-{i:02d}" for i in range(40)]
    clock.monotonic.setdefault("a", 0.0)
    leases = Leases(store, "a", LEASE, lambda: clock.now, lambda: clock.monotonic["a"])
    expected = ExpectedSubscriptions({"orders": {"orders-sub"}}, set(), None)
    evaluator = Evaluator(
        store, expected, [WINDOW], BUCKET, SETTLE, monotonic=lambda: clock.monotonic["a"],
        leases=leases,
    )  # fmt: skip
    a = Replica("a", leases, evaluator)
    traffic(store, gone, T0 + timedelta(seconds=5), 1)
    run(clock, [a], rounds=3)
    assert len(a.leases.held) == KEYS  # the 40 topics and the configured one, in every key
    run(clock, [a], rounds=6 * 10)  # ten minutes: past the window and the journal's grace
    assert set(a.leases.held) == {journal_key("orders")}
    written = len(store.lease_log)
    run(clock, [a], rounds=6)
    renewed = {x.key for x in store.lease_log[written:]}
    assert renewed == {journal_key("orders")}  # one key renewed a pass, not 41
    owned = [s.labels["topic"] for f in a.leases.collect() for s in f.samples
             if s.name == "eventaudit_topic_owned"]  # fmt: skip
    assert owned == ["orders"]
