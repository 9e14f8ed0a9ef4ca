"""The audited publisher: publish to Pub/Sub, then record the event through a bounded buffer.

The audit never takes the business path down: a publish succeeds or fails on Pub/Sub alone.
Records wait in a bounded in-memory buffer that a background thread writes in batches; while
the store is unavailable they stay there and are retried, and what does not fit is counted
(`eventaudit_publisher_records_total{outcome="dropped"}`) and logged, never silently lost.
A publish record is identified by (topic, eventID): an event fanned out to several topics has
one on each. The same event published again under a stored key (same payload, another
message: a caller retrying) is counted `retried`; a different payload there, `conflict`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass
from typing import Any, Protocol

from google.api_core import exceptions as gexc
from google.cloud.pubsub_v1.publisher.exceptions import MessageTooLargeError
from google.pubsub_v1.types import PublishRequest, PubsubMessage
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from eventaudit.contract import (
    MAX_ORDERING_KEY_BYTES,
    MAX_PUBLISH_REQUEST_BYTES,
    TraceContext,
    build_attributes,
    encode_attributes,
    is_pubsub_id,
    new_event_id,
    normalize_options,
    utc_now_ms,
    validate_event_attributes,
    validate_event_id,
)
from eventaudit.records import PublishRecord
from eventaudit.store import DuplicatePublishes, PublishRecordStore, StoreError

log = logging.getLogger(__name__)

EVENT_OUTCOMES = ("published", "error", "timeout")
RECORD_OUTCOMES = ("written", "retried", "conflict", "dropped", "write_error")
REFUSAL_REASONS = ("topic_unverified", "busy")
# Unexpected write failures (not StoreError) of one batch before its records are written one
# at a time, and of one record alone before it is dropped: a record that can never be written
# is lost alone, counted and logged, and never retried forever.
_UNEXPECTED_ATTEMPTS = 3
# How a publish future fails when Pub/Sub did not answer in time: the client's own deadline,
# its retry budget running out, or a wait on the future timing out.
PUBLISH_TIMEOUTS = (gexc.DeadlineExceeded, gexc.RetryError, TimeoutError)


def publish_outcome(exc: BaseException | None) -> str:
    """`published`, `timeout` or `error`: the outcome label of a settled publish."""
    if exc is None:
        return "published"
    return "timeout" if isinstance(exc, PUBLISH_TIMEOUTS) else "error"


class InvalidEventError(ValueError):
    """The event cannot be published as given; nothing was handed to Pub/Sub."""


class InvalidPayloadError(InvalidEventError):
    """The payload is not a JSON object Pub/Sub can carry (non-finite number, lone surrogate)."""


class InvalidOptionsError(InvalidEventError):
    """Options is not a JSON value of finite numbers that fits in an attribute."""


class InvalidAttributesError(InvalidEventError):
    """The event's own attributes are not strings, use a reserved name or are too large."""


class InvalidOrderingKeyError(InvalidEventError):
    """An ordering key Pub/Sub would refuse (empty is "no key"; at most 1024 bytes)."""


class TopicNotFoundError(LookupError):
    """The topic does not exist (answered from the bounded existence cache)."""

    def __init__(self, topic: str) -> None:
        super().__init__(f"topic {topic!r} does not exist")
        self.topic = topic


