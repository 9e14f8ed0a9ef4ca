"""The evaluation loop survives anything, and frozen numbers never look fresh (MemoryStore)."""

from __future__ import annotations

import math
import threading
from collections.abc import Collection, Iterable
from datetime import UTC, datetime, timedelta

import pytest
from flask.testing import FlaskClient
from prometheus_client import CollectorRegistry

from eventaudit.exporter import loop as loop_module
from eventaudit.exporter.app import ExporterDeps, create_app
from eventaudit.exporter.buckets import Window
from eventaudit.exporter.collector import CompletionCollector, EvaluationState
from eventaudit.exporter.evaluator import Evaluator
from eventaudit.exporter.loop import EvaluationLoop
from eventaudit.exporter.snapshot import Snapshot
from eventaudit.exporter.subscriptions import ExpectedSubscriptions
from eventaudit.journal import BucketDigest
from eventaudit.records import PublishRecord, Receipt
from eventaudit.store import StoreError
from tests.fakes import MemoryStore

NOW = datetime(2026, 11, 27, 12, 0, 35, tzinfo=UTC)
BUCKET = timedelta(seconds=10)
TOPIC, SUB = "orders", "orders-audit"
# What a driver error looks like: hosts and topology must never reach an HTTP body.
HOST_ERROR = (
    "could not read PublishRecord: db-7.prod.internal:27017: [Errno 111] Connection refused, "
    "Timeout: 5.0s, Topology Description: <TopologyDescription id: 6650, topology_type: "
    "Unknown, servers: [<ServerDescription ('db-7.prod.internal', 27017) server_type: Unknown>]>"
)
OUT_OF_RANGE = "date value out of range"
SECRETS = ("prod.internal", "27017", "Topology", "Errno")


class FaultyStore(MemoryStore):
    """A MemoryStore whose named operations raise the queued exceptions, one per call."""

    def __init__(self) -> None:
        super().__init__()
        self.faults: dict[str, list[Exception]] = {}

    def _fault(self, operation: str) -> None:
        queued = self.faults.get(operation)
        if queued:
            raise queued.pop(0)

    def take_journal(self, now: datetime, keys: Collection[str] | None = None) -> list[str]:
        self._fault("take_journal")
        return super().take_journal(now, keys)

    def delete_older_than(self, cutoff: datetime) -> dict[str, int]:
        self._fault("delete_older_than")
        return super().delete_older_than(cutoff)

    def load_digest(self, topic: str, start: datetime) -> BucketDigest:
        self._fault("load_digest")
        return super().load_digest(topic, start)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Exporter:
    """An evaluator, its loop and the HTTP app over one store, with an explicit clock."""

    def __init__(
        self,
        store: MemoryStore,
        interval: timedelta = BUCKET,
        retention: timedelta = timedelta(days=1),
    ) -> None:
        self.store = store
        self.monotonic = Clock()
        expected = ExpectedSubscriptions({TOPIC: {SUB}}, set(), None)
        evaluator = Evaluator(
            store, expected, [Window("1m", timedelta(minutes=1))], BUCKET, timedelta(seconds=30)
        )
        self.state = EvaluationState(settle_seconds=30, clock=self.monotonic)
        self.registry = CollectorRegistry()
        self.registry.register(CompletionCollector(self.state, expected))
        self.loop = EvaluationLoop(
            evaluator,
            self.state,
            store,
            interval,
            retention,
            clock=lambda: NOW,
            monotonic=self.monotonic,
        )
        self.client: FlaskClient = create_app(
            ExporterDeps(store, self.state, self.registry)
        ).test_client()

    def run_once(self) -> bool:
        """One pass, and the retention it started (on its own thread) finished."""
        ok = self.loop.run_once()
        self.loop.join_retention(timeout=10)
        return ok

    def sample(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)

    def bodies(self) -> Iterable[str]:
        for path in (
            "/healthz",
            "/",
            "/metrics",
            f"/api/v1/missed?topic={TOPIC}&subscription={SUB}",
        ):
            yield self.client.get(path).get_data(as_text=True)


