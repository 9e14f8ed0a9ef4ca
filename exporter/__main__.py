"""`python -m eventaudit.exporter`: parse, validate, wire, serve."""

from __future__ import annotations

import logging
import sys

from flask import Flask
from prometheus_client import CollectorRegistry

from eventaudit.exporter.app import ExporterDeps, create_app
from eventaudit.exporter.collector import CompletionCollector, EvaluationState
from eventaudit.exporter.config import ExporterSettings
from eventaudit.exporter.evaluator import Evaluator
from eventaudit.exporter.loop import EvaluationLoop
from eventaudit.exporter.subscriptions import ExpectedSubscriptions, pubsub_lister
from eventaudit.serving import serve_with_gunicorn
from eventaudit.settings import configure_logging, load_settings
from eventaudit.store import MongoStore, StoreError

log = logging.getLogger("exporter")


def main(argv: list[str] | None = None) -> None:
    """Entry point of `eventaudit-exporter`."""
    settings = load_settings(ExporterSettings, argv)
    configure_logging(settings.log_level)
    loops: list[EvaluationLoop] = []

    def factory() -> Flask:
        store = MongoStore(settings.mongo_uri, settings.database, settings.store_timeout_seconds)
        try:
            store.ensure_indexes()
        except StoreError as exc:
            log.error(
                "audit store unavailable at start (eventaudit_up stays 0 until it is): %s", exc
            )
        expected = ExpectedSubscriptions(
            settings.expected_map,
            settings.excluded_set,
            pubsub_lister(settings.project) if settings.list_subscriptions else None,
            settings.subscription_refresh_seconds,
        )
        evaluator = Evaluator(
            store, expected, settings.window_list, settings.bucket_delta, settings.settle_delta
        )
        state = EvaluationState(settle_seconds=settings.settle_delta.total_seconds())
        registry = CollectorRegistry()
        registry.register(CompletionCollector(state, expected))
        loop = EvaluationLoop(
            evaluator, state, store, settings.bucket_delta, settings.retention_delta
        )
        loop.start()
        loops.append(loop)
        log.info(
            "exporter on %s: buckets %s, settle %s, windows %s",
            settings.listen_address,
            settings.bucket,
            settings.settle_delay,
            settings.windows,
        )
        return create_app(ExporterDeps(store, state, registry))

    def on_exit() -> None:
        for loop in loops:
            loop.stop()

    serve_with_gunicorn(factory, settings.listen_address, settings.threads, on_exit)


if __name__ == "__main__":
    main(sys.argv[1:])
