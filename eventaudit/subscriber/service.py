"""The subscriber process's small HTTP surface: /metrics and /healthz."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Flask, jsonify
from prometheus_client import CollectorRegistry

from eventaudit.http import json_error, metrics_view, register_json_errors


def create_app(
    subscription: str, registry: CollectorRegistry, health: Callable[[], dict[str, Any]]
) -> Flask:
    """`health()` returns {"pulling": bool, "reason": str | None, "store": bool}; a stream
    that is not pulling answers 503 with its short reason (never a raw client error)."""
    app = Flask("subscriber")
    app.add_url_rule("/metrics", "metrics", metrics_view(registry))

    @app.get("/healthz")
    def healthz() -> Any:
        state = health()
        body = {
            "subscription": subscription,
            "pulling": state["pulling"],
            "store": "ok" if state["store"] else "unavailable",
        }
        if not state["pulling"]:
            return json_error(503, state.get("reason") or "streaming pull stopped", **body)
        return jsonify(status="ok", **body)

    register_json_errors(app)
    return app
