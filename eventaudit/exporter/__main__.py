"""`python -m eventaudit.exporter`: parse, validate, wire, serve, stop within the budget."""

from __future__ import annotations

import logging
import sys
import time
from datetime import timedelta

from prometheus_client import CollectorRegistry, ProcessCollector

from eventaudit.exporter import lookup
from eventaudit.exporter.app import ExporterDeps, create_app
from eventaudit.exporter.collector import CompletionCollector, EvaluationState
from eventaudit.exporter.config import ExporterSettings, replica_name
from eventaudit.exporter.evaluator import Evaluator
from eventaudit.exporter.leases import Leases
from eventaudit.exporter.loop import EvaluationLoop
from eventaudit.exporter.missed import MissedAnswers
from eventaudit.exporter.subscriptions import ExpectedSubscriptions, pubsub_lister
from eventaudit.serving import (
    BackgroundServer,
    call_within,
    exit_on_start_failure,
    serve_until_signal,
)
from eventaudit.settings import configure_logging, load_settings
from eventaudit.store import MongoStore, StoreError

log = logging.getLogger("exporter")


def main(argv: list[str] | None = None) -> None:
    """Entry point of `eventaudit-exporter` (and of `eventaudit-exporter lookup EVENT_ID`)."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["lookup"]:
        sys.exit(lookup.main(args[1:]))
    settings = load_settings(ExporterSettings, argv)
    configure_logging(settings.log_level)
    with exit_on_start_failure("exporter"):
        store = MongoStore(settings.mongo_uri, settings.database, settings.store_timeout_seconds)
        try:
            store.ping()
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
        leases = Leases(
            store, replica_name(settings.replica_id), timedelta(seconds=settings.lease_seconds)
        )
        evaluator = Evaluator(
            store,
            expected,
            settings.window_list,
            settings.bucket_delta,
            settings.settle_delta,
            leases=leases,
        )
        state = EvaluationState(settle_seconds=settings.settle_delta.total_seconds())
        registry = CollectorRegistry()
        registry.register(CompletionCollector(state, expected))
        registry.register(evaluator)
        registry.register(leases)
        ProcessCollector(registry=registry)  # RSS among others: the digest cache is bounded
        missed = MissedAnswers(settings.missed_concurrency)
        registry.register(missed)
        loop = EvaluationLoop(
            evaluator, state, store, settings.bucket_delta, settings.retention_delta
        )
        app = create_app(ExporterDeps(store, state, registry, missed, settings.project))
        server = BackgroundServer(
            app, settings.listen_address, settings.server_limits(settings.threads)
        )
        loop.start()
    log.info(
        "exporter %s on %s: buckets %s, settle %s, windows %s, topic leases of %gs",
        leases.replica,
        settings.listen_address,
        settings.bucket,
        settings.settle_delay,
        settings.windows,
        settings.lease_seconds,
    )
    serving = serve_until_signal(server)

    # Nothing here is lost by stopping (evaluations are recomputed from the store), so the
    # evaluation in progress gets what is left of the budget and is abandoned after that.
    deadline = time.monotonic() + settings.shutdown_timeout_seconds
    server.stop(timeout=settings.shutdown_timeout_seconds / 2)
    call_within(deadline - time.monotonic(), loop.stop, "evaluation loop stop")
    if not loop.running:
        # No evaluation runs any more: hand the topics over to the other replicas now (else
        # they expire after the lease time).
        call_within(deadline - time.monotonic(), leases.release_all, "lease release")
    store.close()
    log.info("exporter stopped")
    if not serving:
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
