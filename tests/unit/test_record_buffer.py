"""RecordBuffer's ordering, retry and overflow logic, with a scripted stand-in for the store."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry

from eventaudit.publisher.audited import PublisherMetrics, RecordBuffer
from eventaudit.records import PublishRecord
from eventaudit.store import StoreError, publish_key
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
    ) -> list[PublishRecord]:
        with self.lock:
            if self.failures:
                self.failures -= 1
                raise StoreError("down")
            self.batches.append([r.event_id for r in records])
            return []


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
    ) -> list[PublishRecord]:
        self.entered.set()
        assert self.gate.wait(30), "the test never opened the gate"
        if self.fail:
            raise StoreError("slow, then down")
        self.batches.append([r.event_id for r in records])
        return []


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


def test_same_event_id_on_two_topics_is_two_records_and_a_reused_key_a_conflict(
    caplog,
) -> None:
    registry = CollectorRegistry()
    store = MemoryStore()
    buffer = RecordBuffer(store, PublisherMetrics(registry), batch_size=10)
    first = _record(1)
    fanned_out = replace(first, topic="other-topic")
    reused = replace(first, message_id="another-message", payload='{"n":2}')
    for record in (first, fanned_out, reused):
        assert buffer.add(record)
    buffer.start()
    assert buffer.flush(timeout=30)
    buffer.close(timeout=5)
    assert sorted(store.published) == [publish_key("other-topic", "e1"), publish_key("topic", "e1")]
    assert store.published[publish_key("topic", "e1")]["messageId"] == first.message_id
    assert _sample(registry, "written") == 2
    assert _sample(registry, "conflict") == 1
    assert "topic|e1" in caplog.text


class LandsThenFails(MemoryStore):
    """The first write reaches the store but its answer is lost (a timeout after the write)."""

    def __init__(self) -> None:
        super().__init__()
        self.lost_answers = 1

    def insert_publish_records(
        self, records: Sequence[PublishRecord], now: datetime
    ) -> list[PublishRecord]:
        conflicts = super().insert_publish_records(records, now)
        if self.lost_answers:
            self.lost_answers -= 1
            raise StoreError("timed out after the write")
        return conflicts


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
