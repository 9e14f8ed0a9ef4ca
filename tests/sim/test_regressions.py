"""Schedules the simulation found (or the issue listed), each replayed by hand and named."""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime, timedelta

from eventaudit.partitions import journal_key
from eventaudit.store import StoredResult, StoreError
from tests.fakes import MemoryStore
from tests.sim.world import World, differences, memory_records


def memory_world() -> World:
    store = MemoryStore()
    return World(store, memory_records(store))


def quiet(world: World, passes: int = 12) -> None:
    """Faults over: every replica evaluates once per bucket until everything has settled."""
    for _ in range(passes):
        world.advance(10)
        for replica in world.replicas:
            world.evaluate(replica)


def assert_agree(world: World) -> None:
    for replica in world.replicas:
        assert replica.snapshot is not None, replica.name
        assert differences(world.served(replica), world.expected(replica)) == {}


def test_a_retry_delivered_before_the_first_publish_counts_received_once_with_a_duplicate() -> None:
    world = memory_world()
    world.add_replica("a")
    quiet(world, 1)
    first = world.publish("orders", "e-retried")
    world.advance(15)
    world.flush_publisher()
    retry = world.publish("orders", "e-retried")
    world.flush_publisher()  # the retry's record is refused: the first one stands
    sub = "orders-billing"
    world.pending[sub] = [retry, first]  # Pub/Sub delivers the retry first
    world.deliver(sub, 0)
    world.flush_subscriber(sub)
    world.deliver(sub, 0)
    world.flush_subscriber(sub)
    quiet(world)
    assert_agree(world)
    [replica] = world.replicas
    assert replica.snapshot is not None
    stats = replica.snapshot.subscriptions[("orders", sub)]["5m"]
    assert (stats.published, stats.received, stats.duplicates, stats.unmatched) == (1, 1, 1, 0)
    # The event's story says so too (it said "received late").
    verdicts = world.story_verdicts(replica)
    assert verdicts[("orders", sub, "e-retried")] == ("received", "received")


def test_a_restarted_replica_whose_clock_is_75_minutes_behind_loses_nothing() -> None:
    world = memory_world()
    [replica] = [world.add_replica("a")]
    world.evaluate(replica)
    world.publish("orders", "e1")
    world.flush_publisher()
    world.start(replica)  # a restart...
    replica.offset = timedelta(seconds=-4500)  # ...with the clock 75 minutes behind
    world.evaluate(replica)
    replica.offset = timedelta(0)
    for sub in ("orders-billing", "orders-mailer"):
        world.deliver(sub, 0)
        world.flush_subscriber(sub)
    quiet(world)
    assert_agree(world)


def test_a_journal_insert_landing_in_a_taken_collection_is_never_a_false_miss() -> None:
    # Issue 17, case 9 (no fault at all): on FerretDB an insert racing the exporter's rename
    # commits into the taken collection after the exporter read it.
    world = memory_world()
    [replica] = [world.add_replica("a")]
    world.evaluate(replica)
    world.publish("orders", "e1")
    world.flush_publisher()
    world.deliver("orders-billing", 0)
    world.flush_subscriber("orders-billing", straggle=True)
    world.advance(10)
    world.evaluate(replica)  # takes the collection the insert looked up, before it commits
    world.land()  # committed into the taken collection; the subscriber acks
    for _ in range(5):  # every pass until the bucket has long settled
        world.advance(10)
        world.evaluate(replica)
        assert world.false_misses(replica) == []
    assert replica.snapshot is not None
    stats = replica.snapshot.subscriptions[("orders", "orders-billing")]["1m"]
    assert (stats.published, stats.received) == (1, 1)


def test_a_retry_in_the_same_publisher_batch_as_the_first_publish_counts_received() -> None:
    # Found by the simulation: the first publish and the caller's retry in one record batch,
    # in two buckets; only the retry delivered.
    world = memory_world()
    world.add_replica("a")
    world.add_replica("b")
    world.publish("orders", "e1", clock_skew=timedelta(milliseconds=-1), lose={"orders-billing"})
    world.publish("orders", "e1", payload='{"v": 2}')
    world.flush_publisher()
    for replica in world.replicas:
        world.evaluate(replica)
    for sub in ("orders-billing", "orders-mailer", "orders-mailer"):
        world.deliver(sub, 0)
        world.flush_subscriber(sub)
    quiet(world)
    assert_agree(world)


def test_a_replica_whose_clock_steps_75_minutes_ahead_seizes_no_lease() -> None:
    # Issue 17, case 4: a non-holder's wall clock steps ahead; the holder's leases must not
    # look expired to it.
    world = memory_world()
    a, b = world.add_replica("a"), world.add_replica("b")
    quiet(world, 3)
    assert a.leases is not None and b.leases is not None
    held = (set(a.leases.held), set(b.leases.held))
    assert held[0] and held[1]  # two topics, one each
    for step in (75, 0, 75, 75, 0, -75, 0):  # stepped for one or two evaluations at a time
        b.offset = timedelta(minutes=step)
        world.advance(10)
        world.evaluate(a)
        world.evaluate(b)
        assert (set(a.leases.held), set(b.leases.held)) == held
    assert a.snapshot is not None and b.snapshot is not None


class ResultReadsFail(MemoryStore):
    """Fails the next `fail_reads` reads of stored results (a timeout on the takeover read)."""

    fail_reads = 0

    def load_results(
        self,
        since: datetime,
        topics: Collection[str] | None = None,
        partitions: Collection[int] | None = None,
    ) -> list[StoredResult]:
        if self.fail_reads:
            self.fail_reads -= 1
            raise StoreError("injected: reading results timed out")
        return super().load_results(since, topics, partitions)


