"""RecordBuffer's ordering, retry and overflow logic, with a scripted stand-in for the store."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from bson.errors import InvalidDocument
from prometheus_client import CollectorRegistry

from eventaudit.publisher.audited import PublisherMetrics, RecordBuffer
from eventaudit.records import PublishRecord
from eventaudit.store import DuplicatePublishes, StoreError, duplicate_kind, publish_key
from tests.conftest import wait_for
from tests.fakes import MemoryStore


class FlakyStore:
    """Fails the first `failures` writes, then records every batch it is given."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.batches: list[list[str]] = []
        self.lock = threading.Lock()

    def insert_publish_records(
        self, records: Sequence[PublishRecord], now: datetime
    ) -> DuplicatePublishes:
        with self.lock:
            if self.failures:
                self.failures -= 1
                raise StoreError("down")
            self.batches.append([r.event_id for r in records])
            return DuplicatePublishes()


def _record(i: int) -> PublishRecord:
    return PublishRecord(f"e{i}", "t" * 32, "topic", "{}", str(i), datetime(2026, 1, 1, tzinfo=UTC))


def _sample(registry: CollectorRegistry, outcome: str) -> float | None:
    return registry.get_sample_value("eventaudit_publisher_records_total", {"outcome": outcome})


def test_failed_batches_are_retried_in_order_and_nothing_is_lost() -> None:
    registry = CollectorRegistry()
    store = FlakyStore(failures=3)
    buffer = RecordBuffer(store, PublisherMetrics(registry), batch_size=4, max_backoff=0.01)
    for i in range(10):
        assert buffer.add(_record(i))
    buffer.start()
    assert buffer.flush(timeout=10)
    buffer.close(timeout=1)
    written = [event for batch in store.batches for event in batch]
    assert written == [f"e{i}" for i in range(10)]
    assert _sample(registry, "written") == 10
    assert _sample(registry, "write_error") == 3
    assert _sample(registry, "dropped") == 0
    assert registry.get_sample_value("eventaudit_publisher_store_up") == 1
    assert registry.get_sample_value("eventaudit_publisher_record_buffer_depth") == 0


def test_overflow_is_counted_not_silent() -> None:
    registry = CollectorRegistry()
    store = FlakyStore(failures=0)
    buffer = RecordBuffer(store, PublisherMetrics(registry), capacity=3)
    results = [buffer.add(_record(i)) for i in range(5)]
    assert results == [True, True, True, False, False]
    assert _sample(registry, "dropped") == 2
    assert registry.get_sample_value("eventaudit_publisher_record_buffer_depth") == 3
    buffer.start()
    buffer.close(timeout=5)
    assert [e for b in store.batches for e in b] == ["e0", "e1", "e2"]


def test_close_counts_what_could_not_be_written() -> None:
    registry = CollectorRegistry()
    store = FlakyStore(failures=10**6)
    buffer = RecordBuffer(store, PublisherMetrics(registry), max_backoff=0.01)
    for i in range(7):
        buffer.add(_record(i))
    buffer.start()
    buffer.close(timeout=0.3)
    # A write that was failing at the deadline is counted by the writer when it returns.
    wait_for(lambda: _sample(registry, "dropped") == 7, 30, "every record counted dropped")
    assert _sample(registry, "written") == 0
    assert registry.get_sample_value("eventaudit_publisher_store_up") == 0


