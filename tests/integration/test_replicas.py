"""Three exporter processes on one FerretDB database, with traffic through the emulator: the
topics are split evenly, a SIGKILLed holder's topics are taken over within the lease time
plus one bucket with every event counted once, a SIGSTOPped holder's late writes are refused
and counted, and every replica serves the same numbers."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from eventaudit.journal_reader import JOURNAL_DROP_GRACE
from eventaudit.partitions import JOURNAL_KEYS, journal_key, lease_slot, partitions_of
from eventaudit.records import BUCKET_COLLECTION, Lease
from eventaudit.store import MongoStore
from tests.conftest import PROJECT, Ferret, service_env, unique, wait_for
from tests.fakes import CountsResultReads
from tests.integration.harness import audited_publisher, audited_subscriber, received_count
from tests.integration.http_client import metric
from tools import stack

log = logging.getLogger(__name__)

LEASE = 4.0  # seconds: the shortest the exporter accepts with 1 s buckets
BUCKET = 1.0
REPLICAS = ("r0", "r1", "r2")
TOPICS = 30


@dataclass
class Cluster:
    store: MongoStore
    topics: list[str]
    ports: dict[str, int]
    procs: dict[str, stack.Service] = field(default_factory=dict)

    def metric(self, replica: str, name: str, **labels: str) -> float | None:
        return metric(f"http://127.0.0.1:{self.ports[replica]}/metrics", name, labels)

    def held(self, replica: str) -> int:
        return int(self.metric(replica, "eventaudit_topic_leases_held") or 0)

    def leases(self) -> list[Lease]:
        """Each key's latest lease entry."""
        now = datetime.now(UTC)
        every = self.store.load_leases(
            now - timedelta(minutes=2), now + timedelta(minutes=1)
        ).leases
        return list({x.key: x for x in sorted(every, key=lambda x: x.order)}.values())

    def lease(self, topic: str) -> Lease:
        [lease] = [x for x in self.leases() if x.key == journal_key(topic)]
        return lease

    def owner(self, topic: str) -> str:
        return self.lease(topic).owner


@pytest.fixture
def cluster(ferret: Ferret, emulator: str, tmp_path: Path) -> Iterator[Cluster]:
    env = service_env(ferret, emulator)
    topics = [unique(f"rt{i:02d}") for i in range(TOPICS)]
    while len({journal_key(t) for t in topics}) < JOURNAL_KEYS:  # every key has topics
        topics.append(unique(f"rt{len(topics):02d}"))
    for topic in topics:
        stack.create_topic(PROJECT, topic, [f"{topic}-sub"])
    store = MongoStore(ferret.uri, env["EVENTAUDIT_DATABASE"])
    c = Cluster(store, topics, {r: stack.free_port() for r in REPLICAS})
    args = [
        "--bucket",
        "1s",
        "--settle-delay",
        "2s",
        "--windows",
        "5m",
        "--lease-seconds",
        f"{LEASE:g}",
        "--topics",
        ",".join(topics),
    ]
    try:
        for r in REPLICAS:
            port = c.ports[r]
            c.procs[r] = stack.python_service(
                f"exporter-{r}",
                "exporter",
                ["--listen-address", f"127.0.0.1:{port}", "--replica-id", r, *args],
                tmp_path,
                env,
                f"http://127.0.0.1:{port}/healthz",
            ).start()
        wait_for(lambda: sorted(c.held(r) for r in REPLICAS) == [2, 3, 3], 60, "8 keys split")
        yield c
    finally:
        for proc in c.procs.values():
            with contextlib.suppress(ProcessLookupError):
                if proc.proc is not None:
                    os.kill(proc.proc.pid, signal.SIGCONT)
            proc.stop(timeout=30)
        store.close()


