"""The audited publisher: publish to Pub/Sub, then record the event through a bounded buffer.

The audit never takes the business path down: a publish succeeds or fails on Pub/Sub alone.
Records wait in a bounded in-memory buffer that a background thread writes in batches; while
the store is unavailable they stay there and are retried, and what does not fit is counted
(`eventaudit_publisher_records_total{outcome="dropped"}`) and logged, never silently lost.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from eventaudit.contract import (
    TraceContext,
    build_attributes,
    new_event_id,
    normalize_options,
    utc_now_ms,
    validate_event_id,
)
from eventaudit.records import PublishRecord
from eventaudit.store import PublishRecordStore, StoreError

log = logging.getLogger(__name__)

EVENT_OUTCOMES = ("published", "error", "timeout")
RECORD_OUTCOMES = ("written", "dropped", "write_error")


class PublisherMetrics:
    """The publisher's own metrics, registered on the registry given."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.events = Counter(
            "eventaudit_publisher_events_total",
            "Events handed to Pub/Sub, by outcome.",
            ["outcome"],
            registry=registry,
        )
        self.records = Counter(
            "eventaudit_publisher_records_total",
            "Publish records by outcome: written to the store, dropped on buffer overflow, "
            "or failed write attempts (records stay buffered and are retried).",
            ["outcome"],
            registry=registry,
        )
        self.buffer_depth = Gauge(
            "eventaudit_publisher_record_buffer_depth",
            "Publish records waiting to be written to the store.",
            registry=registry,
        )
        self.buffer_capacity = Gauge(
            "eventaudit_publisher_record_buffer_capacity",
            "Most publish records the buffer holds before it drops.",
            registry=registry,
        )
        self.store_up = Gauge(
            "eventaudit_publisher_store_up",
            "1 when the last write to the audit store succeeded.",
            registry=registry,
        )
        self.latency = Histogram(
            "eventaudit_publisher_publish_latency_seconds",
            "Time from handing an event to the client until Pub/Sub acknowledged it.",
            ["topic"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )
        for outcome in EVENT_OUTCOMES:
            self.events.labels(outcome)
        for outcome in RECORD_OUTCOMES:
            self.records.labels(outcome)
        self.store_up.set(1)


class RecordBuffer:
    """Bounded FIFO of publish records, written in batches by one background thread."""

    def __init__(
        self,
        store: PublishRecordStore,
        metrics: PublisherMetrics,
        capacity: int = 100_000,
        batch_size: int = 500,
        flush_interval: float = 0.05,
        max_backoff: float = 5.0,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._capacity = capacity
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._max_backoff = max_backoff
        self._records: deque[PublishRecord] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._in_flight = 0
        self._thread = threading.Thread(target=self._run, name="record-buffer", daemon=True)
        metrics.buffer_capacity.set(capacity)

    def start(self) -> None:
        """Start the writer thread."""
        self._thread.start()

    def add(self, record: PublishRecord) -> bool:
        """Queue a record; False (counted and logged) when the buffer is full."""
        with self._cond:
            if len(self._records) >= self._capacity:
                self._metrics.records.labels("dropped").inc()
                log.error(
                    "publish record buffer full (%d): dropped record of event %s on topic %s",
                    self._capacity,
                    record.event_id,
                    record.topic,
                )
                return False
            self._records.append(record)
            self._metrics.buffer_depth.set(len(self._records))
            if len(self._records) >= self._batch_size:
                self._cond.notify()
            return True

    def depth(self) -> int:
        """Records not yet written (queued plus the batch being written)."""
        with self._cond:
            return len(self._records) + self._in_flight

    def flush(self, timeout: float) -> bool:
        """Wait until every queued record is written; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._cond.notify()
            while self._records or self._in_flight:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.05))
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (up to `timeout`), then stop; log what could not be written."""
        self.flush(timeout)
        with self._cond:
            self._closing = True
            left = len(self._records) + self._in_flight
            self._cond.notify_all()
        self._thread.join(timeout=self._max_backoff + 1)
        if left:
            self._metrics.records.labels("dropped").inc(left)
            log.error("publisher stopping with %d unwritten publish records (dropped)", left)

    def _take_batch(self) -> list[PublishRecord]:
        with self._cond:
            if not self._records and not self._closing:
                self._cond.wait(self._flush_interval)
            n = min(self._batch_size, len(self._records))
            batch = [self._records.popleft() for _ in range(n)]
            self._in_flight = n
            return batch

    def _run(self) -> None:
        backoff = 0.1
        while True:
            batch = self._take_batch()
            if not batch:
                with self._cond:
                    if self._closing:
                        return
                continue
            try:
                self._store.insert_publish_records(batch, utc_now_ms())
            except StoreError as exc:
                self._metrics.records.labels("write_error").inc()
                self._metrics.store_up.set(0)
                log.warning(
                    "could not write %d publish records, keeping them buffered: %s", len(batch), exc
                )
                with self._cond:
                    # Back to the front, in order; over capacity is tolerated for this batch
                    # because these records were already accepted.
                    self._records.extendleft(reversed(batch))
                    self._in_flight = 0
                    self._metrics.buffer_depth.set(len(self._records))
                    if self._closing:
                        return
                    self._cond.wait(backoff)
                backoff = min(backoff * 2, self._max_backoff)
                continue
            backoff = 0.1
            self._metrics.records.labels("written").inc(len(batch))
            self._metrics.store_up.set(1)
            with self._cond:
                self._in_flight = 0
                self._metrics.buffer_depth.set(len(self._records))
                self._cond.notify_all()


class PublishClient(Protocol):
    """The part of google-cloud-pubsub's PublisherClient the audited publisher uses."""

    def publish(self, topic: str, data: bytes, **attrs: str) -> Future[str]: ...

    def topic_path(self, project: str, topic: str) -> str: ...


@dataclass(frozen=True, slots=True)
class PublishedEvent:
    """What a caller learns about an audited publish."""

    event_id: str
    topic: str
    trace: TraceContext
    attributes: dict[str, str]
    payload: Any
    future: Future[str]

    def message_id(self, timeout: float) -> str:
        """Wait for Pub/Sub's acknowledgement; raises what the publish raised."""
        return self.future.result(timeout=timeout)


class AuditedPublisher:
    """Publishes JSON events with audit attributes and records each one that Pub/Sub accepted."""

    def __init__(
        self,
        client: PublishClient,
        project: str,
        buffer: RecordBuffer,
        metrics: PublisherMetrics,
        payload_cap_bytes: int = 16_384,
    ) -> None:
        self._client = client
        self._project = project
        self._buffer = buffer
        self._metrics = metrics
        self._payload_cap = payload_cap_bytes
        self._pending = 0
        self._pending_cond = threading.Condition()

    def flush(self, timeout: float) -> bool:
        """Wait until every publish has settled and every record is written; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._pending_cond:
            if not self._pending_cond.wait_for(lambda: self._pending == 0, timeout):
                return False
        return self._buffer.flush(max(0.0, deadline - time.monotonic()))

    def publish(
        self,
        topic: str,
        payload: Mapping[str, Any],
        *,
        event_id: str | None = None,
        trace: TraceContext | None = None,
        options: object = None,
    ) -> PublishedEvent:
        """Publish `payload` as JSON; the record is buffered once Pub/Sub returns a message id."""
        event_id = validate_event_id(event_id) if event_id is not None else new_event_id()
        trace = trace.child() if trace is not None else TraceContext.new()
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
        publish_time = utc_now_ms()
        attributes = build_attributes(event_id, publish_time, trace, normalize_options(options))
        started = time.perf_counter()
        with self._pending_cond:
            self._pending += 1
        future = self._client.publish(
            self._client.topic_path(self._project, topic), body.encode(), **attributes
        )

        recorded_payload, truncated = body, False
        if len(body.encode()) > self._payload_cap:
            recorded_payload = body.encode()[: self._payload_cap].decode(errors="ignore")
            truncated = True

        def _done(done: Future[str]) -> None:
            try:
                _record(done)
            finally:
                with self._pending_cond:
                    self._pending -= 1
                    self._pending_cond.notify_all()

        def _record(done: Future[str]) -> None:
            exc = done.exception()
            if exc is not None:
                outcome = "timeout" if isinstance(exc, TimeoutError) else "error"
                self._metrics.events.labels(outcome).inc()
                log.warning("publish of event %s to %s failed: %s", event_id, topic, exc)
                return
            self._metrics.events.labels("published").inc()
            self._metrics.latency.labels(topic).observe(time.perf_counter() - started)
            self._buffer.add(
                PublishRecord(
                    event_id=event_id,
                    trace_id=trace.trace_id,
                    topic=topic,
                    payload=recorded_payload,
                    message_id=done.result(),
                    publish_time=publish_time,
                    payload_truncated=truncated,
                )
            )

        future.add_done_callback(_done)
        return PublishedEvent(event_id, topic, trace, attributes, payload, future)
