"""`python -m eventaudit.publisher`: parse, validate, wire, serve, stop within the budget."""

from __future__ import annotations

import logging
import sys
import time

from google.cloud import pubsub_v1
from prometheus_client import CollectorRegistry

from eventaudit.publisher.app import PublisherDeps, create_app
from eventaudit.publisher.audited import AuditedPublisher, PublisherMetrics, RecordBuffer
from eventaudit.publisher.config import PublisherSettings
from eventaudit.pubsub import publisher_client
from eventaudit.serving import (
    BackgroundServer,
    call_within,
    exit_on_start_failure,
    serve_until_signal,
)
from eventaudit.settings import configure_logging, load_settings
from eventaudit.store import MongoStore, StoreError

log = logging.getLogger("publisher")

_MARGIN_SECONDS = 1.0


def main(argv: list[str] | None = None) -> None:
    """Entry point of `eventaudit-publisher`."""
    settings = load_settings(PublisherSettings, argv)
    configure_logging(settings.log_level)
    with exit_on_start_failure("publisher"):
        registry = CollectorRegistry()
        metrics = PublisherMetrics(registry)
        store = MongoStore(settings.mongo_uri, settings.database, settings.store_timeout_seconds)
        try:
            store.ping()
        except StoreError as exc:
            # The business path must not depend on the audit store: start anyway, buffer records.
            log.warning("audit store unavailable at start, records will be buffered: %s", exc)
        buffer = RecordBuffer(
            store, metrics, settings.record_buffer_capacity, settings.record_batch_size
        )
        # Ordering enabled: X-Ordering-Key publishes in order; events without a key batch as
        # before.
        client = publisher_client(
            publisher_options=pubsub_v1.types.PublisherOptions(enable_message_ordering=True)
        )
        publisher = AuditedPublisher(
            client, settings.project, buffer, metrics, settings.payload_cap_bytes
        )
        app = create_app(settings, PublisherDeps(publisher, buffer, registry))
        server = BackgroundServer(
            app,
            settings.listen_address,
            settings.server_limits(settings.threads, settings.max_body_bytes),
        )
        buffer.start()
    log.info("publisher API on %s, users topic %s", settings.listen_address, settings.users_topic)
    serving = serve_until_signal(server)

    # One budget for the whole stop: requests in progress (each waits for Pub/Sub at most
    # publish_timeout_seconds), then every publish settles into the buffer and the buffer is
    # written. What is still queued then is counted dropped and logged by close(); the write
    # in progress is counted written or dropped when the store answers, which the reserve
    # (one store timeout) leaves time for.
    budget = settings.shutdown_timeout_seconds
    deadline = time.monotonic() + budget
    reserve = settings.store_timeout_seconds + _MARGIN_SECONDS
    log.info("stopping within %gs", budget)
    server.stop(timeout=min(budget * 0.4, settings.publish_timeout_seconds + _MARGIN_SECONDS))
    # The client sends what it still batches; after this no publish is accepted.
    call_within(deadline - reserve - time.monotonic(), client.stop, "Pub/Sub client stop")
    if not publisher.flush(timeout=max(0.0, deadline - reserve - time.monotonic())):
        log.error("publishes unsettled or records unwritten when the flush time ran out")
    buffer.close(timeout=max(0.0, deadline - reserve - time.monotonic()))
    while buffer.depth() and time.monotonic() < deadline - _MARGIN_SECONDS / 2:
        time.sleep(0.05)
    call_within(deadline - time.monotonic(), store.close, "store close")
    # A write the store has not answered by now has an unknown outcome: count it dropped
    # (the record may be missing), and say it may have landed.
    unsure = buffer.depth()
    dropped = _count(registry, "dropped") + unsure
    log.log(
        logging.ERROR if dropped else logging.INFO,
        "publisher stopped: %d publish records written, %d dropped, %d conflicting, %d retried%s",
        _count(registry, "written"),
        dropped,
        _count(registry, "conflict"),
        _count(registry, "retried"),
        f" ({unsure} of the dropped were still being written when time ran out: they may be "
        "in the store)"
        if unsure
        else "",
    )
    if not serving:
        sys.exit(1)


def _count(registry: CollectorRegistry, outcome: str) -> int:
    value = registry.get_sample_value("eventaudit_publisher_records_total", {"outcome": outcome})
    return int(value or 0)


if __name__ == "__main__":
    main(sys.argv[1:])
