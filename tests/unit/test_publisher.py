"""AuditedPublisher against a scripted Pub/Sub client: what reaches Pub/Sub, what is counted.

Nothing that fails before Pub/Sub (a bad event id, Options or payload, a message too large, a
topic that does not exist) is counted in flight; every settled publish is classified.
"""

from __future__ import annotations

import concurrent.futures
import math
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from datetime import datetime
from typing import Any

import pytest
from google.api_core import exceptions as gexc
from google.cloud.pubsub_v1.publisher.exceptions import MessageTooLargeError
from prometheus_client import CollectorRegistry

from eventaudit.contract import InvalidMessageError
from eventaudit.publisher.app import PublisherDeps, PublishSlots, create_app
from eventaudit.publisher.audited import (
    AuditedPublisher,
    InvalidAttributesError,
    InvalidEventError,
    InvalidOptionsError,
    InvalidOrderingKeyError,
    InvalidPayloadError,
    KnownTopics,
    PublisherMetrics,
    RecordBuffer,
    TopicNotFoundError,
    TopicUnverifiedError,
)
from eventaudit.publisher.config import PublisherSettings
from eventaudit.records import PublishRecord
from eventaudit.store import DuplicatePublishes
from tests.conftest import wait_for
from tests.fakes import MemoryStore

PROJECT = "p"
SETTINGS_PROJECT = "eventaudit-test"  # the settings take only real project ids


class FakeClient:
    """Topics that exist, futures the test settles, and a log of what reached `publish`."""

    def __init__(self, topics: set[str]) -> None:
        self.topics = topics
        self.checks: list[str] = []
        self.resumed: list[tuple[str, str]] = []
        self.published: list[tuple[str, bytes, dict[str, str]]] = []
        self.futures: list[Future[str]] = []
        self.publish_raises: Exception | None = None
        self.check_raises: Exception | None = None
        self.settle: Exception | str | None = None  # how each new future settles at once

    def topic_path(self, project: str, topic: str) -> str:
        return f"projects/{project}/topics/{topic}"

    def resume_publish(self, topic: str, ordering_key: str) -> None:
        self.resumed.append((topic, ordering_key))

    def get_topic(self, *, topic: str, timeout: float) -> object:
        self.checks.append(topic)
        if self.check_raises is not None:
            raise self.check_raises
        if topic.rpartition("/")[2] not in self.topics:
            raise gexc.NotFound(f"Topic not found: {topic}")
        return {"name": topic}

    def publish(self, topic: str, data: bytes, **attrs: str) -> Future[str]:
        if self.publish_raises is not None:
            raise self.publish_raises
        self.published.append((topic, data, attrs))
        future: Future[str] = Future()
        self.futures.append(future)
        if isinstance(self.settle, Exception):
            future.set_exception(self.settle)
        elif self.settle is not None:
            future.set_result(self.settle)
        return future


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Kit:
    def __init__(
        self,
        topics: KnownTopics | None = None,
        client: FakeClient | None = None,
        store: MemoryStore | None = None,
    ):
        self.client = client or FakeClient({"orders"})
        self.registry = CollectorRegistry()
        metrics = PublisherMetrics(self.registry)
        self.store = store or MemoryStore()
        self.buffer = RecordBuffer(self.store, metrics)
        self.publisher = AuditedPublisher(self.client, PROJECT, self.buffer, metrics, topics=topics)

    def refused(self, reason: str) -> float | None:
        return self.registry.get_sample_value(
            "eventaudit_publisher_refused_total", {"reason": reason}
        )

    def events(self, outcome: str) -> float | None:
        return self.registry.get_sample_value(
            "eventaudit_publisher_events_total", {"outcome": outcome}
        )


@pytest.mark.parametrize(
    ("exc", "outcome"),
    [
        (gexc.DeadlineExceeded("Deadline Exceeded"), "timeout"),
        (gexc.RetryError("Timeout of 60.0s exceeded", cause=None), "timeout"),
        (concurrent.futures.TimeoutError(), "timeout"),
        (TimeoutError("timed out"), "timeout"),
        (gexc.ServiceUnavailable("unavailable"), "error"),
        (gexc.NotFound("Topic not found"), "error"),
        (gexc.InvalidArgument("bad attribute"), "error"),
        (RuntimeError("Cannot publish on a stopped publisher."), "error"),
    ],
)
def test_failed_publishes_are_classified(exc: Exception, outcome: str) -> None:
    kit = Kit()
    event = kit.publisher.publish("orders", {"n": 1})
    kit.client.futures[0].set_exception(exc)
    assert kit.events(outcome) == 1
    assert kit.events("published") == 0
    assert sum(kit.events(o) or 0 for o in ("published", "error", "timeout")) == 1
    assert kit.publisher.flush(timeout=0)
    assert kit.buffer.depth() == 0
    with pytest.raises(type(exc)):
        event.message_id(timeout=0)


