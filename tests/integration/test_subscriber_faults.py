"""The subscriber under hostile messages and broker faults, on the real emulator and FerretDB."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from google.cloud import pubsub_v1
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from eventaudit.contract import PUBLISH_TIME_TOLERANCE, epoch_ms, from_epoch_ms, utc_now_ms
from eventaudit.exporter.loop import EvaluationLoop
from eventaudit.publisher.audited import PublishedEvent
from eventaudit.pubsub import publisher_client, subscriber_client
from eventaudit.store import MongoStore
from eventaudit.subscriber.audited import AuditedSubscriber, SubscriberMetrics
from eventaudit.subscriber.service import create_app as create_subscriber_app
from eventaudit.subscriber.stream import (
    StreamEndCounter,
    StreamHealth,
    StreamMetrics,
    StreamSession,
)
from tests.conftest import PROJECT, Ferret, service_env, wait_for
from tests.integration.harness import (
    BUCKET,
    SETTLE,
    audited_publisher,
    audited_subscriber,
    exporter_kit,
    received_count,
    settled_time,
)
from tests.integration.http_client import get as _get
from tests.unit.test_subscriber import Hostile, hostile_cases
from tools import stack

TopicFactory = Callable[[int], tuple[str, list[str]]]
# Far enough past the tolerance that the broker's clock, a few seconds after ours, cannot
# move a case across it.
MARGIN_MS = 5 * 60_000


def _samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = _get(url)
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def _metric(url: str, name: str, **labels: str) -> float:
    return _samples(url).get((name, tuple(sorted(labels.items()))), 0.0)


def _health(url: str) -> tuple[int, dict[str, Any]]:
    status, body = _get(f"{url}/healthz")
    return status, json.loads(body)


@dataclass(frozen=True)
class Sent:
    """A hostile message as published: its case, and its eventID when it has a valid one."""

    case: Hostile
    event_id: str | None


def _publishable_cases() -> list[Hostile]:
    now_ms = epoch_ms(utc_now_ms())
    return [c for c in hostile_cases(now_ms, MARGIN_MS) if c.publishable]


def _publish_hostile(
    client: pubsub_v1.PublisherClient, path: str, case: Hostile, n: int
) -> tuple[Any, Sent]:
    """Publish one hostile message; a valid eventID is made unique so its receipt can be told."""
    attrs = dict(case.attributes)
    event_id = None
    if case.outcome == "recorded":
        event_id = f"hostile-{n}"
        attrs["eventID"] = event_id
    return client.publish(path, b'{"hostile": true}', **attrs), Sent(case, event_id)


def _receipts(store: MongoStore, sub: str) -> dict[str, dict[str, Any]]:
    return {doc["eventID"]: doc for doc in store.received.find({"subscription": sub})}


def test_hostile_table_through_the_emulator_beside_good_traffic(
    store: MongoStore, topic_factory: TopicFactory
) -> None:
    topic, (sub,) = topic_factory(1)
    cases = _publishable_cases()
    raw = pubsub_v1.PublisherClient()
    path = raw.topic_path(PROJECT, topic)
    with audited_subscriber(store, topic, sub) as kit, audited_publisher(store) as pub:
        good: list[PublishedEvent] = []
        futures: list[Any] = []
        sent: list[Sent] = []
        for n, case in enumerate(cases):
            good += [pub.publisher.publish(topic, {"n": n, "k": k}) for k in range(5)]
            future, item = _publish_hostile(raw, path, case, n)
            futures.append(future)
            sent.append(item)
        good += [pub.publisher.publish(topic, {"tail": k}) for k in range(50)]
        for f in futures:
            f.result(timeout=30)
        for e in good:
            e.message_id(timeout=30)
        valid = {s.event_id: s.case for s in sent if s.event_id is not None}
        invalid = sum(1 for s in sent if s.event_id is None)
        expected = len(good) + len(valid)
        wait_for(lambda: received_count(store, sub) == expected, 60, f"{expected} receipts")
        wait_for(lambda: kit.count("invalid", sub) == invalid, 30, f"{invalid} invalid")
        # The stream is still up, and nothing was an internal error.
        assert not kit.future.done()
        assert kit.count("internal_error", sub) == 0
        assert kit.count("internal_error_dropped", sub) == 0
        assert kit.count("recorded", sub) == expected
        for reason in ("missing", "malformed", "far"):
            want = sum(1 for case in valid.values() if case.reason == reason)
            got = kit.registry.get_sample_value(
                "eventaudit_subscriber_publish_time_fallbacks_total",
                {"subscription": sub, "reason": reason},
            )
            assert (reason, got) == (reason, want)

    receipts = _receipts(store, sub)
    assert set(receipts) == {e.event_id for e in good} | set(valid)
    assert all(doc["deliveries"] == 1 for doc in receipts.values())
    tolerance = PUBLISH_TIME_TOLERANCE
    for event_id, case in valid.items():
        doc = receipts[event_id]
        if case.reason is None:
            assert doc["publishTime"] == from_epoch_ms(int(case.attributes["publishTime"]))
        else:
            assert doc["publishTime"] == doc["brokerPublishTime"], case.name
    # Every stored publishTime is within the tolerance of a real broker time.
    assert all(
        abs(doc["publishTime"] - doc["brokerPublishTime"]) <= tolerance for doc in receipts.values()
    )


@pytest.fixture
def subscriber_process(
    ferret: Ferret, emulator: str, tmp_path: Path
) -> Iterator[Callable[..., tuple[stack.Service, str]]]:
    """Start `python -m eventaudit.subscriber` on the test's FerretDB database and emulator."""
    started: list[stack.Service] = []

    def start(sub: str, store: MongoStore, *args: str) -> tuple[stack.Service, str]:
        port = stack.free_port()
        url = f"http://127.0.0.1:{port}"
        env = service_env(ferret, emulator, store.database)
        service = stack.python_service(
            f"subscriber-{len(started)}",
            "subscriber",
            ["--subscription", sub, "--listen-address", f"127.0.0.1:{port}", *args],
            tmp_path,
            env,
            f"{url}/healthz",
        )
        started.append(service)
        return service.start(), url

    yield start
    for service in started:
        service.stop()