class GatedStore:
    """Each write waits until the test opens the gate, then succeeds (or fails, if told to)."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.batches: list[list[str]] = []

    def insert_publish_records(
        self, records: Sequence[PublishRecord], now: datetime
    ) -> DuplicatePublishes:
        self.entered.set()
        assert self.gate.wait(30), "the test never opened the gate"
        if self.fail:
            raise StoreError("slow, then down")
        self.batches.append([r.event_id for r in records])
        return DuplicatePublishes()


def _depth(registry: CollectorRegistry) -> float | None:
    return registry.get_sample_value("eventaudit_publisher_record_buffer_depth")


def test_depth_counts_the_batch_being_written() -> None:
    registry = CollectorRegistry()
    store = GatedStore()
    buffer = RecordBuffer(store, PublisherMetrics(registry), batch_size=4)
    for i in range(10):
        buffer.add(_record(i))
    buffer.start()
    assert store.entered.wait(30)
    # 4 in the write the store has not answered yet, 6 queued, then one more accepted.
    assert buffer.add(_record(10))
    assert buffer.depth() == 11
    assert _depth(registry) == 11
    store.gate.set()
    assert buffer.flush(timeout=30)
    assert buffer.depth() == 0
    assert _depth(registry) == 0
    buffer.close(timeout=5)


def test_capacity_bounds_queued_plus_in_flight() -> None:
    registry = CollectorRegistry()
    store = GatedStore()
    buffer = RecordBuffer(store, PublisherMetrics(registry), capacity=5, batch_size=4)
    for i in range(5):
        assert buffer.add(_record(i))
    buffer.start()
    assert store.entered.wait(30)
    assert not buffer.add(_record(5))
    assert _sample(registry, "dropped") == 1
    assert _depth(registry) == 5
    store.gate.set()
    buffer.close(timeout=30)
    assert [e for b in store.batches for e in b] == [f"e{i}" for i in range(5)]


def test_close_counts_only_what_remains_when_a_slow_write_then_lands(caplog) -> None:
    registry = CollectorRegistry()
    store = GatedStore()
    buffer = RecordBuffer(store, PublisherMetrics(registry), batch_size=4)
    for i in range(10):
        buffer.add(_record(i))
    buffer.start()
    assert store.entered.wait(30)
    # The store holds the first batch past close's deadline: 6 records never reach it.
    buffer.close(timeout=0.05)
    assert _sample(registry, "dropped") == 6
    assert _sample(registry, "written") == 0
    assert "6 unwritten publish records (dropped)" in caplog.text
    assert "4 publish records still being written" in caplog.text
    store.gate.set()
    wait_for(lambda: _sample(registry, "written") == 4, 30, "the slow write to land")
    assert store.batches == [["e0", "e1", "e2", "e3"]]
    assert _sample(registry, "dropped") == 6
    assert buffer.depth() == 0
    assert _depth(registry) == 0
    assert not buffer.add(_record(99))  # closed: refused and counted, never queued forever
    assert _sample(registry, "dropped") == 7


def test_close_counts_a_slow_write_that_then_fails_as_dropped(caplog) -> None:
    registry = CollectorRegistry()
    store = GatedStore(fail=True)
    buffer = RecordBuffer(store, PublisherMetrics(registry), batch_size=4)
    for i in range(10):
        buffer.add(_record(i))
    buffer.start()
    assert store.entered.wait(30)
    buffer.close(timeout=0.05)
    assert _sample(registry, "dropped") == 6
    store.gate.set()
    wait_for(lambda: _sample(registry, "dropped") == 10, 30, "the failed write to be counted")
    assert _sample(registry, "written") == 0
    assert _sample(registry, "write_error") == 1
    assert "4 publish records not written before stop (dropped)" in caplog.text
    assert buffer.depth() == 0


def test_same_event_id_on_two_topics_is_two_records_a_retry_retried_and_a_reuse_a_conflict(
    caplog,
) -> None:
    caplog.set_level(logging.INFO)
    registry = CollectorRegistry()
    store = MemoryStore()
    buffer = RecordBuffer(store, PublisherMetrics(registry), batch_size=10)
    first = _record(1)
    fanned_out = replace(first, topic="other-topic")
    # A client retrying after a 504: the same payload again, another message, a new trace.
    retry = replace(
        first,
        message_id="retry-message",
        trace_id="a" * 32,
        publish_time=first.publish_time + timedelta(seconds=10),
    )
    reused = replace(first, message_id="another-message", payload='{"n":2}')
    for record in (first, fanned_out, retry, reused):
        assert buffer.add(record)
    buffer.start()
    assert buffer.flush(timeout=30)
    buffer.close(timeout=5)
    assert sorted(store.publish_keys()) == [
        publish_key("other-topic", "e1"),
        publish_key("topic", "e1"),
    ]
    assert store.publish_record("topic", "e1")["messageId"] == first.message_id
    assert _sample(registry, "written") == 2
    assert _sample(registry, "retried") == 1
    assert _sample(registry, "conflict") == 1
    (retried_line,) = [r for r in caplog.records if "retry-message" in r.getMessage()]
    assert retried_line.levelno == logging.INFO
    assert "published again with the same payload" in retried_line.getMessage()
    (conflict_line,) = [r for r in caplog.records if "another-message" in r.getMessage()]
    assert conflict_line.levelno == logging.ERROR
    assert "topic|e1" in conflict_line.getMessage()


_STORED = _record(1)
_MS = timedelta(milliseconds=1)


# (what the record offered for a stored key changes, kind): the specification of a duplicate.
@pytest.mark.parametrize(
    ("changes", "kind"),
    [
        ({}, "same"),  # the batch again, after a write that landed
        ({"publish_time": _STORED.publish_time + _MS / 2}, "same"),  # BSON keeps milliseconds
        ({"trace_id": "b" * 32}, "same"),
        ({"message_id": "m-2"}, "retried"),
        ({"message_id": "m-2", "publish_time": _STORED.publish_time + 10 * _MS}, "retried"),
        ({"message_id": "m-2", "trace_id": "b" * 32}, "retried"),  # no trace header sent
        ({"publish_time": _STORED.publish_time + _MS}, "retried"),
        ({"payload": '{"n":2}'}, "conflict"),
        ({"payload": '{"n":2}', "message_id": "m-2"}, "conflict"),
        ({"payload": "{ }", "message_id": "m-2"}, "conflict"),  # equal JSON, other text
        ({"payload_truncated": True, "message_id": "m-2"}, "conflict"),
        ({"payload": '{"\u00e9":1}', "message_id": "m-2"}, "conflict"),
    ],
)
def test_a_duplicate_key_is_the_same_publish_a_retry_or_a_conflict(
    changes: dict[str, Any], kind: str
) -> None:
    stored = _STORED.to_document(datetime(2026, 1, 2, tzinfo=UTC))
    assert duplicate_kind(stored, replace(_STORED, **changes)) == kind


@pytest.mark.parametrize(
    ("stored", "kind"),
    [
        (None, "conflict"),  # gone since the insert failed: not written
        ({"messageId": _STORED.message_id, "payload": _STORED.payload}, "retried"),  # no time
        (
            {"messageId": "m-0", "payload": _STORED.payload, "publishTime": "yesterday"},
            "retried",
        ),
        (  # written before payloadTruncated existed
            {
                "messageId": _STORED.message_id,
                "payload": _STORED.payload,
                "publishTime": _STORED.publish_time,
            },
            "same",
        ),
    ],
)
def test_odd_stored_documents_are_classified_safely(stored: dict[str, Any] | None, kind) -> None:
    assert duplicate_kind(stored, _STORED) == kind


class LandsThenFails(MemoryStore):
    """The first write reaches the store but its answer is lost (a timeout after the write)."""

    def __init__(self) -> None:
        super().__init__()
        self.lost_answers = 1

    def insert_publish_records(
        self, records: Sequence[PublishRecord], now: datetime
    ) -> DuplicatePublishes:
        duplicates = super().insert_publish_records(records, now)
        if self.lost_answers:
            self.lost_answers -= 1
            raise StoreError("timed out after the write")
        return duplicates


def test_a_retried_batch_that_had_landed_counts_written_once() -> None:
    registry = CollectorRegistry()
    store = LandsThenFails()
    buffer = RecordBuffer(store, PublisherMetrics(registry), batch_size=10, max_backoff=0.01)
    for i in range(5):
        buffer.add(_record(i))
    buffer.start()
    assert buffer.flush(timeout=30)
    buffer.close(timeout=5)
    assert len(store.published) == 5
    assert _sample(registry, "written") == 5
    assert _sample(registry, "write_error") == 1
    assert _sample(registry, "conflict") == 0


class BrokenStore(MemoryStore):
    """Raises `error` (not a StoreError: a bug, a document bson cannot encode) on the first
    `failures` writes, and on every write that includes an event in `poison`."""

    def __init__(self, error: Exception, failures: int = 0, poison: frozenset[str] = frozenset()):
        super().__init__()
        self.error = error
        self.failures = failures
        self.poison = poison
        self.calls: list[list[str]] = []

    def insert_publish_records(
        self, records: Sequence[PublishRecord], now: datetime
    ) -> DuplicatePublishes:
        self.calls.append([r.event_id for r in records])
        if self.failures or self.poison & {r.event_id for r in records}:
            self.failures = max(0, self.failures - 1)
            raise self.error
        return super().insert_publish_records(records, now)


UNEXPECTED_ERRORS = [
    TypeError("unsupported operand type(s)"),
    InvalidDocument("cannot encode object: <object object>"),
    KeyError("writeErrors"),
    ValueError("bad value"),
    ZeroDivisionError("division by zero"),
    RecursionError("maximum recursion depth exceeded"),
]


@pytest.mark.parametrize("error", UNEXPECTED_ERRORS, ids=lambda e: type(e).__name__)
def test_an_unexpected_write_error_keeps_the_writer_and_the_records(error, caplog) -> None:
    registry = CollectorRegistry()
    store = BrokenStore(error, failures=2)
    buffer = RecordBuffer(store, PublisherMetrics(registry), batch_size=4, max_backoff=0.01)
    for i in range(10):
        assert buffer.add(_record(i))
    buffer.start()
    assert buffer.flush(timeout=30)
    assert buffer.writer_alive()
    assert sorted(store.publish_keys()) == sorted(publish_key("topic", f"e{i}") for i in range(10))
    assert store.calls[:3] == [["e0", "e1", "e2", "e3"]] * 3  # the same batch, in order
    assert _sample(registry, "write_error") == 2
    assert _sample(registry, "written") == 10
    assert _sample(registry, "dropped") == 0
    assert registry.get_sample_value("eventaudit_publisher_store_up") == 1
    assert _depth(registry) == 0
    failures = [r for r in caplog.records if "unexpected error writing" in r.getMessage()]
    assert len(failures) == 2 and all(r.exc_info for r in failures)  # with the traceback
    buffer.close(timeout=5)


@pytest.mark.parametrize("error", UNEXPECTED_ERRORS, ids=lambda e: type(e).__name__)
def test_a_record_that_can_never_be_written_is_dropped_alone_never_retried_forever(
    error, caplog
) -> None:
    registry = CollectorRegistry()
    store = BrokenStore(error, poison=frozenset({"e5"}))
    buffer = RecordBuffer(store, PublisherMetrics(registry), batch_size=4, max_backoff=0.01)
    for i in range(10):
        assert buffer.add(_record(i))
    buffer.start()
    assert buffer.flush(timeout=30)
    assert buffer.writer_alive()
    # The batch holding e5 failed 3 times, then its records went one by one; e5 alone failed
    # 3 more times and is the only one lost.
    assert sorted(store.publish_keys()) == sorted(
        publish_key("topic", f"e{i}") for i in range(10) if i != 5
    )
    assert store.calls == (
        [["e0", "e1", "e2", "e3"]]
        + [["e4", "e5", "e6", "e7"]] * 3
        + [["e4"]]
        + [["e5"]] * 3
        + [["e6"], ["e7"], ["e8", "e9"]]
    )
    assert _sample(registry, "write_error") == 6
    assert _sample(registry, "written") == 9
    assert _sample(registry, "dropped") == 1
    assert _depth(registry) == 0
    (dropped,) = [r for r in caplog.records if "cannot be written" in r.getMessage()]
    assert dropped.levelno == logging.ERROR and dropped.exc_info
    assert "event e5 on topic topic" in dropped.getMessage()
    # Later records are written in batches again.
    assert buffer.add(_record(20))
    assert buffer.flush(timeout=30)
    assert store.calls[-1] == ["e20"]
    buffer.close(timeout=5)


def test_an_unexpected_error_at_stop_counts_the_batch_dropped() -> None:
    registry = CollectorRegistry()
    store = BrokenStore(TypeError("bug"), failures=10**6)
    buffer = RecordBuffer(store, PublisherMetrics(registry), batch_size=4, max_backoff=0.01)
    for i in range(6):
        buffer.add(_record(i))
    buffer.start()
    buffer.close(timeout=0.3)
    wait_for(lambda: _sample(registry, "dropped") == 6, 30, "every record counted dropped")
    assert _sample(registry, "written") == 0
    wait_for(lambda: not buffer.writer_alive(), 30, "the writer to end: it was closed")
    assert buffer.depth() == 0
