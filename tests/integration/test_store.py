"""MongoStore's receipt writes against a real FerretDB: large redelivery batches, and a
redelivery whose receipt disappeared before its update."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from eventaudit.records import Receipt
from eventaudit.store import MongoStore, StoreError
from tests.conftest import Ferret

T0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def _receipts(n: int, delivered: datetime) -> list[Receipt]:
    return [
        Receipt("sub-a", f"e{i}", "topic-a", None, f"m{i}", T0, T0, delivered) for i in range(n)
    ]


def test_a_full_batch_of_redeliveries_is_written(private_ferret: Ferret) -> None:
    # FerretDB 1.24 (SQLite) never answers one update command of 100 or more operations, and
    # stays hung for every client: a restarted subscriber's first batch is often all
    # redeliveries, 500 by default.
    store = MongoStore(private_ferret.uri, "eventaudit_test", timeout_seconds=5)
    try:
        store.ensure_indexes()
        store.record_receipts(_receipts(500, T0), T0)
        later = T0 + timedelta(seconds=30)
        store.record_receipts(_receipts(500, later), later)
        docs = list(store.received.find({}, {"deliveries": 1, "lastReceiveTime": 1}))
        assert len(docs) == 500
        assert {d["deliveries"] for d in docs} == {2}
        assert {d["lastReceiveTime"] for d in docs} == {later}
    finally:
        store.close()


class _VanishingReceipts:
    """The receipts collection, but every receipt is deleted right after the insert attempt
    (retention, or an operator, between the insert and the redelivery's update)."""

    def __init__(self, collection: Any) -> None:
        self._collection = collection

    def insert_many(self, docs: Any, **kwargs: Any) -> Any:
        try:
            return self._collection.insert_many(docs, **kwargs)
        finally:
            self._collection.delete_many({})

    def __getattr__(self, name: str) -> Any:
        return getattr(self._collection, name)


def test_a_redelivery_whose_receipt_vanished_is_an_error_not_a_silent_ack(
    store: MongoStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.record_receipts(_receipts(3, T0), T0)
    monkeypatch.setattr(store, "received", _VanishingReceipts(store.received))
    with pytest.raises(StoreError, match="redeliveries not written"):
        store.record_receipts(_receipts(3, T0), T0)  # the caller nacks: Pub/Sub redelivers
