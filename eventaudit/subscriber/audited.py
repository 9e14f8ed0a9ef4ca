"""The audited subscriber: record each delivery durably, then ack; nack when the store fails.

Streaming-pull callbacks only parse and enqueue; one writer thread takes batches, upserts the
receipts (one per subscription and eventID, `deliveries` counting redeliveries), and only
then acks. A failed write nacks the whole batch so Pub/Sub redelivers it. A message without a
valid eventID is counted `invalid`, logged and acked: redelivering it could never help.

No message content can raise out of the callback or stop the writer. An unexpected exception
in our own code (a bug) is counted `internal_error`, logged with the message id, and the message
nacked, at most MAX_INTERNAL_ERROR_ATTEMPTS times; then it is acked without a receipt, counted
`internal_error_dropped` and logged as an error, so a poison message can never loop forever.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import re
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from eventaudit.contract import (
    DEAD_LETTER_MAX_AGE,
    PUBLISH_TIME_FALLBACKS,
    PUBSUB_ID_PATTERN,
    RELAY_DELIVERY_ATTEMPT,
    RELAY_MESSAGE_ID,
    RELAY_RECEIVE_TIME,
    RELAY_SUBSCRIPTION,
    AuditedAttributes,
    InvalidMessageError,
    is_pubsub_id,
    parse_ascii_int,
    parse_relayed,
    read_attributes,
    utc_now_ms,
)
from eventaudit.records import Receipt
from eventaudit.store import ReceiptStore, StoreError

log = logging.getLogger(__name__)

OUTCOMES = (
    "recorded",
    "dead_letter_recorded",
    "dead_letter_unresolved",
    "relay_rejected",
    "relay_repeated",
    "relay_lookup_failed",
    "ack_failed",
    "invalid",
    "handler_error",
    "store_error",
    "internal_error",
    "internal_error_dropped",
    "fault_lost",
    "fault_redelivered",
)

# Deliveries of one message that may fail on an unexpected exception before it is given up.
MAX_INTERNAL_ERROR_ATTEMPTS = 5
# Receipt messages remembered as recorded (--receipts), so that a copy counts once.
_RELAYED_REMEMBERED = 100_000
# A receipt message is published after the delivery it tells of: its delivered message's
# Pub/Sub publish time may be this much later than its own (two of Pub/Sub's clocks).
_RELAY_SKEW = timedelta(minutes=1)
# Messages whose failed attempts are remembered (when the broker sends no delivery_attempt);
# the oldest are forgotten first, so memory stays bounded whatever the traffic.
_ATTEMPTS_REMEMBERED = 10_000


class _Families:
    """The subscriber's metric families on one registry (shared by its subscriptions)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.messages = Counter(
            "eventaudit_subscriber_messages_total",
            "Messages handled, by outcome: recorded then acked; invalid (acked, no record); "
            "handler_error, store_error and internal_error (nacked for redelivery); "
            "internal_error_dropped (acked without a receipt after repeated internal errors); "
            "fault_* (fault knobs).",
            ["subscription", "outcome"],
            registry=registry,
        )
        self.latency = Histogram(
            "eventaudit_subscriber_delivery_latency_seconds",
            "From the publisher's publishTime to receipt by this subscriber.",
            ["subscription"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=registry,
        )
        self.pending = Gauge(
            "eventaudit_subscriber_pending_receipts",
            "Received messages waiting for their receipt to be written.",
            ["subscription"],
            registry=registry,
        )
        self.store_up = Gauge(
            "eventaudit_subscriber_store_up",
            "1 when the last receipt write succeeded.",
            ["subscription"],
            registry=registry,
        )
        self.publish_time_fallbacks = Counter(
            "eventaudit_subscriber_publish_time_fallbacks_total",
            "Receipts stored with the broker's publish time because the publishTime attribute "
            "was missing, malformed (not ASCII digits) or far (over an hour from the broker's).",
            ["subscription", "reason"],
            registry=registry,
        )
        self.attempts = Histogram(
            "eventaudit_subscriber_delivery_attempts",
            "Pub/Sub's delivery attempt of each message recorded (subscriptions with a "
            "dead-letter policy; 1 is a first delivery).",
            ["subscription"],
            buckets=(1, 2, 3, 4, 5, 7, 10, 15, 20, 50, 100),
            registry=registry,
        )


_FAMILIES: weakref.WeakKeyDictionary[CollectorRegistry, _Families] = weakref.WeakKeyDictionary()
_FAMILIES_LOCK = threading.Lock()


class SubscriberMetrics:
    """One subscription's metrics, on the registry given (several subscriptions may share
    one: a push receiver serves many)."""

    def __init__(self, registry: CollectorRegistry, subscription: str) -> None:
        with _FAMILIES_LOCK:
            families = _FAMILIES.get(registry)
            if families is None:
                families = _FAMILIES[registry] = _Families(registry)
        self.messages = families.messages
        self.latency = families.latency
        self.pending = families.pending
        self.store_up = families.store_up
        self.publish_time_fallbacks = families.publish_time_fallbacks
        self.attempts = families.attempts
        self.delivery_attempts = self.attempts.labels(subscription)
        self.subscription = subscription
        for outcome in OUTCOMES:
            self.messages.labels(subscription, outcome)
        self.fallback = {
            reason: self.publish_time_fallbacks.labels(subscription, reason)
            for reason in PUBLISH_TIME_FALLBACKS
        }
        # Children bound once: the callback path should not look labels up per message.
        self.delivery_latency = self.latency.labels(subscription)
        self.pending_receipts = self.pending.labels(subscription)
        self.store_ok = self.store_up.labels(subscription)
        self.store_ok.set(1)

    def count(self, outcome: str, n: int = 1) -> None:
        """Add `n` messages with `outcome`."""
        self.messages.labels(self.subscription, outcome).inc(n)


class Message(Protocol):
    """The part of a google-cloud-pubsub message used here."""

    attributes: Any
    message_id: str
    publish_time: datetime

    @property
    def delivery_attempt(self) -> int | None:
        """Set by Pub/Sub only on subscriptions with a dead-letter policy; else None."""
        ...

    def ack(self) -> None: ...

    def ack_with_response(self) -> Future[Any]: ...

    def nack(self) -> None: ...


DEAD_LETTER_SOURCE = "CloudPubSubDeadLetterSourceSubscription"
DEAD_LETTER_ATTEMPTS = "CloudPubSubDeadLetterSourceDeliveryCount"
TopicOf = Callable[[str], "str | None"]
"""A subscription's topic id, from its id or full path (None: no such subscription)."""
_SUBSCRIPTION_PATH = re.compile(
    rf"projects/[a-z][a-z0-9\-.:]{{0,100}}/subscriptions/{PUBSUB_ID_PATTERN}"
)


@dataclass(frozen=True, slots=True)
class Faults:
    """Fault knobs for demos and tests; all off by default.

    `lose(event_id)`: ack without recording (a lost event, as a broken consumer would).
    `redeliver(event_id)`: record, then nack the first delivery (a duplicate delivery follows).
    """

    lose: Callable[[str], bool] = lambda _event_id: False
    redeliver: Callable[[str], bool] = lambda _event_id: False

    @classmethod
    def lose_fraction(cls, fraction: float) -> Faults:
        """Lose a stable pseudo-random `fraction` of events (decided by a hash of the eventID)."""
        if not 0 <= fraction <= 1:
            raise ValueError("lose fraction must be in [0, 1]")
        threshold = int(fraction * 2**32)
        return cls(lose=lambda event_id: _hash32(event_id) < threshold)


def _hash32(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "big")


class AuditedSubscriber:
    """Consumes one subscription; every ack follows a durable receipt."""

    def __init__(
        self,
        store: ReceiptStore,
        subscription: str,
        topic: str,
        metrics: SubscriberMetrics,
        *,
        batch_size: int = 500,
        flush_interval: float = 0.05,
        faults: Faults | None = None,
        handler: Callable[[Message], None] | None = None,
        on_receipt: Callable[[Receipt], None] | None = None,
        dead_letter_sources: TopicOf | None = None,
        exactly_once: bool = False,
        relayed_for: TopicOf | None = None,
    ) -> None:
        """`handler`, when given, is the consumer's own processing: it runs first, and a
        message is recorded (then acked) only if it returns; if it raises, the message is
        nacked and counted `handler_error`, so the receipt means "delivered and processed".

        `dead_letter_sources`, given for a subscription of a dead-letter topic, finds the topic
        of the subscription a message was dead-lettered from: such messages are recorded as
        dead letters of that subscription (not receipts). Elsewhere the dead-letter attributes
        are ignored: any publisher can set them.

        `exactly_once`: the subscription has exactly-once delivery, so an ack can fail; each
        is confirmed, and a failure counted `ack_failed` (the receipt is durable: the
        redelivery that follows counts as a duplicate).

        `relayed_for`, given for a subscription of an audit topic of receipt messages
        (docs/receipts.md: consumers in other languages publish one per delivery), finds the
        topic of the subscription a receipt message names: each is recorded as a receipt of
        that subscription, if it is one of the topic the message names (else it is counted
        `relay_rejected`, logged and acked).
        """
        self._store = store
        self._subscription = subscription
        self._topic = topic
        self._metrics = metrics
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._faults = faults or Faults()
        self._handler = handler
        self._on_receipt = on_receipt
        self._dead_letter_sources = dead_letter_sources
        self._exactly_once = exactly_once
        self._relayed_for = relayed_for
        self._relayed: OrderedDict[tuple[str, ...], None] = OrderedDict()
        """Receipt messages recorded lately (their `_relay_key`), so a copy counts once."""
        self._queue: queue.Queue[tuple[Message, Receipt] | None] = queue.Queue()
        # Read at scrape time: the callback path does not update a gauge per message.
        metrics.pending_receipts.set_function(self._queue.qsize)
        self._redelivered: set[str] = set()
        self._attempts: OrderedDict[str, int] = OrderedDict()
        self._attempts_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="receipt-writer", daemon=True)
        self.last_write_ok = True

    def start(self) -> None:
        """Start the writer thread (before subscribing)."""
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> bool:
        """Write what is queued, then stop the writer; False (logged) when it did not finish
        within `timeout`: what it still held is unacked, so Pub/Sub redelivers it."""
        self._queue.put(None)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            return True
        log.error(
            "receipt writer of %s did not finish within %.1fs: about %d queued messages (and "
            "any batch being written) are not recorded; unacked, so Pub/Sub redelivers them",
            self._subscription,
            timeout,
            max(0, self._queue.qsize() - 1),
        )
        return False

    def __call__(self, message: Message) -> None:
        """The streaming-pull callback: parse and enqueue; never raises."""
        try:
            self._receive(message)
        except Exception as exc:
            self._internal_error(message, exc)

    def _receive(self, message: Message) -> None:
        receive_time = utc_now_ms()
        if self._relayed_for is not None:
            self._receive_relayed(message, receive_time)
            return
        broker_time = _as_utc(message.publish_time)
        dead_letter = (
            self._dead_letter_sources is not None and DEAD_LETTER_SOURCE in message.attributes
        )
        try:
            # A dead letter's broker time is when Pub/Sub forwarded it: its publishTime may be
            # up to DEAD_LETTER_MAX_AGE older (issue 17, case 6).
            older = DEAD_LETTER_MAX_AGE if dead_letter else timedelta(0)
            attrs = read_attributes(message.attributes, broker_time, older=older)
        except InvalidMessageError as exc:
            self._metrics.count("invalid")
            log.warning(
                "invalid message %s on %s (%s): acked without a receipt",
                message.message_id,
                self._subscription,
                exc,
            )
            message.ack()
            return
        if attrs.publish_time_fallback is not None:
            self._metrics.fallback[attrs.publish_time_fallback].inc()
            log.warning(
                "message %s (event %s) on %s: publishTime %s, the broker's publish time is used",
                message.message_id,
                attrs.event_id,
                self._subscription,
                attrs.publish_time_fallback,
            )
        attempt = getattr(message, "delivery_attempt", None)
        attempt = attempt if isinstance(attempt, int) and attempt > 0 else None
        if dead_letter:
            self._receive_dead_letter(message, attrs, broker_time, receive_time)
            return
        if self._faults.lose(attrs.event_id):
            self._metrics.count("fault_lost")
            message.ack()
            return
        if self._handler is not None:
            try:
                self._handler(message)
            except Exception:
                self._metrics.count("handler_error")
                log.exception(
                    "handler failed on event %s (%s), nacked for redelivery",
                    attrs.event_id,
                    self._subscription,
                )
                message.nack()
                return
        receipt = Receipt(
            subscription=self._subscription,
            event_id=attrs.event_id,
            topic=self._topic,
            trace_id=attrs.trace_id,
            message_id=message.message_id,
            publish_time=attrs.publish_time,
            broker_publish_time=broker_time,
            receive_time=receive_time,
            delivery_attempt=attempt,
        )
        self._queue.put((message, receipt))

    def _receive_dead_letter(
        self,
        message: Message,
        attrs: AuditedAttributes,
        broker_time: datetime,
        receive_time: datetime,
    ) -> None:
        """A message Pub/Sub moved here from another subscription: recorded as a dead letter of
        that subscription, on its topic. One whose source cannot be read or no longer exists
        is counted `dead_letter_unresolved`, logged and acked (it would never resolve)."""
        given = str(message.attributes.get(DEAD_LETTER_SOURCE, ""))
        source = given.rsplit("/", 1)[-1]
        raw = message.attributes.get(DEAD_LETTER_ATTEMPTS)
        attempts = parse_ascii_int(raw, 10) if isinstance(raw, str) else None
        topic = None
        if is_pubsub_id(source) and (given == source or _SUBSCRIPTION_PATH.fullmatch(given)):
            assert self._dead_letter_sources is not None
            topic = self._dead_letter_sources(given)  # raises on a transient error: nacked
        if topic is None or not is_pubsub_id(topic):
            self._metrics.count("dead_letter_unresolved")
            log.warning(
                "dead letter %s (event %s) on %s: source subscription %r unknown; acked",
                message.message_id,
                attrs.event_id,
                self._subscription,
                source,
            )
            message.ack()
            return
        letter = Receipt(
            subscription=source,
            event_id=attrs.event_id,
            topic=topic,
            trace_id=attrs.trace_id,
            message_id=message.message_id,
            publish_time=attrs.publish_time,
            broker_publish_time=broker_time,
            receive_time=receive_time,
            delivery_attempt=attempts if attempts and attempts < 2**31 else None,
            dead_letter_subscription=self._subscription,
        )
        self._queue.put((message, letter))

    def _receive_relayed(self, message: Message, receive_time: datetime) -> None:
        """A receipt message: a consumer in another language received a message of an
        audited topic on one of its subscriptions (attributes `ea.*`, the event's own beside
        them). Recorded as that subscription's receipt once the subscription is found to be
        one of that topic's; otherwise rejected (counted, logged, acked). The delivered
        message's Pub/Sub publish time must be earlier than the receipt message's own (set by
        Pub/Sub), by at most DEAD_LETTER_MAX_AGE: a receipt is filed by it, and retention
        must reach it."""
        assert self._relayed_for is not None
        own = _as_utc(message.publish_time)
        try:
            relayed = parse_relayed(message.attributes)
            broker = relayed.broker_publish_time
            if not own - DEAD_LETTER_MAX_AGE <= broker <= own + _RELAY_SKEW:
                raise InvalidMessageError(
                    "ea.publishTime is not within a week before the receipt message's own "
                    "publish time"
                )
            attrs = read_attributes(message.attributes, broker)
        except InvalidMessageError as exc:
            self._metrics.count("invalid")
            log.warning(
                "invalid receipt message %s on %s (%s): acked without a receipt",
                message.message_id, self._subscription, exc,
            )  # fmt: skip
            message.ack()
            return
        if self._relay_seen(_relay_key(message.attributes)):
            # A copy of a receipt message already recorded (a lost ack, the consumer's client
            # publishing twice): one delivery, not two.
            self._metrics.count("relay_repeated")
            message.ack()
            return
        try:
            topic = self._relayed_for(relayed.subscription)
        except Exception as exc:  # Pub/Sub unavailable, quota, permission: nacked, retried
            self._metrics.count("relay_lookup_failed")
            log.warning(
                "receipt message %s on %s: subscription %s could not be looked up, nacked: %s",
                message.message_id, self._subscription, relayed.subscription, exc,
            )  # fmt: skip
            message.nack()
            return
        if topic != relayed.topic or relayed.subscription == self._subscription:
            self._metrics.count("relay_rejected")
            log.warning(
                "receipt message %s on %s names subscription %s of topic %s, which is %s: "
                "rejected (acked without a receipt)",
                message.message_id, self._subscription, relayed.subscription, relayed.topic,
                f"on topic {topic}" if topic else "not a subscription this process may read",
            )  # fmt: skip
            message.ack()
            return
        if attrs.publish_time_fallback is not None:
            self._metrics.fallback[attrs.publish_time_fallback].inc()
        receipt = Receipt(
            subscription=relayed.subscription,
            event_id=attrs.event_id,
            topic=topic,
            trace_id=attrs.trace_id,
            message_id=relayed.message_id,
            publish_time=attrs.publish_time,
            broker_publish_time=broker,
            receive_time=relayed.receive_time or receive_time,
            delivery_attempt=relayed.delivery_attempt,
        )
        self._queue.put((message, receipt))

    def _relay_seen(self, key: tuple[str, ...]) -> bool:
        with self._attempts_lock:
            return key in self._relayed

    def _relay_recorded(self, messages: list[Message]) -> None:
        """These receipt messages' receipts are durable: copies of them count no more."""
        with self._attempts_lock:
            for message in messages:
                self._relayed[_relay_key(message.attributes)] = None
            while len(self._relayed) > _RELAYED_REMEMBERED:
                self._relayed.popitem(last=False)

    def _internal_error(self, message: Message, exc: Exception) -> None:
        """A bug of ours on this message: nack it for another try, a bounded number of times."""
        try:
            message_id = str(message.message_id)
            attempt = self._attempt(message, message_id)
            if attempt < MAX_INTERNAL_ERROR_ATTEMPTS:
                self._metrics.count("internal_error")
                log.error(
                    "internal error on message %s (%s), attempt %d of %d, nacked: %r",
                    message_id,
                    self._subscription,
                    attempt,
                    MAX_INTERNAL_ERROR_ATTEMPTS,
                    exc,
                    exc_info=exc,
                )
                message.nack()
                return
            self._metrics.count("internal_error_dropped")
            log.error(
                "DROPPED message %s (%s): internal error on %d attempts, acked WITHOUT a "
                "receipt: %r",
                message_id,
                self._subscription,
                attempt,
                exc,
                exc_info=exc,
            )
            message.ack()
        except Exception:  # never let the error path itself raise into the client's threads
            log.exception("could not settle message after an internal error")

    def _attempt(self, message: Message, message_id: str) -> int:
        """This delivery's attempt number: Pub/Sub's when it counts them, else ours."""
        from_broker = getattr(message, "delivery_attempt", None)
        with self._attempts_lock:
            # Kept once given up too: a redelivery of a dropped message (a lost ack) is dropped.
            attempt = min(self._attempts.pop(message_id, 0) + 1, MAX_INTERNAL_ERROR_ATTEMPTS)
            self._attempts[message_id] = attempt
            if len(self._attempts) > _ATTEMPTS_REMEMBERED:
                self._attempts.popitem(last=False)
        if isinstance(from_broker, int):
            attempt = max(attempt, from_broker)
        return attempt

    def _take_batch(self) -> tuple[list[tuple[Message, Receipt]], bool]:
        first = self._queue.get()
        if first is None:
            return [], True
        batch = [first]
        deadline = time.monotonic() + self._flush_interval
        while len(batch) < self._batch_size:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _run(self) -> None:
        while True:
            batch, stopping = self._take_batch()
            if batch:
                try:
                    self._write(batch)
                except Exception as exc:  # _write settles every message; this is the last guard
                    log.exception("receipt writer: unexpected error, batch nacked")
                    for message, _ in batch:
                        self._internal_error(message, exc)
            if stopping:
                return

    def _write(self, batch: list[tuple[Message, Receipt]]) -> None:
        """Write a batch's receipts, then settle its messages; never raises."""
        try:
            self._store.record_receipts([r for _, r in batch], utc_now_ms())
        except StoreError as exc:
            self._store_failed(batch, exc)
            return
        except Exception as exc:
            if len(batch) == 1:
                self._internal_error(batch[0][0], exc)
                return
            # A bug triggered by one receipt must not hold back the others: write them singly.
            # (Such errors come from building the write, before anything is sent; were a part
            # written, its receipts would show one extra delivery, never a lost event.)
            log.warning(
                "unexpected error writing %d receipts on %s, writing them one by one: %r",
                len(batch),
                self._subscription,
                exc,
            )
            for item in batch:
                self._write([item])
            return
        self.last_write_ok = True
        self._metrics.store_ok.set(1)
        if self._relayed_for is not None:
            self._relay_recorded([m for m, _ in batch])
        latency = self._metrics.delivery_latency
        redelivered = dead = 0
        for message, receipt in batch:
            if receipt.dead_letter:
                dead += 1
                self._ack(message)
                continue
            latency.observe(max(0.0, (receipt.receive_time - receipt.publish_time).total_seconds()))
            if receipt.delivery_attempt is not None:
                self._metrics.delivery_attempts.observe(receipt.delivery_attempt)
            if receipt.event_id not in self._redelivered and self._faults.redeliver(
                receipt.event_id
            ):
                self._redelivered.add(receipt.event_id)
                message.nack()
                redelivered += 1
            else:
                self._ack(message)
            if self._on_receipt is not None:
                try:
                    self._on_receipt(receipt)
                except Exception:  # the receipt is durable and the message settled
                    log.exception("on_receipt hook failed on event %s", receipt.event_id)
        self._metrics.count("recorded", len(batch) - redelivered - dead)
        if dead:
            self._metrics.count("dead_letter_recorded", dead)
        if redelivered:
            self._metrics.count("fault_redelivered", redelivered)

    def _ack(self, message: Message) -> None:
        """Ack a recorded message; with exactly-once delivery, confirm it (not waiting)."""
        if not self._exactly_once:
            message.ack()
            return

        def confirmed(future: Future[Any]) -> None:
            exc = future.exception()
            if exc is None:
                return
            self._metrics.count("ack_failed")
            log.warning(
                "ack of message %s on %s failed (%s): its receipt is stored, so the "
                "redelivery that follows counts as a duplicate",
                message.message_id,
                self._subscription,
                exc,
            )

        message.ack_with_response().add_done_callback(confirmed)

    def _store_failed(self, batch: list[tuple[Message, Receipt]], exc: StoreError) -> None:
        for message, _ in batch:
            message.nack()
        self._metrics.count("store_error", len(batch))
        self._metrics.store_ok.set(0)
        self.last_write_ok = False
        log.warning(
            "receipts of %d messages on %s not written, nacked for redelivery: %s",
            len(batch),
            self._subscription,
            exc,
        )


def _relay_key(attributes: Any) -> tuple[str, ...]:
    """What makes two receipt messages the same delivery: a copy has the same, a consumer's
    redelivery has its own receive time (and attempt)."""
    return tuple(
        str(attributes.get(k, ""))
        for k in (RELAY_SUBSCRIPTION, RELAY_MESSAGE_ID, RELAY_DELIVERY_ATTEMPT, RELAY_RECEIVE_TIME)
    )


def _as_utc(moment: datetime) -> datetime:
    # The client returns an aware datetime; older versions returned naive UTC.
    aware = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return aware.astimezone(UTC).replace(microsecond=aware.microsecond // 1000 * 1000)