def _seeded() -> FaultyStore:
    """`old`, published two days ago and evaluated then (retention deletes its bucket), and
    `e1`, published 50 s ago, not yet evaluated."""
    store = FaultyStore()
    old = NOW - timedelta(days=2)
    store.insert_publish_records([PublishRecord("old", "t" * 32, TOPIC, "{}", "m", old)], old)
    expected = ExpectedSubscriptions({TOPIC: {SUB}}, set(), None)
    then = Evaluator(store, expected, [Window("1m", timedelta(minutes=1))], BUCKET, BUCKET)
    then.evaluate(old + timedelta(seconds=30))
    when = NOW - timedelta(seconds=50)
    store.insert_publish_records([PublishRecord("e1", "t" * 32, TOPIC, "{}", "m", when)], when)
    return store


def _fail_logging(monkeypatch: pytest.MonkeyPatch, exc: Exception) -> None:
    real = loop_module.log_snapshot
    calls: list[int] = []

    def flaky(snapshot: Snapshot) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise exc
        real(snapshot)

    monkeypatch.setattr(loop_module, "log_snapshot", flaky)


@pytest.mark.parametrize(
    ("where", "exc", "reason"),
    [
        ("take_journal", StoreError(HOST_ERROR), "evaluation failed: audit store unavailable"),
        ("take_journal", RuntimeError(HOST_ERROR), "evaluation failed: internal error"),
        ("take_journal", OverflowError(OUT_OF_RANGE), "evaluation failed: internal error"),
        ("log", ValueError(HOST_ERROR), "logging failed: internal error"),
    ],
)  # fmt: skip
def test_any_failure_is_counted_served_as_down_and_the_next_run_recovers(
    monkeypatch: pytest.MonkeyPatch, where: str, exc: Exception, reason: str
) -> None:
    store = _seeded()
    if where == "log":
        _fail_logging(monkeypatch, exc)
    else:
        store.faults[where] = [exc]
    exporter = Exporter(store)
    labels = {"topic": TOPIC, "subscription": SUB, "window": "1m"}

    assert exporter.run_once() is False
    assert exporter.sample("eventaudit_up") == 0
    assert exporter.sample("eventaudit_evaluations_total", outcome="error") == 1
    assert exporter.sample("eventaudit_evaluations_total", outcome="success") == 0
    assert exporter.sample("eventaudit_completion_rate", **labels) is None
    health = exporter.client.get("/healthz")
    assert health.status_code == 503
    assert health.get_json() == {"error": reason, "status": 503, "up": 0}
    missed = exporter.client.get(f"/api/v1/missed?topic={TOPIC}&subscription={SUB}")
    assert (missed.status_code, missed.get_json()["error"]) == (503, reason)
    for body in exporter.bodies():
        assert not [s for s in SECRETS if s in body]

    assert exporter.run_once() is True
    assert exporter.sample("eventaudit_up") == 1
    assert exporter.sample("eventaudit_evaluations_total", outcome="success") == 1
    assert exporter.sample("eventaudit_evaluations_total", outcome="error") == 1
    assert exporter.sample("eventaudit_completion_rate", **labels) == 0.0
    assert exporter.sample("eventaudit_missed_events", **labels) == 1
    assert exporter.client.get("/healthz").status_code == 200
    # Retention is not held back by a failed evaluation: the 2-day-old record is gone.
    assert [d["eventID"] for d in store.published.values()] == ["e1"]
    assert exporter.sample("eventaudit_retention_runs_total", outcome="success") == 1


def test_the_loop_thread_survives_an_escaping_exception(monkeypatch: pytest.MonkeyPatch) -> None:
    exporter = Exporter(_seeded(), interval=timedelta(milliseconds=10))
    calls: list[int] = []

    def run_once() -> bool:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError(HOST_ERROR)
        exporter.loop.stop()
        return True

    monkeypatch.setattr(exporter.loop, "run_once", run_once)
    exporter.loop.run()
    assert len(calls) == 2
    assert exporter.sample("eventaudit_evaluations_total", outcome="error") == 1


class _ThreadKiller(BaseException):
    """Something no handler in the loop catches."""


def test_a_dead_loop_thread_is_reported_down(monkeypatch: pytest.MonkeyPatch) -> None:
    exporter = Exporter(_seeded())
    assert exporter.run_once()
    assert exporter.sample("eventaudit_up") == 1

    def die() -> bool:
        raise _ThreadKiller

    monkeypatch.setattr(exporter.loop, "run_once", die)
    with pytest.raises(_ThreadKiller):
        exporter.loop.run()
    assert exporter.sample("eventaudit_up") == 0
    assert (
        exporter.sample("eventaudit_completion_rate", topic=TOPIC, subscription=SUB, window="1m")
        is None
    )
    health = exporter.client.get("/healthz")
    assert (health.status_code, health.get_json()["error"]) == (503, "evaluation loop stopped")


