"""RecordBuffer's ordering, retry and overflow logic, with a scripted stand-in for the store."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry

from eventaudit.publisher.audited import PublisherMetrics, RecordBuffer
from eventaudit.records import PublishRecord
from eventaudit.store import StoreError


class FlakyStore:
    """Fails the first `failures` writes, then records every batch it is given."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.batches: list[list[str]] = []
        self.lock = threading.Lock()

    def insert_publish_records(self, records: Sequence[PublishRecord], now: datetime) -> None:
        with self.lock:
            if self.failures:
                self.failures -= 1
                raise StoreError("down")
            self.batches.append([r.event_id for r in records])


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
    assert _sample(registry, "dropped") == 7
    assert _sample(registry, "written") == 0
    assert registry.get_sample_value("eventaudit_publisher_store_up") == 0
