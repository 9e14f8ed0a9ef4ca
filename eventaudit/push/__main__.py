"""`python -m eventaudit.push --subscriptions NAME[,NAME]`: an audited push endpoint.

POST /push answers Pub/Sub's pushes of the subscriptions named (each one's topic is looked up
at start); /metrics and /healthz beside it. Its handler does nothing (the receipt is the
point): a service of your own mounts `push_blueprint` or `PushMiddleware` with its handler
instead (docs/library.md).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from flask import Flask, jsonify
from prometheus_client import CollectorRegistry

from eventaudit.http import json_error, metrics_view, register_json_errors
from eventaudit.pubsub import subscriber_client
from eventaudit.push.config import PushSettings
from eventaudit.push.oidc import TokenVerifier
from eventaudit.push.receiver import PushReceiver, push_blueprint
from eventaudit.serving import BackgroundServer, exit_on_start_failure, serve_until_signal
from eventaudit.settings import configure_logging, load_settings
from eventaudit.subscriber.__main__ import open_store, subscription_topic
from eventaudit.subscriber.audited import Faults

log = logging.getLogger("push")


def create_app(receiver: PushReceiver, registry: CollectorRegistry, max_body: int) -> Flask:
    """POST /push, GET /metrics and GET /healthz (503 while the last receipt write failed)."""
    app = Flask("push")
    app.config.update(MAX_CONTENT_LENGTH=max_body)
    app.register_blueprint(push_blueprint(receiver))
    app.add_url_rule("/metrics", "metrics", metrics_view(registry))

    @app.get("/healthz")
    def healthz() -> Any:
        body = {"subscriptions": sorted(receiver.subscriptions)}
        if not receiver.store_ok():
            return json_error(503, "the audit store is unavailable", **body)
        return jsonify(status="ok", **body)

    register_json_errors(app)
    return app


def main(argv: list[str] | None = None) -> None:
    """Entry point of `python -m eventaudit.push`."""
    settings = load_settings(PushSettings, argv)
    configure_logging(settings.log_level)
    with exit_on_start_failure("push receiver"):
        client = subscriber_client()
        try:
            topics = {
                sub: subscription_topic(
                    client, client.subscription_path(settings.project, sub), None
                )[0]
                for sub in settings.subscription_list
            }
        finally:
            client.close()
        store = open_store(settings)
        verifier = None
        if settings.oidc_audience and settings.oidc_service_account:
            verifier = TokenVerifier(
                settings.oidc_audience, settings.oidc_service_account, settings.oidc_certs_url
            )
        else:
            log.warning(
                "pushes are not authenticated (no --oidc-audience): anyone who can reach this "
                "endpoint can post a delivery"
            )
        faults = Faults.lose_fraction(settings.lose_fraction) if settings.lose_fraction else None
        if faults:
            log.warning(
                "FAULT KNOB: losing %.1f%% of events on purpose", settings.lose_fraction * 100
            )
        registry = CollectorRegistry()
        receiver = PushReceiver(
            store, topics, registry, verifier=verifier, timeout=settings.receipt_timeout_seconds,
            batch_size=settings.batch_size, faults=faults,
        )  # fmt: skip
        server = BackgroundServer(
            create_app(receiver, registry, settings.max_body_bytes),
            settings.listen_address,
            settings.server_limits(settings.threads, settings.max_body_bytes),
        )
        receiver.start()
    log.info("push receiver on %s for %s", settings.listen_address, topics)
    serving = serve_until_signal(server)
    deadline = time.monotonic() + settings.shutdown_timeout_seconds
    # Pushes in progress finish (each waits for its receipt at most the receipt timeout);
    # what is still unanswered is pushed again by Pub/Sub.
    server.stop(timeout=settings.shutdown_timeout_seconds * 0.6)
    receiver.stop(timeout=max(0.0, deadline - time.monotonic() - 1))
    store.close()
    log.info("push receiver stopped")
    if not serving:
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
