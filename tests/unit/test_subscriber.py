"""The streaming-pull callback and the receipt writer against hostile messages and our own bugs.

No message content can raise out of the callback: a bad eventID is `invalid` (acked), an
unusable publishTime falls back to the broker's time (counted by reason), and an unexpected
exception in our code is counted, nacked a bounded number of times, then acked unrecorded.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import pytest
from google.api_core import exceptions as gexc
from prometheus_client import CollectorRegistry

from eventaudit.contract import epoch_ms, from_epoch_ms
from eventaudit.records import Receipt
from eventaudit.subscriber.__main__ import LookupThrottled, source_topics
from eventaudit.subscriber.audited import (
    MAX_INTERNAL_ERROR_ATTEMPTS,
    AuditedSubscriber,
    Faults,
    SubscriberMetrics,
    TopicOf,
)
from tests.fakes import MemoryStore

SUB = "sub-1"
TOPIC = "topic-1"
BROKER = datetime(2026, 3, 4, 5, 6, 7, 891000, tzinfo=UTC)
BROKER_MS = epoch_ms(BROKER)
HOUR_MS = 3_600_000


@dataclass
class FakeMessage:
    """The part of google.cloud.pubsub_v1.subscriber.message.Message the subscriber uses."""

    attributes: dict[str, Any]
    message_id: str = "m-1"
    publish_time: datetime = BROKER
    delivery_attempt: int | None = None
    acks: list[str] = field(default_factory=list)
    ack_error: Exception | None = None
    """What an exactly-once ack_with_response fails with (None: it succeeds)."""

    def ack(self) -> None:
        self.acks.append("ack")

    def ack_with_response(self) -> Future[Any]:
        self.acks.append("ack")
        future: Future[Any] = Future()
        if self.ack_error is None:
            future.set_result(None)
        else:
            future.set_exception(self.ack_error)
        return future

    def nack(self) -> None:
        self.acks.append("nack")


class Subscriber:
    """An AuditedSubscriber on a MemoryStore with its registry and a running writer."""

    started: ClassVar[list[Subscriber]] = []

    def __init__(
        self,
        store: MemoryStore | None = None,
        faults: Faults | None = None,
        dead_letter_sources: TopicOf | None = None,
        exactly_once: bool = False,
    ) -> None:
        self.store = store or MemoryStore()
        self.registry = CollectorRegistry()
        self.audited = AuditedSubscriber(
            self.store,
            SUB,
            TOPIC,
            SubscriberMetrics(self.registry, SUB),
            batch_size=1000,
            flush_interval=0.01,
            faults=faults,
            dead_letter_sources=dead_letter_sources,
            exactly_once=exactly_once,
        )
        self.audited.start()
        Subscriber.started.append(self)

    def deliver(self, *messages: FakeMessage) -> None:
        """Run the callback on each message, then wait until each is acked or nacked."""
        for message in messages:
            self.audited(message)
        while not all(m.acks for m in messages):  # pytest-timeout bounds a hang
            time.sleep(0.001)

    def count(self, outcome: str) -> float:
        value = self.registry.get_sample_value(
            "eventaudit_subscriber_messages_total", {"subscription": SUB, "outcome": outcome}
        )
        return value or 0.0

    def fallbacks(self, reason: str) -> float:
        value = self.registry.get_sample_value(
            "eventaudit_subscriber_publish_time_fallbacks_total",
            {"subscription": SUB, "reason": reason},
        )
        return value or 0.0

    def stored_publish_time(self, event_id: str) -> datetime:
        return self.store.receipt(SUB, event_id)["publishTime"]


@dataclass(frozen=True)
class Hostile:
    """One hostile message: its attributes, the outcome it must get and the fallback reason."""

    name: str
    attributes: dict[str, Any]
    outcome: str = "recorded"
    reason: str | None = "malformed"

    @property
    def publishable(self) -> bool:
        """Pub/Sub attributes are strings: other values only reach library callers."""
        return all(isinstance(v, str) for v in self.attributes.values())


def hostile_cases(broker_ms: int, margin_ms: int = 1) -> list[Hostile]:
    """The hostile table around a broker publish time. `margin_ms` is how far past the
    tolerance the "beyond" cases are, and how far inside it the "within" cases are."""
    good = broker_ms - 1234
    digits = str(good)

    def at(name: str, publish_time: object, reason: str | None = "malformed") -> Hostile:
        return Hostile(name, {"eventID": "e-1", "publishTime": publish_time}, reason=reason)

    def bad_id(name: str, event_id: object) -> Hostile:
        attrs = {"eventID": event_id, "publishTime": digits}
        return Hostile(name, attrs, outcome="invalid", reason=None)

    return [
        at("superscript digit", "²"),
        at("superscripts", "".join("⁰¹²³⁴⁵⁶⁷⁸⁹"[int(d)] for d in digits)),
        at("arabic-indic", "".join(chr(0x0660 + int(d)) for d in digits)),
        at("fullwidth", "".join(chr(0xFF10 + int(d)) for d in digits)),
        at("devanagari", "".join(chr(0x0966 + int(d)) for d in digits)),
        at("year 10000", "253402300800000", "far"),
        at("15 nines", "9" * 15, "far"),
        at("16 digits", "1" * 16),
        at("20 digits", "9" * 20),
        at("year 2100", "4102444800000", "far"),
        at("year 1970", "0", "far"),
        at("seconds, not ms", digits[:-3], "far"),
        at("microseconds, not ms", digits + "000"),
        at("negative", "-1"),
        at("exponent", "1e3"),
        at("float", f"{digits}.0"),
        at("hex", "0x1f"),
        at("leading space", f" {digits}"),
        at("trailing newline", f"{digits}\n"),
        at("trailing CRLF", f"{digits}\r\n"),
        at("underscores", "1_767_323_045"),
        at("plus sign", f"+{digits}"),
        at("empty", ""),
        at("10 KB", "1" * 10_240),
        at("NUL", f"{digits}\x00"),
        at("RTL mark", f"\u200f{digits}"),
        at("emoji", "😀"),
        at("not a string", good),
        Hostile("missing", {"eventID": "e-1"}, reason="missing"),
        at("within an hour early", str(broker_ms - HOUR_MS + margin_ms - 1), None),
        at("within an hour late", str(broker_ms + HOUR_MS - margin_ms + 1), None),
        at("beyond an hour early", str(broker_ms - HOUR_MS - margin_ms), "far"),
        at("beyond an hour late", str(broker_ms + HOUR_MS + margin_ms), "far"),
        at("leading zeros", f"00{digits}", None),
        Hostile(
            "odd trace",
            {"eventID": "e-1", "traceparent": "\x00" * 55, "Cloud-Trace-Context": "²" * 40},
            reason="missing",
        ),
        bad_id("eventID newline", "e-1\n"),
        bad_id("eventID CRLF", "e-1\r\n"),
        bad_id("eventID leading newline", "\ne-1"),
        bad_id("eventID NUL", "e\x00"),
        bad_id("eventID unicode", "é-1"),
        bad_id("eventID digits", "\u0661\u0660\u0660"),
        bad_id("eventID operator", '{"$gt": ""}'),
        bad_id("eventID pipe", "a|b"),
        bad_id("eventID space", "a b"),
        bad_id("eventID 10 KB", "e" * 10_240),
        bad_id("eventID 129 chars", "e" * 129),
        bad_id("eventID empty", ""),
        bad_id("eventID not a string", 12345),
        Hostile("no attributes", {}, outcome="invalid", reason=None),
        Hostile(
            "bad both", {"eventID": "e-1\n", "publishTime": "²"}, outcome="invalid", reason=None
        ),
    ]


HOSTILE = hostile_cases(BROKER_MS)


@pytest.fixture(autouse=True)
def _stop_writers() -> Iterator[None]:
    yield
    for sub in Subscriber.started:
        sub.audited.stop()
    Subscriber.started.clear()


@pytest.mark.parametrize("case", HOSTILE, ids=[case.name for case in HOSTILE])
def test_hostile_attributes_never_raise_out_of_the_callback(case: Hostile) -> None:
    attributes, outcome, reason = case.attributes, case.outcome, case.reason
    sub = Subscriber()
    message = FakeMessage(attributes)
    sub.deliver(message)
    assert message.acks == ["ack"]
    assert sub.count(outcome) == 1
    assert sub.count("internal_error") == 0
    if outcome == "invalid":
        assert sub.store.received == {}
        return
    stored = sub.stored_publish_time("e-1")
    if reason is None:
        assert stored == from_epoch_ms(int(attributes["publishTime"]))
    else:
        assert stored == BROKER
        assert sub.fallbacks(reason) == 1
    assert sum(sub.fallbacks(r) for r in ("missing", "malformed", "far")) == (reason is not None)


def test_broker_time_is_kept_to_the_millisecond() -> None:
    sub = Subscriber()
    sub.deliver(FakeMessage({"eventID": "e-1"}, publish_time=BROKER + timedelta(microseconds=999)))
    assert sub.stored_publish_time("e-1") == BROKER


def test_hostile_messages_beside_good_ones_lose_no_good_receipt() -> None:
    sub = Subscriber()
    good = [FakeMessage({"eventID": f"good-{i}", "publishTime": str(BROKER_MS)}) for i in range(50)]
    bad = [FakeMessage(case.attributes, message_id=f"bad-{i}") for i, case in enumerate(HOSTILE)]
    mixed = [m for pair in zip(good, bad, strict=False) for m in pair] + good[len(bad) :]
    sub.deliver(*mixed)
    assert all(m.acks == ["ack"] for m in mixed)
    recordable = sum(1 for case in HOSTILE if case.outcome == "recorded")
    assert {doc["eventID"] for doc in sub.store.received.values()} == {
        f"good-{i}" for i in range(50)
    } | {"e-1"}
    assert sub.count("recorded") == 50 + recordable
    assert sub.count("invalid") == len(HOSTILE) - recordable
    # The hostile cases reuse eventID e-1: every delivery is counted on its receipt, one per
    # hour of the publish time each carries (receipts are unique within an hour).
    e1 = [d for d in sub.store.received.values() if d["eventID"] == "e-1"]
    assert sum(d["deliveries"] for d in e1) == recordable


def _raise_for(event_id: str) -> Faults:
    def lose(candidate: str) -> bool:
        if candidate == event_id:
            raise RuntimeError("bug in our own code")
        return False

    return Faults(lose=lose)


def test_internal_error_in_the_callback_is_nacked_a_bounded_number_of_times() -> None:
    sub = Subscriber(faults=_raise_for("boom"))
    messages = [
        FakeMessage({"eventID": "boom"}, message_id="m-boom")
        for _ in range(MAX_INTERNAL_ERROR_ATTEMPTS + 2)
    ]
    good = FakeMessage({"eventID": "fine"}, message_id="m-fine")
    sub.deliver(*messages, good)
    acks = [m.acks for m in messages]
    assert acks == [["nack"]] * (MAX_INTERNAL_ERROR_ATTEMPTS - 1) + [["ack"]] * 3
    assert sub.count("internal_error") == MAX_INTERNAL_ERROR_ATTEMPTS - 1
    assert sub.count("internal_error_dropped") == 3
    assert good.acks == ["ack"] and sub.count("recorded") == 1
    assert [k.split("|", 1)[1] for k in sub.store.received] == [f"{SUB}|fine"]


def test_delivery_attempt_from_the_broker_bounds_retries_across_restarts() -> None:
    sub = Subscriber(faults=_raise_for("boom"))
    early = FakeMessage({"eventID": "boom"}, message_id="m-1", delivery_attempt=1)
    late = FakeMessage(
        {"eventID": "boom"}, message_id="m-2", delivery_attempt=MAX_INTERNAL_ERROR_ATTEMPTS
    )
    sub.deliver(early, late)
    assert (early.acks, late.acks) == (["nack"], ["ack"])
    assert (sub.count("internal_error"), sub.count("internal_error_dropped")) == (1, 1)


class PoisonStore(MemoryStore):
    """Raises an unexpected (non-StoreError) exception on any batch holding one event."""

    def __init__(self, poison: str) -> None:
        super().__init__()
        self.poison = poison
        self.calls = 0

    def record_receipts(self, receipts: Sequence[Receipt], now: datetime) -> None:
        self.calls += 1
        if any(r.event_id == self.poison for r in receipts):
            raise TypeError("bug in our own code")
        super().record_receipts(receipts, now)


def test_internal_error_in_the_writer_spares_the_rest_of_the_batch_and_the_thread() -> None:
    sub = Subscriber(PoisonStore("boom"))
    good = [FakeMessage({"eventID": f"good-{i}"}, message_id=f"m-{i}") for i in range(5)]
    boom = FakeMessage({"eventID": "boom"}, message_id="m-boom")
    sub.deliver(good[0], good[1], boom, good[2])
    assert boom.acks == ["nack"]
    assert [m.acks for m in good[:3]] == [["ack"]] * 3
    assert sub.count("internal_error") == 1 and sub.count("recorded") == 3
    # Each receipt was written exactly once: one delivery each.
    assert [d["deliveries"] for d in sub.store.received.values()] == [1, 1, 1]
    # The writer thread survived: a later message is still recorded.
    sub.deliver(good[3])
    assert good[3].acks == ["ack"] and sub.count("recorded") == 4


def test_writer_internal_errors_are_bounded_too() -> None:
    sub = Subscriber(PoisonStore("boom"))
    booms = [
        FakeMessage({"eventID": "boom"}, message_id="m-boom")
        for _ in range(MAX_INTERNAL_ERROR_ATTEMPTS)
    ]
    for message in booms:
        sub.deliver(message)
    assert [m.acks for m in booms] == [["nack"]] * (MAX_INTERNAL_ERROR_ATTEMPTS - 1) + [["ack"]]
    assert sub.count("internal_error_dropped") == 1
    assert sub.store.received == {}


class BlockingStore(MemoryStore):
    """A store whose writes wait until released (a hung store)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def record_receipts(self, receipts: Sequence[Receipt], now: datetime) -> None:
        self.release.wait(30)
        super().record_receipts(receipts, now)