@pytest.mark.parametrize(
    ("kwargs", "error", "reason"),
    [
        ({"payload": {"a": math.inf}}, InvalidPayloadError, "finite"),
        ({"payload": {"a": -math.inf}}, InvalidPayloadError, "finite"),
        ({"payload": {"a": [math.nan]}}, InvalidPayloadError, "finite"),
        ({"payload": {"a": "\ud800"}}, InvalidPayloadError, "not encodable as UTF-8"),
        ({"payload": {"\udfff": 1}}, InvalidPayloadError, "not encodable as UTF-8"),
        ({"payload": {"a": {1, 2}}}, InvalidPayloadError, "not JSON"),
        ({"payload": {"a": b"bytes"}}, InvalidPayloadError, "not JSON"),
        ({"options": "NaN"}, InvalidOptionsError, "Options"),
        ({"options": "-Infinity"}, InvalidOptionsError, "Options"),
        ({"options": '{"a": 1e400}'}, InvalidOptionsError, "finite"),
        ({"options": '{"a": -1E+400}'}, InvalidOptionsError, "finite"),
        ({"options": "[" * 5000 + "]" * 5000}, InvalidOptionsError, "nested too deeply"),
        ({"options": '{"a": "' + "x" * 1100 + '"}'}, InvalidOptionsError, "1024"),
        ({"options": {"a": math.nan}}, InvalidOptionsError, "finite"),
        ({"options": {1: "a", "b": 2}}, InvalidOptionsError, "Options"),
        ({"options": 3}, InvalidOptionsError, "Options"),
        ({"event_id": "x\n"}, InvalidMessageError, "malformed eventID"),
        ({"event_id": "١٢٣"}, InvalidMessageError, "malformed eventID"),
        ({"event_id": "e" * 129}, InvalidMessageError, "malformed eventID"),
        ({"event_id": ""}, InvalidMessageError, "missing eventID"),
        ({"topic": "no-such-topic"}, TopicNotFoundError, "no-such-topic"),
        ({"topic": "orders\n"}, InvalidEventError, "invalid topic id"),
        ({"topic": "bad topic/x"}, InvalidEventError, "invalid topic id"),
        ({"topic": "goog-orders"}, InvalidEventError, "invalid topic id"),
        # Pub/Sub's limits, checked before the client (issue 18): 106 attributes were sent
        ({"attributes": {f"k{i}": "" for i in range(96)}}, InvalidAttributesError, "at most 95"),
        ({"attributes": {f"k{i}": "" for i in range(101)}}, InvalidAttributesError, "at most 95"),
        ({"attributes": {"k" * 257: "v"}}, InvalidAttributesError, "keys are 1 to 256 bytes"),
        ({"attributes": {"k": "é" * 513}}, InvalidAttributesError, "1026 bytes"),
        ({"payload": {"a": "x" * 10_000_000}}, MessageTooLargeError, "10000000"),
        # its publish request: 10,000,005 to 10,000,023 bytes (as the trace's span id is long)
        ({"payload": {"a": "x" * 9_999_770}}, MessageTooLargeError, "10000000"),
    ],
)
def test_rejected_before_pubsub_reaches_nothing_and_leaves_nothing_in_flight(
    kwargs: dict[str, Any], error: type[Exception], reason: str
) -> None:
    kit = Kit()
    call: dict[str, Any] = {"topic": "orders", "payload": {"ok": True}, **kwargs}
    with pytest.raises(error) as info:
        kit.publisher.publish(call.pop("topic"), call.pop("payload"), **call)
    assert reason in str(info.value)
    assert kit.client.published == []
    assert kit.client.checks == (
        [] if error is not TopicNotFoundError else [f"projects/{PROJECT}/topics/no-such-topic"]
    )
    assert kit.publisher.flush(timeout=0)
    assert sum(kit.events(o) or 0 for o in ("published", "error", "timeout")) == 0


