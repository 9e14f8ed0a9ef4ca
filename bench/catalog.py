"""Catalog operations per second the audit store causes, by number of topics (FerretDB here;
on MongoDB each is a catalog write, and on a sharded cluster a serialized DDL operation).

    python -m bench.catalog                  # 10, 100 and 1,000 topics
    python -m bench.catalog --topics 10,100  # some of them

Writers publish one event per topic per 10 s bucket, received on one subscription; one
exporter (with leases, as deployed) evaluates every 10 s of a virtual clock, past the journal's
drop grace, so every kind of catalog operation is in its steady state. Counted by pymongo's
command monitoring: collection creates (explicit, or implicit by the first insert into a
name), renames, drops and index creations; per virtual second over the measured passes. The
baseline in the same run is the smallest topic count: the ratio shows growth in topics.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pymongo import monitoring

from eventaudit.exporter.buckets import Window
from eventaudit.exporter.evaluator import Evaluator
from eventaudit.exporter.leases import Leases
from eventaudit.exporter.subscriptions import ExpectedSubscriptions
from eventaudit.records import PublishRecord, Receipt
from eventaudit.store import MongoStore
from tools import stack

BUCKET = timedelta(seconds=10)
WARM_PASSES = 14
"""Passes before counting: past the journal's drop grace (120 s), so drops are steady too."""


class CatalogCounter(monitoring.CommandListener):
    """Counts catalog operations of the commands pymongo sends."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.existing: set[str] = set()

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        name, cmd = event.command_name, event.command
        if name == "insert":
            target = f"{event.database_name}.{cmd['insert']}"
            if target not in self.existing:
                self.existing.add(target)
                self.counts["create"] += 1
        elif name == "create":
            self.existing.add(f"{event.database_name}.{cmd['create']}")
            self.counts["create"] += 1
        elif name == "renameCollection":
            self.existing.discard(cmd["renameCollection"])
            self.existing.add(cmd["to"])
            self.counts["rename"] += 1
        elif name == "drop":
            self.existing.discard(f"{event.database_name}.{cmd['drop']}")
            self.counts["drop"] += 1
        elif name == "createIndexes":
            self.counts["index"] += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def run(uri: str, topics: int, passes: int, counter: CatalogCounter) -> dict[str, float]:
    """Catalog operations per virtual second, by kind, with `topics` topics."""
    store = MongoStore(uri, f"bench_catalog_{topics}_{uuid.uuid4().hex[:6]}", timeout_seconds=60)
    names = [f"catalog-{i:04d}" for i in range(topics)]
    start = datetime.now(UTC).replace(microsecond=0)
    now = [start - timedelta(seconds=start.second % 10)]
    first = now[0].timestamp()
    expected = ExpectedSubscriptions({t: {f"{t}-a"} for t in names}, set(), None)
    leases = Leases(
        store, "r0", timedelta(seconds=60), lambda: now[0], lambda: now[0].timestamp() - first
    )
    evaluator = Evaluator(
        store,
        expected,
        [Window.parse(w, BUCKET) for w in ("1m", "5m", "1h")],
        BUCKET,
        timedelta(seconds=30),
        monotonic=lambda: now[0].timestamp() - first,
        leases=leases,
    )
    before: Counter[str] = Counter()
    for k in range(WARM_PASSES + passes):
        if k == WARM_PASSES:
            before = Counter(counter.counts)
        now[0] += BUCKET
        when = now[0] - timedelta(seconds=5)
        records = [PublishRecord(f"{t}-{k}", "t" * 32, t, "{}", str(k), when) for t in names]
        store.insert_publish_records(records, when)
        receipts = [
            Receipt(f"{r.topic}-a", r.event_id, r.topic, None, "m", when, when, when)
            for r in records
        ]
        store.record_receipts(receipts, when)
        snapshot = evaluator.evaluate(now[0])
    received = sum(
        snapshot.subscriptions[(t, f"{t}-a")]["1m"].received for t in names
    )  # every topic's events are folded: the exporter kept up
    assert received == 6 * topics, (received, topics)
    store.close()
    seconds = passes * BUCKET.total_seconds()
    counted = Counter(counter.counts)
    counted.subtract(before)
    return {kind: n / seconds for kind, n in counted.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--topics", default="10,100,1000", help="topic counts, comma-separated")
    parser.add_argument("--passes", type=int, default=6, help="passes measured (10 s each)")
    args = parser.parse_args()
    counter = CatalogCounter()
    monitoring.register(counter)
    tmp = Path(tempfile.mkdtemp(prefix="eventaudit-catalog-"))
    port = stack.free_port()
    ferret = stack.ferretdb(port, tmp / "ferret", tmp).start()
    try:
        uri = f"mongodb://127.0.0.1:{port}/"
        baseline = None
        for topics in (int(x) for x in args.topics.split(",")):
            rates = run(uri, topics, args.passes, counter)
            total = sum(rates.values())
            baseline = baseline or total
            kinds = ", ".join(f"{k} {v:.2f}" for k, v in sorted(rates.items()) if v)
            print(
                f"catalog {topics:>5} topics: {total:.2f} operations/s ({kinds}); "
                f"ratio to {args.topics.split(',')[0]} topics {total / baseline:.2f}",
                flush=True,
            )
    finally:
        ferret.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
