"""/api/v1/missed answers exactly what the gauges count, only for what is reported, only while
the numbers are served; driver errors never reach an HTTP body.

Each agreement test runs on FerretDB (MongoStore) and on the in-memory fake, with an explicit
clock: records carry the createdTime and receive time the test gives them. Records written
after an evaluation are folded in by the next one: until then the API lists what the gauge
counts.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from flask.testing import FlaskClient
from prometheus_client import CollectorRegistry

from eventaudit import journal
from eventaudit.contract import encode_attributes, epoch_ms
from eventaudit.exporter import lookup
from eventaudit.exporter.app import ExporterDeps, create_app
from eventaudit.exporter.buckets import Window
from eventaudit.exporter.collector import CompletionCollector, EvaluationState
from eventaudit.exporter.evaluator import Evaluator
from eventaudit.exporter.loop import EvaluationLoop
from eventaudit.exporter.missed import MissedAnswers
from eventaudit.exporter.subscriptions import ExpectedSubscriptions, Lister, SubscriptionInfo
from eventaudit.journal import BucketDigest
from eventaudit.records import PublishRecord, Receipt
from eventaudit.serving import BackgroundServer, ServerLimits
from eventaudit.store import AuditStore, MongoStore
from tests.conftest import wait_for
from tests.fakes import MemoryStore
from tools import stack

BUCKET = timedelta(seconds=10)
SETTLE = timedelta(seconds=30)
TOPIC, SUB, OTHER, WANDERER = "orders", "orders-audit", "orders-billing", "orders-wanderer"
NOT_REPORTED = "subscription {} of topic orders is not reported in window {}"
LEAKS = ("127.0.0.1:", "Topology", "Errno", "refused", "ServerSelection")


def at(h: int, m: int, s: int) -> datetime:
    return datetime(2026, 11, 27, h, m, s, tzinfo=UTC)


@pytest.fixture(params=["ferretdb", "memory"])
def audit_store(request: pytest.FixtureRequest) -> Iterator[AuditStore]:
    if request.param == "memory":
        yield MemoryStore()
    else:
        yield request.getfixturevalue("store")


def publish(store: AuditStore, event_id: str, when: datetime, written: datetime) -> None:
    store.insert_publish_records(
        [PublishRecord(event_id, f"{event_id:0>32}"[-32:], TOPIC, "{}", "m", when)], written
    )


def receive(store: AuditStore, sub: str, event_id: str, when: datetime, written: datetime) -> None:
    store.record_receipts([Receipt(sub, event_id, TOPIC, None, "m", when, when, written)], written)


class Exporter:
    """Evaluator, loop and app over one store; `evaluate(now)` runs one pass at that time."""

    def __init__(
        self,
        store: AuditStore,
        api_store: AuditStore | None = None,
        lister: Lister | None = None,
    ) -> None:
        expected = ExpectedSubscriptions({TOPIC: {SUB, OTHER}}, set(), lister, 0)
        windows = [Window("1m", timedelta(minutes=1)), Window("5m", timedelta(minutes=5))]
        self.evaluator = Evaluator(store, expected, windows, BUCKET, SETTLE)
        self.state = EvaluationState(settle_seconds=SETTLE.total_seconds())
        self.registry = CollectorRegistry()
        self.registry.register(CompletionCollector(self.state, expected))
        self.store = store
        self.answers = MissedAnswers(concurrency=2)
        self.registry.register(self.answers)
        self.app = create_app(
            ExporterDeps(api_store or store, self.state, self.registry, self.answers)
        )
        self.client: FlaskClient = self.app.test_client()

    def evaluate(self, now: datetime) -> bool:
        loop = EvaluationLoop(
            self.evaluator, self.state, self.store, BUCKET, timedelta(days=1), clock=lambda: now
        )
        return loop.run_once()

    def gauge(self, sub: str, window: str = "1m") -> float | None:
        labels = {"topic": TOPIC, "subscription": sub, "window": window}
        return self.registry.get_sample_value("eventaudit_missed_events", labels)

    def missed(self, sub: str, window: str = "1m", topic: str = TOPIC) -> tuple[int, Any]:
        resp = self.client.get(
            f"/api/v1/missed?topic={topic}&subscription={sub}&window={window}&limit=100"
        )
        return resp.status_code, resp.get_json()


def _seeded(store: AuditStore) -> None:
    """Ten events in the bucket [12:00:00, 12:00:10); SUB received e0..e6, OTHER all ten; the
    wanderer (neither configured nor listed) received one event four minutes earlier."""
    for i in range(10):
        when = at(12, 0, i)
        publish(store, f"e{i}", when, when)
        receive(store, OTHER, f"e{i}", when, when + timedelta(seconds=1))
        if i < 7:
            receive(store, SUB, f"e{i}", when, when + timedelta(seconds=1))
    publish(store, "w1", at(11, 56, 5), at(11, 56, 5))
    receive(store, WANDERER, "w1", at(11, 56, 5), at(11, 56, 6))


def _ids(body: Any) -> list[str]:
    return [e["eventID"] for e in body["events"]]


def test_api_and_gauge_agree_across_late_records(audit_store: AuditStore) -> None:
    _seeded(audit_store)
    exporter = Exporter(audit_store)
    # 12:00:45 with a 30 s settle delay: frontier 12:00:10, 1m = [11:59:10, 12:00:10).
    assert exporter.evaluate(at(12, 0, 45))
    assert exporter.gauge(SUB) == 3
    status, body = exporter.missed(SUB)
    assert (status, body["missed"], _ids(body)) == (200, 3, ["e7", "e8", "e9"])
    assert (body["start"], body["end"]) == (at(11, 59, 10).isoformat(), at(12, 0, 10).isoformat())

    # Written after the evaluation: a late receipt of e8 and a late publish record e10.
    receive(audit_store, SUB, "e8", at(12, 0, 8), at(12, 0, 50))
    publish(audit_store, "e10", at(12, 0, 5), at(12, 0, 50))
    status, body = exporter.missed(SUB)
    assert exporter.gauge(SUB) == 3
    assert (status, body["missed"], _ids(body)) == (200, 3, ["e7", "e8", "e9"])

    receive(audit_store, SUB, "e10", at(12, 0, 5), at(12, 0, 51))
    assert exporter.missed(SUB)[1]["missed"] == exporter.gauge(SUB) == 3

    # The next evaluation re-reads the bucket: both change together.
    assert exporter.evaluate(at(12, 0, 55))
    assert exporter.gauge(SUB) == 2
    status, body = exporter.missed(SUB)
    assert (status, body["missed"], _ids(body)) == (200, 2, ["e7", "e9"])
    assert exporter.gauge(OTHER) == 1
    status, body = exporter.missed(OTHER)
    assert (status, body["missed"], _ids(body)) == (200, 1, ["e10"])


def test_the_api_says_which_missed_events_were_dead_lettered(audit_store: AuditStore) -> None:
    _seeded(audit_store)
    letter = Receipt(SUB, "e8", TOPIC, None, "m", at(12, 0, 8), at(12, 0, 8), at(12, 0, 9), 5,
                     "orders-dlq-audit")  # fmt: skip
    audit_store.record_receipts([letter], at(12, 0, 9))
    exporter = Exporter(audit_store)
    assert exporter.evaluate(at(12, 0, 45))
    labels = {"topic": TOPIC, "subscription": SUB, "window": "1m"}
    assert exporter.registry.get_sample_value("eventaudit_dead_lettered_events", labels) == 1
    for _ in range(2):  # computed, then from the cache
        status, body = exporter.missed(SUB)
        assert (status, body["missed"], body["deadLettered"], body["lost"]) == (200, 3, 1, 2)
        assert [(e["eventID"], e["fate"], e["deliveryAttempts"]) for e in body["events"]] == [
            ("e7", "lost", None),
            ("e8", "dead_lettered", 5),
            ("e9", "lost", None),
        ]
    assert exporter.answers._counts["cached"] == 1


def test_a_record_stored_right_after_the_evaluation_is_listed_by_the_next(
    audit_store: AuditStore,
) -> None:
    _seeded(audit_store)
    exporter = Exporter(audit_store)
    assert exporter.evaluate(at(12, 0, 55))
    # Stamped before the evaluation's time, stored after it read the journal (a batch in
    # flight): the journal holds it for the next evaluation, and the API keeps agreeing.
    receive(audit_store, SUB, "e9", at(12, 0, 9), at(12, 0, 54))
    assert exporter.gauge(SUB) == 3
    status, body = exporter.missed(SUB)
    assert (status, body["missed"], _ids(body)) == (200, 3, ["e7", "e8", "e9"])
    assert exporter.evaluate(at(12, 1, 5))
    assert exporter.gauge(SUB) == 2
    status, body = exporter.missed(SUB)
    assert (status, body["missed"], _ids(body)) == (200, 2, ["e7", "e8"])


def _drop_digests(store: AuditStore) -> None:
    if isinstance(store, MongoStore):
        for name in store.db.list_collection_names():
            if name.startswith("BucketDigest_"):
                store.db.drop_collection(name)
    else:
        assert isinstance(store, MemoryStore)
        store.digests.clear()


def _digests_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bucket results list no missed event: every listing reads the digests."""
    monkeypatch.setattr(journal, "MISSED_KEPT", 0)