def test_poison_storm_every_good_event_recorded_once_and_completion_one(
    store: MongoStore, topic_factory: TopicFactory, subscriber_process
) -> None:
    """1,000 hostile messages interleaved with 10,000 good ones, through the real process."""
    topic, (sub,) = topic_factory(1)
    service, url = subscriber_process(sub, store)
    pid = service.proc.pid
    cases = _publishable_cases()
    raw = pubsub_v1.PublisherClient()
    path = raw.topic_path(PROJECT, topic)
    good: list[PublishedEvent] = []
    futures: list[Any] = []
    sent: list[Sent] = []
    with audited_publisher(store) as pub:
        for n in range(11_000):
            if n % 11 == 10:
                future, item = _publish_hostile(raw, path, cases[len(sent) % len(cases)], n)
                futures.append(future)
                sent.append(item)
            else:
                good.append(pub.publisher.publish(topic, {"n": n}))
        for f in futures:
            f.result(timeout=60)
        for e in good:
            e.message_id(timeout=60)
        assert pub.publisher.flush(timeout=60)
    assert (len(good), len(sent)) == (10_000, 1_000)
    valid = {s.event_id: s.case for s in sent if s.event_id is not None}
    invalid = len(sent) - len(valid)
    expected = len(good) + len(valid)
    metrics = f"{url}/metrics"
    wait_for(lambda: received_count(store, sub) == expected, 120, f"{expected} receipts")
    wait_for(
        lambda: _metric(metrics, "eventaudit_subscriber_messages_total", subscription=sub,
                        outcome="invalid") == invalid,
        60,
        f"{invalid} invalid messages counted",
    )  # fmt: skip
    assert service.running() and service.proc.pid == pid
    status, body = _health(url)
    assert (status, body["status"]) == (200, "ok")
    samples = _samples(metrics)

    def count(outcome: str) -> float:
        key = (
            "eventaudit_subscriber_messages_total",
            (("outcome", outcome), ("subscription", sub)),
        )
        return samples.get(key, 0.0)

    assert (count("recorded"), count("internal_error"), count("internal_error_dropped")) == (
        expected,
        0,
        0,
    )
    fallbacks = {
        reason: samples[
            ("eventaudit_subscriber_publish_time_fallbacks_total",
             (("reason", reason), ("subscription", sub)))
        ]
        for reason in ("missing", "malformed", "far")
    }  # fmt: skip
    assert fallbacks == {
        reason: sum(1 for case in valid.values() if case.reason == reason)
        for reason in ("missing", "malformed", "far")
    }
    receipts = _receipts(store, sub)
    assert set(receipts) == {e.event_id for e in good} | set(valid)
    assert sum(doc["deliveries"] for doc in receipts.values()) == expected

    exporter = exporter_kit(store, [topic])
    settled_time(good)
    # Hostile receipts fell back to broker times, a little after the last good publishTime.
    now = max(doc["brokerPublishTime"] for doc in receipts.values()) + SETTLE + 2 * BUCKET
    time.sleep(max(0.0, (now - utc_now_ms()).total_seconds()))
    loop = EvaluationLoop(
        exporter.evaluator, exporter.state, store, BUCKET, timedelta(days=1), clock=lambda: now
    )
    assert loop.run_once()
    labels = {"topic": topic, "subscription": sub, "window": "5m"}
    assert exporter.sample("eventaudit_published_events", topic=topic, window="5m") == 10_000
    assert exporter.sample("eventaudit_received_events", **labels) == 10_000
    assert exporter.sample("eventaudit_missed_events", **labels) == 0
    assert exporter.sample("eventaudit_completion_rate", **labels) == 1.0
    # Hostile receipts with a valid eventID have no publish record: unmatched, never received.
    # Those stamped up to an hour away from now fall outside the 5m window.
    near_now = [c for c in valid.values() if not c.name.startswith("within an hour")]
    assert exporter.sample("eventaudit_unmatched_receipts", **labels) == len(near_now)