def test_a_writer_that_misses_its_stop_deadline_says_so(caplog: pytest.LogCaptureFixture) -> None:
    store = BlockingStore()
    sub = Subscriber(store)
    held = [FakeMessage({"eventID": f"held-{i}"}, message_id=f"m-{i}") for i in range(3)]
    for message in held:
        sub.audited(message)
    with caplog.at_level(logging.ERROR):
        assert sub.audited.stop(timeout=0.2) is False
    assert "did not finish within 0.2s" in caplog.text
    assert [m.acks for m in held] == [[], [], []]  # nothing acked: Pub/Sub redelivers them
    store.release.set()
    sub.audited.stop(timeout=10)
    assert [m.acks for m in held] == [["ack"]] * 3  # written, then acked, once the store answers


def test_a_writer_that_finishes_in_time_reports_it() -> None:
    sub = Subscriber()
    sub.deliver(FakeMessage({"eventID": "e-1"}))
    assert sub.audited.stop(timeout=10) is True


# -- dead letters, delivery attempts and exactly-once acks ----------------------------------

SOURCES = {"orders-sub": "orders", "projects/p/subscriptions/orders-sub": "orders"}


def _dead_letter(source: object, attempts: object = "5", event_id: str = "e-9") -> FakeMessage:
    attrs: dict[str, Any] = {"eventID": event_id, "publishTime": str(BROKER_MS - 5000)}
    if source is not None:
        attrs["CloudPubSubDeadLetterSourceSubscription"] = source
    if attempts is not None:
        attrs["CloudPubSubDeadLetterSourceDeliveryCount"] = attempts
    return FakeMessage(attrs)


