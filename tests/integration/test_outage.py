"""Stop the audit store mid-run: nothing is lost, nothing stale is reported."""

from __future__ import annotations

from datetime import timedelta

from eventaudit.exporter.loop import EvaluationLoop
from eventaudit.store import MongoStore
from tests.conftest import unique, wait_for
from tests.integration.harness import (
    BUCKET,
    audited_publisher,
    audited_subscriber,
    exporter_kit,
    received_count,
    settled_time,
)


def test_store_outage_loses_nothing(private_ferret, topic_factory) -> None:
    topic, (sub,) = topic_factory(1)
    store = MongoStore(private_ferret.uri, unique("db").replace("-", "_"), timeout_seconds=1)
    store.ping()
    exporter = exporter_kit(store, [topic])
    loop = EvaluationLoop(exporter.evaluator, exporter.state, store, BUCKET, timedelta(days=1))
    events = []

    with audited_publisher(store) as pub, audited_subscriber(store, topic, sub) as sub_kit:
        events += [pub.publisher.publish(topic, {"phase": "before", "n": i}) for i in range(50)]
        wait_for(lambda: received_count(store, sub) == 50, 60, "50 receipts before the outage")
        assert pub.publisher.flush(timeout=30)
        assert loop.run_once()
        assert exporter.sample("eventaudit_up") == 1

        private_ferret.stop()
        during = [pub.publisher.publish(topic, {"phase": "during", "n": i}) for i in range(50)]
        events += during
        # The business path is unaffected: every publish is acknowledged by Pub/Sub.
        assert all(e.message_id(timeout=30) for e in during)
        wait_for(lambda: pub.buffer.depth() >= 50, 30, "50 records buffered by the publisher")
        wait_for(
            lambda: sub_kit.count("store_error", sub) >= 1, 60, "the subscriber nacking unrecorded"
        )
        assert sub_kit.count("recorded", sub) == 50
        assert pub.registry.get_sample_value("eventaudit_publisher_store_up") == 0
        assert (
            pub.registry.get_sample_value(
                "eventaudit_publisher_records_total", {"outcome": "dropped"}
            )
            == 0
        )

        # The exporter says it is down and stops serving numbers it cannot refresh.
        assert not loop.run_once()
        assert exporter.sample("eventaudit_up") == 0
        assert (
            exporter.sample(
                "eventaudit_completion_rate", topic=topic, subscription=sub, window="5m"
            )
            is None
        )

        private_ferret.restart()
        wait_for(lambda: pub.buffer.depth() == 0, 60, "the publisher's buffer to drain")
        wait_for(lambda: received_count(store, sub) == 100, 90, "100 receipts after the restart")

    ids = {e.event_id for e in events}
    assert store.published.count_documents({"topic": topic}) == 100
    assert {d["eventID"] for d in store.published.find({"topic": topic})} == ids
    assert {d["eventID"] for d in store.received.find({"subscription": sub})} == ids

    settled_time(events)
    assert loop.run_once()
    labels = {"topic": topic, "subscription": sub, "window": "5m"}
    assert exporter.sample("eventaudit_up") == 1
    assert exporter.sample("eventaudit_published_events", topic=topic, window="5m") == 100
    assert exporter.sample("eventaudit_received_events", **labels) == 100
    assert exporter.sample("eventaudit_completion_rate", **labels) == 1.0
    store.close()