class TopicUnverifiedError(LookupError):
    """Whether the topic exists cannot be checked and it is not trusted: nothing was published."""

    def __init__(self, topic: str) -> None:
        super().__init__(f"cannot verify topic {topic!r} exists")
        self.topic = topic


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
            "Publish records by outcome: written to the store; retried (the same event, same "
            "payload, published again as another message, e.g. a client retrying after a "
            "timeout; the first record stands); conflict (the store holds a different payload "
            "under the same topic and eventID; not written); dropped (buffer full, or still "
            "unwritten at stop); write_error (failed write attempts: the records stay buffered "
            "and are retried).",
            ["outcome"],
            registry=registry,
        )
        self.refused = Counter(
            "eventaudit_publisher_refused_total",
            "Publishes refused before anything reached Pub/Sub, by reason: topic_unverified "
            "(the topic's existence cannot be checked and it is not in --topics); busy (too "
            "many publishes in flight in the API).",
            ["reason"],
            registry=registry,
        )
        self.buffer_depth = Gauge(
            "eventaudit_publisher_record_buffer_depth",
            "Publish records accepted and not yet durable: queued plus the batch being written.",
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
        for reason in REFUSAL_REASONS:
            self.refused.labels(reason)
        self.store_up.set(1)


class RecordBuffer:
    """Bounded FIFO of publish records, written in batches by one background thread.

    Depth and capacity count every record accepted and not yet durable: the queue plus the
    batch the writer is writing.
    """

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
        self._close_deadline = 0.0
        self._in_flight = 0
        self._thread = threading.Thread(target=self._run, name="record-buffer", daemon=True)
        metrics.buffer_capacity.set(capacity)

    def start(self) -> None:
        """Start the writer thread."""
        self._thread.start()

    def add(self, record: PublishRecord) -> bool:
        """Queue a record; False (counted and logged) when the buffer is full or closed."""
        with self._cond:
            if self._closing or len(self._records) + self._in_flight >= self._capacity:
                self._metrics.records.labels("dropped").inc()
                log.error(
                    "publish record buffer %s: dropped record of event %s on topic %s",
                    "closed" if self._closing else f"full ({self._capacity})",
                    record.event_id,
                    record.topic,
                )
                return False
            self._records.append(record)
            self._show_depth()
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
        """Write what is queued for up to `timeout` seconds in all, then stop.

        Records still queued then are counted dropped and logged. A write still in progress
        is not counted here: the writer counts it written or dropped when the store answers.
        """
        deadline = time.monotonic() + timeout
        self.flush(timeout)
        with self._cond:
            self._closing = True
            self._close_deadline = deadline
            self._cond.notify_all()
        if self._thread.ident is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            left = len(self._records)
            self._records.clear()
            writing = self._in_flight
            self._show_depth()
        if left:
            self._metrics.records.labels("dropped").inc(left)
            log.error("publisher stopping with %d unwritten publish records (dropped)", left)
        if writing:
            log.warning(
                "publisher stopping with %d publish records still being written; they are "
                "counted written or dropped when the store answers",
                writing,
            )

    def _show_depth(self) -> None:
        # Called with the lock held.
        self._metrics.buffer_depth.set(len(self._records) + self._in_flight)

    def _take_batch(self, size: int) -> list[PublishRecord]:
        with self._cond:
            if not self._records and not self._closing:
                self._cond.wait(self._flush_interval)
            if self._closing and time.monotonic() >= self._close_deadline:
                return []
            n = min(size, len(self._records))
            batch = [self._records.popleft() for _ in range(n)]
            self._in_flight = n
            return batch

    def writer_alive(self) -> bool:
        """True while the writer thread runs (started and not stopped)."""
        return self._thread.is_alive()

    def _run(self) -> None:
        try:
            self._write_until_closed()
        except BaseException:  # the thread ends either way; say so (/healthz now answers 503)
            log.critical(
                "publish record writer stopped unexpectedly: %d publish records wait unwritten",
                self.depth(),
                exc_info=True,
            )

    def _write_until_closed(self) -> None:
        backoff = 0.1
        attempts = 0  # unexpected failures in a row of the batch at the front of the queue
        singles = 0  # records still to write one at a time, to isolate one that never writes
        while True:
            batch = self._take_batch(1 if singles else self._batch_size)
            if not batch:
                with self._cond:
                    if self._closing:
                        return
                continue
            try:
                duplicates = self._store.insert_publish_records(batch, utc_now_ms())
            except StoreError as exc:
                self._metrics.records.labels("write_error").inc()
                self._metrics.store_up.set(0)
                if not self._closing:  # when stopping, _keep counts and logs it dropped
                    log.warning(
                        "could not write %d publish records, keeping them buffered: %s",
                        len(batch),
                        exc,
                    )
                if not self._keep(batch, backoff, exc):
                    return
                backoff = min(backoff * 2, self._max_backoff)
                continue
            except Exception as exc:  # a bug, or a record bson cannot encode: not an outage
                self._metrics.records.labels("write_error").inc()
                self._metrics.store_up.set(0)
                attempts += 1
                log.exception(
                    "unexpected error writing %d publish records (attempt %d of %d); they stay "
                    "buffered",
                    len(batch),
                    attempts,
                    _UNEXPECTED_ATTEMPTS,
                )
                if attempts < _UNEXPECTED_ATTEMPTS:
                    if not self._keep(batch, backoff, exc):
                        return
                elif len(batch) > 1:
                    # Somewhere in the batch a record may never be writable: find it alone.
                    attempts, singles = 0, len(batch)
                    if not self._keep(batch, backoff, exc):
                        return
                else:
                    attempts, singles = 0, singles - 1
                    self._drop_unwritable(batch[0], exc)
                backoff = min(backoff * 2, self._max_backoff)
                continue
            attempts, backoff = 0, 0.1
            singles = max(0, singles - 1)
            self._count_written(batch, duplicates)
            self._metrics.store_up.set(1)
            with self._cond:
                self._in_flight = 0
                self._show_depth()
                self._cond.notify_all()

    def _keep(self, batch: list[PublishRecord], backoff: float, exc: Exception) -> bool:
        """Put a failed batch back at the front and wait `backoff`; when stopping, count it
        dropped instead and return False (the writer ends)."""
        with self._cond:
            self._in_flight = 0
            if self._closing:
                self._metrics.records.labels("dropped").inc(len(batch))
                self._show_depth()
                self._cond.notify_all()
                log.error(
                    "%d publish records not written before stop (dropped): %s", len(batch), exc
                )
                return False
            # Back to the front, in order: these records were already accepted.
            self._records.extendleft(reversed(batch))
            self._show_depth()
            self._cond.wait(backoff)
        return True

    def _drop_unwritable(self, record: PublishRecord, exc: Exception) -> None:
        self._metrics.records.labels("dropped").inc()
        log.error(
            "publish record of event %s on topic %s cannot be written (failed %d times alone; "
            "dropped)",
            record.event_id,
            record.topic,
            _UNEXPECTED_ATTEMPTS,
            exc_info=exc,
        )
        with self._cond:
            self._in_flight = 0
            self._show_depth()
            self._cond.notify_all()

    def _count_written(self, batch: list[PublishRecord], duplicates: DuplicatePublishes) -> None:
        retried, conflicts = duplicates.retried, duplicates.conflicts
        self._metrics.records.labels("written").inc(len(batch) - len(retried) - len(conflicts))
        if retried:
            self._metrics.records.labels("retried").inc(len(retried))
            log.info(
                "%d events published again with the same payload (a caller retrying); the "
                "first publish record stands: %s",
                len(retried),
                _keys(retried),
            )
        if conflicts:
            self._metrics.records.labels("conflict").inc(len(conflicts))
            log.error(
                "%d publish records not written: their topic and eventID already hold a "
                "different payload (a reused eventID?): %s",
                len(conflicts),
                _keys(conflicts),
            )


def _keys(records: tuple[PublishRecord, ...]) -> str:
    """The first few records' keys and messages, for a log line."""
    return ", ".join(f"{r.topic}|{r.event_id} (message {r.message_id})" for r in records[:5])


class PublishClient(Protocol):
    """The part of google-cloud-pubsub's PublisherClient the audited publisher uses."""

    def publish(self, topic: str, data: bytes, **attrs: str) -> Future[str]: ...

    def resume_publish(self, topic: str, ordering_key: str) -> None: ...

    def topic_path(self, project: str, topic: str) -> str: ...

    def get_topic(self, *, topic: str, timeout: float) -> object: ...


class KnownTopics:
    """Bounded, expiring caches of which topics exist, asked before anything is published.

    The PublisherClient keeps state per topic name it ever published to, for good; checking
    with the publisher API (`get_topic`) first, and remembering the answers in maps of at most
    `size` names each, makes memory independent of the names callers send. Topics found and
    answers for other names are kept apart, so invented names never evict a topic in use.

    A check that fails (permission denied: Pub/Sub's publisher role does not include
    `pubsub.topics.get`; Pub/Sub unavailable) proves nothing. With `trusted` names (the API
    trusts its users topic and `--topics`), those are published anyway and any other raises
    TopicUnverifiedError, so names callers invent never reach the client; the refusals are
    logged once per `missing_ttl` with their count. With `trusted=None` (a library's default:
    its topic names come from its own code) every name is published anyway.
    """

    def __init__(
        self,
        client: PublishClient,
        project: str,
        size: int = 4096,
        found_ttl: float = 300.0,
        missing_ttl: float = 10.0,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        trusted: Iterable[str] | None = None,
    ) -> None:
        self._client = client
        self._project = project
        self._size = size
        self._found_ttl = found_ttl
        self._missing_ttl = missing_ttl
        self._timeout = timeout
        self._clock = clock
        self._trusted = frozenset(trusted) if trusted is not None else None
        self._found: OrderedDict[str, float] = OrderedDict()  # topic -> expiry
        # Every other answer: "missing" (NotFound) or "unknown" (the check failed), and expiry.
        self._others: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._refused = 0
        self._refusals_logged_at: float | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._found) + len(self._others)

    def trust_only(self, topics: Iterable[str]) -> None:
        """When existence cannot be checked, publish these topics and refuse any other."""
        with self._lock:
            self._trusted = frozenset(topics)

    def exists(self, topic: str) -> bool:
        """Whether `topic` exists, from the caches or from one `get_topic` call.

        TopicUnverifiedError when that cannot be checked and `topic` is not trusted.
        """
        now = self._clock()
        with self._lock:
            expiry = self._found.get(topic)
            if expiry is not None and expiry > now:
                self._found.move_to_end(topic)
                return True
            answer = self._others.get(topic)
            if answer is not None and answer[1] > now:
                self._others.move_to_end(topic)
                return answer[0] != "missing" and self._unchecked(topic, now)
        try:
            self._client.get_topic(
                topic=self._client.topic_path(self._project, topic), timeout=self._timeout
            )
        except gexc.NotFound:
            self._remember(self._others, topic, ("missing", now + self._missing_ttl))
            return False
        except Exception as exc:  # proves nothing either way
            self._remember(self._others, topic, ("unknown", now + self._missing_ttl))
            if self._is_trusted(topic):
                log.warning(
                    "could not check whether topic %s exists, publishing anyway: %s", topic, exc
                )
            with self._lock:
                return self._unchecked(topic, now, exc)
        self._remember(self._found, topic, now + self._found_ttl)
        return True

    def forget(self, topic: str) -> None:
        """Drop the cached answer (the topic was deleted since it was checked)."""
        with self._lock:
            self._found.pop(topic, None)
            self._others.pop(topic, None)

    def _is_trusted(self, topic: str) -> bool:
        return self._trusted is None or topic in self._trusted

    def _remember(self, cache: OrderedDict[str, Any], topic: str, answer: Any) -> None:
        with self._lock:
            (self._others if cache is self._found else self._found).pop(topic, None)
            cache[topic] = answer
            cache.move_to_end(topic)
            while len(cache) > self._size:
                cache.popitem(last=False)

    def _unchecked(self, topic: str, now: float, exc: Exception | None = None) -> bool:
        # Called with the lock held: the answer for a topic whose existence is unknown.
        if self._is_trusted(topic):
            return True
        self._refused += 1
        if self._refusals_logged_at is None or now - self._refusals_logged_at >= self._missing_ttl:
            log.warning(
                "cannot verify that topics exist (%s): refusing publishes to topics not in "
                "--topics (or the users topic); %d publishes refused since the last line, the "
                "latest to %s; set --topics",
                exc if exc is not None else "the last check failed",
                self._refused,
                topic,
            )
            self._refusals_logged_at = now
            self._refused = 0
        raise TopicUnverifiedError(topic)


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