@pytest.mark.parametrize(
    ("source", "attempts", "outcome", "stored_attempts"),
    [
        ("orders-sub", "5", "dead_letter_recorded", 5),
        ("projects/p/subscriptions/orders-sub", "7", "dead_letter_recorded", 7),
        ("orders-sub", None, "dead_letter_recorded", None),
        ("orders-sub", "\u0665", "dead_letter_recorded", None),  # Arabic-Indic five: not a count
        ("orders-sub", "5\n", "dead_letter_recorded", None),
        ("orders-sub", "9" * 30, "dead_letter_recorded", None),
        ("orders-sub", "0", "dead_letter_recorded", None),
        ("gone-sub", "5", "dead_letter_unresolved", None),
        ("", "5", "dead_letter_unresolved", None),
        ("goog-sub", "5", "dead_letter_unresolved", None),
        ("a|b", "5", "dead_letter_unresolved", None),
        ("x" * 5000, "5", "dead_letter_unresolved", None),
        ("projects/p/subscriptions/a|b", "5", "dead_letter_unresolved", None),
        ("projects/p q/subscriptions/orders-sub", "5", "dead_letter_unresolved", None),
        ("other/path/orders-sub", "5", "dead_letter_unresolved", None),
        ("projects/p/subscriptions/orders-sub\n", "5", "dead_letter_unresolved", None),
    ],
)
def test_a_dead_letter_is_recorded_against_the_subscription_it_left(
    source: str, attempts: str | None, outcome: str, stored_attempts: int | None
) -> None:
    subscriber = Subscriber(dead_letter_sources=SOURCES.get)
    message = _dead_letter(source, attempts)
    subscriber.deliver(message)
    assert message.acks == ["ack"]
    assert subscriber.count(outcome) == 1
    assert subscriber.count("recorded") == 0
    assert not subscriber.store.received  # never a receipt, on either subscription
    if outcome == "dead_letter_recorded":
        [letter] = subscriber.store.dead_letters.values()
        assert letter["subscription"] == "orders-sub"
        assert letter["topic"] == "orders"
        assert letter["deadLetterSubscription"] == SUB
        assert letter["deliveryAttempts"] == stored_attempts
        [entry] = [e for d in subscriber.store.journal_written for e in d["entries"]]
        assert entry == f"d|orders|orders-sub|e-9|{BROKER_MS - 5000}|{stored_attempts or 1}"
    else:
        assert not subscriber.store.dead_letters