@contextlib.contextmanager
def traffic(store: MongoStore, topics: list[str]) -> Iterator[dict[str, int]]:
    """Publish one event per topic every 50 ms, received by each topic's subscription, until
    the block ends; yields how many were published per topic (all resolved at the end)."""
    published = dict.fromkeys(topics, 0)
    stop = threading.Event()
    with contextlib.ExitStack() as stack_:
        pub = stack_.enter_context(audited_publisher(store))
        for topic in topics:
            stack_.enter_context(audited_subscriber(store, topic, f"{topic}-sub"))

        def run() -> None:
            events = []
            while not stop.is_set():
                for topic in topics:
                    events.append(pub.publisher.publish(topic, {"n": published[topic]}))
                    published[topic] += 1
                stop.wait(0.05)
            for e in events:
                e.message_id(timeout=30)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        try:
            yield published
        finally:
            stop.set()
            thread.join(timeout=60)
            assert pub.publisher.flush(timeout=30)
            for topic in topics:
                _all_received(store, topic, published[topic])


def _all_received(store: MongoStore, topic: str, published: int) -> None:
    wait_for(lambda: received_count(store, f"{topic}-sub") == published, 60, f"receipts on {topic}")


def _window_numbers(c: Cluster, replica: str, topic: str) -> tuple[float | None, float | None]:
    labels = {"topic": topic, "window": "5m"}
    return (
        c.metric(replica, "eventaudit_published_events", **labels),
        c.metric(replica, "eventaudit_received_events", subscription=f"{topic}-sub", **labels),
    )


def _results(store: MongoStore, topic: str) -> list[dict]:
    names = partitions_of(store.db.list_collection_names(), BUCKET_COLLECTION)
    return [d for n in names for d in store.db[n].find({"topic": topic})]


def _settled(c: Cluster, replicas: list[str], topic: str, published: int) -> None:
    seen: dict[str, tuple[float | None, float | None]] = {}

    def settled() -> bool:
        seen.update({r: _window_numbers(c, r, topic) for r in replicas})
        return all(n == (published, published) for n in seen.values())

    started = time.monotonic()
    try:
        # Usually within seconds. On FerretDB 1.24 an insert racing the rename of a journal
        # collection can land in it after it was read: the holder folds it again once
        # JOURNAL_DROP_GRACE has passed (counted late, not lost).
        wait_for(settled, JOURNAL_DROP_GRACE + 30, f"{published} events of {topic} counted")
    except BaseException:
        log.error("(published, received) of %s per replica: %s", topic, seen)
        db = c.store.db
        log.error(
            "journal collections: %s",
            {n: db[n].count_documents({}) for n in db.list_collection_names() if "Journal" in n},
        )
        raise
    log.info(
        "%s: %s counted on %s after %.1fs", topic, published, replicas, time.monotonic() - started
    )


def test_a_killed_holders_topics_are_taken_over_and_every_event_counted_once(
    cluster: Cluster,
) -> None:
    c = cluster
    topic = c.topics[0]
    victim = c.owner(topic)
    control = next(t for t in c.topics if c.owner(t) != victim)
    before = c.lease(topic)
    with traffic(c.store, [topic, control]) as published:
        time.sleep(3)
        c.procs[victim].kill()
        killed = datetime.now(UTC)
        wait_for(lambda: c.lease(topic).epoch > before.epoch, 3 * LEASE, "a new holder")
        time.sleep(3)
    after = c.lease(topic)
    claim = c.store.db["ExporterState"].find_one({"_id": f"claim|{after.key}|{after.epoch}"})
    assert claim is not None
    takeover = (claim["claimed"] - killed).total_seconds()
    first = min(
        (d["evaluatedTime"] for d in _results(c.store, topic) if d.get("epoch") == after.epoch),
        default=None,
    )
    assert first is not None
    log.info(
        "failover: kill -> claim %.2fs (lease %gs + bucket %gs), first evaluation by %s at "
        "+%.2fs; %s",
        takeover,
        LEASE,
        BUCKET,
        after.owner,
        (first - killed).total_seconds(),
        published,
    )
    assert after.owner != victim and 0 < takeover <= LEASE + BUCKET + 0.5
    survivors = [r for r in REPLICAS if r != victim]
    wait_for(lambda: sorted(c.held(r) for r in survivors) == [4, 4], 20, "4 keys each")
    # No bucket skipped, none counted twice: exactly what was published, on both survivors.
    for t in (topic, control):
        _settled(c, survivors, t, published[t])


