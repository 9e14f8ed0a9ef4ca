"""What Pub/Sub really does, on the real emulator and FerretDB: filtered subscriptions, dead
letters, seek, and subscriptions created and deleted while traffic flows."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from google.cloud import pubsub_v1
from google.protobuf import timestamp_pb2

from eventaudit.exporter.app import ExporterDeps, create_app
from eventaudit.exporter.loop import EvaluationLoop
from eventaudit.exporter.subscriptions import NEW_SUBSCRIPTION_MARGIN
from eventaudit.publisher.audited import PublishedEvent
from eventaudit.store import MongoStore
from eventaudit.subscriber.audited import Faults
from tests.conftest import PROJECT, wait_for
from tests.integration.harness import (
    BUCKET,
    ExporterKit,
    audited_publisher,
    audited_subscriber,
    exporter_kit,
    received_count,
    settled_time,
)

TopicFactory = Callable[[int], tuple[str, list[str]]]


def _create_subscription(topic: str, sub: str, **fields: object) -> None:
    with pubsub_v1.SubscriberClient() as client:
        client.create_subscription(
            request={
                "name": client.subscription_path(PROJECT, sub),
                "topic": f"projects/{PROJECT}/topics/{topic}",
                "ack_deadline_seconds": 10,
                **fields,
            }
        )


def _publish(
    store: MongoStore, topic: str, attributes: list[dict[str, str]]
) -> list[PublishedEvent]:
    with audited_publisher(store) as pub:
        events = [
            pub.publisher.publish(topic, {"n": i}, attributes=a) for i, a in enumerate(attributes)
        ]
        for e in events:
            e.message_id(timeout=30)
        assert pub.publisher.flush(timeout=30)
    return events


def _evaluate(exporter: ExporterKit, store: MongoStore, now: datetime) -> None:
    loop = EvaluationLoop(
        exporter.evaluator, exporter.state, store, BUCKET, timedelta(days=1), clock=lambda: now
    )
    assert loop.run_once()


def _gauges(exporter: ExporterKit, topic: str, sub: str) -> dict[str, float | None]:
    names = ("completion_rate", "missed_events", "received_events", "filtered_receipts",
             "dead_lettered_events", "unmatched_receipts", "duplicate_deliveries")  # fmt: skip
    return {
        n: exporter.sample(f"eventaudit_{n}", topic=topic, subscription=sub, window="5m")
        for n in names
    }


def _missed(exporter: ExporterKit, store: MongoStore, topic: str, sub: str) -> dict:
    app = create_app(ExporterDeps(store, exporter.state, exporter.registry))
    resp = app.test_client().get(
        f"/api/v1/missed?topic={topic}&subscription={sub}&window=5m&limit=1000"
    )
    assert resp.status_code == 200, resp.get_json()
    return resp.get_json()


def test_a_filtered_subscription_is_audited_against_what_its_filter_matches(
    store: MongoStore, topic_factory: TopicFactory
) -> None:
    topic, (all_sub,) = topic_factory(1)
    only_a = f"{topic}-only-a"
    _create_subscription(topic, only_a, filter='attributes.kind = "a"')
    kinds = [{"kind": "a"} if i % 3 == 0 else {"kind": "b"} for i in range(60)] + [{}] * 6
    events = _publish(store, topic, kinds)
    matching = [e.event_id for e, a in zip(events, kinds, strict=True) if a.get("kind") == "a"]
    lost = set(matching[::4])  # 5 of the 20 matching events
    assert (len(matching), len(lost)) == (20, 5)
    with (
        audited_subscriber(store, topic, all_sub),
        audited_subscriber(store, topic, only_a, Faults(lose=lambda e: e in lost)) as lossy,
    ):
        wait_for(lambda: received_count(store, all_sub) == 66, 60, "66 receipts on all_sub")
        # The emulator stores the filter but delivers everything: 66 - 5 lost.
        wait_for(lambda: received_count(store, only_a) == 61, 60, "61 receipts on only-a")
        assert lossy.count("fault_lost", only_a) == 5

    exporter = exporter_kit(store, [topic])
    _evaluate(exporter, store, settled_time(events))
    assert exporter.sample("eventaudit_published_events", topic=topic, window="5m") == 66
    assert _gauges(exporter, topic, only_a) == {
        "completion_rate": 0.75,
        "missed_events": 5,
        "received_events": 15,
        "filtered_receipts": 46,  # 40 of kind b and 6 without a kind: Pub/Sub never sends them
        "dead_lettered_events": 0,
        "unmatched_receipts": 0,
        "duplicate_deliveries": 0,
    }
    assert _gauges(exporter, topic, all_sub)["completion_rate"] == 1.0
    body = _missed(exporter, store, topic, only_a)
    assert (body["missed"], body["lost"]) == (5, 5)
    assert {e["eventID"] for e in body["events"]} == lost


def test_a_filter_the_exporter_cannot_evaluate_is_marked_not_reported(
    store: MongoStore, topic_factory: TopicFactory
) -> None:
    topic, _ = topic_factory(1)
    odd = f"{topic}-odd"
    # Pub/Sub's own grammar, but not one this exporter evaluates (the emulator accepts it).
    _create_subscription(
        topic, odd, filter='attributes.kind = "a" AND attributes:x OR attributes:y'
    )
    events = _publish(store, topic, [{"kind": "a"}] * 3)
    exporter = exporter_kit(store, [topic])
    _evaluate(exporter, store, settled_time(events))
    assert (
        exporter.sample("eventaudit_subscription_filter_unsupported", topic=topic, subscription=odd)
        == 1
    )
    assert _gauges(exporter, topic, odd)["completion_rate"] is None
    assert exporter.sample("eventaudit_subscription_filter_errors_total") == 1
    assert exporter.sample("eventaudit_published_events", topic=topic, window="5m") == 3


def test_dead_lettered_events_are_counted_apart_from_lost_ones(
    store: MongoStore, topic_factory: TopicFactory
) -> None:
    topic, _ = topic_factory(0)
    dlq, _ = topic_factory(0)
    source, dlq_sub = f"{topic}-src", f"{dlq}-audit"
    _create_subscription(
        topic,
        source,
        dead_letter_policy={
            "dead_letter_topic": f"projects/{PROJECT}/topics/{dlq}",
            "max_delivery_attempts": 5,
        },
    )
    _create_subscription(dlq, dlq_sub)
    events = _publish(store, topic, [{}] * 40)
    ids = [e.event_id for e in events]
    poison, lost = set(ids[:4]), set(ids[4:7])

    def handler(message) -> None:
        if message.attributes["eventID"] in poison:
            raise ValueError("poison")  # nacked: Pub/Sub moves it on after 5 attempts

    sources = {source: topic}
    with (
        audited_subscriber(store, topic, source, Faults(lose=lambda e: e in lost), handler) as src,
        audited_subscriber(store, dlq, dlq_sub, dead_letter_sources=sources.get) as dead,
    ):
        wait_for(lambda: received_count(store, source) == 33, 60, "33 receipts on the source")
        wait_for(lambda: dead.count("dead_letter_recorded", dlq_sub) == 4, 90, "4 dead letters")
        assert src.count("handler_error", source) == 4 * 5
        attempts = src.registry.get_sample_value(
            "eventaudit_subscriber_delivery_attempts_count", {"subscription": source}
        )
        assert attempts == 33  # Pub/Sub counts attempts on a subscription with a dead-letter policy

    exporter = exporter_kit(store, [topic])
    _evaluate(exporter, store, settled_time(events) + timedelta(seconds=5))
    assert _gauges(exporter, topic, source) == {
        "completion_rate": 33 / 40,
        "missed_events": 7,
        "received_events": 33,
        "filtered_receipts": 0,
        "dead_lettered_events": 4,
        "unmatched_receipts": 0,
        "duplicate_deliveries": 0,
    }
    # Recorded on the subscription they left, never as receipts on the dead-letter topic.
    assert exporter.sample("eventaudit_published_events", topic=dlq, window="5m") is None
    assert received_count(store, dlq_sub) == 0
    body = _missed(exporter, store, topic, source)
    assert (body["missed"], body["deadLettered"], body["lost"]) == (7, 4, 3)
    fates = {e["eventID"]: (e["fate"], e["deliveryAttempts"]) for e in body["events"]}
    assert fates == {
        **{e: ("dead_lettered", 5) for e in poison},
        **{e: ("lost", None) for e in lost},
    }
    letter = store.dead_letters.find_one({"eventID": ids[0]})
    assert letter is not None
    assert (letter["subscription"], letter["topic"], letter["deadLetterSubscription"]) == (
        source,
        topic,
        dlq_sub,
    )


def test_seek_back_redelivers_duplicates_never_new_receipts(
    store: MongoStore, topic_factory: TopicFactory
) -> None:
    topic, _ = topic_factory(0)
    sub = f"{topic}-replayable"
    # Seeking back redelivers acked messages only from a subscription that retains them.
    _create_subscription(topic, sub, retain_acked_messages=True)
    before = timestamp_pb2.Timestamp()
    before.FromDatetime(datetime.now(UTC) - timedelta(seconds=5))
    events = _publish(store, topic, [{}] * 30)
    with audited_subscriber(store, topic, sub) as kit:
        wait_for(lambda: received_count(store, sub) == 30, 60, "30 receipts")
        exporter = exporter_kit(store, [topic])
        settled = settled_time(events)
        _evaluate(exporter, store, settled)
        assert _gauges(exporter, topic, sub)["received_events"] == 30
        with pubsub_v1.SubscriberClient() as client:
            client.seek(request={"subscription": client.subscription_path(PROJECT, sub),
                                 "time": before})  # fmt: skip

        def redelivered() -> float:
            return sum(d["deliveries"] for d in store.received.find({"subscription": sub}))

        wait_for(lambda: redelivered() == 60, 60, "every event delivered again")
        assert kit.count("recorded", sub) == 60
    _evaluate(exporter, store, settled + timedelta(seconds=3))
    assert _gauges(exporter, topic, sub) | {} == {
        "completion_rate": 1.0,
        "missed_events": 0,
        "received_events": 30,
        "filtered_receipts": 0,
        "dead_lettered_events": 0,
        "unmatched_receipts": 0,
        "duplicate_deliveries": 30,
    }
    assert received_count(store, sub) == 30


def test_subscriptions_created_and_deleted_while_traffic_flows(
    store: MongoStore, topic_factory: TopicFactory
) -> None:
    topic, (old,) = topic_factory(1)
    new = f"{topic}-new"
    exporter = exporter_kit(store, [topic], refresh_seconds=0)
    early = _publish(store, topic, [{}] * 10)
    with audited_subscriber(store, topic, old):
        wait_for(lambda: received_count(store, old) == 10, 60, "10 early receipts")
        # The exporter's first evaluation on this database: `old` existed before it.
        _evaluate(exporter, store, datetime.now(UTC))
        _create_subscription(topic, new)
        seen = datetime.now(UTC)
        _evaluate(exporter, store, seen)  # the listing shows `new` from here
        tenure = store.db["ExporterState"].find_one({"_id": f"tenure|{topic}|{new}"})
        assert tenure is not None and seen - timedelta(seconds=1) <= tenure["since"] <= seen
        time.sleep((seen + NEW_SUBSCRIPTION_MARGIN + BUCKET - datetime.now(UTC)).total_seconds())
        with audited_subscriber(store, topic, new):
            late = _publish(store, topic, [{}] * 10)
            wait_for(lambda: received_count(store, old) == 20, 60, "20 receipts on old")
            wait_for(lambda: received_count(store, new) == 10, 60, "10 receipts on new")
    settled = settled_time(early + late)
    _evaluate(exporter, store, settled)
    assert exporter.sample("eventaudit_published_events", topic=topic, window="5m") == 20
    got = {sub: _gauges(exporter, topic, sub) for sub in (old, new)}
    assert [got[old][k] for k in ("completion_rate", "missed_events", "received_events")] == [
        1.0, 0, 20]  # fmt: skip
    # `new` never had the early events: it is not reported missing them.
    assert [got[new][k] for k in ("completion_rate", "missed_events", "received_events")] == [
        1.0, 0, 10]  # fmt: skip

    with pubsub_v1.SubscriberClient() as client:
        client.delete_subscription(subscription=client.subscription_path(PROJECT, new))
    _evaluate(exporter, store, settled + timedelta(seconds=1))  # the listing no longer has it
    tenure = store.db["ExporterState"].find_one({"_id": f"tenure|{topic}|{new}"})
    assert tenure is not None and tenure["until"] is not None
    _evaluate(exporter, store, settled + timedelta(seconds=10))  # past its last listed moment
    assert _gauges(exporter, topic, new)["completion_rate"] is None
    assert _gauges(exporter, topic, old)["completion_rate"] == 1.0


def test_an_exactly_once_subscription_confirms_every_ack(
    store: MongoStore, topic_factory: TopicFactory
) -> None:
    topic, _ = topic_factory(0)
    sub = f"{topic}-once"
    _create_subscription(topic, sub, enable_exactly_once_delivery=True)
    events = _publish(store, topic, [{}] * 20)
    with audited_subscriber(store, topic, sub, exactly_once=True) as kit:
        wait_for(lambda: kit.count("recorded", sub) == 20, 60, "20 recorded")
        time.sleep(1)  # the confirmations arrive after the acks
        assert kit.count("ack_failed", sub) == 0
    exporter = exporter_kit(store, [topic])
    _evaluate(exporter, store, settled_time(events))
    gauges = _gauges(exporter, topic, sub)
    assert (gauges["completion_rate"], gauges["duplicate_deliveries"]) == (1.0, 0)
