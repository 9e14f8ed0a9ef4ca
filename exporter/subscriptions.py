"""Which subscriptions a topic is expected to reach."""

from __future__ import annotations

import logging
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
    never make a subscription vanish from the report, nor produce a negative rate.
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
        self._lock = threading.Lock()
        self.list_errors = 0

    @property
    def configured_topics(self) -> set[str]:
        """Topics named in the configuration."""
        return set(self._configured)

    def _listing(self, topic: str) -> set[str]:
        if self._lister is None:
            return set()
        with self._lock:
            fetched_at, subs = self._listed.get(topic, (float("-inf"), set()))
            if self._clock() - fetched_at < self._refresh:
                return subs
            try:
                subs = set(self._lister(topic))
            except Exception as exc:  # any client error: keep the last good listing
                self.list_errors += 1
                log.warning("could not list subscriptions of topic %s: %s", topic, exc)
                if topic in self._listed:
                    self._listed[topic] = (self._clock(), self._listed[topic][1])
                return self._listed.get(topic, (0.0, set()))[1]
            self._listed[topic] = (self._clock(), subs)
            return subs

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