def test_a_paused_holders_late_writes_are_refused_and_counted(cluster: Cluster) -> None:
    c = cluster
    topic = c.topics[1]
    victim = c.owner(topic)
    held = [lease for lease in c.leases() if lease.owner == victim]
    n = len(held)
    assert n in (2, 3)  # of the 8 keys
    process = c.procs[victim].proc
    assert process is not None
    pid = process.pid
    fenced = c.metric(victim, "eventaudit_lease_fenced_writes_total") or 0.0
    lost = c.metric(victim, "eventaudit_topic_lease_changes_total", change="lost") or 0.0
    with traffic(c.store, [topic]) as published:
        time.sleep(2)
        os.kill(pid, signal.SIGSTOP)
        stopped = datetime.now(UTC)
        others = [r for r in REPLICAS if r != victim]
        wait_for(lambda: sorted(c.held(r) for r in others) == [4, 4], 20, "a takeover")
        os.kill(pid, signal.SIGCONT)
        wait_for(
            lambda: (c.metric(victim, "eventaudit_lease_fenced_writes_total") or 0) >= fenced + n,
            20,
            "the paused replica's writes refused",
        )
    # Each of the keys it held: one write refused, then nothing more tried for it.
    assert c.metric(victim, "eventaudit_lease_fenced_writes_total") == fenced + n
    assert c.metric(victim, "eventaudit_topic_lease_changes_total", change="lost") == lost + n
    # Nothing it wrote after the others took over: no result under its old epochs since.
    epochs = {lease.key: lease.epoch for lease in held}
    late = [
        d
        for lease in held
        for t in lease.topics
        for d in _results(c.store, t)
        if d.get("epoch") == epochs[lease.key] and d["evaluatedTime"] > stopped
    ]
    assert late == []
    wait_for(lambda: sorted(c.held(r) for r in REPLICAS) == [2, 3, 3], 30, "rebalanced")
    _settled(c, list(REPLICAS), topic, published[topic])


def test_three_replicas_on_ferretdb_split_the_topics_and_serve_the_same_numbers(
    store: MongoStore,
) -> None:
    """The in-memory scenario of tests/unit/test_replicas.py, on FerretDB: the real store's
    leases, claims and versioned results agree with the fake's."""
    from tests.unit import test_replicas as memory

    clock = memory.Clock()
    replicas = [memory.replica(store, clock, name, memory.TOPICS) for name in ("a", "b", "c")]
    memory.traffic(store, memory.TOPICS, memory.T0 + timedelta(seconds=5), 3, lost=1)
    memory.run(clock, replicas, rounds=8)
    assert sorted(memory.owned(replicas).values()) == [2, 3, 3]
    expected = {(t, f"{t}-sub"): (3, 2) for t in memory.TOPICS}
    assert [memory.numbers(r.snapshot) for r in replicas] == [expected] * 3