def test_nine_megabyte_message_is_recorded_with_the_others(
    store: MongoStore, topic_factory: TopicFactory
) -> None:
    """Pub/Sub allows 10 MB; the emulator channel used to keep gRPC's 4 MiB receive limit."""
    topic, (sub,) = topic_factory(1)
    big = publisher_client()
    path = big.topic_path(PROJECT, topic)
    with audited_subscriber(store, topic, sub) as kit, audited_publisher(store) as pub:
        before = [pub.publisher.publish(topic, {"n": n}) for n in range(20)]
        payload = b"x" * (9 * 1024 * 1024)
        attrs = {"eventID": "nine-megabytes", "publishTime": str(epoch_ms(utc_now_ms()))}
        big.publish(path, payload, **attrs).result(timeout=60)
        after = [pub.publisher.publish(topic, {"n": n}) for n in range(20)]
        for e in before + after:
            e.message_id(timeout=30)
        wait_for(lambda: received_count(store, sub) == 41, 60, "41 receipts, the 9 MB one too")
        assert not kit.future.done()
    assert set(_receipts(store, sub)) == {e.event_id for e in before + after} | {"nine-megabytes"}


def test_health_says_so_when_the_stream_keeps_failing(
    store: MongoStore, topic_factory: TopicFactory
) -> None:
    """The stall reproduced with a tiny receive limit: errors are counted, /healthz goes 503."""
    topic, (sub,) = topic_factory(1)
    registry = CollectorRegistry()
    stream_metrics = StreamMetrics(registry, sub)
    health = StreamHealth(stream_metrics)
    audited = AuditedSubscriber(store, sub, topic, SubscriberMetrics(registry, sub))
    app = create_subscriber_app(
        sub, registry, lambda: {"pulling": health.state().ok, "reason": health.state().reason,
                                "store": True},
    ).test_client()  # fmt: skip
    stop = threading.Event()
    limit = 64 * 1024

    def errors() -> float:
        value = registry.get_sample_value(
            "eventaudit_subscriber_stream_errors_total",
            {"subscription": sub, "code": "RESOURCE_EXHAUSTED"},
        )
        return value or 0.0

    with subscriber_client([StreamEndCounter(health.stream_error)], limit) as client:
        session = StreamSession(
            client, client.subscription_path(PROJECT, sub), audited, health, stream_metrics
        )
        audited.start()
        runner = threading.Thread(target=session.run, args=(stop,), daemon=True)
        runner.start()
        try:
            raw = publisher_client()
            topic_path = raw.topic_path(PROJECT, topic)
            raw.publish(topic_path, b"{}", eventID="small-1").result(timeout=30)
            wait_for(lambda: received_count(store, sub) == 1, 30, "the small message recorded")
            assert app.get("/healthz").status_code == 200
            # A message over the limit breaks the stream it arrives on, on every redelivery.
            raw.publish(topic_path, b"x" * (2 * limit), eventID="too-big-1").result(timeout=30)
            wait_for(lambda: app.get("/healthz").status_code == 503, 60, "/healthz 503")
            body = app.get("/healthz").get_json()
            assert body["error"] == "stream failing: RESOURCE_EXHAUSTED"
            assert (body["status"], body["pulling"]) == (503, False)
            assert errors() >= 1
            assert (
                registry.get_sample_value(
                    "eventaudit_subscriber_stream_healthy", {"subscription": sub}
                )
                == 0
            )
            assert b"eventaudit_subscriber_stream_errors_total" in app.get("/metrics").data
        finally:
            stop.set()
            runner.join(30)
            audited.stop()
    assert not runner.is_alive()


