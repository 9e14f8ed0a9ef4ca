"""In-process wiring of the real publisher, subscriber and evaluator for integration tests."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client import CollectorRegistry

from eventaudit.contract import from_epoch_ms
from eventaudit.exporter.buckets import Window
from eventaudit.exporter.collector import CompletionCollector, EvaluationState
from eventaudit.exporter.evaluator import Evaluator
from eventaudit.exporter.subscriptions import ExpectedSubscriptions, pubsub_lister
from eventaudit.publisher.audited import (
    AuditedPublisher,
    PublishedEvent,
    PublisherMetrics,
    RecordBuffer,
)
from eventaudit.pubsub import publisher_client, subscriber_client
from eventaudit.store import MongoStore
from eventaudit.subscriber.audited import AuditedSubscriber, Faults, SubscriberMetrics, TopicOf
from tests.conftest import PROJECT
from tests.fakes import SteadyEvaluator

BUCKET = timedelta(seconds=1)
SETTLE = timedelta(seconds=2)


@dataclass
class PublisherKit:
    publisher: AuditedPublisher
    buffer: RecordBuffer
    registry: CollectorRegistry


@contextlib.contextmanager
def audited_publisher(store: MongoStore, capacity: int = 100_000) -> Iterator[PublisherKit]:
    """A real PublisherClient on the emulator, recording into `store`."""
    registry = CollectorRegistry()
    metrics = PublisherMetrics(registry)
    buffer = RecordBuffer(store, metrics, capacity=capacity, max_backoff=0.5)
    buffer.start()
    publisher = AuditedPublisher(publisher_client(), PROJECT, buffer, metrics)
    try:
        yield PublisherKit(publisher, buffer, registry)
    finally:
        buffer.close(timeout=10)


@dataclass
class SubscriberKit:
    audited: AuditedSubscriber
    registry: CollectorRegistry
    future: Any  # the streaming pull's future: done means the stream stopped

    def count(self, outcome: str, subscription: str) -> float:
        value = self.registry.get_sample_value(
            "eventaudit_subscriber_messages_total",
            {"subscription": subscription, "outcome": outcome},
        )
        return value or 0.0


@contextlib.contextmanager
def audited_subscriber(
    store: MongoStore,
    topic: str,
    subscription: str,
    faults: Faults | None = None,
    handler: Callable[[Any], None] | None = None,
    dead_letter_sources: TopicOf | None = None,
    exactly_once: bool = False,
) -> Iterator[SubscriberKit]:
    """A real streaming pull on the emulator, recording into `store` before acking."""
    registry = CollectorRegistry()
    metrics = SubscriberMetrics(registry, subscription)
    audited = AuditedSubscriber(
        store,
        subscription,
        topic,
        metrics,
        faults=faults,
        handler=handler,
        dead_letter_sources=dead_letter_sources,
        exactly_once=exactly_once,
    )
    audited.start()
    with subscriber_client() as client:
        future = client.subscribe(client.subscription_path(PROJECT, subscription), callback=audited)
        try:
            yield SubscriberKit(audited, registry, future)
        finally:
            future.cancel()
            with contextlib.suppress(Exception):
                future.result(timeout=10)
            audited.stop()


@dataclass
class ExporterKit:
    evaluator: Evaluator
    state: EvaluationState
    registry: CollectorRegistry

    def sample(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)


def exporter_kit(
    store: MongoStore,
    topics: list[str],
    windows: tuple[str, ...] = ("5m",),
    list_subscriptions: bool = True,
    configured: dict[str, set[str]] | None = None,
    refresh_seconds: float = 60.0,
) -> ExporterKit:
    """An evaluator with 1 s buckets and a 2 s settle delay, and a collector on a fresh registry."""
    expected = ExpectedSubscriptions(
        configured or {t: set() for t in topics},
        set(),
        pubsub_lister(PROJECT) if list_subscriptions else None,
        refresh_seconds=refresh_seconds,
    )
    # One evaluate() folds the whole journal, however long it takes: the tests evaluate once
    # and expect every record counted (the service's budget is half a bucket per evaluation).
    # Its monotonic clock follows the times the tests evaluate at (real or virtual).
    evaluator = SteadyEvaluator(
        store,
        expected,
        [Window.parse(w, BUCKET) for w in windows],
        BUCKET,
        SETTLE,
        budget=timedelta(minutes=5),
    )
    state = EvaluationState(settle_seconds=SETTLE.total_seconds())
    registry = CollectorRegistry()
    registry.register(CompletionCollector(state, expected))
    return ExporterKit(evaluator, state, registry)


def settled_time(events: list[PublishedEvent]) -> datetime:
    """The first moment every event's bucket has settled; waits until the clock reaches it.

    The evaluator is driven with the real clock: late-record detection compares the time
    records were written with the time of the previous evaluation.
    """
    last = max(int(e.attributes["publishTime"]) for e in events)
    moment = from_epoch_ms(last) + SETTLE + 2 * BUCKET
    delay = (moment - datetime.now(UTC)).total_seconds()
    if delay > 0:
        time.sleep(delay)
    return moment


def received_count(store: MongoStore, subscription: str) -> int:
    """Receipts stored for a subscription."""
    return store.received.count_documents({"subscription": subscription})