def test_stop_reports_the_loop_down() -> None:
    exporter = Exporter(_seeded())
    exporter.loop.start()
    exporter.loop.stop()
    assert not any(t.name == "evaluation-loop" and t.is_alive() for t in threading.enumerate())
    assert exporter.state.current().reason == "evaluation loop stopped"


@pytest.mark.parametrize(
    ("interval", "fresh_for"),
    [(timedelta(seconds=1), 60.0), (timedelta(seconds=10), 60.0), (timedelta(minutes=1), 180.0)],
)
def test_numbers_go_stale_when_no_evaluation_succeeds(
    interval: timedelta, fresh_for: float
) -> None:
    exporter = Exporter(_seeded(), interval=interval)
    exporter.monotonic.now = 1000.0
    assert exporter.run_once()

    exporter.monotonic.now = 1000.0 + fresh_for
    assert exporter.sample("eventaudit_up") == 1
    assert exporter.client.get("/healthz").status_code == 200

    exporter.monotonic.now = 1000.0 + fresh_for + 1
    assert exporter.sample("eventaudit_up") == 0
    assert (
        exporter.sample("eventaudit_missed_events", topic=TOPIC, subscription=SUB, window="1m")
        is None
    )
    health = exporter.client.get("/healthz")
    assert health.status_code == 503
    assert health.get_json()["error"] == f"no successful evaluation for {fresh_for + 1:.0f}s"
    assert (
        exporter.client.get(f"/api/v1/missed?topic={TOPIC}&subscription={SUB}").status_code == 503
    )

    assert exporter.run_once()
    assert exporter.sample("eventaudit_up") == 1


def test_retention_reaches_records_by_write_time() -> None:
    store = FaultyStore()
    far = [datetime(2100, 1, 1, tzinfo=UTC), datetime(9999, 12, 31, tzinfo=UTC)]
    for age, prefix in ((timedelta(days=8), "stale"), (timedelta(hours=1), "kept")):
        written = NOW - age
        for i, when in enumerate(far):
            event = f"{prefix}-{i}"
            store.insert_publish_records(
                [PublishRecord(event, "t" * 32, TOPIC, "{}", "m", when)], written
            )
            store.record_receipts(
                [Receipt(SUB, event, TOPIC, None, "m", when, written, written)], written
            )
    exporter = Exporter(store, retention=timedelta(days=7))
    assert exporter.run_once()
    assert sorted(d["eventID"] for d in store.published.values()) == ["kept-0", "kept-1"]
    assert sorted(d["eventID"] for d in store.received.values()) == ["kept-0", "kept-1"]


def test_buckets_no_window_reaches_stay_until_retention_reaches_them() -> None:
    # Digests and results are pruned by retention only, never by one exporter's windows: an
    # exporter with shorter windows on the same database (issue 17, case 15) or a clock stepped
    # ahead (case 4) must not delete what another exporter's longer window still sums.
    store = _seeded()  # `old` was evaluated two days ago: its digest and result are stored
    assert len(store.buckets) == len(store.digests) == 1
    exporter = Exporter(store, retention=timedelta(days=7))  # retention does not reach it
    assert exporter.run_once()
    assert sorted(r.start for r in store.buckets.values()) == [
        datetime(2026, 11, 25, 12, 0, 30, tzinfo=UTC),
        datetime(2026, 11, 27, 11, 59, 40, tzinfo=UTC),
    ]
    assert len(store.digests) == 2  # old's and e1's
    assert [d["eventID"] for d in store.published.values()] == ["old", "e1"]
    exporter = Exporter(store, retention=timedelta(days=1))  # retention reaches it
    assert exporter.run_once()
    exporter.loop.join_retention()
    assert [r.start for r in store.buckets.values()] == [
        datetime(2026, 11, 27, 11, 59, 40, tzinfo=UTC)
    ]
    assert len(store.digests) == 1
    assert [d["eventID"] for d in store.published.values()] == ["e1"]


def _retention_runs(exporter: Exporter) -> tuple[float | None, float | None]:
    return (
        exporter.sample("eventaudit_retention_runs_total", outcome="success"),
        exporter.sample("eventaudit_retention_runs_total", outcome="error"),
    )


