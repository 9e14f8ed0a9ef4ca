"""`python -m eventaudit.subscriber --subscription NAME`: parse, validate, wire, run."""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading

from google.cloud import pubsub_v1
from prometheus_client import CollectorRegistry

from eventaudit.http import BackgroundServer
from eventaudit.settings import configure_logging, load_settings
from eventaudit.store import MongoStore, StoreError
from eventaudit.subscriber.audited import AuditedSubscriber, Faults, SubscriberMetrics
from eventaudit.subscriber.config import SubscriberSettings
from eventaudit.subscriber.service import create_app

log = logging.getLogger("subscriber")


def main(argv: list[str] | None = None) -> None:
    """Entry point of `eventaudit-subscriber`."""
    settings = load_settings(SubscriberSettings, argv)
    configure_logging(settings.log_level)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    store = MongoStore(settings.mongo_uri, settings.database, settings.store_timeout_seconds)
    try:
        store.ensure_indexes()
    except StoreError as exc:
        # Unrecorded messages are nacked, so starting without the store loses nothing.
        log.warning("audit store unavailable at start: %s", exc)

    registry = CollectorRegistry()
    metrics = SubscriberMetrics(registry, settings.subscription)
    with pubsub_v1.SubscriberClient() as client:
        path = client.subscription_path(settings.project, settings.subscription)
        topic = (
            settings.topic or client.get_subscription(subscription=path).topic.rsplit("/", 1)[-1]
        )
        faults = Faults.lose_fraction(settings.lose_fraction) if settings.lose_fraction else None
        if faults:
            log.warning(
                "FAULT KNOB: losing %.1f%% of events on purpose", settings.lose_fraction * 100
            )
        audited = AuditedSubscriber(
            store,
            settings.subscription,
            topic,
            metrics,
            batch_size=settings.batch_size,
            flush_interval=settings.flush_interval_seconds,
            faults=faults,
        )
        audited.start()
        flow = pubsub_v1.types.FlowControl(max_messages=settings.max_outstanding_messages)
        future = client.subscribe(path, callback=audited, flow_control=flow)
        server = BackgroundServer(
            create_app(
                settings.subscription,
                registry,
                lambda: {"pulling": not future.done(), "store": audited.last_write_ok},
            ),
            settings.listen_address,
        )
        server.start()
        log.info("subscriber on %s (topic %s), metrics on %s", path, topic, settings.listen_address)
        while not stop.wait(0.5):
            if future.done():
                log.error("streaming pull ended: %s", future.exception())
                break
        future.cancel()
        with contextlib.suppress(Exception):  # a cancelled future raises; the cause is logged
            future.result(timeout=10)
        audited.stop()
        server.stop()
    store.close()
    if not stop.is_set():
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
