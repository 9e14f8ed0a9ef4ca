"""Which subscriptions a topic is expected to reach."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from eventaudit.filters import FilterError, SubscriptionFilter
from eventaudit.records import Tenure

log = logging.getLogger(__name__)

# A subscription first seen at T is expected to receive the events of the buckets starting at
# T + NEW_SUBSCRIPTION_MARGIN and later: Pub/Sub sends a subscription only what is published
# after it was created, and the publishers' clocks may run a little ahead of the exporter's.
NEW_SUBSCRIPTION_MARGIN = timedelta(seconds=10)
# How often a subscription's last listing is stored (a restart then knows, within this, when
# a subscription deleted while it was down was last listed).
LISTED_EVERY = timedelta(minutes=5)


@dataclass(frozen=True, slots=True)
class SubscriptionInfo:
    """What Pub/Sub says of one subscription of a topic."""

    name: str
    filter: str = ""
    dead_letter_topic: str = ""
    error: str = ""
    """Why its details could not be read (its filter is then unknown)."""


Lister = Callable[[str], Sequence[SubscriptionInfo | str]]


@dataclass(frozen=True, slots=True)
class Expectation:
    """Which events one subscription of a topic is expected to receive."""

    standing: bool = False
    """configured or listed: reported in every window (else only where it has receipts)"""
    filter: SubscriptionFilter | None = None
    filter_error: str | None = None
    """its filter is not one this exporter can evaluate: it is not reported, only marked"""
    since: datetime | None = None
    until: datetime | None = None

    @property
    def filter_text(self) -> str:
        """The filter text bucket counts must have been made with to be counted."""
        return self.filter.text if self.filter else ""

    def reported(self, frontier: datetime) -> bool:
        """Whether its series exist: never with a filter it cannot evaluate, nor once its
        last listed moment has settled after Pub/Sub stopped listing it."""
        return self.filter_error is None and (self.until is None or frontier <= self.until)

    def covers(self, start: datetime, bucket: timedelta) -> bool:
        """Whether the bucket starting at `start` is one the subscription existed for."""
        if self.since is not None and start < self.since + NEW_SUBSCRIPTION_MARGIN:
            return False
        return self.until is None or start + bucket <= self.until


class ExpectedSubscriptions:
    """configured, plus listed by Pub/Sub, plus seen in receipts, minus exclusions.

    Configured and listed subscriptions are expected in every window; one that is neither
    (deleted, or a subscriber briefly run with the wrong topic) only in the windows where it
    has receipts, so it cannot report 0 % for an hour after it went away.
    A listing error keeps the last good listing (and is counted): a flaky admin API must
    never make a subscription vanish from the report, nor produce a negative rate. Failed or
    not, a topic is listed at most once per `refresh_seconds`, and again whenever the windows
    about to be reported end after its last listing: whether a subscription still existed at
    a bucket's end is known only from a listing taken after it (issue 17, case 14).
    """

    def __init__(
        self,
        configured: dict[str, set[str]],
        excluded: set[tuple[str, str]],
        lister: Lister | None,
        refresh_seconds: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._configured = configured
        self._excluded = excluded
        self._lister = lister
        self._refresh = refresh_seconds
        self._clock = clock
        self._listed: dict[str, tuple[float, datetime | None, dict[str, SubscriptionInfo]]] = {}
        """per topic: when it was last listed (monotonic, and the evaluation's time) and what"""
        self._listing_now: set[str] = set()
        self._lock = threading.Lock()
        self.list_errors = 0
        self._tenures: dict[tuple[str, str], Tenure] = {}
        self._last_listed: dict[tuple[str, str], datetime] = {}
        self._gone_at: dict[tuple[str, str], datetime] = {}
        """when a listing first missed a subscription (this process)"""
        self._changed: set[tuple[str, str]] = set()
        self._initial = False
        self._errors_at_begin = 0
        self._now: datetime | None = None
        self._filters: dict[str, SubscriptionFilter | FilterError] = {}
        self.filter_errors = 0
        self._refused: set[tuple[str, str, str]] = set()

    # -- tenure: when each subscription was first seen, and when it stopped being listed -----

    def restore(self, tenures: Iterable[Tenure]) -> None:
        """Take the stored tenures (the first evaluation of a process). None stored: this is
        the exporter's first evaluation on the database, and every subscription it sees during
        it is expected from the start (it existed before the exporter did)."""
        with self._lock:
            self._tenures = {(t.topic, t.subscription): t for t in tenures}
            self._initial = not self._tenures

    def adopt(self, tenures: Iterable[Tenure], topics: set[str]) -> None:
        """Take the stored tenures of `topics`, which another exporter replica evaluates (or
        did until this one took them over): its are the ones that count."""
        with self._lock:
            for key in [k for k in self._tenures if k[0] in topics]:
                del self._tenures[key]
                self._changed.discard(key)
            for t in tenures:
                if t.topic in topics:
                    self._tenures[(t.topic, t.subscription)] = t

    def begin(self, now: datetime) -> None:
        """An evaluation at `now` starts: what the listing shows from here is seen at `now`."""
        self._now = now
        self._errors_at_begin = self.list_errors

    def end(self) -> list[Tenure]:
        """The evaluation is over: the tenures it changed, to store (the next evaluation
        stores them again if this one could not). The first evaluation on a database lasts
        until one lists every topic without an error."""
        with self._lock:
            if self.list_errors == self._errors_at_begin:
                self._initial = False
            return [self._tenures[k] for k in sorted(self._changed)]

    def stored(self, tenures: Iterable[Tenure]) -> None:
        """These tenures are stored."""
        with self._lock:
            for t in tenures:
                if self._tenures.get((t.topic, t.subscription)) == t:
                    self._changed.discard((t.topic, t.subscription))

    def _see(self, topic: str, name: str, info: SubscriptionInfo | None) -> None:
        """`name` is listed (with `info`) or configured now (lock held)."""
        key, now = (topic, name), self._now
        if now is not None:
            self._last_listed[key] = now
        tenure = self._tenures.get(key)
        known = info is not None and not info.error
        if tenure is None or tenure.until is not None:
            # New, or listed again after it was gone (created again: a fresh subscription).
            since = None if self._initial or now is None else now
            # Configured only: no filter known of; listed: its filter, or None if unreadable.
            text = "" if info is None else info.filter if known else None
            self._tenures[key] = Tenure(topic, name, since, None, text, now, now)
            self._changed.add(key)
            return
        changes: dict[str, Any] = {}
        if info is not None and known and info.filter != tenure.filter:
            changes["filter"] = info.filter
        if now is not None and (tenure.listed is None or now - tenure.listed >= LISTED_EVERY):
            changes["listed"] = now
        if changes:
            self._tenures[key] = replace(tenure, **changes)
            self._changed.add(key)

    def _unlisted(self, topic: str, listed: Iterable[str]) -> None:
        """A successful listing of `topic` without these subscriptions (lock held)."""
        now = self._now
        if now is None:
            return
        standing = set(listed) | self._configured.get(topic, set())
        for key, tenure in list(self._tenures.items()):
            if key[0] == topic and tenure.until is None and key[1] not in standing:
                until = self._last_listed.get(key) or tenure.listed or now
                self._tenures[key] = replace(tenure, until=until)
                self._gone_at[key] = now
                self._changed.add(key)
                log.info(
                    "subscription %s of topic %s is no longer listed: expected until %s",
                    key[1],
                    topic,
                    until.isoformat(),
                )

    def saw_receipt(self, topic: str, subscription: str, publish_time: datetime) -> None:
        """A receipt on `subscription` of an event published at `publish_time`: it existed
        then, so it is expected from then on if that is earlier than it was first seen. Never
        earlier than one listing period (plus the margin) before it was first seen: a
        subscription is listed within that of its creation, and an older receipt (a skewed
        publisher clock, a seek to another subscription's snapshot) says nothing of when it
        was created."""
        key = (topic, subscription)
        with self._lock:
            tenure = self._tenures.get(key)
            if tenure is not None and tenure.until is not None:
                # Gone from the listing: a receipt of an event published after the listing
                # that missed it (it was deleted by then; after a restart, a listing period
                # past its last listed moment) proves it created again, from then on, before
                # the listing shows it (issue 17, case 14).
                gone = self._gone_at.get(key) or (
                    tenure.until + timedelta(seconds=self._refresh) + NEW_SUBSCRIPTION_MARGIN
                )
                if publish_time > gone:
                    self._tenures[key] = replace(
                        tenure, since=publish_time, until=None, seen=self._now, listed=None
                    )
                    self._changed.add(key)
                return
            if tenure is None or tenure.since is None:
                return
            first = tenure.seen or tenure.since
            floor = first - timedelta(seconds=self._refresh) - NEW_SUBSCRIPTION_MARGIN
            since = max(publish_time, floor)
            if since < tenure.since:
                self._tenures[key] = replace(tenure, since=since)
                self._changed.add(key)

    def _parsed(self, text: str) -> SubscriptionFilter | FilterError:
        cached = self._filters.get(text)
        if cached is None:
            try:
                cached = SubscriptionFilter.parse(text)
            except FilterError as exc:
                cached = exc
            except (ValueError, RecursionError) as exc:  # a parser bug must not stop evaluations
                cached = FilterError(f"unreadable filter ({type(exc).__name__})")
            self._filters[text] = cached
        return cached

    def expectations(
        self, topic: str, own: bool = True, through: datetime | None = None
    ) -> dict[str, Expectation]:
        """Every subscription of `topic` the exporter knows of (configured, listed, or gone
        from the listing but within its tenure), with what it is expected to receive in the
        buckets that end by `through` (listed again if its last listing is older). A topic
        another exporter replica evaluates (not `own`) is not listed: its stored tenures say
        which subscriptions are listed (no `until`) and with which filter."""
        configured = self._configured.get(topic, set())
        if not own:
            with self._lock:
                listing = {
                    name: SubscriptionInfo(name, t.filter or "")
                    for (t_topic, name), t in self._tenures.items()
                    if t_topic == topic and t.until is None and t.filter is not None
                }
                listing.update(
                    (name, SubscriptionInfo(name, error="never read"))
                    for (t_topic, name), t in self._tenures.items()
                    if t_topic == topic and t.until is None and t.filter is None
                )
        else:
            listing = self._listing(topic, through)
        with self._lock:
            for name in configured:
                if not own:
                    break
                if (topic, name) not in self._tenures or self._tenures[(topic, name)].until:
                    self._see(topic, name, None)
            out: dict[str, Expectation] = {}
            for (t, name), tenure in self._tenures.items():
                if t != topic or self.excluded(topic, name):
                    continue
                standing = name in configured or name in listing
                info = listing.get(name)
                # The listing's filter; else the one stored (a listing that failed, or a
                # subscription no longer listed); None: never read.
                text = info.filter if info and not info.error else tenure.filter
                if text is None:
                    error = info.error if info and info.error else "never read"
                    parsed: SubscriptionFilter | FilterError | None = FilterError(
                        f"its filter is unknown: {error}"
                    )
                else:
                    parsed = self._parsed(text) if text else None
                out[name] = Expectation(
                    standing=standing,
                    filter=parsed if isinstance(parsed, SubscriptionFilter) else None,
                    filter_error=str(parsed) if isinstance(parsed, FilterError) else None,
                    since=tenure.since,
                    until=None if standing else tenure.until,
                )
            # Without a tenure: expected from the start when this replica evaluates the topic
            # (its tenure is stored at the end of this evaluation); on the others, only once
            # the holder stored when it began (else a subscription configured here first would
            # be expected in buckets from before it existed).
            for name in (configured | set(listing)) - set(out):
                if own and not self.excluded(topic, name):
                    out[name] = Expectation(standing=True)
            return out

    @property
    def configured_topics(self) -> set[str]:
        """Topics named in the configuration."""
        return set(self._configured)

    def _listing(self, topic: str, through: datetime | None = None) -> dict[str, SubscriptionInfo]:
        """The topic's listed subscriptions, re-listed once per refresh period, or sooner
        when the evaluation reports buckets ending `through` a moment after the last listing.

        A failure is remembered like a listing (the last good one, or none), so a topic the
        admin API cannot list is retried a refresh period or a settle delay later, not on
        every evaluation. The lock is not held across the remote call; a topic already being
        listed answers with its last listing meanwhile.
        """
        if self._lister is None:
            return {}
        with self._lock:
            fetched_at, listed_now, subs = self._listed.get(topic, (-math.inf, None, {}))
            stale = through is not None and (listed_now is None or listed_now < through)
            fresh = self._clock() - fetched_at < self._refresh and not stale
            if fresh or topic in self._listing_now:
                return subs
            self._listing_now.add(topic)
        listed: dict[str, SubscriptionInfo] | None
        try:
            infos = [SubscriptionInfo(i) if isinstance(i, str) else i for i in self._lister(topic)]
            listed = {info.name: info for info in infos}
        except Exception as exc:  # any client error: keep the last good listing
            listed = None
            log.warning("could not list subscriptions of topic %s: %s", topic, exc)
        with self._lock:
            self._listing_now.discard(topic)
            if listed is None:
                self.list_errors += 1
                listed = self._listed.get(topic, (0.0, None, {}))[2]
            else:
                for name, info in listed.items():
                    error = self._parsed(info.filter) if info.filter else None
                    if isinstance(error, FilterError) and (
                        (topic, name, info.filter) not in self._refused
                    ):
                        self._refused.add((topic, name, info.filter))
                        self.filter_errors += 1
                        log.error(
                            "subscription %s of topic %s has a filter this exporter cannot "
                            "evaluate (%s): it is not reported: %r",
                            name,
                            topic,
                            error,
                            info.filter,
                        )
                    if not self.excluded(topic, name):
                        self._see(topic, name, info)
                self._unlisted(topic, listed)
            self._listed[topic] = (self._clock(), self._now, listed)
            return listed

    def standing(self, topic: str) -> set[str]:
        """Configured or currently listed subscriptions of `topic`: expected in every window."""
        return self.for_topic(topic, ())

    def excluded(self, topic: str, subscription: str) -> bool:
        """True when the pair is configured never to be reported."""
        return (topic, subscription) in self._excluded

    def for_topic(self, topic: str, seen: Iterable[str]) -> set[str]:
        """The standing subscriptions of `topic` plus those `seen`, minus exclusions."""
        subs = set(self._configured.get(topic, set())) | set(self._listing(topic)) | set(seen)
        return {s for s in subs if not self.excluded(topic, s)}


def pubsub_lister(project: str) -> Lister:
    """List a topic's subscriptions through Pub/Sub's admin API (ids, not paths)."""
    from google.cloud import pubsub_v1

    client = pubsub_v1.PublisherClient()

    from google.api_core import exceptions

    subscriber = pubsub_v1.SubscriberClient()
    ours = f"projects/{project}/subscriptions/"
    foreign: set[str] = set()

    def list_subscriptions(topic: str) -> list[SubscriptionInfo]:
        path = client.topic_path(project, topic)
        listed = []
        for sub_path in client.list_topic_subscriptions(topic=path, timeout=10):
            if not sub_path.startswith(ours):
                # Subscribers record receipts by subscription id in this project: one in
                # another project can never have any here.
                if sub_path not in foreign:
                    foreign.add(sub_path)
                    log.info(
                        "subscription %s of topic %s: another project, not audited", sub_path, topic
                    )
                continue
            name = sub_path.removeprefix(ours)
            try:
                sub = subscriber.get_subscription(subscription=sub_path, timeout=10)
            except exceptions.NotFound:
                continue  # deleted between the listing and this read
            except exceptions.GoogleAPICallError as exc:
                listed.append(SubscriptionInfo(name, error=type(exc).__name__))
                continue
            if sub.detached:
                continue  # detached: no longer receives the topic's messages
            dead_letter = sub.dead_letter_policy.dead_letter_topic if sub.dead_letter_policy else ""
            listed.append(SubscriptionInfo(name, sub.filter, dead_letter.rsplit("/", 1)[-1]))
        return listed

    return list_subscriptions