@pytest.mark.parametrize(
    "exc", [StoreError(HOST_ERROR), OverflowError(OUT_OF_RANGE), RuntimeError(HOST_ERROR)]
)
def test_a_failed_retention_is_counted_apart_and_leaves_the_numbers_up(exc: Exception) -> None:
    store = _seeded()
    store.faults["delete_older_than"] = [exc]
    exporter = Exporter(store)
    exporter.monotonic.now = 1000.0

    assert exporter.run_once() is True
    assert exporter.sample("eventaudit_up") == 1
    assert exporter.sample("eventaudit_evaluations_total", outcome="success") == 1
    assert exporter.sample("eventaudit_evaluations_total", outcome="error") == 0
    assert _retention_runs(exporter) == (0, 1)
    assert math.isnan(exporter.sample("eventaudit_last_retention_timestamp_seconds") or 0.0)
    assert exporter.client.get("/healthz").get_json()["status"] == "ok"
    missed = exporter.client.get(f"/api/v1/missed?topic={TOPIC}&subscription={SUB}")
    assert (missed.status_code, missed.get_json()["missed"]) == (200, 1)
    for body in exporter.bodies():
        assert not [s for s in SECRETS if s in body]
    assert sorted(d["eventID"] for d in store.published.values()) == ["e1", "old"]

    # Retried after the backoff (two intervals after one failure), not on the next pass.
    exporter.monotonic.now = 1010.0
    assert exporter.run_once()
    assert _retention_runs(exporter) == (0, 1)
    exporter.monotonic.now = 1020.0
    assert exporter.run_once()
    assert _retention_runs(exporter) == (1, 1)
    assert exporter.sample("eventaudit_last_retention_timestamp_seconds") == NOW.timestamp()
    assert [d["eventID"] for d in store.published.values()] == ["e1"]


def test_a_retention_that_keeps_failing_backs_off_up_to_an_hour() -> None:
    store = _seeded()
    store.faults["delete_older_than"] = [StoreError(HOST_ERROR) for _ in range(100)]
    exporter = Exporter(store)
    attempts: list[float] = []
    for i in range(5):
        exporter.monotonic.now = 1000.0 + 10 * i
        before = len(store.faults["delete_older_than"])
        assert exporter.run_once() is True
        if len(store.faults["delete_older_than"]) < before:
            attempts.append(exporter.monotonic.now)
        assert exporter.sample("eventaudit_up") == 1
    # Five passes, two attempts: at the first pass, then two intervals later.
    assert attempts == [1000.0, 1020.0]
    assert _retention_runs(exporter) == (0, 2)
    assert exporter.sample("eventaudit_evaluations_total", outcome="error") == 0

    # Each failure doubles the wait from twice the interval, capped at an hour.
    waits = []
    now = 1020.0
    for _ in range(10):
        left = len(store.faults["delete_older_than"])
        while len(store.faults["delete_older_than"]) == left:
            now += 10
            exporter.monotonic.now = now
            exporter.run_once()
        waits.append(now - attempts[-1])
        attempts.append(now)
    assert waits == [40, 80, 160, 320, 640, 1280, 2560, 3600, 3600, 3600]
    assert exporter.sample("eventaudit_up") == 1


def test_a_successful_retention_runs_again_an_hour_later() -> None:
    store = _seeded()
    exporter = Exporter(store)
    exporter.monotonic.now = 1000.0
    assert exporter.run_once()
    assert _retention_runs(exporter) == (1, 0)
    exporter.monotonic.now = 1000.0 + 3599
    assert exporter.run_once()
    assert _retention_runs(exporter) == (1, 0)
    exporter.monotonic.now = 1000.0 + 3600
    assert exporter.run_once()
    assert _retention_runs(exporter) == (2, 0)


def test_a_slow_retention_never_holds_the_evaluations_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = _seeded()
    release = threading.Event()
    started: list[datetime] = []
    real = store.delete_older_than

    def slow(cutoff: datetime) -> dict[str, int]:
        started.append(cutoff)
        assert release.wait(timeout=30)  # a delete reading a large collection on FerretDB
        return real(cutoff)

    monkeypatch.setattr(store, "delete_older_than", slow)
    exporter = Exporter(store)
    try:
        for i in range(3):
            exporter.monotonic.now = 1000.0 + 3600.0 * i  # retention due at every pass
            assert exporter.loop.run_once() is True
            assert exporter.sample("eventaudit_up") == 1
        assert len(started) == 1  # one at a time
        assert _retention_runs(exporter) == (0, 0)
    finally:
        release.set()
        exporter.loop.join_retention(timeout=10)
    assert _retention_runs(exporter) == (1, 0)