def test_subscription_deleted_and_recreated_while_the_process_runs(
    store: MongoStore, topic_factory: TopicFactory, subscriber_process
) -> None:
    topic, (sub,) = topic_factory(1)
    service, url = subscriber_process(sub, store)
    pid = service.proc.pid
    metrics = f"{url}/metrics"
    with audited_publisher(store) as pub:
        first = [pub.publisher.publish(topic, {"n": n}) for n in range(5)]
        for e in first:
            e.message_id(timeout=30)
        wait_for(lambda: received_count(store, sub) == 5, 60, "5 receipts")

        admin = pubsub_v1.SubscriberClient()
        admin.delete_subscription(subscription=admin.subscription_path(PROJECT, sub))
        wait_for(lambda: _health(url)[0] == 503, 60, "/healthz 503")
        status, body = _health(url)
        assert (status, body["error"], body["pulling"]) == (503, "subscription not found", False)
        wait_for(
            lambda: _metric(metrics, "eventaudit_subscriber_stream_restarts_total",
                            subscription=sub, reason="not_found") >= 2,
            60,
            "two attempts to subscribe again",
        )  # fmt: skip
        assert service.running() and service.proc.pid == pid
        assert _health(url)[1]["error"] == "subscription not found"

        stack.create_topic(PROJECT, topic, [sub])
        second = [pub.publisher.publish(topic, {"n": n}) for n in range(5, 10)]
        for e in second:
            e.message_id(timeout=30)
        wait_for(lambda: received_count(store, sub) == 10, 90, "10 receipts after recreation")
        wait_for(lambda: _health(url)[0] == 200, 30, "/healthz 200 again")
    assert service.running() and service.proc.pid == pid
    assert set(_receipts(store, sub)) == {e.event_id for e in first + second}
    admin.close()