def test_a_takeover_whose_first_read_of_the_stored_results_fails_reads_them_again() -> None:
    # Issue 17, case 2: the new holder folded onto what it had seen (nothing) and stored (0, 0)
    # under its higher epoch, for every replica to serve.
    store = ResultReadsFail()
    world = World(store, memory_records(store))
    a, b = world.add_replica("a"), world.add_replica("b")
    world.evaluate(a)
    world.evaluate(b)  # b's view of the stored results: empty
    for i in range(9):
        world.publish("orders", f"e{i}", lose={"orders-mailer"})
    world.flush_publisher()
    for i in range(9):  # each delivered, none acked yet as far as Pub/Sub knows
        world.deliver("orders-billing", i, keep=True)
    world.flush_subscriber("orders-billing")
    for _ in range(6):  # a alone evaluates: it holds both topics and stores (9, 9)
        world.advance(10)
        world.evaluate(a)
    a.paused = True  # a stops renewing: b takes over once the lease ran out
    world.advance(40)
    store.fail_reads = 1  # b's takeover read of the stored results fails once
    world.evaluate(b)
    world.deliver("orders-billing", 0)  # a duplicate, folded by b as the new holder
    world.flush_subscriber("orders-billing")
    for _ in range(3):
        world.advance(10)
        world.evaluate(b)
    assert b.snapshot is not None
    stats = b.snapshot.subscriptions[("orders", "orders-billing")]["5m"]
    assert (stats.published, stats.received, stats.duplicates) == (9, 9, 1)
    a.paused = False
    quiet(world)
    assert_agree(world)


def test_a_restarted_exporter_serves_no_bucket_its_dead_predecessor_had_not_settled() -> None:
    # Issue 17, case 10: SIGKILLed and restarted (under a new name, as a new pod), it served the
    # dead process's stored result for one evaluation: an event listed missed whose receipt
    # was written just after that result.
    world = memory_world()
    old = world.add_replica("old")
    world.evaluate(old)
    world.advance(10)
    world.publish("orders", "e1")
    world.flush_publisher()
    for _ in range(4):
        world.advance(9)
        world.evaluate(old)  # stores e1's bucket, not settled yet: e1 missed so far
    world.deliver("orders-billing", 0)
    world.flush_subscriber("orders-billing")  # acked 1 ms... or a second later
    world.advance(1)
    world.replicas.remove(old)  # SIGKILL: its lease runs on for 30 s
    new = world.add_replica("new")
    for _ in range(5):
        world.advance(10)
        world.evaluate(new)
        assert world.false_misses(new) == []
    assert new.snapshot is not None
    stats = new.snapshot.subscriptions[("orders", "orders-billing")]["1m"]
    assert (stats.published, stats.received) == (1, 1)


def test_a_holder_resumed_after_a_pause_past_its_lease_serves_nothing_superseded() -> None:
    # Issue 17, cases 8 and 11: its first pass after resuming served its pre-pause numbers (or
    # counted the buckets folded while it was paused as empty) while the new holder served
    # newer ones.
    world = memory_world()
    a = world.add_replica("a")
    quiet(world, 2)  # a holds both topics
    b = world.add_replica("b")
    for _ in range(3):
        world.advance(10)
        world.evaluate(a)
        world.evaluate(b)
    a.paused = True
    for i in range(6):  # b takes over and folds what arrives meanwhile
        world.publish("orders", f"e{i}")
        world.flush_publisher()
        world.deliver("orders-billing", 0)
        world.flush_subscriber("orders-billing")
        world.advance(10)
        world.evaluate(b)
    a.paused = False
    world.advance(1)
    world.evaluate(a)  # its first pass after resuming
    assert a.snapshot is not None and b.snapshot is not None
    for topic in ("orders", "users"):
        assert a.snapshot.frontier_of(topic) == b.snapshot.frontier_of(topic)
    assert differences(world.served(a), world.expected(a)) == {}
    assert world.served(a) == world.served(b)


def test_replicas_with_clocks_5_seconds_apart_serve_a_topic_to_its_holders_frontier() -> None:
    # Issue 17, case 12: each replica served every topic to its own frontier, so with clocks
    # 5 s apart the same query got two answers half the time. Now a topic is served to the
    # frontier its holder settled, on both (the other reads it at its next pass).
    world = memory_world()
    a, b = world.add_replica("a"), world.add_replica("b")
    b.offset = timedelta(seconds=5)
    quiet(world, 3)
    b.offset = timedelta(seconds=5)  # quiet put it right
    assert a.leases is not None and b.leases is not None
    differed = 0
    for i in range(20):
        world.publish("orders", f"e{i}")
        world.publish("users", f"u{i}")
        world.flush_publisher()
        world.advance(3)
        for holder, other in ((a, b), (b, a)):
            world.evaluate(holder)
            world.evaluate(other)
            assert holder.snapshot is not None and other.snapshot is not None
            differed += holder.snapshot.frontier != other.snapshot.frontier
            for topic in ("orders", "users"):
                if holder.leases is not None and journal_key(topic) in holder.leases.held:
                    assert other.snapshot.frontier_of(topic) == holder.snapshot.frontier_of(topic)
                    assert other.snapshot.published[topic] == holder.snapshot.published[topic]
    assert differed > 0  # their own frontiers did differ