def test_a_message_too_large_for_the_client_is_not_counted_in_flight() -> None:
    kit = Kit()
    kit.buffer.start()
    kit.client.publish_raises = MessageTooLargeError("would exceed 10000000 bytes")
    with pytest.raises(MessageTooLargeError):
        kit.publisher.publish("orders", {"a": "x"})
    assert kit.publisher.flush(timeout=0)
    assert kit.events("error") == 1  # refused by the client: counted, never in flight
    kit.client.publish_raises = None
    event = kit.publisher.publish("orders", {"a": "y"})
    assert not kit.publisher.flush(timeout=0)  # this one was handed over and is unsettled
    kit.client.futures[0].set_result("m-1")
    assert event.message_id(timeout=0) == "m-1"
    assert kit.publisher.flush(timeout=30)
    kit.buffer.close(timeout=5)
    assert len(kit.store.published) == 1


def test_names_callers_invent_never_reach_the_client_and_the_cache_stays_bounded() -> None:
    client = FakeClient({"orders"})
    topics = KnownTopics(client, PROJECT, size=100, clock=Clock())
    kit = Kit(topics, client)
    for i in range(2000):
        with pytest.raises(TopicNotFoundError):
            kit.publisher.publish(f"missing-{i}", {"n": i})
    assert client.published == []
    assert len(client.checks) == 2000
    assert len(topics) == 100
    assert kit.publisher.flush(timeout=0)
    kit.publisher.publish("orders", {"n": 1})
    kit.publisher.publish("orders", {"n": 2})
    assert [p[0] for p in client.published] == ["projects/p/topics/orders"] * 2
    assert client.checks.count("projects/p/topics/orders") == 1


def test_existence_answers_expire() -> None:
    clock = Clock()
    client = FakeClient({"orders"})
    topics = KnownTopics(client, PROJECT, found_ttl=300, missing_ttl=10, clock=clock)
    assert not topics.exists("later")
    client.topics.add("later")
    clock.now += 5
    assert not topics.exists("later")  # still the cached answer
    clock.now += 6
    assert topics.exists("later")
    assert client.checks == ["projects/p/topics/later"] * 2
    client.topics.discard("later")
    clock.now += 299
    assert topics.exists("later")
    clock.now += 2
    assert not topics.exists("later")


def test_a_topic_deleted_after_it_was_seen_is_checked_again() -> None:
    client = FakeClient({"orders"})
    kit = Kit(KnownTopics(client, PROJECT, clock=Clock()), client)
    kit.publisher.publish("orders", {"n": 1})
    client.topics.clear()
    client.futures[0].set_exception(gexc.NotFound("Topic not found"))
    with pytest.raises(TopicNotFoundError):
        kit.publisher.publish("orders", {"n": 2})
    assert len(client.published) == 1
    assert client.checks == ["projects/p/topics/orders"] * 2


CHECK_FAILURES = [
    gexc.PermissionDenied("pubsub.topics.get denied"),  # a least-privilege publisher
    gexc.Forbidden("forbidden"),
    gexc.Unauthenticated("no credentials"),
    gexc.ServiceUnavailable("unavailable"),
    gexc.DeadlineExceeded("deadline"),
    gexc.RetryError("Timeout of 10.0s exceeded", cause=None),
    RuntimeError("channel closed"),
]


@pytest.mark.parametrize("failure", CHECK_FAILURES, ids=lambda e: type(e).__name__)
def test_a_topic_that_cannot_be_checked_is_published_only_when_trusted(failure, caplog) -> None:
    clock = Clock()
    client = FakeClient(set())
    client.check_raises = failure
    topics = KnownTopics(client, PROJECT, missing_ttl=10, clock=clock, trusted={"orders"})
    kit = Kit(topics, client)
    kit.publisher.publish("orders", {"n": 1})
    kit.publisher.publish("orders", {"n": 2})
    assert len(client.published) == 2
    assert len(client.checks) == 1  # the unknown answer is remembered, not asked per publish
    assert "could not check whether topic orders exists, publishing anyway" in caplog.text
    clock.now += 11
    kit.publisher.publish("orders", {"n": 3})
    assert len(client.checks) == 2
    # Any other name, however many, never reaches the client.
    for i in range(3000):
        with pytest.raises(TopicUnverifiedError, match=f"cannot verify topic 'invented-{i}'"):
            kit.publisher.publish(f"invented-{i}", {"n": i})
    assert len(client.published) == 3
    assert kit.refused("topic_unverified") == 3000
    assert kit.publisher.flush(timeout=0) is False  # the 3 real publishes are still unsettled
    assert len(topics) <= 4096 + 1
    refusals = [r for r in caplog.records if "refusing publishes" in r.getMessage()]
    assert len(refusals) == 1  # logged once per interval, not per request
    assert "set --topics" in refusals[0].getMessage()
    clock.now += 11
    with pytest.raises(TopicUnverifiedError):
        kit.publisher.publish("invented-0", {"n": 0})
    assert len([r for r in caplog.records if "refusing publishes" in r.getMessage()]) == 2
    assert "3000 publishes refused" in caplog.records[-1].getMessage()