def test_dead_letter_attributes_on_an_ordinary_subscription_are_an_ordinary_receipt() -> None:
    subscriber = Subscriber()  # not a dead-letter subscription: anyone can set the attributes
    subscriber.deliver(_dead_letter("orders-sub"))
    assert subscriber.count("recorded") == 1
    assert subscriber.store.receipt(SUB, "e-9")["topic"] == TOPIC
    assert not subscriber.store.dead_letters


def test_a_message_without_the_dead_letter_source_on_a_dead_letter_subscription_is_a_receipt() -> (
    None
):
    subscriber = Subscriber(dead_letter_sources=SOURCES.get)
    subscriber.deliver(_dead_letter(None))
    assert subscriber.count("recorded") == 1
    assert subscriber.store.receipt(SUB, "e-9")["deliveries"] == 1


def test_a_source_lookup_that_fails_nacks_for_another_try() -> None:
    def unreachable(_sub: str) -> str | None:
        raise RuntimeError("admin API unreachable")

    subscriber = Subscriber(dead_letter_sources=unreachable)
    message = _dead_letter("orders-sub")
    subscriber.deliver(message)
    assert message.acks == ["nack"]
    assert subscriber.count("internal_error") == 1
    assert not subscriber.store.dead_letters


@pytest.mark.parametrize(("attempt", "observed"), [(None, 0), (1, 1), (4, 1), (0, 0)])
def test_delivery_attempts_are_recorded_and_observed(attempt: int | None, observed: int) -> None:
    subscriber = Subscriber()
    subscriber.deliver(
        FakeMessage({"eventID": "e-1", "publishTime": str(BROKER_MS)}, delivery_attempt=attempt)
    )
    stored = attempt if attempt else None
    assert subscriber.store.receipt(SUB, "e-1")["deliveryAttempt"] == stored
    count = subscriber.registry.get_sample_value(
        "eventaudit_subscriber_delivery_attempts_count", {"subscription": SUB}
    )
    assert count == observed


