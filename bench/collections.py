"""How many collections the default stack's store holds over 24 hours of simulated time, and
whether the count levels off once retention runs.

    python -m bench.collections                      # 24 h, retention 6 h, a pass every 10 s
    python -m bench.collections --retention-hours 3 --hours 12

One throwaway FerretDB (SQLite) and one store. A virtual clock advances in steps; at each
step the writers record a few events of the demo's topic (`create-user`, received on
`create-user-audit` and on `create-user-lossy`, which drops 1 in 50) through
`insert_publish_records` and `record_receipts`, with the step's time as their clock, then one
exporter pass runs as the exporter runs it: `EvaluationLoop.run_once` (an evaluation with topic
leases, then retention when due: hourly, cutoff `trusted_now - retention`), every clock of the
exporter following the virtual one. The count of collections depends on time, not volume, so a
few events per step suffice. The step is the exporter's own cadence, one bucket (10 s): at
coarser steps its 30 s topic lease would lapse between passes and be claimed anew each time,
which is not what the default stack does. A run takes about 6 minutes on 2 cores. The
default stack keeps 7 days (`--retention 7d`); the run keeps `--retention-hours` (6 by
default) so that retention drops something within the 24 hours.

Prints, every simulated hour, the collections (`list_collection_names`) by family, and the
fewest and most seen within the hour (counted every simulated minute); then the growth per
hour before retention first dropped anything, and a summary: the count at hours 6, 12, 18 and
24, and whether the last 6 hours are level (their counts on the hour, and their peaks, within
±`--tolerance` of each other).
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import tempfile
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

from eventaudit.exporter.buckets import Window
from eventaudit.exporter.collector import EvaluationState
from eventaudit.exporter.evaluator import Evaluator
from eventaudit.exporter.leases import Leases
from eventaudit.exporter.loop import RETENTION_EVERY_SECONDS, EvaluationLoop
from eventaudit.exporter.subscriptions import ExpectedSubscriptions
from eventaudit.records import PublishRecord, Receipt
from eventaudit.store import MongoStore
from tools import stack

TOPIC = "create-user"
AUDIT, LOSSY = "create-user-audit", "create-user-lossy"
DEAD_LETTER_SUBSCRIPTION = "create-user-dead-letters"
BUCKET = timedelta(seconds=10)
SETTLE = timedelta(seconds=30)
WINDOWS = ("1m", "5m", "1h")
LEASE_SECONDS = 30.0
"""The exporter's default `--lease-seconds`."""
DEFAULT_RETENTION = "7d"
LOSSY_EVERY = 50
"""The lossy subscriber drops 1 event in this many (2 %, as `make run`'s)."""
FAMILIES = (
    "PublishRecord_",
    "ReceivedRecord_",
    "DeadLetterRecord_",
    "EventJournal",
    "BucketDigest_",
    "BucketResult_",
    "ExporterLease_",
    "ExporterState",
)
LABELS = {"EventJournal": "EventJournal*"}
SUMMARY_HOURS = (6, 12, 18, 24)


class VirtualClock:
    """The simulated wall clock, and a monotonic clock that follows it."""

    def __init__(self, start: datetime) -> None:
        self.now = start
        self._origin = start

    def wall(self) -> datetime:
        return self.now

    def monotonic(self) -> float:
        return (self.now - self._origin).total_seconds()


class RecordingStore(MongoStore):
    """A MongoStore that remembers every retention run: the virtual time it ran at, its
    cutoff, and how many collections it dropped per family."""

    def __init__(self, uri: str, database: str, clock: VirtualClock) -> None:
        super().__init__(uri, database, timeout_seconds=60)
        self._virtual = clock
        self.retentions: list[tuple[datetime, datetime, dict[str, int]]] = []

    def delete_older_than(self, cutoff: datetime) -> dict[str, int]:
        dropped = super().delete_older_than(cutoff)
        self.retentions.append((self._virtual.now, cutoff, dropped))
        return dropped


def family(name: str) -> str:
    """The family prefix of a collection name ("other" for none of them)."""
    return next((f for f in FAMILIES if name.startswith(f)), "other")


def census(store: MongoStore) -> Counter[str]:
    """Collections per family, right now."""
    return Counter(family(n) for n in store.db.list_collection_names())


def describe(counts: Counter[str]) -> str:
    """`family n, ...` in FAMILIES order (and any other names)."""
    parts = [f"{LABELS.get(f, f)} {counts[f]}" for f in FAMILIES]
    if counts["other"]:
        parts.append(f"other {counts['other']}")
    return ", ".join(parts)