def test_ferretdb_enforces_what_fencing_relies_on(store: MongoStore) -> None:
    """One claim of an epoch succeeds; a lease or tenure of an earlier epoch never replaces a
    later one's; hostile claim and lease documents are read without raising."""
    from eventaudit.records import Tenure

    now = datetime.now(UTC).replace(microsecond=0)
    key = journal_key("orders")
    assert store.claim_epoch(key, 1, "a", now) is None
    assert store.claim_epoch(key, 1, "b", now) == now  # taken, and when
    assert list(store.claimed_epochs([(key, 1), (key, 2)])) == [(key, 1)]
    store.db["ExporterState"].insert_one({"_id": f"claim|{key}|2", "claimed": "soon"})
    assert store.claim_epoch(key, 2, "b", now) == datetime(1970, 1, 1, tzinfo=UTC)  # stale
    # Lease documents are inserted; the latest epoch of a key counts, then the latest write,
    # whatever order they were written in (a paused holder's late renewal changes nothing).
    later = Lease(key, 5, "b", now, ("orders",), {600_000: (5, 7)}, now, seq=1)
    renewed = replace(
        later, renewed=now + timedelta(seconds=10), expires=now + timedelta(seconds=30), seq=2
    )
    store.save_leases("b", now, [later, renewed])
    late = Lease(key, 4, "a", now, ("orders",), {}, now + timedelta(seconds=20), 3)
    store.save_leases("a", now + timedelta(seconds=20), [late])
    other = Lease(journal_key("payments"), 1, "a", now, ("payments",), {}, now)
    store.save_leases("a", now, [other])
    store.db[lease_slot(now)].insert_many(
        [{"_id": "x", "key": "x", "epoch": "1"}, {"_id": "y", "key": "y", "epoch": 2**62}]
    )
    window = (now - timedelta(minutes=1), now + timedelta(minutes=1))
    every = store.load_leases(*window).leases
    assert len(every) == 4  # every entry: the chain of a key's writes is read too
    latest = {x.key: x for x in sorted(every, key=lambda x: x.order)}
    assert latest == {key: renewed, other.key: other}
    # Told results are kept apart; one that cannot be stored never stops the lease.
    huge = {"_id": "r", "blob": "x" * (5 * 2**20)}
    told = Lease(journal_key("news"), 1, "a", now, ("news",), {}, now, 9, 0, (huge, {"a": 1}))
    store.save_leases("a", now, [told])
    [read] = [x for x in store.load_leases(*window).leases if x.key == told.key]
    assert (read.told, read.recent) == (2, ())  # too big for a news document: read from partitions
    # One document per save (a replica renews all its leases at once), in its slot; the
    # slots before `forget_before` are dropped.
    slots = {lease_slot(now + timedelta(seconds=s)) for s in (0, 20)}
    assert slots <= set(store.db.list_collection_names())
    after = now + timedelta(minutes=3)
    store.save_leases("a", after, [], alive_until=after, forget_before=now + timedelta(minutes=2))
    assert not slots & set(store.db.list_collection_names())
    assert store.load_leases(*window).leases == []
    gone = Tenure("orders", "old-sub", now, now, "")
    stale = Tenure("orders", "old-sub", now, None, "")
    assert store.save_tenures([gone], epoch=5) == []
    assert store.save_tenures([stale], epoch=4) == [stale]
    assert store.load_tenures() == [gone]


class _CountingStore(CountsResultReads, MongoStore):
    """MongoStore counting its reads of stored results."""


def test_on_ferretdb_the_others_take_a_holders_results_from_its_lease_writes(
    ferret: Ferret,
) -> None:
    """The default lease (3 buckets): each pass, a replica that does not hold the topic takes
    the results the holder stored from its lease writes, and reads no result partition."""
    from tests.unit import test_replicas as memory

    store = _CountingStore(ferret.uri, unique("db").replace("-", "_"))
    try:
        clock = memory.Clock()
        group = [memory.replica(store, clock, name, ["orders"]) for name in ("a", "b")]
        memory.run(clock, group, rounds=4)
        reads = store.partition_reads
        for _ in range(6):
            memory.traffic(store, ["orders"], clock.now - timedelta(seconds=35), 2)
            memory.run(clock, group)
        assert store.partition_reads == reads
        numbers = [memory.numbers(r.snapshot) for r in group]
        assert numbers == [{("orders", "orders-sub"): (12, 12)}] * 2
    finally:
        store.close()
