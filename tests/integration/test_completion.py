"""Completion semantics end to end: real emulator, real FerretDB, real streaming pull."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from google.cloud import pubsub_v1

from eventaudit.contract import from_epoch_ms
from eventaudit.exporter.app import ExporterDeps, create_app
from eventaudit.exporter.loop import EvaluationLoop
from eventaudit.subscriber.audited import Faults
from tests.conftest import PROJECT, wait_for
from tests.integration.harness import (
    BUCKET,
    audited_publisher,
    audited_subscriber,
    exporter_kit,
    received_count,
    settled_time,
)

TopicFactory = Callable[[int], tuple[str, list[str]]]


def _publish(kit, topic: str, n: int) -> list:
    events = [kit.publisher.publish(topic, {"n": i}) for i in range(n)]
    for e in events:
        e.message_id(timeout=30)
    assert kit.publisher.flush(timeout=30)
    return events


def test_known_loss_exact_numbers(store, topic_factory: TopicFactory, tmp_path) -> None:
    topic, (all_sub, lossy_sub, idle_sub) = topic_factory(3)
    with audited_publisher(store) as pub:
        events = _publish(pub, topic, 300)
    ids = [e.event_id for e in events]
    lost = set(ids[::20])  # 15 chosen events
    assert len(lost) == 15

    with (
        audited_subscriber(store, topic, all_sub),
        audited_subscriber(store, topic, lossy_sub, Faults(lose=lambda e: e in lost)) as lossy,
    ):
        wait_for(lambda: received_count(store, all_sub) == 300, 60, "300 receipts on all_sub")
        wait_for(lambda: received_count(store, lossy_sub) == 285, 60, "285 receipts on lossy_sub")
        wait_for(lambda: lossy.count("fault_lost", lossy_sub) == 15, 30, "15 lost acks")

    exporter = exporter_kit(store, [topic])
    now = settled_time(events)
    loop = EvaluationLoop(
        exporter.evaluator, exporter.state, store, BUCKET, timedelta(days=1), clock=lambda: now
    )
    assert loop.run_once()

    def gauge(name: str, sub: str) -> float | None:
        return exporter.sample(name, topic=topic, subscription=sub, window="5m")

    assert exporter.sample("eventaudit_published_events", topic=topic, window="5m") == 300
    assert gauge("eventaudit_completion_rate", all_sub) == 1.0
    assert gauge("eventaudit_completion_rate", lossy_sub) == 0.95
    assert gauge("eventaudit_completion_rate", idle_sub) == 0.0
    assert gauge("eventaudit_missed_events", all_sub) == 0
    assert gauge("eventaudit_missed_events", lossy_sub) == 15
    assert gauge("eventaudit_missed_events", idle_sub) == 300
    assert gauge("eventaudit_received_events", lossy_sub) == 285
    assert gauge("eventaudit_duplicate_deliveries", all_sub) == 0
    assert gauge("eventaudit_unmatched_receipts", all_sub) == 0
    assert exporter.sample("eventaudit_up") == 1

    app = create_app(ExporterDeps(store, exporter.state, exporter.registry))
    resp = app.test_client().get(
        f"/api/v1/missed?topic={topic}&subscription={lossy_sub}&window=5m&limit=1000"
    )
    assert resp.status_code == 200
    body = resp.get_json()
    assert body["missed"] == 15
    assert {e["eventID"] for e in body["events"]} == lost
    traces = {e.event_id: e.trace.trace_id for e in events}
    assert all(e["traceID"] == traces[e["eventID"]] for e in body["events"])

    limited = (
        app.test_client()
        .get(f"/api/v1/missed?topic={topic}&subscription={lossy_sub}&window=5m&limit=4")
        .get_json()
    )
    assert (limited["missed"], len(limited["events"]), limited["truncated"]) == (15, 4, True)


def test_redelivery_counts_once_and_reports_duplicates(store, topic_factory: TopicFactory) -> None:
    topic, (sub,) = topic_factory(1)
    with audited_publisher(store) as pub:
        events = _publish(pub, topic, 40)
    chosen = {e.event_id for e in events[:10]}

    with audited_subscriber(store, topic, sub, Faults(redeliver=lambda e: e in chosen)) as kit:
        wait_for(
            lambda: store.received.count_documents({"subscription": sub, "deliveries": 2}) == 10,
            60,
            "10 receipts with two deliveries",
        )
        assert kit.count("fault_redelivered", sub) == 10
    assert received_count(store, sub) == 40
    assert store.received.count_documents({"subscription": sub, "deliveries": {"$gt": 2}}) == 0

    exporter = exporter_kit(store, [topic])
    now = settled_time(events)
    exporter.state.succeeded(exporter.evaluator.evaluate(now), 0.0)
    labels = {"topic": topic, "subscription": sub, "window": "5m"}
    assert exporter.sample("eventaudit_completion_rate", **labels) == 1.0
    assert exporter.sample("eventaudit_received_events", **labels) == 40
    assert exporter.sample("eventaudit_duplicate_deliveries", **labels) == 10
    assert exporter.sample("eventaudit_missed_events", **labels) == 0


def test_late_receipt_moves_from_missed_to_received(store, topic_factory: TopicFactory) -> None:
    topic, (sub,) = topic_factory(1)
    with audited_publisher(store) as pub:
        events = _publish(pub, topic, 5)
    late = events[2].event_id
    losing = {late}
    exporter = exporter_kit(store, [topic])
    now = settled_time(events)
    labels = {"topic": topic, "subscription": sub, "window": "5m"}

    api = create_app(ExporterDeps(store, exporter.state, exporter.registry)).test_client()

    def listed() -> tuple[int, list[str]]:
        resp = api.get(f"/api/v1/missed?topic={topic}&subscription={sub}&window=5m")
        body = resp.get_json()
        assert resp.status_code == 200, body
        return body["missed"], [e["eventID"] for e in body["events"]]

    with audited_subscriber(store, topic, sub, Faults(lose=lambda e: e in losing)) as kit:
        wait_for(lambda: received_count(store, sub) == 4, 60, "4 receipts")
        wait_for(lambda: kit.count("fault_lost", sub) == 1, 30, "the lost ack")

        # At the real time (later than `now`): the API lists records written before it.
        exporter.state.succeeded(exporter.evaluator.evaluate(datetime.now(UTC)), 0.0)
        assert exporter.sample("eventaudit_missed_events", **labels) == 1
        assert exporter.sample("eventaudit_completion_rate", **labels) == 0.8
        assert listed() == (1, [late])

        # The late delivery: the same event (same eventID and publishTime attributes) reaches
        # the subscriber again after its bucket was evaluated.
        losing.clear()
        client = pubsub_v1.PublisherClient()
        client.publish(
            client.topic_path(PROJECT, topic), b'{"n": 2}', **events[2].attributes
        ).result(timeout=30)
        wait_for(lambda: received_count(store, sub) == 5, 60, "the late receipt")
        # Stored after the evaluation: the API still lists what the gauge counts.
        assert exporter.sample("eventaudit_missed_events", **labels) == 1
        assert listed() == (1, [late])

    exporter.state.succeeded(exporter.evaluator.evaluate(datetime.now(UTC)), 0.0)
    assert listed() == (0, [])
    assert exporter.sample("eventaudit_missed_events", **labels) == 0
    assert exporter.sample("eventaudit_received_events", **labels) == 5
    assert exporter.sample("eventaudit_completion_rate", **labels) == 1.0
    stored = store.load_bucket_results(now - timedelta(minutes=10))
    assert sum(r.subscriptions[sub].received for r in stored if sub in r.subscriptions) == 5


def test_settle_delay_keeps_fresh_events_out(store, topic_factory: TopicFactory) -> None:
    topic, (sub,) = topic_factory(1)
    with audited_publisher(store) as pub:
        events = _publish(pub, topic, 1)
    published_at = from_epoch_ms(int(events[0].attributes["publishTime"]))
    exporter = exporter_kit(store, [topic])
    labels = {"topic": topic, "subscription": sub, "window": "5m"}

    # Evaluated just after the publish, before any receipt: not settled, so not missed.
    exporter.state.succeeded(exporter.evaluator.evaluate(published_at + BUCKET), 0.0)
    assert exporter.sample("eventaudit_published_events", topic=topic, window="5m") == 0
    assert exporter.sample("eventaudit_missed_events", **labels) == 0
    assert math.isnan(exporter.sample("eventaudit_completion_rate", **labels) or 0.0)

    with audited_subscriber(store, topic, sub):
        wait_for(lambda: received_count(store, sub) == 1, 60, "the receipt")
    exporter.state.succeeded(exporter.evaluator.evaluate(settled_time(events)), 0.0)
    assert exporter.sample("eventaudit_published_events", topic=topic, window="5m") == 1
    assert exporter.sample("eventaudit_missed_events", **labels) == 0
    assert exporter.sample("eventaudit_completion_rate", **labels) == 1.0


def test_handler_failure_nacks_and_the_retry_is_recorded(
    store, topic_factory: TopicFactory
) -> None:
    topic, (sub,) = topic_factory(1)
    with audited_publisher(store) as pub:
        events = _publish(pub, topic, 10)
    flaky = events[4].event_id
    handled: list[str] = []

    def handler(message) -> None:
        event_id = message.attributes["eventID"]
        if event_id == flaky and flaky not in handled:
            handled.append(event_id)
            raise RuntimeError("first attempt fails")
        handled.append(event_id)

    with audited_subscriber(store, topic, sub, handler=handler) as kit:
        wait_for(lambda: received_count(store, sub) == 10, 60, "10 receipts")
        assert kit.count("handler_error", sub) == 1
        assert kit.count("recorded", sub) == 10
    assert handled.count(flaky) == 2
    # The failed attempt was not recorded: one receipt, one delivery.
    doc = store.received.find_one({"subscription": sub, "eventID": flaky})
    assert doc is not None and doc["deliveries"] == 1


def test_a_handler_slower_than_the_settle_delay_is_missed_then_counted(
    store, topic_factory: TopicFactory
) -> None:
    """The receipt is written after the handler returns, long after the message arrived and
    after its bucket was evaluated: it is found by when it was written, and the gauges and
    /api/v1/missed agree at every step."""
    topic, (sub,) = topic_factory(1)
    with audited_publisher(store) as pub:
        events = _publish(pub, topic, 3)
    slow = events[1].event_id
    release = threading.Event()

    def handler(message) -> None:
        if message.attributes["eventID"] == slow:
            release.wait(60)  # the consumer's processing, far longer than the settle delay

    exporter = exporter_kit(store, [topic])
    api = create_app(ExporterDeps(store, exporter.state, exporter.registry)).test_client()
    labels = {"topic": topic, "subscription": sub, "window": "5m"}

    def agree() -> tuple[float | None, list[str]]:
        resp = api.get(f"/api/v1/missed?topic={topic}&subscription={sub}&window=5m")
        body = resp.get_json()
        assert resp.status_code == 200, body
        gauge = exporter.sample("eventaudit_missed_events", **labels)
        assert body["missed"] == gauge == len(body["events"])
        return gauge, [e["eventID"] for e in body["events"]]

    with audited_subscriber(store, topic, sub, handler=handler):
        wait_for(lambda: received_count(store, sub) == 2, 60, "2 fast receipts")
        settled_time(events)
        exporter.state.succeeded(exporter.evaluator.evaluate(datetime.now(UTC)), 0.0)
        assert agree() == (1, [slow])  # evaluated while the handler still runs: missed
        time.sleep(1.5)  # evaluations go on while the handler is busy
        exporter.state.succeeded(exporter.evaluator.evaluate(datetime.now(UTC)), 0.0)
        assert agree() == (1, [slow])
        release.set()
        wait_for(lambda: received_count(store, sub) == 3, 60, "the slow receipt")
        assert agree() == (1, [slow])  # stored after the evaluation: both still count it
    time.sleep(1.5)
    exporter.state.succeeded(exporter.evaluator.evaluate(datetime.now(UTC)), 0.0)
    assert agree() == (0, [])  # counted late, not lost
    assert exporter.sample("eventaudit_received_events", **labels) == 3
    assert exporter.sample("eventaudit_completion_rate", **labels) == 1.0