def test_listings_up_to_what_bucket_results_keep_read_nothing_from_the_store(
    audit_store: AuditStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    _seeded(audit_store)
    exporter = Exporter(audit_store)
    assert exporter.evaluate(at(12, 0, 45))
    reads = _count_reads(monkeypatch, audit_store)
    assert exporter.missed(SUB)[1]["missed"] == 3
    assert exporter.missed(SUB, "5m")[1]["missed"] == 4
    assert exporter.missed(OTHER)[1]["missed"] == 0
    assert reads == []


def test_a_filtered_subscriptions_list_read_from_digests_agrees_with_its_gauge(
    audit_store: AuditStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    _digests_only(monkeypatch)
    for i in range(12):
        when = at(12, 0, i % 10)
        kind = encode_attributes({"kind": "a" if i % 3 else "b"})
        record = PublishRecord(f"f{i}", f"{i:032x}", TOPIC, "{}", "m", when, attributes=kind)
        audit_store.insert_publish_records([record], when)
        if i % 2:
            receive(audit_store, SUB, f"f{i}", when, when + timedelta(seconds=1))
    letter = Receipt(SUB, "f4", TOPIC, None, "m", at(12, 0, 4), at(12, 0, 4), at(12, 0, 5), 5,
                     "orders-dlq-audit")  # fmt: skip
    audit_store.record_receipts([letter], at(12, 0, 5))
    only_a = [SubscriptionInfo(SUB, 'attributes.kind = "a"'), SubscriptionInfo(OTHER)]
    exporter = Exporter(audit_store, lister=lambda topic: only_a)
    assert exporter.evaluate(at(12, 0, 45))
    labels = {"topic": TOPIC, "subscription": SUB, "window": "1m"}
    # Kind a: f1 f2 f4 f5 f7 f8 f10 f11; received the odd ones (f1 f5 f7 f11).
    assert exporter.gauge(SUB) == 4
    assert exporter.registry.get_sample_value("eventaudit_filtered_receipts", labels) == 2
    status, body = exporter.missed(SUB)
    assert (status, body["missed"], body["deadLettered"]) == (200, 4, 1)
    assert [(e["eventID"], e["fate"]) for e in body["events"]] == [
        ("f10", "lost"), ("f2", "lost"), ("f4", "dead_lettered"), ("f8", "lost")]  # fmt: skip


def test_digests_that_disagree_with_the_gauge_answer_503_never_a_wrong_list(
    audit_store: AuditStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    _digests_only(monkeypatch)
    _seeded(audit_store)
    exporter = Exporter(audit_store)
    assert exporter.evaluate(at(12, 0, 45))
    _drop_digests(audit_store)  # an operator's mistake, a restore from another backup
    status, body = exporter.missed(SUB)
    assert (status, body) == (
        503,
        {
            "error": "the stored digests disagree with the last evaluation; retry after the next",
            "status": 503,
        },
    )
    assert exporter.gauge(SUB) == 3


@pytest.mark.parametrize(
    ("topic", "sub", "window", "status", "error"),
    [
        (TOPIC, "orders-audti", "1m", 404, NOT_REPORTED.format("orders-audti", "1m")),
        ("no-such-topic", SUB, "1m", 404, "topic no-such-topic is not reported"),
        (TOPIC, WANDERER, "1m", 404, NOT_REPORTED.format(WANDERER, "1m")),
        (TOPIC, WANDERER, "5m", 200, None),
        (TOPIC, OTHER, "1m", 200, None),
    ],
)  # fmt: skip
def test_only_what_the_evaluation_reports_is_answered(
    audit_store: AuditStore, topic: str, sub: str, window: str, status: int, error: str | None
) -> None:
    _seeded(audit_store)
    exporter = Exporter(audit_store)
    assert exporter.evaluate(at(12, 0, 45))
    got, body = exporter.missed(sub, window, topic)
    assert got == status
    if error is None:
        gauge = exporter.registry.get_sample_value(
            "eventaudit_missed_events", {"topic": topic, "subscription": sub, "window": window}
        )
        assert body["missed"] == gauge == len(body["events"])
    else:
        assert body == {"error": error, "status": status}


def _dead_store() -> MongoStore:
    """A MongoStore on a port nothing listens on: its errors are real driver errors."""
    return MongoStore(f"mongodb://127.0.0.1:{stack.free_port()}/", "eventaudit", 0.3)


def _bodies(client: FlaskClient) -> list[str]:
    paths = ["/healthz", "/", "/metrics", f"/api/v1/missed?topic={TOPIC}&subscription={SUB}"]
    return [client.get(path).get_data(as_text=True) for path in paths]


def test_failed_evaluation_answers_503_without_driver_details() -> None:
    dead = _dead_store()
    exporter = Exporter(dead)
    assert not exporter.evaluate(at(12, 0, 45))
    reason = "evaluation failed: audit store unavailable"
    assert exporter.missed(SUB) == (503, {"error": reason, "status": 503})
    health = exporter.client.get("/healthz")
    assert (health.status_code, health.get_json()) == (
        503,
        {"error": reason, "status": 503, "up": 0},
    )
    assert exporter.registry.get_sample_value("eventaudit_up") == 0
    for body in _bodies(exporter.client):
        assert [leak for leak in LEAKS if leak in body] == []
    dead.close()


def test_memory_store_outage_answers_503_then_recovers() -> None:
    store = MemoryStore()
    _seeded(store)
    exporter = Exporter(store)
    store.fail_next = 1
    assert not exporter.evaluate(at(12, 0, 45))
    assert exporter.missed(SUB)[0] == 503
    assert exporter.evaluate(at(12, 0, 45))
    assert exporter.missed(SUB)[0] == 200


def test_store_error_while_listing_is_a_short_503(
    store: MongoStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    _digests_only(monkeypatch)  # a listing that needs the store
    _seeded(store)
    dead = _dead_store()
    exporter = Exporter(store, api_store=dead)
    assert exporter.evaluate(at(12, 0, 45))
    assert exporter.missed(SUB) == (503, {"error": "audit store unavailable", "status": 503})
    assert exporter.client.get("/healthz").status_code == 200
    for body in _bodies(exporter.client):
        assert [leak for leak in LEAKS if leak in body] == []
    dead.close()


def _count_reads(monkeypatch: pytest.MonkeyPatch, store: AuditStore) -> list[datetime]:
    """Record every digest `store` loads (its bucket)."""
    calls: list[datetime] = []
    real = store.load_digest

    def counted(topic: str, start: datetime) -> BucketDigest:
        calls.append(start)
        return real(topic, start)

    monkeypatch.setattr(store, "load_digest", counted)
    return calls


def _api_requests(exporter: Exporter, outcome: str) -> float | None:
    return exporter.registry.get_sample_value(
        "eventaudit_missed_api_requests_total", {"outcome": outcome}
    )


def test_a_repeated_call_is_served_from_the_cache_until_the_next_evaluation(
    audit_store: AuditStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    _digests_only(monkeypatch)
    _seeded(audit_store)
    exporter = Exporter(audit_store)
    assert exporter.evaluate(at(12, 0, 45))
    reads = _count_reads(monkeypatch, audit_store)
    for _ in range(3):
        status, body = exporter.missed(SUB)
        assert (status, body["missed"], _ids(body)) == (200, 3, ["e7", "e8", "e9"])
    assert reads == [at(12, 0, 0)]  # the one bucket with misses
    # Another limit is the same answer, cut differently.
    resp = exporter.client.get(f"/api/v1/missed?topic={TOPIC}&subscription={SUB}&limit=2")
    body = resp.get_json()
    assert (body["missed"], body["truncated"], _ids(body)) == (3, True, ["e7", "e8"])
    # Another window or subscription is another answer.
    assert exporter.missed(SUB, "5m")[1]["missed"] == 4
    assert exporter.missed(OTHER)[1]["missed"] == 0
    # 5m has two buckets with misses (w1 is missed too); OTHER has none: nothing read.
    assert reads == [at(12, 0, 0), at(11, 56, 0), at(12, 0, 0)]
    assert (_api_requests(exporter, "computed"), _api_requests(exporter, "cached")) == (3, 3)

    # Written after the evaluation: the cached answer stays what the gauge counts.
    receive(audit_store, SUB, "e7", at(12, 0, 7), at(12, 0, 50))
    assert exporter.missed(SUB)[1]["missed"] == exporter.gauge(SUB) == 3
    assert len(reads) == 3

    # A new evaluation drops every cached answer.
    assert exporter.evaluate(at(12, 0, 55))
    reads.clear()
    status, body = exporter.missed(SUB)
    assert (status, body["missed"], _ids(body)) == (200, 2, ["e8", "e9"])
    assert exporter.missed(SUB)[1]["missed"] == exporter.gauge(SUB) == 2
    assert reads == [at(12, 0, 0)]


def test_a_disagreeing_digest_is_answered_503_from_the_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _digests_only(monkeypatch)
    store = MemoryStore()
    _seeded(store)
    exporter = Exporter(store)
    assert exporter.evaluate(at(12, 0, 55))
    _drop_digests(store)
    reads = _count_reads(monkeypatch, store)
    assert [exporter.missed(SUB)[0] for _ in range(3)] == [503, 503, 503]
    assert len(reads) == 1


def test_a_store_error_is_not_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    _digests_only(monkeypatch)
    store = MemoryStore()
    _seeded(store)
    exporter = Exporter(store)
    assert exporter.evaluate(at(12, 0, 45))
    store.fail_next = 1
    assert exporter.missed(SUB) == (503, {"error": "audit store unavailable", "status": 503})
    assert exporter.missed(SUB)[1]["missed"] == 3


def _get(url: str) -> tuple[int, dict[str, Any], str | None]:
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status, json.load(resp), resp.headers.get("Retry-After")
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc), exc.headers.get("Retry-After")


class SlowReads:
    """Digest reads that wait until released: a slow store."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, store: AuditStore) -> None:
        self.release = threading.Event()
        self.waiting = threading.Semaphore(0)
        self.calls = 0
        real = store.load_digest

        def slow(topic: str, start: datetime) -> BucketDigest:
            self.calls += 1
            self.waiting.release()
            assert self.release.wait(timeout=60)
            return real(topic, start)

        monkeypatch.setattr(store, "load_digest", slow)


def test_calls_beyond_the_concurrency_limit_get_429_while_healthz_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _digests_only(monkeypatch)
    store = MemoryStore()
    _seeded(store)
    exporter = Exporter(store)
    assert exporter.evaluate(at(12, 0, 45))
    assert exporter.missed(OTHER)[0] == 200  # cached before the reads turn slow
    slow = SlowReads(monkeypatch, store)
    server = BackgroundServer(exporter.app, f"127.0.0.1:{stack.free_port()}", ServerLimits(4))
    base = f"http://127.0.0.1:{server.port}"
    try:
        server.start()
        answers: list[tuple[int, dict[str, Any], str | None]] = []
        url = f"{base}/api/v1/missed?topic={TOPIC}&subscription={SUB}"
        calls = [threading.Thread(target=lambda: answers.append(_get(url))) for _ in range(8)]
        for call in calls:
            call.start()
        # Two computations hold their slot; the six others are refused at once.
        assert slow.waiting.acquire(timeout=30) and slow.waiting.acquire(timeout=30)
        wait_for(lambda: len(answers) == 6, 30, "six calls refused")
        busy = {
            "error": "too many missed-event listings in progress; retry later",
            "status": 429,
        }
        assert answers == [(429, busy, "5")] * 6
        # The server's threads are not all taken: health, metrics and cached answers answer.
        status, health, _ = _get(f"{base}/healthz")
        assert (status, health["status"]) == (200, "ok")
        status, body, _ = _get(f"{base}/api/v1/missed?topic={TOPIC}&subscription={OTHER}")
        assert (status, body["missed"]) == (200, 0)
        assert slow.calls == 2

        slow.release.set()
        for call in calls:
            call.join(timeout=60)
        done = sorted((status, body.get("missed")) for status, body, _ in answers[6:])
        assert done == [(200, 3), (200, 3)]
        assert _api_requests(exporter, "busy") == 6
        # The same call again is now answered from the cache.
        status, body, _ = _get(url)
        assert (status, body["missed"]) == (200, 3)
        assert slow.calls == 2
    finally:
        slow.release.set()
        server.stop(timeout=5)


# -- one event's story: GET /api/v1/events/<eventID> ------------------------------------------


def _story(exporter: Exporter, event_id: str, query: str = "") -> tuple[int, Any]:
    resp = exporter.client.get(f"/api/v1/events/{event_id}{query}")
    return resp.status_code, resp.get_json()


def _verdicts(body: Any) -> dict[str, str]:
    [published] = body["published"]
    return {s["subscription"]: s["verdict"] for s in published["subscriptions"]}


def _on(body: Any, sub: str) -> dict[str, Any]:
    [published] = body["published"]
    return next(s for s in published["subscriptions"] if s["subscription"] == sub)


def test_the_story_of_a_received_a_missed_a_redelivered_and_a_dead_lettered_event(
    audit_store: AuditStore,
) -> None:
    _seeded(audit_store)
    receive(audit_store, SUB, "e1", at(12, 0, 1), at(12, 0, 3))  # a redelivery
    letter = Receipt(SUB, "e8", TOPIC, None, "m", at(12, 0, 8), at(12, 0, 8), at(12, 0, 9), 5,
                     "orders-dlq-audit")  # fmt: skip
    audit_store.record_receipts([letter], at(12, 0, 9))
    exporter = Exporter(audit_store)
    exporter.app.config["DEPS"] = ExporterDeps(
        audit_store, exporter.state, exporter.registry, exporter.answers, "proj-a"
    )
    assert exporter.evaluate(at(12, 0, 45))

    status, body = _story(exporter, "e0")
    assert status == 200
    [published] = body["published"]
    assert (published["topic"], published["publishTime"]) == (TOPIC, at(12, 0, 0).isoformat())
    assert published["trace"] == {
        "traceID": f"{'e0':0>32}",
        "w3cTraceId": f"{'e0':0>32}",
        "cloudTrace": f"projects/proj-a/traces/{'e0':0>32}",
    }
    # The wanderer is reported in the 5m window (it has a receipt there), which counts e0
    # missed on it: the story says what the gauge counted.
    assert _verdicts(body) == {SUB: "received", OTHER: "received", WANDERER: "missed"}
    got = _on(body, SUB)
    assert (got["deliveries"], got["deliveryLatencySeconds"]) == (1, 1.0)
    assert got["firstReceiveTime"] == at(12, 0, 1).isoformat()

    status, body = _story(exporter, "e1")  # redelivered: one receipt, two deliveries
    assert (status, _verdicts(body)[SUB], _on(body, SUB)["deliveries"]) == (200, "received", 2)
    assert _on(body, SUB)["lastReceiveTime"] == at(12, 0, 3).isoformat()

    status, body = _story(exporter, "e7")
    assert (status, _verdicts(body)) == (
        200,
        {SUB: "missed", OTHER: "received", WANDERER: "missed"},
    )
    assert _on(body, SUB)["received"] is False

    status, body = _story(exporter, "e8")
    assert _verdicts(body)[SUB] == "dead_lettered"
    assert _on(body, SUB)["deadLettered"] == {
        "deliveryAttempts": 5,
        "deadLetterSubscription": "orders-dlq-audit",
        "receiveTime": at(12, 0, 9).isoformat(),
    }

    # A receipt written after the evaluation: missed as counted, received late.
    receive(audit_store, SUB, "e9", at(12, 0, 9), at(12, 0, 50))
    assert _verdicts(_story(exporter, "e9")[1])[SUB] == "received_late"
    assert exporter.evaluate(at(12, 0, 55))
    assert _verdicts(_story(exporter, "e9")[1])[SUB] == "received"

    # Every missed event of the API links to its story, which says it was missed.
    status, missed = exporter.missed(SUB)
    for e in missed["events"]:
        code, story = _story(exporter, e["story"].removeprefix("/api/v1/events/"))
        assert code == 200 and _verdicts(story)[SUB] in ("missed", "dead_lettered")
        assert e["trace"]["cloudTrace"] == f"projects/proj-a/traces/{e['traceID']}"


def test_an_unsettled_an_unknown_and_an_old_event(audit_store: AuditStore) -> None:
    _seeded(audit_store)
    publish(audit_store, "fresh", at(12, 0, 30), at(12, 0, 30))
    exporter = Exporter(audit_store)
    assert exporter.evaluate(at(12, 0, 45))
    status, body = _story(exporter, "fresh")
    assert (status, set(_verdicts(body).values())) == (200, {"not_yet_settled"})
    status, body = _story(exporter, "no-such-event")
    assert status == 404
    # From the hour after the evaluation (12:00:45) to the oldest bucket a window reaches.
    assert body["searched"] == [at(h, 0, 0).isoformat() for h in (13, 12, 11)]
    # w1, published at 11:56:05, is in the 5m window: only the wanderer received it.
    status, body = _story(exporter, "w1")
    assert (status, _verdicts(body)) == (
        200,
        {SUB: "missed", OTHER: "missed", WANDERER: "received"},
    )
    # A publish time names its hour: one collection read, even one the windows do not reach.
    publish(audit_store, "ancient", at(9, 30, 0), at(9, 30, 0))
    assert _story(exporter, "ancient")[0] == 404
    status, body = _story(exporter, "ancient", f"?publishTime={epoch_ms(at(9, 30, 0))}")
    assert (status, set(_verdicts(body).values())) == (200, {"outside_windows"})


@pytest.mark.parametrize(
    ("path", "status", "error"),
    [
        ("/api/v1/events/bad%20id", 400, "eventID: malformed"),
        ("/api/v1/events/e1%0A", 400, "eventID: malformed"),
        ("/api/v1/events/%D9%A1%D9%A0", 400, "eventID: malformed"),
        ("/api/v1/events/topic%7Ce1", 400, "eventID: malformed"),
        ("/api/v1/events/" + "e" * 129, 400, "eventID: malformed"),
        ("/api/v1/events/e1?publishTime=%D9%A1", 400, "publishTime must be epoch"),
        ("/api/v1/events/e1?publishTime=1e3", 400, "publishTime must be epoch"),
        ("/api/v1/events/e1?publishTime=" + "9" * 20, 400, "publishTime must be epoch"),
        ("/api/v1/events/e1?publishTime=-5", 400, "publishTime must be epoch"),
        ("/api/v1/events/e1?publishTime=" + "9" * 15, 400, "publishTime must be epoch"),
        ("/api/v1/events/e1?publishTime=1795780800000%0A", 400, "publishTime must be epoch"),
        ("/api/v1/events/e1?publishTime=%EF%BC%91795780800000", 400, "publishTime must be"),
        ("/api/v1/events/e1?publishTime=1&publishTime=2", 400, "once"),
        ("/api/v1/events/e1?topic=orders", 400, "unknown query parameter(s): topic"),
        ("/api/v1/events/", 404, "not found"),
    ],
)
def test_a_malformed_lookup_is_a_400(path: str, status: int, error: str) -> None:
    store = MemoryStore()
    _seeded(store)
    exporter = Exporter(store)
    assert exporter.evaluate(at(12, 0, 45))
    resp = exporter.client.get(path)
    assert resp.status_code == status
    assert error in resp.get_json()["error"]


def test_a_lookup_while_the_numbers_are_not_served_is_a_503() -> None:
    exporter = Exporter(MemoryStore())
    assert _story(exporter, "e1")[0] == 503


def test_the_lookup_command_tells_the_story_from_a_running_exporter(store: MongoStore) -> None:
    _seeded(store)
    exporter = Exporter(store)
    assert exporter.evaluate(at(12, 0, 45))
    server = BackgroundServer(exporter.app, f"127.0.0.1:{stack.free_port()}", ServerLimits(4))
    base = f"http://127.0.0.1:{server.port}"
    server.start()
    try:
        out, err = io.StringIO(), io.StringIO()
        assert lookup.main(["e7", "--exporter", base], out, err) == 0
        lines = out.getvalue().splitlines()
        assert lines[0] == "event e7"
        assert lines[1].startswith(f"  published to {TOPIC} at {at(12, 0, 7).isoformat()}")
        assert f"    {SUB}: missed: counted missed: no receipt" in lines
        assert any(line.startswith(f"    {OTHER}: received, 1 deliveries") for line in lines)
        assert lookup.main(["nope", "--exporter", base], out, err) == 1
        assert "404: no publish record of event nope" in err.getvalue()
        assert lookup.main(["bad id", "--exporter", base], out, err) == 2
        # The installed command, as an operator types it.
        done = subprocess.run(
            [sys.executable, "-m", "eventaudit.exporter", "lookup", "e7", "--json",
             "--exporter", base],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["published"][0]["topic"] == TOPIC
    finally:
        server.stop(timeout=5)
    closed = io.StringIO()
    assert lookup.main(["e7", "--exporter", base], io.StringIO(), closed) == 2
    assert "no usable answer from the exporter" in closed.getvalue()


def test_the_verdict_is_what_the_evaluation_counted_not_what_is_stored_since(
    audit_store: AuditStore,
) -> None:
    _seeded(audit_store)
    exporter = Exporter(audit_store)
    assert exporter.evaluate(at(12, 0, 45))
    # After the evaluation: a publish record in a settled bucket, and a dead letter of e7.
    publish(audit_store, "latepub", at(12, 0, 4), at(12, 0, 50))
    letter = Receipt(SUB, "e7", TOPIC, None, "m", at(12, 0, 7), at(12, 0, 7), at(12, 0, 50), 5,
                     "orders-dlq-audit")  # fmt: skip
    audit_store.record_receipts([letter], at(12, 0, 50))
    status, body = _story(exporter, "latepub")
    assert (status, set(_verdicts(body).values())) == (200, {"not_yet_counted"})
    body = _story(exporter, "e7")[1]
    assert _verdicts(body)[SUB] == "missed"  # as the gauge and /api/v1/missed count it
    assert _on(body, SUB)["deadLettered"]["deliveryAttempts"] == 5  # stored since
    fates = {e["eventID"]: e["fate"] for e in exporter.missed(SUB)[1]["events"]}
    assert fates["e7"] == "lost"
    assert exporter.evaluate(at(12, 0, 55))
    assert _verdicts(_story(exporter, "e7")[1])[SUB] == "dead_lettered"
    assert _verdicts(_story(exporter, "latepub")[1])[SUB] == "missed"


def test_a_lookup_in_progress_never_keeps_the_missed_listing_busy() -> None:
    store = MemoryStore()
    _seeded(store)
    exporter = Exporter(store)
    assert exporter.evaluate(at(12, 0, 45))
    deps = exporter.app.config["DEPS"]
    assert deps.lookups.acquire(blocking=False)  # a slow lookup holds the one slot
    try:
        assert _story(exporter, "e7")[0] == 429
        assert exporter.missed(SUB)[0] == 200
    finally:
        deps.lookups.release()
    assert _story(exporter, "e7")[0] == 200
