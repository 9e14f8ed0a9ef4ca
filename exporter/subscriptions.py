"""Which subscriptions a topic is expected to reach."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)

Lister = Callable[[str], list[str]]


class ExpectedSubscriptions:
    """configured, plus listed by Pub/Sub, plus seen in receipts, minus exclusions.

    Configured and listed subscriptions are expected in every window; one that is neither
    (deleted, or a subscriber briefly run with the wrong topic) only in the windows where it
    has receipts, so it cannot report 0 % for an hour after it went away.
    A listing error keeps the last good listing (and is counted): a flaky admin API must
    never make a subscription vanish from the report, nor produce a negative rate. Failed or
    not, a topic is listed at most once per `refresh_seconds`.
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
        self._listed: dict[str, tuple[float, set[str]]] = {}
        self._listing_now: set[str] = set()
        self._lock = threading.Lock()
        self.list_errors = 0

    @property
    def configured_topics(self) -> set[str]:
        """Topics named in the configuration."""
        return set(self._configured)

    def _listing(self, topic: str) -> set[str]:
        """The topic's listed subscriptions, re-listed at most once per refresh period.

        A failure is remembered like a listing (the last good one, or none), so a topic the
        admin API cannot list is retried after `refresh_seconds`, not on every evaluation.
        The lock is not held across the remote call; a topic already being listed answers
        with its last listing meanwhile.
        """
        if self._lister is None:
            return set()
        with self._lock:
            fetched_at, subs = self._listed.get(topic, (-math.inf, set()))
            if self._clock() - fetched_at < self._refresh or topic in self._listing_now:
                return subs
            self._listing_now.add(topic)
        try:
            listed: set[str] | None = set(self._lister(topic))
        except Exception as exc:  # any client error: keep the last good listing
            listed = None
            log.warning("could not list subscriptions of topic %s: %s", topic, exc)
        with self._lock:
            self._listing_now.discard(topic)
            if listed is None:
                self.list_errors += 1
                listed = self._listed.get(topic, (0.0, set()))[1]
            self._listed[topic] = (self._clock(), listed)
            return listed

    def standing(self, topic: str) -> set[str]:
        """Configured or currently listed subscriptions of `topic`: expected in every window."""
        return self.for_topic(topic, ())

    def excluded(self, topic: str, subscription: str) -> bool:
        """True when the pair is configured never to be reported."""
        return (topic, subscription) in self._excluded

    def for_topic(self, topic: str, seen: Iterable[str]) -> set[str]:
        """The standing subscriptions of `topic` plus those `seen`, minus exclusions."""
        subs = set(self._configured.get(topic, set())) | self._listing(topic) | set(seen)
        return {s for s in subs if not self.excluded(topic, s)}


def pubsub_lister(project: str) -> Lister:
    """List a topic's subscriptions through Pub/Sub's admin API (ids, not paths)."""
    from google.cloud import pubsub_v1

    client = pubsub_v1.PublisherClient()

    def list_subscriptions(topic: str) -> list[str]:
        path = client.topic_path(project, topic)
        return [
            s.rsplit("/", 1)[-1] for s in client.list_topic_subscriptions(topic=path, timeout=10)
        ]

    return list_subscriptions
