"""`python -m eventaudit.subscriber --subscription NAME`: parse, validate, wire, run."""

from __future__ import annotations

import logging
import math
import signal
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flask import Flask
from google.api_core import exceptions, retry
from google.cloud import pubsub_v1
from prometheus_client import CollectorRegistry
from pymongo.errors import PyMongoError

from eventaudit.http import BackgroundServer
from eventaudit.pubsub import subscriber_client
from eventaudit.serving import call_within
from eventaudit.settings import CommonSettings, configure_logging, load_settings
from eventaudit.store import MongoStore, StoreError
from eventaudit.subscriber.audited import AuditedSubscriber, Faults, SubscriberMetrics, TopicOf
from eventaudit.subscriber.config import SubscriberSettings
from eventaudit.subscriber.service import create_app
from eventaudit.subscriber.stream import (
    StreamEndCounter,
    StreamHealth,
    StreamMetrics,
    StreamSession,
)

log = logging.getLogger("subscriber")

# How long start-up waits for Pub/Sub to describe the subscription: retried while Pub/Sub is
# unavailable, then a start-up error (the library's default keeps trying for a minute).
_LOOKUP_TIMEOUT_SECONDS = 10.0
_LOOKUP_RETRY = retry.Retry(
    predicate=retry.if_exception_type(
        exceptions.ServiceUnavailable, exceptions.DeadlineExceeded, exceptions.InternalServerError
    ),
    initial=0.2,
    maximum=2.0,
    timeout=_LOOKUP_TIMEOUT_SECONDS,
)


# The metrics server answers Prometheus and health probes only.
_HTTP_THREADS = 2


class StartupError(Exception):
    """Start-up cannot go on: one line on stderr, exit 1, no traceback."""


def main(argv: list[str] | None = None) -> None:
    """Entry point of `eventaudit-subscriber`."""
    settings = load_settings(SubscriberSettings, argv)
    configure_logging(settings.log_level)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        service = start(settings)
    except Exception as exc:
        reason = str(exc) if isinstance(exc, StartupError) else f"{type(exc).__name__}: {exc}"
        print(f"{SubscriberSettings.prog}: {' '.join(reason.split())}", file=sys.stderr)
        raise SystemExit(1) from None
    service.run(stop)


@dataclass
class Service:
    """A started subscriber: run() pulls until stopped, then stops within the budget."""

    settings: SubscriberSettings
    client: pubsub_v1.SubscriberClient
    store: MongoStore
    audited: AuditedSubscriber
    server: BackgroundServer
    session: StreamSession

    def run(self, stop: threading.Event) -> None:
        """Pull until `stop` is set. Stopping loses nothing: unacked messages are redelivered."""
        budget = self.settings.shutdown_timeout_seconds
        self.audited.start()
        try:
            self.session.run(stop, cancel_timeout=budget / 3)
        finally:
            deadline = time.monotonic() + budget * 2 / 3
            self.audited.stop(timeout=max(0.0, deadline - time.monotonic() - 1))
            self.server.stop(timeout=max(0.0, deadline - time.monotonic()))
            self.store.close()
            # With Pub/Sub unreachable the client's channel can take long to close (it keeps
            # reopening the stream meanwhile): bounded, so SIGTERM always ends the process.
            call_within(max(1.0, deadline - time.monotonic()), self.client.close, "client close")
            log.info("subscriber stopped")


def start(settings: SubscriberSettings) -> Service:
    """Check the subscription, open the store, listen; StartupError saying why it cannot."""
    registry = CollectorRegistry()
    metrics = SubscriberMetrics(registry, settings.subscription)
    stream_metrics = StreamMetrics(registry, settings.subscription)
    health = StreamHealth(stream_metrics)
    client = subscriber_client([StreamEndCounter(health.stream_error)])
    try:
        path = client.subscription_path(settings.project, settings.subscription)
        topic, exactly_once = subscription_topic(client, path, settings.topic)
        store = open_store(settings)
    except BaseException:
        client.close()
        raise
    faults = Faults.lose_fraction(settings.lose_fraction) if settings.lose_fraction else None
    if faults:
        log.warning("FAULT KNOB: losing %.1f%% of events on purpose", settings.lose_fraction * 100)
    audited = AuditedSubscriber(
        store,
        settings.subscription,
        topic,
        metrics,
        batch_size=settings.batch_size,
        flush_interval=settings.flush_interval_seconds,
        faults=faults,
        dead_letter_sources=source_topics(client, settings.project)
        if settings.dead_letters
        else None,
        exactly_once=exactly_once,
        relayed_for=source_topics(
            client, settings.project, denied_is_missing=False, lookups_per_second=_RELAY_LOOKUPS
        )
        if settings.receipts
        else None,
    )

    def healthz() -> dict[str, object]:
        state = health.state()
        return {"pulling": state.ok, "reason": state.reason, "store": audited.last_write_ok}

    try:
        server = _listen(settings, create_app(settings.subscription, registry, healthz))
    except BaseException:
        store.close()
        client.close()
        raise
    flow = pubsub_v1.types.FlowControl(
        max_messages=settings.max_outstanding_messages,
        max_duration_per_lease_extension=settings.lease_extension_seconds,
    )
    session = StreamSession(client, path, audited, health, stream_metrics, flow)
    log.info("subscriber on %s (topic %s), metrics on %s", path, topic, settings.listen_address)
    return Service(settings, client, store, audited, server, session)


