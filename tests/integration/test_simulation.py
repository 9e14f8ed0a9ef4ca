"""The simulation's schedules on MongoStore over a real FerretDB: fewer than in memory (each
step is real I/O), the same rules, faults and oracle (tests/sim). A store fault is a
StoreError raised before the call reaches FerretDB, as a timeout would be."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from hypothesis import settings
from hypothesis.stateful import run_state_machine_as_test

from eventaudit.journal_reader import JournalCollections, JournalReader
from eventaudit.store import MongoStore, StoreError
from tests.conftest import Ferret, unique
from tests.sim.machine import Simulation
from tests.sim.world import World, mongo_records


class FailingStore:
    """A MongoStore whose next `fail_next` calls raise StoreError."""

    def __init__(self, store: MongoStore) -> None:
        self._store = store
        self.fail_next = 0

    def journal_reader(self, monotonic: Callable[[], float]) -> JournalReader:
        """A reader over this wrapper, so the journal's calls fail as injected too (making
        one is no store call)."""
        return JournalReader(cast(JournalCollections, self), monotonic)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if not callable(attr) or name.startswith("_"):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.fail_next:
                self.fail_next -= 1
                raise StoreError(f"injected failure of {name}")
            return attr(*args, **kwargs)

        return call


_STORES: list[MongoStore] = []


def test_the_simulation_on_ferretdb(ferret: Ferret) -> None:
    def ferret_world() -> World:
        for old in _STORES:  # one database per schedule; the previous one is done with
            old.db.client.drop_database(old.database)
            old.close()
        _STORES.clear()
        store = MongoStore(ferret.uri, unique("sim").replace("-", "_"), timeout_seconds=5)
        _STORES.append(store)
        return World(FailingStore(store), mongo_records(store))

    class OnFerretDB(Simulation):
        make_world = staticmethod(ferret_world)

    run_state_machine_as_test(
        OnFerretDB,
        settings=settings(settings.default, max_examples=12, stateful_step_count=25),
    )
    for old in _STORES:
        old.close()


def test_writers_racing_the_exporters_takes_never_cause_a_false_miss(store: MongoStore) -> None:
    # Issue 17, case 9, on the real store: publishers and a subscriber write while the
    # exporter takes the journal as fast as it can (FerretDB renames a collection an insert
    # may have looked up already). Every receipt acked before an evaluation starts is counted
    # by it, and once quiet the numbers are the oracle's.
    import threading
    import time
    from datetime import UTC, datetime, timedelta

    from eventaudit.exporter.buckets import Window
    from eventaudit.exporter.evaluator import Evaluator
    from eventaudit.exporter.snapshot import list_missed
    from eventaudit.exporter.subscriptions import ExpectedSubscriptions
    from eventaudit.records import PublishRecord, Receipt
    from tests.sim.oracle import recount

    topic, sub = "orders", "orders-billing"
    window = Window("5m", timedelta(minutes=5))
    expected = ExpectedSubscriptions({topic: {sub}}, set(), None)
    evaluator = Evaluator(store, expected, [window], timedelta(seconds=10), timedelta(seconds=30))
    acked: dict[str, float] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def write() -> None:
        i = 0
        while not stop.is_set():
            now = datetime.now(UTC).replace(microsecond=0)
            ids = [f"e{i + k}" for k in range(5)]
            i += 5
            store.insert_publish_records(
                [PublishRecord(e, "t" * 32, topic, "{}", f"m{e}", now) for e in ids], now
            )
            store.record_receipts(
                [Receipt(sub, e, topic, None, f"m{e}", now, now, now) for e in ids[:4]], now
            )
            with lock:
                done = time.monotonic()
                acked.update(dict.fromkeys(ids[:4], done))

    writer = threading.Thread(target=write)
    writer.start()
    false: list[str] = []
    passes = 0
    try:
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            started = time.monotonic()
            with lock:
                before = {e for e, t in acked.items() if t < started}
            snapshot = evaluator.evaluate(datetime.now(UTC) + timedelta(seconds=45))
            passes += 1
            listed = list_missed(snapshot, store, topic, sub, window, 100_000) or []
            false += [e.event_id for e in listed if e.event_id in before]
    finally:
        stop.set()
        writer.join()
    assert passes > 5 and len(acked) > 100
    assert false == []
    snapshot = evaluator.evaluate(datetime.now(UTC) + timedelta(seconds=45))
    truth = recount(
        store.published.find(),
        store.received.find(),
        [],
        {topic: [sub]},
        snapshot.frontier - window.length,
        snapshot.frontier,
    )[(topic, sub)]
    stats = snapshot.subscriptions[(topic, sub)]["5m"]
    assert (stats.published, stats.received, stats.duplicates) == (
        truth.published,
        truth.received,
        truth.duplicates,
    )
    assert truth.received == len(acked)
