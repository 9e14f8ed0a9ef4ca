"""The audited subscriber: record each delivery durably, then ack; nack when the store fails.

Streaming-pull callbacks only parse and enqueue; one writer thread takes batches, upserts the
receipts (one per subscription and eventID, `deliveries` counting redeliveries), and only
then acks. A failed write nacks the whole batch so Pub/Sub redelivers it. A message without a
valid eventID is counted `invalid`, logged and acked: redelivering it could never help.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from eventaudit.contract import InvalidMessageError, read_attributes, utc_now_ms
from eventaudit.records import Receipt
from eventaudit.store import ReceiptStore, StoreError

log = logging.getLogger(__name__)

OUTCOMES = (
    "recorded",
    "invalid",
    "handler_error",
    "store_error",
    "fault_lost",
    "fault_redelivered",
)


class SubscriberMetrics:
    """The subscriber's own metrics, registered on the registry given."""

    def __init__(self, registry: CollectorRegistry, subscription: str) -> None:
        self.messages = Counter(
            "eventaudit_subscriber_messages_total",
            "Messages handled, by outcome: recorded then acked; invalid (acked, no record); "
            "handler_error and store_error (nacked for redelivery); fault_* (fault knobs).",
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
        self.subscription = subscription
        for outcome in OUTCOMES:
            self.messages.labels(subscription, outcome)
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

    def ack(self) -> None: ...

    def nack(self) -> None: ...


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
    ) -> None:
        """`handler`, when given, is the consumer's own processing: it runs first, and a
        message is recorded (then acked) only if it returns; if it raises, the message is
        nacked and counted `handler_error`, so the receipt means "delivered and processed".
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
        self._queue: queue.Queue[tuple[Message, Receipt] | None] = queue.Queue()
        self._redelivered: set[str] = set()
        self._thread = threading.Thread(target=self._run, name="receipt-writer", daemon=True)
        self.last_write_ok = True

    def start(self) -> None:
        """Start the writer thread (before subscribing)."""
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop the writer."""
        self._queue.put(None)
        self._thread.join(timeout)

    def __call__(self, message: Message) -> None:
        """The streaming-pull callback: parse and enqueue, never raise."""
        receive_time = utc_now_ms()
        try:
            attrs = read_attributes(message.attributes)
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
        broker_time = _as_utc(message.publish_time)
        receipt = Receipt(
            subscription=self._subscription,
            event_id=attrs.event_id,
            topic=self._topic,
            trace_id=attrs.trace_id,
            message_id=message.message_id,
            publish_time=attrs.publish_time or broker_time,
            broker_publish_time=broker_time,
            receive_time=receive_time,
        )
        self._queue.put((message, receipt))
        self._metrics.pending_receipts.set(self._queue.qsize())

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
                self._write(batch)
                return [], True
            batch.append(item)
        return batch, False

    def _run(self) -> None:
        while True:
            batch, stopping = self._take_batch()
            if batch:
                self._write(batch)
            if stopping:
                return

    def _write(self, batch: list[tuple[Message, Receipt]]) -> None:
        receipts = [r for _, r in batch]
        try:
            self._store.record_receipts(receipts, utc_now_ms())
        except StoreError as exc:
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
            return
        self.last_write_ok = True
        self._metrics.store_ok.set(1)
        latency = self._metrics.delivery_latency
        redelivered = 0
        for message, receipt in batch:
            latency.observe(max(0.0, (receipt.receive_time - receipt.publish_time).total_seconds()))
            if receipt.event_id not in self._redelivered and self._faults.redeliver(
                receipt.event_id
            ):
                self._redelivered.add(receipt.event_id)
                message.nack()
                redelivered += 1
            else:
                message.ack()
            if self._on_receipt is not None:
                self._on_receipt(receipt)
        self._metrics.count("recorded", len(batch) - redelivered)
        if redelivered:
            self._metrics.count("fault_redelivered", redelivered)
        self._metrics.pending_receipts.set(self._queue.qsize())


def _as_utc(moment: datetime) -> datetime:
    # The client returns an aware datetime; older versions returned naive UTC.
    aware = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return aware.astimezone(UTC).replace(microsecond=aware.microsecond // 1000 * 1000)