def test_a_library_publisher_without_trusted_names_publishes_when_it_cannot_check() -> None:
    # Library callers name their topics in code; the API narrows it with trust_only().
    client = FakeClient(set())
    client.check_raises = gexc.PermissionDenied("pubsub.topics.get denied")
    topics = KnownTopics(client, PROJECT, clock=Clock())
    kit = Kit(topics, client)
    kit.publisher.publish("orders", {"n": 1})
    kit.publisher.publish("payments", {"n": 1})
    assert len(client.published) == 2
    topics.trust_only({"orders"})
    kit.publisher.publish("orders", {"n": 2})
    with pytest.raises(TopicUnverifiedError):
        kit.publisher.publish("payments", {"n": 2})
    assert len(client.published) == 3


def test_invented_names_never_evict_topics_that_exist() -> None:
    clock = Clock()
    client = FakeClient({f"real-{i}" for i in range(10)})
    topics = KnownTopics(client, PROJECT, size=10, clock=clock)
    for i in range(10):
        assert topics.exists(f"real-{i}")
    for i in range(1000):
        assert not topics.exists(f"invented-{i}")
    client.checks.clear()
    for i in range(10):
        assert topics.exists(f"real-{i}")
    assert client.checks == []  # all ten still cached
    assert len(topics) == 20


def test_the_api_answers_503_for_a_topic_it_cannot_verify_and_publishes_trusted_ones() -> None:
    client = FakeClient(set())
    client.check_raises = gexc.PermissionDenied("pubsub.topics.get denied")
    client.settle = "m-1"
    kit = Kit(KnownTopics(client, PROJECT, clock=Clock()), client)
    deps = PublisherDeps(kit.publisher, kit.buffer, kit.registry)
    settings = PublisherSettings(users_topic="users", project=SETTINGS_PROJECT)
    api = create_app(settings, deps).test_client()
    resp = api.post("/api/v1/topics/invented/events", json={"n": 1})
    assert resp.status_code == 503
    assert resp.get_json() == {
        "error": "cannot verify topic 'invented' exists: set --topics",
        "status": 503,
    }
    assert api.post("/api/v1/users").status_code == 200  # the users topic is trusted
    assert [p[0] for p in client.published] == ["projects/p/topics/users"]
    # Naming the topics in --topics makes them publishable without the check.
    allowed = PublisherSettings(
        users_topic="users", topics="invented,other", project=SETTINGS_PROJECT
    )
    api = create_app(allowed, deps).test_client()
    assert api.post("/api/v1/topics/invented/events", json={"n": 1}).status_code == 201
    assert api.post("/api/v1/topics/other/events", json={"n": 1}).status_code == 201
    assert len(client.published) == 3
    assert kit.refused("topic_unverified") == 1


def test_a_published_event_is_recorded_with_its_payload() -> None:
    kit = Kit()
    kit.buffer.start()
    event = kit.publisher.publish("orders", {"text": "héllo", "n": 1e308}, event_id="evt-1")
    kit.client.futures[0].set_result("m-1")
    assert event.message_id(timeout=0) == "m-1"
    assert kit.publisher.flush(timeout=30)
    kit.buffer.close(timeout=5)
    (doc,) = kit.store.published.values()
    assert (doc["eventID"], doc["topic"], doc["messageId"]) == ("evt-1", "orders", "m-1")
    assert doc["payload"] == '{"text":"héllo","n":1e+308}'
    assert kit.client.published[0][1] == doc["payload"].encode()
    assert kit.events("published") == 1


