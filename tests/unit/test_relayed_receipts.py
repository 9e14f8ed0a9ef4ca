"""Receipts relayed over Pub/Sub by consumers in other languages (docs/receipts.md): a receipt
message becomes the receipt of the subscription it names, only if that subscription is one of
the topic it names; anything else is counted and acked, never recorded. In memory (the real
emulator with Node's client: tests/integration/test_relay.py)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from eventaudit.contract import (
    InvalidMessageError,
    RelayedDelivery,
    TraceContext,
    build_attributes,
    epoch_ms,
    parse_relayed,
)
from eventaudit.subscriber.audited import AuditedSubscriber, SubscriberMetrics
from tests.fakes import MemoryStore
from tests.unit.test_subscriber import FakeMessage as PulledMessage

AUDIT = "eventaudit-receipts-relay"
SUB, TOPIC = "orders-node", "orders"
BROKER = datetime(2026, 12, 8, 10, 0, 0, 123000, tzinfo=UTC)
TOPICS = {SUB: TOPIC, "users-node": "users", AUDIT: "eventaudit-receipts"}


def receipt_message(attributes: dict[str, Any], message_id: str = "audit-1", **kw: Any) -> Any:
    """A receipt message Pub/Sub delivers to the relay: published a second after the
    delivery it tells of."""
    kw.setdefault("publish_time", BROKER + timedelta(seconds=1))
    return PulledMessage(attributes, message_id=message_id, **kw)


def relayed(event_id: str = "e1", /, **changes: str | None) -> dict[str, str]:
    """The attributes a consumer publishes after handling `event_id`."""
    attrs = {
        **build_attributes(event_id, BROKER, TraceContext.new()),
        "ea.subscription": SUB,
        "ea.topic": TOPIC,
        "ea.messageId": "1234",
        "ea.publishTime": str(epoch_ms(BROKER)),
        "ea.receiveTime": str(epoch_ms(BROKER) + 250),
    }
    for key, value in changes.items():
        name = key.replace("__", ".").replace("_", ".") if key.startswith("ea") else key
        if value is None:
            attrs.pop(name, None)
        else:
            attrs[name] = value
    return attrs


def test_a_receipt_message_parses_exactly() -> None:
    assert parse_relayed(relayed(ea_deliveryAttempt="3")) == RelayedDelivery(
        SUB, TOPIC, "1234", BROKER, BROKER.replace(microsecond=373000), 3
    )
    assert parse_relayed(relayed(ea_receiveTime=None)).receive_time is None
    # Node's client says 0 when the subscription has no dead-letter policy: no attempt.
    assert parse_relayed(relayed(ea_deliveryAttempt="0")).delivery_attempt is None


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"ea_subscription": None}, "without ea.subscription"),
        ({"ea_subscription": ""}, "without ea.subscription"),
        ({"ea_subscription": "projects/p/subscriptions/s"}, "ea.subscription is not"),
        ({"ea_subscription": "goog-sub"}, "ea.subscription is not"),
        ({"ea_topic": None}, "without ea.topic"),
        ({"ea_topic": "t\n"}, "ea.topic is not"),
        ({"ea_messageId": None}, "without ea.messageId"),
        ({"ea_messageId": "1 2"}, "ea.messageId is not"),
        ({"ea_messageId": "x" * 129}, "ea.messageId is not"),
        ({"ea_publishTime": None}, "without ea.publishTime"),
        ({"ea_publishTime": "2026-12-08T10:00:00Z"}, "ea.publishTime is not"),
        ({"ea_publishTime": "\u0661\u0662\u0663"}, "ea.publishTime is not"),  # Arabic-Indic
        ({"ea_publishTime": "1765188000123\n"}, "ea.publishTime is not"),
        ({"ea_publishTime": "9" * 40}, "ea.publishTime is not"),  # overflow
        ({"ea_publishTime": "5"}, "ea.publishTime is not"),  # 1970
        ({"ea_receiveTime": "soon"}, "ea.receiveTime is not"),
        ({"ea_deliveryAttempt": "+1"}, "ea.deliveryAttempt is not"),
        ({"ea_deliveryAttempt": " 1"}, "ea.deliveryAttempt is not"),
        ({"ea_deliveryAttempt": "2147483648"}, "ea.deliveryAttempt is not"),
        ({"ea_deliveryAttempt": "-1"}, "ea.deliveryAttempt is not"),
    ],
)
def test_a_malformed_receipt_message_is_refused_naming_the_attribute(
    changes: dict[str, str | None], says: str
) -> None:
    with pytest.raises(InvalidMessageError) as caught:
        parse_relayed(relayed(**changes))
    assert says in str(caught.value)


class Relay:
    """An AuditedSubscriber on the audit subscription, relaying for `TOPICS`."""

    def __init__(self) -> None:
        self.store, self.registry = MemoryStore(), CollectorRegistry()
        self.lookups: list[str] = []

        def topic_of(subscription: str) -> str | None:
            self.lookups.append(subscription)
            return TOPICS.get(subscription)

        self.fail_lookups = 0

        def looked_up(subscription: str) -> str | None:
            if self.fail_lookups:
                self.fail_lookups -= 1
                raise RuntimeError("503 Pub/Sub unavailable")
            return topic_of(subscription)

        self.audited = AuditedSubscriber(
            self.store, AUDIT, "eventaudit-receipts", SubscriberMetrics(self.registry, AUDIT),
            flush_interval=0.01, relayed_for=looked_up,
        )  # fmt: skip
        self.audited.start()

    def deliver(self, *messages: PulledMessage) -> None:
        for message in messages:
            self.audited(message)
        while not all(m.acks for m in messages):
            time.sleep(0.001)

    def count(self, outcome: str) -> float:
        value = self.registry.get_sample_value(
            "eventaudit_subscriber_messages_total", {"subscription": AUDIT, "outcome": outcome}
        )
        return value or 0.0


@pytest.fixture
def relay() -> Any:
    relay = Relay()
    yield relay
    relay.audited.stop()


def test_a_receipt_message_becomes_the_receipt_of_the_subscription_it_names(relay: Any) -> None:
    message = receipt_message(relayed(ea_deliveryAttempt="2"), message_id="audit-1")
    relay.deliver(message)
    receipt = relay.store.receipt(SUB, "e1")
    assert (receipt["topic"], receipt["messageId"], receipt["deliveries"]) == (TOPIC, "1234", 1)
    assert receipt["publishTime"] == BROKER
    assert message.acks == ["ack"]  # once the receipt is durable
    assert relay.count("recorded") == 1
    assert not any(k.split("|", 1)[1].startswith(AUDIT) for k in relay.store.received)


def test_a_consumers_redelivery_is_a_duplicate_delivery(relay: Any) -> None:
    relay.deliver(receipt_message(relayed(), message_id="audit-1"))
    relay.deliver(receipt_message(relayed(ea_deliveryAttempt="2"), message_id="audit-2"))
    assert relay.store.receipt(SUB, "e1")["deliveries"] == 2


@pytest.mark.parametrize(
    "changes",
    [
        {"ea_topic": "users"},  # forged: a subscription of another topic
        {"ea_subscription": "nobody-reads-this"},  # unknown, or not ours to read
        {"ea_subscription": "users-node"},  # a real subscription, of another topic
    ],
)
def test_a_receipt_for_a_subscription_not_of_its_topic_is_rejected(
    relay: Any, changes: dict[str, str]
) -> None:
    message = receipt_message(relayed(**changes))
    relay.deliver(message)
    assert relay.store.received == {}
    assert message.acks == ["ack"]  # redelivering it could never help
    assert relay.count("relay_rejected") == 1


@pytest.mark.parametrize(
    "changes",
    [{"eventID": None}, {"eventID": "bad id with spaces"}, {"ea_messageId": None}],
)
def test_a_malformed_receipt_message_is_counted_invalid_and_acked(
    relay: Any, changes: dict[str, str | None]
) -> None:
    message = receipt_message(relayed(**changes))
    relay.deliver(message)
    assert relay.store.received == {}
    assert (message.acks, relay.count("invalid")) == (["ack"], 1)


def test_a_failed_store_write_nacks_the_receipt_message(relay: Any) -> None:
    relay.store.fail_next = 1
    message = receipt_message(relayed())
    relay.deliver(message)
    assert (message.acks, relay.store.received) == (["nack"], {})


def test_a_copy_of_a_recorded_receipt_message_counts_once_a_consumers_redelivery_twice(
    relay: Any,
) -> None:
    relay.deliver(receipt_message(relayed(), message_id="audit-1"))
    relay.deliver(receipt_message(relayed(), message_id="audit-1"))  # a lost ack: Pub/Sub again
    relay.deliver(receipt_message(relayed(), message_id="audit-9"))  # the client published twice
    assert relay.store.receipt(SUB, "e1")["deliveries"] == 1
    assert relay.count("relay_repeated") == 2
    again = relayed(ea_receiveTime=str(epoch_ms(BROKER) + 60_000), ea_deliveryAttempt="2")
    relay.deliver(receipt_message(again, message_id="audit-2"))  # the consumer got it again
    assert relay.store.receipt(SUB, "e1")["deliveries"] == 2


def test_a_receipt_message_whose_write_failed_is_recorded_when_it_comes_again(
    relay: Any,
) -> None:
    relay.store.fail_next = 1
    first = receipt_message(relayed())
    relay.deliver(first)
    assert first.acks == ["nack"]
    relay.deliver(receipt_message(relayed()))  # Pub/Sub delivers it again: not taken for a copy
    assert relay.store.receipt(SUB, "e1")["deliveries"] == 1


def test_a_failed_lookup_nacks_for_ever_and_never_drops_the_receipt(relay: Any) -> None:
    relay.fail_lookups = 7  # Pub/Sub's admin API down for longer than 5 deliveries
    messages = [receipt_message(relayed()) for _ in range(7)]
    for message in messages:
        relay.deliver(message)
    assert [m.acks for m in messages] == [["nack"]] * 7
    assert relay.count("relay_lookup_failed") == 7
    assert relay.count("internal_error_dropped") == 0
    relay.deliver(receipt_message(relayed()))
    assert relay.store.receipt(SUB, "e1")["deliveries"] == 1


@pytest.mark.parametrize(
    ("broker", "own"),
    [
        (datetime(2099, 12, 31, tzinfo=UTC), BROKER),  # filed in 2099: retention never reaches
        (BROKER - timedelta(days=8), BROKER),  # older than Pub/Sub keeps a message
        (BROKER + timedelta(minutes=5), BROKER),  # delivered after its receipt was published
    ],
)
def test_a_delivery_time_the_receipt_messages_own_time_belies_is_invalid(
    relay: Any, broker: datetime, own: datetime
) -> None:
    attrs = relayed(ea_publishTime=str(epoch_ms(broker)))
    message = receipt_message(attrs, publish_time=own)
    relay.deliver(message)
    assert relay.store.received == {}
    assert (message.acks, relay.count("invalid")) == (["ack"], 1)


def test_a_receipt_naming_the_relays_own_subscription_is_rejected(relay: Any) -> None:
    message = receipt_message(relayed(ea_subscription=AUDIT, ea_topic="eventaudit-receipts"))
    relay.deliver(message)
    assert relay.store.received == {}
    assert relay.count("relay_rejected") == 1