def test_an_exactly_once_ack_that_fails_is_counted_and_its_redelivery_is_a_duplicate() -> None:
    subscriber = Subscriber(exactly_once=True)
    attrs = {"eventID": "e-1", "publishTime": str(BROKER_MS)}
    failed = FakeMessage(attrs, ack_error=RuntimeError("AcknowledgeError: INVALID_ACK_ID"))
    subscriber.deliver(failed)
    assert subscriber.count("ack_failed") == 1
    assert subscriber.count("recorded") == 1
    subscriber.deliver(FakeMessage(attrs, message_id="m-1"))
    assert subscriber.count("ack_failed") == 1
    receipt = subscriber.store.receipt(SUB, "e-1")
    assert receipt["deliveries"] == 2  # one receipt, the redelivery a duplicate
    entries = [e for d in subscriber.store.journal_written for e in d["entries"]]
    assert entries[-1] == f"r|{TOPIC}|{SUB}|e-1|{BROKER_MS}|2"


class AdminClient:
    """The part of SubscriberClient `source_topics` uses: subscriptions that exist, and calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.topics = {"projects/p/subscriptions/orders-sub": "projects/p/topics/orders",
                       "projects/q/subscriptions/far-sub": "projects/q/topics/far"}  # fmt: skip
        self.fail: Exception | None = None

    def subscription_path(self, project: str, sub: str) -> str:
        return f"projects/{project}/subscriptions/{sub}"

    def get_subscription(self, *, subscription: str, retry: object, timeout: float) -> Any:
        self.calls.append(subscription)
        if self.fail is not None:
            raise self.fail
        if subscription == "projects/p/subscriptions/secret-sub":
            raise gexc.PermissionDenied("no")
        if subscription not in self.topics:
            raise gexc.NotFound("no such subscription")
        return type("Sub", (), {"topic": self.topics[subscription]})()


def test_dead_letter_sources_are_looked_up_once_and_misses_remembered_a_minute() -> None:
    admin, now = AdminClient(), [0.0]
    topic_of = source_topics(admin, "p", clock=lambda: now[0])
    assert topic_of("orders-sub") == topic_of("orders-sub") == "orders"
    assert topic_of("projects/q/subscriptions/far-sub") == "far"  # another project, by path
    assert topic_of("gone-sub") is None and topic_of("gone-sub") is None
    assert topic_of("secret-sub") is None  # may not be read: unresolved, not retried forever
    assert admin.calls == [
        "projects/p/subscriptions/orders-sub",
        "projects/q/subscriptions/far-sub",
        "projects/p/subscriptions/gone-sub",
        "projects/p/subscriptions/secret-sub",
    ]
    now[0] = 61.0
    assert topic_of("gone-sub") is None
    assert admin.calls[-1] == "projects/p/subscriptions/gone-sub"
    for i in range(3000):  # a flood of invented names: memory stays bounded
        topic_of(f"invented-{i}")
    assert len(admin.calls) == 4 + 1 + 3000


def test_the_relays_lookups_are_limited_per_second_and_a_denied_one_raises() -> None:
    admin, now = AdminClient(), [0.0]
    topic_of = source_topics(
        admin, "p", clock=lambda: now[0], denied_is_missing=False, lookups_per_second=10
    )
    throttled = 0
    for i in range(50):  # a flood of invented names within one second
        try:
            topic_of(f"invented-{i}")
        except LookupThrottled:
            throttled += 1
    assert (len(admin.calls), throttled) == (10, 40)
    now[0] = 0.5  # half a second later: five more
    looked = [topic_of(f"later-{i}") for i in range(5)]
    assert looked == [None] * 5 and len(admin.calls) == 15
    with pytest.raises(LookupThrottled):
        topic_of("one-too-many")
    now[0] = 10.0
    assert topic_of("orders-sub") == "orders"  # the allowance is back
    with pytest.raises(gexc.PermissionDenied):
        topic_of("secret-sub")  # the relay must not take it for a missing subscription


def test_a_transient_lookup_error_raises_so_the_dead_letter_is_retried() -> None:
    admin = AdminClient()
    admin.fail = gexc.ServiceUnavailable("unavailable")
    topic_of = source_topics(admin, "p")
    with pytest.raises(gexc.ServiceUnavailable):
        topic_of("orders-sub")
    admin.fail = None
    assert topic_of("orders-sub") == "orders"


@pytest.mark.parametrize(
    ("published_ms_before_forwarding", "filed_ms", "fallback"),
    [
        (70 * 60_000, BROKER_MS - 70 * 60_000, None),  # forwarded 70 min later (issue 17, case 6)
        (6 * 86_400_000, BROKER_MS - 6 * 86_400_000, None),
        (7 * 86_400_000 + 3_600_000, BROKER_MS - 7 * 86_400_000 - 3_600_000, None),
        (7 * 86_400_000 + 3_600_001, BROKER_MS, "far"),  # older than Pub/Sub keeps a message
        (-3_600_001, BROKER_MS, "far"),  # ahead of the forwarding by more than the tolerance
    ],
)
def test_a_dead_letter_is_filed_under_its_original_publish_time(
    published_ms_before_forwarding: int, filed_ms: int, fallback: str | None
) -> None:
    subscriber = Subscriber(dead_letter_sources=SOURCES.get)
    message = _dead_letter("orders-sub")
    message.attributes["publishTime"] = str(BROKER_MS - published_ms_before_forwarding)
    subscriber.deliver(message)
    assert subscriber.count("dead_letter_recorded") == 1
    [entry] = [e for d in subscriber.store.journal_written for e in d["entries"]]
    assert entry == f"d|orders|orders-sub|e-9|{filed_ms}|5"
    fallbacks = {reason: subscriber.fallbacks(reason) for reason in ("missing", "malformed", "far")}
    assert fallbacks == {"missing": 0, "malformed": 0, "far": int(fallback == "far")}


def test_an_ordinary_receipt_is_not_given_a_dead_letters_tolerance() -> None:
    subscriber = Subscriber()
    message = FakeMessage({"eventID": "e-1", "publishTime": str(BROKER_MS - 70 * 60_000)})
    subscriber.deliver(message)
    assert epoch_ms(subscriber.store.receipt(SUB, "e-1")["publishTime"]) == BROKER_MS


def test_a_source_created_again_on_another_topic_is_filed_there_within_a_minute() -> None:
    # Issue 17, case 7: the lookup was remembered for good.
    admin, now = AdminClient(), [0.0]
    topic_of = source_topics(admin, "p", clock=lambda: now[0])
    assert topic_of("orders-sub") == "orders"
    admin.topics["projects/p/subscriptions/orders-sub"] = "projects/p/topics/billing"
    now[0] = 59.0
    assert topic_of("orders-sub") == "orders"  # remembered within the minute
    now[0] = 61.0
    assert topic_of("orders-sub") == "billing"
    assert admin.calls == ["projects/p/subscriptions/orders-sub"] * 2