@pytest.mark.parametrize(
    ("settle", "status", "error", "outcome"),
    [
        ("m-1", 201, None, "published"),
        (
            gexc.DeadlineExceeded("deadline"),
            504,
            "did not acknowledge the publish in time",
            "timeout",
        ),
        (gexc.RetryError("Timeout of 60.0s exceeded", None), 504, "in time", "timeout"),
        (gexc.ServiceUnavailable("down"), 502, "publish failed: ServiceUnavailable", "error"),
        (gexc.NotFound("Topic not found"), 404, "topic 'orders' does not exist", "error"),
    ],
)
def test_the_api_answers_each_publish_outcome(
    settle: Exception | str, status: int, error: str | None, outcome: str
) -> None:
    kit = Kit()
    kit.client.settle = settle
    settings = PublisherSettings(users_topic="orders", project=SETTINGS_PROJECT)
    app = create_app(settings, PublisherDeps(kit.publisher, kit.buffer, kit.registry))
    resp = app.test_client().post("/api/v1/topics/orders/events", json={"n": 1})
    assert resp.status_code == status
    if error is not None:
        assert error in resp.get_json()["error"]
    assert kit.events(outcome) == 1
    assert kit.publisher.flush(timeout=0) == (status != 201)  # a record waits: buffer not started


def test_the_api_answers_413_for_a_message_too_large_for_pubsub() -> None:
    kit = Kit()
    kit.client.publish_raises = MessageTooLargeError("too large")
    settings = PublisherSettings(users_topic="orders", project=SETTINGS_PROJECT)
    app = create_app(settings, PublisherDeps(kit.publisher, kit.buffer, kit.registry))
    resp = app.test_client().post("/api/v1/topics/orders/events", json={"n": 1})
    assert resp.status_code == 413
    assert resp.get_json()["error"] == "the message exceeds Pub/Sub's limit of 10 MB"
    assert kit.publisher.flush(timeout=0)


def test_the_api_answers_503_when_the_client_is_stopped() -> None:
    kit = Kit()
    kit.client.publish_raises = RuntimeError("Cannot publish on a stopped publisher.")
    settings = PublisherSettings(users_topic="orders", project=SETTINGS_PROJECT)
    app = create_app(settings, PublisherDeps(kit.publisher, kit.buffer, kit.registry))
    resp = app.test_client().post("/api/v1/topics/orders/events", json={"n": 1})
    assert resp.status_code == 503
    assert resp.get_json() == {"error": "publish refused: RuntimeError", "status": 503}
    assert kit.events("error") == 1
    assert kit.publisher.flush(timeout=0)


class FatalStore(MemoryStore):
    """Once `fatal`, a write raises what no handler in the writer catches."""

    fatal = False

    def insert_publish_records(
        self, records: Sequence[PublishRecord], now: datetime
    ) -> DuplicatePublishes:
        if self.fatal:
            raise SystemExit("nothing in the writer catches this")
        return super().insert_publish_records(records, now)


def test_healthz_is_503_while_the_record_writer_is_not_running(caplog) -> None:
    store = FatalStore()
    kit = Kit(store=store)
    settings = PublisherSettings(users_topic="orders", project=SETTINGS_PROJECT)
    client = create_app(
        settings, PublisherDeps(kit.publisher, kit.buffer, kit.registry)
    ).test_client()
    down = {
        "error": "publish record writer is not running: publish records are not being written",
        "status": 503,
        "store": "ok",
        "recordBuffer": 0,
    }
    assert (client.get("/healthz").status_code, client.get("/healthz").get_json()) == (503, down)
    kit.buffer.start()
    resp = client.get("/healthz")
    assert (resp.status_code, resp.get_json()) == (
        200,
        {"status": "ok", "store": "ok", "recordBuffer": 0},
    )
    store.fatal = True
    kit.publisher.publish("orders", {"n": 1})
    kit.client.futures[0].set_result("m-1")
    wait_for(lambda: not kit.buffer.writer_alive(), 30, "the writer thread to end")
    resp = client.get("/healthz")
    assert (resp.status_code, resp.get_json()) == (503, {**down, "recordBuffer": 1})
    assert "publish record writer stopped unexpectedly" in caplog.text