def _listen(settings: SubscriberSettings, app: Flask) -> BackgroundServer:
    try:
        server = BackgroundServer(
            app, settings.listen_address, settings.server_limits(_HTTP_THREADS)
        )
        server.start()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise StartupError(f"cannot listen on {settings.listen_address}: {reason}") from None
    return server


_RELAY_LOOKUPS = 10.0
"""Subscription lookups a second the relay may make (Pub/Sub's admin API has a quota)."""
_MISSING_TTL_SECONDS = 60.0
_FOUND_TTL_SECONDS = 60.0
_REMEMBERED_SOURCES = 1024


def source_topics(
    client: Any,
    project: str,
    clock: Callable[[], float] = time.monotonic,
    denied_is_missing: bool = True,
    lookups_per_second: float | None = None,
) -> TopicOf:
    """The topic of a subscription dead letters came from (its id, or its full path when the
    attribute gives one), looked up once a minute per subscription (one deleted and created
    again on another topic is filed on its new topic within the minute: issue 17, case 7).
    None when it does not exist or may not be read (remembered for a minute, at most 1024
    names: a flood of invented sources costs one lookup each per minute); a transient error
    raises, so the message is retried. With `denied_is_missing` False, a subscription this
    process may not read raises too (the relay: a missing permission must not drop receipts).
    With `lookups_per_second`, lookups beyond that rate (a burst of one second's worth) raise
    LookupThrottled instead of calling Pub/Sub: a flood of invented names cannot use up the
    admin API's quota; the message is retried."""
    allowance = [lookups_per_second or 0.0, clock()]
    missing_errors: tuple[type[Exception], ...] = (exceptions.NotFound, exceptions.InvalidArgument)
    if denied_is_missing:
        missing_errors += (exceptions.PermissionDenied,)
    found: OrderedDict[str, tuple[str, float]] = OrderedDict()
    missing: OrderedDict[str, float] = OrderedDict()

    def topic_of(source: str) -> str | None:
        known = found.get(source)
        if known is not None and clock() - known[1] < _FOUND_TTL_SECONDS:
            return known[0]
        if clock() - missing.get(source, -math.inf) < _MISSING_TTL_SECONDS:
            return None
        if lookups_per_second is not None:
            now = clock()
            tokens = min(
                lookups_per_second, allowance[0] + (now - allowance[1]) * lookups_per_second
            )
            allowance[1] = now
            if tokens < 1:
                allowance[0] = tokens
                raise LookupThrottled(f"over {lookups_per_second:g} subscription lookups a second")
            allowance[0] = tokens - 1
        path = (
            source if source.startswith("projects/") else client.subscription_path(project, source)
        )
        try:
            subscription = client.get_subscription(
                subscription=path, retry=_LOOKUP_RETRY, timeout=_LOOKUP_TIMEOUT_SECONDS
            )
        except missing_errors:
            missing.pop(source, None)
            missing[source] = clock()
            while len(missing) > _REMEMBERED_SOURCES:
                missing.popitem(last=False)
            return None
        topic = str(subscription.topic).rsplit("/", 1)[-1]
        found.pop(source, None)
        found[source] = (topic, clock())
        while len(found) > _REMEMBERED_SOURCES:
            found.popitem(last=False)
        return topic

    return topic_of


class LookupThrottled(RuntimeError):
    """Too many subscription lookups a second: the message is retried later."""


def subscription_topic(
    client: pubsub_v1.SubscriberClient, path: str, configured: str | None
) -> tuple[str, bool]:
    """The subscription's topic id, checked against --topic, and whether it has exactly-once
    delivery; StartupError when it cannot be read."""
    try:
        subscription = client.get_subscription(
            subscription=path, retry=_LOOKUP_RETRY, timeout=_LOOKUP_TIMEOUT_SECONDS
        )
    except exceptions.NotFound:
        raise StartupError(f"subscription {path} does not exist") from None
    except (exceptions.GoogleAPICallError, exceptions.RetryError) as exc:
        raise StartupError(f"cannot read subscription {path} from Pub/Sub: {exc}") from None
    topic = str(subscription.topic).rsplit("/", 1)[-1]
    if configured is not None and configured != topic:
        raise StartupError(f"--topic {configured} is not the topic of {path} (it is {topic})")
    return topic, bool(subscription.enable_exactly_once_delivery)


def open_store(settings: CommonSettings) -> MongoStore:
    try:
        store = MongoStore(settings.mongo_uri, settings.database, settings.store_timeout_seconds)
    except (PyMongoError, ValueError) as exc:
        # The driver's text may quote the URI, credentials included: name the error only.
        raise StartupError(
            f"--mongo-uri rejected by the MongoDB driver ({type(exc).__name__})"
        ) from None
    try:
        store.ping()
    except StoreError as exc:
        # Unrecorded messages are nacked, so starting without the store loses nothing.
        log.warning("audit store unavailable at start: %s", exc)
    return store


if __name__ == "__main__":
    main(sys.argv[1:])
