"""`python -m eventaudit.publisher`: parse, validate, wire, serve."""

from __future__ import annotations

import logging
import sys

from flask import Flask
from google.cloud import pubsub_v1
from prometheus_client import CollectorRegistry

from eventaudit.publisher.app import PublisherDeps, create_app
from eventaudit.publisher.audited import AuditedPublisher, PublisherMetrics, RecordBuffer
from eventaudit.publisher.config import PublisherSettings
from eventaudit.serving import serve_with_gunicorn
from eventaudit.settings import configure_logging, load_settings
from eventaudit.store import MongoStore, StoreError

log = logging.getLogger("publisher")


def main(argv: list[str] | None = None) -> None:
    """Entry point of `eventaudit-publisher`."""
    settings = load_settings(PublisherSettings, argv)
    configure_logging(settings.log_level)
    running: list[tuple[pubsub_v1.PublisherClient, AuditedPublisher, RecordBuffer]] = []

    def factory() -> Flask:
        registry = CollectorRegistry()
        metrics = PublisherMetrics(registry)
        store = MongoStore(settings.mongo_uri, settings.database, settings.store_timeout_seconds)
        try:
            store.ensure_indexes()
        except StoreError as exc:
            # The business path must not depend on the audit store: start anyway, buffer records.
            log.warning("audit store unavailable at start, records will be buffered: %s", exc)
        buffer = RecordBuffer(
            store, metrics, settings.record_buffer_capacity, settings.record_batch_size
        )
        buffer.start()
        client = pubsub_v1.PublisherClient()
        publisher = AuditedPublisher(
            client, settings.project, buffer, metrics, settings.payload_cap_bytes
        )
        running.append((client, publisher, buffer))
        log.info(
            "publisher API on %s, users topic %s", settings.listen_address, settings.users_topic
        )
        return create_app(settings, PublisherDeps(publisher, buffer, registry))

    def on_exit() -> None:
        # Send what the client still batches, let every publish settle into the record
        # buffer, then write the buffer: a clean stop loses no record.
        for client, publisher, buffer in running:
            client.stop()
            if not publisher.flush(timeout=10):
                log.error("publishes still unsettled at shutdown")
            buffer.close(timeout=10)

    serve_with_gunicorn(factory, settings.listen_address, settings.threads, on_exit)


if __name__ == "__main__":
    main(sys.argv[1:])