def write_step(
    store: MongoStore, now: datetime, step: timedelta, events: int, k: int, dead_letters: bool
) -> None:
    """`events` events published evenly over the step before `now`, received 50 ms later on
    the audit subscription, on the lossy one but 1 in LOSSY_EVERY (dead-lettered instead with
    `dead_letters`), all written with `now` as the writers' clock."""
    times = [now - step + step * i / events for i in range(events)]
    times = [t.replace(microsecond=t.microsecond // 1000 * 1000) for t in times]
    ids = [f"e{k}-{i}" for i in range(events)]
    store.insert_publish_records(
        [PublishRecord(e, "t" * 32, TOPIC, "{}", e, t) for e, t in zip(ids, times, strict=True)],
        now,
    )
    for sub in (AUDIT, LOSSY):
        receipts = []
        for n, (e, t) in enumerate(zip(ids, times, strict=True)):
            received = t + timedelta(milliseconds=50)
            if sub == LOSSY and (k * events + n) % LOSSY_EVERY == 0:
                if not dead_letters:
                    continue
                receipts.append(
                    Receipt(sub, e, TOPIC, None, e, t, t, received, 5, DEAD_LETTER_SUBSCRIPTION)
                )
            else:
                receipts.append(Receipt(sub, e, TOPIC, None, e, t, t, received))
        store.record_receipts(receipts, now)


def loop_for(
    store: MongoStore, clock: VirtualClock, retention: timedelta
) -> tuple[EvaluationLoop, EvaluationState]:
    """One exporter as `eventaudit-exporter` builds it with its defaults (topic leases, the
    demo's topic and subscriptions configured instead of listed), on the virtual clock."""
    expected = ExpectedSubscriptions({TOPIC: {AUDIT, LOSSY}}, set(), None)
    leases = Leases(
        store, "bench-r0", timedelta(seconds=LEASE_SECONDS), clock.wall, clock.monotonic
    )
    evaluator = Evaluator(
        store,
        expected,
        [Window.parse(w, BUCKET) for w in WINDOWS],
        BUCKET,
        SETTLE,
        monotonic=clock.monotonic,
        leases=leases,
    )
    state = EvaluationState(settle_seconds=SETTLE.total_seconds())
    loop = EvaluationLoop(
        evaluator, state, store, BUCKET, retention, clock=clock.wall, monotonic=clock.monotonic
    )
    return loop, state


def run(uri: str, args: argparse.Namespace) -> None:
    step = BUCKET
    retention = timedelta(hours=args.retention_hours)
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    clock = VirtualClock(start)
    store = RecordingStore(uri, f"bench_collections_{uuid.uuid4().hex[:6]}", clock)
    store.ping()
    loop, state = loop_for(store, clock, retention)
    per_hour = round(timedelta(hours=1) / step)
    per_minute = round(timedelta(minutes=1) / step)
    print(
        f"collections: {args.hours} h simulated from {start:%Y-%m-%d %H:%M} UTC, one exporter "
        f"pass every {step.total_seconds():g} simulated s ({per_hour * args.hours} passes), "
        f"{args.events} events per step on {TOPIC} ({AUDIT}, {LOSSY}), dead letters "
        f"{'on' if args.dead_letters else 'off'}; retention {args.retention_hours:g} h, applied "
        f"every {RETENTION_EVERY_SECONDS / 3600:g} h as the exporter's loop does (the default "
        f"stack keeps {DEFAULT_RETENTION}); collections counted every simulated minute",
        flush=True,
    )
    hourly: dict[int, Counter[str]] = {}
    ranges: dict[int, tuple[int, int]] = {}
    """Per hour, the fewest and most collections of the minutes sampled in it."""
    passes: list[float] = []
    started = time.perf_counter()
    seen: list[int] = []
    for k in range(1, per_hour * args.hours + 1):
        clock.now = start + step * k
        write_step(store, clock.now, step, args.events, k, args.dead_letters)
        began = time.perf_counter()
        ok = loop.run_once()
        loop.join_retention(timeout=300)
        passes.append(time.perf_counter() - began)
        if not ok:
            raise SystemExit(f"evaluation failed at {clock.now}: {state.error}")
        if state.retention_failures:
            raise SystemExit(f"retention failed at {clock.now}")
        if k % per_minute == 0:
            seen.append(sum(census(store).values()))
        if k % per_hour == 0:
            hour = k // per_hour
            counts = census(store)
            seen.append(sum(counts.values()))
            hourly[hour], ranges[hour] = counts, (min(seen), max(seen))
            seen = []
            dropped: Counter[str] = Counter()
            for at, _, d in store.retentions:
                if clock.now - timedelta(hours=1) < at <= clock.now:
                    dropped.update(d)
            note = (
                "; retention dropped "
                + ", ".join(f"{f}_ {n}" for f, n in dropped.items() if n)  # prefixes
                if any(dropped.values())
                else ""
            )
            lo, hi = ranges[hour]
            wall = time.perf_counter() - started
            median = statistics.median(passes[-per_hour:]) * 1000
            print(
                f"hour {hour:>2}: {sum(counts.values()):>4} collections (each minute of the hour "
                f"{lo:>4} to {hi:>4}): {describe(counts)}{note}  [{wall:.0f} s, pass median "
                f"{median:.0f} ms]",
                flush=True,
            )
    elapsed = time.perf_counter() - started
    store.close()
    report(store, hourly, ranges, args, elapsed, start)


def report(
    store: RecordingStore,
    hourly: dict[int, Counter[str]],
    ranges: dict[int, tuple[int, int]],
    args: argparse.Namespace,
    elapsed: float,
    start: datetime,
) -> None:
    """Growth before retention dropped anything, the default retention's extrapolation and
    the summary line."""
    first = next(
        (at for at, _, dropped in store.retentions if any(dropped.values())), None
    )  # retention runs from the first pass, but drops nothing until the cutoff passes an hour
    # The last hourly count taken before that (retention runs within a pass, before the count).
    until = max(hourly) if first is None else math.ceil((first - start) / timedelta(hours=1)) - 1
    until = max(1, min(until, max(hourly)))
    rates = {}
    for f in (*FAMILIES, "other"):
        a, b = hourly[1][f], hourly[until][f]
        rates[f] = (b - a) / (until - 1) if until > 1 else float(b)
    totals = {h: sum(c.values()) for h, c in hourly.items()}
    steps = ", ".join(f"{totals[h] - totals[h - 1]:+d}" for h in range(2, until + 1))
    when = (
        f"first dropped something at +{(first - start) / timedelta(hours=1):.3f} h"
        if first is not None
        else "never dropped anything"
    )
    print(
        f"growth before retention dropped anything (hours 1 to {until}; retention {when}): "
        f"{sum(rates.values()):+.1f} collections/h ({steps}): "
        + ", ".join(f"{LABELS.get(f, f)} {rates[f]:+.1f}" for f in FAMILIES)
        + (f", other {rates['other']:+.1f}" if rates["other"] else ""),
        flush=True,
    )
    last = hourly[max(hourly)]
    growing = [f for f in (*FAMILIES, "other") if rates[f] > 0]
    default_hours = 7 * 24
    projected = sum(
        last[f] + rates[f] * (default_hours - args.retention_hours) for f in growing
    ) + sum(last[f] for f in (*FAMILIES, "other") if f not in growing)
    day = totals[1] + sum(rates.values()) * 23
    print(
        f"the default stack keeps {DEFAULT_RETENTION}, so its retention drops nothing in the "
        f"first week: at this growth about {day:.0f} collections at hour 24; if the families "
        f"that grew ({', '.join(LABELS.get(f, f) for f in growing)}) level off as they do here, "
        f"about {projected:.0f} from hour {default_hours} on (extrapolated, not simulated)",
        flush=True,
    )
    # Judged on the last 6 hours, of those counted after retention first dropped something.
    judged = [h for h in sorted(totals) if h > until][-6:]
    shown = [h for h in SUMMARY_HOURS if h in totals] or [max(totals)]
    at = ", ".join(f"hour {h} {totals[h]}" for h in shown)
    if len(judged) < 2:
        verdict = "too short to judge: fewer than 2 hours counted after retention dropped"
    else:
        tail = [totals[h] for h in judged]
        peaks = [ranges[h][1] for h in judged]
        lows = [ranges[h][0] for h in judged]
        spread, peak_spread = max(tail) - min(tail), max(peaks) - min(peaks)
        # Level: the hourly counts, and each hour's largest, stay within the tolerance of each
        # other (within an hour the count swings: lease slots are dropped every 5 minutes).
        level = spread <= args.tolerance and peak_spread <= args.tolerance
        verdict = (
            f"last {len(judged)} hours {min(tail)} to {max(tail)} on the hour (each minute "
            f"{min(lows)} to {max(peaks)}): {'level' if level else 'NOT level'} (spread "
            f"{spread} on the hour, {peak_spread} of the hourly peaks; tolerance "
            f"±{args.tolerance})"
        )
    print(
        f"summary: {at}; {verdict}; {len(store.retentions)} retention runs; {elapsed:.0f} s",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--retention-hours",
        type=float,
        default=6.0,
        help=f"retention simulated (the default stack keeps {DEFAULT_RETENTION})",
    )
    parser.add_argument("--events", type=int, default=5, help="events published per step")
    parser.add_argument("--hours", type=int, default=24, help="simulated hours")
    parser.add_argument(
        "--tolerance", type=int, default=5, help="level: the last 6 hourly counts within ±N"
    )
    parser.add_argument(
        "--dead-letters",
        action="store_true",
        help="dead-letter the lossy subscription's dropped events (the default stack has no "
        "dead-letter subscriber)",
    )
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="eventaudit-collections-"))
    port = stack.free_port()
    ferret = stack.ferretdb(port, tmp / "ferret", tmp).start()
    try:
        run(f"mongodb://127.0.0.1:{port}/", args)
    finally:
        ferret.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
