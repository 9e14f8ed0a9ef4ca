"""/api/v1/missed answers exactly what the gauges count, only for what is reported, only while
the numbers are served; driver errors never reach an HTTP body.

Each agreement test runs on FerretDB (MongoStore) and on the in-memory fake, with an explicit
clock: records carry the createdTime and receive time the test gives them.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from flask.testing import FlaskClient
from prometheus_client import CollectorRegistry

from eventaudit.exporter.app import ExporterDeps, create_app
from eventaudit.exporter.buckets import Window
from eventaudit.exporter.collector import CompletionCollector, EvaluationState
from eventaudit.exporter.evaluator import Evaluator
from eventaudit.exporter.loop import EvaluationLoop
from eventaudit.exporter.subscriptions import ExpectedSubscriptions
from eventaudit.records import PublishRecord, Receipt
from eventaudit.store import AuditStore, MongoStore
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

    def __init__(self, store: AuditStore, api_store: AuditStore | None = None) -> None:
        expected = ExpectedSubscriptions({TOPIC: {SUB, OTHER}}, set(), None)
        windows = [Window("1m", timedelta(minutes=1)), Window("5m", timedelta(minutes=5))]
        self.evaluator = Evaluator(store, expected, windows, BUCKET, SETTLE)
        self.state = EvaluationState(settle_seconds=SETTLE.total_seconds())
        self.registry = CollectorRegistry()
        self.registry.register(CompletionCollector(self.state, expected))
        self.store = store
        self.client: FlaskClient = create_app(
            ExporterDeps(api_store or store, self.state, self.registry)
        ).test_client()

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


def test_a_record_stored_during_the_evaluation_answers_503_until_the_next(
    audit_store: AuditStore,
) -> None:
    _seeded(audit_store)
    exporter = Exporter(audit_store)
    assert exporter.evaluate(at(12, 0, 55))
    # Stamped before the evaluation's time but stored after it read the bucket (a batch in
    # flight): the evaluation did not count it, so the API cannot list what the gauge counts.
    receive(audit_store, SUB, "e9", at(12, 0, 9), at(12, 0, 54))
    assert exporter.gauge(SUB) == 3
    status, body = exporter.missed(SUB)
    assert status == 503
    assert body["error"] == (
        "records of this window changed during the last evaluation; retry after the next"
    )
    assert exporter.evaluate(at(12, 1, 5))
    assert exporter.gauge(SUB) == 2
    status, body = exporter.missed(SUB)
    assert (status, body["missed"], _ids(body)) == (200, 2, ["e7", "e8"])


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


def test_store_error_while_listing_is_a_short_503(store: MongoStore) -> None:
    _seeded(store)
    dead = _dead_store()
    exporter = Exporter(store, api_store=dead)
    assert exporter.evaluate(at(12, 0, 45))
    assert exporter.missed(SUB) == (503, {"error": "audit store unavailable", "status": 503})
    assert exporter.client.get("/healthz").status_code == 200
    for body in _bodies(exporter.client):
        assert [leak for leak in LEAKS if leak in body] == []
    dead.close()