def test_publishes_beyond_the_slots_answer_503_and_health_and_metrics_still_answer(
    caplog,
) -> None:
    kit = Kit()  # futures settle only when the test says: Pub/Sub hangs
    settings = PublisherSettings(
        users_topic="orders", project=SETTINGS_PROJECT, threads=4, publish_timeout_seconds=600
    )
    assert settings.publish_slots == 2
    app = create_app(settings, PublisherDeps(kit.publisher, kit.buffer, kit.registry))
    kit.buffer.start()
    answers: list[tuple[int, Any]] = []

    def post() -> None:
        resp = app.test_client().post("/api/v1/topics/orders/events", json={"n": 1})
        answers.append((resp.status_code, resp.get_json()))

    hanging = [threading.Thread(target=post) for _ in range(2)]
    for thread in hanging:
        thread.start()
    wait_for(lambda: len(kit.client.futures) == 2, 30, "two publishes waiting on Pub/Sub")
    api = app.test_client()
    for _ in range(3):
        resp = api.post("/api/v1/topics/orders/events", json={"n": 1})
        assert resp.status_code == 503
        assert resp.get_json() == {
            "error": "too many publishes in flight; retry later",
            "status": 503,
        }
        assert resp.headers["Retry-After"] == "1"
    assert api.post("/api/v1/users").status_code == 503  # the demo route shares the bound
    assert api.get("/healthz").status_code == 200
    assert api.get("/metrics").status_code == 200
    assert kit.refused("busy") == 4
    assert len(kit.client.published) == 2  # nothing refused reached the client
    busy_lines = [r for r in caplog.records if "publish slots" in r.getMessage()]
    assert len(busy_lines) == 1  # once per interval, not per request
    for i, future in enumerate(kit.client.futures):
        future.set_result(f"m-{i}")
    for thread in hanging:
        thread.join(30)
    assert sorted(status for status, _ in answers) == [201, 201]
    kit.client.settle = "m-3"
    assert api.post("/api/v1/topics/orders/events", json={"n": 3}).status_code == 201


@pytest.mark.parametrize(("threads", "slots"), [(2, 1), (3, 1), (4, 2), (16, 14), (256, 254)])
def test_publish_slots_leave_two_threads_and_at_least_one(threads: int, slots: int) -> None:
    assert PublisherSettings(threads=threads).publish_slots == slots


class Busy:
    """Publish slots and their refusals counted `busy`."""

    def __init__(self, size: int, wait: float, clock: Any = None) -> None:
        self.registry = CollectorRegistry()
        refused = PublisherMetrics(self.registry).refused
        if clock is None:
            self.slots = PublishSlots(size, refused, wait=wait)
        else:
            self.slots = PublishSlots(size, refused, wait=wait, clock=clock)

    def refused(self) -> float | None:
        return self.registry.get_sample_value(
            "eventaudit_publisher_refused_total", {"reason": "busy"}
        )


def _acquire_in_thread(slots: PublishSlots) -> tuple[threading.Thread, list[bool]]:
    got: list[bool] = []
    thread = threading.Thread(target=lambda: got.append(slots.acquire()), daemon=True)
    thread.start()
    return thread, got


def test_a_publish_finding_every_slot_taken_waits_for_one_given_back() -> None:
    # A burst of more clients than slots while Pub/Sub answers: the extra ones wait, not 503.
    busy = Busy(2, wait=3600)
    slots = busy.slots
    assert slots.acquire() and slots.acquire()
    waiters = [_acquire_in_thread(slots) for _ in range(2)]
    wait_for(lambda: slots.waiting == 2, 30, "two publishes waiting for a slot")
    slots.release()
    slots.release()
    for thread, _ in waiters:
        thread.join(30)
    assert [got for _, got in waiters] == [[True], [True]]
    assert (slots.waiting, slots.stalled) == (0, False)
    assert busy.refused() == 0


def test_a_slot_given_back_goes_to_a_waiting_publish_before_a_later_one() -> None:
    busy = Busy(1, wait=3600)
    slots = busy.slots
    assert slots.acquire()
    thread, got = _acquire_in_thread(slots)
    wait_for(lambda: slots.waiting == 1, 30, "a publish waiting for the slot")
    slots.release()
    slots.wait = 0  # a later publish that would take a free slot, or else answer 503 at once
    assert not slots.acquire()
    thread.join(30)
    assert got == [True]
    assert busy.refused() == 1


