"""Settled-bucket completion evaluation, folded from the writers' journal.

Events are bucketed by publishTime. Writers append to a journal what each batch made durable;
every evaluation takes the journal collections written since the previous one (a rename),
folds them into per-bucket digests (inserting each digest's delta), recomputes the result of
every bucket it touched and inserts its new version, and drops a taken journal collection a
grace after it was folded. So an evaluation costs what was written since the previous one,
whatever the history; a receipt written late, however late (within the longest window),
corrects its bucket on the next evaluation: it is counted late, not lost.

A bucket is reported once it has settled (its end is at least the settle delay in the past);
windows sum the stored results of settled buckets.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timedelta
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from eventaudit.contract import PUBLISH_TIME_TOLERANCE, epoch_ms, from_epoch_ms
from eventaudit.exporter.buckets import (
    Window,
    settled_frontier,
)
from eventaudit.exporter.clocks import SteppedClock
from eventaudit.exporter.fold import JOURNAL_OUTCOMES, FoldRules, fold
from eventaudit.exporter.following import Following
from eventaudit.exporter.leases import Fenced, Leases
from eventaudit.exporter.snapshot import (
    BucketKey,
    Snapshot,
    SubscriptionWindow,
    subscription_window,
)
from eventaudit.exporter.subscriptions import Expectation, ExpectedSubscriptions
from eventaudit.journal import BucketDigest, JournalBatch
from eventaudit.journal_reader import Taken
from eventaudit.partitions import (
    PARTITION_MS,
    journal_key,
)
from eventaudit.records import BucketResult, Lease
from eventaudit.store import (
    EvaluatorStore,
    StoredResult,
    StoreError,
    result_document,
)

log = logging.getLogger(__name__)

# Journal entries folded per round (each journal document holds one writer batch, from one
# entry to MAX_ENTRIES_PER_DOCUMENT): digests and results are stored after each round, so
# memory follows a round, not a burst, and a pass of many small writer batches stores each
# bucket it touched once, not once per so many documents.
JOURNAL_ENTRIES_PER_ROUND = 50_000
# Digests kept in memory between evaluations: the buckets most new records fall in.
CACHE_EVENTS = 200_000
_SAVES = 1_000_000  # result versions per fold stamp


class Evaluator(Collector):
    """Folds the journal into digests and keeps bucket results for the longest window.

    eventaudit_journal_entries_total{outcome="folded"} 91234.0
    eventaudit_journal_entries_total{outcome="too_old"} 0.0
    eventaudit_journal_entries_total{outcome="malformed"} 0.0
    eventaudit_journal_backlog 0.0
    eventaudit_digest_cache_events 5210.0
    """

    def __init__(
        self,
        store: EvaluatorStore,
        expected: ExpectedSubscriptions,
        windows: list[Window],
        bucket: timedelta,
        settle: timedelta,
        round_entries: int = JOURNAL_ENTRIES_PER_ROUND,
        budget: timedelta | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        leases: Leases | None = None,
    ) -> None:
        """`budget`: how long one evaluation may keep reading a journal that does not run dry
        (a burst) before it publishes what it has; the rest is folded by the next ones.
        Defaults to half a bucket. `leases`: evaluate only the topics whose lease this replica
        holds, and serve the others' from what their holders stored (None: every topic)."""
        if not windows:
            raise ValueError("at least one window is required")
        self._store = store
        self._expected = expected
        self._windows = tuple(sorted(windows, key=lambda w: w.length))
        self._bucket = bucket
        self._settle = settle
        self._span = self._windows[-1].length
        self._rules = FoldRules(bucket, settle, self._span)
        self._round = round_entries
        self._budget = (budget if budget is not None else bucket / 2).total_seconds()
        self._monotonic = monotonic
        self._results: dict[BucketKey, BucketResult] | None = None
        self._digests: dict[BucketKey, BucketDigest] = {}
        self._merged = 0
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(JOURNAL_OUTCOMES, 0)
        self._backlog = False
        self._clock = SteppedClock(bucket.total_seconds(), 3 * bucket.total_seconds())
        self._clock_steps = 0
        self._cached_events = 0
        self._growth = 0
        """Entries folded since the cache was last measured (an upper bound of its growth)."""
        self._heard: dict[str, set[str]] | None = None
        """Per topic, the subscriptions with a count in a result held (read once a pass)."""
        self._journal = store.journal_reader(monotonic)
        self._saves = 0
        self._leases = leases
        self._orders: dict[BucketKey, tuple[int, int]] = {}
        """The (epoch, version) of each result held: a stored one replaces it only if later."""
        self._following = Following(store)
        self._journal_keys: set[str] = set()
        self._keys_listed: datetime | None = None

    def evaluate(self, now: datetime) -> Snapshot:
        """Fold the journal and report everything settled by `now`. Raises StoreError; what
        was stored before the failure stands, the rest of the journal is folded next time."""
        clock = self._clock.read(now, self._monotonic())
        if clock.stepped:
            self._stepped(clock.stepped)
        # Served by the clock, but a step ahead only once it held for three buckets (before
        # that, by the clock from before the step): a clock stepped ahead for a pass shows no
        # future windows. Windows a step back shows again are right: their stored results
        # took their late entries (LATE_FOLD_MS).
        frontier = settled_frontier(min(now, clock.believed), self._settle, self._bucket)
        # What is forgotten (folds of buckets too old for a window, results and digests held)
        # goes by the earliest this process's clocks could mean: a wall clock stepped forward
        # never drops what a window still needs; what is refused as too far ahead goes by the
        # latest (a clock stepped back never refuses what is being published now).
        # A bucket more than the longest window: a topic held by another replica is served to
        # its holder's frontier, up to a pass (a bucket) behind this one's.
        earliest = settled_frontier(clock.earliest, self._settle, self._bucket)
        oldest = earliest - self._span - self._bucket
        first = self._results is None
        if first:
            # First evaluation of this process: resume from the stored results; the journal
            # holds whatever the previous process had not folded (and maybe some it had).
            # Stamp folds after any earlier process's, even with a clock stepped back, so a
            # later fold's result version is always higher and the API never takes it for an
            # earlier one.
            stamp = self._store.load_fold_stamp()
            tenures = self._store.load_tenures()
            self._merged = max(self._merged, stamp)
            self._expected.restore(tenures)
        self._expected.begin(now)
        if self._leases is not None:
            self._divide(now, oldest, first)
        if first:
            # Read once claims are made (a key's previous holder stopped writing before it
            # could be claimed), and after the leases were read (a result stored since is
            # told by a later lease write, and read then). A failure keeps nothing: the next
            # evaluation reads again.
            stored = self._store.load_results(oldest)
            self._results, self._orders = {}, {}
            self._keep(stored)
            if self._leases is not None:
                self._leases.adopted(set(self._leases.held))
        assert self._results is not None
        merged = max(epoch_ms(now), self._merged + 1)
        self._saves = 0
        span = (oldest, clock.latest + PUBLISH_TIME_TOLERANCE)
        deadline = self._monotonic() + self._budget
        self._heard = None
        try:
            taken = self._take(now)
            left: list[Taken] = []
            for i, part in enumerate(taken):
                if i and self._monotonic() > deadline:
                    left = taken[i:]  # a burst: publish what is folded, the rest next time
                    break
                self._fenced(self._fold_taken, part, span, merged, now)
        except BaseException:
            # The cache may hold folds that were not stored.
            self._digests, self._cached_events = {}, 0
            raise
        self._backlog = bool(left)
        self._results = {k: v for k, v in self._results.items() if k[1] >= oldest}
        self._orders = {k: v for k, v in self._orders.items() if k[1] >= oldest}
        self._following.forget_partitions_before(epoch_ms(oldest) - epoch_ms(oldest) % PARTITION_MS)
        self._evict(oldest)
        snapshot = self._snapshot(now, frontier, merged)
        self._save_tenures()
        if self._leases is not None:
            self._leases.renew(epoch_ms(oldest) - epoch_ms(oldest) % PARTITION_MS)
        return snapshot

    def _take(self, now: datetime) -> list[Taken]:
        """Take what is new in the journal of every key held (each verified first)."""
        keys = None
        if self._leases is not None:
            for key in self._leases.verify_all():
                self._forget(key)
            keys = sorted(self._leases.held)
        return self._journal.take(now, keys)

    def _fenced(self, write: Callable[..., Any], *args: Any) -> bool:
        """Call `write`; when the lease of a journal key turns out lost (Fenced: counted and
        logged by the leases), forget what is cached of its topics and return False."""
        try:
            write(*args)
        except Fenced as exc:
            self._forget(exc.key)
            return False
        return True

    def _fence(self, key: str | None) -> None:
        """Raise Fenced unless this replica may write for `key` (no leases: always)."""
        if self._leases is not None and key is not None:
            self._leases.fence(key)

    def _forget(self, key: str) -> None:
        """Drop the cached digests of `key`'s topics (another replica may write them now)."""
        self._digests = {k: d for k, d in self._digests.items() if journal_key(k[0]) != key}
        self._cached_events = sum(_events(d) for d in self._digests.values())

    def _keep(self, stored: list[StoredResult], replace: bool = False) -> None:
        """Take stored results that are later than those held (all of them: `replace`)."""
        assert self._results is not None
        for item in stored:
            key = (item.result.topic, item.result.start)
            if replace or item.order > self._orders.get(key, (-1, -1)):
                self._results[key], self._orders[key] = item.result, item.order

    def _divide(self, now: datetime, oldest: datetime, first: bool = False) -> None:
        """Rebalance the leases; read afresh the state of keys just gained, and what the
        holders of the others stored since the last read (all of a key's results when its
        holder changed: the last writes of the one before may never have been announced)."""
        assert self._leases is not None
        results = self._results or {}
        if self._keys_listed is None or not (
            self._keys_listed <= now < self._keys_listed + 3 * self._bucket
        ):
            # Topics first seen in the journal: listed every few passes (a listing of every
            # collection); configured topics and those with results are known anyway.
            self._journal_keys = self._journal.keys()
            self._keys_listed = now
        keys: dict[str, set[str]] = {k: set() for k in self._journal_keys}
        for topic in self._expected.configured_topics | {t for t, _ in results}:
            keys.setdefault(journal_key(topic), set()).add(topic)
        ownership = self._leases.rebalance(keys)
        held = self._leases.held
        if first:
            # Every result is read next, after these claims: follow each holder from the
            # leases just read (older than that read).
            self._following.start(self._leases.others)
            self._merged = max(self._merged, self._store.load_fold_stamp())
            for key in sorted(ownership.gained):
                self._fenced(self._leases.renew_key, key)
            return
        for key in ownership.released:
            self._forget(key)
        gained: set[str] = set()
        for key in sorted(ownership.gained):
            self._forget(key)
            self._following.forget(key)
            gained |= self._leases.topics_of(key)
        tenures = None
        if gained:
            self._keep(self._store.load_results(oldest, gained), replace=True)
            tenures = self._store.load_tenures()
            self._expected.adopt(tenures, gained)
        if ownership.gained:
            # Stamp after every fold the previous holders stored.
            self._merged = max(self._merged, self._store.load_fold_stamp())
            self._leases.adopted(ownership.gained)
            for key in sorted(ownership.gained):
                # The loads took time: renew before folding, not when the lease runs short.
                self._fenced(self._leases.renew_key, key)
        others = self._leases.others
        entries = {key: self._leases.entries(key) for key in others}
        fresh = self._following.read(others, entries, oldest, now)
        self._keep([r for r in fresh if journal_key(r.result.topic) not in held])
        foreign = {t for t, _ in results if journal_key(t) not in held}
        foreign |= {t for t in self._expected.configured_topics if journal_key(t) not in held}
        if foreign:
            self._expected.adopt(
                tenures if tenures is not None else self._store.load_tenures(), foreign
            )

    def _owns(self, topic: str) -> bool:
        """Whether this replica evaluates `topic`."""
        return self._leases is None or journal_key(topic) in self._leases.held

    def _save_tenures(self) -> None:
        """Store the subscription tenures this evaluation changed, of the topics it holds;
        a failure is logged and they are stored by the next evaluation (in memory they are
        already in effect)."""
        changed = [t for t in self._expected.end() if self._owns(t.topic)]
        by_key: dict[str, list[Any]] = defaultdict(list)
        for tenure in changed:
            by_key[journal_key(tenure.topic)].append(tenure)
        for key, tenures in sorted(by_key.items()):
            try:
                self._fence(key)
                epoch = self._leases.epoch(key) if self._leases is not None else 0
                refused = self._store.save_tenures(tenures, epoch)
            except Fenced:
                self._forget(key)
                continue
            except StoreError as exc:
                log.warning("could not store %d subscription tenures: %s", len(tenures), exc)
                return
            if refused and self._leases is not None:
                # Stored since by a later holder of the key: this replica lost it.
                self._leases.refused(key, "a later epoch's subscription tenure is stored")
                self._forget(key)
                continue
            self._expected.stored(tenures)

    def _fold_taken(
        self, taken: Taken, span: tuple[datetime, datetime], merged: int, now: datetime
    ) -> None:
        """Fold a taken part of the journal whole, JOURNAL_ENTRIES_PER_ROUND entries at a
        time (memory follows a round, not a burst); then say it is folded. Raises Fenced when
        the key's lease is lost."""
        self._fence(taken.key)
        if self._merged < merged:
            # Before the first fold stamped `merged` is stored anywhere.
            self._store.save_fold_stamp(merged)
            self._merged = merged
        documents = self._journal.read(taken)
        while batches := _round(documents, self._round):
            self._fence(taken.key)
            self._fold(batches, span, merged, now, taken.key)
            if self._cached_events + self._growth > CACHE_EVENTS:
                self._evict(span[0])  # a burst: memory follows a round
        self._fence(taken.key)
        self._journal.folded(taken)

    def _stepped(self, seconds: float) -> None:
        """The wall clock stepped by `seconds` (by the monotonic clock) since the last pass:
        counted and logged; what memory dropped by the earlier reading (results of buckets it
        took as out of every window) is read again, as by a restarted process."""
        with self._lock:
            self._clock_steps += 1
        log.warning(
            "the wall clock stepped by %+.0fs since the last evaluation (by the monotonic "
            "clock): nothing is forgotten or refused by the step (folds, leases and retention "
            "go by the clock readings that keep the most); the stored results are read again",
            seconds,
        )
        self._results, self._digests, self._cached_events = None, {}, 0

    def trusted_now(self, now: datetime) -> datetime:
        """The earliest `now` could mean since this process started: what retention deletes
        goes by it."""
        return self._clock.earliest(now, self._monotonic())

    def _fold(
        self,
        batches: tuple[JournalBatch, ...],
        span: tuple[datetime, datetime],
        merged: int,
        now: datetime,
        journal: str,
    ) -> None:
        """Fold one round of documents of the journal of key `journal`; store what changed
        in digests, then the results that changed. An entry of a topic of another key is
        counted `misfiled`: the replica holding that key's lease may be writing its bucket."""
        assert self._results is not None
        folded = fold(
            batches, journal, self._rules, span, merged, self._digests, self._results,
            self._store.load_digest,
        )  # fmt: skip
        touched, changed, counts = folded.touched, folded.changed, folded.counts
        for (topic, sub), ms in folded.first_receipts.items():
            self._expected.saw_receipt(topic, sub, from_epoch_ms(ms))
        if folded.misfiled:
            # Not written by eventaudit's writers: journaled again under its topic's key, for
            # the replica that holds that key's lease (counted and logged).
            self._store.append_journal(folded.misfiled, now)
        if self._leases is not None and self._leases.saw_topics(journal, folded.topics):
            self._leases.renew_key(journal)  # a new topic is named before anything of it is
        known = {topic: self._expected.expectations(topic) for topic, _ in touched}
        filters = {
            topic: {name: e.filter for name, e in subs.items() if e.filter is not None}
            for topic, subs in known.items()
        }
        reported = self._reported(known)
        for (topic, _), digest in touched.items():  # heard first in this very fold
            reported[topic].update(digest.receipts, digest.dead)
        results = {
            key: digest.result(filters[key[0]], reported[key[0]]) for key, digest in touched.items()
        }
        self._store.save_digests((touched[k] for k in sorted(changed)), f"{merged}.{self._saves}")
        # Every touched bucket, changed or not: a previous process may have stored its digest
        # and stopped before its result.
        fresh = [r for key, r in results.items() if self._results.get(key) != r]
        epoch = self._leases.epoch(journal) if self._leases is not None else 0
        order = (epoch, merged * _SAVES + self._saves)
        self._fence(journal)
        self._store.save_bucket_results(fresh, now, order[1], epoch)
        self._saves += 1
        for r in fresh:
            self._orders[(r.topic, r.start)] = order
            if self._leases is not None:
                ms = epoch_ms(r.start)
                doc = result_document(r, now, order[1], epoch)
                self._leases.wrote(journal, ms - ms % PARTITION_MS, order, doc)
        # Commit in memory only once everything is stored; the digests just folded into are
        # the most recently used.
        for key, digest in touched.items():
            self._digests.pop(key, None)
            self._digests[key] = digest
        self._results.update(((r.topic, r.start), r) for r in fresh)
        if self._heard is not None:
            for r in fresh:
                self._heard[r.topic].update(r.subscriptions)
        self._growth += counts["folded"]
        with self._lock:
            for outcome, n in counts.items():
                self._counts[outcome] += n
        if any(n for outcome, n in counts.items() if outcome != "folded"):
            log.warning(
                "journal entries not counted: %d older than the longest window, %d more than "
                "the publish time tolerance ahead, %d malformed, %d misfiled (journaled again "
                "under their topic's key)",
                counts["too_old"],
                counts["too_new"],
                counts["malformed"],
                counts["misfiled"],
            )

    def _reported(self, known: Mapping[str, Mapping[str, Expectation]]) -> dict[str, set[str]]:
        """Per topic of `known` (its expectations), the subscriptions its windows may report:
        standing (configured or listed), or heard in a result held. One without a receipt in
        a bucket is reported there as missing every event: the bucket's result lists the
        oldest ones for it. Results held are read once a pass, when something is folded."""
        assert self._results is not None
        if self._heard is None:
            self._heard = defaultdict(set)
            for (topic, _), result in self._results.items():
                self._heard[topic].update(result.subscriptions)
        return {
            topic: {name for name, e in subs.items() if e.standing} | self._heard.get(topic, set())
            for topic, subs in known.items()
        }

    def _evict(self, oldest: datetime) -> None:
        """Keep the digests folded into most recently, within CACHE_EVENTS, and none that no
        window reaches: the buckets new records fall in, and those a burst or a late receipt
        is still filling (each reload would read the digest's partition)."""
        kept: list[tuple[BucketKey, BucketDigest]] = []
        size = 0
        for key, digest in reversed(self._digests.items()):
            if key[1] < oldest:
                continue
            events = _events(digest)
            if size + events > CACHE_EVENTS:
                break
            kept.append((key, digest))
            size += events
        # Counted here, on the evaluation thread: a scrape must not walk digests being folded.
        self._digests, self._cached_events = dict(reversed(kept)), size
        self._growth = 0

    @property
    def folded_journals(self) -> frozenset[str]:
        """Folded journal collections waiting for the grace to drop."""
        return self._journal.folded_names

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        """Journal outcomes, whether a backlog is left, and the digest cache's size."""
        family = CounterMetricFamily(
            "eventaudit_journal_entries",
            "Journal entries read by outcome: folded into a bucket digest; or not counted "
            "(logged): too old for any window, more than the publish time tolerance ahead, "
            "malformed, misfiled (journaled again under their topic's key).",
            labels=["outcome"],
        )
        with self._lock:
            for outcome in JOURNAL_OUTCOMES:
                family.add_metric([outcome], self._counts[outcome])
            backlog, cached, steps = self._backlog, self._cached_events, self._clock_steps
            stragglers = self._journal.stragglers
        yield family
        yield GaugeMetricFamily(
            "eventaudit_journal_backlog",
            "1 when the last evaluation left journal collections to the next (a burst).",
            value=int(backlog),
        )
        yield CounterMetricFamily(
            "eventaudit_journal_stragglers",
            "Journal documents that landed in a journal collection after it was taken and read "
            "(FerretDB's insert racing the rename), taken and folded at the next pass.",
            value=stragglers,
        )
        yield CounterMetricFamily(
            "eventaudit_clock_steps",
            "Wall clock steps of more than a bucket between two evaluations, by the monotonic "
            "clock (logged): nothing is pruned, dropped or claimed by the stepped clock alone.",
            value=steps,
        )
        yield GaugeMetricFamily(
            "eventaudit_digest_cache_events",
            "Event ids held in memory in the digests of recent buckets.",
            value=cached,
        )

    def _snapshot(self, now: datetime, frontier: datetime, merged: int) -> Snapshot:
        # Buckets at or after the frontier exist when it moved back (a restart with a longer
        # settle delay): kept for later, never counted now. Each topic is served up to the
        # frontier its holder's latest pass had settled (its own when this replica holds it).
        assert self._results is not None
        others = self._leases.others if self._leases is not None else {}  # read once
        frontiers = {
            topic: self._topic_frontier(topic, frontier, others)
            for topic in {t for t, _ in self._results} | self._expected.configured_topics
        }
        counted = {k: r for k, r in self._results.items() if k[1] < frontiers[k[0]]}
        by_topic: dict[str, list[BucketResult]] = defaultdict(list)
        for (topic, _), result in counted.items():
            by_topic[topic].append(result)
        topics = set(by_topic) | self._expected.configured_topics
        published: dict[str, dict[str, int]] = {}
        subs_out: dict[tuple[str, str], dict[str, SubscriptionWindow]] = {}
        expectations: dict[tuple[str, str], Expectation] = {}
        unsupported: dict[tuple[str, str], str] = {}
        for topic in sorted(topics):
            results = by_topic.get(topic, [])
            end = frontiers[topic]
            known = self._expected.expectations(topic, self._owns(topic), through=end)
            for sub, expectation in known.items():
                if expectation.filter_error is not None:
                    unsupported[(topic, sub)] = expectation.filter_error
            published[topic] = {}
            for window in self._windows:
                in_window = [r for r in results if r.start >= end - window.length]
                published[topic][window.label] = sum(r.published for r in in_window)
                heard = {
                    sub
                    for r in in_window
                    for sub, c in r.subscriptions.items()
                    if c.heard and not self._expected.excluded(topic, sub)
                }
                standing = {sub for sub, e in known.items() if e.standing}
                for sub in sorted(standing | heard):
                    expectation = known.get(sub, Expectation())
                    stats = subscription_window(expectation, sub, in_window, end, self._bucket)
                    if stats is None:
                        continue
                    subs_out.setdefault((topic, sub), {})[window.label] = stats
                    expectations[(topic, sub)] = expectation
        return Snapshot(
            now,
            frontier,
            self._bucket,
            self._windows,
            published,
            subs_out,
            counted,
            merged,
            expectations,
            unsupported,
            {t: f for t, f in frontiers.items() if f != frontier},
        )

    def _topic_frontier(
        self, topic: str, frontier: datetime, others: Mapping[str, Lease]
    ) -> datetime:
        """How far `topic` is served: this evaluation's frontier when this replica holds it;
        else the frontier its holder had settled by its latest pass (its latest lease write),
        so that every replica serves a topic to the same frontier (issue 17, case 12), and a
        holder that died or paused (its lease no longer renewed) has its results served only
        as far as they were complete (cases 8, 10, 11). A topic whose holder is not known
        yet (claimed in this pass by another) is served nothing until it is."""
        if self._owns(topic):
            return frontier
        assert self._leases is not None
        lease = others.get(journal_key(topic))
        if lease is None or lease.renewed is None:
            return frontier - self._span - self._bucket
        # The holder's, even a little ahead of this replica's own (their clocks may differ by
        # up to a fifth of the lease); never more than a lease ahead (a clock far off).
        holders = settled_frontier(lease.renewed, self._settle, self._bucket)
        return min(holders, frontier + self._leases.lease)


def _events(digest: BucketDigest) -> int:
    return len(digest.published) + sum(len(got) for got in digest.receipts.values())


def _round(documents: Iterator[JournalBatch], entries: int) -> tuple[JournalBatch, ...]:
    """The next documents, until they hold `entries` entries (at least one document)."""
    taken: list[JournalBatch] = []
    held = 0
    for batch in documents:
        taken.append(batch)
        held += len(batch.entries) + batch.malformed
        if held >= entries:
            break
    return tuple(taken)
