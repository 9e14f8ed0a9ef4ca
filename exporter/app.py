"""The exporter's HTTP surface: /metrics, /healthz, /api/v1/missed and a status page."""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify, request
from prometheus_client import CollectorRegistry

from eventaudit.exporter.collector import EvaluationState
from eventaudit.http import json_error, metrics_view, register_json_errors
from eventaudit.store import ExporterStore, StoreError

# Pub/Sub ids: a letter first, then letters, digits and - _ . ~ + %. Nothing else reaches a query.
_ID = re.compile(r"^[A-Za-z][A-Za-z0-9\-_.~+%]{2,254}$")
_MISSED_PARAMS = {"topic", "subscription", "window", "limit"}
MAX_LIMIT = 10_000


@dataclass(frozen=True)
class ExporterDeps:
    """What the exporter's routes need."""

    store: ExporterStore
    state: EvaluationState
    registry: CollectorRegistry


bp = Blueprint("exporter", __name__)


def _deps() -> ExporterDeps:
    deps: ExporterDeps = current_app.config["DEPS"]
    return deps


@bp.get("/api/v1/missed")
def missed() -> Any:
    """Ids and trace ids of the missed events of one subscription over one window."""
    unknown = sorted(set(request.args) - _MISSED_PARAMS)
    if unknown:
        return json_error(400, f"unknown query parameter(s): {', '.join(unknown)}")
    if any(len(request.args.getlist(k)) > 1 for k in request.args):
        return json_error(400, "each query parameter may be given once")
    topic = request.args.get("topic", "")
    subscription = request.args.get("subscription", "")
    for name, value in (("topic", topic), ("subscription", subscription)):
        if not _ID.match(value):
            return json_error(400, f"{name} must be a Pub/Sub id (letters, digits, - _ . ~ + %)")
    raw_limit = request.args.get("limit", "100")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_LIMIT:
        return json_error(400, f"limit must be an integer from 1 to {MAX_LIMIT}")
    limit = int(raw_limit)

    deps = _deps()
    _, snapshot = deps.state.current()
    if snapshot is None:
        return json_error(503, "no evaluation has completed yet")
    label = request.args.get("window", snapshot.windows[0].label)
    window = snapshot.window(label)
    if window is None:
        allowed = ", ".join(w.label for w in snapshot.windows)
        return json_error(400, f"window must be one of: {allowed}")
    start = snapshot.frontier - window.length
    try:
        events = deps.store.missed_events(topic, subscription, start, snapshot.frontier)
    except StoreError as exc:
        return json_error(503, f"audit store unavailable: {exc}")
    return jsonify(
        topic=topic,
        subscription=subscription,
        window=label,
        start=start.isoformat(),
        end=snapshot.frontier.isoformat(),
        missed=len(events),
        truncated=len(events) > limit,
        events=[
            {
                "eventID": e.event_id,
                "traceID": e.trace_id,
                "publishTime": e.publish_time.isoformat(),
            }
            for e in events[:limit]
        ],
    )


@bp.get("/healthz")
def healthz() -> Any:
    """200 while the last evaluation succeeded, 503 with the reason otherwise."""
    state = _deps().state
    ok, _ = state.current()
    if not ok:
        return json_error(503, state.error or "no evaluation has completed yet", up=0)
    return jsonify(status="ok", up=1, lastEvaluation=state.last_success)


@bp.get("/")
def status_page() -> Response:
    """A small human-readable table of the latest evaluation."""
    state = _deps().state
    ok, snapshot = state.current()
    rows = []
    if snapshot is not None:
        for (topic, sub), windows in sorted(snapshot.subscriptions.items()):
            for label, s in windows.items():
                rate = s.completion_rate
                shown = "n/a" if math.isnan(rate) else f"{rate * 100:.2f}%"
                rows.append(
                    "<tr>"
                    + "".join(
                        f"<td>{html.escape(str(v))}</td>"
                        for v in (
                            topic,
                            sub,
                            label,
                            s.published,
                            s.received,
                            s.missed,
                            shown,
                            s.duplicates,
                            s.unmatched,
                        )
                    )
                    + "</tr>"
                )
    status = "up" if ok else f"DOWN: {state.error or 'no evaluation yet'}"
    frontier = snapshot.frontier.isoformat() if snapshot else "-"
    body = f"""<!doctype html><html><head><title>eventaudit</title>
<style>body{{font-family:sans-serif}}td,th{{padding:2px 10px;text-align:right}}</style></head>
<body><h1>eventaudit</h1><p>Status: {html.escape(status)}. Settled up to {frontier}
(settle delay {state.settle_seconds:g}s). <a href="/metrics">/metrics</a></p>
<table><tr><th>topic</th><th>subscription</th><th>window</th><th>published</th>
<th>received</th><th>missed</th><th>completion</th><th>duplicates</th><th>unmatched</th></tr>
{"".join(rows)}</table></body></html>"""
    return Response(body, mimetype="text/html")


def create_app(deps: ExporterDeps) -> Flask:
    """The exporter's Flask app."""
    app = Flask("exporter")
    app.config.update(DEPS=deps)
    app.register_blueprint(bp)
    app.add_url_rule("/metrics", "metrics", metrics_view(deps.registry))
    register_json_errors(app)
    return app
