"""A small world of publishers, Pub/Sub, subscribers and exporter replicas over virtual time.

It drives the real code: records are built from the message contract (`build_attributes`,
`read_attributes`), written through the store's writer methods (`insert_publish_records`,
`record_receipts`), and evaluated by real `Evaluator`s with real `Leases`, each replica with
its own wall clock (skew and steps) and monotonic clock (pauses). Pub/Sub is a list of
messages waiting per subscription, delivered in whatever order the schedule says; a push
subscription's deliveries go through Pub/Sub's push envelope (`PUSHED`), and a subscription read
by a consumer in another language through receipt messages the relay records (`RELAYED`).

The world keeps what it needs to judge the numbers and nothing the numbers are made of:
which receipts were acknowledged when (a receipt is durable once its batch's write returned,
which is when the subscriber acks). The truth itself is `tests.sim.oracle.recount` over what
the store holds.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, cast

from prometheus_client import CollectorRegistry

from eventaudit.contract import (
    TraceContext,
    build_attributes,
    epoch_ms,
    read_attributes,
)
from eventaudit.exporter.buckets import Window
from eventaudit.exporter.evaluator import Evaluator
from eventaudit.exporter.leases import Leases
from eventaudit.exporter.snapshot import Snapshot, SubscriptionWindow, list_missed
from eventaudit.exporter.story import event_story
from eventaudit.exporter.subscriptions import ExpectedSubscriptions
from eventaudit.push.envelope import parse_envelope, push_body
from eventaudit.records import PublishRecord
from eventaudit.store import AuditStore, StoreError
from eventaudit.subscriber import audited as subscriber_module
from eventaudit.subscriber.audited import (
    DEAD_LETTER_ATTEMPTS,
    DEAD_LETTER_SOURCE,
    AuditedSubscriber,
    SubscriberMetrics,
)
from tests.sim.oracle import Truth, recount

BUCKET = timedelta(seconds=10)
SETTLE = timedelta(seconds=30)
LEASE = timedelta(seconds=30)
IN_FLIGHT = timedelta(seconds=10)
"""The longest a journal insert racing a rename is in flight: FerretDB's SQLite busy timeout"""
WINDOWS = (Window("1m", timedelta(minutes=1)), Window("5m", timedelta(minutes=5)))
# Two minutes before an hour boundary: schedules cross it.
T0 = datetime(2026, 11, 29, 12, 58, 0, tzinfo=UTC)
PROJECT = "sim"
SUBSCRIPTIONS: dict[str, tuple[str, ...]] = {
    "orders": ("orders-billing", "orders-mailer"),
    "users": ("users-mailer",),
}
RELAYED = frozenset({"orders-mailer"})
"""Subscriptions read by consumers in another language: each delivery is handled, a receipt
message (docs/receipts.md) published to the audit topic, and the message acked at once; the
relay (an AuditedSubscriber with `relayed_for`) records the receipt when it reads it."""
AUDIT = "receipts-relay"
"""The audit topic's subscription the relay reads."""
PUSHED = frozenset({"users-mailer"})
"""Push subscriptions: each delivery is Pub/Sub's push envelope, encoded as Pub/Sub sends it
(publish time in nanoseconds) and read back by eventaudit.push.envelope, then audited by the
same AuditedSubscriber as a pulled message (as PushReceiver does)."""


@dataclass
class Delivery:
    """One delivery of a message to a subscriber: what AuditedSubscriber takes of
    google.cloud.pubsub_v1's Message; its ack and nack tell the world."""

    world: World
    subscription: str
    message: Message
    attributes: dict[str, str]
    publish_time: datetime
    delivery_attempt: int | None = None
    message_id: str = ""

    def __post_init__(self) -> None:
        self.message_id = self.message.message_id

    def ack(self) -> None:
        self.world.settled(self, True)

    def nack(self) -> None:
        self.world.settled(self, False)

    def ack_with_response(self) -> Future[Any]:
        self.ack()
        done: Future[Any] = Future()
        done.set_result(None)
        return done


