"""The model-based simulation: Hypothesis picks a schedule of publishes, retries, deliveries in
any order, batches, store failures, crashes, pauses and clock steps over one to three exporter
replicas; after every evaluation the served numbers must not contradict the records, and after
a quiet period they must equal the oracle's recount, on every replica.

The same machine runs on the in-memory store (tests/sim/test_simulation.py, many schedules)
and on FerretDB (tests/integration/test_simulation.py, fewer).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from datetime import timedelta

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tests.sim.world import AUDIT, BUCKET, SUBSCRIPTIONS, Replica, World, differences

TOPICS = sorted(SUBSCRIPTIONS)
ALL_SUBSCRIPTIONS = sorted(s for subs in SUBSCRIPTIONS.values() for s in subs)
READ = [*ALL_SUBSCRIPTIONS, AUDIT]
"""What subscribers read: the audited subscriptions, and the audit topic's relayed receipts
(drained last: a relayed subscription's deliveries put receipt messages there)."""
MAX_REPLICAS = 3
QUIET_PASSES = 12
COUNTS: Counter[str] = Counter()
"""Schedules, steps and faults run in this process (printed at the end of the test session)."""


class Simulation(RuleBasedStateMachine):
    """Subclassed with `make_world` (a fresh store per schedule)."""

    make_world: Callable[[], World]

    def __init__(self) -> None:
        super().__init__()
        self.world = type(self).make_world()
        self.events: list[tuple[str, str]] = []
        self.faulty = False
        self.violations: list[str] = []
        COUNTS["schedules"] += 1

    @initialize(replicas=st.integers(1, MAX_REPLICAS))
    def start(self, replicas: int) -> None:
        for i in range(replicas):
            self.world.add_replica(f"r{i}")
        self.evaluate_all()

    # -- traffic -------------------------------------------------------------------------------

    @rule(
        topic=st.sampled_from(TOPICS),
        lose=st.sets(st.sampled_from(ALL_SUBSCRIPTIONS), max_size=1),
        skew_ms=st.sampled_from([0, 0, 0, -1, 999, -4000]),
    )
    def publish(self, topic: str, lose: set[str], skew_ms: int) -> None:
        event_id = self.world.new_event_id()
        self.world.publish(topic, event_id, clock_skew=timedelta(milliseconds=skew_ms), lose=lose)
        self.events.append((topic, event_id))

    @precondition(lambda self: bool(self.events))
    @rule(index=st.integers(0, 1000), same_payload=st.booleans())
    def retry(self, index: int, same_payload: bool) -> None:
        """A caller publishes an event again (after a timeout), same payload or not."""
        topic, event_id = self.events[index % len(self.events)]
        self.world.publish(topic, event_id, payload="{}" if same_payload else '{"v": 2}')

    @rule()
    def flush_publisher(self) -> None:
        self.world.flush_publisher()

    @rule(
        subscription=st.sampled_from(READ),
        index=st.integers(0, 1000),
        duplicate=st.booleans(),
    )
    def deliver(self, subscription: str, index: int, duplicate: bool) -> None:
        delivered = self.world.deliver(subscription, index, keep=duplicate)
        if delivered is not None and subscription == AUDIT:
            COUNTS["receipt messages relayed"] += 1

    @rule(subscription=st.sampled_from(ALL_SUBSCRIPTIONS), index=st.integers(0, 1000))
    def dead_letter(self, subscription: str, index: int) -> None:
        """Pub/Sub gives up on a message (early, or very late: `advance` makes it late)."""
        self.world.dead_letter(subscription, index)

    @rule(subscription=st.sampled_from(READ), straggle=st.booleans())
    def flush_subscriber(self, subscription: str, straggle: bool) -> None:
        """A batch written; with `straggle` its journal insert commits later (`land`), into
        whatever the exporter made of its collection meanwhile (FerretDB's rename race)."""
        self.world.flush_subscriber(subscription, straggle)
        COUNTS["fault: journal insert landing after a take"] += straggle

    @rule(subscription=st.sampled_from(READ))
    def kill_subscriber(self, subscription: str) -> None:
        """A subscriber (or the relay) killed and started again, between its writes and its
        acks: what it held comes again, what it remembered is gone."""
        self.world.kill_subscriber(subscription)
        COUNTS["fault: subscriber killed"] += 1

    @rule()
    def land(self) -> None:
        self.world.land()

    # -- time and exporters --------------------------------------------------------------------

    @rule(seconds=st.sampled_from([1, 3, 5, 10, 10, 10, 25, 45, 600]))
    def advance(self, seconds: int) -> None:
        self.world.advance(seconds)

    @rule(index=st.integers(0, MAX_REPLICAS - 1))
    def evaluate(self, index: int) -> None:
        replica = self.world.replicas[index % len(self.world.replicas)]
        self.world.evaluate(replica)
        self.check_served(replica)

    @rule()
    def evaluate_all(self) -> None:
        for replica in self.world.replicas:
            self.world.evaluate(replica)
            self.check_served(replica)

    @precondition(lambda self: len(self.world.replicas) < MAX_REPLICAS)
    @rule()
    def add_replica(self) -> None:
        self.world.add_replica(f"r{len(self.world.replicas)}")

    # -- faults --------------------------------------------------------------------------------

    @rule(calls=st.integers(1, 4))
    def store_fails(self, calls: int) -> None:
        """The next `calls` store operations raise (a timeout, a failover)."""
        self.world.store.fail_next = calls  # type: ignore[attr-defined]
        self.faulty = True
        COUNTS["fault: store calls failed"] += calls

    @rule(index=st.integers(0, MAX_REPLICAS - 1), seconds=st.sampled_from([3, 20, 40]))
    def slow_store(self, index: int, seconds: int) -> None:
        """One pass whose store answers `seconds` late (past the lease's margin, or the lease)."""
        replica = self.world.replicas[index % len(self.world.replicas)]
        self.world.evaluate_slowly(replica, seconds)
        self.check_served(replica)
        COUNTS["fault: slow store"] += 1

    @rule(index=st.integers(0, MAX_REPLICAS - 1))
    def crash(self, index: int) -> None:
        """SIGKILL and restart: its memory is lost, the store keeps what it wrote."""
        COUNTS["fault: crash"] += 1
        self.world.start(self.world.replicas[index % len(self.world.replicas)])

    @rule(index=st.integers(0, MAX_REPLICAS - 1))
    def pause(self, index: int) -> None:
        """SIGSTOP (a long GC, a frozen VM): its clocks stop, it evaluates nothing."""
        self.world.replicas[index % len(self.world.replicas)].paused = True
        self.faulty = True
        COUNTS["fault: pause"] += 1

    @rule(index=st.integers(0, MAX_REPLICAS - 1))
    def resume(self, index: int) -> None:
        self.world.replicas[index % len(self.world.replicas)].paused = False

    @rule(
        index=st.integers(0, MAX_REPLICAS - 1),
        seconds=st.sampled_from([-4500, -600, -5, 5, 600, 4500]),
    )
    def clock_step(self, index: int, seconds: int) -> None:
        """One replica's wall clock steps (NTP, a VM migration); its monotonic clock does not."""
        replica = self.world.replicas[index % len(self.world.replicas)]
        replica.offset += timedelta(seconds=seconds)
        self.faulty = True
        COUNTS["fault: clock step"] += 1

    # -- the invariant -------------------------------------------------------------------------

    def check_served(self, replica: Replica) -> None:
        """Whatever the faults: nothing claimed missed that the records show received before
        its bucket settled, and no count above the records'."""
        if replica.snapshot is None:
            return
        false = self.world.false_misses(replica)
        assert not false, f"{replica.name} lists received events as missed: {false}"
        served, expected = self.world.served(replica), self.world.expected(replica)
        for key, numbers in served.items():
            truth = expected.get(key)
            assert truth is not None, f"{replica.name} serves {key}, which the records lack"
            published, received, duplicates = numbers[:3]
            assert published <= truth[0] and received <= truth[1], (
                f"{replica.name} {key}: served {numbers}, the records {truth}"
            )
            assert duplicates <= truth[2], f"{replica.name} {key}: {numbers} vs {truth}"

    @rule()
    def quiet(self) -> None:
        """The faults end (clocks corrected, processes resumed, the store back, every waiting
        message delivered): after the settle delay every replica serves the oracle's numbers."""
        world = self.world
        world.store.fail_next = 0  # type: ignore[attr-defined]
        for replica in world.replicas:
            replica.paused, replica.offset = False, timedelta(0)
        world.flush_publisher()
        world.land()
        for sub in READ:
            while world.pending[sub]:
                world.deliver(sub, 0)
            world.flush_subscriber(sub)
        for _ in range(QUIET_PASSES):
            world.advance(10)
            for replica in world.replicas:
                world.evaluate(replica)
        for replica in world.replicas:
            snapshot = replica.snapshot
            assert snapshot is not None, f"{replica.name} serves nothing once quiet"
            for topic in TOPICS:  # every topic served to its holder's latest pass
                lag = snapshot.frontier - snapshot.frontier_of(topic)
                assert timedelta(0) <= lag <= BUCKET, f"{replica.name} {topic} lags {lag}"
            wrong = differences(world.served(replica), world.expected(replica))
            assert not wrong, f"{replica.name} once quiet, (served, truth): {wrong}"
            stories = {k: v for k, v in world.story_verdicts(replica).items() if v[0] != v[1]}
            assert not stories, f"{replica.name} once quiet, (story, truth): {stories}"
        self.faulty = False

    @invariant()
    def never_negative(self) -> None:
        COUNTS["steps"] += 1
        for replica in self.world.replicas:
            if replica.snapshot is None:
                continue
            for windows in replica.snapshot.subscriptions.values():
                for stats in windows.values():
                    assert 0 <= stats.received <= stats.published, stats

    def teardown(self) -> None:
        if self.world.replicas:
            self.quiet()