def encode_payload(payload: Mapping[str, Any]) -> bytes:
    """The payload as compact UTF-8 JSON; InvalidPayloadError when it cannot be."""
    try:
        text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        return text.encode()
    except UnicodeEncodeError as exc:
        raise InvalidPayloadError(
            f"payload is not encodable as UTF-8: {exc.reason} at position {exc.start}"
        ) from exc
    except ValueError as exc:
        raise InvalidPayloadError("payload numbers must be finite (no NaN or Infinity)") from exc
    except TypeError as exc:
        raise InvalidPayloadError(f"payload is not JSON: {exc}") from exc
    except RecursionError as exc:
        raise InvalidPayloadError("payload is nested too deeply") from exc


def publish_request_bytes(
    path: str, data: bytes, attributes: Mapping[str, str], ordering_key: str
) -> int:
    """Size of the PublishRequest carrying one message, as the client library measures it."""
    message = PubsubMessage.pb()(data=data, attributes=attributes, ordering_key=ordering_key)
    return int(PublishRequest.pb()(topic=path, messages=[message]).ByteSize())


class AuditedPublisher:
    """Publishes JSON events with audit attributes and records each one that Pub/Sub accepted.

    `publish` raises before anything reaches Pub/Sub when the event cannot be published
    (InvalidMessageError for the event id; InvalidOptionsError, InvalidPayloadError or
    InvalidEventError for an invalid topic id; TopicNotFoundError; TopicUnverifiedError, counted
    `eventaudit_publisher_refused_total{reason="topic_unverified"}`; MessageTooLargeError over
    Pub/Sub's 10 MB, checked here as the client checks it; the client's own errors); only what
    the client accepted is counted in flight, so
    `flush` never waits on a publish that never started.
    """

    def __init__(
        self,
        client: PublishClient,
        project: str,
        buffer: RecordBuffer,
        metrics: PublisherMetrics,
        payload_cap_bytes: int = 16_384,
        topics: KnownTopics | None = None,
    ) -> None:
        self._client = client
        self._project = project
        self._buffer = buffer
        self._metrics = metrics
        self._payload_cap = payload_cap_bytes
        self._topics = topics if topics is not None else KnownTopics(client, project)
        self._pending = 0
        self._pending_cond = threading.Condition()

    @property
    def metrics(self) -> PublisherMetrics:
        """The metrics this publisher counts in."""
        return self._metrics

    @property
    def topics(self) -> KnownTopics:
        """The topic existence cache consulted before each publish."""
        return self._topics

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
        attributes: object = None,
        ordering_key: str = "",
    ) -> PublishedEvent:
        """Publish `payload` as JSON, with the event's own `attributes` (a mapping of strings,
        or its JSON text) beside the audit's; the record is buffered once Pub/Sub returns a
        message id."""
        event_id = validate_event_id(event_id) if event_id is not None else new_event_id()
        trace = trace.child() if trace is not None else TraceContext.new()
        try:
            options_text = normalize_options(options)
        except ValueError as exc:
            raise InvalidOptionsError(str(exc)) from exc
        try:
            own = validate_event_attributes(attributes)
        except ValueError as exc:
            raise InvalidAttributesError(str(exc)) from exc
        try:
            key_bytes = len(ordering_key.encode())
        except UnicodeEncodeError as exc:
            raise InvalidOrderingKeyError("ordering key is not encodable as UTF-8") from exc
        if key_bytes > MAX_ORDERING_KEY_BYTES:
            raise InvalidOrderingKeyError(
                f"ordering key is {key_bytes} bytes; Pub/Sub takes at most {MAX_ORDERING_KEY_BYTES}"
            )
        data = encode_payload(payload)
        if not is_pubsub_id(topic):
            raise InvalidEventError(f"invalid topic id {topic!r}")
        path = self._client.topic_path(self._project, topic)
        # The client's own size check, made before anything is asked or handed over (the
        # client keeps state per topic and ordering key it is given); the publish time's
        # digits are as many now as when it is stamped.
        size = publish_request_bytes(
            path,
            data,
            {**own, **build_attributes(event_id, utc_now_ms(), trace, options_text)},
            ordering_key,
        )
        if size > MAX_PUBLISH_REQUEST_BYTES:
            raise MessageTooLargeError(
                f"the message makes a publish request of {size} bytes; Pub/Sub takes at most "
                f"{MAX_PUBLISH_REQUEST_BYTES}"
            )
        try:
            if not self._topics.exists(topic):
                raise TopicNotFoundError(topic)
        except TopicUnverifiedError:
            self._metrics.refused.labels("topic_unverified").inc()
            raise
        publish_time = utc_now_ms()
        sent = {**own, **build_attributes(event_id, publish_time, trace, options_text)}
        started = time.perf_counter()
        try:
            if ordering_key:
                future = self._client.publish(path, data, ordering_key=ordering_key, **sent)
            else:
                future = self._client.publish(path, data, **sent)
        except Exception as exc:  # refused by the client (too large, stopped): never in flight
            self._metrics.events.labels("error").inc()
            log.warning("client refused event %s for %s: %s", event_id, topic, exc)
            raise
        with self._pending_cond:
            self._pending += 1

        recorded_payload, truncated = data.decode(), False
        if len(data) > self._payload_cap:
            recorded_payload = data[: self._payload_cap].decode(errors="ignore")
            truncated = True

        def _done(done: Future[str]) -> None:
            try:
                _record(done)
            finally:
                with self._pending_cond:
                    self._pending -= 1
                    self._pending_cond.notify_all()

        def _record(done: Future[str]) -> None:
            exc = done.exception() if not done.cancelled() else CancelledError()
            outcome = publish_outcome(exc)
            self._metrics.events.labels(outcome).inc()
            if exc is not None:
                if isinstance(exc, gexc.NotFound):
                    self._topics.forget(topic)
                log.warning(
                    "publish of event %s to %s failed (%s): %s", event_id, topic, outcome, exc
                )
                if ordering_key:
                    # The client pauses a key after a failed publish, refusing every later one:
                    # the caller was told this one failed, so its retry may go through.
                    self._client.resume_publish(path, ordering_key)
                return
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
                    attributes=encode_attributes(own),
                    options=options_text,
                )
            )

        future.add_done_callback(_done)
        return PublishedEvent(event_id, topic, trace, sent, payload, future)