class Records(Protocol):
    """What the oracle reads: every stored record, as documents."""

    def records(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
        """(publish records, receipts, dead letters)"""
        ...


@dataclass
class Message:
    """A message Pub/Sub accepted: the same on every subscription of its topic."""

    topic: str
    event_id: str
    attributes: dict[str, str]
    message_id: str
    broker_time: datetime
    payload: str
    told: tuple[str, Message] | None = None
    """For a receipt message: the subscription and the message whose delivery it tells of."""


def relay_attributes(message: Message, subscription: str, now: datetime) -> dict[str, str]:
    """The receipt message a consumer in another language publishes for `message`."""
    copied = {k: v for k, v in message.attributes.items() if k in ("eventID", "publishTime",
                                                                     "traceparent")}  # fmt: skip
    return {
        **copied,
        "ea.subscription": subscription,
        "ea.topic": message.topic,
        "ea.messageId": message.message_id,
        "ea.publishTime": str(epoch_ms(message.broker_time)),
        "ea.receiveTime": str(epoch_ms(now)),
    }


def push_envelope(message: Message, subscription: str) -> bytes:
    """The body Pub/Sub POSTs to a push endpoint for `message`."""
    return push_body(
        PROJECT, subscription, message.message_id, message.broker_time,
        message.payload.encode(), message.attributes,
    )  # fmt: skip


@dataclass
class Replica:
    """One exporter process: its clocks, its memory (lost on a crash) and what it serves."""

    name: str
    offset: timedelta = timedelta(0)
    """its wall clock minus the true time (a skew, or a step)"""
    monotonic: float = 0.0
    paused: bool = False
    """stopped (SIGSTOP): it evaluates nothing, its clocks run on"""
    evaluator: Evaluator | None = None
    leases: Leases | None = None
    snapshot: Snapshot | None = None
    """what it serves: the last evaluation, if that one succeeded"""
    windows: tuple[Window, ...] = WINDOWS


@dataclass
class World:
    store: AuditStore
    records: Records
    now: datetime = T0
    replicas: list[Replica] = field(default_factory=list)
    pending: dict[str, list[Message]] = field(default_factory=dict)
    """per subscription, what Pub/Sub will deliver (unacked), in no particular order"""
    buffer: list[PublishRecord] = field(default_factory=list)
    """the publisher's record buffer: records of published messages not yet written"""
    acked: dict[tuple[str, str, int], datetime] = field(default_factory=dict)
    """(subscription, eventID, hour) -> when its receipt was first made durable (its batch
    acked); the hour of its publish time, as records are keyed"""
    landing: list[Delivery] = field(default_factory=list)
    """deliveries whose receipts are written and whose journal insert is still committing
    (the subscriber acks once it returns)"""
    subscribers: dict[str, AuditedSubscriber] = field(default_factory=dict)
    """one AuditedSubscriber per subscription, and one per topic's dead-letter subscription"""
    _acks_held: list[Delivery] | None = None
    _in_flight_since: datetime | None = None
    lost: set[tuple[str, str]] = field(default_factory=set)
    """(subscription, eventID) Pub/Sub will never deliver"""
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def __post_init__(self) -> None:
        for topic, subs in SUBSCRIPTIONS.items():
            for sub in [*subs, f"{topic}-dead"]:
                self.pending.setdefault(sub, [])
                self.subscribers[sub] = self._subscriber(sub)
        self.pending.setdefault(AUDIT, [])
        self.subscribers[AUDIT] = self._subscriber(AUDIT)

    def _subscriber(self, subscription: str) -> AuditedSubscriber:
        """A new subscriber process for `subscription` (an audited one, the relay on the
        audit topic, or a topic's dead-letter subscriber)."""
        topic_of = {sub: t for t, subs in SUBSCRIPTIONS.items() for sub in subs}
        metrics = SubscriberMetrics(CollectorRegistry(), subscription)
        if subscription == AUDIT:
            return AuditedSubscriber(
                self.store, AUDIT, "receipts", metrics, relayed_for=topic_of.get
            )
        if subscription.endswith("-dead"):
            return AuditedSubscriber(
                self.store, subscription, subscription, metrics,
                dead_letter_sources=lambda path: topic_of.get(path.rsplit("/", 1)[-1]),
            )  # fmt: skip
        return AuditedSubscriber(self.store, subscription, topic_of[subscription], metrics)

    def kill_subscriber(self, subscription: str) -> None:
        """The subscriber process is killed and started again: what it had queued and what
        it had written but not yet acked are delivered again (Pub/Sub keeps what is unacked),
        and what it remembered (attempts, receipt messages recorded) is gone."""
        old = self.subscribers[subscription]
        with contextlib.suppress(queue.Empty):
            while True:
                item = old._queue.get_nowait()
                if item is not None:
                    self.pending[subscription].append(cast(Delivery, item[0]).message)
        mine = [d for d in self.landing if d.subscription == subscription]
        self.landing = [d for d in self.landing if d.subscription != subscription]
        self.pending[subscription].extend(d.message for d in mine)
        self.subscribers[subscription] = self._subscriber(subscription)

    # -- publishers and Pub/Sub ----------------------------------------------------------------

    def new_event_id(self) -> str:
        return f"e{next(self._ids)}"

    def publish(
        self,
        topic: str,
        event_id: str,
        payload: str = "{}",
        clock_skew: timedelta = timedelta(0),
        lose: Iterable[str] = (),
    ) -> Message:
        """An audited publish: Pub/Sub accepts the message (every subscription of the topic
        gets it, but those in `lose`), the publisher buffers its record."""
        publish_time = _ms(self.now + clock_skew)
        message_id = f"m{next(self._ids)}"
        trace = TraceContext.new()
        message = Message(
            topic,
            event_id,
            build_attributes(event_id, publish_time, trace),
            message_id,
            _ms(self.now),
            payload,
        )
        for sub in SUBSCRIPTIONS[topic]:
            if sub in lose:
                self.lost.add((sub, event_id))
            else:
                self.pending[sub].append(message)
        self.buffer.append(
            PublishRecord(event_id, trace.trace_id, topic, payload, message_id, publish_time)
        )
        return message

    def flush_publisher(self) -> bool:
        """Write the buffered records in one batch; on a store error they stay buffered."""
        if not self.buffer:
            return True
        try:
            self.store.insert_publish_records(list(self.buffer), self.now)
        except StoreError:
            return False
        self.buffer.clear()
        return True

    # -- subscribers ---------------------------------------------------------------------------

    def deliver(self, subscription: str, index: int, keep: bool = False) -> Message | None:
        """Pub/Sub delivers one waiting message (`index` into the waiting ones, modulo) to the
        subscription's AuditedSubscriber, which parses it and queues its receipt; with `keep`
        it stays waiting too (its ack will be lost: a duplicate follows)."""
        waiting = self.pending[subscription]
        if not waiting:
            return None
        message = waiting[index % len(waiting)] if keep else waiting.pop(index % len(waiting))
        if subscription in RELAYED:
            # Handled, its receipt message published, acked (with `keep`: the ack is lost, and
            # the next delivery publishes another receipt message, a duplicate).
            receipt = Message(
                "receipts",
                message.event_id,
                relay_attributes(message, subscription, _ms(self.now)),
                f"r{next(self._ids)}",
                _ms(self.now),
                "",
                (subscription, message),
            )
            self.pending[AUDIT].append(receipt)
            return message
        attributes, broker_time = message.attributes, message.broker_time
        if subscription in PUSHED:
            pushed = parse_envelope(push_envelope(message, subscription))
            assert pushed.subscription == subscription and pushed.message_id == message.message_id
            attributes, broker_time = pushed.attributes, pushed.publish_time
        delivery = Delivery(self, subscription, message, attributes, broker_time)
        with self._subscriber_clock():
            self.subscribers[subscription](delivery)
        return message

    def dead_letter(self, subscription: str, index: int) -> Message | None:
        """Pub/Sub gives up on a waiting message and forwards it to the dead-letter topic now;
        the dead-letter subscription's AuditedSubscriber (`--dead-letters`) records it. On a
        store error it is nacked (here: waiting again on its subscription)."""
        waiting = self.pending[subscription]
        if not waiting:
            return None
        message = waiting.pop(index % len(waiting))
        attributes = {
            **message.attributes,
            DEAD_LETTER_SOURCE: f"projects/{PROJECT}/subscriptions/{subscription}",
            DEAD_LETTER_ATTEMPTS: "5",
        }
        letter = Delivery(self, subscription, message, attributes, _ms(self.now))
        dead = self.subscribers[f"{message.topic}-dead"]
        with self._subscriber_clock():
            dead(letter)
            self._write(dead)
        return message

    def flush_subscriber(self, subscription: str, straggle: bool = False) -> bool:
        """The subscriber writes its batch, then acks; on a store error it nacks (Pub/Sub
        redelivers). With `straggle` (a store that can play it), the journal insert is still
        committing when the call is interrupted here: `land` commits it, then the batch is
        acked."""
        store: Any = self.store
        straggling = straggle and hasattr(store, "straggle")
        if straggling:
            store.straggle = True
            self._acks_held = []
        try:
            with self._subscriber_clock():
                written = self._write(self.subscribers[subscription])
        finally:
            if straggling:
                store.straggle = False
                self.landing.extend(self._acks_held or [])
                self._acks_held = None
                self._in_flight_since = self._in_flight_since or self.now
        return written

    def _write(self, subscriber: AuditedSubscriber) -> bool:
        """What the subscriber's writer thread does with what it has queued: one batch."""
        batch = []
        with contextlib.suppress(queue.Empty):
            while True:
                item = subscriber._queue.get_nowait()
                if item is not None:
                    batch.append(item)
        if batch:
            subscriber._write(batch)
        return subscriber.last_write_ok

    def settled(self, delivery: Delivery, acked: bool) -> None:
        """A subscriber acked (after its receipt was durable) or nacked a delivery."""
        if not acked:
            self.pending[delivery.subscription].append(delivery.message)
            return
        if self._acks_held is not None:
            self._acks_held.append(delivery)  # the write has not returned yet
            return
        self._acked(delivery)

    def land(self) -> None:
        """The journal inserts in flight commit; their batches are acked."""
        store: Any = self.store
        if hasattr(store, "land_journal"):
            store.land_journal()
        for delivery in self.landing:
            self._acked(delivery)
        self.landing, self._in_flight_since = [], None

    def _acked(self, delivery: Delivery) -> None:
        if DEAD_LETTER_SOURCE in delivery.attributes:
            return  # a dead letter: not a receipt
        subscription, attributes, broker = (
            delivery.subscription, delivery.attributes, delivery.publish_time
        )  # fmt: skip
        if delivery.message.told is not None:
            # A relayed receipt: of the delivery it tells of, as the world made it (not as
            # the relay reads it).
            subscription, told = delivery.message.told
            attributes, broker = told.attributes, told.broker_time
        attrs = read_attributes(attributes, broker)
        key = (subscription, attrs.event_id, _hour(attrs.publish_time))
        self.acked.setdefault(key, self.now)

    @contextlib.contextmanager
    def _subscriber_clock(self) -> Iterator[None]:
        """The subscribers read the world's clock (they take `utc_now_ms` for their times)."""
        real = subscriber_module.utc_now_ms
        subscriber_module.utc_now_ms = lambda: _ms(self.now)
        try:
            yield
        finally:
            subscriber_module.utc_now_ms = real

    # -- exporters -----------------------------------------------------------------------------

    def add_replica(self, name: str, windows: tuple[Window, ...] = WINDOWS) -> Replica:
        replica = Replica(name, windows=windows)
        self.replicas.append(replica)
        self.start(replica)
        return replica

    def start(self, replica: Replica) -> None:
        """(Re)start a replica's process: everything it held in memory is gone."""
        leases = Leases(
            self.store,
            replica.name,
            LEASE,
            lambda: self.now + replica.offset,
            lambda: replica.monotonic,
        )
        expected = ExpectedSubscriptions(
            {t: set(s) for t, s in SUBSCRIPTIONS.items()}, set(), None, clock=lambda: 0.0
        )
        replica.leases = leases
        replica.evaluator = Evaluator(
            self.store,
            expected,
            list(replica.windows),
            BUCKET,
            SETTLE,
            monotonic=lambda: replica.monotonic,
            leases=leases,
        )
        replica.snapshot = None

    def evaluate(self, replica: Replica) -> Snapshot | None:
        """One evaluation pass; what it serves afterwards (nothing after a failure)."""
        if replica.paused:
            return replica.snapshot
        assert replica.evaluator is not None
        try:
            replica.snapshot = replica.evaluator.evaluate(self.now + replica.offset)
        except StoreError:
            replica.snapshot = None
        return replica.snapshot

    def evaluate_slowly(self, replica: Replica, seconds: float) -> Snapshot | None:
        """One pass whose store takes `seconds` to answer its take of the journal (FerretDB
        under load, a failover): time runs on in the middle of the pass."""
        store: Any = self.store
        real = store.take_journal

        def slow(*args: Any, **kwargs: Any) -> Any:
            self.advance(seconds)
            return real(*args, **kwargs)

        store.take_journal = slow
        try:
            return self.evaluate(replica)
        finally:
            del store.take_journal

    def advance(self, seconds: float) -> None:
        """Time passes, on every clock: a paused process's monotonic clock runs on too (a
        SIGSTOP or a long GC; the system's CLOCK_MONOTONIC never stops for one process)."""
        if self._in_flight_since and self.now + timedelta(seconds=seconds) >= (
            self._in_flight_since + IN_FLIGHT
        ):
            self.land()  # an insert in flight commits (or fails) within FerretDB's busy timeout
        self.now += timedelta(seconds=seconds)
        for replica in self.replicas:
            replica.monotonic += seconds

    # -- judging -------------------------------------------------------------------------------

    def truth(self, frontier: datetime, window: Window) -> dict[tuple[str, str], Truth]:
        publishes, receipts, dead = self.records.records()
        return recount(publishes, receipts, dead, SUBSCRIPTIONS, frontier - window.length, frontier)

    def served(self, replica: Replica) -> dict[tuple[str, str, str], tuple[Any, ...]]:
        """What a replica serves for every (topic, subscription, window): the gauges and the
        missed list, in the oracle's terms."""
        snapshot = replica.snapshot
        assert snapshot is not None
        out: dict[tuple[str, str, str], tuple[Any, ...]] = {}
        for (topic, sub), windows in snapshot.subscriptions.items():
            for window in snapshot.windows:
                stats = windows.get(window.label)
                if stats is None:
                    continue
                missed = list_missed(snapshot, self.store, topic, sub, window, 10_000)
                out[(topic, sub, window.label)] = _numbers(stats, missed)
        return out

    def expected(self, replica: Replica) -> dict[tuple[str, str, str], tuple[Any, ...]]:
        """What the oracle says a replica with that frontier and windows should serve."""
        snapshot = replica.snapshot
        assert snapshot is not None
        out: dict[tuple[str, str, str], tuple[Any, ...]] = {}
        for window in snapshot.windows:
            for topic in SUBSCRIPTIONS:
                # Each topic up to the frontier its holder settled (Snapshot.frontier_of).
                truths = self.truth(snapshot.frontier_of(topic), window)
                for (of, sub), truth in truths.items():
                    if of != topic:
                        continue
                    out[(topic, sub, window.label)] = (
                        truth.published,
                        truth.received,
                        truth.duplicates,
                        truth.unmatched,
                        truth.dead_lettered,
                        truth.missed,
                    )
        return out

    def story_verdicts(
        self, replica: Replica
    ) -> dict[tuple[str, str, str], tuple[str | None, str]]:
        """Every event of the longest window, per (topic, subscription): (the verdict its
        story gives on that replica, the oracle's)."""
        snapshot = replica.snapshot
        assert snapshot is not None
        out = {}
        for topic in SUBSCRIPTIONS:
            window = snapshot.windows[-1]
            truths = self.truth(snapshot.frontier_of(topic), window)
            for (of, sub), truth in truths.items():
                if of != topic:
                    continue
                for event_id, published, verdict in truth.verdicts:
                    hour = published.replace(minute=0, second=0, microsecond=0)
                    story = event_story(snapshot, self.store, event_id, [hour], PROJECT)
                    told = next(
                        (
                            d["verdict"]
                            for t in (story or {}).get("published", [])
                            if t["topic"] == topic
                            for d in t["subscriptions"]
                            if d["subscription"] == sub
                        ),
                        None,
                    )
                    out[(topic, sub, event_id)] = (told, verdict)
        return out

    def false_misses(self, replica: Replica) -> list[tuple[str, str, str]]:
        """Events a replica lists missed whose receipt was acked before that evaluation's
        bucket settled... and before the evaluation itself: (subscription, eventID, window)."""
        snapshot = replica.snapshot
        assert snapshot is not None
        wrong = []
        for (topic, sub), windows in snapshot.subscriptions.items():
            for window in snapshot.windows:
                if window.label not in windows:
                    continue
                listed = list_missed(snapshot, self.store, topic, sub, window, 10_000) or []
                for event in listed:
                    key = (sub, event.event_id, _hour(event.publish_time))
                    acked = self.acked.get(key)
                    true_now = snapshot.evaluated_at - replica.offset
                    if acked is not None and acked <= true_now - BUCKET:
                        wrong.append((sub, event.event_id, window.label))
        return wrong


def _numbers(stats: SubscriptionWindow, missed: list[Any] | None) -> tuple[Any, ...]:
    return (
        stats.published,
        stats.received,
        stats.duplicates,
        stats.unmatched,
        stats.dead_lettered,
        None if missed is None else tuple(e.event_id for e in missed),
    )


def _hour(moment: datetime) -> int:
    ms = int(moment.timestamp() * 1000)
    return ms - ms % 3_600_000


def _ms(moment: datetime) -> datetime:
    """A time as the store keeps it: milliseconds."""
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


@dataclass(frozen=True)
class _Records:
    """Every stored record, read by `read` from each of three tables."""

    tables: tuple[Any, Any, Any]
    read: Callable[[Any], Iterable[Mapping[str, Any]]]

    def records(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
        published, received, dead = ([dict(d) for d in self.read(t)] for t in self.tables)
        return published, received, dead


def memory_records(store: Any) -> Records:
    """The records of a tests.fakes.MemoryStore, as documents."""
    return _Records((store.published, store.received, store.dead_letters), lambda t: t.values())


def mongo_records(store: Any) -> Records:
    """The records of a MongoStore, as documents (every hourly collection)."""
    return _Records((store.published, store.received, store.dead_letters), lambda t: t.find())


def differences(
    served: Mapping[tuple[str, str, str], tuple[Any, ...]],
    expected: Mapping[tuple[str, str, str], tuple[Any, ...]],
) -> dict[tuple[str, str, str], tuple[Any, Any]]:
    """(served, expected) of every key where they differ."""
    return {
        k: (served.get(k), expected.get(k))
        for k in sorted(set(served) | set(expected))
        if served.get(k) != expected.get(k)
    }
