"""Bad input gets a clear 4xx JSON error and changes nothing (real emulator and FerretDB)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from datetime import timedelta

import pytest
from flask.testing import FlaskClient
from google.cloud import pubsub_v1

from eventaudit.exporter.app import ExporterDeps
from eventaudit.exporter.app import create_app as create_exporter_app
from eventaudit.exporter.loop import EvaluationLoop
from eventaudit.publisher.app import PublisherDeps
from eventaudit.publisher.app import create_app as create_publisher_app
from eventaudit.publisher.config import PublisherSettings
from tests.conftest import PROJECT, wait_for
from tests.integration.harness import BUCKET, audited_publisher, audited_subscriber, exporter_kit


@pytest.fixture
def api(store, topic_factory) -> Iterator[tuple[FlaskClient, str]]:
    topic, _ = topic_factory(1)
    settings = PublisherSettings(users_topic=topic, max_body_bytes=8192, project=PROJECT)
    with audited_publisher(store) as kit:
        app = create_publisher_app(settings, PublisherDeps(kit.publisher, kit.buffer, kit.registry))
        yield app.test_client(), topic
        assert kit.publisher.flush(timeout=30)


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "message"),
    [
        ("/api/v1/topics/{topic}/events", b"{not json", {}, 400, "malformed JSON"),
        ("/api/v1/topics/{topic}/events", b"[1, 2]", {}, 400, "payload must be a JSON object"),
        ("/api/v1/topics/{topic}/events", b'"text"', {}, 400, "payload must be a JSON object"),
        ("/api/v1/topics/{topic}/events", b"", {}, 400, "request body must be a JSON object"),
        ("/api/v1/topics/{topic}/events", b"\xff\xfe", {}, 400, "malformed JSON"),
        ("/api/v1/topics/{topic}/events", b'{"a": NaN}', {}, 400, "NaN is not valid JSON"),
        ("/api/v1/topics/{topic}/events", b"[" * 3000 + b"]" * 3000, {}, 400, "nested too deeply"),
        ("/api/v1/topics/{topic}/events", b"{}", {"X-Event-ID": "bad id!"}, 400, "X-Event-ID"),
        ("/api/v1/topics/{topic}/events", b"{}", {"X-Event-Options": "{x"}, 400, "X-Event-Options"),
        (
            "/api/v1/topics/{topic}/events",
            b'{"a": "' + b"x" * 9000 + b'"}',
            {},
            413,
            "exceeds the limit of 8192 bytes",
        ),
        ("/api/v1/topics/$where/events", b"{}", {}, 400, "invalid topic id"),
        ("/api/v1/topics/no-such-topic-xyz/events", b"{}", {}, 404, "does not exist"),
        ("/api/v1/users", b"[]", {}, 400, "payload must be a JSON object"),
        ("/api/v1/users", b'{"age": "old"}', {}, 400, "invalid user fields"),
        ("/api/v1/users", b'{"admin": true}', {}, 400, "invalid user fields"),
        ("/api/v1/nope", b"{}", {}, 404, "not found"),
    ],
)
def test_publisher_rejects_bad_input(api, store, path, body, headers, status, message) -> None:
    client, topic = api
    resp = client.post(
        path.format(topic=topic), data=body, headers={"Content-Type": "application/json", **headers}
    )
    assert resp.status_code == status
    assert resp.is_json
    assert resp.get_json()["status"] == status
    assert message.lower() in resp.get_json()["error"].lower()
    assert store.published.count_documents({}) == 0


def test_publisher_wrong_method_is_json_405(api) -> None:
    client, topic = api
    resp = client.get(f"/api/v1/topics/{topic}/events")
    assert resp.status_code == 405
    assert resp.get_json()["status"] == 405


def test_publisher_accepts_good_input_and_records_it(api, store) -> None:
    client, topic = api
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    resp = client.post(
        f"/api/v1/topics/{topic}/events",
        json={"hello": "world"},
        headers={"traceparent": f"00-{trace}-00f067aa0ba902b7-01", "X-Event-ID": "evt-0001"},
    )
    assert resp.status_code == 201, resp.get_json()
    body = resp.get_json()
    assert body["eventID"] == "evt-0001"
    assert body["traceID"] == trace
    assert body["metadata"]["Cloud-Trace-Context"].startswith(f"{trace}/")
    users = client.post("/api/v1/users")
    assert users.status_code == 200
    user = users.get_json()
    assert set(user) == {"payload", "traceID", "metadata"}
    assert set(user["metadata"]) == {"Cloud-Trace-Context", "Options", "eventID"}
    assert user["metadata"]["Options"] == "{}"
    assert set(user["payload"]) == {"userId", "name", "age", "gender"}
    client.application.config["DEPS"].publisher.flush(timeout=30)
    record = store.published.find_one({"eventID": "evt-0001"})
    assert record is not None
    assert (record["traceID"], record["topic"], json.loads(record["payload"])) == (
        trace,
        topic,
        {"hello": "world"},
    )
    assert record["messageId"] == body["messageId"]
    assert store.published.count_documents({}) == 2


@pytest.mark.parametrize(
    ("query", "status", "message"),
    [
        ("topic=t-1&subscription=s-1&bogus=1", 400, "unknown query parameter"),
        ("topic=t-1&subscription=s-1&limit=abc", 400, "limit"),
        ("topic=t-1&subscription=s-1&limit=0", 400, "limit"),
        ("topic=t-1&subscription=s-1&limit=99999999", 400, "limit"),
        ("topic=t-1&subscription=s-1&limit=%C2%B2", 400, "limit"),  # superscript two
        ("topic=t-1&subscription=s-1&limit=%D9%A1%D9%A0", 400, "limit"),  # Arabic-Indic 10
        ("topic=t-1&subscription=s-1&limit=%EF%BC%91", 400, "limit"),  # fullwidth 1
        ("topic=t-1&subscription=s-1&limit=10%0A", 400, "limit"),
        ("topic=t-1&subscription=s-1&limit=%2010", 400, "limit"),
        ("topic=t-1&subscription=s-1&limit=%2B10", 400, "limit"),
        ("topic=t-1&subscription=s-1&limit=-1", 400, "limit"),
        ("topic=t-1&subscription=s-1&limit=1e3", 400, "limit"),
        ("topic=t-1&subscription=s-1&limit=1_0", 400, "limit"),
        ("topic=t-1&subscription=s-1&limit=" + "0" * 40 + "1", 400, "limit"),
        ("topic=t-1&subscription=s-1&limit=", 400, "limit"),
        ("topic=t-1&subscription=s-1&window=7y", 400, "window must be one of"),
        ("topic=t-1&subscription=s-1&window=5m%0A", 400, "window must be one of"),
        ("topic=t-1&subscription=s-1&window=%205m", 400, "window must be one of"),
        ("topic=t-1&subscription=s-1&window=5M", 400, "window must be one of"),
        ("topic=t-1&subscription=s-1&window=300s", 400, "window must be one of"),
        ("topic=t-1&subscription=s-1&window=%D9%A5m", 400, "window must be one of"),
        ("topic=t-1&subscription=s-1&window=", 400, "window must be one of"),
        ("topic[$ne]=x&subscription=s-1", 400, "unknown query parameter"),
        ('topic={"$gt":""}&subscription=s-1', 400, "topic must be a Pub/Sub id"),
        ("topic=t-1&subscription=$where", 400, "subscription must be a Pub/Sub id"),
        ("subscription=s-1", 400, "topic must be a Pub/Sub id"),
        ("topic=t-1&topic=t-2&subscription=s-1", 400, "once"),
        ("topic=create-user%0A&subscription=s-1", 400, "topic must be a Pub/Sub id"),
        ("topic=t-1&subscription=s-1%0A", 400, "subscription must be a Pub/Sub id"),
        ("topic=t-1%0D%0Ax&subscription=s-1", 400, "topic must be a Pub/Sub id"),
        ("topic=t-1%00&subscription=s-1", 400, "topic must be a Pub/Sub id"),
        ("topic=%EF%BC%B4-1&subscription=s-1", 400, "topic must be a Pub/Sub id"),  # fullwidth T
        ("topic=goog-t-1&subscription=s-1", 400, "topic must be a Pub/Sub id"),
        ("topic=t1&subscription=s-1", 400, "topic must be a Pub/Sub id"),
        ("topic=t-" + "x" * 254 + "&subscription=s-1", 400, "topic must be a Pub/Sub id"),
        ("topic=t-1&subscription=1-s", 400, "subscription must be a Pub/Sub id"),
        ("topic=t-1&subscription=s-1&subscription=s-2", 400, "once"),
        # Well-formed but not reported: 404, never a list of every event as "missed".
        ("topic=t-1&subscription=s-1", 404, "subscription s-1 of topic t-1 is not reported"),
        ("topic=t-9&subscription=s-1", 404, "topic t-9 is not reported"),
    ],
)
def test_exporter_rejects_bad_query(store, query, status, message) -> None:
    exporter = exporter_kit(store, ["t-1"], list_subscriptions=False)
    EvaluationLoop(exporter.evaluator, exporter.state, store, BUCKET, timedelta(days=1)).run_once()
    app = create_exporter_app(ExporterDeps(store, exporter.state, exporter.registry))
    resp = app.test_client().get(f"/api/v1/missed?{query}")
    assert resp.status_code == status
    assert resp.get_json()["status"] == status
    assert message.lower() in resp.get_json()["error"].lower()


def test_message_without_event_id_is_counted_invalid_and_acked(store, topic_factory) -> None:
    topic, (sub,) = topic_factory(1)
    client = pubsub_v1.PublisherClient()
    path = client.topic_path(PROJECT, topic)
    client.publish(path, b"{}", other="x").result(timeout=30)
    client.publish(path, b"{}", eventID="has spaces and {$}").result(timeout=30)
    with audited_publisher(store) as pub:
        good = pub.publisher.publish(topic, {"ok": True})
        good.message_id(timeout=30)
    with audited_subscriber(store, topic, sub) as kit:
        wait_for(lambda: kit.count("invalid", sub) == 2, 60, "2 invalid messages")
        wait_for(lambda: kit.count("recorded", sub) == 1, 60, "the valid message recorded")
    assert store.received.count_documents({"subscription": sub}) == 1
    # Acked: nothing is left to redeliver.
    with pubsub_v1.SubscriberClient() as subscriber:
        left = subscriber.pull(
            subscription=subscriber.subscription_path(PROJECT, sub),
            max_messages=10,
            timeout=15,
        )
    assert len(left.received_messages) == 0
    with contextlib.suppress(Exception):
        client.transport.close()