def _start_failure(env: dict[str, str], *args: str) -> tuple[int, list[str]]:
    """Run the subscriber expecting it to fail at start: (exit code, stderr lines)."""
    proc = subprocess.run(
        [str(stack.PYTHON), "-m", "eventaudit.subscriber", *args],
        env={**os.environ, **env},
        cwd=stack.ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return proc.returncode, proc.stderr.strip().splitlines()


PROG = "python -m eventaudit.subscriber"


def test_start_up_errors_are_one_line_and_exit_1(
    ferret: Ferret, emulator: str, topic_factory: TopicFactory
) -> None:
    topic, (sub,) = topic_factory(1)
    other_topic, _ = topic_factory(0)
    env = service_env(ferret, emulator)
    path = f"projects/{PROJECT}/subscriptions/no-such-sub"
    port = stack.free_port()
    listen = ["--listen-address", f"127.0.0.1:{port}"]
    assert _start_failure(env, "--subscription", "no-such-sub", *listen) == (
        1,
        [f"{PROG}: subscription {path} does not exist"],
    )
    assert _start_failure(env, "--subscription", "no-such-sub", "--topic", topic, *listen) == (
        1,
        [f"{PROG}: subscription {path} does not exist"],
    )
    sub_path = f"projects/{PROJECT}/subscriptions/{sub}"
    assert _start_failure(env, "--subscription", sub, "--topic", other_topic, *listen) == (
        1,
        [f"{PROG}: --topic {other_topic} is not the topic of {sub_path} (it is {topic})"],
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        code, lines = _start_failure(env, "--subscription", sub, "--listen-address", busy)
    assert (code, len(lines)) == (1, 1)
    assert lines[0].startswith(f"{PROG}: cannot listen on {busy}: "), lines


def test_unreachable_pubsub_at_start_up_is_one_line(ferret: Ferret) -> None:
    env = {**service_env(ferret, f"127.0.0.1:{stack.free_port()}")}
    code, lines = _start_failure(
        env, "--subscription", "some-sub", "--listen-address", f"127.0.0.1:{stack.free_port()}"
    )
    assert (code, len(lines)) == (1, 1), lines
    assert lines[0].startswith(
        f"{PROG}: cannot read subscription projects/{PROJECT}/subscriptions/some-sub from Pub/Sub"
    )
    assert "Traceback" not in lines[0]


def test_emulator_killed_and_restarted_under_a_running_process(
    store: MongoStore, ferret: Ferret, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broker gone: 503 'stream failing: UNAVAILABLE'. Back empty (in-memory): 503
    'subscription not found'. Subscription recreated: receipts again, same pid, clean stop."""
    port = stack.free_port()
    host = f"127.0.0.1:{port}"
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", host)
    emulator = stack.pubsub_emulator(port, tmp_path / "emulator").start()
    service: stack.Service | None = None
    try:
        topic, sub = "restart-topic", "restart-sub"
        stack.create_topic(PROJECT, topic, [sub])
        listen = stack.free_port()
        url = f"http://127.0.0.1:{listen}"
        service = stack.python_service(
            "subscriber",
            "subscriber",
            ["--subscription", sub, "--listen-address", f"127.0.0.1:{listen}"],
            tmp_path,
            service_env(ferret, host, store.database),
            f"{url}/healthz",
        ).start()
        assert service.proc is not None
        pid = service.proc.pid
        raw = publisher_client()
        path = raw.topic_path(PROJECT, topic)
        for n in range(5):
            raw.publish(path, b"{}", eventID=f"before-{n}").result(timeout=30)
        wait_for(lambda: received_count(store, sub) == 5, 60, "5 receipts")

        emulator.kill()
        wait_for(lambda: _health(url)[0] == 503, 60, "/healthz 503 with the broker gone")
        assert _health(url)[1]["error"] == "stream failing: UNAVAILABLE"
        errors = _metric(
            f"{url}/metrics",
            "eventaudit_subscriber_stream_errors_total",
            subscription=sub,
            code="UNAVAILABLE",
        )
        assert errors >= 2

        emulator = stack.pubsub_emulator(port, tmp_path / "emulator").start()
        wait_for(
            lambda: _health(url)[1].get("error") == "subscription not found",
            90,
            "'subscription not found' from the empty emulator",
        )
        stack.create_topic(PROJECT, topic, [sub])
        raw = publisher_client()
        for n in range(5):
            raw.publish(path, b"{}", eventID=f"after-{n}").result(timeout=30)
        wait_for(lambda: received_count(store, sub) == 10, 90, "10 receipts after the restart")
        wait_for(lambda: _health(url)[0] == 200, 30, "/healthz 200 again")
        assert service.running() and service.proc.pid == pid
        service.stop(timeout=30)
        assert service.proc.returncode == 0
        assert set(_receipts(store, sub)) == {f"before-{n}" for n in range(5)} | {
            f"after-{n}" for n in range(5)
        }
    finally:
        if service is not None:
            service.stop()
        emulator.stop()