def test_a_wait_that_runs_out_refuses_and_no_publish_waits_until_a_slot_comes_back(
    caplog,
) -> None:
    readings = iter(range(1_000_000))  # every reading a second later: each wait runs out
    busy = Busy(1, wait=0.5, clock=lambda: float(next(readings)))
    slots = busy.slots
    assert slots.acquire()
    assert not slots.acquire()
    assert slots.stalled  # Pub/Sub is not giving slots back: the next ones do not wait
    slots.wait = 3600
    thread, got = _acquire_in_thread(slots)
    wait_for(lambda: got == [False], 30, "a publish refused at once while stalled")
    assert (slots.waiting, busy.refused()) == (0, 2)
    assert len([r for r in caplog.records if "publish slots" in r.getMessage()]) == 1
    slots.release()  # a publish settled: slots come back, so publishes wait again
    assert not slots.stalled
    assert slots.acquire()
    thread, got = _acquire_in_thread(slots)
    wait_for(lambda: slots.waiting == 1, 30, "a publish waiting for the slot again")
    slots.release()
    thread.join(30)
    assert got == [True]


def test_with_no_wait_a_publish_finding_every_slot_taken_is_refused_at_once() -> None:
    busy = Busy(1, wait=0)
    slots = busy.slots
    assert slots.acquire()
    assert not slots.acquire()
    assert (slots.stalled, busy.refused()) == (False, 1)
    slots.release()
    assert slots.acquire()
    slots.release()
    with pytest.raises(ValueError, match="released more often"):
        slots.release()


def test_a_failed_publish_with_an_ordering_key_resumes_the_key() -> None:
    kit = Kit()
    kit.publisher.publish("orders", {"n": 1}, ordering_key="user-7")
    kit.publisher.publish("orders", {"n": 2})
    assert [attrs.get("ordering_key") for _, _, attrs in kit.client.published] == ["user-7", None]
    kit.client.futures[0].set_exception(gexc.ServiceUnavailable("unavailable"))
    kit.client.futures[1].set_exception(gexc.ServiceUnavailable("unavailable"))
    assert kit.client.resumed == [("projects/p/topics/orders", "user-7")]


def test_a_published_event_with_an_ordering_key_is_recorded_like_any() -> None:
    kit = Kit()
    kit.buffer.start()
    kit.publisher.publish(
        "orders", {"n": 1}, event_id="evt-1", ordering_key="user-7", attributes={"kind": "a"}
    )
    kit.client.futures[0].set_result("m-1")
    assert kit.publisher.flush(timeout=30)
    kit.buffer.close(timeout=5)
    record = kit.store.publish_record("orders", "evt-1")
    assert (record["messageId"], record["attributes"]) == ("m-1", '{"kind":"a"}')
    assert kit.client.published[0][2]["kind"] == "a"
    assert kit.client.resumed == []


def test_a_message_just_under_pubsubs_limit_is_handed_to_the_client() -> None:
    kit = Kit()
    # Its publish request: 9,999,975 to 9,999,993 bytes (as the trace's span id is long).
    kit.publisher.publish("orders", {"a": "x" * 9_999_740}, event_id="e-1")
    (_, data, _) = kit.client.published[0]
    assert len(data) == 9_999_748


def test_raw_utf8_in_the_api_headers_is_read_as_utf8() -> None:
    kit = Kit()
    kit.client.settle = "m-1"
    settings = PublisherSettings(users_topic="orders", project=SETTINGS_PROJECT)
    app = create_app(settings, PublisherDeps(kit.publisher, kit.buffer, kit.registry))
    raw = {  # as a WSGI server hands header bytes over: one Latin-1 character each
        "HTTP_X_ORDERING_KEY": "clé-1".encode().decode("latin-1"),
        "HTTP_X_EVENT_ATTRIBUTES": '{"région":"zürich"}'.encode().decode("latin-1"),
    }
    resp = app.test_client().post("/api/v1/topics/orders/events", json={}, environ_overrides=raw)
    assert resp.status_code == 201, resp.get_json()
    (_, _, sent) = kit.client.published[0]
    assert (sent["ordering_key"], sent["région"]) == ("clé-1", "zürich")


@pytest.mark.parametrize(
    ("key", "error"),
    [
        ("k" * 1025, "ordering key is 1025 bytes"),
        ("é" * 513, "ordering key is 1026 bytes"),
        ("\ud800", "not encodable as UTF-8"),
    ],
)
def test_an_ordering_key_pubsub_would_refuse_reaches_nothing(key: str, error: str) -> None:
    kit = Kit()
    with pytest.raises(InvalidOrderingKeyError, match=error):
        kit.publisher.publish("orders", {"n": 1}, ordering_key=key)
    assert kit.client.published == []
